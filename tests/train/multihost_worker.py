"""One process of a multi-host toy run (tests/train/test_multihost.py).

  UNIMM_COORDINATOR_ADDRESS=localhost:PORT UNIMM_NUM_PROCESSES=2 \\
  UNIMM_PROCESS_ID=i XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
      python multihost_worker.py WORKDIR

Trains the toy task to step 4 (checkpoints at 2 and 4), then starts training
again with total_steps=6, which restores step 4 (parameters, optimizer and
each host's data iterator) and continues. Process 0 writes the final
parameters, gathered from both hosts, to WORKDIR/final_params.npz.
"""
import os
import sys

from absl import flags

flags.FLAGS.mark_as_parsed()  # grain reads absl flags.

from unimm import parallel  # noqa: E402

parallel.initialize_distributed()  # Before anything touches jax devices.

import jax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
import numpy as np  # noqa: E402

from unimm.train import trainer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import toy_task  # noqa: E402

RUN = dict(checkpoint_every_steps=2, log_every_steps=2, eval_every_steps=0)


def main(workdir: str) -> None:
  assert jax.process_count() == 2 and jax.local_device_count() == 4, (
      jax.process_count(), jax.local_device_count())
  config = toy_task.make_config(total_steps=4, **RUN)
  trainer.train(config, workdir, toy_task.ToyTask(config))
  config = toy_task.make_config(total_steps=6, **RUN)
  state = trainer.train(config, workdir, toy_task.ToyTask(config))
  params = multihost_utils.process_allgather(state.params, tiled=True)
  if jax.process_index() == 0:
    flat = {jax.tree_util.keystr(path): np.asarray(x) for path, x in
            jax.tree_util.tree_leaves_with_path(params)}
    np.savez(os.path.join(workdir, "final_params.npz"), **flat)
  print(f"PROCESS {jax.process_index()} DONE AT STEP {int(state.step)}",
        flush=True)


if __name__ == "__main__":
  main(sys.argv[1])
