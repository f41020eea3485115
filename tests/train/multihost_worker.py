"""One process of a multi-host run (tests/train/test_multihost.py).

  UNIMM_COORDINATOR_ADDRESS=localhost:PORT UNIMM_NUM_PROCESSES=2 \\
  UNIMM_PROCESS_ID=i XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
      python multihost_worker.py WORKDIR [TOKENIZER_WORKDIR DATA_DIR]

Trains the toy task (or, given a tokenizer workdir and its shapes data, a
real one: the diffusion de-tokenizer, whose image pipeline each host reads
its share of) to step 4 (checkpoints at 2 and 4), then starts training
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


def run(workdir: str, total_steps: int, real=None):
  """trainer.train on the toy task, or with real=(tokenizer_workdir,
  data_dir) on the tiny de-tokenizer (fsdp=2, tensor=2: parameters sharded
  across the hosts too)."""
  if real is None:
    config = toy_task.make_config(total_steps=total_steps, **RUN)
    return trainer.train(config, workdir, toy_task.ToyTask(config))
  import test_detokenizer_task  # pylint: disable=g-import-not-at-top
  from unimm.train.detokenizer_task import DetokenizerTask  # pylint: disable=g-import-not-at-top
  config = test_detokenizer_task.tiny_config(*real, probe=0)
  config.update(total_steps=total_steps, **RUN)
  config.mesh.update(data=-1, fsdp=2, tensor=2)
  config.eval.num_images = 8
  return trainer.train(config, workdir, DetokenizerTask(config))


def main(workdir: str, real=None) -> None:
  assert jax.process_count() == 2 and jax.local_device_count() == 4, (
      jax.process_count(), jax.local_device_count())
  run(workdir, 4, real)
  state = run(workdir, 6, real)
  params = multihost_utils.process_allgather(state.params, tiled=True)
  if jax.process_index() == 0:
    flat = {jax.tree_util.keystr(path): np.asarray(x) for path, x in
            jax.tree_util.tree_leaves_with_path(params)}
    np.savez(os.path.join(workdir, "final_params.npz"), **flat)
  print(f"PROCESS {jax.process_index()} DONE AT STEP {int(state.step)}",
        flush=True)


if __name__ == "__main__":
  main(sys.argv[1], tuple(sys.argv[2:4]) or None)
