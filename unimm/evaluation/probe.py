"""Shapes probe: reads generated shapes images back, GenEval-style.

Every shapes caption states what the image must show (shapes, colours, sizes,
cells, a relation), so a text-to-image model's samples can be scored exactly:
a small CNN trained on rendered scenes reads each generated image into
per-cell predictions for the 3x3 grid, and each prompt is checked against
what the probe saw (GenEval, Ghosh et al. 2023, does the same for real models
with an object detector).

  probe = get_probe(image_size=32)          # trained once, then cached
  probe.predict(images)                     # -> [PredictedScene]
  prompt_accuracy(captions, images)         # per-prompt / per-attribute
  probe_fd(real_images, generated_images)   # Frechet distance, probe features

The probe predicts, for each of the 9 cells, occupancy+shape (empty or one
of SHAPES), colour and size. Objects always sit inside one cell each, so this
reads one or two objects and their cells, and a relation ("left of", ...)
follows from the predicted cells.

Images of another size than the probe's are resized first: by box averaging
when the size is a multiple of the probe's (a box-downsampled shapes render
equals the smaller render up to rounding, see shapes._supersampling), else
by antialiased bilinear resampling (jax.image.resize, "linear").
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from typing import Any

from absl import logging
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.linalg

from unimm.data import shapes
from unimm.evaluation import fid
from unimm.progress import Progress

# Bump when the architecture, labels or training recipe change: cached
# probes of another version are not reused. v2: blur augmentation and 3,000
# steps (v1: noise only, 1,500 steps; its verdicts on decoded images hung on
# its seed, see train_probe).
PROBE_VERSION = 2
NUM_CELLS = len(shapes.CELLS)
NUM_OCCUPANCY = len(shapes.SHAPES) + 1  # class 0 = empty cell
# shapes.generate seeds. The shapes TFDS splits use 32-bit hashed seeds
# (tfds_shapes.chunk_seed); these small ones are disjoint from them and from
# each other.
TRAIN_SEED_BASE = 10_000  # + seed * 10^6 + chunk index (train_probe)
HELDOUT_SEED = 20_000  # evaluate_heldout
PROMPT_SEED = 30_000  # fixed_prompt_set
_TRAIN_CHUNK = 1000  # images per shapes.generate call while training
_PREDICT_BATCH = 256  # images per compiled forward pass (padded)


# ---------------------------------------------------------------------------
# The network.


def cell_crops(image_size: int) -> tuple[int, tuple[int, ...]]:
  """(crop side, crop starts along an axis): square crops, one per grid row
  / column, that each contain their whole cell (objects stay inside their
  cell, see shapes.SIZE_MAX_OFFSET). 32 px: side 12 at 0, 10, 20."""
  side = -(-image_size // shapes.GRID) + 1
  starts = np.round(np.linspace(0, image_size - side, shapes.GRID))
  return side, tuple(int(s) for s in starts)


class CellNet(nn.Module):
  """The shared per-cell CNN: crops [M, s, s, 3] -> logits, features [M, F].

  Three stages of two 3x3 conv + GroupNorm + ReLU (2x2 max-pooling between
  stages, doubling the channels), a dense layer (the features) and a linear
  head. GroupNorm and max-pooling (rather than strided convs) made small
  shapes train several times faster in our runs; the crop's raw colour
  statistics join the dense layer's input.
  """
  width: int = 16
  cell_feature_dim: int = 64

  @nn.compact
  def __call__(self, crops):
    x = crops  # [M, s, s, 3]
    channels = self.width
    for stage in range(3):
      if stage:
        x = nn.max_pool(x, (2, 2), (2, 2))  # [M, s/2^stage, ..., C]
      for part in ("a", "b"):
        x = nn.Conv(channels, (3, 3), name=f"conv_{stage}{part}")(x)
        x = nn.GroupNorm(num_groups=4, name=f"norm_{stage}{part}")(x)
        x = nn.relu(x)
      channels *= 2
    # Colour is a per-pixel property: the crop's raw per-channel max and
    # mean reach the dense layer directly, past the normalisations.
    colour_stats = jnp.concatenate([crops.max(axis=(1, 2)),
                                    crops.mean(axis=(1, 2))], axis=-1)
    x = jnp.concatenate([x.reshape(x.shape[0], -1), colour_stats], axis=-1)
    features = nn.relu(nn.Dense(self.cell_feature_dim, name="features")(x))
    per_cell = NUM_OCCUPANCY + len(shapes.COLORS) + len(shapes.SIZES)
    logits = nn.Dense(per_cell, name="head")(features)  # [M, K]
    occupancy, color, size = jnp.split(
        logits, [NUM_OCCUPANCY, NUM_OCCUPANCY + len(shapes.COLORS)], axis=-1)
    return {"occupancy": occupancy, "color": color, "size": size}, features


def crop_cells(images, image_size: int):
  """[B, S, S, 3] -> [B, 9, s, s, 3]: each cell's crop (cell_crops), in
  row-major cell order (numpy or jax arrays)."""
  side, starts = cell_crops(image_size)
  stack = jnp.stack if isinstance(images, jax.Array) else np.stack
  return stack([images[:, r:r + side, c:c + side]
                for r in starts for c in starts], axis=1)


class ProbeNet(nn.Module):
  """CNN: image -> per-cell logits (occupancy+shape, colour, size), features.

  Objects stay inside their grid cell, so each cell is read from its own
  crop by one shared CellNet (weight sharing over the 9 cells; training
  feeds it crops directly, see train_probe). The image features (for the
  Frechet distance) are the 9 cells' features concatenated in row-major
  order. Input: float32 [B, S, S, 3] in [-1, 1]; logits [B, 9, K].
  """
  image_size: int = 32
  width: int = 16
  cell_feature_dim: int = 64

  @property
  def feature_dim(self) -> int:
    return NUM_CELLS * self.cell_feature_dim

  def setup(self):
    self.cell_net = CellNet(self.width, self.cell_feature_dim)

  def classify_crops(self, crops):
    """Cell crops [M, s, s, 3] -> (logits [M, K] dict, features [M, F])."""
    return self.cell_net(crops)

  def __call__(self, images):
    batch = images.shape[0]
    crops = crop_cells(images, self.image_size)  # [B, 9, s, s, 3]
    logits, features = self.cell_net(crops.reshape(-1, *crops.shape[2:]))
    logits = {k: v.reshape(batch, NUM_CELLS, -1) for k, v in logits.items()}
    return logits, features.reshape(batch, self.feature_dim)  # [B, 9*F]


def _check_probe_fields(image_size: int, width: int, cell_feature_dim: int):
  if not (isinstance(image_size, int) and 16 <= image_size <= 1024):
    raise ValueError(f"Probe image_size={image_size!r}; expected an int in "
                     "[16, 1024] (the shapes sizes, e.g. 32).")
  if not (isinstance(width, int) and width > 0 and width % 4 == 0):
    raise ValueError(f"Probe width={width!r}; expected a positive multiple "
                     "of 4 (GroupNorm uses 4 groups), e.g. 16.")
  if not (isinstance(cell_feature_dim, int) and cell_feature_dim > 0):
    raise ValueError(f"Probe cell_feature_dim={cell_feature_dim!r}; "
                     "expected a positive int.")


def _net_fields(net: ProbeNet) -> dict[str, int]:
  return {"image_size": net.image_size, "width": net.width,
          "cell_feature_dim": net.cell_feature_dim}


# ---------------------------------------------------------------------------
# Inputs and labels.


def preprocess(images: Any, image_size: int) -> np.ndarray:
  """uint8 [N, H, W, 3] -> float32 [N, S, S, 3] in [-1, 1], S = image_size.

  Resizing (H != S): box average when H is a multiple of S (exact for shapes
  renders), else antialiased bilinear (jax.image.resize "linear").
  """
  images = np.asarray(images)
  if (images.ndim != 4 or images.shape[-1] != 3
      or images.shape[1] != images.shape[2] or images.dtype != np.uint8):
    raise ValueError(
        f"Probe images have shape {images.shape} and dtype {images.dtype}; "
        "expected square uint8 RGB images [N, H, H, 3] (e.g. shapes renders "
        "or decoded samples; convert floats with np.uint8(np.clip(x, 0, 255)).")
  x = images.astype(np.float32)
  size = images.shape[1]
  if size != image_size:
    if size % image_size == 0:
      k = size // image_size
      x = x.reshape(-1, image_size, k, image_size, k, 3).mean(axis=(2, 4))
    else:
      x = np.asarray(jax.image.resize(
          x, (x.shape[0], image_size, image_size, 3), "linear",
          antialias=True))
  return x / 127.5 - 1.0


def scene_targets(scenes: Sequence[shapes.Scene]) -> dict[str, np.ndarray]:
  """Per-cell int32 targets [N, 9]: "occupancy" (0 empty, 1 + shape index),
  "color" and "size" (-1 on empty cells)."""
  occupancy = np.zeros((len(scenes), NUM_CELLS), np.int32)
  color = np.full((len(scenes), NUM_CELLS), -1, np.int32)
  size = np.full((len(scenes), NUM_CELLS), -1, np.int32)
  for i, scene in enumerate(scenes):
    labels = shapes.object_labels(scene)
    cells = labels["cell"]
    occupancy[i, cells] = labels["shape"] + 1
    color[i, cells] = labels["color"]
    size[i, cells] = labels["size"]
  return {"occupancy": occupancy, "color": color, "size": size}


def probe_loss(logits: dict[str, jax.Array], targets: dict[str, jax.Array]
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy per cell: occupancy+shape on all cells, colour and size
  only on occupied cells (the colour of an empty cell is undefined)."""
  occupied = (targets["occupancy"] > 0).astype(jnp.float32)  # [B, 9] or [M]
  occupancy = optax.softmax_cross_entropy_with_integer_labels(
      logits["occupancy"], targets["occupancy"]).mean()
  num_occupied = jnp.maximum(occupied.sum(), 1.0)
  masked = {}
  for name in ("color", "size"):
    per_cell = optax.softmax_cross_entropy_with_integer_labels(
        logits[name], jnp.maximum(targets[name], 0))  # like occupied
    masked[name] = (per_cell * occupied).sum() / num_occupied
  loss = occupancy + masked["color"] + masked["size"]
  return loss, {"occupancy_loss": occupancy, "color_loss": masked["color"],
                "size_loss": masked["size"]}


# ---------------------------------------------------------------------------
# Predictions.


@dataclasses.dataclass(frozen=True)
class PredictedObject:
  """An object the probe found: all attributes, and its cell (row, col)."""
  shape: str
  color: str
  size: str
  cell: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class PredictedScene:
  """The objects the probe found, in row-major cell order."""
  objects: tuple[PredictedObject, ...]


def decode_predictions(occupancy: np.ndarray, color: np.ndarray,
                       size: np.ndarray) -> list[PredictedScene]:
  """Per-cell class indices [N, 9] -> one PredictedScene per image."""
  scenes = []
  for occ_row, color_row, size_row in zip(occupancy, color, size):
    objects = tuple(
        PredictedObject(shape=shapes.SHAPES[occ - 1],
                        color=shapes.COLORS[c], size=shapes.SIZES[z],
                        cell=shapes.CELLS[k])
        for k, (occ, c, z) in enumerate(zip(occ_row, color_row, size_row))
        if occ > 0)
    scenes.append(PredictedScene(objects))
  return scenes


@functools.partial(jax.jit, static_argnums=0)
def _forward(net: ProbeNet, params, images):
  logits, features = net.apply({"params": params}, images)
  classes = {name: jnp.argmax(value, axis=-1) for name, value in logits.items()}
  return classes, features


@dataclasses.dataclass
class Probe:
  """A trained ProbeNet and its parameters."""
  net: ProbeNet
  params: Any

  @property
  def image_size(self) -> int:
    return self.net.image_size

  def _run(self, images) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-cell class indices [N, 9] and features [N, F], in padded batches
    of _PREDICT_BATCH so every call reuses one compiled program."""
    x = preprocess(images, self.image_size)
    classes, features = [], []
    for start in range(0, len(x), _PREDICT_BATCH):
      chunk = x[start:start + _PREDICT_BATCH]
      pad = _PREDICT_BATCH - len(chunk)
      chunk = np.pad(chunk, ((0, pad), (0, 0), (0, 0), (0, 0)))
      c, f = jax.device_get(_forward(self.net, self.params, chunk))
      classes.append({k: v[:len(v) - pad] for k, v in c.items()})
      features.append(f[:len(f) - pad])
    if not classes:
      empty = np.zeros((0, NUM_CELLS), np.int32)
      return ({"occupancy": empty, "color": empty, "size": empty},
              np.zeros((0, self.net.feature_dim), np.float32))
    return ({k: np.concatenate([c[k] for c in classes]) for k in classes[0]},
            np.concatenate(features).astype(np.float32))

  def predict(self, images) -> list[PredictedScene]:
    """uint8 [N, H, W, 3] -> the objects found in each image."""
    classes, _ = self._run(images)
    return decode_predictions(classes["occupancy"], classes["color"],
                              classes["size"])

  def features(self, images) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, 9 * cell_feature_dim]: the
    penultimate (per-cell feature) layer."""
    return self._run(images)[1]

  def evaluate_heldout(self, num: int = 2000, seed: int = HELDOUT_SEED
                       ) -> dict[str, float]:
    """Per-attribute accuracies on `num` fresh renders at the probe's size."""
    images, _, scenes = shapes.generate(num, seed, self.image_size)
    classes, _ = self._run(images)
    return heldout_accuracies(classes, scene_targets(scenes))

  def save(self, directory: str) -> None:
    """Writes directory/params.npz and directory/probe.json (the fields)."""
    os.makedirs(directory, exist_ok=True)
    flat = traverse_util.flatten_dict(jax.device_get(self.params), sep="/")
    with open(os.path.join(directory, "params.npz"), "wb") as f:
      np.savez(f, **{k: np.asarray(v) for k, v in flat.items()})
    with open(os.path.join(directory, "probe.json"), "w") as f:
      json.dump({"version": PROBE_VERSION, **_net_fields(self.net)}, f)

  @classmethod
  def load(cls, directory: str) -> Probe:
    """Inverse of save; ValueError if the files are of another version."""
    with open(os.path.join(directory, "probe.json")) as f:
      fields = json.load(f)
    version = fields.pop("version", None)
    if version != PROBE_VERSION:
      raise ValueError(f"Probe in {directory} has version {version!r}; "
                       f"expected {PROBE_VERSION}. Delete it to retrain.")
    net = ProbeNet(**{k: int(v) for k, v in fields.items()})
    _check_probe_fields(net.image_size, net.width, net.cell_feature_dim)
    # allow_pickle=False: the file holds plain arrays only.
    with np.load(os.path.join(directory, "params.npz"),
                 allow_pickle=False) as data:
      flat = {k: np.asarray(data[k]) for k in data.files}
    params = traverse_util.unflatten_dict(flat, sep="/")
    expected = jax.eval_shape(
        net.init, jax.random.key(0),
        jnp.zeros((1, net.image_size, net.image_size, 3)))["params"]
    if (jax.tree.map(lambda a: a.shape, expected)
        != jax.tree.map(lambda a: a.shape, params)):
      raise ValueError(f"Probe parameters in {directory} do not match its "
                       f"fields {fields}; delete the directory to retrain.")
    return cls(net, jax.tree.map(jnp.asarray, params))


def heldout_accuracies(classes: dict[str, np.ndarray],
                       targets: dict[str, np.ndarray]) -> dict[str, float]:
  """Per-attribute accuracies of per-cell predictions against targets.

  shape/color/size: over true objects, read at the object's cell (shape also
  requires the cell to be seen as occupied). occupancy: over all cells
  (empty vs not). cell: over true objects, the cell is seen as occupied.
  scene: every cell fully right (no missed, extra or wrong object).
  """
  occupied = targets["occupancy"] > 0  # [N, 9]
  seen = classes["occupancy"] > 0
  right = {
      "shape": classes["occupancy"] == targets["occupancy"],
      "color": classes["color"] == targets["color"],
      "size": classes["size"] == targets["size"],
  }
  result = {f"{k}_accuracy": float(v[occupied].mean())
            for k, v in right.items()}
  result["cell_accuracy"] = float(seen[occupied].mean())
  result["occupancy_accuracy"] = float((seen == occupied).mean())
  cell_right = np.where(occupied, right["shape"] & right["color"]
                        & right["size"], ~seen)
  result["scene_accuracy"] = float(cell_right.all(axis=1).mean())
  return result


# ---------------------------------------------------------------------------
# Training.


def _train_crops(num_train: int, image_size: int, seed: int,
                 empty_per_image: int = 2
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Cell crops uint8 [M, s, s, 3] and their targets [M] from `num_train`
  fresh renders (seeds TRAIN_SEED_BASE + seed * 10^6 + chunk): every
  occupied cell and `empty_per_image` random empty cells of each image (the
  empty ones are easy; this keeps the batches about the objects)."""
  pick = np.random.default_rng([seed, 1])
  crops, targets = [], []
  for c in range(-(-num_train // _TRAIN_CHUNK)):
    num = min(_TRAIN_CHUNK, num_train - c * _TRAIN_CHUNK)
    images, _, scenes = shapes.generate(
        num, TRAIN_SEED_BASE + seed * 1_000_000 + c, image_size)
    cell_targets = scene_targets(scenes)  # [n, 9] each
    # Random keys; occupied cells sort first, then the chosen empty ones.
    keys = pick.random((num, NUM_CELLS)) - (cell_targets["occupancy"] > 0)
    order = np.argsort(keys, axis=1)
    num_objects = (cell_targets["occupancy"] > 0).sum(axis=1)
    rows, cols = np.nonzero(
        np.arange(NUM_CELLS) < (num_objects + empty_per_image)[:, None])
    cells = order[rows, cols]
    crops.append(crop_cells(images, image_size)[rows, cells])
    targets.append({k: v[rows, cells] for k, v in cell_targets.items()})
  return (np.concatenate(crops),
          {k: np.concatenate([t[k] for t in targets]) for k in targets[0]})


def blur_crops(x, sigma):
  """Gaussian blur of crops x [M, s, s, C] with a per-crop sigma [M] (px).

  Separable 5-tap kernels, edges replicated; sigma 0 leaves a crop as it
  is. Decoders blur object edges; training on blurred renders keeps the
  probe's verdict on decoded images from hanging on exact edge pixels.
  """
  taps = jnp.arange(-2, 3, dtype=jnp.float32)  # [5]
  s2 = jnp.maximum(sigma, 1e-3)[:, None] ** 2
  w = jnp.exp(-taps[None] ** 2 / (2 * s2))
  w = w / w.sum(axis=1, keepdims=True)  # [M, 5]
  for axis in (1, 2):
    pad = [(0, 0)] * 4
    pad[axis] = (2, 2)
    padded = jnp.pad(x, pad, mode="edge")
    size = x.shape[axis]
    x = sum(w[:, k, None, None, None] *
            jax.lax.slice_in_dim(padded, k, k + size, axis=axis)
            for k in range(5))
  return x


def train_probe(num_train: int = 20_000, steps: int = 3000, seed: int = 0,
                image_size: int = 32, batch_size: int = 256,
                learning_rate: float = 1e-3, width: int = 16,
                cell_feature_dim: int = 64, log_every: int = 100,
                blur_max: float = 1.0) -> Probe:
  """Trains a probe on `num_train` fresh renders for `steps` Adam steps.

  Renders come from shapes.generate with seeds TRAIN_SEED_BASE + ... (held
  out from the shapes data set, evaluate_heldout and fixed_prompt_set).
  Batches are `batch_size` cell crops (see _train_crops). Adam (b2 = 0.99
  against loss spikes) with warmup and cosine decay, gradients clipped to
  norm 1. Augmentation: a Gaussian blur of sigma uniform in [0, blur_max]
  px (blur_crops), then light Gaussian pixel noise, so the probe reads
  decoded samples, whose edges are soft, the way it reads renders.

  Why the blur (measured on the 2,048-code shapes tokenizer's
  reconstructions of the 200 + 200 fixed prompts' scenes): trained on sharp
  renders with noise only (1,500 steps, probe v1), three seeds read them at
  0.84 / 0.90 / 0.915 single and 0.805 / 0.71 / 0.795 pair and agreed on
  only 81-90.5% of the single prompts' verdicts, calling clearly drawn
  circles triangles and crosses diamonds; with blur_max 1.0 two seeds
  read 0.925 / 0.935 and 0.80 / 0.86 and agreed on 92% (pair 85%); with
  3,000 steps too (v2), 0.95 / 0.95 and 0.875 / 0.82, agreeing on 95%
  (pair 85.5%; what is left is mostly small crosses that decode as plus-
  shaped blobs, between cross and diamond). On true renders every one of
  them scores >= 0.995 single.
  """
  _check_probe_fields(image_size, width, cell_feature_dim)
  for name, value in (("num_train", num_train), ("steps", steps),
                      ("batch_size", batch_size)):
    if not (isinstance(value, int) and value > 0):
      raise ValueError(f"train_probe {name}={value!r}; expected a positive "
                       "int.")
  start = time.time()
  crops, targets = _train_crops(num_train, image_size, seed)
  logging.info("Probe: rendered %d training images (%d cell crops) in "
               "%.1f s.", num_train, len(crops), time.time() - start)
  net = ProbeNet(image_size=image_size, width=width,
                 cell_feature_dim=cell_feature_dim)
  rng = jax.random.key(seed)
  params = net.init(rng, jnp.zeros((1, image_size, image_size, 3)))["params"]
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, min(100, steps // 10 + 1), steps, 0.02)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule, b2=0.99))
  opt_state = optimizer.init(params)

  @jax.jit
  def train_step(params, opt_state, batch_crops, batch_targets, key):
    x = batch_crops.astype(jnp.float32) / 127.5 - 1.0  # [M, s, s, 3]
    noise_key, scale_key, blur_key = jax.random.split(key, 3)
    if blur_max:
      x = blur_crops(x, blur_max * jax.random.uniform(blur_key, x.shape[:1]))
    sigma = 0.06 * jax.random.uniform(scale_key, (x.shape[0], 1, 1, 1))
    x = x + sigma * jax.random.normal(noise_key, x.shape)

    def loss_fn(params):
      logits, _ = net.apply({"params": params}, x,
                            method=ProbeNet.classify_crops)
      return probe_loss(logits, batch_targets)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, metrics

  order = np.random.default_rng([seed, 2])
  batch_size = min(batch_size, len(crops))
  progress = Progress(steps, what="Probe steps")
  for step in range(1, steps + 1):
    index = order.integers(0, len(crops), batch_size)
    params, opt_state, loss, metrics = train_step(
        params, opt_state, crops[index],
        {k: v[index] for k, v in targets.items()},
        jax.random.fold_in(rng, step))
    if step % log_every == 0 or step == steps:  # float(loss) waits for it
      progress.update(step, force=True, extra=f"loss {float(loss):.4f} (" + (
          ", ".join(f"{k} {float(v):.4f}" for k, v in metrics.items())) + ")")
  logging.info("Probe: trained in %.1f s.", time.time() - start)
  return Probe(net, params)


def default_cache_dir() -> str:
  """$UNIMM_DATA_DIR/probe, else ~/.cache/unimm/probe."""
  root = os.environ.get("UNIMM_DATA_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "unimm")
  return os.path.join(root, "probe")


@functools.lru_cache(maxsize=8)
def _cached_probe(directory: str, image_size: int) -> Probe:
  if os.path.exists(os.path.join(directory, "probe.json")):
    logging.info("Probe: loading %s.", directory)
    return Probe.load(directory)
  logging.info("Probe: no cached probe in %s; training one (a few minutes "
               "on one CPU core).", directory)
  probe = train_probe(image_size=image_size)
  logging.info("Probe held-out accuracy: %s", probe.evaluate_heldout())
  # Save to a temporary sibling, then rename: readers never see half a probe.
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp_probe_")
  probe.save(tmp)
  try:
    os.rename(tmp, directory)
  except OSError:  # another process saved it first
    pass
  return probe


def get_probe(image_size: int = 32, cache_dir: str | None = None) -> Probe:
  """The cached probe for `image_size`, trained (and saved) if missing.

  Cached under cache_dir (default: default_cache_dir()) in
  v{PROBE_VERSION}_{image_size}px/; loaded once per process.
  """
  _check_probe_fields(image_size, 16, 1)
  directory = os.path.join(cache_dir or default_cache_dir(),
                           f"v{PROBE_VERSION}_{image_size}px")
  return _cached_probe(os.path.abspath(directory), image_size)


# ---------------------------------------------------------------------------
# Scoring prompts.


def _stated(parsed: shapes.ParsedObject) -> dict[str, Any]:
  """The attributes a caption states about one object."""
  stated = {"shape": parsed.shape, "color": parsed.color}
  if parsed.size is not None:
    stated["size"] = parsed.size
  if parsed.cell is not None:
    stated["position"] = tuple(parsed.cell)
  return stated


def _attributes(obj: PredictedObject) -> dict[str, Any]:
  return {"shape": obj.shape, "color": obj.color, "size": obj.size,
          "position": tuple(obj.cell)}


def score_prompt(parsed: shapes.ParsedScene, predicted: PredictedScene
                 ) -> dict[str, bool]:
  """Whether the image (as the probe read it) shows what the caption says.

  Stated objects are matched one-to-one to found objects, choosing the
  assignment that makes the most stated attributes (and the relation) true;
  a stated object with no match gets every attribute wrong. Keys:
    shape, color: every stated object's is right;
    size, position: every object that states it is right (absent if no
      object states it);
    relation: holds between the matched objects' predicted cells (absent if
      the caption states none);
    count: exactly as many objects found as the caption describes (a
      caption describes the whole scene, so an extra object is an error);
    correct: all of the above.
  """
  stated = [_stated(o) for o in parsed.objects]
  found = [_attributes(o) for o in predicted.objects]
  # Candidates: a found object's index or None (unmatched).
  candidates = list(range(len(found))) + [None] * len(stated)
  best, best_score = None, -1
  for assignment in itertools.permutations(candidates, len(stated)):
    checks = _checks(stated, found, assignment, parsed.relation)
    score = sum(sum(v) for v in checks.values())
    if score > best_score:
      best, best_score = checks, score
  result = {name: all(values) for name, values in best.items()}
  result["count"] = len(found) == len(stated)
  result["correct"] = all(result.values())
  return result


def _checks(stated: list[dict[str, Any]], found: list[dict[str, Any]],
            assignment: Sequence[int | None], relation: str | None
            ) -> dict[str, list[bool]]:
  """Per-attribute lists of booleans for one assignment of stated objects."""
  checks: dict[str, list[bool]] = {"shape": [], "color": []}
  for want, index in zip(stated, assignment):
    for name, value in want.items():
      got = None if index is None else found[index][name]
      checks.setdefault(name, []).append(got == value)
  if relation is not None:
    first, second = assignment
    holds = (first is not None and second is not None and
             shapes.relation_holds(relation, found[first]["position"],
                                   found[second]["position"]))
    checks["relation"] = [holds]
  return checks


# What score_prompt checks (its keys besides "correct").
ATTRIBUTES = ("shape", "color", "size", "position", "relation", "count")


def score_predictions(prompts: Sequence[str],
                      predictions: Sequence[PredictedScene]) -> dict[str, Any]:
  """Aggregates score_prompt over prompts (see prompt_accuracy)."""
  if len(prompts) != len(predictions):
    raise ValueError(f"Got {len(prompts)} prompts and {len(predictions)} "
                     "images; expected one image per prompt.")
  scores = {1: [], 2: []}
  for prompt, predicted in zip(prompts, predictions):
    parsed = shapes.parse_caption(prompt)
    if parsed is None:
      raise ValueError(f"Prompt {prompt!r} is not a shapes caption; expected "
                       "captions made by shapes.caption (see "
                       "fixed_prompt_set).")
    scores[len(parsed.objects)].append(score_prompt(parsed, predicted))

  def mean(values):
    return float(np.mean(values)) if values else float("nan")

  every = scores[1] + scores[2]
  result = {
      "prompt_accuracy": mean([s["correct"] for s in every]),
      "prompt_accuracy_single": mean([s["correct"] for s in scores[1]]),
      "prompt_accuracy_pair": mean([s["correct"] for s in scores[2]]),
      "num_single": len(scores[1]),
      "num_pair": len(scores[2]),
  }
  for name in ATTRIBUTES:
    result[f"{name}_accuracy"] = mean([s[name] for s in every if name in s])
  return result


def prompt_accuracy(prompts: Sequence[str], images: Any,
                    probe: Probe | None = None) -> dict[str, Any]:
  """GenEval-style accuracy of images generated from shapes captions.

  prompts: N captions (shapes.caption); images: uint8 [N, H, W, 3].
  Returns prompt_accuracy (all prompts), prompt_accuracy_single /
  prompt_accuracy_pair (1- / 2-object prompts: every stated attribute,
  relation and the object count right), and shape_/color_/size_/position_/
  relation_/count_accuracy over the prompts that state that attribute
  (unstated ones are skipped, not counted wrong); NaN where no prompt
  applies. num_single / num_pair count the prompts.
  probe: default get_probe(image size of `images`).
  """
  images = np.asarray(images)
  if probe is None:
    probe = get_probe(images.shape[1] if images.ndim == 4 else 32)
  return score_predictions(prompts, probe.predict(images))


def fixed_prompt_set(num_single: int = 500, num_pair: int = 500,
                     seed: int = PROMPT_SEED
                     ) -> list[tuple[str, shapes.Scene]]:
  """A deterministic evaluation prompt set: (caption, scene) pairs.

  Scenes and caption templates are drawn from np.random.default_rng([seed,
  count, i]) for count 1 then 2 (held out from the training and probe
  seeds); each list is a prefix of a longer one.
  """
  prompts = []
  for count, num in ((1, num_single), (2, num_pair)):
    for i in range(num):
      rng = np.random.default_rng([seed, count, i])
      scene = shapes.scene_from_rng(rng, count)
      template = int(rng.integers(len(shapes.TEMPLATES[count])))
      prompts.append((shapes.caption(scene, template), scene))
  return prompts


def reconstruction_accuracy(reconstruct, num_single: int = 200,
                            num_pair: int = 200, image_size: int = 32,
                            probe: Probe | None = None,
                            batch_size: int = 100,
                            seed: int = PROMPT_SEED) -> dict[str, Any]:
  """prompt_accuracy of an image tokenizer's reconstructions of the fixed
  prompt set's true renders: the most a text-to-image model that writes
  this tokenizer's codes can score (its "ceiling"), since its images are
  decoded by the same decoder.

  reconstruct: uint8 [N, H, W, 3] -> uint8 [N, H, W, 3] (encode + decode).
  Returns prompt_accuracy's keys (see prompt_accuracy) for
  fixed_prompt_set(num_single, num_pair, seed).
  """
  pairs = fixed_prompt_set(num_single, num_pair, seed)
  real = np.stack([shapes.render(scene, image_size) for _, scene in pairs])
  recon = np.concatenate([np.asarray(reconstruct(real[i:i + batch_size]))
                          for i in range(0, len(real), batch_size)])
  return prompt_accuracy([p for p, _ in pairs], recon, probe)


# ---------------------------------------------------------------------------
# Frechet distance.


def frechet_distance(features_a: Any, features_b: Any,
                     eps: float = 1e-6) -> float:
  """Frechet distance between Gaussians fit to two feature sets [N, F].

  fid.frechet_distance (pytorch-fid's: float64, scipy.linalg.sqrtm, eps*I
  added when the root is not finite) of the two sets' means and
  covariances, clamped at 0 (rounding makes identical sets come out a
  little negative). Singular covariances (fewer samples than features, dead
  features) are common here, so scipy's LinAlgWarning is silenced.
  """
  a = np.asarray(features_a, np.float64)
  b = np.asarray(features_b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f"Feature sets have shapes {a.shape} and {b.shape}; "
                     "expected [N, F] and [M, F] with the same F.")
  if len(a) < 2 or len(b) < 2:
    raise ValueError(f"Feature sets have {len(a)} and {len(b)} rows; a "
                     "covariance needs at least 2 (use more images).")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    distance = fid.frechet_distance(
        a.mean(axis=0), np.cov(a, rowvar=False), b.mean(axis=0),
        np.cov(b, rowvar=False), eps=eps)
  return max(distance, 0.0)


def probe_fd(real_images: Any, generated_images: Any,
             probe: Probe | None = None) -> float:
  """Frechet distance between probe features of two image sets (uint8
  [N, H, W, 3]); probe: default get_probe(size of real_images)."""
  real_images = np.asarray(real_images)
  if probe is None:
    probe = get_probe(real_images.shape[1] if real_images.ndim == 4 else 32)
  return frechet_distance(probe.features(real_images),
                          probe.features(generated_images))
