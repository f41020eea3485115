r"""Image decoding: plain (one token per model call) against speculative
Jacobi decoding (SJD, sampler.sjd_decode), side by side.

  python benchmarks/decoding.py [--workdirs shapes-parti,workdirs/parti]
      [--windows 4,8] [--batches 1,8] [--cfg_scale 3.0] [--temperature 1.0]
      [--contrastive_alpha 0.1 --contrastive_k 1]
  python benchmarks/decoding.py --workdirs shapes-parti --probe 200

Prints, from one run on this machine, for each model, decoding (plain and
SJD at --windows, with guidance at --cfg_scale; CD-K at each
--contrastive_alpha, plain) and batch: model calls per image (the decoder steps of one image span, the mean over
--call_seeds draws; a batch makes its images together), images/s (best
wall time of --repeats calls after a warm-up call that compiles), the
speed against plain decoding at that batch, and for Parti the time of one
bare decoder call over the window (one token for plain decoding): calls
times that is the model's share, the rest is the sampler's. By default the
models are tiny ones with random weights (a Parti and an interleaved
decoder-only model, image spans of --image_length tokens), so it runs in
about a minute on a CPU; random weights are hard to predict, so their SJD
call counts are an upper bound for trained models. --workdirs measures trained models instead, one after
the other in the same run (anything unimm.load_model takes: a workdir, an
export, a packaged name).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import common
import unimm
from unimm.data import shapes
from unimm.evaluation import probe as probe_lib
from unimm.inference import text_to_image
from unimm.models import interleaved as il
from unimm.models import parti
from unimm.models import vocab
from unimm.sampling.sampler import SamplingParams

_WORKDIRS = flags.DEFINE_list(
    "workdirs", [], "Trained models for unimm.load_model (Parti or "
    "interleaved), measured one after the other; empty: tiny random models.")
_WINDOWS = flags.DEFINE_list("windows", ["4", "8"], "SJD windows to run.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")
_CFG_SCALE = flags.DEFINE_float("cfg_scale", 3.0, "Guidance scale (the "
                                "batch is doubled); negative: no guidance.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Image temperature.")
_IMAGE_LENGTH = flags.DEFINE_integer("image_length", 64, "Random models: "
                                     "image tokens (h * w).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls (best is kept).")
_CALL_SEEDS = flags.DEFINE_integer(
    "call_seeds", 10, "Seeds whose model calls per image are averaged (SJD's "
    "count depends on the draws).")
_PROMPT = flags.DEFINE_string("prompt", "a big red circle at the top left",
                              "Prompt of every row (trained models).")
_PROBE = flags.DEFINE_integer(
    "probe", 0, "With --workdirs (models trained on shapes): also sample "
    "this many one-object and as many two-object prompts of the probe's "
    "fixed set with each decoding (plain, SJD at --windows, no guidance, "
    "CD-K at --contrastive_alpha) and print the probe's prompt accuracy "
    "and probe_fd (the evals' Frechet distance in probe features).")
_CONTRASTIVE_ALPHA = flags.DEFINE_list(
    "contrastive_alpha", ["0.1"], "CD-K plausibility factors (speed rows, "
    "and --probe rows at the eval's temperature); empty: no CD-K rows.")
_CONTRASTIVE_K = flags.DEFINE_integer(
    "contrastive_k", 1, "CD-K's k: the head is within alpha of the k-th "
    "likeliest conditional token.")
_PROBE_BATCH = flags.DEFINE_integer("probe_batch", 50, "--probe: prompts per "
                                    "sampling call.")


def sampling(window: int = 0, alpha: float | None = None) -> SamplingParams:
  """--temperature with guidance at --cfg_scale, or CD-K at alpha."""
  cfg = _CFG_SCALE.value if _CFG_SCALE.value >= 0 else None
  if alpha is not None:
    return SamplingParams(temperature=_TEMPERATURE.value,
                          contrastive_alpha=alpha,
                          contrastive_k=_CONTRASTIVE_K.value,
                          sjd_window=window).validate(2**31 - 1)
  return SamplingParams(temperature=_TEMPERATURE.value, cfg_scale=cfg,
                        sjd_window=window).validate(2**31 - 1)


def decodings() -> list[tuple[str, SamplingParams]]:
  """The speed table's rows: plain, SJD at each window, CD-K at each
  alpha."""
  return ([("plain", sampling())]
          + [(f"SJD W={w}", sampling(int(w))) for w in _WINDOWS.value]
          + [(f"CD-K a={a}", sampling(alpha=float(a)))
             for a in _CONTRASTIVE_ALPHA.value])


def random_parti():
  """(model, params, text row, unconditional row) of a tiny random Parti."""
  model = parti.Parti(**parti.parti_config(
      "tiny", text_vocab_size=256, image_vocab_size=256, text_length=16,
      image_length=_IMAGE_LENGTH.value, embed_dim=64, mlp_dim=256,
      num_heads=4, head_dim=16, num_kv_heads=4, encoder_layers=2,
      decoder_layers=2, scan_layers=False))
  text = np.arange(2, 18, dtype=np.int32) % 200 + 2
  text[-4:] = 0
  params = model.init(jax.random.key(0), text[None],
                      jnp.zeros((1, model.image_length), jnp.int32))
  return model, params, text, text_to_image.unconditional_text_ids(
      1, model.text_length)


def parti_call_seconds(model, params, rows, window: int) -> float:
  """Seconds of one cached decoder call over `window` tokens for text rows
  [B', S] (the model's part of a decoding step, without the sampler), from
  one scan of image_length calls."""
  encoded, text_mask = model.apply(params, rows,
                                   method=lambda m, x: m.encode(x, True))
  cache = model.apply(params, rows.shape[0], text_mask,
                      method=lambda m, b, mask: m.init_cache(b, mask))
  window_fn = lambda m, *args: m.decode_window(*args)  # pylint: disable=unnecessary-lambda-assignment
  _, cache = model.apply(params, jnp.zeros((rows.shape[0], 1), jnp.int32),
                         cache, 0, encoded, method=window_fn)
  span = max(model.image_length - window, 1)

  def calls(p, c):
    def body(c, i):
      logits, c = model.apply(p, jnp.zeros((rows.shape[0], window), jnp.int32),
                              c, 1 + i % span, method=window_fn)
      return c, logits[0, 0, 0]
    return jax.lax.scan(body, c, jnp.arange(model.image_length))[1]

  return common.timed(jax.jit(calls), params, cache,
                      repeats=_REPEATS.value) / model.image_length


def parti_runner(model, params, text, uncond):
  """run(sampling, batch) -> (calls per image, seconds per batch, seconds of
  one decoder call)."""
  def run(sp, batch):
    fn = jax.jit(lambda p, x, u, r: parti.sample_image_ids(
        model, p, x, r, sp, u if sp.doubled else None, return_steps=True))
    rows = jnp.asarray(np.tile(text, (batch, 1)))
    urows = jnp.asarray(np.tile(uncond, (batch, 1)))
    calls = np.mean([int(fn(params, rows, urows, jax.random.key(seed))[1])
                     for seed in range(1, _CALL_SEEDS.value + 1)])
    seconds = common.timed(fn, params, rows, urows, jax.random.key(0),
                           repeats=_REPEATS.value)
    call = parti_call_seconds(
        model, params, jnp.concatenate([rows, urows]) if sp.doubled else rows,
        max(sp.sjd_window, 1))
    return float(calls), seconds, call
  return run


def random_interleaved():
  """(model, params, prompt row, layout) of a tiny random decoder-only
  model."""
  layout = vocab.VocabLayout(text_vocab_size=64, image_vocab_size=256)
  model = il.InterleavedLM(
      vocab_size=layout.size, max_len=_IMAGE_LENGTH.value + 96, embed_dim=64,
      num_heads=4, num_kv_heads=1, head_dim=16, mlp_dim=256, num_layers=2,
      boi_id=vocab.BOI, image_length=_IMAGE_LENGTH.value, scan_layers=False)
  params = model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))
  text = layout.text_to_joint(np.arange(3, 15))
  prompt = np.concatenate([[vocab.BOS], text, [vocab.BOI]]).astype(np.int32)
  return model, params, prompt, layout


def interleaved_runner(model, params, prompt, layout):
  ids = np.arange(layout.size)
  is_text = np.asarray(layout.is_text(ids))

  def run(sp, batch):
    def fn(rng):
      return il.continue_documents(
          model, params, np.tile(prompt, (batch, 1)), rng, text_ids=is_text,
          image_ids=np.asarray(layout.is_image(ids)), eos_id=vocab.EOS,
          boi_id=vocab.BOI, eoi_id=vocab.EOI,
          text_sampling=SamplingParams(temperature=0.0),
          image_sampling=sp,
          max_new_tokens=model.image_length + 1, max_text_tokens=1,
          max_images=1, drop_ids=is_text, return_image_steps=True)
    calls = np.mean([int(fn(jax.random.key(seed))[1][0])
                     for seed in range(1, _CALL_SEEDS.value + 1)])
    seconds = common.timed(lambda r: fn(r)[0], jax.random.key(0),
                           repeats=_REPEATS.value)
    return float(calls), seconds, None
  return run


def runners():
  """[(name, image tokens, run, loaded model or None)] for the models to
  measure."""
  if not _WORKDIRS.value:
    p = random_parti()
    i = random_interleaved()
    return [("random Parti", p[0].image_length, parti_runner(*p), None),
            ("random interleaved", i[0].image_length,
             interleaved_runner(*i), None)]
  out = []
  for workdir in _WORKDIRS.value:
    loaded = unimm.load_model(workdir)
    params = {"params": jax.device_get(nn.unbox(loaded.params))}
    name = os.path.basename(os.path.normpath(workdir))
    if isinstance(loaded, text_to_image.TextToImageModel):
      text = loaded.text_tokenizer.encode([_PROMPT.value],
                                          loaded.model.text_length).ids[0]
      out.append((f"Parti {name}", loaded.model.image_length, parti_runner(
          loaded.model, params, text, loaded.unconditional_row()), loaded))
      continue
    prompt = np.concatenate([loaded._encode([[_PROMPT.value]])[0][0],  # pylint: disable=protected-access
                             [vocab.BOI]]).astype(np.int32)
    out.append((f"interleaved {name}", loaded.model.image_length,
                interleaved_runner(loaded.model, params, prompt,
                                   loaded.layout), loaded))
  return out


def probe_table(model) -> None:
  """Prompt accuracy of each decoding on the probe's fixed prompt set:
  model.sample with the eval's settings but the decoding changed."""
  prompt_set = probe_lib.fixed_prompt_set(_PROBE.value, _PROBE.value)
  prompts = [caption for caption, _ in prompt_set]
  real = np.stack([shapes.render(scene, model.tokenizer.image_size)
                   for _, scene in prompt_set])
  probe = probe_lib.get_probe(model.tokenizer.image_size)
  eval_cfg = model.settings.get("cfg_scale")
  rows = [("plain", {})] + [
      (f"SJD W={w}", {"sjd_window": int(w)}) for w in _WINDOWS.value] + [
          ("no guidance", {"cfg_scale": None})] + [
              (f"CD-K a={a}", {"contrastive_alpha": float(a),
                               "contrastive_k": _CONTRASTIVE_K.value})
              for a in _CONTRASTIVE_ALPHA.value]
  print(f"\nprobe: {len(prompts)} prompts ({_PROBE.value} single, "
        f"{_PROBE.value} pair) at batch {_PROBE_BATCH.value}; the eval's "
        f"settings (cfg_scale {eval_cfg}, temperature "
        f"{model.settings.get('temperature')}) unless the row says")
  header = (f"{'decoding':<12} {'single':>7} {'pair':>7} {'probe_fd':>9} "
            f"{'images/s':>9}")
  print(header)
  print("-" * len(header))
  n = _PROBE_BATCH.value
  for label, settings in rows:
    model.sample(prompts[:n], seed=0, **settings)  # compiles
    start = time.perf_counter()
    images = np.concatenate([
        model.sample(prompts[i:i + n], seed=i, **settings)
        for i in range(0, len(prompts), n)])
    seconds = time.perf_counter() - start
    accuracy = probe_lib.prompt_accuracy(prompts, images, probe=probe)
    fd = probe_lib.probe_fd(real, images, probe=probe)
    print(f"{label:<12} {accuracy['prompt_accuracy_single']:>7.3f} "
          f"{accuracy['prompt_accuracy_pair']:>7.3f} {fd:>9.2f} "
          f"{len(prompts) / seconds:>9.2f}", flush=True)


def main(_):
  if _PROBE.value and not _WORKDIRS.value:
    raise app.UsageError("--probe needs --workdirs, models trained on "
                         "shapes (e.g. shapes-parti).")
  batches = [int(b) for b in _BATCHES.value]
  print(f"devices {jax.device_count()} x {jax.devices()[0].platform}; "
        f"temperature {_TEMPERATURE.value}, cfg_scale {_CFG_SCALE.value}, "
        f"CD-K k {_CONTRASTIVE_K.value}")
  header = (f"{'model':<30} {'decoding':<11} {'tokens':>6} {'batch':>5} "
            f"{'model steps/image':>17} {'steps ratio':>11} {'images/s':>9} "
            f"{'speed vs plain':>14} {'call ms':>7}")
  print(header)
  print("-" * len(header))
  models = runners()
  for name, tokens, run, _ in models:
    plain = {}
    for label, sp in decodings():
      for batch in batches:
        steps, seconds, call = run(sp, batch)
        plain_steps, plain_seconds = plain.setdefault(batch, (steps, seconds))
        print(f"{name:<30} {label:<11} {tokens:>6} {batch:>5} {steps:>17.1f} "
              f"{steps / plain_steps:>11.2f} {batch / seconds:>9.2f} "
              f"{plain_seconds / seconds:>14.2f} "
              f"{'-' if call is None else f'{call * 1e3:.3f}':>7}", flush=True)
  if _PROBE.value:
    for name, _, _, loaded in models:
      print(f"\n{name}")
      probe_table(loaded)


if __name__ == "__main__":
  app.run(main)
