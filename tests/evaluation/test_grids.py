"""unimm.evaluation.grids: one PNG of images with wrapped captions."""
import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont
import pytest

from unimm.evaluation import grids


def _images(n, size=32):
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_grid_size_and_pixels(tmp_path):
  path = str(tmp_path / "grid.png")
  images = _images(10)
  grids.save_image_grid(images, [f"caption {i}" for i in range(10)], path,
                        columns=4, cell=64, text_lines=2)
  pad, text_h = grids.PAD, 2 * grids.LINE_HEIGHT + grids.PAD
  with Image.open(path) as grid:
    assert grid.size == (4 * (64 + pad) + pad, 3 * (64 + text_h + pad) + pad)
    grid = np.asarray(grid.convert("RGB"))
  # The first cell is the first image scaled 2x (nearest).
  cell = grid[pad:pad + 64, pad:pad + 64]
  np.testing.assert_array_equal(cell, images[0].repeat(2, 0).repeat(2, 1))


def test_captions_wrap_and_no_captions(tmp_path):
  one_line, wrapped = str(tmp_path / "a.png"), str(tmp_path / "b.png")
  images = _images(2, 16)
  grids.save_image_grid(images, ["a", "a"], one_line, cell=64)
  long = " ".join(["word"] * 40)
  grids.save_image_grid(images, [long, "a"], wrapped, cell=64)
  text_rows = []
  for path in (one_line, wrapped):
    with Image.open(path) as grid:
      below = np.asarray(grid.convert("L"))[grids.PAD + 64:]
      text_rows.append(int((below < 128).any(axis=1).sum()))
  assert text_rows[1] > 2 * text_rows[0]  # several lines, not one
  draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
  lines = grids._wrap(draw, long, ImageFont.load_default(), 64)  # pylint: disable=protected-access
  assert len(lines) > 4 and " ".join(lines) == long
  # No captions: no text area; wide images keep their aspect.
  path = str(tmp_path / "pairs.png")
  pairs = grids.side_by_side(images, images)  # [2, 16, 32, 3]
  grids.save_image_grid(pairs, None, path, columns=8, cell=32)
  with Image.open(path) as grid:
    assert grid.size == (2 * (64 + grids.PAD) + grids.PAD,
                         32 + 2 * grids.PAD)


def test_errors():
  with pytest.raises(ValueError, match="2 images but 1 captions"):
    grids.save_image_grid(_images(2), ["a"], "unused.png")
  with pytest.raises(ValueError, match="no images"):
    grids.save_image_grid([], [], "unused.png")
