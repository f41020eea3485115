"""Tests for unimm/data/convert.py: own images + captions -> ArrayRecord."""
import io
import json
import os
import tarfile

import numpy as np
from PIL import Image

from unimm.data import convert
from unimm.data import pipeline

SIZE = 16


def _png(image: Image.Image) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


def _stripes(width: int, height: int) -> Image.Image:
  """Red | green | blue vertical thirds."""
  array = np.zeros((height, width, 3), np.uint8)
  third = width // 3
  array[:, :third, 0] = 255
  array[:, third:2 * third, 1] = 255
  array[:, 2 * third:, 2] = 255
  return Image.fromarray(array)


def _image_folder(root) -> tuple[str, str]:
  images = root / "images"
  (images / "sub").mkdir(parents=True)
  _stripes(48, 16).save(images / "wide.png")  # non-square: centre is green
  Image.fromarray(np.full((20, 20, 3), 100, np.uint8)).save(
      images / "sub" / "photo.jpg", quality=90)
  Image.fromarray(np.full((24, 24), 70, np.uint8)).save(images / "gray.png")
  rgba = np.zeros((16, 16, 4), np.uint8)  # fully transparent black
  Image.fromarray(rgba, "RGBA").save(images / "rgba.png")
  Image.new("P", (18, 18), 3).save(images / "palette.png")
  (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  Image.new("RGB", (8, 8)).save(images / "unreferenced.png")
  absolute = root / "elsewhere.png"
  Image.new("RGB", (30, 40), (0, 0, 255)).save(absolute)
  lines = [
      {"image": "wide.png", "caption": "stripes"},
      {"image": "sub/photo.jpg", "caption": "a grey photo"},
      {"image": "gray.png", "caption": "grayscale"},
      {"image": "rgba.png", "caption": "transparent"},
      {"image": "palette.png", "caption": "palette"},
      {"image": str(absolute), "caption": "absolute path"},
      {"image": "corrupt.jpg", "caption": "corrupt"},
      {"image": "missing.png", "caption": "no such file"},
  ]
  captions = root / "captions.jsonl"
  captions.write_text("\n".join(json.dumps(l) for l in lines)
                      + "\n{not json\n\n")
  return str(images), str(captions)


def _read_all(out: str, split: str, image_size: int = SIZE) -> dict:
  dataset = pipeline.image_text_dataset(
      out, split, batch_size=1, image_size=image_size, shuffle=False, seed=0,
      num_epochs=1)
  images = {}
  for batch in dataset:
    assert set(batch) == {"image", "caption"}
    assert batch["image"].shape == (1, image_size, image_size, 3)
    assert batch["image"].dtype == np.uint8
    assert batch["caption"].dtype == object
    images[batch["caption"][0]] = batch["image"][0]
  return images


def test_convert_folder_counts_summary_and_pipeline(tmp_path):
  images_dir, captions = _image_folder(tmp_path)
  out = str(tmp_path / "out")
  summary = convert.convert(out=out, image_size=SIZE, images_dir=images_dir,
                            captions=captions, num_shards=2,
                            image_format="png", progress_every=2)
  assert summary["converted"] == 6
  assert summary["skipped_by_reason"] == {
      "bad captions line": 1, "caption without image": 1, "corrupt image": 1,
      "image without caption": 1}
  assert summary["skipped"] == 4
  assert summary["captions_without_images"] == 1
  assert summary["images_without_captions"] == 1
  skipped = {os.path.basename(e["path"].split(":")[0]): e["reason"]
             for e in summary["first_skipped"]}
  assert skipped["corrupt.jpg"] == "corrupt image"
  assert skipped["missing.png"] == "caption without image"
  assert skipped["unreferenced.png"] == "image without caption"
  assert skipped["captions.jsonl"] == "bad captions line"
  with open(os.path.join(out, "convert_summary.json")) as f:
    assert json.load(f) == summary

  images = _read_all(out, "train")
  assert set(images) == {"stripes", "a grey photo", "grayscale",
                         "transparent", "palette", "absolute path"}
  stripes = images["stripes"].astype(int)  # centre crop of R|G|B = green
  assert (stripes[:, 2:-2, 1] > 200).all() and (stripes[:, 2:-2, 0] < 50).all()
  np.testing.assert_array_equal(images["grayscale"], 70)  # L -> RGB
  np.testing.assert_array_equal(images["transparent"], 255)  # on white
  np.testing.assert_array_equal(images["absolute path"][..., 2], 255)
  assert np.abs(images["a grey photo"].astype(int) - 100).max() <= 3

  # A different config.data.image_size: resized on the fly.
  small = _read_all(out, "train", image_size=8)
  np.testing.assert_array_equal(small["grayscale"], 70)


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def test_convert_tar_shards_in_memory(tmp_path):
  shards = tmp_path / "shards"
  shards.mkdir()
  red = _png(Image.new("RGB", (20, 30), (255, 0, 0)))
  with tarfile.open(shards / "00000.tar", "w") as tar:
    _tar_member(tar, "000.png", red)
    _tar_member(tar, "000.txt", b"a red square")
    _tar_member(tar, "000.json", b"{}")
    _tar_member(tar, "../evil.png", red)
    _tar_member(tar, "../evil.txt", b"escape")
    _tar_member(tar, "/abs.txt", b"absolute")
    _tar_member(tar, "001.jpg", b"corrupt bytes")
    _tar_member(tar, "001.txt", b"corrupt")
    _tar_member(tar, "002.txt", b"caption only")
  with tarfile.open(shards / "00001.tar", "w") as tar:
    _tar_member(tar, "dir/003.webp.txt", b"ignored: not KEY.txt")
    _tar_member(tar, "dir/004.png", _png(Image.new("LA", (10, 10), (9, 255))))
    _tar_member(tar, "dir/004.txt", b"dark grey")
    _tar_member(tar, "dir/005.png", red)  # image without caption
  (shards / "broken.tar").write_bytes(b"not a tar file at all" * 100)
  out = str(tmp_path / "out")
  cwd = os.getcwd()
  os.chdir(tmp_path)  # nothing may be written next to the shards
  try:
    summary = convert.convert(out=out, image_size=SIZE, split="validation",
                              tar_shards=str(shards / "*.tar"), num_shards=3)
  finally:
    os.chdir(cwd)
  assert summary["converted"] == 2
  assert summary["skipped_by_reason"] == {
      "caption without image": 1, "corrupt image": 1,
      "image without caption": 1, "unreadable tar": 1,
      "unsafe member name": 3}
  assert not (tmp_path / "evil.png").exists()
  assert sorted(os.listdir(tmp_path)) == ["out", "shards"]
  images = _read_all(out, "validation")
  assert set(images) == {"a red square", "dark grey"}
  assert np.abs(images["dark grey"].astype(int) - 9).max() <= 2  # JPEG
  assert (images["a red square"][..., 0] >= 250).all()  # JPEG q95


def test_decompression_bomb_guard_is_kept(tmp_path, monkeypatch):
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
  Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
  captions = tmp_path / "captions.jsonl"
  captions.write_text(json.dumps({"image": "big.png", "caption": "big"}))
  summary = convert.convert(out=str(tmp_path / "out"), image_size=SIZE,
                            images_dir=str(tmp_path), captions=str(captions))
  assert summary["converted"] == 0
  assert summary["skipped_by_reason"] == {"decompression bomb": 1}
