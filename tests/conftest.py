"""Test set-up: 8 simulated CPU devices so sharding tests see a real mesh."""
import os

# Must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow (pulled in by clu/tfds) must not grab the GPU or all CPU threads.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from absl import flags  # noqa: E402

from unimm import host_memory  # noqa: E402

# As the entry points do: reuse freed host memory (unimm/host_memory.py).
host_memory.keep_freed_memory()

# grain worker processes read absl flags; tests do not go through app.run.
flags.FLAGS.mark_as_parsed()
