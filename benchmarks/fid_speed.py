r"""FID Inception throughput: unimm (JAX, jitted) vs the PyTorch reference.

  python benchmarks/fid_speed.py [--batch 32] [--num_batches 3] [--threads 2]

Both run pytorch-fid's network (tests/evaluation/reference_fid_inception.py
for torch, unimm.evaluation.inception for JAX) with the same seeded random
weights on the same uint8 images: resize to 299x299, normalize, Inception,
pool3. Each side gets one warm-up batch (compile / oneDNN set-up), then
--num_batches timed batches; prints images/s side by side and the ratio,
plus the features' max relative difference as a sanity check.
"""
import os
import sys
import time

from absl import app
from absl import flags

_BATCH = flags.DEFINE_integer("batch", 32, "Images per batch.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 3, "Timed batches.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64,
                                   "Input images are image_size^2 uint8.")
_THREADS = flags.DEFINE_integer(
    "threads", 0, "CPU cores for both (pins the process; sets torch's "
    "threads). 0: leave both at their defaults.")

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(n: int, size: int, seed: int):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:size, 0:size] / size
  ramps = np.stack([x, y, x * y], axis=-1)[None]
  images = 0.6 * rng.uniform(0.2, 1, (n, 1, 1, 3)) * ramps + 0.4 * rng.uniform(
      0, 1, (n, size, size, 3))
  return (255 * images).astype(np.uint8)


def main(argv):
  del argv
  if _THREADS.value:
    # Before jax/torch start their thread pools (XLA sizes its pool by the
    # cores this process may use).
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:_THREADS.value])
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  import torch
  sys.path.insert(0, os.path.join(_REPO, "tests", "evaluation"))
  import reference_fid_inception as ref
  from unimm.evaluation import inception
  # pylint: enable=g-import-not-at-top
  if _THREADS.value:
    torch.set_num_threads(_THREADS.value)

  batch, num_batches = _BATCH.value, _NUM_BATCHES.value
  images = [_images(batch, _IMAGE_SIZE.value, seed=i)
            for i in range(num_batches + 1)]
  torch.manual_seed(0)
  model = ref.InceptionV3()
  for module in model.modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      module.momentum = None
  model.train()  # calibrate BN: default running stats would underflow
  with torch.no_grad():  # activations into (slow) denormals
    model(torch.from_numpy(images[0][:8]).permute(0, 3, 1, 2).float() / 255)
  model.eval()
  path = "/tmp/unimm_fid_speed_weights.pth"
  torch.save(model.inception.state_dict(), path)
  net = inception.load_inception(path)
  os.remove(path)

  def run_jax(x):
    return jax.block_until_ready(
        inception._pool3(net.module, net.variables, x))  # pylint: disable=protected-access

  def run_torch(x):
    with torch.no_grad():
      return model(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)

  results = {}
  for name, run in (("unimm (JAX)", run_jax), ("torch reference", run_torch)):
    start = time.perf_counter()
    run(images[0])
    warmup = time.perf_counter() - start
    times, outputs = [], []
    for x in images[1:]:
      start = time.perf_counter()
      outputs.append(np.asarray(run(x)))
      times.append(time.perf_counter() - start)
    results[name] = (warmup, float(np.median(times)), np.concatenate(outputs))

  (_, jax_s, jax_out), (_, torch_s, torch_out) = results.values()
  difference = np.abs(jax_out - torch_out).max() / np.abs(torch_out).max()
  print(f"\nFID Inception pool3: {num_batches} x {batch} uint8 "
        f"{_IMAGE_SIZE.value}x{_IMAGE_SIZE.value} -> 299x299 -> [N, 2048]; "
        f"threads: {_THREADS.value or 'default'}; {jax.devices()[0].platform}")
  print(f"{'':18}{'warm-up s':>10}{'s/batch':>10}{'images/s':>10}")
  for name, (warmup, seconds, _) in results.items():
    print(f"{name:18}{warmup:10.2f}{seconds:10.3f}{batch / seconds:10.1f}")
  print(f"unimm / torch images/s: {torch_s / jax_s:.2f}x; features max "
        f"|diff| / max |torch|: {difference:.1e}")


if __name__ == "__main__":
  from unimm import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.keep_freed_memory()
  app.run(main)
