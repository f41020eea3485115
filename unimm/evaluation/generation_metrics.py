"""FID and CLIP score of a text-to-image model's samples over a prompt set.

  metrics = generation_metrics(
      sample_fn, prompts, inception_weights="pt_inception-...-6726825d.pth",
      fid_reference="coco30k_stats.npz", clip_dir="clip-vit-base-patch32",
      num_images=30_000, batch_size=64, workdir=workdir)
  # -> {"fid": ..., "clip_score": ..., "metrics_num_images": 30000}

`sample_fn(prompts, batch_index)` returns uint8 images [len(prompts), H, W,
3]; it is called with exactly `batch_size` prompts every time (the last
batch is padded with copies of its first prompt and the extra images are
dropped), so a jitted sampler compiles once. Images are scored batch by
batch (Inception statistics stream through fid.RunningStats), so nothing
holds all N images.

The settings are the config.eval keys of configs/parti_shapes.py, and
errors name them:
  inception_weights  pytorch-fid's .pth or its .npz (fid.convert_to_npz)
  fid_reference      the real-image statistics: a .npz of mu/sigma
                     (pytorch-fid --save-stats, clean-fid), a folder of
                     images (all of them), or SOURCE:SPLIT, a data source of
                     unimm.data.pipeline (shapes, shapes_small or a
                     unimm.tools.convert directory): its first num_images
                     examples in a fixed shuffled order. Computed statistics
                     are cached as workdir/eval/fid_reference_*.npz.
  clip_dir           a Hugging Face CLIP directory (clip.load_clip)
  metrics_prompts    a prompts file (one a line, or a TSV with a Prompt
                     column: PartiPrompts.tsv), or SOURCE:SPLIT (its
                     captions); "" = the captions of fid_reference's
                     SOURCE:SPLIT if it is one, else of the training data's
                     source's test split (the COCO-30k protocol: captions
                     and reference images from one held-out split)
  metrics_num_images the number of prompts used (the first ones)
FID needs inception_weights and fid_reference; CLIP score needs clip_dir.
Every path is checked before anything is sampled.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import logging
from etils import epath
import jax
import numpy as np

from unimm.data import pipeline
from unimm.evaluation import clip as clip_lib
from unimm.evaluation import fid
from unimm.evaluation import inception
from unimm.progress import Progress
from unimm.tokenizers import text as text_lib

SETTINGS = ("inception_weights", "fid_reference", "clip_dir",
            "metrics_prompts", "metrics_num_images")
DATA_SEED = 0  # shuffle seed of SOURCE:SPLIT reads (captions and images)
INCEPTION_BATCH = 50  # pytorch-fid's default batch size

SampleFn = Callable[[list[str], int], Any]


# The config.eval keys above and their defaults (FID and CLIP score off).
CONFIG_DEFAULTS = dict(inception_weights="", fid_reference="", clip_dir="",
                       metrics_prompts="", metrics_num_images=1000)


def _setting(name: str) -> str:
  return f"config.eval.{name}"


def _is_data_spec(value: str) -> bool:
  return ":" in value and not value.endswith(".npz") and not os.path.exists(
      value)


def _parse_data_spec(value: str, name: str) -> tuple[str, str]:
  """(source, split) of "SOURCE:SPLIT"; ValueError naming the setting."""
  # The split may slice (TFDS: "train[-200:]"), so it is the part after
  # the last ":" outside brackets.
  match = re.fullmatch(r"(.*):(\w+(?:\[[^\]]*\])?)", value)
  source, split = (match.groups() if match else value.rsplit(":", 1))
  if not split or not (source in pipeline.SHAPES_SOURCES or os.path.isfile(
      os.path.join(source, "dataset_info.json"))):
    raise ValueError(
        f"{_setting(name)}={value!r} does not exist as a path, and as "
        f"SOURCE:SPLIT its SOURCE is not one of "
        f"{sorted(pipeline.SHAPES_SOURCES)} nor a directory written by "
        "`python -m unimm.tools.convert` (e.g. 'shapes:test').")
  return source, split


def check_settings(*, inception_weights: str = "", fid_reference: str = "",
                   clip_dir: str = "", metrics_prompts: str = "",
                   num_images: int = 1000) -> bool:
  """ValueError naming the config.eval setting if a configured path does not
  exist or FID lacks one of its two inputs; True if any metric is on."""
  if not (inception_weights or clip_dir):
    if fid_reference:
      raise ValueError(f"{_setting('fid_reference')}={fid_reference!r} is "
                       f"set but {_setting('inception_weights')} is empty; "
                       "FID needs both (or clear fid_reference).")
    return False
  if bool(inception_weights) != bool(fid_reference):
    have, missing = (("inception_weights", "fid_reference")
                     if inception_weights else
                     ("fid_reference", "inception_weights"))
    raise ValueError(
        f"{_setting(have)} is set but {_setting(missing)} is empty; FID "
        "needs the Inception weights and the reference statistics (.npz, an "
        "image folder or SOURCE:SPLIT). Set both, or clear "
        f"{_setting(have)}.")
  if inception_weights and not os.path.isfile(inception_weights):
    raise ValueError(
        f"{_setting('inception_weights')}={inception_weights!r} does not "
        "exist; expected pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
        "or its .npz (see README, 'FID and CLIP score').")
  if fid_reference:
    if _is_data_spec(fid_reference):
      _parse_data_spec(fid_reference, "fid_reference")
    elif not (os.path.isdir(fid_reference) or (
        fid_reference.endswith(".npz") and os.path.isfile(fid_reference))):
      raise ValueError(
          f"{_setting('fid_reference')}={fid_reference!r} does not exist; "
          "expected a .npz of mu/sigma, a folder of images or SOURCE:SPLIT "
          "(e.g. 'shapes:test').")
  if clip_dir and not os.path.isdir(clip_dir):
    raise ValueError(
        f"{_setting('clip_dir')}={clip_dir!r} is not a directory; expected "
        "a Hugging Face CLIP checkpoint (config.json, model.safetensors, "
        "vocab.json, merges.txt), e.g. openai/clip-vit-base-patch32.")
  if metrics_prompts:
    if _is_data_spec(metrics_prompts):
      _parse_data_spec(metrics_prompts, "metrics_prompts")
    elif not os.path.isfile(metrics_prompts):
      raise ValueError(
          f"{_setting('metrics_prompts')}={metrics_prompts!r} does not "
          "exist; expected a prompts file (one a line, or a TSV with a "
          "Prompt column) or SOURCE:SPLIT, or '' for the test captions.")
  minimum = 2 if inception_weights else 1
  if not isinstance(num_images, (int, np.integer)) or num_images < minimum:
    raise ValueError(
        f"{_setting('metrics_num_images')}={num_images!r}; expected an int "
        f">= {minimum}{' (FID needs a covariance)' if minimum > 1 else ''}.")
  return True


def _read_split(source: str, split: str, num: int, *, image_size: int,
                batch_size: int, data_dir: str | None):
  """Yields {"image": uint8 [b, S, S, 3], "caption": [b]} batches of the
  first `num` examples of `split` in a fixed shuffled order (DATA_SEED)."""
  dataset = pipeline.image_text_dataset(
      source, split, batch_size=batch_size, image_size=image_size,
      shuffle=True, seed=DATA_SEED, num_epochs=1, data_dir=data_dir,
      drop_remainder=False)
  seen = 0
  for batch in dataset:
    take = min(len(batch["caption"]), num - seen)
    yield {"image": np.asarray(batch["image"])[:take],
           "caption": [str(c) for c in batch["caption"][:take]]}
    seen += take
    if seen >= num:
      return


def load_prompts(metrics_prompts: str, *, num_images: int,
                 fid_reference: str = "", default_source: str = "",
                 image_size: int = 32, data_dir: str | None = None
                 ) -> list[str]:
  """The first num_images prompts named by config.eval.metrics_prompts
  (see the module docstring); default_source is the training data's."""
  if metrics_prompts and not _is_data_spec(metrics_prompts):
    prompts = text_lib.read_prompts(metrics_prompts)
    where = metrics_prompts
  else:
    spec = metrics_prompts or (fid_reference if fid_reference and
                               _is_data_spec(fid_reference) else "")
    if not spec and default_source:
      spec = f"{default_source}:test"
    if not spec:
      raise ValueError(
          f"{_setting('metrics_prompts')} is empty and there is no data "
          "source to take test captions from; set it to a prompts file or "
          "SOURCE:SPLIT.")
    source, split = _parse_data_spec(
        spec, "metrics_prompts" if metrics_prompts else "fid_reference")
    prompts = [caption for batch in _read_split(
        source, split, num_images, image_size=image_size, batch_size=256,
        data_dir=data_dir) for caption in batch["caption"]]
    where = spec
  if not prompts:
    raise ValueError(f"{_setting('metrics_prompts')}: {where!r} has no "
                     "prompts.")
  if len(prompts) < num_images:
    logging.warning("%s has %d prompts, fewer than %s=%d; using them all.",
                    where, len(prompts), _setting("metrics_num_images"),
                    num_images)
  return prompts[:num_images]


def _cache_path(cache_dir: str, name: str, key: list[Any]) -> str:
  digest = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:10]
  name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
  return os.path.join(cache_dir, f"fid_reference_{name}_{digest}.npz")


def reference_statistics(net: inception.Inception, fid_reference: str, *,
                         weights: str, num_images: int,
                         image_size: int | None, cache_dir: str,
                         batch_size: int = INCEPTION_BATCH,
                         data_dir: str | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of config.eval.fid_reference: loaded from a .npz, else
  computed (folder or SOURCE:SPLIT) and cached in cache_dir."""
  if fid_reference.endswith(".npz") and os.path.isfile(fid_reference):
    return fid.load_stats(fid_reference)
  stat = os.stat(weights)
  weights_key = [os.path.abspath(weights), stat.st_size, int(stat.st_mtime)]
  if os.path.isdir(fid_reference):
    folder = os.path.abspath(fid_reference)
    path = _cache_path(cache_dir, os.path.basename(folder), [
        folder, int(os.stat(folder).st_mtime), *weights_key])
    source = folder
  else:
    if not image_size:
      raise ValueError(f"{_setting('fid_reference')}={fid_reference!r} "
                       "reads a data source: pass image_size (the samples' "
                       "size).")
    name, split = _parse_data_spec(fid_reference, "fid_reference")
    source_key = name if not os.path.isdir(name) else os.path.abspath(name)
    path = _cache_path(
        cache_dir, f"{os.path.basename(name.rstrip('/'))}_{split}_"
        f"{num_images}x{image_size}px",
        [source_key, split, num_images, image_size, DATA_SEED, *weights_key])
    source = (batch["image"] for batch in _read_split(
        name, split, num_images, image_size=image_size,
        batch_size=batch_size, data_dir=data_dir))
  if epath.Path(path).is_file():
    logging.info("FID reference statistics: cached %s.", path)
    return fid.load_stats(path)
  logging.info("FID reference statistics of %s (cached as %s).",
               fid_reference, path)
  mu, sigma = fid.compute_statistics(net, source, batch_size=batch_size)
  if jax.process_index() == 0:
    epath.Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tmp = f"{path[:-4]}.tmp{os.getpid()}.npz"
    fid.save_stats(tmp, mu, sigma)
    epath.Path(tmp).rename(path)  # readers never see half a file
  return mu, sigma


def _load(loader, path: str, name: str):
  try:
    return loader(path)
  except ValueError as e:
    raise ValueError(f"{_setting(name)}={path!r}: {e}") from e


def generation_metrics(sample_fn: SampleFn, prompts: Sequence[str], *,
                       inception_weights: str = "", fid_reference: str = "",
                       clip_dir: str = "", num_images: int = 1000,
                       batch_size: int = 64, workdir: str = "",
                       image_size: int | None = None,
                       data_dir: str | None = None) -> dict[str, Any]:
  """FID (if inception_weights and fid_reference) and CLIP score (if
  clip_dir) of one sample per prompt, over the first num_images prompts.

  Returns {"fid", "clip_score", "metrics_num_images"} (only the metrics
  that are configured). clip_score is clip.clip_score: the mean of
  100 * max(cos, 0) per sample. Paths, networks and the reference
  statistics are loaded before sample_fn is first called. image_size (of
  the samples) is needed when fid_reference is SOURCE:SPLIT; data_dir is
  the TFDS data dir of the shapes sources; computed reference statistics
  are cached in workdir/eval/.
  """
  check_settings(inception_weights=inception_weights,
                 fid_reference=fid_reference, clip_dir=clip_dir,
                 num_images=num_images)
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}; expected >= 1 "
                     "(config.eval.batch_size).")
  if isinstance(prompts, (str, bytes)):
    raise ValueError("prompts must be a list of strings; read a prompts "
                     "file with load_prompts.")
  prompts = list(prompts)[:num_images]
  if len(prompts) < (2 if inception_weights else 1):
    raise ValueError(f"Got {len(prompts)} prompts; FID needs at least 2 "
                     "(a covariance), CLIP score at least 1.")
  net = clip_model = reference = None
  if inception_weights:
    net = _load(inception.load_inception, inception_weights,
                "inception_weights")
    reference = reference_statistics(
        net, fid_reference, weights=inception_weights, num_images=num_images,
        image_size=image_size, cache_dir=os.path.join(workdir, "eval"),
        batch_size=min(batch_size, INCEPTION_BATCH), data_dir=data_dir)
  if clip_dir:
    clip_model = _load(clip_lib.load_clip, clip_dir, "clip_dir")
    if clip_model.tokenizer is None:  # raises, naming the missing files
      _load(lambda _: clip_model.encode_texts(prompts[:1]), clip_dir,
            "clip_dir")

  stats, scores = fid.RunningStats(), []
  total = len(prompts)
  progress = Progress(total, what="Generation metrics: prompts sampled and "
                      "scored")
  for index, begin in enumerate(range(0, total, batch_size)):
    batch = prompts[begin:begin + batch_size]
    count = len(batch)
    batch += [batch[0]] * (batch_size - count)  # one compiled sampler
    images = np.asarray(sample_fn(batch, index))  # [batch_size, H, W, 3]
    if (images.dtype != np.uint8 or images.ndim != 4 or
        images.shape[0] != batch_size or images.shape[-1] != 3):
      raise ValueError(
          f"sample_fn returned {images.dtype} {images.shape} for "
          f"{batch_size} prompts; expected uint8 [{batch_size}, H, W, 3].")
    if net is not None:
      features = np.concatenate(list(inception.iter_features(
          net, inception.padded_batches(
              images, min(batch_size, INCEPTION_BATCH)))))  # [batch_size, 2048]
      stats.update(features[:count])
    if clip_model is not None:
      scores.append(clip_lib.clip_scores(clip_model, images, batch,
                                         batch_size)[:count])
    progress.update(begin + count)

  result: dict[str, Any] = {}
  if net is not None:
    result["fid"] = fid.frechet_distance(stats.mean, stats.covariance,
                                         *reference)
  if clip_model is not None:
    result["clip_score"] = float(np.mean(np.concatenate(scores)))
  result["metrics_num_images"] = total
  logging.info("Generation metrics over %d images: %s", total, result)
  return result


def from_eval_config(eval_config: Mapping[str, Any], sample_fn: SampleFn, *,
                     workdir: str, image_size: int, default_source: str = "",
                     data_dir: str | None = None) -> dict[str, Any]:
  """generation_metrics with the config.eval settings (prompts read by
  load_prompts; batch_size = config.eval.batch_size)."""
  num_images = int(eval_config["metrics_num_images"])
  prompts = load_prompts(
      eval_config["metrics_prompts"], num_images=num_images,
      fid_reference=eval_config["fid_reference"],
      default_source=default_source, image_size=image_size,
      data_dir=data_dir)
  return generation_metrics(
      sample_fn, prompts, inception_weights=eval_config["inception_weights"],
      fid_reference=eval_config["fid_reference"],
      clip_dir=eval_config["clip_dir"], num_images=num_images,
      batch_size=int(eval_config["batch_size"]), workdir=workdir,
      image_size=image_size, data_dir=data_dir)


def check_eval_config(eval_config: Mapping[str, Any]) -> bool:
  """check_settings on config.eval; True if FID or CLIP score is on."""
  return check_settings(
      inception_weights=eval_config["inception_weights"],
      fid_reference=eval_config["fid_reference"],
      clip_dir=eval_config["clip_dir"],
      metrics_prompts=eval_config["metrics_prompts"],
      num_images=eval_config["metrics_num_images"])
