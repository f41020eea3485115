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
import os
from typing import Any, Callable, Mapping

from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from unimm import parallel

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
  if path and not os.path.exists(path):
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
      os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)), options=options)


def has_checkpoints(path: str) -> bool:
  """Whether `path` is a run folder (it has a checkpoints/ directory)."""
  return bool(path) and os.path.isdir(os.path.join(path, CHECKPOINT_DIR))


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
        f"folder (looked in {os.path.abspath(workdir)!r}). Pass a training "
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
  if os.path.isabs(value):
    candidates = [value]
  else:
    candidates = [os.path.join(workdir, value)]
    cwd, trained_in = meta.get("cwd"), meta.get("workdir")
    if cwd:
      trained_at = os.path.normpath(os.path.join(cwd, value))
      if trained_in:
        candidates.append(os.path.normpath(os.path.join(
            workdir, os.path.relpath(trained_at, trained_in))))
      candidates.append(trained_at)
    candidates.append(value)
  for path in candidates:
    if os.path.exists(path):
      return path
  tried = ", ".join(dict.fromkeys(repr(c) for c in candidates))
  raise ValueError(
      f"The run in {workdir!r} needs {setting}={value!r}, which is not "
      f"there (tried {tried}). Move it back, or export the run where it "
      "was trained (`python -m unimm.export --workdir W --out DIR` copies "
      "everything it needs), or pass the path explicitly.")


def abstract_batch(spec: Mapping[str, Any]) -> Any:
  """ShapeDtypeStructs from a checkpoint's meta batch_spec."""
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(tuple(s["shape"]), np.dtype(s["dtype"])),
      dict(spec), is_leaf=lambda x: isinstance(x, dict) and "shape" in x)


def _key_paths(tree) -> set[str]:
  return {jax.tree_util.keystr(path) for path, _ in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_checkpoint_tree(manager: ocp.CheckpointManager, step: int,
                          abstract: dict, workdir: str, *,
                          partial: bool = False) -> None:
  """A clear error when the checkpoint's parameters are not the config's.

  Orbax would print both trees in full; this names the differing paths and
  the usual cause (a config that builds another model, such as one layout
  of the layers scanned and the other unrolled). With `partial`, the
  abstract tree may be a part of the saved one (inference reads a subset).
  """
  meta = ocp.PyTreeCheckpointHandler().metadata(
      epath.Path(manager.directory) / str(step) / "state")
  meta = getattr(meta, "tree", meta)
  saved_paths = _key_paths(meta["params"])
  wanted = _key_paths(abstract["params"])
  if saved_paths == wanted or (partial and wanted <= saved_paths):
    return

  def show(paths):
    paths = sorted(paths)
    return ", ".join(paths[:4]) + (f" (+{len(paths) - 4} more)"
                                   if len(paths) > 4 else "")
  only_saved = saved_paths - wanted
  raise ValueError(
      f"The checkpoint at step {step} in {workdir} holds other parameters "
      f"than this config's model builds: only in the checkpoint: "
      f"{show(only_saved) or 'none'}; only in the config: "
      f"{show(wanted - saved_paths) or 'none'}. It was trained with another "
      "config.model (for example model.scan_layers, the config argument "
      "scan=true|false: scanned layers are 'layers', unrolled ones "
      "'layers_0', ...). Use that run's settings or a fresh --workdir.")


InitFn = Callable[[jax.Array, Any], Mapping[str, Any]]


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
  step, saved_cfg, meta = saved(workdir, step)
  manager = checkpoint_manager(workdir, read_only=True)
  try:
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
      check_checkpoint_tree(manager, step, abstract, workdir, partial=True)
      state = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              item=abstract,
              restore_args=ocp.checkpoint_utils.construct_restore_args(
                  abstract),
              partial_restore=True)))["state"]
  finally:
    manager.close()
  return Restored(params=state["params"],
                  model_state=state.get("model_state", {}),
                  step=int(state["step"]), mesh=mesh, rules=rules,
                  saved_config=saved_cfg.to_dict())
