"""Ahead-of-time planner: will a config fit a TPU slice, and how many FLOPs?

  python -m unimm.plan --config configs/parti_plan.py:size=20b --mesh fsdp=256
  python -m unimm.plan --config configs/vit_vqgan_plan.py:size=base \\
      --mesh data=4,fsdp=2 --json
  python -m unimm.plan --table            # smallest v4 / v5p / v5e slices

Lowers and compiles the train step (trainer.build_program: the same
jax.jit with shardings that training runs) and, for Parti, the sampler, on a
mesh of simulated CPU devices. Nothing is allocated: the state and the batch
are ShapeDtypeStructs with shardings (jax.eval_shape of the init). The
device count is forced with XLA_FLAGS=--xla_force_host_platform_device_count
before jax starts its backend (the planner re-executes itself if jax
already runs with a different number of devices). No data or tokenizer
files are read: the batch shape comes from the config
(config.data.batch_size, config.model).

Per-device bytes: parameters and optimizer state from the shardings of the
abstract state; temporaries and the total (arguments + outputs - donated
aliases + temporaries) from XLA's compiled.memory_analysis(). This is
XLA:CPU's buffer assignment for the partitioned program; TPU XLA fuses and
schedules differently, so treat it as an estimate, not a TPU measurement.
FLOPs: XLA's cost analysis of the whole step (all devices; lowered with the
layers unrolled and remat off, see step_flops) beside the analytic
6 * matmul params * tokens + attention count, and their ratio.

Measured (2 shared CPU cores): Parti-20B on fsdp=256 plans in ~45 s (9.6 s
to compile the step, 22 s to lower the unrolled copy for the FLOP count).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from unimm import config_lib
from unimm import parallel
from unimm.inference import detokenizer as detokenizer_lib
from unimm.inference import text_to_image
from unimm.inference import tokenizer as tokenizer_lib
from unimm.models import parti
from unimm.sampling import sampler as sampler_lib
from unimm.tokenizers import vit_vqgan
from unimm.train import detokenizer_task
from unimm.train import tasks
from unimm.train import trainer

# jax reads XLA_FLAGS (the simulated device count) when its backend starts,
# on the first device query, not on import: _ensure_device_count sets it
# before anything here touches a device.

HBM_GIB = {"v4": 32, "v5p": 95, "v5e": 16}
# Chips per slice that can be rented, and how Cloud TPU names them (v4 and
# v5p count TensorCores, two per chip; v5e counts chips).
SLICE_CHIPS = {
    "v4": (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
    "v5p": (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 6144),
    "v5e": (1, 4, 8, 16, 32, 64, 128, 256),
}
TABLE_CONFIGS = (
    ("configs/vit_vqgan_plan.py", ("small", "base", "large")),
    ("configs/parti_plan.py", ("350m", "750m", "3b", "20b")),
    ("configs/interleaved_plan.py", ("1b", "7b")),
    ("configs/detokenizer_plan.py", ("paper",)),
    # SEED's 32 1-D causal tokens and LaVIT's dynamic tokens (keep 0.5) on
    # the same ViT-VQGAN base encoder.
    ("configs/vit_vqgan_plan.py", ("base,tokens=32", "base,keep=0.5")),
)
MESH_AXES = ("data", "fsdp", "tensor")
JSON_KEYS = ("params_bytes_per_device", "opt_state_bytes_per_device",
             "temp_bytes_per_device", "total_bytes_per_device",
             "flops_per_step", "num_devices")
GIB = 1024 ** 3
# How the CPU code is generated (LLVM's -O level, XLA:CPU's fusion
# emitters) does not change XLA's HLO passes (fusion decisions, buffer
# assignment), so -O0 without the emitters gives the same bytes and compiles
# 2-4x faster. UNIMM_PLAN_OPT_LEVEL=2 compiles as for running, to compare.
COMPILER_OPTIONS = {"xla_backend_optimization_level":
                    int(os.environ.get("UNIMM_PLAN_OPT_LEVEL", "0")),
                    "xla_cpu_use_fusion_emitters":
                    os.environ.get("UNIMM_PLAN_OPT_LEVEL", "0") != "0"}


def slice_name(family: str, chips: int) -> str:
  if family == "v5e":
    return f"v5litepod-{chips}"
  return f"{family}-{2 * chips}"


# ----------------------------------------------------------------------------
# Input checks (before any device is touched or anything is compiled).
# ----------------------------------------------------------------------------


def parse_mesh(spec: str) -> dict[str, int]:
  """'fsdp=256' or 'data=16,fsdp=16' -> {'data': 16, 'fsdp': 16, ...}."""
  mesh = {"data": 1, "fsdp": 1, "tensor": 1}
  for item in filter(None, spec.split(",")):
    name, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"--mesh item {item!r} is not axis=size; expected e.g. "
                       "--mesh fsdp=256 or --mesh data=16,fsdp=16.")
    if name not in MESH_AXES:
      raise ValueError(f"--mesh axis {name!r} is not one of {MESH_AXES} (the "
                       "mesh axes that config.logical_axis_rules map to).")
    try:
      mesh[name] = int(value)
    except ValueError:
      raise ValueError(f"--mesh {name}={value!r}: the size must be an "
                       "integer.") from None
    if mesh[name] < 1:
      raise ValueError(f"--mesh {name}={mesh[name]}: sizes must be >= 1 (the "
                       "planner needs the full device count; no -1).")
  return mesh


def check_plan(config, mesh: dict[str, int], num_devices: int) -> None:
  """ValueErrors for a mesh/config pair that cannot compile."""
  product = math.prod(mesh.values())
  if product != num_devices:
    raise ValueError(
        f"--mesh {_describe(mesh)} multiplies to {product} but --devices="
        f"{num_devices}; make the sizes multiply to the device count.")
  rule_axes = set()
  for _, target in config.logical_axis_rules:
    rule_axes.update((target,) if isinstance(target, str) else (target or ()))
  for name, size in mesh.items():
    if size > 1 and name not in rule_axes:
      raise ValueError(
          f"--mesh {name}={size}: no rule in config.logical_axis_rules maps "
          f"to mesh axis {name!r}, so it would only replicate; the rules use "
          f"{sorted(rule_axes)}.")
  tensor = mesh["tensor"]
  for prefix in _stack_prefixes(config):
    heads = config.model[f"{prefix}num_heads"]
    if heads % tensor:
      raise ValueError(
          f"config.model.{prefix}num_heads={heads} is not divisible by "
          f"--mesh tensor={tensor}; tensor parallelism splits the heads. "
          "Choose a tensor size that divides the heads.")
  batch = config.data.batch_size
  shards = mesh["data"] * mesh["fsdp"]
  if batch % shards:
    raise ValueError(
        f"config.data.batch_size={batch} is not divisible by the {shards} "
        f"batch shards (data x fsdp of --mesh {_describe(mesh)}); change "
        "the batch (config arg batch=...) or the mesh.")


def _stack_prefixes(config) -> tuple[str, ...]:
  if config.task == "vit_vqgan":
    return ("encoder_", "decoder_")
  return ("",)


def _describe(mesh) -> str:
  return ",".join(f"{k}={v}" for k, v in mesh.items())


# ----------------------------------------------------------------------------
# Tasks and batches without files.
# ----------------------------------------------------------------------------


def planning_task(config):
  """The config's task, usable without data or tokenizer files.

  Parti's loss reads the unconditional prompt (CFG dropout) from the text
  tokenizer; for planning any [S] row will do: [EOS=1, 0, ...] as the T5
  layout that unimm.tokenizers.text writes. The de-tokenizer's frozen
  ViT-VQGAN is built from config.tokenizer_model, its params traced with
  the init.
  """
  if config.task == "detokenizer":  # the frozen tokenizer from its config
    return detokenizer_task.DetokenizerTask(config, tokenizer_lib.Tokenizer(
        model=_frozen_tokenizer(config), params=None,
        config=ml_collections.ConfigDict({"model": config.tokenizer_model}),
        step=0))
  task = tasks.get_task(config)
  if config.task == "parti":
    row = text_to_image.unconditional_text_ids(1, task.model.text_length)
    task.unconditional_row = lambda: row
  return task


def _frozen_tokenizer(config) -> vit_vqgan.ViTVQGAN:
  """A de-tokenizer config's frozen ViT-VQGAN, from config.tokenizer_model."""
  return config_lib.build_module(vit_vqgan.ViTVQGAN,
                                 config.tokenizer_model.to_dict(),
                                 "config.tokenizer_model")


def abstract_batch(config, batch_size: int | None = None) -> dict[str, Any]:
  """The global batch as ShapeDtypeStructs, from config.model alone."""
  b = config.data.batch_size if batch_size is None else batch_size
  m = config.model
  if config.task == "parti":
    return {"text_ids": jax.ShapeDtypeStruct((b, m.text_length), np.int32),
            "image_ids": jax.ShapeDtypeStruct((b, m.image_length), np.int32)}
  if config.task == "vit_vqgan":
    s = m.image_size
    return {"image": jax.ShapeDtypeStruct((b, s, s, 3), np.uint8)}
  if config.task == "interleaved":
    row = jax.ShapeDtypeStruct((b, m.max_len), np.int32)
    return {"tokens": row, "segment_ids": row, "positions": row,
            "loss_mask": row}
  if config.task == "detokenizer":
    s = config.tokenizer_model.image_size
    return {"image": jax.ShapeDtypeStruct((b, s, s, 3), np.uint8)}
  raise ValueError(f"The planner knows tasks 'parti', 'vit_vqgan', "
                   f"'interleaved' and 'detokenizer', got config.task="
                   f"{config.task!r}.")


# ----------------------------------------------------------------------------
# Analytic FLOPs.
# ----------------------------------------------------------------------------


def _stack_flops(layers, tokens, d, f, heads_dim, kv_tokens=None,
                 cross_tokens=None, kv_dim=None, mlp_matrices=2):
  """Forward matmul FLOPs of a transformer stack on `tokens` per example.

  Per layer: q, o projections 2 D (N H) and k, v 2 D (K H) (kv_dim = K H,
  default N H), the MLP mlp_matrices D F (3 when gated), 2 FLOPs per
  multiply-add; self-attention scores and values 2 * 2 T^2 (N H) (the full
  T x T square: the causal mask is applied to a dense product), and with
  cross-attention q, o on T, k, v on the S encoder tokens and 2 * 2 T S (N H).
  """
  t = tokens
  kv_dim = heads_dim if kv_dim is None else kv_dim
  per_layer = (2 * t * (2 * d * heads_dim + 2 * d * kv_dim +
                        mlp_matrices * d * f) + 4 * t * t * heads_dim)
  if cross_tokens:
    s = cross_tokens
    per_layer += (2 * t * 2 * d * heads_dim + 2 * s * 2 * d * heads_dim +
                  4 * t * s * heads_dim)
  return layers * per_layer


def analytic_flops(config, batch_size: int) -> float:
  """Training FLOPs per step: 3 x forward matmuls (6 N tokens) + attention.

  Embedding lookups (gathers), norms and elementwise ops are not counted.
  ViT-VQGAN: the generator only (the StyleGAN discriminator's convolutions
  are not in the formula). De-tokenizer: the DiT, and the frozen
  tokenizer's encoder forward only.
  """
  m = config.model
  if config.task == "interleaved":
    gated = m.get("mlp_activation", "gelu") in ("swiglu", "geglu")
    t = m.max_len
    forward = (_stack_flops(m.num_layers, t, m.embed_dim, m.mlp_dim,
                            m.num_heads * m.head_dim,
                            kv_dim=m.num_kv_heads * m.head_dim,
                            mlp_matrices=3 if gated else 2) +
               2 * t * m.embed_dim * m.vocab_size)  # tied read-out
    return 3.0 * forward * batch_size
  if config.task == "parti":
    hd = m.num_heads * m.head_dim
    s, t = m.text_length, m.image_length
    forward = (
        _stack_flops(m.encoder_layers, s, m.embed_dim, m.mlp_dim, hd) +
        _stack_flops(m.decoder_layers, t, m.embed_dim, m.mlp_dim, hd,
                     cross_tokens=s) +
        2 * t * m.embed_dim * m.image_vocab_size)  # logits
  elif config.task == "detokenizer":  # sizes derived from the tokenizer
    tokenizer = _frozen_tokenizer(config)
    length, width = detokenizer_lib.condition_shape(
        config.get("condition", "codes"), tokenizer)
    t = (tokenizer.image_size // m.patch_size) ** 2
    pixels = m.patch_size ** 2 * m.get("channels", 3)
    forward = (_stack_flops(m.num_layers, t, m.embed_dim, m.mlp_dim,
                            m.num_heads * m.head_dim,
                            cross_tokens=length + 1) +  # and the time token
               2 * t * m.embed_dim * pixels * (
                   2 if m.get("source_image") else 1) +  # patch embed
               2 * length * width * m.embed_dim +  # the condition's projection
               2 * t * m.embed_dim * pixels)  # unembed
    # The frozen tokenizer's encoder runs forward only.
    return 3.0 * forward * batch_size + _vit_vqgan_flops(
        config.tokenizer_model, decoder=False) * batch_size
  else:
    forward = _vit_vqgan_flops(m)
  return 3.0 * forward * batch_size


def _vit_vqgan_flops(m, decoder: bool = True) -> float:
  """Forward matmul FLOPs of one image through a ViT-VQGAN's encoder and
  quantizer, and with decoder its decoder."""
  t = (m.image_size // m.patch_size) ** 2
  pixels = m.patch_size ** 2 * 3
  forward = 0
  for prefix in ("encoder_", "decoder_") if decoder else ("encoder_",):
    d, f = m[f"{prefix}embed_dim"], m[f"{prefix}mlp_dim"]
    forward += _stack_flops(m[f"{prefix}num_layers"], t, d, f, d)
    forward += 2 * t * d * f  # the tanh feed-forward head
  forward += 2 * t * (pixels * m.encoder_embed_dim +  # patch embed
                      m.encoder_mlp_dim * m.code_dim +  # to the code space
                      m.num_codes * m.code_dim)  # code similarities
  if decoder:
    forward += 2 * t * (m.code_dim * m.decoder_embed_dim +  # back to D
                        m.decoder_mlp_dim * 2 * pixels)  # per-patch (mu, log b)
  return forward


# ----------------------------------------------------------------------------
# Planning.
# ----------------------------------------------------------------------------


def _bytes_per_device(tree) -> int:
  """Bytes of the largest per-device share of a tree of sharded structs."""
  total = 0
  for x in jax.tree.leaves(tree):
    shard = x.sharding.shard_shape(x.shape)
    total += math.prod(shard) * x.dtype.itemsize
  return total


def _sampler(task, mesh, rules, abstract_params, batch_size):
  """Lowered jit of parti.sample_image_ids with CFG (2B cache rows)."""
  model = task.model
  sampling = sampler_lib.SamplingParams(temperature=1.0, cfg_scale=3.0)
  batch_sharding = parallel.batch_sharding(mesh, rules)

  def sample(params, text_ids, uncond_text_ids, rng):
    return parti.sample_image_ids(model, {"params": params}, text_ids, rng,
                                  sampling, uncond_text_ids)

  text = jax.ShapeDtypeStruct((batch_size, model.text_length), np.int32,
                              sharding=batch_sharding)
  rng = jax.ShapeDtypeStruct((2,), np.uint32,
                             sharding=parallel.replicated(mesh))
  return jax.jit(sample, out_shardings=batch_sharding).lower(
      abstract_params, text, text, rng)


def step_flops(config, mesh) -> float:
  """XLA's FLOP count of one train step (all devices), remat and scan off.

  HloCostAnalysis counts a while loop's body once, not once per iteration,
  so the scanned program undercounts by about the number of layers; and
  remat adds the recomputed forward pass (hardware, not model, FLOPs). So
  this lowers the same step with the layers unrolled and no remat, and asks
  XLA for the cost of that (un-partitioned, whole-batch) program. Lowering
  allocates nothing and compiles nothing.
  """
  config = config.copy_and_resolve_references()
  for model in (config.model, config.get("tokenizer_model")):
    if model is not None:  # a de-tokenizer's frozen tokenizer too
      model.scan_layers = False
      model.remat_policy = "none"
  program = trainer.build_program(config, planning_task(config),
                                  abstract_batch(config), mesh=mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(program.rules):
    lowered = program.train_step.lower(program.abstract_state,
                                       program.abstract_batch)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def plan(config, mesh_sizes: dict[str, int], *, sampler: bool = True,
         flops: bool = True, devices=None, log=print) -> dict[str, Any]:
  """Compiles the train step (and Parti's sampler) on `devices`.

  Returns per-device bytes, FLOPs and timings. devices (default: all)
  must number math.prod(mesh_sizes.values()); main() simulates as many CPU
  devices as the mesh needs.
  """

  devices = list(jax.devices() if devices is None else devices)
  num_devices = len(devices)
  check_plan(config, mesh_sizes, num_devices)
  mesh = parallel.make_mesh(mesh_sizes, devices)
  task = planning_task(config)
  batch = abstract_batch(config)
  start = time.monotonic()
  program = trainer.build_program(config, task, batch, mesh=mesh)
  state = program.abstract_state
  with jax.set_mesh(mesh), nn.logical_axis_rules(program.rules):
    lowered = program.train_step.lower(state, program.abstract_batch)
  lower_s = time.monotonic() - start
  log(f"Lowered the train step in {lower_s:.1f}s; compiling on "
      f"{num_devices} devices ({_describe(mesh_sizes)}) ...")
  start = time.monotonic()
  compiled = lowered.compile(COMPILER_OPTIONS)
  compile_s = time.monotonic() - start
  memory = compiled.memory_analysis()
  start = time.monotonic()
  model_flops = step_flops(config, mesh) if flops else None
  flops_s = time.monotonic() - start
  analytic = analytic_flops(config, config.data.batch_size)
  params_bytes = _bytes_per_device(state.params)
  opt_bytes = _bytes_per_device(state.opt_state)
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes -
           memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  result = {
      "config": config.get("plan_name", config.task),
      "mesh": dict(mesh_sizes),
      "num_devices": num_devices,
      "global_batch": config.data.batch_size,
      "num_params": sum(math.prod(x.shape)
                        for x in jax.tree.leaves(state.params)),
      "params_bytes_per_device": params_bytes,
      "opt_state_bytes_per_device": opt_bytes,
      "argument_bytes_per_device": memory.argument_size_in_bytes,
      "output_bytes_per_device": memory.output_size_in_bytes,
      "alias_bytes_per_device": memory.alias_size_in_bytes,
      "temp_bytes_per_device": memory.temp_size_in_bytes,
      "total_bytes_per_device": total,
      "flops_per_step": model_flops,
      "analytic_flops_per_step": analytic,
      "flops_ratio": None if model_flops is None else model_flops / analytic,
      "remat_policy": config.model.get("remat_policy", "none"),
      "lower_seconds": lower_s,
      "compile_seconds": compile_s,
      "flops_seconds": flops_s,
  }
  if sampler and config.task == "parti":
    start = time.monotonic()
    with jax.set_mesh(mesh), nn.logical_axis_rules(program.rules):
      sampled = _sampler(task, mesh, program.rules, state.params,
                         config.get("sample_batch_size",
                                    config.data.batch_size)).compile(
                                        COMPILER_OPTIONS)
    sample_memory = sampled.memory_analysis()
    result["sampler_temp_bytes_per_device"] = sample_memory.temp_size_in_bytes
    result["sampler_total_bytes_per_device"] = (
        sample_memory.argument_size_in_bytes +
        sample_memory.output_size_in_bytes -
        sample_memory.alias_size_in_bytes + sample_memory.temp_size_in_bytes)
    result["sampler_compile_seconds"] = time.monotonic() - start
  return result


def format_plan(result: dict[str, Any]) -> str:
  gib = lambda n: f"{n / GIB:8.2f} GiB"  # noqa: E731
  lines = [
      f"{result['config']}: {result['num_params'] / 1e9:.3f}B parameters, "
      f"mesh {_describe(result['mesh'])} ({result['num_devices']} devices), "
      f"global batch {result['global_batch']}, remat "
      f"{result['remat_policy']!r}",
      "Per device (XLA:CPU memory analysis of the partitioned step):",
      f"  parameters        {gib(result['params_bytes_per_device'])}",
      f"  optimizer state   {gib(result['opt_state_bytes_per_device'])}",
      f"  temporaries       {gib(result['temp_bytes_per_device'])}",
      f"  total             {gib(result['total_bytes_per_device'])}   "
      "(arguments + outputs - donated + temporaries)",
  ]
  if "sampler_total_bytes_per_device" in result:
    lines.append(f"  sampler total     "
                 f"{gib(result['sampler_total_bytes_per_device'])}")
  total = result["total_bytes_per_device"]
  fits = [f"{family} ({hbm} GiB): "
          f"{'fits' if total <= hbm * GIB else 'does not fit'}"
          for family, hbm in HBM_GIB.items()]
  lines.append("  " + "; ".join(fits))
  if result["flops_per_step"] is not None:
    lines += [
        "FLOPs per step (all devices):",
        f"  XLA cost analysis {result['flops_per_step']:.4g}   (layers "
        f"unrolled, no remat; {result['flops_seconds']:.0f}s)",
        f"  analytic          {result['analytic_flops_per_step']:.4g}   "
        "(6 * matmul params * tokens + attention)",
        f"  ratio             {result['flops_ratio']:.3f}",
    ]
  lines.append(
      f"Lowered in {result['lower_seconds']:.1f}s, compiled in "
      f"{result['compile_seconds']:.1f}s"
      + (f", sampler in {result['sampler_compile_seconds']:.1f}s"
         if "sampler_compile_seconds" in result else "") + ".")
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# The slice table.
# ----------------------------------------------------------------------------


def _run_child(config_spec: str, mesh: dict[str, int], extra=()) -> dict:
  """Plans in a fresh process with math.prod(mesh) devices."""
  cmd = [sys.executable, "-m", "unimm.plan", "--config", config_spec,
         "--mesh", _describe(mesh), "--json", "--no_sampler", "--no_flops",
         *extra]
  env = _device_env(math.prod(mesh.values()))
  out = subprocess.run(cmd, env=env, capture_output=True, text=True,
                       check=False)
  if out.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def state_bytes(config) -> int:
  """Parameters + two Adam moments (in the parameter dtype), all devices."""
  boxed, _ = jax.eval_shape(planning_task(config).init,
                            jax.random.PRNGKey(0), abstract_batch(config, 1))
  return 3 * sum(x.size * x.dtype.itemsize
                 for x in jax.tree.leaves(parallel.unbox(boxed)))


def make_table(batch_per_device: int, log=print,
               configs=TABLE_CONFIGS) -> str:
  """Markdown: the smallest slice per TPU family on which each size fits.

  Meshes are pure FSDP over all chips (fsdp=N) with batch_per_device
  examples per chip. N starts at the smallest power of two whose chips
  could hold the state in the largest HBM and doubles until the step fits
  the smallest HBM; each N is compiled in a fresh process with N devices.
  """
  rows = []
  for path, sizes in configs:
    for size in sizes:
      spec = f"{path}:size={size}"
      need = state_bytes(config_lib.load_config(spec)) / (
          max(HBM_GIB.values()) * GIB)
      chips = 2 ** max(0, math.ceil(math.log2(max(need, 1))))
      results = {}
      while chips <= 8192:
        spec_n = f"{spec},batch={batch_per_device * chips}"
        log(f"planning {spec_n} on fsdp={chips} ...")
        start = time.monotonic()
        try:
          result = _run_child(spec_n, {"data": 1, "fsdp": chips, "tensor": 1})
        except RuntimeError as e:
          log(f"  failed: {str(e).strip().splitlines()[-1]}")
          chips *= 2
          continue
        results[chips] = result
        total = result["total_bytes_per_device"]
        log(f"  {total / GIB:.2f} GiB per chip ({time.monotonic() - start:.0f}"
            "s)")
        if total <= min(HBM_GIB.values()) * GIB:
          break
        chips *= 2
      rows.append((size, path, results))
  return _table_markdown(rows, batch_per_device)


def _row_name(path: str, size: str) -> str:
  """A table row's model: "Parti 3b", "SEED tokenizer (ViT-VQGAN base, 32
  tokens)" for a size with config args after it."""
  size, *args = size.split(",")
  family = ("ViT-VQGAN" if "vit_vqgan" in path else
            "Interleaved" if "interleaved" in path else
            "De-tokenizer (DiT)" if "detokenizer" in path else "Parti")
  values = dict(a.split("=", 1) for a in args)
  if values.get("tokens", "0") != "0":
    return f"SEED tokenizer ({family} {size}, {values['tokens']} tokens)"
  if float(values.get("keep", 0)):
    return f"LaVIT tokenizer ({family} {size}, keep {values['keep']})"
  return f"{family} {size}"


def _table_markdown(rows, batch_per_device) -> str:
  head = ("| model | params | " + " | ".join(
      f"{family} ({hbm} GiB/chip)" for family, hbm in HBM_GIB.items()) +
          " |")
  lines = [head, "|---|---|" + "---|" * len(HBM_GIB)]
  for size, path, results in rows:
    name = _row_name(path, size)
    num_params = next(iter(results.values()))["num_params"] if results else 0
    cells = []
    for family, hbm in HBM_GIB.items():
      cell = "does not fit"
      for chips in SLICE_CHIPS[family]:
        # Per-chip bytes at this slice size: the planned size at or below
        # it (more chips never need more bytes per chip under FSDP).
        planned = [n for n in results if n <= chips]
        if not planned:
          continue
        total = results[max(planned)]["total_bytes_per_device"]
        if total <= hbm * GIB:
          bound = "" if max(planned) == chips else "<= "
          cell = (f"{slice_name(family, chips)} ({chips} "
                  f"chip{'s' if chips > 1 else ''}, {bound}"
                  f"{total / GIB:.1f} GiB)")
          break
      cells.append(cell)
    lines.append(f"| {name} | {num_params / 1e9:.2f}B | " + " | ".join(cells)
                 + " |")
  lines.append("")
  lines.append(
      f"Made by `python -m unimm.plan --table` (batch {batch_per_device} per "
      "chip, fsdp over all chips, bf16 params and Adam moments, remat "
      "\"full\", scanned layers). GiB: per-chip total of the train step "
      "(parameters, optimizer state, batch, temporaries) by XLA:CPU's "
      "memory analysis of the partitioned program on simulated devices, not "
      "a TPU measurement; \"<=\" where the slice is larger than the "
      "largest mesh compiled (FSDP only lowers bytes per chip as chips "
      "are added).")
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------


def _device_env(num_devices: int) -> dict[str, str]:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={num_devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = "cpu"
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  return env


def _ensure_device_count(num_devices: int, argv) -> None:
  """Sets the simulated device count, re-executing if jax has another."""
  # XLA_FLAGS is read when the backend starts (the first device query), so
  # this works even after `import jax` as long as no device was touched.
  os.environ.update(_device_env(num_devices))
  if jax.device_count() == num_devices and jax.default_backend() == "cpu":
    return
  if os.environ.get("UNIMM_PLAN_CHILD"):
    raise RuntimeError(f"Could not simulate {num_devices} CPU devices (have "
                       f"{jax.device_count()} {jax.default_backend()}).")
  env = dict(_device_env(num_devices), UNIMM_PLAN_CHILD="1")
  os.execve(sys.executable, [sys.executable, "-m", "unimm.plan", *argv], env)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m unimm.plan", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Example: python -m unimm.plan --config "
      "configs/parti_plan.py:size=20b --mesh fsdp=256")
  parser.add_argument("--config", help="configs/x.py[:arg], e.g. "
                      "configs/parti_plan.py:size=20b")
  parser.add_argument("--mesh", default="fsdp=8",
                      help="axis=size,... over data, fsdp, tensor")
  parser.add_argument("--json", action="store_true",
                      help="print one JSON object")
  parser.add_argument("--devices", type=int, default=0,
                      help="simulated devices (default: the mesh's product)")
  parser.add_argument("--no_sampler", action="store_true",
                      help="skip compiling Parti's sampler")
  parser.add_argument("--no_flops", action="store_true",
                      help="skip XLA's FLOP count (it lowers an unrolled "
                      "copy of the step)")
  parser.add_argument("--table", action="store_true",
                      help="markdown table of the smallest TPU slices")
  parser.add_argument("--batch_per_device", type=int, default=1,
                      help="examples per chip for --table")
  parser.add_argument("--output", default="", help="--table: also write the "
                      "markdown to this file")
  return parser


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = _parser().parse_args(argv)
  log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json \
      else (lambda *a: print(*a, flush=True))
  if args.table:
    table = make_table(args.batch_per_device, log=log)
    print(table)
    if args.output:
      with open(args.output, "w") as f:
        f.write(table + "\n")
    return 0
  if not args.config:
    raise SystemExit("--config is required (or --table).")
  try:
    mesh = parse_mesh(args.mesh)
    num_devices = args.devices or math.prod(mesh.values())
    config = config_lib.load_config(args.config)
    config.plan_name = args.config
    check_plan(config, mesh, num_devices)  # before any device or compile
  except ValueError as e:
    _parser().error(str(e))
  _ensure_device_count(num_devices, argv)
  result = plan(config, mesh, sampler=not args.no_sampler,
                flops=not args.no_flops, log=log)
  if args.json:
    print(json.dumps(result))
  else:
    print(format_plan(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
