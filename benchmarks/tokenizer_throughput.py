r"""ViT-VQGAN training throughput and model FLOP utilisation on this machine.

  python benchmarks/tokenizer_throughput.py [--config configs/vit_vqgan_shapes.py]

Prints, from one run: the measured f32 matmul peak, the train step's compile
time, images/s, the step's FLOPs (XLA's count: generator + discriminator,
forward + backward) and model FLOP/s as a fraction of the matmul peak.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
from ml_collections import config_flags

import common
from unimm import host_memory
from unimm import parallel
from unimm.train import tasks
from unimm.train import trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/vit_vqgan_shapes.py", "Tokenizer config.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed train steps.")


def main(_):
  config = _CONFIG.value
  peak = common.matmul_peak_flops()
  task = tasks.get_task(config)
  iterator = iter(task.train_data(0, 1))
  batches = [trainer.device_batch(next(iterator)) for _ in range(4)]
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          batches[0])
  program = trainer.build_program(config, task, abstract)
  with jax.set_mesh(program.mesh):
    state = program.jit_init(jax.random.PRNGKey(0), batches[0])
    start = time.perf_counter()
    compiled = program.train_step.lower(program.abstract_state,
                                        program.abstract_batch).compile()
    compile_s = time.perf_counter() - start
    flops = common.compiled_flops(compiled)
    device_batches = [parallel.host_batch_to_global(b, program.batch_sharding)
                      for b in batches]
    for b in device_batches[:2]:  # warm-up
      state, metrics = compiled(state, b)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for i in range(_STEPS.value):
      state, metrics = compiled(state, device_batches[i % len(device_batches)])
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / _STEPS.value
  batch_size = jax.tree.leaves(batches[0])[0].shape[0]
  print(f"devices                  {jax.device_count()} x "
        f"{jax.devices()[0].platform}")
  print(f"f32 matmul peak          {peak / 1e9:.1f} GFLOP/s")
  print(f"train step compile       {compile_s:.1f} s")
  print(f"train step time          {step_s * 1e3:.1f} ms (batch {batch_size})")
  print(f"throughput               {batch_size / step_s:.1f} images/s")
  print(f"FLOPs per step (XLA)     {flops / 1e9:.2f} GFLOP")
  print(f"model FLOP/s             {flops / step_s / 1e9:.1f} GFLOP/s = "
        f"{flops / step_s / peak:.1%} of the matmul peak")


if __name__ == "__main__":
  host_memory.keep_freed_memory()
  app.run(main)
