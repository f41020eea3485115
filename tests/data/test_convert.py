"""Tests for unimm/data/convert.py: own images + captions -> ArrayRecord.

The other input formats (CSV, imagefolder, parquet, COCO) and the
"captions" feature: test_convert_formats.py.
"""
import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib

from absl import flags
import numpy as np
from PIL import Image
from PIL import ImageFile
import pytest
import tensorflow_datasets as tfds

from unimm.data import convert
from unimm.data import pipeline
from unimm.tools import convert as convert_tool

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
    assert set(batch) == {"image", "caption", "captions"}
    # Every caption of the record, the first one first.
    assert batch["captions"][0].split("\n")[0] == batch["caption"][0]
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
  # Above twice Image.MAX_IMAGE_PIXELS: Pillow refuses it when opening.
  assert summary["skipped_by_reason"] == {"image too large": 1}


def _records(out: str, split: str = "train") -> list[dict]:
  """Every stored example: {"caption": str, "captions": [str], "image"}."""
  source = tfds.builder_from_directory(out).as_data_source(split=split)
  return [{"caption": e["caption"].decode(),
           "captions": e["captions"].decode().split("\n"),
           "image": e["image"]} for e in source]


def test_bad_captions_lines_are_skipped_with_file_and_line(tmp_path):
  """A non-UTF-8 byte, a lone surrogate or deep nesting spoils one line."""
  Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "red.png")
  Image.new("RGB", (8, 8)).save(tmp_path / "black.png")
  captions = tmp_path / "captions.jsonl"
  captions.write_bytes(b"\n".join([
      b'\xef\xbb\xbf{"image": "red.png"}',  # BOM; no caption
      b'{"image": "red.png", "caption": "red"}',
      b'{"image": "black.png", "caption": "caf\xe9"}',  # Latin-1
      b'{"image": "black.png", "caption": "\\udc80"}',
      b"[" * 100_000,
      b'{"image": "red.png", "caption": "red again"}',
  ]))
  summary = convert.convert(out=str(tmp_path / "out"), image_size=SIZE,
                            images_dir=str(tmp_path), captions=str(captions))
  assert summary["converted"] == 1
  assert summary["skipped_by_reason"] == {
      "bad captions line": 4, "image without caption": 1}
  bad = [e for e in summary["first_skipped"]
         if e["reason"] == "bad captions line"]
  assert [e["path"] for e in bad] == [
      f"{captions}:{n}" for n in (1, 3, 4, 5)]
  assert "none of the columns ['caption']" in bad[0]["detail"]
  assert "not UTF-8" in bad[1]["detail"] and "0xe9" in bad[1]["detail"]
  assert "surrogate" in bad[2]["detail"]
  assert "RecursionError" in bad[3]["detail"]
  [record] = _records(summary["out"])
  assert record["captions"] == ["red", "red again"]


def test_failed_call_leaves_no_new_out_and_no_temp_files(tmp_path,
                                                         monkeypatch):
  Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
  captions = tmp_path / "captions.jsonl"
  captions.write_text(json.dumps({"image": "a.png", "text": "a"}) + "\n")
  out = tmp_path / "out"
  # Input errors come before --out is created.
  with pytest.raises(ValueError, match=r"--caption_column.*\['image', "
                     r"'text'\]"):
    convert.convert(out=str(out), image_size=SIZE, images_dir=str(tmp_path),
                    captions=str(captions))
  assert not out.exists()
  # An error while converting removes .tmp-SPLIT, and --out if this call
  # created it.

  def fail(*args):
    raise RuntimeError("disk full")

  monkeypatch.setattr(convert, "_convert_batch", fail)
  kwargs = dict(out=str(out), image_size=SIZE, images_dir=str(tmp_path),
                captions=str(captions), caption_column="text")
  with pytest.raises(RuntimeError, match="disk full"):
    convert.convert(**kwargs)
  assert not out.exists()
  out.mkdir()
  (out / "notes.txt").write_text("kept")
  with pytest.raises(RuntimeError, match="disk full"):
    convert.convert(**kwargs)
  assert os.listdir(out) == ["notes.txt"]


def _png_1bit(width: int, height: int) -> bytes:
  """A valid black 1-bit PNG: tens of KB on disk, width x height decoded."""

  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data +
            struct.pack(">I", zlib.crc32(kind + data)))

  row = bytes(1 + (width + 7) // 8)  # filter byte + packed pixels
  compressor = zlib.compressobj(9)
  idat = b"".join(compressor.compress(row) for _ in range(height))
  return (b"\x89PNG\r\n\x1a\n" +
          chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0,
                                     0)) +
          chunk(b"IDAT", idat + compressor.flush()) + chunk(b"IEND", b""))


def test_images_over_max_pixels_are_skipped_before_decoding(tmp_path,
                                                            monkeypatch):
  # 144 MP: Pillow alone only warns (under 2 x MAX_IMAGE_PIXELS) and decodes.
  (tmp_path / "huge.png").write_bytes(_png_1bit(12_000, 12_000))
  # 196 MP: above 2 x MAX_IMAGE_PIXELS, Pillow refuses it when opening.
  (tmp_path / "giant.png").write_bytes(_png_1bit(14_000, 14_000))
  Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "small.png")
  assert os.path.getsize(tmp_path / "huge.png") < 100_000
  decoded = []
  load = ImageFile.ImageFile.load
  monkeypatch.setattr(ImageFile.ImageFile, "load",
                      lambda self: decoded.append(self.size) or load(self))
  captions = tmp_path / "captions.jsonl"
  captions.write_text("\n".join(
      json.dumps({"image": f"{name}.png", "caption": name})
      for name in ("huge", "giant", "small")))
  kwargs = dict(image_size=SIZE, images_dir=str(tmp_path),
                captions=str(captions))
  summary = convert.convert(out=str(tmp_path / "out"), **kwargs)
  assert summary["max_pixels"] == Image.MAX_IMAGE_PIXELS
  assert summary["converted"] == 1
  assert summary["skipped_by_reason"] == {"image too large": 2}
  detail = {os.path.basename(e["path"]): e["detail"]
            for e in summary["first_skipped"]}
  assert "12000x12000 = 144,000,000 pixels > --max_pixels" in detail[
      "huge.png"]
  assert "196000000 pixels" in detail["giant.png"]
  assert decoded and set(decoded) == {(8, 8)}  # never the large ones

  # A lower limit applies to small images too.
  summary = convert.convert(out=str(tmp_path / "out2"), max_pixels=63,
                            **kwargs)
  assert summary["converted"] == 0
  assert "8x8 = 64 pixels > --max_pixels 63" in [
      e.get("detail", "") for e in summary["first_skipped"]]
  for bad in (0, 2 * Image.MAX_IMAGE_PIXELS + 1):
    with pytest.raises(ValueError, match="--max_pixels"):
      convert.convert(out=str(tmp_path / "out3"), max_pixels=bad, **kwargs)


def test_killed_conversion_reruns_without_duplicates(tmp_path):
  """kill -9 mid-way, then the same command line completes the split."""
  side = np.linspace(0, 255, 256).astype(np.uint8)
  image = np.stack([*np.meshgrid(side, side), np.zeros((256, 256), np.uint8)],
                   axis=-1)
  Image.fromarray(image).save(tmp_path / "gradient.png")  # ~4 ms each
  images = tmp_path / "images"
  images.mkdir()
  count = 300
  lines = []
  for i in range(count):
    (images / f"{i:03d}.png").symlink_to(tmp_path / "gradient.png")
    lines.append(json.dumps({"image": f"{i:03d}.png",
                             "caption": f"image {i}"}))
  (tmp_path / "captions.jsonl").write_text("\n".join(lines))
  out = tmp_path / "out"
  argv = [f"--out={out}", "--image_size=8", f"--images_dir={images}",
          f"--captions={tmp_path / 'captions.jsonl'}", "--num_workers=0",
          "--num_shards=3"]
  process = subprocess.Popen(
      [sys.executable, "-m", "unimm.tools.convert", *argv],
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  try:
    deadline = time.monotonic() + 120
    while not (out / ".tmp-train").exists():
      assert process.poll() is None, process.stderr.read()[-2000:]
      assert time.monotonic() < deadline
      time.sleep(0.01)
    time.sleep(0.2)  # some images converted, not all
    assert process.poll() is None, "finished before the kill"
  finally:
    process.send_signal(signal.SIGKILL)
    process.communicate()
  assert process.returncode == -signal.SIGKILL
  assert (out / ".tmp-train").is_dir()
  assert not (out / "dataset_info.json").exists()
  assert not (out / "convert_summary.json").exists()

  # The same command line, parsed by the tool in this process (a second
  # interpreter start would double this test's time).
  flag_values = flags.FlagValues()
  convert_tool.define_flags(flag_values)
  flag_values(["convert", *argv])
  assert convert_tool.run(flag_values) == 0
  assert not [f for f in os.listdir(out) if f.startswith(".")]
  captions = [r["caption"] for r in _records(str(out))]
  assert len(captions) == count
  assert set(captions) == {f"image {i}" for i in range(count)}


def test_a_directory_without_the_captions_feature_takes_no_new_split(
    tmp_path):
  """Splits in one directory share one feature set."""
  out = tmp_path / "old"
  out.mkdir()
  tfds.features.FeaturesDict({  # As converted before "captions" existed.
      "image": tfds.features.Image(shape=(SIZE, SIZE, 3)),
      "caption": tfds.features.Text()}).save_config(str(out))
  Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
  captions = tmp_path / "captions.jsonl"
  captions.write_text(json.dumps({"image": "a.png", "caption": "a"}))
  with pytest.raises(ValueError, match="without the \"captions\" feature.*"
                     "another --out"):
    convert.convert(out=str(out), image_size=SIZE, images_dir=str(tmp_path),
                    captions=str(captions), split="validation")
  assert not (out / ".tmp-validation").exists()
