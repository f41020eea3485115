r"""Pre-tokenization: encode a data set's images once with a frozen tokenizer.

  python -m unimm.tools.pretokenize --tokenizer_workdir WORKDIRS/tokenizer \
      --text_tokenizer WORKDIRS/spiece.model --source shapes --split train \
      --out WORKDIRS/pretokenized [--text_length 24] [--num_examples N]

(unimm/tools/pretokenize.py; it calls `pretokenize(tokenizer, ...)` with the
tokenizer that workdir holds).

Parti and the interleaved model train on image ids, not pixels (as Parti,
DALL-E mini and LlamaGen do): the ViT-VQGAN encodes every image once here,
and training reads the stored ids.

Output (OUT_DIR; several splits may share one directory):
  SPLIT-0000i-of-0000N.array_record  ArrayRecord shards (group_size:1, so
      records are read at random); records are in data set order, shard i
      holding a contiguous block.
  SPLIT.json                         metadata: num_examples, grid, num_codes,
      image_size, text_length, text vocab (size, pad, eos), tokenizer
      workdir and step, source, shards, captions encoded and truncated.
  text_tokenizer.model               a copy of the SentencePiece model, so
      the directory is self-contained.

Record format: one msgpack map per example (flax.serialization, which
stores arrays as dtype + shape + raw bytes and never unpickles):
  {"image_ids": int32 [h*w] (row-major over the token grid; a dynamic
       tokenizer's valid ids, then -1),
   "text_ids": int32 [text_length] (SentencePiece ids + EOS, 0-padded),
   "caption": str,
   and, for a record with K > 1 captions (a converted data set's
   "captions"; the first `max_captions`, default MAX_CAPTIONS_PER_RECORD):
   "text_ids_all": int32 [K, text_length] (row 0 is text_ids),
   "captions": str (the K captions joined by convert.CAPTION_SEPARATOR)}.
Records without "text_ids_all" (one caption, or shards that store only the
first) read as one caption: parse_example gives text_ids_all [1, L].

Training reads one caption per example (pretokenized_dataset's
draw_caption): epoch e of record r uses caption_index(seed, e, r, K), a
pure function, so the draw is the same after a checkpoint resume and
differs from epoch to epoch; evaluation reads the first caption.
"""
import json
import os
from typing import Any

from absl import logging
from array_record.python import array_record_module
from etils import epath
from flax import serialization
import grain
import numpy as np

from unimm import paths
from unimm.data import convert
from unimm.data import pipeline
from unimm.evaluation.reports import write_report
from unimm.progress import Progress
from unimm.tokenizers import text as text_lib

RECORDS_PER_SHARD = 10_000
TEXT_TOKENIZER_FILE = "text_tokenizer.model"
FORMAT = "unimm_pretokenized/v1 (msgpack: image_ids, text_ids, caption)"
# Captions encoded per record at most (COCO has about 5 per image); the rest
# are counted in the metadata (num_dropped_captions), not encoded.
MAX_CAPTIONS_PER_RECORD = 8


def variable_length(tokenizer) -> bool:
  """Whether the tokenizer writes LaVIT's variable-length images (ids [1,
  P]: the kept codes, then -1): image spans of up to P codes, ended by EOI
  in the models that read them (config.model.end_of_image)."""
  return bool(getattr(getattr(tokenizer, "model", None), "keep_ratio", 0))


def shard_name(split: str, index: int, num_shards: int) -> str:
  return f"{split}-{index:05d}-of-{num_shards:05d}.array_record"


def metadata_path(out_dir: str, split: str) -> str:
  return os.path.join(out_dir, f"{split}.json")


def serialize_example(image_ids, text_ids, caption: str, *,
                      text_ids_all=None,
                      captions: list[str] | None = None) -> bytes:
  """One record: image_ids int32 [h*w], text_ids int32 [L], caption str;
  with K > 1 captions also text_ids_all int32 [K, L] (row 0 = text_ids) and
  captions (the K strings)."""
  example = {
      "image_ids": np.asarray(image_ids, np.int32).reshape(-1),
      "text_ids": np.asarray(text_ids, np.int32).reshape(-1),
      "caption": str(caption)}
  if text_ids_all is not None and len(text_ids_all) > 1:
    text_ids_all = np.asarray(text_ids_all, np.int32)  # [K, L]
    captions = [str(c) for c in captions or ()]
    if (text_ids_all.ndim != 2 or len(captions) != len(text_ids_all)
        or not np.array_equal(text_ids_all[0], example["text_ids"])):
      raise ValueError(
          f"text_ids_all {text_ids_all.shape} and {len(captions)} captions; "
          "expected [K, L] whose row 0 is text_ids, and K captions.")
    example["text_ids_all"] = text_ids_all
    # A separator inside a caption becomes a space, as convert does.
    example["captions"] = convert.CAPTION_SEPARATOR.join(
        c.replace(convert.CAPTION_SEPARATOR, " ") for c in captions)
  return serialization.msgpack_serialize(example)


def parse_example(record: bytes) -> dict[str, Any]:
  """Inverse of serialize_example (msgpack; no pickle, safe on any bytes).

  Returns {"image_ids" [h*w], "text_ids" [L], "caption", "text_ids_all"
  [K, L], "captions" (K strings)}; a record without text_ids_all (one
  caption, or shards that store only the first) gives K = 1.
  """
  example = serialization.msgpack_restore(record)
  text_ids = np.asarray(example["text_ids"], np.int32)
  caption = str(example["caption"])
  if "text_ids_all" in example:
    text_ids_all = np.asarray(example["text_ids_all"], np.int32)
    captions = str(example["captions"]).split(convert.CAPTION_SEPARATOR)
  else:
    text_ids_all, captions = text_ids[None], [caption]
  return {"image_ids": np.asarray(example["image_ids"], np.int32),
          "text_ids": text_ids, "caption": caption,
          "text_ids_all": text_ids_all, "captions": captions}


def record_captions(caption: str, captions: str | None,
                    max_captions: int) -> tuple[list[str], int]:
  """(the captions to encode, the number left out): `caption` first, then
  the others of `captions` (convert.CAPTION_SEPARATOR-joined, as a converted
  data set stores them; None: `caption` only), at most max_captions."""
  found = [caption]
  if captions is not None:
    found += [c for c in captions.split(convert.CAPTION_SEPARATOR)
              if c.strip() and c != caption]
  return found[:max_captions], max(0, len(found) - max_captions)


class ShardWriter:
  """Writes records in order into ArrayRecord shards of `records_per_shard`.

  Shards are written under OUT_DIR/.tmp-SPLIT; `commit()` names them
  SPLIT-0000i-of-0000N (N known only then, so the record count need not be
  known in advance) and only then replaces the split's old shards. Used as
  a context manager, an exception discards the partial shards.
  """

  def __init__(self, out_dir: str, split: str,
               records_per_shard: int = RECORDS_PER_SHARD):
    if records_per_shard <= 0:
      raise ValueError(f"records_per_shard={records_per_shard}; expected > 0 "
                       "(--records_per_shard).")
    self.out_dir, self.split = out_dir, split
    self.records_per_shard = records_per_shard
    self.tmp_dir = os.path.join(out_dir, f".tmp-{split}")
    self.num_records = 0
    self._writer = None
    self._tmp_names: list[str] = []
    epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
    epath.Path(self.tmp_dir).rmtree(missing_ok=True)  # left by a killed run
    epath.Path(self.tmp_dir).mkdir()

  def write(self, record: bytes) -> None:
    if self.num_records % self.records_per_shard == 0:
      self._close_shard()
      name = f"{len(self._tmp_names):05d}.array_record"
      self._tmp_names.append(name)
      self._writer = array_record_module.ArrayRecordWriter(
          os.path.join(self.tmp_dir, name), "group_size:1")
    self._writer.write(record)
    self.num_records += 1

  def _close_shard(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def commit(self) -> list[str]:
    """Moves the shards into place; returns their names (in order)."""
    self._close_shard()
    num_shards = len(self._tmp_names)
    names = [shard_name(self.split, i, num_shards) for i in range(num_shards)]
    out_dir, tmp_dir = epath.Path(self.out_dir), epath.Path(self.tmp_dir)
    for old in out_dir.iterdir():
      if old.name.startswith(f"{self.split}-") and old.name.endswith(
          ".array_record"):
        old.unlink()
    for tmp_name, name in zip(self._tmp_names, names):
      (tmp_dir / tmp_name).replace(out_dir / name)
    tmp_dir.rmtree(missing_ok=True)
    return names

  def abort(self) -> None:
    self._close_shard()
    epath.Path(self.tmp_dir).rmtree(missing_ok=True)

  def __enter__(self) -> "ShardWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is not None:
      self.abort()
    else:
      self._close_shard()


def encode_images(tokenizer, images: np.ndarray, batch_size: int
                  ) -> np.ndarray:
  """uint8 [N, S, S, 3] -> int32 ids [N, h, w], in encoder calls of exactly
  `batch_size` images (the last one zero-padded), so one compiled encoder
  serves every call."""
  images = np.asarray(images)
  out = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate([chunk, np.zeros(
          (batch_size - n,) + chunk.shape[1:], chunk.dtype)])
    out.append(np.asarray(tokenizer.encode(chunk))[:n])
  if not out:
    return np.zeros((0,) + tuple(tokenizer.grid), np.int32)
  return np.concatenate(out).astype(np.int32)


def pretokenize(tokenizer, text_tokenizer_path: str,
                source: str, split: str, out_dir: str, text_length: int,
                num_examples: int | None = None, batch_size: int = 256,
                *, image_size: int | None = None,
                data_dir: str | None = None,
                records_per_shard: int = RECORDS_PER_SHARD,
                tokenizer_workdir: str = "",
                out_split: str | None = None,
                max_captions: int = MAX_CAPTIONS_PER_RECORD
                ) -> dict[str, Any]:
  """Encodes `split` of `source` once; writes shards + metadata to out_dir.

  Args:
    tokenizer: the frozen image tokenizer (unimm.load_tokenizer(workdir), or
      anything with encode(uint8 [B, S, S, 3]) -> ids [B, h, w], image_size,
      grid, num_codes and step).
    text_tokenizer_path: a SentencePiece .model (T5 layout: pad 0, eos 1).
    source: "shapes", "shapes_small", "shapes_large" or a directory from
      unimm.tools.convert.
    split: the split to encode (e.g. train, validation; TFDS slicing such
      as "train[-200:]" reads part of one).
    out_dir: output directory (created; this split's files are replaced).
    text_length: text ids per caption (config.model.text_length); longer
      captions are truncated (counted in the metadata and warned about).
    num_examples: encode only the first N examples (None = all).
    batch_size: images per encoder call.
    image_size: the size to read images at; defaults to (and must equal)
      the tokenizer's image size.
    data_dir: TFDS data dir for the shapes sources.
    records_per_shard: examples per ArrayRecord shard.
    tokenizer_workdir: where the tokenizer was loaded from, recorded in the
      metadata.
    out_split: the name the encoded split is written under (default:
      `split`), e.g. "validation" for split "train[-200:]".
    max_captions: captions encoded per record at most, for data sets that
      store several per image (a converted directory's "captions"): the
      first max_captions are kept (text_ids_all), the others counted as
      num_dropped_captions. 1 keeps the first caption only.

  Returns:
    The metadata dict (also written to out_dir/SPLIT.json).
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size={batch_size}; expected > 0 (--batch_size).")
  if num_examples is not None and num_examples <= 0:
    raise ValueError(f"num_examples={num_examples}; expected > 0 or None "
                     "(--num_examples).")
  if records_per_shard <= 0:
    raise ValueError(f"records_per_shard={records_per_shard}; expected > 0.")
  if max_captions <= 0:
    raise ValueError(f"max_captions={max_captions}; expected >= 1 captions "
                     "encoded per record (pretokenize's max_captions).")
  out_split = split if out_split is None else out_split
  if not out_split or not all(c.isalnum() or c == "_" for c in out_split):
    raise ValueError(
        f"Output split name {out_split!r}; expected letters, digits, _ "
        "(pass out_split when `split` uses TFDS slicing).")
  text_tokenizer = text_lib.TextTokenizer.load(text_tokenizer_path)
  if text_tokenizer.pad_id != 0:
    raise ValueError(
        f"The text tokenizer {text_tokenizer_path!r} pads with id "
        f"{text_tokenizer.pad_id}; Parti masks text id 0 as padding, so "
        "expected pad_id 0 (train one with unimm.tools.train_text_tokenizer, "
        "T5 layout).")
  image_size = tokenizer.image_size if image_size is None else image_size
  if image_size != tokenizer.image_size:
    raise ValueError(
        f"--image_size={image_size} but the tokenizer"
        f"{f' in {tokenizer_workdir!r}' if tokenizer_workdir else ''} "
        f"encodes {tokenizer.image_size}x"
        f"{tokenizer.image_size} images; pass --image_size "
        f"{tokenizer.image_size} (or omit it).")

  data_source, _ = pipeline.image_text_source(
      source, split, image_size=image_size, data_dir=data_dir)
  total = len(data_source) if num_examples is None else min(
      num_examples, len(data_source))
  dataset = pipeline.image_text_dataset(
      source, split, batch_size=batch_size, image_size=image_size,
      shuffle=False, seed=0, num_epochs=1, data_dir=data_dir,
      drop_remainder=False)

  num_shards = max(1, -(-total // records_per_shard))
  done, num_truncated = 0, 0
  # Over every caption encoded (first and others) / left out by max_captions.
  num_captions, num_truncated_all, num_dropped, most_captions = 0, 0, 0, 0
  counts = np.zeros(tokenizer.num_codes, np.int64)
  lengths = []
  progress = Progress(total, what="pre-tokenized examples", every_seconds=5.0)
  logging.info("Pre-tokenizing %d examples of %s/%s into %s (%d shards).",
               total, source, split, out_dir, num_shards)
  with ShardWriter(out_dir, out_split, records_per_shard) as writer:
    for batch in dataset:
      images = batch["image"][:total - done]  # uint8 [B, H, W, 3]
      captions = list(batch["caption"][:total - done])
      n = len(images)
      image_ids = encode_images(tokenizer, images, batch_size).reshape(
          n, -1)  # [B, h*w]
      joined = (list(batch["captions"][:n]) if "captions" in batch
                else [None] * n)
      kept = [record_captions(c, j, max_captions)
              for c, j in zip(captions, joined)]
      encoded = text_tokenizer.encode(captions, text_length)  # [B, L]
      # The other captions in one call: record i's are rows
      # starts[i]:starts[i + 1] of others.ids.
      others = text_tokenizer.encode(
          [c for record, _ in kept for c in record[1:]], text_length)
      starts = np.cumsum([0] + [len(record) - 1 for record, _ in kept])
      num_truncated += encoded.num_truncated
      num_truncated_all += encoded.num_truncated + others.num_truncated
      num_captions += int(n + starts[-1])
      num_dropped += sum(dropped for _, dropped in kept)
      most_captions = max([most_captions] + [len(r) for r, _ in kept])
      valid = image_ids[image_ids >= 0]  # a dynamic tokenizer's -1: empty
      counts += np.bincount(valid, minlength=tokenizer.num_codes)
      lengths.append(np.sum(image_ids.reshape(n, -1) >= 0, axis=1))
      for i, (record, _) in enumerate(kept):
        text_ids_all = np.concatenate([  # [K, L]
            encoded.ids[i:i + 1], others.ids[starts[i]:starts[i + 1]]])
        writer.write(serialize_example(image_ids[i], encoded.ids[i],
                                       captions[i], text_ids_all=text_ids_all,
                                       captions=record))
      done += n
      progress.update(done)
      if done >= total:
        break
    progress.finish(done)
    if done == 0:
      raise ValueError(f"{source}/{split} has no examples to pre-tokenize.")
  # Replace this split's old files only once the new ones are complete.
  names = writer.commit()
  epath.Path(out_dir, TEXT_TOKENIZER_FILE).write_bytes(
      text_tokenizer.model_proto)

  metadata = {
      "format": FORMAT,
      "split": out_split,
      "read_split": split,
      "num_examples": int(done),
      "shards": names,
      "grid": list(tokenizer.grid),
      "image_length": int(np.prod(tokenizer.grid)),
      "end_of_image": variable_length(tokenizer),
      "num_codes": int(tokenizer.num_codes),
      "image_size": int(image_size),
      "codebook_usage": float((counts > 0).mean()),
      # Valid ids per image (LaVIT's dynamic tokens vary; else image_length).
      "tokens_per_image_mean": float(np.concatenate(lengths).mean()),
      "text_length": int(text_length),
      "text_vocab_size": int(text_tokenizer.vocab_size),
      "text_pad_id": int(text_tokenizer.pad_id),
      "text_eos_id": int(text_tokenizer.eos_id),
      # The first caption of each record (what evaluation reads).
      "num_truncated_captions": int(num_truncated),
      # Every caption encoded: num_captions over num_examples records, at
      # most max_captions_per_record in one (<= caption_limit; the rest,
      # num_dropped_captions, were not encoded).
      "num_captions": int(num_captions),
      "max_captions_per_record": int(most_captions),
      "caption_limit": int(max_captions),
      "num_dropped_captions": int(num_dropped),
      "num_truncated_all_captions": int(num_truncated_all),
      "text_tokenizer": paths.absolute(text_tokenizer_path),
      "text_tokenizer_copy": TEXT_TOKENIZER_FILE,
      "tokenizer_workdir": (paths.absolute(tokenizer_workdir)
                            if tokenizer_workdir else ""),
      "tokenizer_step": int(tokenizer.step),
      "source": source,
      "seconds": round(progress.elapsed_seconds, 3),
  }
  write_report(metadata_path(out_dir, out_split), metadata)
  logging.info("Wrote %d examples with %d captions to %s (codebook usage "
               "%.3f; %d first captions, %d captions in all truncated; %d "
               "beyond max_captions=%d not encoded).", done, num_captions,
               out_dir, metadata["codebook_usage"], num_truncated,
               num_truncated_all, num_dropped, max_captions)
  return metadata


def load_metadata(out_dir: str, split: str = "train",
                  command: str = "unimm.tools.pretokenize") -> dict[str, Any]:
  """The metadata of a pre-tokenized split; ValueError naming the fix
  (`command` is the module that writes such splits)."""
  path = epath.Path(metadata_path(out_dir, split))
  if not path.is_file():
    folder = epath.Path(out_dir)
    have = sorted(p.name[:-5] for p in folder.iterdir()
                  if p.name.endswith(".json")) if folder.is_dir() else []
    raise ValueError(
        f"No pre-tokenized split {split!r} in {out_dir!r} (found splits "
        f"{have}); run `python -m {command} --split {split} "
        f"--out {out_dir} ...` first (config.data.pretokenized_dir).")
  return json.loads(path.read_text())


def shard_source(out_dir: str, split: str, metadata: dict[str, Any],
                 num_records: int, command: str = "unimm.tools.pretokenize"
                 ) -> grain.sources.ArrayRecordDataSource:
  """Random access over the shards metadata["shards"], checked to exist and
  to hold `num_records` records."""
  shards = [os.path.join(out_dir, name) for name in metadata["shards"]]
  missing = [p for p in shards if not epath.Path(p).is_file()]
  if missing:
    raise ValueError(f"Pre-tokenized shards are missing: {missing[:3]}; "
                     f"re-run {command} for this split.")
  source = grain.sources.ArrayRecordDataSource(shards)
  if len(source) != num_records:
    raise ValueError(
        f"{out_dir!r} split {split!r} holds {len(source)} records but its "
        f"metadata says {num_records}; re-run {command}.")
  return source


def _as_batch_arrays(record: bytes) -> dict[str, np.ndarray]:
  example = parse_example(record)
  return {"text_ids": example["text_ids"], "image_ids": example["image_ids"]}


def pretokenized_source(out_dir: str, split: str = "train"
                        ) -> grain.sources.ArrayRecordDataSource:
  """Random access over a split's records (bytes; see parse_example)."""
  metadata = load_metadata(out_dir, split)
  return shard_source(out_dir, split, metadata, metadata["num_examples"])


# ----------------------------------------------------------------------------
# One caption per example and epoch.
# ----------------------------------------------------------------------------

_DRAW_SALT = 0x5EED_CA97_1045
_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment


def _mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a bijective hash of uint64 arrays."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def caption_index(seed: int, epoch, record_index, num_captions) -> np.ndarray:
  """Which of its num_captions captions record `record_index` uses in
  `epoch` (arrays broadcast to [B]; returns int64 [B] in [0, num_captions)).

  A pure function of its arguments. Epochs cK .. cK + K - 1 of a record with
  K captions take them in a random order (a permutation keyed by seed,
  record and c), so every caption is used once every K epochs and the order
  differs from record to record and from cycle to cycle.
  """
  epoch, record_index, num_captions = np.broadcast_arrays(
      np.atleast_1d(np.asarray(epoch, np.int64)),
      np.asarray(record_index, np.int64), np.asarray(num_captions, np.int64))
  if (num_captions < 1).any() or (epoch < 0).any() or (record_index < 0).any():
    raise ValueError(
        f"caption_index(epoch={epoch}, record_index={record_index}, "
        f"num_captions={num_captions}); expected epochs and record indices "
        ">= 0 and num_captions >= 1.")
  cycle, slot = np.divmod(epoch, num_captions)  # [B], [B]
  key = np.full(epoch.shape, (int(seed) ^ _DRAW_SALT) % 2**64, np.uint64)
  for value in (record_index, cycle):  # [B]
    key = _mix64(key + (value.astype(np.uint64) + np.uint64(1)) * _GAMMA)
  choice = np.arange(int(num_captions.max()), dtype=np.uint64)  # [K]
  keys = _mix64(key[:, None] + (choice[None, :] + np.uint64(1))
                * _GAMMA)  # [B, K]
  # Captions a record does not have sort last (ties keep index order).
  keys = np.where(choice[None, :] < num_captions[:, None].astype(np.uint64),
                  keys, np.uint64(2**64 - 1))
  order = np.argsort(keys, axis=1, kind="stable")  # [B, K]
  return order[np.arange(len(order)), slot]


class _IndexedRecords:
  """(record index, record) for each record of a random-access source."""

  def __init__(self, source):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    return int(index), self._source[index]


class _AllCaptions:
  """(record index, record bytes) -> {"image_ids" [h*w], "text_ids_all"
  [max_captions, L] (0-padded past the record's own), "num_captions",
  "record_index"}: what _DrawnCaptionIterator draws from."""

  def __init__(self, max_captions: int):
    self.max_captions = max_captions

  def __call__(self, indexed_record) -> dict[str, Any]:
    record_index, record = indexed_record
    example = parse_example(record)
    text_ids_all = example["text_ids_all"]  # [K, L]
    k = len(text_ids_all)
    if k > self.max_captions:
      raise ValueError(
          f"Record {record_index} holds {k} captions but the split's "
          f"metadata says max_captions_per_record={self.max_captions}; "
          "re-run unimm.tools.pretokenize for this split.")
    padded = np.zeros((self.max_captions, text_ids_all.shape[1]), np.int32)
    padded[:k] = text_ids_all
    return {"image_ids": example["image_ids"], "text_ids_all": padded,
            "num_captions": np.int64(k),
            "record_index": np.int64(record_index)}


class _DrawnCaptionIterator(grain.DatasetIterator):
  """Replaces each batch's text_ids_all [B, K, L] by text_ids [B, L], the
  caption caption_index(seed, epoch, record, K) picks.

  Counts the examples it has passed (its state, with the parent's), so an
  example's epoch is its position in the per-host stream // shard_size,
  the same after set_state as in the run that saved the state.
  """

  def __init__(self, parent: grain.DatasetIterator, *, seed: int,
               shard_size: int):
    super().__init__(parent)
    self._seed, self._shard_size = seed, shard_size
    self._position = 0  # examples yielded so far

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._parent)
    n = len(batch["record_index"])
    epoch = (self._position + np.arange(n)) // self._shard_size  # [B]
    choice = caption_index(self._seed, epoch, batch["record_index"],
                           batch["num_captions"])  # [B]
    self._position += n
    return {"text_ids": batch["text_ids_all"][np.arange(n), choice],
            "image_ids": batch["image_ids"]}

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "position": self._position}

  def set_state(self, state: dict[str, Any]) -> None:
    if set(state) != {"parent", "position"}:
      raise ValueError(
          f"Data iterator state with keys {sorted(state)}; expected "
          "{'parent', 'position'}, the state of a reader that draws one of "
          "several captions per record. The checkpoint was saved while "
          "training on a split with one caption per record: resume it on "
          "that data, or train into a new workdir "
          "(config.data.pretokenized_dir).")
    self._parent.set_state(state["parent"])
    self._position = int(state["position"])


class _DrawnCaptions(grain.IterDataset):
  """Batches with one drawn caption per example (_DrawnCaptionIterator)."""

  def __init__(self, parent: grain.IterDataset, *, seed: int,
               shard_size: int):
    super().__init__(parent)
    self._seed, self._shard_size = seed, shard_size

  def __iter__(self) -> _DrawnCaptionIterator:
    return _DrawnCaptionIterator(self._parent.__iter__(), seed=self._seed,
                                 shard_size=self._shard_size)

  def __str__(self) -> str:
    return f"_DrawnCaptions(seed={self._seed})"


def pretokenized_dataset(out_dir: str, *, batch_size: int, shuffle: bool,
                         seed: int, num_epochs: int | None = None,
                         process_index: int = 0, process_count: int = 1,
                         split: str = "train", worker_count: int = 0,
                         drop_remainder: bool = True,
                         draw_caption: bool = False) -> grain.IterDataset:
  """Batches {"text_ids": int32 [B, L], "image_ids": int32 [B, h*w]}.

  Sharded per host (disjoint records), shuffled per epoch and
  checkpointable (iterator get_state/set_state), through
  unimm.data.pipeline.batched_dataset; see it for the arguments.

  draw_caption: text_ids is one of the record's captions, caption_index(
  seed, epoch, record index, K) (every caption once every K epochs; the
  same draw after set_state); False: the first caption. Splits with one
  caption per record (max_captions_per_record, absent in older metadata,
  is 1) read the first caption either way.
  """
  metadata = load_metadata(out_dir, split)
  source = shard_source(out_dir, split, metadata, metadata["num_examples"])
  max_captions = int(metadata.get("max_captions_per_record", 1))
  if not draw_caption or max_captions <= 1:
    return pipeline.batched_dataset(
        source, batch_size=batch_size, shuffle=shuffle, seed=seed,
        num_epochs=num_epochs, process_index=process_index,
        process_count=process_count, transform=_as_batch_arrays,
        drop_remainder=drop_remainder, worker_count=worker_count)
  batches = pipeline.batched_dataset(
      _IndexedRecords(source), batch_size=batch_size, shuffle=shuffle,
      seed=seed, num_epochs=num_epochs, process_index=process_index,
      process_count=process_count, transform=_AllCaptions(max_captions),
      drop_remainder=drop_remainder, worker_count=worker_count)
  # batched_dataset's per-host stream is its shard, repeated: example i
  # belongs to epoch i // shard_size.
  return _DrawnCaptions(batches, seed=seed,
                        shard_size=len(source) // process_count)
