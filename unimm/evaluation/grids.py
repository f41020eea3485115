"""The one image-grid writer: samples, reconstructions, documents as a PNG.

  save_image_grid(images, captions, "grid.png", columns=8, cell=128)
  display(image_grid(images, captions))   # a PIL image, e.g. in a notebook

Each image is scaled (nearest neighbour, keeping its aspect) to `cell` px
high and its caption wrapped beneath it in up to `text_lines` lines. To
show images side by side in one cell (an original beside its
reconstruction), concatenate them along the width first (`side_by_side`).
"""
import io
from collections.abc import Sequence

from etils import epath
import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

LINE_HEIGHT = 12  # px per caption line (Pillow's default bitmap font)
PAD = 4  # px of white between cells and around the grid


def side_by_side(*images: np.ndarray) -> np.ndarray:
  """uint8 [N, H, W_i, C] arrays -> [N, H, sum W_i, C]: one cell each."""
  return np.concatenate([np.asarray(x, np.uint8) for x in images], axis=2)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int
          ) -> list[str]:
  """`text` in lines no wider than `width` px (a longer word stays whole)."""
  lines, line = [], ""
  for word in text.split():
    candidate = f"{line} {word}".strip()
    if line and draw.textlength(candidate, font=font) > width:
      lines.append(line)
      line = word
    else:
      line = candidate
  if line:
    lines.append(line)
  return lines


def save_image(image: Image.Image, path: epath.PathLike) -> None:
  """Writes `image` at `path` (local or gs://...) in the format its
  extension names (".png", ".jpg", ...)."""
  path = epath.Path(path)
  image_format = Image.registered_extensions().get(path.suffix.lower())
  if image_format is None:
    raise ValueError(f"Cannot tell the image format of {str(path)!r}; name "
                     "the file .png or .jpg.")
  buffer = io.BytesIO()
  image.save(buffer, format=image_format)
  path.write_bytes(buffer.getvalue())


def save_image_grid(images, captions: Sequence[str] | None,
                    path: epath.PathLike, *, columns: int = 8,
                    cell: int = 128, text_lines: int = 4) -> None:
  """Writes image_grid(images, captions, ...) as a PNG at `path`."""
  save_image(image_grid(images, captions, columns=columns, cell=cell,
                        text_lines=text_lines), path)


def image_grid(images, captions: Sequence[str] | None = None, *,
               columns: int = 8, cell: int = 128,
               text_lines: int = 4) -> Image.Image:
  """A grid of `images` (uint8 [H, W, 3] each, any aspect) as one PIL image
  (notebooks display it; save_image_grid writes it).

  Args:
    images: the images, in row-major order.
    captions: one per image, wrapped beneath it; None for no text.
    columns: images per row (fewer when there are fewer images).
    cell: the height every image is scaled to (nearest), in px.
    text_lines: caption lines kept per image (the rest is cut).
  """
  images = [np.asarray(image, np.uint8) for image in images]
  if not images:
    raise ValueError("image_grid got no images.")
  if captions is None:
    captions, text_lines = [""] * len(images), 0
  if len(captions) != len(images):
    raise ValueError(f"image_grid got {len(images)} images but "
                     f"{len(captions)} captions; expected one per image.")
  font = ImageFont.load_default()
  cell_w = max(cell * image.shape[1] // image.shape[0] for image in images)
  text_h = text_lines * LINE_HEIGHT + PAD if text_lines else 0
  cell_h = cell + text_h + PAD
  n = len(images)
  columns = max(1, min(columns, n))
  rows = -(-n // columns)
  canvas = Image.new("RGB", (columns * (cell_w + PAD) + PAD,
                             rows * cell_h + PAD), "white")
  draw = ImageDraw.Draw(canvas)
  for i, (image, caption) in enumerate(zip(images, captions)):
    x = PAD + (i % columns) * (cell_w + PAD)
    y = PAD + (i // columns) * cell_h
    if image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]  # grayscale
    tile = Image.fromarray(image).convert("RGB").resize(
        (cell * image.shape[1] // image.shape[0], cell), Image.NEAREST)
    canvas.paste(tile, (x, y))
    for j, line in enumerate(_wrap(draw, caption, font, cell_w)[:text_lines]):
      draw.text((x, y + cell + PAD // 2 + j * LINE_HEIGHT), line,
                fill="black", font=font)
  return canvas
