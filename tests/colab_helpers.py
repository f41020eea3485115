"""Running the Colab demos in tests (one test file per notebook, so the
test workers share them out)."""
import os
import re

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(name, tmp_path, **env):
  old = dict(os.environ)
  os.environ.update(env)
  try:
    with open(os.path.join(REPO, "colabs", name)) as f:
      nb = nbformat.read(f, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
  finally:
    os.environ.clear()
    os.environ.update(old)
  return nb


def run_quick(name, tmp_path, *, steps: int, one_device: bool = False,
              **env):
  """Runs a notebook in its quick mode: `steps` training steps on
  shapes_small, data and an untrained probe (seed_untrained_probe) under
  tmp_path/data; one_device: one CPU device, as on a Colab CPU runtime (8
  simulated devices cost ~30 s more in compiles and checkpoint copies)."""
  data_dir = str(tmp_path / "data")
  seed_untrained_probe(data_dir)
  env.update(UNIMM_COLAB_STEPS=str(steps), UNIMM_COLAB_SOURCE="shapes_small",
             UNIMM_DATA_DIR=data_dir)
  if one_device:  # the suite's XLA flags (tests/conftest.py), one device
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+",
                              "--xla_force_host_platform_device_count=1",
                              os.environ.get("XLA_FLAGS", ""))
  return run(name, tmp_path, **env)


def images(nb):
  """The PNG outputs of a run notebook, in order."""
  return [out for cell in nb.cells if cell.cell_type == "code"
          for out in cell.outputs if "image/png" in out.get("data", {})]


def text(nb):
  return "\n".join(out.get("text", "") for cell in nb.cells
                   if cell.cell_type == "code" for out in cell.outputs)


def seed_untrained_probe(data_dir):
  """Saves a random-weight shapes probe where probe.get_probe looks for it
  ($UNIMM_DATA_DIR/probe/v{PROBE_VERSION}_32px), so the notebook's kernel
  loads it instead of training the real one for minutes (as
  tests/train/test_parti_task.py's use_pixel_probe does in-process)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from unimm.evaluation import probe as probe_lib  # pylint: disable=g-import-not-at-top
  net = probe_lib.ProbeNet(image_size=32, width=4, cell_feature_dim=8)
  # Shapes only (eval_shape compiles nothing): this process needs no probe.
  shapes = jax.eval_shape(net.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32))
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda s: rng.normal(0, 0.1, s.shape).astype(s.dtype),
      shapes["params"])
  probe_lib.Probe(net, params).save(os.path.join(
      data_dir, "probe", f"v{probe_lib.PROBE_VERSION}_32px"))
