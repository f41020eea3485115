"""Helpers for configs: `name:key=value,...` variants and module building.

Configs are Python files (`configs/*.py`) with `get_config(arg=None)`, as in
big_vision; `--config configs/x.py:size=tiny` passes "size=tiny" as `arg`.
"""
import dataclasses
import difflib
import importlib.util
import inspect
import os
from typing import Any

import ml_collections


TRUE_STRINGS = ("1", "true", "yes")  # a bool argument's true spellings
FALSE_STRINGS = ("0", "false", "no")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses "size=tiny,steps=100" into a ConfigDict over `defaults`.

  Values are converted to the type of the default. An unknown key is a
  ValueError naming the known ones.
  """
  result = ml_collections.ConfigDict(defaults)
  if not arg:
    return result
  for item in arg.split(","):
    if not item:
      continue
    if "=" not in item:
      raise ValueError(f"Config argument {item!r} is not key=value; expected "
                       f"e.g. 'size=tiny' (known keys: {sorted(defaults)}).")
    key, value = item.split("=", 1)
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r} in {arg!r}; known "
                       f"keys: {sorted(defaults)}.")
    default = defaults[key]
    if isinstance(default, bool):
      value = value.lower() in TRUE_STRINGS
    elif default is not None:
      value = type(default)(value)
    result[key] = value
  return result


# Sizes that train on CPU. XLA:CPU runs their layers unrolled faster than
# under nn.scan, whose backward stacks every layer's residuals and slices
# them back out (measured on 2 cores, train step scanned -> unrolled: tiny
# ViT-VQGAN 51 -> 36 ms, tiny Parti batch 64 380 -> 300 ms, tiny
# interleaved 907 -> 689 ms); the larger sizes scan, for compile time and
# memory.
UNROLLED_SIZES = ("tiny", "tiny_deep", "small")


def scan_layers(value: str, size: str) -> bool:
  """Config argument scan=auto|true|false -> config.model.scan_layers."""
  value = str(value).lower()
  if value == "auto":
    return size not in UNROLLED_SIZES
  if value in TRUE_STRINGS + FALSE_STRINGS:
    return value in TRUE_STRINGS
  raise ValueError(f"scan={value!r}; expected auto, true or false (auto "
                   f"unrolls the layers of sizes {UNROLLED_SIZES}).")


def build_module(cls, kwargs: Any, setting: str = "config.model"):
  """cls(**kwargs), with a clear error for keys the module does not take."""
  kwargs = dict(kwargs.to_dict() if hasattr(kwargs, "to_dict") else kwargs)
  if dataclasses.is_dataclass(cls):
    known = {f.name for f in dataclasses.fields(cls) if f.init}
  else:
    known = set(inspect.signature(cls).parameters)
  known -= {"parent", "name"}
  unknown = sorted(set(kwargs) - known)
  if unknown:
    raise ValueError(
        f"Unknown key(s) {unknown} in {setting} for {cls.__name__}; "
        f"expected some of {sorted(known)}. Remove or rename them.")
  return cls(**kwargs)


def load_config(spec: str, **overrides) -> ml_collections.ConfigDict:
  """Loads "configs/x.py[:arg]" like --config does, for notebooks and tests.

  overrides: dotted field paths, e.g. load_config(path, total_steps=10,
  **{"data.batch_size": 8}).
  """
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise ValueError(f"Config file {path!r} does not exist.")
  module_spec = importlib.util.spec_from_file_location("unimm_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for name in parents:
      node = node[name]
    if leaf not in node:
      raise ValueError(f"Unknown config key {key!r} for {spec!r}.")
    node[leaf] = value
  return config


def unknown_field(config: ml_collections.ConfigDict, path: str
                  ) -> str | None:
  """None if `path` ("eval.num_images") names a field of config, else why
  not: the first missing part, the fields beside it and close matches."""
  node, done = config, []
  for part in path.split("."):
    fields = list(node.keys()) if isinstance(
        node, ml_collections.ConfigDict) else []
    if part not in fields:
      where = ".".join(["config", *done])
      close = difflib.get_close_matches(part, fields, n=3)
      return (f"{where} has no field {part!r}"
              + (f"; did you mean {' or '.join(close)}?" if close else ".")
              + (f" Its fields: {', '.join(sorted(fields))}." if fields
                 else f" ({where} is a value, not a group.)"))
    node = node[part]
    done.append(part)
  return None


def base_config(task: str, total_steps: int) -> ml_collections.ConfigDict:
  """The training-loop fields every experiment config starts from."""
  config = ml_collections.ConfigDict()
  config.task = task
  config.seed = 0
  config.total_steps = total_steps
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 2
  config.eval_every_steps = 0  # evaluate once at the end
  config.max_consecutive_nonfinite = 5
  return config


def with_defaults(defaults: dict, config: ml_collections.ConfigDict,
                  section: str) -> dict:
  """defaults updated by config.<section>; an unknown key is a ValueError."""
  merged = dict(defaults)
  overrides = config[section].to_dict() if section in config else {}
  unknown = set(overrides) - set(merged)
  if unknown:
    raise ValueError(f"Unknown config.{section} keys {sorted(unknown)}; "
                     f"expected some of {sorted(merged)}.")
  merged.update(overrides)
  return merged


def check_counts(config: ml_collections.ConfigDict, section: str, *,
                 positive: tuple[str, ...] = (),
                 non_negative: tuple[str, ...] = ()) -> None:
  """A ValueError naming config.<section>.<field> when a count given there
  is not an integer > 0 (`positive`) or >= 0 (`non_negative`); checked when
  a task is built, so a bad eval setting fails before training, not after."""
  values = config.get(section) or {}
  for names, least in ((positive, 1), (non_negative, 0)):
    for name in names:
      if name not in values:
        continue
      value = values[name]
      if isinstance(value, bool) or not isinstance(value, int) or (
          value < least):
        raise ValueError(
            f"config.{section}.{name}={value!r}; expected an integer >= "
            f"{least}" + (" (0 turns it off)." if least == 0 else "."))


def per_host_batch_size(config: ml_collections.ConfigDict,
                        process_count: int) -> int:
  """config.data.batch_size (global) split over the hosts, or a ValueError."""
  batch_size = config.data.batch_size
  if batch_size % process_count:
    raise ValueError(f"config.data.batch_size={batch_size} is not divisible "
                     f"by the {process_count} processes.")
  return batch_size // process_count
