"""Sharding modes by config on the 8-device CPU mesh: data parallel, FSDP,
tensor parallel and their combination give the same train step; every
parameter's logical names resolve; FSDP stores 1/N of the state per device;
the sampler's KV cache is split over batch (data) and heads (tensor); the
interleaved model trains and samples on a tensor-parallel mesh as on one
device."""
import concurrent.futures
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm import config_lib
from unimm import nn as unn
from unimm import parallel
from unimm import plan
from unimm.data import interleaved as il_data
from unimm.models import interleaved as il
from unimm.models import parti
from unimm.models import vocab
from unimm.nn import CACHE_LOGICAL_AXES
from unimm.sampling import sampler as sampler_lib
from unimm.train import trainer

P = jax.sharding.PartitionSpec
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "configs")
# (data, fsdp, tensor); None = one device.
MESHES = {"data": (8, 1, 1), "fsdp": (1, 8, 1), "data_fsdp_tensor": (2, 2, 2),
          "single": None}
# Fast XLA:CPU code is not needed to compare losses: without LLVM
# optimizations and the new fusion emitters a step compiles ~2x faster.
FAST_COMPILE = {"xla_backend_optimization_level": 0,
                "xla_cpu_use_fusion_emitters": False}
BATCH = 8
# The layers scanned, as pod runs lay them out (a leading layer axis in
# every stacked weight's spec); the CPU sizes default to unrolled.


def parti_config():
  # 16 codes: the image embedding has 17 rows (codes + BOS), which the
  # ("vocab", None) fallback rule keeps replicated over "tensor".
  config = config_lib.load_config(
      f"{CONFIG_DIR}/parti_shapes.py:size=tiny,batch=8,text_vocab=64,codes=16,"
      "grid=4,text_length=8,scan=true,optimizer=adamw,lr=3e-3")
  config.model.update(embed_dim=32, num_heads=4, num_kv_heads=4, head_dim=8,
                      mlp_dim=64, encoder_layers=1, decoder_layers=2)
  config.optimizer.warmup_steps = 0
  return config


def vit_vqgan_config():
  config = config_lib.load_config(
      f"{CONFIG_DIR}/vit_vqgan_shapes.py:size=tiny,batch=8,scan=true")
  config.model.update(image_size=16, patch_size=4, num_codes=16, code_dim=4,
                      encoder_num_layers=1, decoder_num_layers=1,
                      encoder_embed_dim=32, decoder_embed_dim=32,
                      encoder_num_heads=4, decoder_num_heads=4,
                      encoder_mlp_dim=64, decoder_mlp_dim=64)
  config.data.image_size = 16
  config.discriminator.update(channel_multiplier=4, max_channels=8)
  config.loss.update(latent_buffer_size=32, restart_every=0)
  config.optimizer.warmup_steps = 0
  return config


def parti_muon_config():
  # Muon's Newton-Schulz iterations on FSDP/tensor-split matrices, with the
  # scanned "layers" axis as a batch axis (unimm.train.optim).
  config = parti_config()
  config.optimizer.name = "muon"
  return config


CONFIGS = {"parti": parti_config, "parti_muon": parti_muon_config,
           "vit_vqgan": vit_vqgan_config}


def _batch(config):
  rng = np.random.default_rng(0)
  abstract = plan.abstract_batch(config, BATCH)
  return {k: rng.integers(0, 16, x.shape).astype(x.dtype)
          for k, x in abstract.items()}


def _mesh(shape):
  if shape is None:
    return parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
  return parallel.make_mesh(dict(zip(parallel.MESH_AXES, shape)))


def _program(config, task, mesh):
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          plan.abstract_batch(config, BATCH))
  return trainer.build_program(config, task, abstract, mesh=mesh)


# Parti under Muon is slow (--run-slow): Muon's sharded step is covered by
# tests/train/test_optim.py, Parti's meshes by "parti".
@pytest.fixture(scope="module", params=[
    pytest.param(name, marks=pytest.mark.slow) if name == "parti_muon"
    else name for name in sorted(CONFIGS)])
def runs(request):
  """{mesh name: (state before the step on that mesh, metrics, program,
  params after the step on the host)}."""
  config = CONFIGS[request.param]()
  task = plan.planning_task(config)
  batch = _batch(config)
  programs = {name: _program(config, task, _mesh(shape))
              for name, shape in MESHES.items()}
  host_state, steps = _one_step_on_each(programs, batch)
  out = {name: (jax.device_put(host_state, program.state_shardings),
                steps[name][0], program, steps[name][1])
         for name, program in programs.items()}
  return request.param, out


def _one_step_on_each(programs, batch):
  """(initial state on the host, {name: (metrics, params after one train
  step)}): the same initial state on every program's mesh."""
  # One initial state for every mesh (op by op: no compile).
  host_state = jax.device_get(parallel.unbox(programs["single"].init_fn(
      jax.random.PRNGKey(0), batch)))
  # Lower one after the other, compile side by side (XLA drops the GIL).
  lowered = {}
  for name, program in programs.items():
    with jax.set_mesh(program.mesh), nn.logical_axis_rules(program.rules):
      lowered[name] = program.train_step.lower(
          jax.device_put(host_state, program.state_shardings),
          program.abstract_batch)
  with concurrent.futures.ThreadPoolExecutor(len(lowered)) as pool:
    compiled = dict(zip(lowered, pool.map(
        lambda step: step.compile(FAST_COMPILE), lowered.values())))
  out = {}
  for name, program in programs.items():
    state = jax.device_put(host_state, program.state_shardings)
    new_state, metrics = compiled[name](state, jax.device_put(
        batch, program.batch_sharding))
    out[name] = (jax.device_get(metrics), jax.device_get(new_state.params))
  return host_state, out


def test_one_train_step_gives_the_same_loss_under_every_mesh(runs):
  name, out = runs
  reference = out["single"][1]
  assert np.isfinite(reference["loss"])
  for mesh_name, (_, metrics, _, params) in out.items():
    assert metrics["loss"] == pytest.approx(reference["loss"], abs=1e-5), (
        name, mesh_name)
    assert metrics["grad_norm"] == pytest.approx(reference["grad_norm"],
                                                 rel=1e-4), (name, mesh_name)
    assert metrics["finite"] == 1.0
    # The sharded AdamW update moves every parameter as on one device. The
    # first Adam step is lr * g / (|g| + eps), about +-lr for every
    # gradient entry: where an entry is near eps (1e-8), the rounding of
    # another reduction order shows as a fraction of lr (measured: 0.4% of
    # lr on 1 of 4,096 entries), while a sharding error (a shard's gradient
    # missing or counted twice) flips or scales updates by about lr.
    # Muon's step (parti_muon) has entries of RMS 0.2 lr (muon_rms), so a
    # sharding error still moves them by several times the tolerance.
    lr = CONFIGS[name]().optimizer.lr
    for a, b in zip(jax.tree.leaves(params),
                    jax.tree.leaves(out["single"][3]), strict=True):
      np.testing.assert_allclose(a, b, atol=0.05 * lr, err_msg=mesh_name)


def _state_bytes_per_device(tree):
  """Bytes each device holds, measured from the arrays' addressable shards."""
  per_device = {}
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + (
          shard.data.nbytes)
  return per_device


def test_fsdp_holds_one_eighth_of_params_and_optimizer_state(runs):
  name, out = runs
  replicated, fsdp = out["data"][0], out["fsdp"][0]
  for part in ("params", "opt_state"):
    full = _state_bytes_per_device(getattr(replicated, part))
    split = _state_bytes_per_device(getattr(fsdp, part))
    assert len(full) == len(split) == 8
    assert len(set(full.values())) == 1  # data parallel: all replicated
    leaves = jax.tree.leaves(getattr(fsdp, part))
    total = sum(x.nbytes for x in leaves)
    assert next(iter(full.values())) == total
    # What stays whole on every device: norm scales, biases, the codebook,
    # convolutions whose channels do not divide 8 (tiny models only).
    kept = sum(x.nbytes for x in leaves if x.sharding.is_fully_replicated)
    assert kept < 0.15 * total, (name, part, kept, total)
    for nbytes in split.values():
      assert nbytes == (total - kept) / 8 + kept, (name, part)
      assert nbytes < 1.35 * total / 8, (name, part, nbytes, total)


def test_every_parameter_is_named_and_every_name_resolves():
  rule_names = {n for n, _ in parallel.STANDARD_RULES}
  for name, make_config in CONFIGS.items():
    config = make_config()
    task = plan.planning_task(config)
    abstract = plan.abstract_batch(config, BATCH)
    boxed, _ = jax.eval_shape(task.init, jax.random.PRNGKey(0), abstract)
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    for path, leaf in jax.tree_util.tree_flatten_with_path(
        boxed, is_leaf=is_box)[0]:
      where = (name, jax.tree_util.keystr(path))
      assert is_box(leaf), where  # every parameter carries logical names
      assert set(leaf.names) - {None} <= rule_names, (where, leaf.names)
    shardings = parallel.logical_shardings(
        boxed, _mesh((2, 2, 2)), parallel.STANDARD_RULES)
    assert all(isinstance(s, jax.sharding.NamedSharding)
               for s in jax.tree.leaves(shardings))


def test_weights_split_over_fsdp_and_tensor(runs):
  name, out = runs
  params = out["data_fsdp_tensor"][0].params
  if name == "vit_vqgan":
    encoder = params["generator"]["encoder_transformer"]["layers"]
    specs = {
        "query": encoder["self_attention"]["query"]["kernel"],
        "out": encoder["self_attention"]["out"]["kernel"],
        "wi": encoder["mlp"]["wi"]["kernel"],
        "wo": encoder["mlp"]["wo"]["kernel"],
        "patch_embed": params["generator"]["patch_embed"]["proj"]["kernel"],
        "codebook": params["generator"]["quantizer"]["codebook"],
    }
    specs = {k: v.sharding.spec for k, v in specs.items()}
    assert specs["query"] == P(None, "fsdp", "tensor", None)
    assert specs["out"] == P(None, "tensor", None, "fsdp")
    assert specs["wi"] == P(None, "fsdp", "tensor")
    assert specs["wo"] == P(None, "tensor", "fsdp")
    assert specs["patch_embed"] == P(None, "fsdp")
    assert specs["codebook"] == P(None, None)  # read whole by every lookup
    return
  # Parti (with AdamW or Muon: the same model).
  layer = params["decoder"]["layers"]
  specs = {
      "query": layer["self_attention"]["query"]["kernel"],  # [L, D, N, H]
      "out": layer["self_attention"]["out"]["kernel"],  # [L, N, H, D]
      "wi": layer["mlp"]["wi"]["kernel"],  # [L, D, F]
      "logits": params["logits"]["kernel"],  # [D, V]
      "image_embed": params["image_embed"]["embedding"],  # [V + 1, D]
      "text_embed": params["text_embed"]["embedding"],  # [V_text, D]
  }
  specs = {k: v.sharding.spec for k, v in specs.items()}
  assert specs["query"] == P(None, "fsdp", "tensor", None)
  assert specs["out"] == P(None, "tensor", None, "fsdp")
  assert specs["wi"] == P(None, "fsdp", "tensor")
  assert specs["logits"] == P("fsdp", "tensor")
  assert specs["text_embed"] == P("tensor", "fsdp")
  # 17 rows do not divide "tensor": the fallback rule replicates them.
  assert specs["image_embed"] == P(None, "fsdp")


def test_activations_are_constrained_at_block_boundaries(runs):
  name, out = runs
  program = out["data_fsdp_tensor"][2]
  state = out["data_fsdp_tensor"][0]
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      state)
  with jax.set_mesh(program.mesh), nn.logical_axis_rules(program.rules):
    text = program.train_step.lower(abstract,
                                    program.abstract_batch).as_text()
  # The residual stream [B, T, D] is split over the batch axes only.
  assert text.count("sharding_constraint") >= 2, name
  assert '{"data", "fsdp"}' in text, name


def test_kv_cache_splits_batch_over_data_and_heads_over_tensor():
  config = parti_config()
  task = plan.planning_task(config)
  model = task.model
  mesh = _mesh((2, 2, 2))
  rules = parallel.STANDARD_RULES
  cache_spec = nn.logical_to_mesh_axes(CACHE_LOGICAL_AXES, rules)
  assert cache_spec == P(None, ("data", "fsdp"), "tensor", None, None)
  batch = _batch(config)
  boxed = task.init(jax.random.PRNGKey(0), batch)[0]
  params = parallel.unbox(boxed)

  @jax.jit
  def prefill(params, text_ids):
    """The sampler's first step: the cache after BOS (self and cross K/V)."""
    encoded, mask = model.apply({"params": params}, text_ids,
                                method=parti.Parti.encode)
    cache = model.init_cache(text_ids.shape[0], mask)
    bos = jnp.full((text_ids.shape[0], 1), model.bos_id, jnp.int32)
    logits, cache = model.apply({"params": params}, bos, cache, 0, encoded,
                                method=parti.Parti.decode_step)
    return logits, cache

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    sharded = jax.device_put(params, parallel.logical_shardings(
        boxed, mesh, rules))
    text_ids = jax.device_put(batch["text_ids"],
                              parallel.batch_sharding(mesh, rules))
    logits, cache = prefill(sharded, text_ids)
  for name in ("k", "v", "cross_k", "cross_v"):  # [L, B, K, T, H]
    x = cache[name]
    assert x.sharding.is_equivalent_to(
        jax.sharding.NamedSharding(mesh, cache_spec), x.ndim), name
    assert {s.data.shape for s in x.addressable_shards} == {
        (model.decoder_layers, BATCH // 4, model.num_kv_heads // 2,
         x.shape[3], model.head_dim)}, name
  # The sharded cache holds what one device computes.
  single_logits, single_cache = prefill(params, batch["text_ids"])
  np.testing.assert_allclose(logits, single_logits, atol=1e-5)
  for name in ("k", "v", "cross_k", "cross_v"):
    np.testing.assert_allclose(cache[name], single_cache[name], atol=1e-5)


def test_fallback_rules_replicate_only_what_does_not_divide():
  mesh = _mesh((2, 2, 2))
  # Multi-query attention: 1 kv head cannot be split over tensor=2.
  attention = unn.Attention(num_heads=4, num_kv_heads=1, head_dim=8,
                            embed_dim=32)
  boxed = jax.eval_shape(attention.init, jax.random.PRNGKey(0),
                         jnp.zeros((2, 3, 32)))
  shardings = parallel.logical_shardings(boxed, mesh, parallel.STANDARD_RULES)
  params = shardings["params"]
  assert params["query"]["kernel"].spec == P("fsdp", "tensor", None)
  assert params["key"]["kernel"].spec == P("fsdp", None, None)
  # Without the ("kv_heads", None) fallback the mesh is refused by name.
  strict = tuple(r for r in parallel.STANDARD_RULES if r != ("kv_heads", None))
  with pytest.raises(ValueError, match=r"key/kernel has shape \(32, 1, 8\).*"
                     r"'kv_heads'.*'tensor' of size 2"):
    parallel.logical_shardings(boxed, mesh, strict)


# ---------------------------------------------------------------- interleaved

IL_TEXT, IL_CODES, IL_GRID, IL_LENGTH = 11, 16, 2, 48
# Tensor parallelism over 4 devices (heads, MLP and the 32-id joint
# vocabulary split 4 ways) with FSDP over 2 (the batch split 2 ways).
IL_MESH = (1, 2, 4)


def interleaved_config():
  config = config_lib.load_config(
      f"{CONFIG_DIR}/interleaved_shapes.py:size=tiny,batch={BATCH},"
      f"length={IL_LENGTH},text_vocab={IL_TEXT},codes={IL_CODES},"
      f"grid={IL_GRID},kv_heads=4,scan=true,optimizer=adamw,lr=3e-3")
  config.model.update(embed_dim=32, num_heads=4, num_kv_heads=4, head_dim=8,
                      mlp_dim=64, num_layers=2)
  config.optimizer.warmup_steps = 0
  config.eval.num_generation = 0
  return config


def _interleaved_document(rng):
  """[BOS, text, BOI, codes, EOI, text, EOS] in the joint vocabulary."""
  text = lambda n: rng.integers(5, 5 + IL_TEXT, n)  # noqa: E731
  codes = rng.integers(5 + IL_TEXT, 5 + IL_TEXT + IL_CODES, IL_GRID ** 2)
  return np.concatenate([[vocab.BOS], text(rng.integers(2, 6)), [vocab.BOI],
                         codes, [vocab.EOI], text(rng.integers(1, 5)),
                         [vocab.EOS]]).astype(np.int32)


def _interleaved_batch():
  """BATCH packed rows of two or three documents each, PAD at the end."""
  rng = np.random.default_rng(0)
  tokens = np.zeros((BATCH, IL_LENGTH), np.int32)
  segments = np.zeros((BATCH, IL_LENGTH), np.int32)
  for row in range(BATCH):
    at = 0
    for doc_id in range(1, 4):
      doc = _interleaved_document(rng)
      if at + len(doc) > IL_LENGTH:
        break
      tokens[row, at:at + len(doc)] = doc
      segments[row, at:at + len(doc)] = doc_id
      at += len(doc)
  return dict(tokens=tokens, segment_ids=segments,
              **il_data.packed_features(segments))


@pytest.fixture(scope="module")
def interleaved_runs():
  """{"single" | "sharded": (program, metrics, params after one step)} and
  the initial params on the host."""
  config = interleaved_config()
  assert config.loss.drop_text_rate > 0  # the step drops text (random)
  task = plan.planning_task(config)
  batch = _interleaved_batch()
  programs = {"single": _program(config, task, _mesh(None)),
              "sharded": _program(config, task, _mesh(IL_MESH))}
  host_state, steps = _one_step_on_each(programs, batch)
  out = {name: (program, *steps[name]) for name, program in programs.items()}
  return out, host_state.params


def test_interleaved_train_step_on_a_tensor_parallel_mesh_equals_one_device(
    interleaved_runs):
  out, _ = interleaved_runs
  program = out["sharded"][0]
  assert dict(program.mesh.shape) == dict(zip(parallel.MESH_AXES, IL_MESH))
  # The weights really are split over "tensor" (and "fsdp").
  shardings = program.state_shardings.params
  layer = shardings["stack"]["layers"]
  assert layer["self_attention"]["key"]["kernel"].spec == P(
      None, "fsdp", "tensor", None)  # [L, D, K, H]
  assert layer["mlp"]["wi"]["kernel"].spec == P(None, "fsdp", "tensor")
  assert shardings["embed"]["embedding"].spec == P("tensor", "fsdp")
  (_, reference, ref_params), (_, metrics, params) = (out["single"],
                                                      out["sharded"])
  assert np.isfinite(reference["loss"])
  assert metrics["loss"] == pytest.approx(reference["loss"], abs=1e-5)
  assert metrics["grad_norm"] == pytest.approx(reference["grad_norm"],
                                               rel=1e-4)
  # About +-lr per entry on the first AdamW step (see the test above).
  lr = interleaved_config().optimizer.lr
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params),
                  strict=True):
    np.testing.assert_allclose(a, b, atol=0.05 * lr)


def test_interleaved_sampling_on_a_tensor_parallel_mesh_equals_one_device(
    interleaved_runs):
  """The whole sampler (text phases, guided image spans, the KV cache) on
  the mesh draws the tokens one device draws, at a fixed seed."""
  out, host_params = interleaved_runs
  program = out["sharded"][0]
  model = plan.planning_task(interleaved_config()).model
  layout = vocab.VocabLayout(text_vocab_size=IL_TEXT,
                             image_vocab_size=IL_CODES)
  ids = np.arange(layout.size)
  rng = np.random.default_rng(1)
  prompts = [np.concatenate([[vocab.BOS], rng.integers(5, 5 + IL_TEXT, n),
                             [vocab.BOI]]) for n in (1, 3, 2, 5)]
  prompts = np.stack([np.pad(p, (7 - len(p), 0)) for p in prompts])

  def sample(params):
    return il.continue_documents(
        model, {"params": params}, prompts, jax.random.PRNGKey(7),
        text_ids=np.asarray(layout.is_text(ids)),
        image_ids=np.asarray(layout.is_image(ids)), eos_id=vocab.EOS,
        boi_id=vocab.BOI, eoi_id=vocab.EOI,
        # Hot enough that the untrained model's draws vary from token to
        # token (at temperature 1 it repeats its input token).
        text_sampling=sampler_lib.SamplingParams(temperature=2.0),
        image_sampling=sampler_lib.SamplingParams(temperature=3.0,
                                                  cfg_scale=2.0),
        max_new_tokens=12, max_text_tokens=6, max_images=2)

  single = sample(host_params)
  with jax.set_mesh(program.mesh), nn.logical_axis_rules(program.rules):
    sharded_params = jax.device_put(host_params,
                                    program.state_shardings.params)
    sharded = sample(sharded_params)
  assert len(jax.tree.leaves(sharded_params)[0].sharding.device_set) == 8
  np.testing.assert_array_equal(sharded, single)
  # Each row drew an image span of codes, guided, then went on in text;
  # the draws vary, so equal outputs are not a fixed point of the model.
  codes = np.asarray(layout.is_image(single))
  assert (codes.sum(axis=1) >= IL_GRID ** 2).all()
  assert single.shape[1] > IL_GRID ** 2 + 1
  assert len(np.unique(single)) >= 10, single
