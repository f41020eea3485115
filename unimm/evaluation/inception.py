"""The FID Inception-v3 network (pool3 features), as pytorch-fid runs it.

pytorch-fid (github.com/mseitzer/pytorch-fid, src/pytorch_fid/inception.py)
builds torchvision's Inception3 with 1008 classes and no aux head, swaps in
FIDInceptionA/C/E_1/E_2 blocks to match TensorFlow's graph, and loads the
weights ported from TF's inception-2015-12-05 (pt_inception-2015-12-05-
6726825d.pth). Its InceptionV3(resize_input=True, normalize_input=True)
resizes [0, 1] images to 299x299 (F.interpolate bilinear,
align_corners=False, no antialiasing), maps them to [-1, 1] and returns the
2048-d output of the final average pool. This module is that network in
Flax (NHWC), loading the same weight file:

  net = load_inception("pt_inception-2015-12-05-6726825d.pth")  # or .npz
  features = inception_features(net, images)  # uint8 [N, H, W, 3] -> [N, 2048]

Differences from torchvision's blocks (the "FID" patches): Mixed_5b-d
(A), Mixed_6b-e (C) and Mixed_7b (E_1) average-pool without counting the
zero padding (count_include_pad=False, as TF does); Mixed_7c (E_2)
max-pools in its pool branch.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from unimm.progress import Progress

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008  # TF's 2015 graph: 1000 ImageNet classes + 8 unused.
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
_BN_EPS = 1e-3  # torchvision BasicConv2d: nn.BatchNorm2d(eps=0.001).

Precision = str | jax.lax.Precision | None


# ---------------------------------------------------------------------------
# Input handling.


def _linear_taps(in_size: int, out_size: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Source indices and weights of 1-D linear resampling, align_corners=False.

  As ATen's CPU upsample_bilinear2d computes them: float32 scale = in/out,
  src = max(scale * (dst + 0.5) - 0.5, 0) rounded once (ATen's build fuses
  it into an FMA; float64 then one rounding is the same), i0 = floor(src),
  i1 = min(i0 + 1, in - 1), weights (1 - frac, frac) in float32: torch
  2.13's interpolation matrix bit for bit (as tested). No antialiasing,
  also when downsampling (jax.image.resize would antialias).
  """
  scale = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(out_size, dtype=np.float64)
  src = (np.float64(scale) * (dst + 0.5) - 0.5).astype(np.float32)
  src = np.maximum(src, np.float32(0))
  i0 = np.minimum(src.astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w1 = (src - i0.astype(np.float32)).astype(np.float32)
  w0 = (np.float32(1) - w1).astype(np.float32)
  return i0, i1, w0, w1


def resize_bilinear(images, size: tuple[int, int], xp: Any = jnp):
  """F.interpolate(mode="bilinear", align_corners=False) on NHWC images.

  images: float [N, H, W, C] -> [N, size[0], size[1], C]. xp is jnp (traced
  inside the network) or np (on the host, for batches of mixed sizes). Width
  is interpolated first, then height, as ATen's kernel sums its four taps.
  """
  _, height, width, _ = images.shape
  out_h, out_w = size
  if width != out_w:
    i0, i1, w0, w1 = _linear_taps(width, out_w)
    images = (xp.take(images, i0, axis=2) * w0[:, None]
              + xp.take(images, i1, axis=2) * w1[:, None])  # [N, H, out_w, C]
  if height != out_h:
    i0, i1, w0, w1 = _linear_taps(height, out_h)
    images = (xp.take(images, i0, axis=1) * w0[:, None, None]
              + xp.take(images, i1, axis=1) * w1[:, None, None])  # [N, out_h, out_w, C]
  return images


def as_rgb_uint8(images: Any) -> np.ndarray:
  """uint8 images -> [N, H, W, 3], as PIL's Image.convert("RGB") would.

  Grayscale [N, H, W] (W > 4) or [N, H, W, 1] is repeated to three
  channels; RGBA
  [N, H, W, 4] drops alpha (no compositing: PIL drops it too, and
  pytorch-fid reads every file through convert("RGB")).
  """
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(
        f"Inception features take uint8 images (0..255), got dtype "
        f"{images.dtype}; convert first, e.g. np.clip(np.round(x * 255), 0, "
        "255).astype(np.uint8) for floats in [0, 1].")
  if images.ndim == 3 and images.shape[-1] in (3, 4):
    raise ValueError(
        f"Images have shape {images.shape}: one [H, W, C] image? Add the "
        "batch axis (images[None]); a grayscale batch is [N, H, W] with W > 4.")
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
    raise ValueError(
        f"Images have shape {images.shape}; expected [N, H, W, 3] (RGB), "
        "[N, H, W, 4] (RGBA), [N, H, W, 1] or [N, H, W] (grayscale).")
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  return images[..., :3]


# ---------------------------------------------------------------------------
# Network. Module and parameter names are torchvision's Inception3 names, so
# a state_dict key maps to a Flax path by its dots.


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm (inference, eps 1e-3) -> ReLU."""
  features: int
  kernel_size: tuple[int, int] = (1, 1)
  strides: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)  # torch's padding=(ph, pw): symmetric.
  precision: Precision = "highest"

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel_size, self.strides,
                padding=((ph, ph), (pw, pw)), use_bias=False,
                precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=_BN_EPS, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  # FID patch: TF's average pool ignores the zero padding.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  """Mixed_5b/5c/5d (FIDInceptionA): [N, 35, 35, C] -> [N, 35, 35, 224 + pool_features]."""
  pool_features: int
  precision: Precision = "highest"

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch1x1 = conv(64, name="branch1x1")(x)
    branch5x5 = conv(48, name="branch5x5_1")(x)
    branch5x5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(branch5x5)
    branch3x3dbl = conv(64, name="branch3x3dbl_1")(x)
    branch3x3dbl = conv(96, (3, 3), padding=(1, 1),
                        name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = conv(96, (3, 3), padding=(1, 1),
                        name="branch3x3dbl_3")(branch3x3dbl)
    branch_pool = conv(self.pool_features, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool],
                           axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: [N, 35, 35, 288] -> [N, 17, 17, 768]."""
  precision: Precision = "highest"

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch3x3 = conv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
    branch3x3dbl = conv(64, name="branch3x3dbl_1")(x)
    branch3x3dbl = conv(96, (3, 3), padding=(1, 1),
                        name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = conv(96, (3, 3), strides=(2, 2),
                        name="branch3x3dbl_3")(branch3x3dbl)
    branch_pool = _max_pool_3x3_s2(x)
    return jnp.concatenate([branch3x3, branch3x3dbl, branch_pool], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b-6e (FIDInceptionC): [N, 17, 17, 768] -> [N, 17, 17, 768]."""
  channels_7x7: int
  precision: Precision = "highest"

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    c7 = self.channels_7x7
    branch1x1 = conv(192, name="branch1x1")(x)
    branch7x7 = conv(c7, name="branch7x7_1")(x)
    branch7x7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(branch7x7)
    branch7x7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(branch7x7)
    branch7x7dbl = conv(c7, name="branch7x7dbl_1")(x)
    for i, (features, kernel, padding) in enumerate(
        [(c7, (7, 1), (3, 0)), (c7, (1, 7), (0, 3)),
         (c7, (7, 1), (3, 0)), (192, (1, 7), (0, 3))], start=2):
      branch7x7dbl = conv(features, kernel, padding=padding,
                          name=f"branch7x7dbl_{i}")(branch7x7dbl)
    branch_pool = conv(192, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool],
                           axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: [N, 17, 17, 768] -> [N, 8, 8, 1280]."""
  precision: Precision = "highest"

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch3x3 = conv(192, name="branch3x3_1")(x)
    branch3x3 = conv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(branch3x3)
    branch7x7x3 = conv(192, name="branch7x7x3_1")(x)
    branch7x7x3 = conv(192, (1, 7), padding=(0, 3),
                       name="branch7x7x3_2")(branch7x7x3)
    branch7x7x3 = conv(192, (7, 1), padding=(3, 0),
                       name="branch7x7x3_3")(branch7x7x3)
    branch7x7x3 = conv(192, (3, 3), strides=(2, 2),
                       name="branch7x7x3_4")(branch7x7x3)
    branch_pool = _max_pool_3x3_s2(x)
    return jnp.concatenate([branch3x3, branch7x7x3, branch_pool], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (FIDInceptionE_1, pool "avg") and Mixed_7c (FIDInceptionE_2,
  pool "max"): [N, 8, 8, C] -> [N, 8, 8, 2048]."""
  pool: str = "avg"
  precision: Precision = "highest"

  @nn.compact
  def __call__(self, x):
    if self.pool not in ("avg", "max"):
      raise ValueError(f"InceptionE.pool is {self.pool!r}; expected 'avg' "
                       "(Mixed_7b) or 'max' (Mixed_7c).")
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch1x1 = conv(320, name="branch1x1")(x)
    branch3x3 = conv(384, name="branch3x3_1")(x)
    branch3x3 = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(branch3x3),
        conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(branch3x3),
    ], axis=-1)  # [N, 8, 8, 768]
    branch3x3dbl = conv(448, name="branch3x3dbl_1")(x)
    branch3x3dbl = conv(384, (3, 3), padding=(1, 1),
                        name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(branch3x3dbl),
        conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(branch3x3dbl),
    ], axis=-1)  # [N, 8, 8, 768]
    if self.pool == "avg":
      pooled = _avg_pool_3x3(x)
    else:
      # FID patch: the TF graph max-pools here (likely a bug there; kept).
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    branch_pool = conv(192, name="branch_pool")(pooled)
    return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool],
                           axis=-1)


class FIDInceptionV3(nn.Module):
  """pytorch-fid's InceptionV3(resize_input=True, normalize_input=True) with
  the FID Inception: float [N, H, W, 3] in [0, 1] -> pool3 [N, 2048] (and
  the 1008-way logits of its fc layer with return_logits=True).

  precision: of every conv and the fc. "highest" keeps float32 on TPU/GPU
  (whose default passes are bf16/tf32), so FID does not depend on the chip;
  on CPU it costs nothing.
  """
  num_classes: int = NUM_CLASSES
  resize_input: bool = True
  normalize_input: bool = True
  precision: Precision = "highest"

  @nn.compact
  def __call__(self, images, return_logits: bool = False):
    x = images.astype(jnp.float32)  # [N, H, W, 3] in [0, 1]
    if self.resize_input:
      x = resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))  # [N, 299, 299, 3]
    if self.normalize_input:
      x = 2.0 * x - 1.0
    conv = functools.partial(BasicConv2d, precision=self.precision)
    p = self.precision
    x = conv(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)  # [N, 149, 149, 32]
    x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)  # [N, 147, 147, 32]
    x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)  # [N, 147, 147, 64]
    x = _max_pool_3x3_s2(x)  # [N, 73, 73, 64]
    x = conv(80, name="Conv2d_3b_1x1")(x)  # [N, 73, 73, 80]
    x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)  # [N, 71, 71, 192]
    x = _max_pool_3x3_s2(x)  # [N, 35, 35, 192]
    x = InceptionA(32, p, name="Mixed_5b")(x)  # [N, 35, 35, 256]
    x = InceptionA(64, p, name="Mixed_5c")(x)  # [N, 35, 35, 288]
    x = InceptionA(64, p, name="Mixed_5d")(x)  # [N, 35, 35, 288]
    x = InceptionB(p, name="Mixed_6a")(x)  # [N, 17, 17, 768]
    x = InceptionC(128, p, name="Mixed_6b")(x)
    x = InceptionC(160, p, name="Mixed_6c")(x)
    x = InceptionC(160, p, name="Mixed_6d")(x)
    x = InceptionC(192, p, name="Mixed_6e")(x)  # [N, 17, 17, 768]
    x = InceptionD(p, name="Mixed_7a")(x)  # [N, 8, 8, 1280]
    x = InceptionE("avg", p, name="Mixed_7b")(x)  # [N, 8, 8, 2048]
    x = InceptionE("max", p, name="Mixed_7c")(x)  # [N, 8, 8, 2048]
    pool3 = jnp.mean(x, axis=(1, 2))  # [N, 2048]: AdaptiveAvgPool2d((1, 1))
    if not return_logits:
      return pool3
    logits = nn.Dense(self.num_classes, precision=self.precision,
                      name="fc")(pool3)  # [N, 1008]
    return pool3, logits


# ---------------------------------------------------------------------------
# Weights.


@dataclasses.dataclass(frozen=True)
class Inception:
  """A FIDInceptionV3 and its variables ({"params", "batch_stats"})."""
  module: FIDInceptionV3
  variables: Any


@functools.cache
def _expected_tensors(module: FIDInceptionV3
                      ) -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]:
  """torch key -> (collection, Flax path, torch shape), in module order."""
  shapes = jax.eval_shape(
      functools.partial(module.init, return_logits=True), jax.random.key(0),
      jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
  expected = {}
  for collection in ("params", "batch_stats"):
    flat = traverse_util.flatten_dict(dict(shapes[collection]))
    for path, leaf in flat.items():
      *owner, name = path
      shape = tuple(leaf.shape)
      if name == "kernel" and len(shape) == 4:  # conv: HWIO <- OIHW
        torch_name, torch_shape = "weight", shape[::-1][:2] + shape[:2]
      elif name == "kernel":  # fc: [in, out] <- [out, in]
        torch_name, torch_shape = "weight", shape[::-1]
      else:
        torch_name = {"scale": "weight", "bias": "bias", "mean": "running_mean",
                      "var": "running_var"}[name]
        torch_shape = shape
      expected[".".join([*owner, torch_name])] = (collection, path, torch_shape)
  return expected


def _to_flax_layout(array: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
  if path[-1] == "kernel" and array.ndim == 4:
    return array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if path[-1] == "kernel":
    return array.T  # [out, in] -> [in, out]
  return array


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The tensors of a .pth state_dict (via torch, weights only) or .npz."""
  path = os.fspath(path)
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as npz:
      return {key: npz[key] for key in npz.files}
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"Reading {path} (a PyTorch file) needs torch. Convert it once where "
        "torch is installed with unimm.evaluation.inception.convert_to_npz("
        "pth, npz) and load the .npz, or pip install unimm[torch-ref].") from e
  # weights_only: refuses anything but tensors and plain containers.
  state = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(state, Mapping) and "state_dict" in state and isinstance(
      state["state_dict"], Mapping):
    state = state["state_dict"]
  if not isinstance(state, Mapping):
    raise ValueError(f"{path} holds a {type(state).__name__}; expected a "
                     f"state_dict (pytorch-fid's {WEIGHTS_FILE}).")
  tensors = {}
  for key, value in state.items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, "
                       "not a tensor; expected a plain state_dict.")
    tensors[key] = value.detach().cpu().numpy()
  return tensors


def variables_from_state_dict(state: Mapping[str, np.ndarray],
                              module: FIDInceptionV3, source: str = "weights"
                              ) -> dict[str, Any]:
  """torchvision Inception3 key names -> Flax variables, checking shapes.

  Raises ValueError naming the first tensor (in the file's order) whose
  shape differs, any unexpected tensor and any missing one.
  """
  expected = _expected_tensors(module)
  flat = {"params": {}, "batch_stats": {}}
  for key, value in state.items():
    if key.endswith("num_batches_tracked"):
      continue  # BatchNorm's training counter; unused at inference.
    if key not in expected:
      raise ValueError(
          f"{source}: unexpected tensor {key!r} {tuple(np.shape(value))}; the "
          f"FID Inception-v3 (pytorch-fid's {WEIGHTS_FILE}: torchvision "
          f"Inception3 with {module.num_classes} classes, no AuxLogits) has "
          "no such weight.")
    collection, path, torch_shape = expected[key]
    if tuple(np.shape(value)) != torch_shape:
      raise ValueError(
          f"{source}: tensor {key!r} has shape {tuple(np.shape(value))}, the "
          f"FID Inception-v3 expects {torch_shape}. Is this pytorch-fid's "
          f"{WEIGHTS_FILE}?")
    flat[collection][path] = _to_flax_layout(
        np.asarray(value, np.float32), path)
  missing = [key for key, (collection, path, _) in expected.items()
             if path not in flat[collection]]
  if missing:
    raise ValueError(
        f"{source}: {len(missing)} tensor(s) missing, first {missing[:3]}; "
        f"expected all {len(expected)} of pytorch-fid's {WEIGHTS_FILE}.")
  return {c: traverse_util.unflatten_dict(v) for c, v in flat.items()}


def load_inception(path: str | os.PathLike, *,
                   precision: Precision = "highest") -> Inception:
  """The FID Inception from pytorch-fid's .pth (needs torch) or its .npz."""
  module = FIDInceptionV3(precision=precision)
  variables = variables_from_state_dict(read_state_dict(path), module,
                                        source=os.fspath(path))
  return Inception(module, jax.device_put(variables))


def convert_to_npz(pth_path: str | os.PathLike,
                   npz_path: str | os.PathLike) -> None:
  """Writes a .pth state_dict's tensors to .npz (same keys), checked first,
  so machines without torch can load_inception the .npz."""
  state = read_state_dict(pth_path)
  variables_from_state_dict(state, FIDInceptionV3(), source=os.fspath(pth_path))
  np.savez(npz_path, **state)


# ---------------------------------------------------------------------------
# Features.


@functools.partial(jax.jit, static_argnums=0)
def _pool3(module: FIDInceptionV3, variables, images):
  """uint8 [B, H, W, 3] (or float32 in [0, 1]) -> float32 [B, 2048]."""
  if images.dtype == jnp.uint8:
    images = images.astype(jnp.float32) / 255.0  # torchvision ToTensor.
  return module.apply(variables, images)


def padded_batches(images: np.ndarray, batch_size: int):
  """Yields (batch padded to batch_size, number of real rows)."""
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    count = len(batch)
    if count < batch_size:
      pad = np.zeros((batch_size - count, *batch.shape[1:]), batch.dtype)
      batch = np.concatenate([batch, pad])
    yield batch, count


def batch_sharding(batch_size: int) -> jax.sharding.NamedSharding:
  """Splits a batch over this host's devices (the most that divide it)."""
  devices = jax.local_devices()
  n = len(devices)
  while n > 1 and batch_size % n:
    n -= 1
  mesh = jax.sharding.Mesh(np.array(devices[:n]), ("batch",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))


def iter_features(net: Inception, batches, progress: Progress | None = None):
  """Yields pool3 features [count, 2048] (float32, numpy) of each (batch,
  count) pair, keeping one batch in flight ahead of the host. Each batch is
  split over the host's devices (weights replicated)."""
  pending, done, placed = None, 0, None
  for batch, count in batches:
    if placed is None or placed[0] != len(batch):
      sharding = batch_sharding(len(batch))
      replicated = jax.sharding.NamedSharding(sharding.mesh,
                                              jax.sharding.PartitionSpec())
      placed = (len(batch), sharding,
                jax.device_put(net.variables, replicated))
    batch = jax.device_put(batch, placed[1])
    features = _pool3(net.module, placed[2], batch)  # async dispatch
    if pending is not None:
      yield np.asarray(pending[0])[:pending[1]]
      done += pending[1]
      if progress:
        progress.update(done)
    pending = (features, count)
  if pending is not None:
    yield np.asarray(pending[0])[:pending[1]]
    done += pending[1]
  if progress:
    progress.finish(done)  # a closing line for long runs


def inception_features(net: Inception, images: Any, batch_size: int = 50
                       ) -> np.ndarray:
  """pool3 features, float32 [N, 2048], of uint8 images [N, H, W, C].

  C is 3 (RGB), 4 (RGBA: alpha dropped) or 1 / absent (grayscale: repeated);
  any H, W (resized to 299x299 inside the network). Runs jitted batches of
  min(batch_size, N) images (the last one zero-padded), split over the
  host's devices, logging progress and ETA every 10 s.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size is {batch_size}; expected >= 1.")
  images = as_rgb_uint8(images)
  batch_size = max(min(batch_size, len(images)), 1)
  progress = Progress(len(images), what="Inception features (images)")
  features = list(iter_features(net, padded_batches(images, batch_size),
                                progress))
  if not features:
    return np.zeros((0, FEATURE_DIM), np.float32)
  return np.concatenate(features)
