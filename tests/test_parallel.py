"""Mesh from config, logical rules -> shardings, shard helpers (8 CPU devices)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm import parallel

P = jax.sharding.PartitionSpec


def test_mesh_minus_one_fills_the_devices():
  mesh = parallel.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3
  mesh = parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}


@pytest.mark.parametrize("mesh_config, pattern", [
    ({"data": 3, "fsdp": 1, "tensor": 1}, r"config\.mesh .*8 devices"),
    ({"data": -1, "fsdp": 3, "tensor": 1}, r"config\.mesh\.data=-1 .*8"),
    ({"data": -1, "fsdp": -1, "tensor": 1}, r"config\.mesh\.data, "
                                            r"config\.mesh\.fsdp"),
    ({"data": -1, "fsdp": 0, "tensor": 1}, r"config\.mesh\.fsdp=0"),
    ({"data": -1, "fsdp": 1, "tensor": -2}, r"config\.mesh\.tensor=-2"),
    ({"data": -1, "model": 2}, r"Unknown mesh axes \['model'\]"),
])
def test_bad_mesh_names_the_setting(mesh_config, pattern):
  with pytest.raises(ValueError, match=pattern):
    parallel.make_mesh(mesh_config)


def test_rules_with_unknown_mesh_axis_are_rejected():
  mesh = parallel.make_mesh({"data": -1})
  with pytest.raises(ValueError, match=r"config\.logical_axis_rules .*'model'"):
    parallel.validate_rules((("embed", "model"),), mesh)


def _kernel(axes):
  return nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)


class _Block(nn.Module):
  """A transformer-shaped block using every weight logical name."""

  @nn.compact
  def __call__(self, x, _):  # x: [B, T, D]
    scale = self.param("scale", nn.with_logical_partitioning(
        nn.initializers.ones, ("norm",)), (x.shape[-1],))
    h = x * scale
    q = nn.DenseGeneral((4, 8), kernel_init=_kernel(
        ("embed", "heads", "head_dim")), use_bias=False, name="q")(h)
    kv = nn.DenseGeneral((2, 8), kernel_init=_kernel(
        ("embed", "kv_heads", "head_dim")), use_bias=False, name="k")(h)
    o = nn.DenseGeneral(x.shape[-1], axis=(-2, -1), kernel_init=_kernel(
        ("heads", "head_dim", "embed")), use_bias=False, name="o")(
            q + jnp.repeat(kv, 2, axis=-2))
    m = nn.Dense(64, kernel_init=_kernel(("embed", "mlp")), use_bias=False,
                 name="wi")(o)
    x = x + nn.Dense(x.shape[-1], kernel_init=_kernel(("mlp", "embed")),
                     use_bias=False,
                     name="wo")(m)
    return x, None


class _ToyLm(nn.Module):
  vocab_size: int = 32
  embed_dim: int = 16
  num_layers: int = 2

  @nn.compact
  def __call__(self, ids):  # ids: [B, T]
    embed = self.param("embedding", _kernel(("vocab", "embed")),
                       (self.vocab_size, self.embed_dim))
    x = embed[ids]  # [B, T, D]
    stack = nn.scan(_Block, variable_axes={"params": 0},
                    split_rngs={"params": True}, length=self.num_layers,
                    metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = stack(name="layers")(x, None)
    return x @ embed.T  # [B, T, V]


def _boxed_params(model, *inputs):
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)["params"]


def test_every_parameter_resolves_on_an_8_device_mesh():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  boxed = _boxed_params(_ToyLm(), jnp.zeros((2, 4), jnp.int32))
  shardings = parallel.logical_shardings(boxed, mesh, parallel.STANDARD_RULES)
  rule_names = {name for name, _ in parallel.STANDARD_RULES}
  specs = {}
  for (path, box), sharding in zip(
      jax.tree_util.tree_flatten_with_path(
          boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0],
      jax.tree.leaves(shardings)):
    assert isinstance(box, nn.Partitioned), path  # Every param is named.
    assert set(box.names) <= rule_names, box.names
    assert isinstance(sharding, jax.sharding.NamedSharding)
    assert sharding.mesh is mesh
    specs[jax.tree_util.keystr(path)] = sharding.spec
  assert specs["['embedding']"] == P("tensor", "fsdp")
  assert specs["['layers']['q']['kernel']"] == P(None, "fsdp", "tensor", None)
  assert specs["['layers']['o']['kernel']"] == P(None, "tensor", None, "fsdp")
  assert specs["['layers']['wi']['kernel']"] == P(None, "fsdp", "tensor")
  assert specs["['layers']['scale']"] == P(None, None)


def test_indivisible_parameter_names_path_shape_and_axis():
  mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  boxed = _boxed_params(_ToyLm(embed_dim=6), jnp.zeros((2, 4), jnp.int32))
  with pytest.raises(ValueError, match=r"embedding has shape \(32, 6\).*"
                     r"'embed'.*'fsdp' of size 4.*config\.mesh"):
    parallel.logical_shardings(boxed, mesh, parallel.STANDARD_RULES)


def test_fsdp_puts_one_nth_of_a_parameter_on_each_device():
  mesh = parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  init = lambda rng: nn.Dense(  # noqa: E731
      32, use_bias=False, kernel_init=_kernel(("embed", "mlp"))).init(
          rng, jnp.zeros((1, 64)))
  boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
  shardings = parallel.logical_shardings(boxed, mesh, parallel.STANDARD_RULES)
  params = jax.jit(lambda r: parallel.unbox(init(r)),
                   out_shardings=shardings)(jax.random.PRNGKey(0))
  kernel = params["params"]["kernel"]  # [64, 32] over fsdp=8
  assert kernel.shape == (64, 32)
  shards = kernel.addressable_shards
  assert len(shards) == 8
  assert {s.data.shape for s in shards} == {(8, 32)}
  assert all(s.data.nbytes == kernel.nbytes // 8 for s in shards)
  # Re-sharding a host copy the same way gives the same layout.
  again = parallel.shard_tree(np.asarray(kernel), kernel.sharding)
  np.testing.assert_array_equal(np.asarray(again), np.asarray(kernel))
  assert again.sharding == kernel.sharding


def test_host_batch_becomes_a_global_array_split_over_data_and_fsdp():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharding = parallel.batch_sharding(mesh, parallel.STANDARD_RULES)
  assert sharding.spec == P(("data", "fsdp"))
  images = np.arange(16 * 2 * 3, dtype=np.float32).reshape(16, 2, 3)
  batch = parallel.host_batch_to_global({"image": images}, sharding)
  image = batch["image"]
  assert isinstance(image, jax.Array) and image.shape == (16, 2, 3)
  np.testing.assert_array_equal(np.asarray(image), images)
  # 4 batch shards, each replicated over the 2 tensor devices.
  assert {s.data.shape for s in image.addressable_shards} == {(4, 2, 3)}
  with pytest.raises(ValueError, match=r"Global batch size 6 .*4 batch "
                     r"shards.*config\.data\.batch_size"):
    parallel.host_batch_to_global({"image": images[:6]}, sharding)


def test_replicated_sharding_has_every_value_everywhere():
  mesh = parallel.make_mesh({"data": -1})
  x = parallel.shard_tree(np.ones((3,)), parallel.replicated(mesh))
  assert len(x.addressable_shards) == 8
  assert all(s.data.shape == (3,) for s in x.addressable_shards)


def test_initialize_distributed(monkeypatch):
  for name in ("UNIMM_COORDINATOR_ADDRESS", "UNIMM_NUM_PROCESSES",
               "UNIMM_PROCESS_ID", "UNIMM_DISTRIBUTED", "SLURM_NTASKS",
               "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
               "MEGASCALE_NUM_SLICES"):
    monkeypatch.delenv(name, raising=False)
  assert parallel.initialize_distributed() is False  # Single process.
  monkeypatch.setenv("UNIMM_NUM_PROCESSES", "2")
  with pytest.raises(ValueError, match="UNIMM_COORDINATOR_ADDRESS"):
    parallel.initialize_distributed()
  monkeypatch.setenv("UNIMM_COORDINATOR_ADDRESS", "localhost:1234")
  monkeypatch.setenv("UNIMM_PROCESS_ID", "2")
  with pytest.raises(ValueError, match=r"UNIMM_PROCESS_ID=2"):
    parallel.initialize_distributed()
  monkeypatch.setenv("UNIMM_NUM_PROCESSES", "1")
  monkeypatch.setenv("UNIMM_PROCESS_ID", "0")
  assert parallel.initialize_distributed() is False  # One process: no-op.
  monkeypatch.delenv("UNIMM_NUM_PROCESSES")
  monkeypatch.delenv("UNIMM_PROCESS_ID")
  monkeypatch.delenv("UNIMM_COORDINATOR_ADDRESS")
  monkeypatch.setenv("SLURM_JOB_ID", "7")
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert parallel._auto_detectable_cluster() == "SLURM"
