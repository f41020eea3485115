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


def resolve_guidance(settings, cfg_scale=EVAL, contrastive_alpha=EVAL):
  """(cfg_scale, contrastive_alpha) from the arguments, the eval's settings
  for EVAL. Guidance and CD-K are alternatives over the same doubled batch,
  so a value (not None) given for one turns off the other when that one is
  left at EVAL: contrastive_alpha=0.1 decodes by CD-K even under an eval
  that guides. Both given is SamplingParams' ValueError."""
  given = lambda v: v is not EVAL and v not in (None, "")  # noqa: E731
  if given(contrastive_alpha) and cfg_scale is EVAL:
    cfg_scale = None
  if given(cfg_scale) and contrastive_alpha is EVAL:
    contrastive_alpha = None
  return (resolve(cfg_scale, settings, "cfg_scale"),
          resolve(contrastive_alpha, settings,
                               "contrastive_alpha"))
