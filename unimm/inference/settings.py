"""The default of every sampling argument of the inference API: "as the
model's eval samples". A loaded model keeps its eval's settings (from its
config's eval section) in `settings`; an argument left at EVAL takes them,
so the API draws what the eval scored and the README reports. None keeps
its one meaning everywhere (cfg_scale=None: no guidance)."""
from typing import Any, Mapping


class _EvalSetting:

  def __repr__(self):
    return "<the eval's setting>"


EVAL: Any = _EvalSetting()


def eval_settings(defaults: Mapping[str, Any], config) -> dict[str, Any]:
  """defaults updated by the keys of config.eval that name a setting."""
  section = config.get("eval") or {}
  return {k: section.get(k, v) for k, v in defaults.items()}


def resolve(value: Any, settings: Mapping[str, Any], key: str) -> Any:
  """settings[key] when value is EVAL, else value."""
  return settings[key] if value is EVAL else value
