"""Device mesh, logical-axis rules, shard helpers and multi-host start-up.

One `jax.sharding.Mesh` with axes ("data", "fsdp", "tensor") is built from
`config.mesh` (-1 fills the rest of the devices). Every parameter carries
logical axis names (`nn.with_logical_partitioning`); `config.logical_axis_rules`
maps them to mesh axes (MaxText-style). Everything here validates its input
and raises a ValueError that names the setting to change *before* anything
is compiled.
"""
import math
import os
from typing import Any, Iterable, Mapping, Sequence

from absl import logging
import flax.linen as nn
import jax
import numpy as np

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or axes, or None = replicated). Order matters:
# flax assigns rules first to last and never uses a mesh axis twice in one
# array. Weights, activations and cache have separate names (MaxText style).
STANDARD_RULES = (
    # Activations. The residual stream stays replicated over "tensor"
    # (Megatron-style); heads / mlp / vocab activations follow their weights.
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # Weights: FSDP over the model dimension, tensor parallel over the rest.
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    # Fallbacks: a later rule for the same name is used when the earlier one
    # does not divide the dimension (see logical_shardings). Parti's image
    # embedding has codes + 1 rows (BOS) and MQA/GQA may have fewer kv heads
    # than tensor shards: those dimensions stay replicated over "tensor".
    ("vocab", None),
    ("kv_heads", None),
    ("head_dim", None),
    ("layers", None),
    ("codes", None),
    ("code_dim", None),
    # Convolutions (the StyleGAN discriminator): output channels over FSDP,
    # replicated where they do not divide.
    ("conv_out", "fsdp"),
    ("conv_out", None),
    ("conv_in", None),
    ("patch", None),
    ("norm", None),
    # KV cache: [layers, batch, max_len, kv_heads, head_dim].
    ("cache_batch", ("data", "fsdp")),
    ("cache_len", None),
    ("cache_heads", "tensor"),
    ("cache_head_dim", None),
)

_DEFAULT_BATCH_AXES = ("data", "fsdp")


# ----------------------------------------------------------------------------
# Mesh.
# ----------------------------------------------------------------------------


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int
               ) -> tuple[int, int, int]:
  """Resolves config.mesh (data, fsdp, tensor; one may be -1) to sizes."""
  given = dict(mesh_config)
  unknown = sorted(set(given) - set(MESH_AXES))
  if unknown:
    raise ValueError(
        f"Unknown mesh axes {unknown} in config.mesh; expected only "
        f"{list(MESH_AXES)} (e.g. config.mesh.data=-1, config.mesh.fsdp=1).")
  sizes = [int(given.get(name, 1)) for name in MESH_AXES]
  for name, size in zip(MESH_AXES, sizes):
    if size == 0 or size < -1:
      raise ValueError(
          f"config.mesh.{name}={size}: mesh sizes must be positive or -1 "
          f"(-1 fills the rest of the {num_devices} devices).")
  fill = [name for name, size in zip(MESH_AXES, sizes) if size == -1]
  if len(fill) > 1:
    raise ValueError(
        f"config.mesh sets {', '.join('config.mesh.' + n for n in fill)} to "
        "-1; at most one axis may be -1 (it fills the rest of the "
        f"{num_devices} devices).")
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(
          f"config.mesh.{fill[0]}=-1 cannot fill {num_devices} devices: the "
          f"other axes multiply to {known}, which does not divide "
          f"{num_devices}. Change config.mesh "
          f"({_describe(MESH_AXES, sizes)}).")
    sizes[MESH_AXES.index(fill[0])] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"config.mesh ({_describe(MESH_AXES, sizes)}) multiplies to "
        f"{math.prod(sizes)} but there are {num_devices} devices; set the "
        "sizes to multiply to the device count, or one of them to -1.")
  return tuple(sizes)


def _describe(names, sizes) -> str:
  return ", ".join(f"{n}={s}" for n, s in zip(names, sizes))


def make_mesh(mesh_config: Mapping[str, int],
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A ("data", "fsdp", "tensor") mesh with Auto axes (Linen logical rules).

  Args:
    mesh_config: config.mesh, e.g. {"data": -1, "fsdp": 1, "tensor": 1}.
    devices: defaults to all devices (jax.devices()).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(
      shape, MESH_AXES,
      axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
      devices=devices)


# ----------------------------------------------------------------------------
# Logical rules -> shardings.
# ----------------------------------------------------------------------------


def validate_rules(rules: Iterable[tuple[str, Any]], mesh: jax.sharding.Mesh
                   ) -> tuple[tuple[str, Any], ...]:
  """Checks config.logical_axis_rules against the mesh; returns a tuple."""
  checked = []
  for rule in rules:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2
            and isinstance(rule[0], str)):
      raise ValueError(
          f"config.logical_axis_rules entry {rule!r} is not a (logical_name, "
          "mesh_axis | tuple of mesh axes | None) pair.")
    name, target = rule
    axes = () if target is None else (
        (target,) if isinstance(target, str) else tuple(target))
    for axis in axes:
      if axis not in mesh.axis_names:
        raise ValueError(
            f"config.logical_axis_rules maps {name!r} to mesh axis {axis!r}, "
            f"but the mesh has axes {tuple(mesh.axis_names)}.")
    if target is not None and not isinstance(target, str):
      target = tuple(target)
    checked.append((name, target))
  return tuple(checked)


def _is_box(x) -> bool:
  return isinstance(x, nn.Partitioned)


def _path_str(path) -> str:
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _mesh_axes_of(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def check_divisible(abstract_tree: Any, shardings: Any,
                    logical_names: Any | None = None) -> None:
  """Raises ValueError if any array dimension does not divide its mesh axes.

  Args:
    abstract_tree: arrays / ShapeDtypeStructs (unboxed).
    shardings: NamedSharding tree of the same structure.
    logical_names: optional tree of logical PartitionSpecs, for the message.
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(abstract_tree)
  sharding_leaves = jax.tree.leaves(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  names_leaves = (
      jax.tree.leaves(logical_names,
                      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
      if logical_names is not None else [None] * len(leaves))
  if len(leaves) != len(sharding_leaves):
    raise ValueError(
        f"Sharding tree has {len(sharding_leaves)} leaves but the array tree "
        f"has {len(leaves)}.")
  for (path, leaf), sharding, names in zip(leaves, sharding_leaves,
                                           names_leaves):
    spec = sharding.spec
    shape = tuple(leaf.shape)
    for dim, entry in enumerate(tuple(spec)[:len(shape)]):
      axes = _mesh_axes_of(entry)
      size = math.prod(sharding.mesh.shape[a] for a in axes)
      if size > 1 and shape[dim] % size:
        logical = ""
        if names is not None and dim < len(names):
          logical = f" (logical axis {names[dim]!r})"
        raise ValueError(
            f"Parameter {_path_str(path)} has shape {shape}; its dimension "
            f"{dim}{logical} of size {shape[dim]} is sharded over mesh axis "
            f"{axes if len(axes) > 1 else axes[0]!r} of size {size} and is "
            "not divisible by it. Change config.mesh, "
            "config.logical_axis_rules or the model size.")


def unbox(tree: Any) -> Any:
  """Strips nn.Partitioned boxes (no sharding constraint, unlike nn.unbox)."""
  return jax.tree.map(lambda x: x.value if _is_box(x) else x, tree,
                      is_leaf=_is_box)


def drop_empty_boxes(tree: Any) -> Any:
  """Unboxes boxes that hold no array (e.g. the optax.MaskedNode that a
  masked optimizer, such as Muon's AdamW half, keeps for a parameter it
  does not update): there is nothing to shard, and a box would give them a
  PartitionSpec leaf that the unboxed tree lacks."""
  return jax.tree.map(
      lambda x: x.value if _is_box(x) and not jax.tree.leaves(x.value)
      else x, tree, is_leaf=_is_box)


def logical_specs(boxed_tree: Any) -> Any:
  """Logical PartitionSpecs of a tree with nn.Partitioned boxes (P() if plain)."""
  return nn.get_partition_spec(boxed_tree)


def logical_shardings(boxed_abstract_tree: Any, mesh: jax.sharding.Mesh,
                      rules: Iterable[tuple[str, Any]]) -> Any:
  """NamedSharding tree (of the *unboxed* structure) for a boxed tree.

  Boxed leaves (nn.LogicallyPartitioned) are mapped through `rules` (flax's
  order of precedence; a later rule for the same name is the fallback when
  an earlier one does not divide the dimension); plain leaves are
  replicated. Every dimension is checked to divide the mesh axes
  it is sharded over (ValueError naming the parameter) before any compile.
  """
  rules = validate_rules(rules, mesh)
  names = logical_specs(boxed_abstract_tree)
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
  shardings = jax.tree.map(
      lambda n, x: jax.sharding.NamedSharding(
          mesh, _leaf_spec(tuple(n), tuple(x.shape), rules, mesh)),
      names, unbox(boxed_abstract_tree), is_leaf=is_spec)
  check_divisible(unbox(boxed_abstract_tree), shardings, names)
  return shardings


def _leaf_spec(names: tuple[Any, ...], shape: tuple[int, ...],
               rules: tuple[tuple[str, Any], ...], mesh: jax.sharding.Mesh
               ) -> jax.sharding.PartitionSpec:
  """flax's first-free-rule resolution, made shape-aware.

  A rule whose mesh axes do not divide the dimension is skipped when a later
  rule for the same logical name exists (a fallback such as ("vocab",
  None)); without a fallback it is kept, and check_divisible names it.
  """
  kept = []
  for i, (name, target) in enumerate(rules):
    if name in names:
      size = math.prod(mesh.shape[a] for a in _mesh_axes_of(target))
      has_fallback = any(n == name for n, _ in rules[i + 1:])
      if shape[names.index(name)] % size and has_fallback:
        continue
    kept.append((name, target))
  return nn.logical_to_mesh_axes(names, kept)


# ----------------------------------------------------------------------------
# Shard helpers.
# ----------------------------------------------------------------------------


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def batch_axes(rules: Iterable[tuple[str, Any]] | None = None
               ) -> tuple[str, ...]:
  """Mesh axes of the leading batch dimension: the rule for 'act_batch'."""
  for name, target in (rules or ()):
    if name == "act_batch":
      return _mesh_axes_of(target)
  return _DEFAULT_BATCH_AXES


def batch_sharding(mesh: jax.sharding.Mesh,
                   rules: Iterable[tuple[str, Any]] | None = None
                   ) -> jax.sharding.NamedSharding:
  """Leading (batch) dim over the 'act_batch' mesh axes, the rest replicated."""
  axes = batch_axes(rules)
  return jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(axes if axes else None))


def host_batch_to_global(batch: Any, sharding: jax.sharding.NamedSharding,
                         process_count: int | None = None) -> Any:
  """Per-host numpy batch -> global jax.Arrays (leading dim = batch).

  The global batch is the concatenation of all hosts' batches. Raises a
  ValueError (naming the batch size setting) if it does not divide the
  number of batch shards.
  """
  process_count = jax.process_count() if process_count is None else (
      process_count)
  shards = math.prod(sharding.mesh.shape[a]
                     for a in _mesh_axes_of(tuple(sharding.spec)[0]
                                            if len(sharding.spec) else None))

  def to_global(path, x):
    x = np.asarray(x)
    if x.ndim == 0:
      raise ValueError(
          f"Batch entry {_path_str(path)} is a scalar; every batch entry "
          "needs a leading batch dimension.")
    global_batch = x.shape[0] * process_count
    if global_batch % shards:
      raise ValueError(
          f"Global batch size {global_batch} ({x.shape[0]} per host x "
          f"{process_count} hosts) of batch entry {_path_str(path)} is not "
          f"divisible by the {shards} batch shards of the mesh "
          f"({_describe(sharding.mesh.axis_names, sharding.mesh.shape.values())}"
          "). Change the batch size (config.data.batch_size) or config.mesh.")
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree_util.tree_map_with_path(to_global, batch)


def shard_tree(tree: Any, shardings: Any) -> Any:
  """Places a (host or device) pytree onto the given shardings."""
  return jax.device_put(tree, shardings)


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying shardings (targets for checkpoint restore)."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_tree, shardings)


# ----------------------------------------------------------------------------
# Multi-host.
# ----------------------------------------------------------------------------


def _int_env(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"Environment variable {name}={value!r} is not an "
                     "integer.") from None


def _auto_detectable_cluster() -> str | None:
  """Names the multi-process environment jax can auto-detect, if any."""
  if os.environ.get("UNIMM_DISTRIBUTED", "").lower() in ("1", "true", "auto"):
    return "forced by UNIMM_DISTRIBUTED"
  if (_int_env("SLURM_NTASKS") or 1) > 1 and "SLURM_JOB_ID" in os.environ:
    return "SLURM"
  if (_int_env("OMPI_COMM_WORLD_SIZE") or 1) > 1:
    return "Open MPI"
  if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
    return "Cloud TPU"
  if (_int_env("MEGASCALE_NUM_SLICES") or 1) > 1:
    return "Cloud TPU multislice"
  return None


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Starts jax.distributed for multi-host runs; a no-op for one process.

  Order of precedence:
    1. explicit arguments, else UNIMM_COORDINATOR_ADDRESS /
       UNIMM_NUM_PROCESSES / UNIMM_PROCESS_ID ("host:port", int, int);
    2. an environment jax.distributed.initialize() can read by itself:
       SLURM (SLURM_NTASKS > 1), Open MPI, Cloud TPU pods
       (TPU_WORKER_HOSTNAMES / MEGASCALE_*); set UNIMM_DISTRIBUTED=1 to force
       auto-detection (e.g. on TPU VMs whose topology comes from metadata);
    3. otherwise nothing (single process).
  Must run before anything touches jax devices. Returns True if it
  initialized jax.distributed (or it already was).
  """
  if jax.distributed.is_initialized():
    return True
  coordinator_address = coordinator_address or os.environ.get(
      "UNIMM_COORDINATOR_ADDRESS") or None
  if num_processes is None:
    num_processes = _int_env("UNIMM_NUM_PROCESSES")
  if process_id is None:
    process_id = _int_env("UNIMM_PROCESS_ID")
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError(
          "Multi-host start needs all of UNIMM_COORDINATOR_ADDRESS, "
          "UNIMM_NUM_PROCESSES and UNIMM_PROCESS_ID (or the matching "
          f"arguments); got coordinator_address={coordinator_address!r}, "
          f"num_processes={num_processes!r}, process_id={process_id!r}.")
    if not 0 <= process_id < num_processes:
      raise ValueError(
          f"UNIMM_PROCESS_ID={process_id} must lie in [0, "
          f"UNIMM_NUM_PROCESSES={num_processes}).")
    if num_processes == 1:
      return False
    logging.info("jax.distributed: coordinator %s, process %d of %d",
                 coordinator_address, process_id, num_processes)
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
    return True
  cluster = _auto_detectable_cluster()
  if cluster is None:
    return False
  logging.info("jax.distributed: auto-detecting the cluster (%s)", cluster)
  jax.distributed.initialize()
  return True
