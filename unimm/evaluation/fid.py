"""Frechet Inception Distance, equal to pytorch-fid's on the same weights.

  net = fid.load_inception("pt_inception-2015-12-05-6726825d.pth")  # or .npz
  score = fid.fid_from_images(net, real_images, generated_images)
  mu, sigma = fid.compute_statistics(net, "path/to/folder")  # or batches
  fid.save_stats("real.npz", mu, sigma)  # pytorch-fid's --save-stats format
  score = fid.frechet_distance(*fid.load_stats("real.npz"), mu2, sigma2)

FID (Heusel et al. 2017, eq. 6) = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))
over the 2048-d pool3 features of the FID Inception (inception.py), with the
statistics and the distance in float64 as pytorch_fid.fid_score computes
them (np.cov rowvar=False, scipy.linalg.sqrtm).
"""
from __future__ import annotations

import io
import os
import pathlib
from collections.abc import Iterable
from typing import Any

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
import scipy.linalg

from unimm.evaluation.inception import INPUT_SIZE
from unimm.evaluation.inception import Inception
from unimm.evaluation.inception import as_rgb_uint8
from unimm.evaluation.inception import iter_features
from unimm.evaluation.inception import convert_to_npz  # re-exported
from unimm.evaluation.inception import inception_features  # re-exported
from unimm.evaluation.inception import load_inception  # re-exported
from unimm.evaluation.inception import padded_batches
from unimm.evaluation.inception import resize_bilinear
from unimm.progress import Progress

__all__ = [
    "RunningStats", "compute_statistics", "convert_to_npz", "fid_from_images",
    "frechet_distance", "inception_features", "load_inception", "load_stats",
    "save_stats",
]

# pytorch-fid's fid_score.IMAGE_EXTENSIONS (matched here case-insensitively).
IMAGE_EXTENSIONS = frozenset(
    {"bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp"})
_TOO_FEW = "FID is undefined for fewer than 2 images"


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any,
                     eps: float = 1e-6) -> float:
  """Frechet distance of N(mu1, sigma1) and N(mu2, sigma2), float64.

  As pytorch_fid.fid_score.calculate_frechet_distance: the square root of
  sigma1 @ sigma2 by scipy.linalg.sqrtm; if it is not finite (a singular
  product) it is retaken with eps*I added to both covariances; a complex
  root's imaginary part is dropped, unless its diagonal exceeds 1e-3, which
  raises ValueError. Not clamped at 0.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(
      np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(
      np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or mu1.ndim != 1:
    raise ValueError(f"Means have shapes {mu1.shape} and {mu2.shape}; "
                     "expected two vectors [D] of the same length.")
  if sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(
        f"Covariances have shapes {sigma1.shape} and {sigma2.shape}; expected "
        f"two [D, D] matrices with D = {mu1.shape[0]} (the means' length).")
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    logging.warning("FID: sqrtm of the covariance product is not finite "
                    "(singular product); adding %s to the diagonals.", eps)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(
          "FID: the square root of the covariance product has an imaginary "
          f"component of {np.max(np.abs(covmean.imag)):.3g} (> 1e-3 on the "
          "diagonal); the covariances are not valid (symmetric PSD) or too "
          "ill-conditioned. Use more images.")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
               - 2.0 * np.trace(covmean))


class RunningStats:
  """Streaming mean and covariance of feature rows, in float64.

  Merges batches exactly (Chan et al. 1979, pairwise update), so `mean` and
  `covariance` equal np.mean(axis=0) and np.cov(rowvar=False) (ddof=1) of
  all rows seen, without keeping them.
  """

  def __init__(self):
    self.count = 0
    self._mean: np.ndarray | None = None  # [D]
    self._m2: np.ndarray | None = None  # [D, D]: sum of centred outer products

  def update(self, features: Any) -> None:
    """Adds rows features [B, D]."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2:
      raise ValueError(f"Features have shape {x.shape}; expected [B, D].")
    if self._mean is not None and x.shape[1] != self._mean.shape[0]:
      raise ValueError(f"Features have {x.shape[1]} dims; earlier updates "
                       f"had {self._mean.shape[0]}.")
    if not len(x):
      return
    mean = x.mean(axis=0)
    centred = x - mean
    m2 = centred.T @ centred
    if self._mean is None:
      self.count, self._mean, self._m2 = len(x), mean, m2
      return
    total = self.count + len(x)
    delta = mean - self._mean
    self._mean = self._mean + delta * (len(x) / total)
    self._m2 = self._m2 + m2 + np.outer(delta, delta) * (
        self.count * len(x) / total)
    self.count = total

  def _check(self) -> None:
    if self.count < 2:
      raise ValueError(f"{_TOO_FEW}: got {self.count}; a covariance needs "
                       "at least 2 (FID needs many more, e.g. 10k).")

  @property
  def mean(self) -> np.ndarray:
    self._check()
    return self._mean.copy()

  @property
  def covariance(self) -> np.ndarray:
    self._check()
    return self._m2 / (self.count - 1)


def save_stats(path: str | os.PathLike, mu: Any, sigma: Any) -> None:
  """Writes pytorch-fid's statistics file: .npz with keys mu and sigma
  (any epath path: local or gs://)."""
  buffer = io.BytesIO()
  np.savez_compressed(buffer, mu=np.asarray(mu), sigma=np.asarray(sigma))
  epath.Path(path).write_bytes(buffer.getvalue())


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """(mu [D], sigma [D, D]) from a pytorch-fid .npz statistics file."""
  with np.load(io.BytesIO(epath.Path(path).read_bytes()),
               allow_pickle=False) as npz:
    if "mu" not in npz.files or "sigma" not in npz.files:
      raise ValueError(f"{path} has arrays {npz.files}; an FID statistics "
                       "file (pytorch-fid --save-stats) has mu and sigma.")
    mu, sigma = npz["mu"], npz["sigma"]
  if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
    raise ValueError(f"{path}: mu {mu.shape}, sigma {sigma.shape}; expected "
                     "[D] and [D, D].")
  return mu, sigma


def _image_files(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in folder.iterdir() if p.is_file()
                and p.suffix[1:].lower() in IMAGE_EXTENSIONS)


def _read_rgb(path: pathlib.Path) -> np.ndarray:
  # Pillow's decompression-bomb guard stays on.
  with Image.open(path) as image:
    return np.asarray(image.convert("RGB"), np.uint8)  # [H, W, 3]


def _folder_batches(files: list[pathlib.Path], batch_size: int):
  """(batch, count) of a folder's images. Batches of one size go to the
  network as uint8 (resized inside, one program per size: the first
  batch's); others are resized to 299x299 on the host with the same
  bilinear taps and sent as float [0, 1], so mixed sizes compile once more
  at most."""
  first_shape = None
  for start in range(0, len(files), batch_size):
    images = [_read_rgb(p) for p in files[start:start + batch_size]]
    first_shape = first_shape or images[0].shape
    if all(image.shape == first_shape for image in images):
      batch = np.stack(images)  # [b, H, W, 3] uint8
    else:
      batch = np.concatenate([
          resize_bilinear(image[None].astype(np.float32) / np.float32(255),
                          (INPUT_SIZE, INPUT_SIZE), xp=np)
          for image in images])  # [b, 299, 299, 3] float32 in [0, 1]
    yield from padded_batches(batch, batch_size)


def _iterator_batches(batches: Iterable[Any], batch_size: int):
  """(batch, count) of uint8 batches, regrouped to batch_size (padded)."""
  for images in batches:
    yield from padded_batches(as_rgb_uint8(images), batch_size)


def compute_statistics(net: Inception, source: Any, batch_size: int = 50
                       ) -> tuple[np.ndarray, np.ndarray]:
  """(mu [2048], sigma [2048, 2048]) float64 of the pool3 features of
  `source`: uint8 images [N, H, W, C], an iterable of such batches, a
  folder of images (pytorch-fid's extensions; any sizes, read as
  PIL convert("RGB")), or a .npz statistics file (loaded as is)."""
  if batch_size < 1:
    raise ValueError(f"batch_size is {batch_size}; expected >= 1.")
  stats = RunningStats()
  if isinstance(source, (str, os.PathLike)):
    path = pathlib.Path(source)
    if path.suffix == ".npz" and path.is_file():
      return load_stats(path)
    if not path.is_dir():
      raise ValueError(f"FID source {path} is neither a folder of images "
                       "nor a .npz statistics file.")
    files = _image_files(path)
    if len(files) < 2:
      raise ValueError(f"{_TOO_FEW}: {path} has {len(files)} image(s) with "
                       f"extensions {sorted(IMAGE_EXTENSIONS)}.")
    batches = _folder_batches(files, batch_size)
    progress = Progress(len(files), what=f"FID statistics of {path} (images)")
  elif isinstance(source, np.ndarray):
    images = as_rgb_uint8(source)
    if len(images) < 2:
      raise ValueError(f"{_TOO_FEW}: got {len(images)}.")
    batch_size = min(batch_size, len(images))
    batches = _iterator_batches([images], batch_size)
    progress = Progress(len(images), what="FID statistics (images)")
  else:
    batches = _iterator_batches(source, batch_size)
    progress = Progress(None, what="FID statistics (images)")
  for features in iter_features(net, batches, progress):
    stats.update(features)  # streaming: features are not kept
  return stats.mean, stats.covariance


def fid_from_images(net: Inception, images_a: Any, images_b: Any,
                    batch_size: int = 50) -> float:
  """FID between two sets of uint8 images [N, H, W, C] (or anything
  compute_statistics takes)."""
  for name, images in (("images_a", images_a), ("images_b", images_b)):
    if isinstance(images, np.ndarray) and len(images) < 2:
      raise ValueError(f"{_TOO_FEW}: {name} has {len(images)}.")
  mu1, sigma1 = compute_statistics(net, images_a, batch_size)
  mu2, sigma2 = compute_statistics(net, images_b, batch_size)
  return frechet_distance(mu1, sigma1, mu2, sigma2)

