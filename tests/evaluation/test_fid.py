"""FID parity with pytorch-fid: network features, statistics, distance.

The reference (reference_fid_inception.py) is pytorch-fid's network and
calculate_frechet_distance rebuilt without torchvision, with seeded random
weights whose batch-norm statistics are calibrated on images first (random
running statistics would blow activations up or collapse them).
"""
import os
import sys

import numpy as np
from PIL import Image
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from unimm.evaluation import fid
from unimm.evaluation import inception

sys.path.insert(0, os.path.dirname(__file__))
import reference_fid_inception as ref  # pylint: disable=g-import-not-at-top

BATCH = 4  # one compiled program per image size


def _images(n: int, height: int, width: int, seed: int,
            noise: float = 0.4) -> np.ndarray:
  """Structured uint8 [n, height, width, 3]: coloured ramps, a bright box
  and noise, so features vary between images and within them."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width] / max(height, width)
  ramps = np.stack([x, y, x * y], axis=-1)[None]  # [1, H, W, 3]
  images = rng.uniform(0.2, 1, (n, 1, 1, 3)) * ramps
  for i in range(n):
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    images[i, top:top + height // 3, left:left + width // 3] += rng.uniform(
        0.3, 0.8, 3)
  images = 0.6 * images + noise * rng.uniform(0, 1, images.shape)
  return np.clip(255 * images, 0, 255).astype(np.uint8)


def _relative(actual, expected) -> float:
  actual, expected = np.asarray(actual), np.asarray(expected)
  return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module", autouse=True)
def _torch_one_thread():
  """On two shared cores torch's OpenMP threads spin against each other and
  the rest of the machine (~8x slower than one thread here)."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference():
  """pytorch-fid's InceptionV3 with random weights, BN calibrated."""
  torch.manual_seed(0)
  model = ref.InceptionV3()
  for name, module in model.inception.named_modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      # Random affine so the loader's scale/bias mapping matters; the last
      # block is damped so features (and FID) have realistic magnitudes.
      damp = 0.05 if name.startswith("Mixed_7c") else 1.0
      torch.nn.init.uniform_(module.weight, 0.5 * damp, 1.5 * damp)
      torch.nn.init.normal_(module.bias, 0.0, 0.2 * damp)
      module.momentum = None  # running stats = average over calibration
  # Calibrate on both sizes and noise levels the tests use: BN statistics
  # far from an input's own make its activations cancel in float32, and
  # then both implementations are off the float64 truth by ~1e-4.
  model.train()
  with torch.no_grad():
    for images in (_images(4, 64, 64, seed=100),
                   _images(3, 37, 53, seed=101, noise=0.1)):
      model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
  return model.eval()


@pytest.fixture(scope="module")
def weights_path(reference, tmp_path_factory):
  path = tmp_path_factory.mktemp("inception") / inception.WEIGHTS_FILE
  torch.save(reference.inception.state_dict(), path)
  return path


@pytest.fixture(scope="module")
def net(weights_path):
  return inception.load_inception(weights_path)


@pytest.fixture(scope="module")
def square_images():
  return _images(BATCH, 64, 64, seed=1)  # [4, 64, 64, 3]


@pytest.fixture(scope="module")
def square_features(net, square_images):
  return inception.inception_features(net, square_images, batch_size=BATCH)


@pytest.fixture(scope="module")
def square_reference(reference, square_images):
  return ref.get_activations(reference, square_images)  # float64 [4, 2048]


@pytest.fixture(scope="module")
def odd_images():
  return _images(2, 37, 53, seed=2)  # [2, 37, 53, 3]


@pytest.fixture(scope="module")
def odd_features(net, odd_images):
  return inception.inception_features(net, odd_images, batch_size=BATCH)


# ---------------------------------------------------------------------------
# Network.


@pytest.mark.parametrize("size", [(37, 53), (64, 64), (400, 320), (299, 299)])
def test_resize_matches_torch_interpolate(size):
  images = np.random.default_rng(0).uniform(0, 1, (2, *size, 3)).astype(
      np.float32)
  expected = F.interpolate(
      torch.from_numpy(images).permute(0, 3, 1, 2), size=(299, 299),
      mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
  for xp in (np, inception.jnp):
    actual = np.asarray(inception.resize_bilinear(images, (299, 299), xp=xp))
    assert actual.shape == (2, 299, 299, 3)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=2.5e-7)


def test_features_match_reference(reference, net, square_images,
                                  square_features, square_reference,
                                  odd_images, odd_features):
  for images, features, expected in (
      (square_images, square_features, square_reference),
      (odd_images, odd_features, ref.get_activations(reference, odd_images))):
    assert features.shape == (len(images), 2048)
    assert features.dtype == np.float32
    assert np.abs(expected).max() > 0.05 and expected.std() > 0.01
    error = _relative(features, expected)
    print(f"pool3 {images.shape}: max|diff|/max|ref| = {error:.2e}")
    assert error <= 1e-4
  # The 1008-way fc is loaded in the right layout too.
  fc = net.variables["params"]["fc"]
  logits = square_features @ np.asarray(fc["kernel"]) + np.asarray(fc["bias"])
  with torch.no_grad():
    expected = reference.inception.fc(torch.from_numpy(square_features))
  assert _relative(logits, expected.numpy()) <= 1e-5


def test_npz_route_gives_identical_features(weights_path, tmp_path,
                                            square_images, square_features):
  npz_path = tmp_path / "inception.npz"
  inception.convert_to_npz(weights_path, npz_path)
  with np.load(npz_path) as npz:
    assert "Mixed_5b.branch1x1.conv.weight" in npz.files
  net_npz = fid.load_inception(npz_path)  # fid re-exports the loader
  features = fid.inception_features(net_npz, square_images, batch_size=BATCH)
  np.testing.assert_array_equal(features, square_features)


def test_grayscale_and_rgba_inputs(net, square_images, square_features):
  rgba = np.concatenate(
      [square_images, np.full((*square_images.shape[:3], 1), 7, np.uint8)],
      axis=-1)
  np.testing.assert_array_equal(
      inception.inception_features(net, rgba, batch_size=BATCH),
      square_features)
  gray = square_images[..., 1]  # [4, 64, 64]
  from_2d = inception.inception_features(net, gray, batch_size=BATCH)
  from_1 = inception.inception_features(net, gray[..., None],
                                        batch_size=BATCH)
  as_rgb = inception.inception_features(
      net, np.repeat(gray[..., None], 3, axis=-1), batch_size=BATCH)
  np.testing.assert_array_equal(from_2d, as_rgb)
  np.testing.assert_array_equal(from_1, as_rgb)
  with pytest.raises(ValueError, match="uint8"):
    inception.inception_features(net, square_images / 255.0)
  with pytest.raises(ValueError, match="batch axis"):
    inception.inception_features(net, square_images[0])  # one [H, W, 3]


def _state_dict(weights_path):
  return torch.load(weights_path, weights_only=True)


def test_wrong_weight_file_raises_naming_the_tensor(weights_path, tmp_path):
  state = _state_dict(weights_path)
  state["Mixed_6b.branch7x7_2.conv.weight"] = torch.zeros(128, 128, 7, 1)
  bad = tmp_path / "wrong_shape.pth"
  torch.save(state, bad)
  with pytest.raises(ValueError) as error:
    inception.load_inception(bad)
  message = str(error.value)
  assert "'Mixed_6b.branch7x7_2.conv.weight'" in message
  assert "(128, 128, 7, 1)" in message and "(128, 128, 1, 7)" in message

  state = _state_dict(weights_path)
  del state["Mixed_7c.branch_pool.bn.running_var"]
  torch.save(state, bad)
  with pytest.raises(ValueError, match="Mixed_7c.branch_pool.bn.running_var"):
    inception.load_inception(bad)

  state = _state_dict(weights_path)
  state["AuxLogits.fc.weight"] = torch.zeros(1008, 768)  # torchvision's aux
  torch.save(state, bad)
  with pytest.raises(ValueError, match="unexpected tensor 'AuxLogits"):
    inception.load_inception(bad)


# ---------------------------------------------------------------------------
# Statistics and distance.


def _stats(features):
  return np.mean(features, axis=0), np.cov(features, rowvar=False)


@pytest.mark.parametrize("num, dim", [(500, 64), (20, 64), (3, 16)])
def test_frechet_distance_matches_reference(num, dim):
  rng = np.random.default_rng(num)
  mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
  a = rng.normal(size=(num, dim)) @ mixing
  b = rng.normal(size=(num, dim)) @ (mixing + 0.3 * np.eye(dim)) + 0.2
  for x, y in ((a, b), (b, a), (a, a)):
    expected = ref.calculate_frechet_distance(*_stats(x), *_stats(y))
    actual = fid.frechet_distance(*_stats(x), *_stats(y))
    assert isinstance(actual, float)
    assert abs(actual - expected) <= 1e-6 * max(abs(expected), 1e-6), (
        actual, expected)


def test_frechet_distance_offset_and_imaginary_paths(monkeypatch):
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(40, 8)), rng.normal(size=(40, 8)) + 0.5
  sqrtm = scipy.linalg.sqrtm
  calls = []

  def failing_once(matrix, *args, **kwargs):
    """NaN on every first call: both must retry with eps*I added."""
    calls.append(matrix)
    if len(calls) % 2 == 1:
      root = np.full_like(matrix, np.nan)
      return (root, np.inf) if kwargs.get("disp") is False else root
    return sqrtm(matrix)

  monkeypatch.setattr(scipy.linalg, "sqrtm", failing_once)
  expected = ref.calculate_frechet_distance(*_stats(a), *_stats(b), eps=1e-2)
  actual = fid.frechet_distance(*_stats(a), *_stats(b), eps=1e-2)
  monkeypatch.setattr(scipy.linalg, "sqrtm", sqrtm)
  assert len(calls) == 4
  np.testing.assert_allclose(calls[1], calls[3])  # same offset product
  without_offset = fid.frechet_distance(*_stats(a), *_stats(b))
  assert abs(actual - expected) <= 1e-9 * abs(expected)
  assert abs(actual - without_offset) > 1e-6  # the offset was applied

  # A covariance that is not PSD: a large imaginary root, both raise.
  mu, sigma_bad = np.zeros(2), np.diag([-1.0, 1.0])
  with pytest.raises(ValueError, match="Imaginary component"):
    ref.calculate_frechet_distance(mu, np.eye(2), mu, sigma_bad)
  with pytest.raises(ValueError, match="imaginary component"):
    fid.frechet_distance(mu, np.eye(2), mu, sigma_bad)
  with pytest.raises(ValueError, match="Covariances have shapes"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))


def test_running_stats_equals_numpy():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(103, 32)).astype(np.float32) * 3 + 5
  stats = fid.RunningStats()
  for start, stop in ((0, 1), (1, 50), (50, 50), (50, 103)):
    stats.update(features[start:stop])
  assert stats.count == 103
  np.testing.assert_allclose(stats.mean, features.astype(np.float64).mean(0),
                             rtol=1e-12)
  np.testing.assert_allclose(stats.covariance,
                             np.cov(features.astype(np.float64),
                                    rowvar=False), rtol=1e-10, atol=1e-12)
  one = fid.RunningStats()
  one.update(features[:1])
  with pytest.raises(ValueError,
                     match="FID is undefined for fewer than 2 images"):
    one.covariance  # pylint: disable=pointless-statement


def test_one_image_raises(net, square_images, tmp_path):
  with pytest.raises(ValueError,
                     match="FID is undefined for fewer than 2 images"):
    fid.fid_from_images(net, square_images[:1], square_images)
  Image.fromarray(square_images[0]).save(tmp_path / "only.png")
  with pytest.raises(ValueError,
                     match="FID is undefined for fewer than 2 images"):
    fid.compute_statistics(net, tmp_path)


def test_stats_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  mu, sigma = rng.normal(size=16), np.cov(rng.normal(size=(40, 16)),
                                          rowvar=False)
  path = tmp_path / "stats.npz"
  fid.save_stats(path, mu, sigma)
  with np.load(path) as npz:  # pytorch-fid's reader
    np.testing.assert_array_equal(npz["mu"][:], mu)
    np.testing.assert_array_equal(npz["sigma"][:], sigma)
  loaded_mu, loaded_sigma = fid.load_stats(path)
  np.testing.assert_array_equal(loaded_mu, mu)
  np.testing.assert_array_equal(loaded_sigma, sigma)
  np.testing.assert_array_equal(fid.compute_statistics(None, path)[0], mu)
  np.savez(tmp_path / "other.npz", mean=mu)
  with pytest.raises(ValueError, match="has mu and sigma"):
    fid.load_stats(tmp_path / "other.npz")


def test_compute_statistics_from_folder_and_batches(
    net, square_images, square_features, odd_images, odd_features, tmp_path):
  # A folder of mixed sizes: uint8 batches of the first size, host-resized
  # batches otherwise (another XLA program: equal to float rounding, within
  # the network's parity tolerance).
  for i, image in enumerate([*square_images, *odd_images]):
    Image.fromarray(image).save(tmp_path / f"{i}.png")
  (tmp_path / "notes.txt").write_text("not an image")
  mu, sigma = fid.compute_statistics(net, tmp_path, batch_size=BATCH)
  expected_mu, expected_sigma = _stats(
      np.concatenate([square_features, odd_features]).astype(np.float64))
  assert _relative(mu, expected_mu) <= 1e-4
  assert _relative(sigma, expected_sigma) <= 1e-4
  # An iterator of uint8 batches of any length.
  batches = iter([square_images[:3], square_images[3:]])
  mu, sigma = fid.compute_statistics(net, batches, batch_size=BATCH)
  expected_mu, expected_sigma = _stats(square_features.astype(np.float64))
  np.testing.assert_allclose(mu, expected_mu, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-6, atol=1e-9)


def _low_rank_sqrtm(sqrtm):
  """scipy's sqrtm restricted to the span of a low-rank matrix.

  A product of covariances of n images has rank < n; with Q an orthonormal
  basis of its column and row spaces, A = Q (Q^T A Q) Q^T and its principal
  root is Q sqrtm(Q^T A Q) Q^T: the same root, in O(D^2) instead of the
  ~30-50 s a 2048 x 2048 sqrtm takes on this machine's two cores.
  """

  def low_rank(matrix, *args, **kwargs):
    del args
    probes = np.random.default_rng(0).normal(size=(len(matrix), 32))
    basis, _ = np.linalg.qr(np.concatenate([matrix @ probes,
                                            matrix.T @ probes], axis=1))
    small = basis.T @ matrix @ basis  # [64, 64]
    assert np.linalg.norm(basis @ small @ basis.T - matrix) <= (
        1e-9 * np.linalg.norm(matrix)), "matrix is not low-rank"
    root = basis @ sqrtm(small) @ basis.T
    return (root, 0.0) if kwargs.get("disp") is False else root

  return low_rank


def test_fid_of_image_sets_matches_reference(reference, net, square_images,
                                             square_reference, monkeypatch):
  images_b = _images(BATCH, 64, 64, seed=3, noise=0.1)
  monkeypatch.setattr(scipy.linalg, "sqrtm",
                      _low_rank_sqrtm(scipy.linalg.sqrtm))
  actual = fid.fid_from_images(net, square_images, images_b,
                               batch_size=BATCH)
  expected = ref.calculate_frechet_distance(
      *ref.calculate_activation_statistics(square_reference),
      *ref.calculate_activation_statistics(
          ref.get_activations(reference, images_b)))
  print(f"FID unimm {actual:.6f} reference {expected:.6f}")
  assert 1 < expected < 1e4  # a realistic magnitude, not a collapsed net
  assert abs(actual - expected) <= 1e-3
