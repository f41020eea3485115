"""The AOT planner (unimm/plan.py) on Parti tiny and 8 CPU devices."""
import json
import os
import subprocess
import sys

import jax
import pytest

from unimm import config_lib
from unimm import parallel
from unimm import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "configs/parti_plan.py:size=tiny,batch=8,grid=4,text_length=8"


def _config(spec=TINY):
  return config_lib.load_config(os.path.join(ROOT, spec))


@pytest.fixture(scope="module")
def plans():
  """fsdp=1 on one device and fsdp=8 on all eight, compiled in-process."""
  config = _config()
  one = plan.plan(config, {"data": 1, "fsdp": 1, "tensor": 1},
                  sampler=False, devices=jax.devices()[:1], log=lambda *a: 0)
  eight = plan.plan(config, {"data": 1, "fsdp": 8, "tensor": 1},
                    sampler=True, log=lambda *a: 0)
  return one, eight


def test_fsdp_8_holds_one_eighth_of_the_parameters(plans):
  one, eight = plans
  assert one["num_devices"] == 1 and eight["num_devices"] == 8
  assert one["num_params"] == eight["num_params"] > 1e6
  # bf16 parameters, two bf16 Adam moments (+ a replicated step count).
  assert one["params_bytes_per_device"] == 2 * one["num_params"]
  for key in ("params_bytes_per_device", "opt_state_bytes_per_device"):
    ratio = eight[key] / one[key]
    assert 1 / 8 <= ratio < 1.1 / 8, (key, ratio)  # norms stay replicated
  assert eight["total_bytes_per_device"] < one["total_bytes_per_device"]
  for result in plans:
    assert result["total_bytes_per_device"] >= (
        result["params_bytes_per_device"] +
        result["opt_state_bytes_per_device"])
    assert result["temp_bytes_per_device"] > 0
  # XLA's count and the formula: the same step, however it is sharded.
  assert one["flops_per_step"] == pytest.approx(eight["flops_per_step"],
                                                rel=1e-3)
  assert 0.9 < eight["flops_ratio"] < 1.25
  assert eight["sampler_total_bytes_per_device"] > 0
  text = plan.format_plan(eight)
  assert "optimizer state" in text and "ratio" in text


def test_interleaved_model_plans_with_fsdp_and_its_flops_match():
  config = _config("configs/interleaved_plan.py:size=tiny,batch=8,"
                   "length=128,text_vocab=64,codes=64,grid=4")
  result = plan.plan(config, {"data": 1, "fsdp": 8, "tensor": 1},
                     sampler=False, log=lambda *a: 0)
  assert result["num_devices"] == 8
  assert result["params_bytes_per_device"] < 2 * result["num_params"] / 4
  # XLA counts executed FLOPs: attention's backward recomputes the q k^T
  # logits, one matmul more than the formula's six per attention product.
  assert 0.95 < result["flops_ratio"] < 1.1


def test_detokenizer_plans_without_a_tokenizer_workdir():
  """The de-tokenizer's frozen ViT-VQGAN comes from config.tokenizer_model
  (its params traced with the init, no files read); FSDP shards the DiT,
  and XLA's FLOPs, with the tokenizer's scanned encoder unrolled too, match
  the formula (the DiT's 3 x forward + the encoder's forward)."""
  config = _config("configs/detokenizer_plan.py:size=tiny,patch=4,"
                   "tokenizer=tiny,batch=8")
  assert not config.tokenizer_workdir
  assert config.tokenizer_model.scan_layers
  result = plan.plan(config, {"data": 1, "fsdp": 8, "tensor": 1},
                     sampler=False, log=lambda *a: 0)
  assert result["num_devices"] == 8 and result["num_params"] > 1e5
  assert result["params_bytes_per_device"] < 2 * result["num_params"] / 4
  # XLA counts what runs: attention's backward recomputes q k^T (self and
  # cross), beyond the formula's six matmuls per product; at width 64
  # attention is a large share.
  assert 0.95 < result["flops_ratio"] < 1.1
  # The count does not depend on how the frozen tokenizer's layers are
  # laid out (XLA counts a scanned body once; step_flops unrolls both).
  unrolled = config.copy_and_resolve_references()
  unrolled.tokenizer_model.scan_layers = False
  mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])
  assert plan.step_flops(config, mesh) == plan.step_flops(unrolled, mesh)


def test_cli_json_on_a_mixed_mesh():
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run(
      [sys.executable, "-m", "unimm.plan", "--config", TINY, "--mesh",
       "data=2,fsdp=2,tensor=2", "--json", "--no_sampler"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  for key in plan.JSON_KEYS:
    assert isinstance(result[key], (int, float)), key
  assert result["num_devices"] == 8
  assert result["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert result["total_bytes_per_device"] > result["temp_bytes_per_device"]


@pytest.mark.parametrize("mesh, devices, pattern", [
    ({"data": 2, "fsdp": 2, "tensor": 1}, 8, r"multiplies to 4 .*8"),
    ({"data": 1, "fsdp": 1, "tensor": 8}, 8,
     r"num_heads=4 is not divisible by --mesh tensor=8"),
    ({"data": 16, "fsdp": 1, "tensor": 1}, 16,
     r"batch_size=8 is not divisible by the 16 batch shards"),
])
def test_bad_plans_fail_before_compiling(mesh, devices, pattern):
  with pytest.raises(ValueError, match=pattern):
    plan.check_plan(_config(), mesh, devices)


def test_mesh_axes_outside_the_rules_are_rejected():
  with pytest.raises(ValueError, match=r"'model' is not one of"):
    plan.parse_mesh("fsdp=4,model=2")
  with pytest.raises(ValueError, match=r"fsdp=-1.*no -1"):
    plan.parse_mesh("fsdp=-1")
  config = _config()
  config.logical_axis_rules = tuple(
      (name, None if target == "tensor" else target)
      for name, target in config.logical_axis_rules)
  with pytest.raises(ValueError, match=r"no rule .* mesh axis 'tensor'"):
    plan.check_plan(config, {"data": 1, "fsdp": 4, "tensor": 2}, 8)


def test_cli_reports_a_bad_mesh_without_compiling():
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run(
      [sys.executable, "-m", "unimm.plan", "--config", TINY, "--mesh",
       "fsdp=8,tensor=8", "--json"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert out.returncode == 2  # argparse usage error
  assert "num_heads=4 is not divisible by --mesh tensor=8" in out.stderr
  assert "Lowered" not in out.stderr
  out = subprocess.run(
      [sys.executable, "-m", "unimm.plan", "--config", TINY, "--mesh",
       "fsdp=8", "--devices", "16"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2
  assert "multiplies to 8 but --devices=16" in out.stderr


def test_table_picks_the_smallest_slice_that_fits():
  gib = plan.GIB
  results = {4: {"total_bytes_per_device": 40 * gib, "num_params": 3e9},
             8: {"total_bytes_per_device": 20 * gib, "num_params": 3e9},
             16: {"total_bytes_per_device": 10 * gib, "num_params": 3e9}}
  small = {2: {"total_bytes_per_device": 12 * gib, "num_params": 1e9}}
  table = plan._table_markdown([("3b", "configs/parti_plan.py", results),
                                ("large", "configs/vit_vqgan_plan.py", small)],
                               1)
  row = [line for line in table.splitlines() if "Parti 3b" in line][0]
  cells = [c.strip() for c in row.split("|")[1:-1]]
  assert cells[2] == "v4-16 (8 chips, 20.0 GiB)"  # 20 GiB <= 32
  assert cells[3] == "v5p-8 (4 chips, 40.0 GiB)"  # 40 GiB <= 95
  assert cells[4] == "v5litepod-16 (16 chips, 10.0 GiB)"  # 10 GiB <= 16
  row = [line for line in table.splitlines() if "ViT-VQGAN large" in line][0]
  cells = [c.strip() for c in row.split("|")[1:-1]]
  # Planned on 2 chips; the smallest v4 slice has 4: an upper bound.
  assert cells[2] == "v4-8 (4 chips, <= 12.0 GiB)"
  assert cells[4] == "v5litepod-4 (4 chips, <= 12.0 GiB)"
  # Rows of a size with config args name the design.
  table = plan._table_markdown(
      [("base,tokens=32", "configs/vit_vqgan_plan.py", small),
       ("base,keep=0.5", "configs/vit_vqgan_plan.py", small)], 1)
  assert "| SEED tokenizer (ViT-VQGAN base, 32 tokens) | 1.00B |" in table
  assert "| LaVIT tokenizer (ViT-VQGAN base, keep 0.5) | 1.00B |" in table
