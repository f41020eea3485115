"""Checkpoints on disk: the layout, saved configs and params-only restore.

A run's folder (a training workdir, or an export of one) holds
`checkpoints/<step>/` written by orbax: `state` (params, model_state,
step, and during training the optimizer state), `config` (the run's config
as JSON), `meta` (the batch shapes `init` needs; the working directory and
workdir the run was started from, to resolve its relative paths) and, for
training, the data iterator. Loading for inference needs no optimizer, no
data and no training code: `restore` builds the abstract parameter tree
with the model's own `init` under `jax.eval_shape` and reads just those
arrays, sharded on the given mesh by the config's logical axis rules.
"""
import dataclasses
import hashlib
import json
import os
from typing import Any, Callable, Mapping

from absl import logging
from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from unimm import parallel
from unimm import paths

CHECKPOINT_DIR = "checkpoints"
# Exported models that ship inside the package, loadable by name
# (unimm.load_model("shapes-parti")).
PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                              "pretrained")


def pretrained_names() -> list[str]:
  """The names of the models that ship with the package."""
  if not os.path.isdir(PRETRAINED_DIR):
    return []
  return sorted(n for n in os.listdir(PRETRAINED_DIR)
                if has_checkpoints(os.path.join(PRETRAINED_DIR, n)))


def find(path: str) -> str:
  """`path` itself, or the packaged model of that name (or a part of one,
  such as "shapes-parti/tokenizer") when no such folder exists here."""
  if path and not paths.is_uri(path) and not os.path.exists(path):
    packaged = os.path.join(PRETRAINED_DIR, path)
    if os.path.isdir(packaged):
      return packaged
  return path


@dataclasses.dataclass(frozen=True)
class Restored:
  """What `restore` returns: trained weights placed on the mesh."""
  params: Any
  model_state: Any
  step: int
  mesh: jax.sharding.Mesh
  rules: tuple[tuple[str, Any], ...]
  saved_config: dict[str, Any]


def checkpoint_manager(workdir: str, *, keep: int | None = None,
                       read_only: bool = False) -> ocp.CheckpointManager:
  """orbax manager over workdir/checkpoints (async, atomic, keep-N)."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=not read_only, read_only=read_only,
      enable_async_checkpointing=True)
  return ocp.CheckpointManager(
      paths.absolute(os.path.join(workdir, CHECKPOINT_DIR)), options=options)


def has_checkpoints(path: str) -> bool:
  """Whether `path` is a run folder (it has a checkpoints/ directory)."""
  return bool(path) and epath.Path(path, CHECKPOINT_DIR).is_dir()


def rules_of(config) -> tuple[tuple[str, Any], ...]:
  """config.logical_axis_rules, or the standard rules."""
  rules = config.get("logical_axis_rules")
  return tuple(parallel.STANDARD_RULES if rules is None else rules)


def local_mesh_config(config: ml_collections.ConfigDict
                      ) -> ml_collections.ConfigDict:
  """A copy of config whose mesh is this host's devices along `data`: a
  model loads for inference on whatever mesh it was trained on."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  return config


def _step_or_error(manager: ocp.CheckpointManager, workdir: str,
                   step: int | None) -> int:
  steps = list(manager.all_steps())
  if step is None:
    step = manager.latest_step()
  if step is None or step not in steps:
    what = "no checkpoint" if step is None else f"no checkpoint for step {step}"
    raise ValueError(
        f"{workdir!r} has {what} under {os.path.join(workdir, CHECKPOINT_DIR)}"
        f" (steps there: {steps}). Pass the workdir of a trained run, a "
        "folder written by `python -m unimm.export`, or a step it has; "
        "train with `python -m unimm.main --config ... --workdir DIR`.")
  return step


def saved(workdir: str, step: int | None = None
          ) -> tuple[int, ml_collections.ConfigDict, dict[str, Any]]:
  """(step, config, meta) stored with a run's checkpoint (latest by default)."""
  if not has_checkpoints(workdir):
    raise ValueError(
        f"{workdir!r} is not a trained run: it has no {CHECKPOINT_DIR}/ "
        f"folder (looked in {paths.absolute(workdir)!r}). Pass a training "
        "workdir, a folder written by `python -m unimm.export`, or the name "
        f"of a packaged model ({', '.join(pretrained_names()) or 'none'}).")
  manager = checkpoint_manager(workdir, read_only=True)
  try:
    step = _step_or_error(manager, workdir, step)
    restored = manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
  finally:
    manager.close()
  return (step, ml_collections.ConfigDict(dict(restored["config"])),
          dict(restored["meta"] or {}))


def saved_config(workdir: str, step: int | None = None
                 ) -> ml_collections.ConfigDict:
  """The config a run was trained with (stored with its checkpoints)."""
  return saved(workdir, step)[1]


def resolve_path(value: str, workdir: str, meta: Mapping[str, Any],
                 setting: str) -> str:
  """A path a run's config names, found from any working directory.

  Tried in order: an absolute path as is; relative to the run's folder (an
  export stores its parts there); where it was relative to the run's
  workdir at training time (a recipe's stages moved together); relative to
  the directory training started from; relative to the current directory.
  A ValueError names every place tried and the setting to change.
  """
  if not value:
    raise ValueError(f"The run in {workdir!r} has no {setting} (empty in its "
                     "saved config); it cannot be loaded without it.")
  if os.path.isabs(value) or paths.is_uri(value):
    candidates = [value]
  else:
    candidates = [os.path.join(workdir, value)]
    cwd, trained_in = meta.get("cwd"), meta.get("workdir")
    if cwd:
      trained_at = paths.normalized(os.path.join(cwd, value))
      if trained_in:
        candidates.append(paths.normalized(os.path.join(
            workdir, os.path.relpath(trained_at, trained_in))))
      candidates.append(trained_at)
    candidates.append(value)
  for path in candidates:
    if epath.Path(path).exists():
      return path
  tried = ", ".join(dict.fromkeys(repr(c) for c in candidates))
  raise ValueError(
      f"The run in {workdir!r} needs {setting}={value!r}, which is not "
      f"there (tried {tried}). Move it back, or export the run where it "
      "was trained (`python -m unimm.export --workdir W --out DIR` copies "
      "everything it needs), or pass the path explicitly.")


def text_fingerprint(model_proto: bytes) -> str:
  """The fingerprint of a SentencePiece model (its serialized bytes)."""
  return hashlib.sha256(model_proto).hexdigest()[:16]


def check_dependency(meta: Mapping[str, Any], setting: str, found: str,
                     path: str, workdir: str) -> None:
  """ValueError if the run recorded another fingerprint for `setting` than
  `found`, the one of what now sits at `path` (a same-shape tokenizer of
  other weights would load and sample garbage without an error). Runs that
  recorded none are not checked."""
  expected = (meta.get("dependencies") or {}).get(setting)
  if expected and expected != found:
    raise ValueError(
        f"The run in {workdir!r} was trained with a {setting} of fingerprint "
        f"{expected[:16]}, but {path!r} holds another one ({found[:16]}): a "
        "different tokenizer now sits at that path. Point the setting at "
        "the one the run was trained with, or export the run where it was "
        "trained (python -m unimm.export copies its tokenizers).")


def abstract_batch(spec: Mapping[str, Any]) -> Any:
  """ShapeDtypeStructs from a checkpoint's meta batch_spec."""
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(tuple(s["shape"]), np.dtype(s["dtype"])),
      dict(spec), is_leaf=lambda x: isinstance(x, dict) and "shape" in x)


def _key_paths(tree) -> set[str]:
  return set(_shapes(tree))


def _shapes(tree) -> dict[str, tuple[int, ...] | None]:
  """{key path: shape} of a tree's leaves (saved metadata or abstract)."""
  return {jax.tree_util.keystr(path): getattr(leaf, "shape", None)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _saved_params_tree(manager: ocp.CheckpointManager, step: int):
  meta = ocp.PyTreeCheckpointHandler().metadata(
      epath.Path(manager.directory) / str(step) / "state")
  return getattr(meta, "tree", meta)["params"]


class CheckpointMismatchError(ValueError):
  """A checkpoint of another model than the config builds (not damage: no
  other checkpoint of the run is tried in its place)."""


def _flat_config(tree, prefix="config") -> dict[str, Any]:
  if isinstance(tree, Mapping):
    flat = {}
    for key, value in tree.items():
      flat.update(_flat_config(value, f"{prefix}.{key}"))
    return flat
  return {prefix: tree}


def _config_differences(manager: ocp.CheckpointManager, step: int,
                        config: ml_collections.ConfigDict | None) -> str:
  """ "config.model.x: checkpoint A, now B; ..." over the model settings."""
  if config is None:
    return ""
  try:
    saved_config = manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"] or {}
  except Exception:  # pylint: disable=broad-except
    return ""  # an older or damaged checkpoint: the shapes still tell
  now = json.loads(config.to_json_best_effort())
  before, after = _flat_config(saved_config), _flat_config(now)
  differing = [k for k in sorted(set(before) | set(after))
               if k.startswith(("config.model.", "config.vocab."))
               and before.get(k) != after.get(k)]
  return "; ".join(f"{k}: checkpoint {before.get(k)!r}, now {after.get(k)!r}"
                   for k in differing[:6])


def check_checkpoint_tree(manager: ocp.CheckpointManager, step: int,
                          abstract: dict, workdir: str, *,
                          partial: bool = False,
                          config: ml_collections.ConfigDict | None = None
                          ) -> None:
  """A clear error when the checkpoint's parameters are not the config's.

  Orbax would print both trees in full, or ask for strict=False; this names
  the differing paths or shapes, the model settings that differ from the
  checkpoint's config (when `config` is given) and the usual cause (a
  config that builds another model: another codebook size, width, or one
  layout of the layers scanned and the other unrolled). With `partial`, the
  abstract tree may be a part of the saved one (inference reads a subset).
  Raises CheckpointMismatchError.
  """
  saved_shapes = _shapes(_saved_params_tree(manager, step))
  wanted_shapes = _shapes(abstract["params"])
  saved_paths, wanted = set(saved_shapes), set(wanted_shapes)

  def show(items):
    items = sorted(items)
    return ", ".join(items[:4]) + (f" (+{len(items) - 4} more)"
                                   if len(items) > 4 else "")
  if saved_paths == wanted or (partial and wanted <= saved_paths):
    other_shapes = [
        f"{path} {tuple(saved_shapes[path])} in the checkpoint, "
        f"{tuple(wanted_shapes[path])} in the config"
        for path in sorted(wanted)
        if saved_shapes[path] is not None and wanted_shapes[path] is not None
        and tuple(saved_shapes[path]) != tuple(wanted_shapes[path])]
    if not other_shapes:
      return
    differences = _config_differences(manager, step, config)
    raise CheckpointMismatchError(
        f"The checkpoint at step {step} in {workdir} has parameters of other "
        f"shapes than this config's model: {show(other_shapes)}. "
        + (f"Settings that differ from the run's: {differences}. "
           if differences else "")
        + "The model's sizes (e.g. the codebook size / config arg codes, "
        "the vocabularies, width) must be those it was trained with: use "
        "that run's settings or a fresh --workdir.")
  only_saved = saved_paths - wanted
  differences = _config_differences(manager, step, config)
  raise CheckpointMismatchError(
      f"The checkpoint at step {step} in {workdir} holds other parameters "
      f"than this config's model builds: only in the checkpoint: "
      f"{show(only_saved) or 'none'}; only in the config: "
      f"{show(wanted - saved_paths) or 'none'}. "
      + (f"Settings that differ from the run's: {differences}. "
         if differences else "")
      + "It was trained with another config.model (for example "
      "model.scan_layers, the config argument scan=true|false: scanned "
      "layers are 'layers', unrolled ones 'layers_0', ...). Use that run's "
      "settings or a fresh --workdir.")


InitFn = Callable[[jax.Array, Any], Mapping[str, Any]]


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """uint32 []: the wrapping sum of x's bit patterns (exact in any
  reduction order, so the same on any mesh)."""
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    words = x.astype(jnp.uint32)
  else:  # 8-byte values bitcast to two uint32 words
    unsigned = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)
    words = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  return jnp.sum(words.reshape(-1), dtype=jnp.uint32)


@jax.jit
def _checksums(tree) -> list[jax.Array]:
  leaves = jax.tree.leaves(tree)
  sums = [_leaf_checksum(x) for x in leaves]
  finite = [jnp.all(jnp.isfinite(x)) for x in leaves
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return sums, jnp.all(jnp.stack(finite)) if finite else jnp.array(True)


def params_checksum(params) -> str:
  """A checksum of a parameter tree's values (hex, one 32-bit word per
  leaf, in tree order): saved with each checkpoint and checked on restore,
  so damaged files are caught instead of loading as garbage."""
  sums, _ = _checksums(nn.unbox(params))
  return "".join(f"{int(s):08x}" for s in jax.device_get(sums))


def check_params(params, expected: str | None, where: str) -> None:
  """ValueError naming `where` unless params are finite and (when a
  checksum was saved) match it."""
  sums, finite = _checksums(nn.unbox(params))
  if not bool(finite):
    raise ValueError(f"{where}: the parameters hold NaN or Inf.")
  if expected:
    found = "".join(f"{int(s):08x}" for s in jax.device_get(sums))
    if found != expected:
      bad = sum(a != b for a, b in zip(
          [found[i:i + 8] for i in range(0, len(found), 8)],
          [expected[i:i + 8] for i in range(0, len(expected), 8)]))
      raise ValueError(f"{where}: the parameters do not match the checksum "
                       f"saved with them ({bad} of {len(found) // 8} arrays "
                       "differ): its files are damaged.")


def intact_step(workdir: str, read: Callable[[int], Any], step: int | None,
                steps: list[int]) -> tuple[int, Any]:
  """(step, read(step)) of the newest checkpoint that reads back intact.

  `read(step)` restores a checkpoint and raises on damage (orbax's errors
  on missing or truncated files; check_params' ValueError). With `step`
  given, only that one is tried. Every damaged checkpoint is logged by
  name; with none intact, a ValueError lists them and what went wrong.
  """
  candidates = [step] if step is not None else sorted(steps, reverse=True)
  problems = []
  for candidate in candidates:
    try:
      result = read(candidate)
    except Exception as error:  # pylint: disable=broad-except
      if isinstance(error, CheckpointMismatchError):
        raise  # another model, not damage
      reason = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
      problems.append(f"step {candidate}: {reason}")
      logging.warning("The checkpoint at step %d in %s is damaged (%s)%s",
                      candidate, workdir, reason,
                      "; trying the one before." if step is None else ".")
      continue
    if problems:
      logging.warning("Loaded the checkpoint at step %d of %s instead.",
                      candidate, workdir)
    return candidate, result
  raise ValueError(
      f"No intact checkpoint in {os.path.join(workdir, CHECKPOINT_DIR)}: "
      + "; ".join(problems) + ". Load another step (step=N / --step N, "
      f"steps there: {sorted(steps)}) or retrain.")


def restore(workdir: str, init: InitFn, config: ml_collections.ConfigDict,
            step: int | None = None, *,
            mesh: jax.sharding.Mesh | None = None) -> Restored:
  """Reads a run's params (and model state) onto `mesh`; no optimizer.

  `init(rng, batch) -> {"params": ..., "model_state": ...}` (either may be
  left out, or be a sub-tree of what was saved: only what init builds is
  read) gives the abstract tree and, through its logical axis names, the
  shardings; `batch` has the shapes stored in the checkpoint's meta. `step`
  defaults to the latest checkpoint. `mesh` defaults to config.mesh.
  """
  mesh = mesh or parallel.make_mesh(config.mesh)
  rules = parallel.validate_rules(rules_of(config), mesh)
  manager = checkpoint_manager(workdir, read_only=True)

  def read(candidate):
    got_step, got_config, meta = saved(workdir, candidate)
    batch = abstract_batch(meta["batch_spec"])
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      boxed = jax.eval_shape(lambda rng, b: dict(init(rng, b)),
                             jax.random.PRNGKey(0), batch)
      boxed.setdefault("params", {})
      shardings = parallel.logical_shardings(boxed, mesh, rules)
      abstract = parallel.abstract_with_shardings(parallel.unbox(boxed),
                                                  shardings)
      abstract["step"] = jax.ShapeDtypeStruct(
          (), jnp.int32, sharding=parallel.replicated(mesh))
      check_checkpoint_tree(manager, got_step, abstract, workdir,
                            partial=True, config=config)
      state = manager.restore(got_step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              item=abstract,
              restore_args=ocp.checkpoint_utils.construct_restore_args(
                  abstract),
              partial_restore=True)))["state"]
    # A checksum covers a checkpoint's whole params; a part read alone
    # (a tokenizer's generator) is checked for finiteness only.
    whole = _key_paths(state["params"]) == _key_paths(
        _saved_params_tree(manager, got_step))
    check_params(state["params"], meta.get("params_checksum") if whole
                 else None, f"The checkpoint at step {got_step} in {workdir}")
    return got_config, state

  try:
    _, (saved_cfg, state) = intact_step(workdir, read, step,
                                        list(manager.all_steps()))
  finally:
    manager.close()
  return Restored(params=state["params"],
                  model_state=state.get("model_state", {}),
                  step=int(state["step"]), mesh=mesh, rules=rules,
                  saved_config=saved_cfg.to_dict())
