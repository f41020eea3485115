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
      workdir and step, source, shards, truncated captions.
  text_tokenizer.model               a copy of the SentencePiece model, so
      the directory is self-contained.

Record format: one msgpack map per example (flax.serialization, which
stores arrays as dtype + shape + raw bytes and never unpickles):
  {"image_ids": int32 [h*w] (row-major over the token grid),
   "text_ids": int32 [text_length] (SentencePiece ids + EOS, 0-padded),
   "caption": str}.
"""
import json
import os
import shutil
from typing import Any

from absl import logging
from array_record.python import array_record_module
from flax import serialization
import grain
import numpy as np

from unimm.data import pipeline
from unimm.evaluation.reports import write_report
from unimm.progress import Progress
from unimm.tokenizers import text as text_lib

RECORDS_PER_SHARD = 10_000
TEXT_TOKENIZER_FILE = "text_tokenizer.model"
FORMAT = "unimm_pretokenized/v1 (msgpack: image_ids, text_ids, caption)"


def shard_name(split: str, index: int, num_shards: int) -> str:
  return f"{split}-{index:05d}-of-{num_shards:05d}.array_record"


def metadata_path(out_dir: str, split: str) -> str:
  return os.path.join(out_dir, f"{split}.json")


def serialize_example(image_ids, text_ids, caption: str) -> bytes:
  """One record: image_ids int32 [h*w], text_ids int32 [L], caption str."""
  return serialization.msgpack_serialize({
      "image_ids": np.asarray(image_ids, np.int32).reshape(-1),
      "text_ids": np.asarray(text_ids, np.int32).reshape(-1),
      "caption": str(caption)})


def parse_example(record: bytes) -> dict[str, Any]:
  """Inverse of serialize_example (msgpack; no pickle, safe on any bytes)."""
  example = serialization.msgpack_restore(record)
  return {"image_ids": np.asarray(example["image_ids"], np.int32),
          "text_ids": np.asarray(example["text_ids"], np.int32),
          "caption": str(example["caption"])}


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
    os.makedirs(out_dir, exist_ok=True)
    shutil.rmtree(self.tmp_dir, ignore_errors=True)
    os.makedirs(self.tmp_dir)

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
    for name in os.listdir(self.out_dir):
      if name.startswith(f"{self.split}-") and name.endswith(".array_record"):
        os.remove(os.path.join(self.out_dir, name))
    for tmp_name, name in zip(self._tmp_names, names):
      os.replace(os.path.join(self.tmp_dir, tmp_name),
                 os.path.join(self.out_dir, name))
    shutil.rmtree(self.tmp_dir, ignore_errors=True)
    return names

  def abort(self) -> None:
    self._close_shard()
    shutil.rmtree(self.tmp_dir, ignore_errors=True)

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
                out_split: str | None = None) -> dict[str, Any]:
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
    text_length: text ids per example (config.model.text_length); longer
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
  counts = np.zeros(tokenizer.num_codes, np.int64)
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
      encoded = text_tokenizer.encode(captions, text_length)
      num_truncated += encoded.num_truncated
      counts += np.bincount(image_ids.reshape(-1),
                            minlength=tokenizer.num_codes)
      for i in range(n):
        writer.write(serialize_example(image_ids[i], encoded.ids[i],
                                       captions[i]))
      done += n
      progress.update(done)
      if done >= total:
        break
    progress.finish(done)
    if done == 0:
      raise ValueError(f"{source}/{split} has no examples to pre-tokenize.")
  # Replace this split's old files only once the new ones are complete.
  names = writer.commit()
  with open(os.path.join(out_dir, TEXT_TOKENIZER_FILE), "wb") as f:
    f.write(text_tokenizer.model_proto)

  metadata = {
      "format": FORMAT,
      "split": out_split,
      "read_split": split,
      "num_examples": int(done),
      "shards": names,
      "grid": list(tokenizer.grid),
      "image_length": int(np.prod(tokenizer.grid)),
      "num_codes": int(tokenizer.num_codes),
      "image_size": int(image_size),
      "codebook_usage": float((counts > 0).mean()),
      "text_length": int(text_length),
      "text_vocab_size": int(text_tokenizer.vocab_size),
      "text_pad_id": int(text_tokenizer.pad_id),
      "text_eos_id": int(text_tokenizer.eos_id),
      "num_truncated_captions": int(num_truncated),
      "text_tokenizer": os.path.abspath(text_tokenizer_path),
      "text_tokenizer_copy": TEXT_TOKENIZER_FILE,
      "tokenizer_workdir": (os.path.abspath(tokenizer_workdir)
                            if tokenizer_workdir else ""),
      "tokenizer_step": int(tokenizer.step),
      "source": source,
      "seconds": round(progress.elapsed_seconds, 3),
  }
  write_report(metadata_path(out_dir, out_split), metadata)
  logging.info("Wrote %d examples to %s (codebook usage %.3f, %d captions "
               "truncated).", done, out_dir, metadata["codebook_usage"],
               num_truncated)
  return metadata


def load_metadata(out_dir: str, split: str = "train",
                  command: str = "unimm.tools.pretokenize") -> dict[str, Any]:
  """The metadata of a pre-tokenized split; ValueError naming the fix
  (`command` is the module that writes such splits)."""
  path = metadata_path(out_dir, split)
  if not os.path.isfile(path):
    have = sorted(n[:-5] for n in os.listdir(out_dir)
                  if n.endswith(".json")) if os.path.isdir(out_dir) else []
    raise ValueError(
        f"No pre-tokenized split {split!r} in {out_dir!r} (found splits "
        f"{have}); run `python -m {command} --split {split} "
        f"--out {out_dir} ...` first (config.data.pretokenized_dir).")
  with open(path) as f:
    return json.load(f)


def shard_source(out_dir: str, split: str, metadata: dict[str, Any],
                 num_records: int, command: str = "unimm.tools.pretokenize"
                 ) -> grain.sources.ArrayRecordDataSource:
  """Random access over the shards metadata["shards"], checked to exist and
  to hold `num_records` records."""
  paths = [os.path.join(out_dir, name) for name in metadata["shards"]]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise ValueError(f"Pre-tokenized shards are missing: {missing[:3]}; "
                     f"re-run {command} for this split.")
  source = grain.sources.ArrayRecordDataSource(paths)
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


def pretokenized_dataset(out_dir: str, *, batch_size: int, shuffle: bool,
                         seed: int, num_epochs: int | None = None,
                         process_index: int = 0, process_count: int = 1,
                         split: str = "train", worker_count: int = 0,
                         drop_remainder: bool = True) -> grain.IterDataset:
  """Batches {"text_ids": int32 [B, L], "image_ids": int32 [B, h*w]}.

  Sharded per host (disjoint records), shuffled per epoch and
  checkpointable (iterator get_state/set_state), through
  unimm.data.pipeline.batched_dataset; see it for the arguments.
  """
  return pipeline.batched_dataset(
      pretokenized_source(out_dir, split), batch_size=batch_size,
      shuffle=shuffle, seed=seed, num_epochs=num_epochs,
      process_index=process_index, process_count=process_count,
      transform=_as_batch_arrays, drop_remainder=drop_remainder,
      worker_count=worker_count)
