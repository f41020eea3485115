"""Tests for unimm/data/convert.py's inputs: CSV / TSV, Hugging Face
imagefolder, parquet and COCO, and the "captions" feature (every caption of
an image). The JSONL and tar inputs and the hostile-input guards are in
test_convert.py."""
import io
import json
import os
import sys

import numpy as np
from PIL import Image
import pytest

from unimm.data import convert

sys.path.insert(0, os.path.dirname(__file__))
import test_convert  # noqa: E402  pylint: disable=g-import-not-at-top

SIZE = 8
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _save(path, color, size=(12, 10)) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new("RGB", size, color).save(path)


def _png(color) -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", (10, 10), color).save(buffer, format="PNG")
  return buffer.getvalue()


_records = test_convert._records  # pylint: disable=protected-access


def _by_caption(out: str) -> dict[str, dict]:
  return {r["caption"]: r for r in _records(out)}


def _color(record) -> np.ndarray:
  return record["image"].reshape(-1, 3).mean(0)


@pytest.fixture(name="fractions")
def fixture_fractions(monkeypatch):
  """The fractions done that convert() reports to its progress log."""
  seen = []
  update = convert.Progress.update

  def record(self, done, *, fraction=None, **kwargs):
    seen.append(fraction)
    return update(self, done, fraction=fraction, **kwargs)

  monkeypatch.setattr(convert.Progress, "update", record)
  return seen


def _table(tmp_path, delimiter: str) -> bytes:
  """Rows: two of a.png (one repeated exactly), a remote URL, a missing
  file, an empty caption, a non-UTF-8 row; quoted delimiter and newline."""
  _save(tmp_path / "a.png", RED)
  _save(tmp_path / "sub" / "b.png", GREEN, size=(20, 30))
  _save(tmp_path / "c.png", BLUE)
  d = delimiter.encode()
  rows = [
      b"id" + d + b"image" + d + b"caption",
      b"1" + d + b"a.png" + d + b"a red square",
      b"2" + d + b"sub/b.png" + d + b'"green' + d + b' tall"',
      b"3" + d + b"a.png" + d + b'"red\nsecond line"',
      b"4" + d + b"https://example.com/x.jpg" + d + b"remote",
      b"5" + d + b"missing.png" + d + b"no such file",
      b"6" + d + b"c.png" + d + b"",
      b"7" + d + b"c.png" + d + b"caf\xe9",
      b"8" + d + b"a.png" + d + b"a red square",
  ]
  return b"\r\n".join(rows) + b"\r\n"


def test_csv_and_tsv_keep_every_caption_of_an_image(tmp_path, fractions):
  (tmp_path / "captions.csv").write_bytes(_table(tmp_path, ","))
  out = str(tmp_path / "out")
  summary = convert.convert(out=out, image_size=SIZE,
                            csv=str(tmp_path / "captions.csv"))
  assert summary["input"] == {"csv": str(tmp_path / "captions.csv")}
  assert summary["converted"] == 2
  assert summary["skipped_by_reason"] == {
      "bad captions line": 1, "caption without image": 1, "empty caption": 1,
      convert.REMOTE_IMAGE: 1}
  skipped = {e["path"]: e for e in summary["first_skipped"]}
  assert skipped[f"{tmp_path / 'captions.csv'}:9"]["reason"] == (
      "bad captions line")
  assert skipped[f"{tmp_path / 'captions.csv'}:6"] == {  # 2-line row 3
      "path": f"{tmp_path / 'captions.csv'}:6",
      "reason": "remote image (download first, e.g. with img2dataset)",
      "detail": "https://example.com/x.jpg"}
  records = _by_caption(out)
  assert records["a red square"]["captions"] == [
      "a red square", "red second line"]
  assert records["green, tall"]["captions"] == ["green, tall"]
  np.testing.assert_allclose(_color(records["a red square"]), RED, atol=3)
  np.testing.assert_allclose(_color(records["green, tall"]), GREEN, atol=3)
  assert fractions[-1] == 1.0

  # The same rows as TSV (by extension), and with --delimiter; an explicit
  # --images_dir also counts the images that no row names.
  (tmp_path / "captions.tsv").write_bytes(_table(tmp_path, "\t"))
  (tmp_path / "captions.txt").write_bytes(_table(tmp_path, ";"))
  for name, delimiter in (("captions.tsv", None), ("captions.txt", ";")):
    summary = convert.convert(out=str(tmp_path / name.replace(".", "_")),
                              image_size=SIZE, csv=str(tmp_path / name),
                              delimiter=delimiter, images_dir=str(tmp_path))
    assert summary["converted"] == 2, name
    assert summary["images_without_captions"] == 0  # c.png has a row
  with pytest.raises(ValueError, match="--delimiter"):
    convert.convert(out=out, image_size=SIZE, csv=str(tmp_path / "a.png"),
                    delimiter="ab")


def test_csv_missing_column_names_the_columns_and_the_flag(tmp_path):
  (tmp_path / "cc3m.tsv").write_text("url\ttext\nhttps://x/1.jpg\thello\n")
  out = tmp_path / "out"
  with pytest.raises(ValueError, match=r"\['image'\].*\['url', 'text'\]: "
                     r"set --image_column"):
    convert.convert(out=str(out), image_size=SIZE,
                    csv=str(tmp_path / "cc3m.tsv"))
  with pytest.raises(ValueError, match="--caption_column='caption' is not a "
                     "column"):
    convert.convert(out=str(out), image_size=SIZE, image_column="url",
                    caption_column="caption", csv=str(tmp_path / "cc3m.tsv"))
  assert not out.exists()
  # Named: the URL rows are skipped, not downloaded.
  summary = convert.convert(out=str(out), image_size=SIZE,
                            image_column="url", caption_column="text",
                            csv=str(tmp_path / "cc3m.tsv"))
  assert summary["skipped_by_reason"] == {convert.REMOTE_IMAGE: 1}


def test_imagefolder_reads_metadata_in_each_folder(tmp_path, fractions):
  root = tmp_path / "folder"
  _save(root / "x.png", RED)
  _save(root / "sub" / "y.png", GREEN)
  _save(root / "train" / "z.png", BLUE)
  _save(root / "lonely.png", (9, 9, 9))
  (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in [
      {"file_name": "x.png", "text": "x one", "label": 3},
      {"file_name": "sub/y.png", "text": "y"},
      {"file_name": "x.png", "text": "x two"},
  ]))
  # No "text" column here: "caption" is the fallback.
  (root / "train" / "metadata.csv").write_text("file_name,caption\nz.png,z\n")
  out = str(tmp_path / "out")
  summary = convert.convert(out=out, image_size=SIZE, imagefolder=str(root))
  assert summary["converted"] == 3
  assert summary["skipped_by_reason"] == {"image without caption": 1}
  assert summary["first_skipped"][0]["path"].endswith("lonely.png")
  records = _by_caption(out)
  assert records["x one"]["captions"] == ["x one", "x two"]
  assert set(records) == {"x one", "y", "z"}
  np.testing.assert_allclose(_color(records["z"]), BLUE, atol=3)
  assert fractions[-1] == 1.0

  # Neither "text" nor "caption": an error unless --caption_column names one.
  (root / "train" / "metadata.csv").write_text("file_name,label\nz.png,z\n")
  with pytest.raises(ValueError, match=r"\['text', 'caption'\].*"
                     r"\['file_name', 'label'\]: set --caption_column"):
    convert.convert(out=out, image_size=SIZE, imagefolder=str(root))
  with pytest.raises(ValueError, match="no metadata.jsonl or metadata.csv"):
    convert.convert(out=out, image_size=SIZE,
                    imagefolder=str(root / "sub"))


def test_parquet_is_streamed_in_batches(tmp_path, monkeypatch, fractions):
  # pylint: disable=g-import-not-at-top
  import pyarrow as pa  # Optional for unimm; tensorflow-datasets needs it.
  import pyarrow.parquet as pq
  _save(tmp_path / "shards" / "on_disk.png", BLUE)
  # Hugging Face datasets: an Image struct, captions under "text".
  hf = pa.table({
      "image": [{"bytes": _png(RED), "path": "red.png"},
                {"bytes": None, "path": "on_disk.png"},
                {"bytes": b"not an image", "path": "x.png"},
                {"bytes": _png(GREEN), "path": None}],
      "text": ["red", "blue\nfrom disk", "corrupt", None],
  })
  pq.write_table(hf, tmp_path / "shards" / "hf-0.parquet", row_group_size=3)
  # img2dataset parquet: raw bytes under "jpg", one image on two rows.
  laion = pa.table({"jpg": [_png(GREEN)] * 2, "caption": ["green", "lime"],
                    "url": ["https://a/1.jpg"] * 2})
  pq.write_table(laion, tmp_path / "shards" / "laion-1.parquet")
  (tmp_path / "shards" / "zz-broken.parquet").write_bytes(b"PAR1 garbage")
  monkeypatch.setattr(convert, "PARQUET_BATCH_ROWS", 2)

  def whole_file(*args, **kwargs):
    raise AssertionError("a whole parquet file read at once")

  monkeypatch.setattr(pq, "read_table", whole_file)
  monkeypatch.setattr(pq.ParquetFile, "read", whole_file)
  out = str(tmp_path / "out")
  summary = convert.convert(out=out, image_size=SIZE,
                            parquet=str(tmp_path / "shards" / "*.parquet"))
  assert summary["converted"] == 4
  assert summary["skipped_by_reason"] == {
      "corrupt image": 1, "empty caption": 1, "unreadable parquet": 1}
  reasons = {e["path"]: e["reason"] for e in summary["first_skipped"]}
  assert reasons[str(tmp_path / "shards" / "hf-0.parquet[2]")] == (
      "corrupt image")
  records = _by_caption(out)
  assert set(records) == {"red", "blue from disk", "green", "lime"}
  np.testing.assert_allclose(_color(records["red"]), RED, atol=3)
  np.testing.assert_allclose(_color(records["blue from disk"]), BLUE, atol=3)
  assert fractions[-1] == 1.0

  # The URL column holds no image: skipped, not downloaded.
  summary = convert.convert(out=str(tmp_path / "out2"), image_size=SIZE,
                            image_column="url",
                            parquet=str(tmp_path / "shards" / "laion*"))
  assert summary["skipped_by_reason"] == {convert.REMOTE_IMAGE: 2}
  with pytest.raises(ValueError, match=r"--caption_column='alt' is not a "
                     r"column of .*laion-1.parquet; its columns are \['jpg', "
                     r"'caption', 'url'\]"):
    convert.convert(out=out, image_size=SIZE, caption_column="alt",
                    parquet=str(tmp_path / "shards" / "laion*"))


def test_coco_keeps_the_captions_of_each_image(tmp_path, fractions):
  images = tmp_path / "train2017"
  _save(images / "1.jpg", RED)
  _save(images / "2.png", GREEN)
  _save(images / "3.png", BLUE)  # no annotation
  _save(images / "extra.png", BLUE)  # not in the JSON
  coco = {
      "info": {},
      "images": [{"id": 1, "file_name": "1.jpg"},
                 {"id": 2, "file_name": "2.png"},
                 {"id": 3, "file_name": "3.png"},
                 {"id": 4, "file_name": "missing.png"},
                 {"id": 1, "file_name": "again.png"}],
      "annotations": [
          *[{"id": 10 + i, "image_id": 1, "caption": f"red {i}"}
            for i in range(4)],
          {"id": 20, "image_id": 1, "caption": "red\n4 "},
          {"id": 21, "image_id": 2, "caption": "green"},
          {"id": 22, "image_id": 4, "caption": "gone"},
          {"id": 23, "image_id": 99, "caption": "no image 99"},
          {"id": 24, "image_id": 2, "caption": 5},
      ],
  }
  path = tmp_path / "captions_train2017.json"
  path.write_text(json.dumps(coco))
  out = str(tmp_path / "out")
  summary = convert.convert(out=out, image_size=SIZE, coco=str(path),
                            images_dir=str(images))
  assert summary["converted"] == 2
  assert summary["skipped_by_reason"] == {
      "bad captions line": 2, "caption without image": 2,
      "image without caption": 2}
  assert summary["captions_without_images"] == 2  # missing.png, id 99
  skipped = {os.path.basename(e["path"]): e["reason"]
             for e in summary["first_skipped"]}
  assert skipped["3.png"] == skipped["extra.png"] == "image without caption"
  records = _by_caption(out)
  assert records["red 0"]["captions"] == [
      "red 0", "red 1", "red 2", "red 3", "red 4"]
  assert records["green"]["captions"] == ["green"]
  assert fractions[-1] == 1.0
  with pytest.raises(ValueError, match="--images_dir"):
    convert.convert(out=out, image_size=SIZE, coco=str(path))
  path.write_text(json.dumps({"images": []}))
  with pytest.raises(ValueError, match=r"\['images'\]; expected a COCO"):
    convert.convert(out=out, image_size=SIZE, coco=str(path),
                    images_dir=str(images))


def test_exactly_one_input_and_only_options_that_apply(tmp_path):
  (tmp_path / "c.jsonl").write_text("")
  kwargs = dict(out=str(tmp_path / "out"), image_size=SIZE)
  with pytest.raises(ValueError, match="exactly one input.*given: none"):
    convert.convert(**kwargs)
  with pytest.raises(ValueError, match="given: --captions, --csv"):
    convert.convert(captions="c.jsonl", csv="c.csv", **kwargs)
  with pytest.raises(ValueError, match="--images_dir='x' does not apply to "
                     "--tar_shards"):
    convert.convert(tar_shards="*.tar", images_dir="x", **kwargs)
  with pytest.raises(ValueError, match="--delimiter=';' does not apply"):
    convert.convert(captions=str(tmp_path / "c.jsonl"), delimiter=";",
                    **kwargs)
  with pytest.raises(ValueError, match="--csv='nope.csv': no such file"):
    convert.convert(csv="nope.csv", **kwargs)
  assert not (tmp_path / "out").exists()


def test_worker_processes_match_in_process(tmp_path):
  """One spawned worker (the only test that starts one: it costs seconds)."""
  (tmp_path / "captions.csv").write_bytes(_table(tmp_path, ","))
  Image.new("RGB", (40, 40), RED).save(tmp_path / "big.png")
  with open(tmp_path / "captions.csv", "a") as f:
    f.write("9,big.png,over max_pixels\n")
  results = []
  for workers in (0, 1):
    out = str(tmp_path / f"out{workers}")
    summary = convert.convert(out=out, image_size=SIZE, num_workers=workers,
                              max_pixels=1000,
                              csv=str(tmp_path / "captions.csv"))
    results.append((summary["skipped_by_reason"], {
        c: (r["captions"], r["image"].tolist())
        for c, r in _by_caption(out).items()}))
  assert results[0] == results[1]
  assert results[0][0][convert.TOO_LARGE] == 1
  assert len(results[0][1]) == 2
