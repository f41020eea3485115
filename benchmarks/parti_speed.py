r"""Parti and interleaved sampling and training speed against baselines.

  python benchmarks/parti_speed.py [--image_length 256] [--size tiny]
      [--models parti,interleaved]

Training where matrix multiplies dominate (width 512; both train steps, no
sampling, about 7 minutes on 2 CPU cores, 9 GB of memory):

  python benchmarks/parti_speed.py --size small --embed_dim 512 \
      --sample_batches= --train_rounds 3 --train_steps 2 \
      --noother_layout --profile_dir /tmp/train_profile

Prints, from one run on this machine:
- sampler tokens/s of unimm's compiled scan + KV-cache sampler
  (parti.sample_image_ids) against (a) the same model recomputing the whole
  prefix every step (a jitted full forward over the padded sequence,
  compiled once) and (b) Hugging Face transformers `generate` with its KV
  cache on a same-size T5 encoder-decoder in PyTorch (greedy, CPU), at
  batch 1 and 8; compile time separately;
- training tokens/s of the real unimm train step (unimm.train.trainer's
  program for the Parti task: forward, backward, clipping by the global
  norm, AdamW, the skip of a non-finite step), with the layers as the
  config lays them out (--scan; tiny: unrolled) and the other way
  (--other_layout), against the same HF model in PyTorch eager doing the
  same (forward, backward, clip_grad_norm_ at config.optimizer.
  grad_clip_norm, AdamW unless the norm is not finite), each after two
  warm-up steps, timed in --train_rounds interleaved rounds (medians; the
  ratio of each round is printed too);
- the same for the interleaved task's train step (unimm.train.
  interleaved_task on configs/interleaved_shapes.py, one document per row:
  BOS, prompt, BOI, image, EOI, text, EOS) against a same-size Llama
  (LlamaForCausalLM: the same key/value heads, RoPE, SwiGLU hidden width
  2/3 of ours so the MLP parameters match) in PyTorch eager;
- model FLOP/s of each train step as a fraction of the f32 matmul peak
  measured at the start of the run, with MaxText's FLOP formula (6 x matmul
  params x tokens + attention, maxtext/MaxText/maxtext_utils.py
  calculate_tflops_training_per_device);
- with --profile_dir: for each unimm train step, the forward and the
  forward + backward timed alone, and a jax.profiler trace of two steps
  split into matmul thunks (dots and fusions holding one) and the rest;
- the interleaved decoder-only model's sampler (continue_documents drawing
  one image after a text prompt: prefill, then the scan over the KV cache)
  against the same model recomputing the prefix and against HF `generate`
  on a same-size Llama (multi-query attention, RoPE; its SwiGLU hidden
  width is 2/3 of ours so the MLP parameters match), at batch 1 and 8.

--embed_dim overrides the size's width (mlp_dim 4x, head_dim width /
num_heads): the `small` rows of both size tables are 256 wide.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

import common
from unimm import config_lib
from unimm import host_memory
from unimm import parallel
from unimm.data import interleaved as il_data
from unimm.inference import text_to_image
from unimm.models import interleaved
from unimm.models import parti
from unimm.models import vocab
from unimm.sampling.sampler import SamplingParams
from unimm.train import interleaved_task
from unimm.train import optim
from unimm.train import parti_task
from unimm.train import trainer

_SIZE = flags.DEFINE_string("size", "tiny", "Parti size (models.parti.SIZES).")
_IMAGE_LENGTH = flags.DEFINE_integer("image_length", 256,
                                     "Image tokens per sample (h * w).")
_TEXT_LENGTH = flags.DEFINE_integer("text_length", 24, "Text tokens.")
_IMAGE_VOCAB = flags.DEFINE_integer("image_vocab", 512, "Image codes.")
_TEXT_VOCAB = flags.DEFINE_integer("text_vocab", 256, "Text vocabulary.")
_SAMPLE_BATCHES = flags.DEFINE_list("sample_batches", ["1", "8"],
                                    "Sampling batch sizes.")
_TRAIN_BATCH = flags.DEFINE_integer("train_batch", 8, "Training batch.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 5, "Timed train steps "
                                    "per round.")
_TRAIN_ROUNDS = flags.DEFINE_integer(
    "train_rounds", 3, "Rounds of training timings; each round times unimm "
    "(both layer layouts) and PyTorch in turn, and the medians are "
    "reported, so a change in the machine's speed hits every side alike.")
_RECOMPUTE_TOKENS = flags.DEFINE_integer(
    "recompute_tokens", 64, "Tokens timed for the recompute baseline (its "
    "per-token cost is extrapolated to image_length: each of its steps "
    "costs the same full forward).")
_TORCH = flags.DEFINE_bool("torch", True, "Run the PyTorch baselines.")
_SCAN = flags.DEFINE_enum(
    "scan", "auto", ["auto", "true", "false"], "nn.scan over layers (one "
    "compiled layer body) or unrolled; auto as the shapes configs: unrolled "
    "at the CPU sizes (unimm.config_lib.scan_layers).")
_MODELS = flags.DEFINE_list("models", ["parti", "interleaved"],
                            "Which models to measure.")
_PROMPT_LENGTH = flags.DEFINE_integer(
    "prompt_length", 16, "Interleaved model: prompt tokens before BOI.")
_TRAIN_LENGTH = flags.DEFINE_integer(
    "train_length", 320, "Interleaved training: tokens per row (at least "
    "prompt_length + image_length + 2).")
_EMBED_DIM = flags.DEFINE_integer(
    "embed_dim", 0, "Width of both models (0: the size's); mlp_dim becomes "
    "4x the width and head_dim width / num_heads.")
_OPTIMIZER = flags.DEFINE_enum(
    "optimizer", "adamw", ["adamw", "muon"], "unimm's optimizer in the "
    "train steps (PyTorch's is AdamW).")
_OTHER_LAYOUT = flags.DEFINE_bool(
    "other_layout", True, "Also time the train steps with the layers laid "
    "out the other way (scanned / unrolled).")
_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir", "", "Where to write a jax.profiler trace of each unimm "
    "train step (empty: no profile).")


def width_overrides(num_heads: int) -> dict:
  """Model fields that --embed_dim sets (none when it is 0)."""
  d = _EMBED_DIM.value
  if not d:
    return {}
  if d % num_heads:
    raise ValueError(f"--embed_dim={d} is not a multiple of the size's "
                     f"num_heads={num_heads}; pick a multiple.")
  return dict(embed_dim=d, mlp_dim=4 * d, head_dim=d // num_heads)


def parti_config(size: str, image_length: int):
  """The shapes Parti config at this benchmark's lengths and vocabularies."""
  config = config_lib.load_config(
      os.path.join(os.path.dirname(__file__), "..", "configs",
                   "parti_shapes.py") +
      f":size={size},positions=learned,optimizer={_OPTIMIZER.value}")
  config.model.update(width_overrides(config.model.num_heads))
  config.model.update(image_length=image_length,
                      text_length=_TEXT_LENGTH.value,
                      image_vocab_size=_IMAGE_VOCAB.value,
                      text_vocab_size=_TEXT_VOCAB.value,
                      scan_layers=config_lib.scan_layers(_SCAN.value, size))
  config.mesh.update(data=1, fsdp=1, tensor=1)
  return config


def training_flops(m: parti.Parti, batch: int) -> float:
  """MaxText-style training FLOPs of one step (forward + backward = 3x)."""
  d, f, t, s = m.embed_dim, m.mlp_dim, m.image_length, m.text_length
  qkvo = 2 * d * m.num_heads * m.head_dim + 2 * d * m.num_kv_heads * m.head_dim
  enc = m.encoder_layers * (qkvo + 2 * d * f)
  dec = m.decoder_layers * (qkvo + d * m.num_heads * m.head_dim * 2 + 2 * d * f)
  cross_kv = m.decoder_layers * 2 * d * m.num_kv_heads * m.head_dim
  matmul = 6 * batch * (enc * s + dec * t + cross_kv * s +
                        d * m.image_vocab_size * t)
  hd = m.num_heads * m.head_dim
  attention = 12 * batch * hd * (m.encoder_layers * s * s +
                                 m.decoder_layers * (t * t + t * s))
  return float(matmul + attention)


def parti_train_task(m_cfg) -> parti_task.ParTask:
  """The Parti task of m_cfg, its unconditional text row built directly (no
  text tokenizer file needed)."""
  task = parti_task.ParTask(m_cfg)
  row = text_to_image.unconditional_text_ids(1, task.model.text_length)
  task.unconditional_row = lambda: row
  return task


def unimm_train_s(m_cfg, task, batch):
  """(compile s, timer, params, compiled step) of the real trainer program;
  timer(steps) returns seconds per step over `steps` more steps."""
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          batch)
  mesh = parallel.make_mesh(dict(data=1), jax.devices()[:1])
  program = trainer.build_program(m_cfg, task, abstract, mesh=mesh)
  with jax.set_mesh(program.mesh):
    state = program.jit_init(jax.random.PRNGKey(0), batch)
    device_batch = parallel.host_batch_to_global(batch,
                                                 program.batch_sharding)
    start = time.perf_counter()
    compiled = program.train_step.lower(program.abstract_state,
                                        program.abstract_batch).compile()
    compile_s = time.perf_counter() - start
    state, metrics = compiled(state, device_batch)
    jax.block_until_ready(metrics)
    params = {"params": parallel.unbox(jax.device_get(state.params))}
    state, metrics = compiled(state, device_batch)  # two warm-up steps, as
    jax.block_until_ready(metrics)  # PyTorch's
  holder = [state]

  def timer(steps: int) -> float:
    with jax.set_mesh(program.mesh):
      state = holder[0]
      start = time.perf_counter()
      for _ in range(steps):
        state, metrics = compiled(state, device_batch)
      jax.block_until_ready(metrics)
      holder[0] = state
    return (time.perf_counter() - start) / steps

  return compile_s, timer, params, compiled


def unimm_sampler(model, params, text, sampling):
  fn = jax.jit(lambda p, x, r: parti.sample_image_ids(model, p, x, r,
                                                      sampling))
  start = time.perf_counter()
  compiled = fn.lower(params, text, jax.random.key(0)).compile()
  compile_s = time.perf_counter() - start
  run_s = common.timed(compiled, params, text, jax.random.key(0), repeats=3)
  return compile_s, run_s


def recompute_sampler(model, params, text, n_tokens):
  """Greedy decoding that reruns the full forward over the prefix."""
  b, t = text.shape[0], model.image_length

  @jax.jit
  def step(params, text, ids, i):
    logits = model.apply(params, text, ids)  # [B, T, V]: the whole prefix
    token = jnp.argmax(logits[:, i], axis=-1)
    return ids.at[:, i].set(token)

  ids = jnp.zeros((b, t), jnp.int32)
  jax.block_until_ready(step(params, text, ids, 0))  # compile
  start = time.perf_counter()
  for i in range(n_tokens):
    ids = step(params, text, ids, i)
  jax.block_until_ready(ids)
  return (time.perf_counter() - start) / n_tokens  # seconds per token step


def torch_model(m: parti.Parti):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  config = transformers.T5Config(
      vocab_size=max(m.text_vocab_size, m.image_vocab_size + 1),
      d_model=m.embed_dim, d_kv=m.head_dim, d_ff=m.mlp_dim,
      num_layers=m.encoder_layers, num_decoder_layers=m.decoder_layers,
      num_heads=m.num_heads, dropout_rate=0.0, decoder_start_token_id=0,
      pad_token_id=0, eos_token_id=1)
  return transformers.T5ForConditionalGeneration(config).eval()


def torch_generate_s(model, batch: int, m: parti.Parti) -> float:
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import cache_utils  # pylint: disable=g-import-not-at-top
  ids = torch.randint(2, m.text_vocab_size, (batch, m.text_length))

  def kw():
    # A cache sized from the config would take the encoder's layer count
    # (transformers 5 with num_decoder_layers != num_layers): grow lazily.
    cache = cache_utils.EncoderDecoderCache(cache_utils.DynamicCache(),
                                            cache_utils.DynamicCache())
    return dict(max_new_tokens=m.image_length, min_new_tokens=m.image_length,
                do_sample=False, use_cache=True, past_key_values=cache)

  with torch.no_grad():
    for _ in range(2):  # warm-up: oneDNN sets up each new KV length once
      model.generate(ids, **kw())
    start = time.perf_counter()
    out = model.generate(ids, **kw())
  assert out.shape[1] == m.image_length + 1, out.shape
  return time.perf_counter() - start


def torch_loss_fn(model, **arrays):
  """loss_fn() -> the HF model's loss on these int arrays (None without a
  model); Llama shifts labels = input_ids itself."""
  if model is None:
    return None
  import torch  # pylint: disable=g-import-not-at-top
  tensors = {k: torch.as_tensor(np.asarray(v), dtype=torch.long)
             for k, v in arrays.items()}
  return lambda: model(**tensors).loss


def torch_train_timer(model, loss_fn, clip_norm: float):
  """A timer: timer(steps) -> seconds per PyTorch eager step: loss_fn(),
  backward, clipping to clip_norm, and AdamW unless the norm is not finite
  (unimm's trainer's step)."""
  import torch  # pylint: disable=g-import-not-at-top
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

  def step():
    opt.zero_grad()
    loss_fn().backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    if torch.isfinite(norm):
      opt.step()

  step()
  step()  # warm-up (oneDNN primitives)

  def timer(steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      step()
    return (time.perf_counter() - start) / steps

  return timer


def interleaved_model(size: str, image_length: int, prompt_length: int):
  return interleaved.InterleavedLM(**interleaved.interleaved_config(
      size, **width_overrides(interleaved.SIZES[size]["num_heads"]),
      vocab_size=5 + _TEXT_VOCAB.value + _IMAGE_VOCAB.value,
      max_len=prompt_length + 2 * image_length + 8, image_length=image_length,
      image_positions="2d", qk_norm=True,
      scan_layers=config_lib.scan_layers(_SCAN.value, size)))


def interleaved_sampler_s(model, params, prompts):
  """(first call s, timed call s) of continue_documents drawing one image
  after each prompt (which ends in BOI): the first call compiles."""
  ids = np.arange(model.vocab_size)
  text_ids = (ids >= 5) & (ids < 5 + _TEXT_VOCAB.value)
  greedy = SamplingParams(temperature=0.0)

  def run():
    out = interleaved.continue_documents(
        model, params, prompts, jax.random.key(0), text_ids=text_ids,
        image_ids=ids >= 5 + _TEXT_VOCAB.value, eos_id=2, boi_id=3,
        eoi_id=4, text_sampling=greedy, image_sampling=greedy,
        max_new_tokens=model.image_length + 1, max_text_tokens=1,
        max_images=1)
    assert out.shape[1] >= model.image_length, out.shape
    return out

  start = time.perf_counter()
  run()
  first = time.perf_counter() - start
  best = float("inf")
  for _ in range(3):
    start = time.perf_counter()
    run()
    best = min(best, time.perf_counter() - start)
  return first, best


def interleaved_recompute_s(model, params, prompts, n_tokens):
  """Greedy decoding that reruns the full forward over the padded row (the
  prompt and the image: one compiled shape)."""
  b, p = prompts.shape

  @jax.jit
  def step(params, row, i):
    logits = model.apply(params, row)  # [B, T, V]: the whole prefix
    return row.at[:, p + i].set(jnp.argmax(logits[:, p + i - 1], axis=-1))

  row = jnp.zeros((b, p + model.image_length), jnp.int32).at[:, :p].set(
      prompts)
  jax.block_until_ready(step(params, row, 0))  # compile
  start = time.perf_counter()
  for i in range(n_tokens):
    row = step(params, row, i)
  jax.block_until_ready(row)
  return (time.perf_counter() - start) / n_tokens


def torch_llama(model):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=model.vocab_size, hidden_size=model.embed_dim,
      intermediate_size=2 * model.mlp_dim // 3,
      num_hidden_layers=model.num_layers,
      num_attention_heads=model.num_heads,
      num_key_value_heads=model.num_kv_heads, head_dim=model.head_dim,
      max_position_embeddings=model.max_len, tie_word_embeddings=True,
      pad_token_id=0, bos_token_id=1, eos_token_id=2)
  return transformers.LlamaForCausalLM(config).eval()


def torch_llama_generate_s(llama, prompts, new_tokens: int) -> float:
  import torch  # pylint: disable=g-import-not-at-top
  ids = torch.as_tensor(np.asarray(prompts), dtype=torch.long)
  kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, use_cache=True,
            attention_mask=torch.ones_like(ids))
  with torch.no_grad():
    for _ in range(2):  # warm-up
      llama.generate(ids, **kw)
    start = time.perf_counter()
    out = llama.generate(ids, **kw)
  assert out.shape[1] == ids.shape[1] + new_tokens, out.shape
  return time.perf_counter() - start


def run_interleaved(rng) -> list[tuple[str, str]]:
  """The interleaved model's sampler rows."""
  model = interleaved_model(_SIZE.value, _IMAGE_LENGTH.value,
                            _PROMPT_LENGTH.value)
  n = model.image_length
  params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32))
  llama = torch_llama(model) if _TORCH.value else None
  rows = []
  for sb in (int(x) for x in _SAMPLE_BATCHES.value):
    prompts = np.concatenate([
        np.ones((sb, 1), np.int32),  # BOS
        rng.integers(5, 5 + _TEXT_VOCAB.value,
                     (sb, _PROMPT_LENGTH.value - 2)).astype(np.int32),
        np.full((sb, 1), 3, np.int32)], axis=1)  # BOI
    first, run_s = interleaved_sampler_s(model, params, prompts)
    ours = sb * n / run_s
    rows.append((f"[interleaved, batch {sb}] sampler compile (unimm)",
                 f"{first - run_s:.1f} s"))
    rows.append((f"[interleaved, batch {sb}] sampler tokens/s (unimm)",
                 f"{ours:,.0f}"))
    per_token = interleaved_recompute_s(model, params, prompts,
                                        min(_RECOMPUTE_TOKENS.value, n))
    rows.append((f"[interleaved, batch {sb}] tokens/s recomputing the prefix",
                 f"{sb / per_token:,.0f}  -> unimm "
                 f"{ours * per_token / sb:.1f}x"))
    if llama is not None:
      theirs = sb * n / torch_llama_generate_s(llama, prompts, n)
      rows.append((f"[interleaved, batch {sb}] tokens/s HF generate "
                   "(Llama MQA, KV cache)",
                   f"{theirs:,.0f}  -> unimm {ours / theirs:.1f}x"))
  return rows


def interleaved_training_flops(m: interleaved.InterleavedLM, batch: int,
                               length: int) -> float:
  """MaxText-style training FLOPs of one step of the decoder-only model
  (the tied read-out is a matmul, the embedding lookup is not)."""
  d, hd = m.embed_dim, m.num_heads * m.head_dim
  qkvo = 2 * d * hd + 2 * d * m.num_kv_heads * m.head_dim
  gated = m.mlp_activation in ("swiglu", "geglu")
  mlp = (3 if gated else 2) * d * m.mlp_dim
  matmul = 6 * batch * length * (m.num_layers * (qkvo + mlp) +
                                 d * m.vocab_size)
  attention = 12 * batch * hd * m.num_layers * length * length
  return float(matmul + attention)


def interleaved_train_config(size: str, image_length: int, length: int):
  """configs/interleaved_shapes.py at this benchmark's lengths and
  vocabularies, with AdamW (--optimizer) and no generation eval."""
  side = int(round(image_length ** 0.5))
  if side * side != image_length:
    raise ValueError(f"--image_length={image_length} is not a square; the "
                     "interleaved model's 2-D image positions need one.")
  config = config_lib.load_config(
      os.path.join(os.path.dirname(__file__), "..", "configs",
                   "interleaved_shapes.py") +
      f":size={size},grid={side},length={length},"
      f"text_vocab={_TEXT_VOCAB.value},codes={_IMAGE_VOCAB.value},"
      f"optimizer={_OPTIMIZER.value},scan={_SCAN.value}")
  config.model.update(width_overrides(config.model.num_heads))
  config.mesh.update(data=1, fsdp=1, tensor=1)
  config.eval.num_generation = 0
  return config


def interleaved_train_batch(rng, batch: int, length: int, image_length: int,
                            prompt_length: int) -> dict[str, np.ndarray]:
  """Packed rows of one document each: BOS, prompt text, BOI, image codes,
  EOI, text, EOS ([B, L] tokens, segment_ids, positions, loss_mask)."""
  tail = length - prompt_length - image_length - 2
  if tail < 0:
    raise ValueError(
        f"--train_length={length} holds no document of prompt_length="
        f"{prompt_length} + image_length={image_length} + 2 (EOI, EOS); "
        f"raise it to at least {length - tail}.")
  first_code = vocab.NUM_SPECIALS + _TEXT_VOCAB.value

  def text(n):
    return rng.integers(vocab.NUM_SPECIALS, first_code, (batch, n))

  def special(token):
    return np.full((batch, 1), token)

  tokens = np.concatenate([
      special(vocab.BOS), text(prompt_length - 2), special(vocab.BOI),
      rng.integers(first_code, first_code + _IMAGE_VOCAB.value,
                   (batch, image_length)),
      special(vocab.EOI), text(tail), special(vocab.EOS)], axis=1)
  segment_ids = np.ones((batch, length), np.int32)
  return dict(tokens=tokens.astype(np.int32), segment_ids=segment_ids,
              **il_data.packed_features(segment_ids))


def profile_rows(name: str, config, task, params, batch, compiled, timer,
                 step_s: float, flops: float,
                 peak: float) -> list[tuple[str, str]]:
  """Where a unimm train step's time goes: the forward (loss), the forward
  + backward and the optimizer update (clipping, AdamW) compiled alone, and
  two steps traced by jax.profiler, their thunks split into matmuls and the
  rest."""
  rng = jax.random.PRNGKey(0)

  def loss(p, b):
    return task.loss(p, {}, b, rng)[0]

  p = params["params"]
  b = jax.tree.map(jnp.asarray, batch)
  forward_s = common.timed(jax.jit(loss), p, b, repeats=2)
  backward_s = common.timed(jax.jit(jax.grad(loss)), p, b, repeats=2)
  tx = optim.make_optimizer(config.optimizer, config.total_steps)

  @jax.jit
  def update(grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  optimizer_s = common.timed(update, p, tx.init(p), p, repeats=2)
  steps = 2
  split = common.time_by_op_class(
      common.profile_op_seconds(lambda: timer(steps),
                                os.path.join(_PROFILE_DIR.value, name)),
      compiled.as_text())
  total = sum(sum(kinds.values()) for kinds in split.values())
  matmul_total = sum(split["matmul"].values())
  matmul_s = matmul_total / steps

  def shares(kinds):
    top = sorted(kinds.items(), key=lambda kv: -kv[1])[:5]
    return ", ".join(f"{k} {v / total:.0%}" for k, v in top)

  return [(f"[{name}] profile: forward alone / forward + backward / step",
           f"{forward_s:.2f} / {backward_s:.2f} / {step_s:.2f} s "
           f"(forward {forward_s / step_s:.0%}, backward "
           f"{(backward_s - forward_s) / step_s:.0%}, optimizer and the "
           f"rest {(step_s - backward_s) / step_s:.0%} of the step)"),
          (f"[{name}] profile: optimizer update alone (clipping, AdamW)",
           f"{optimizer_s:.2f} s ({optimizer_s / step_s:.0%} of the step)"),
          (f"[{name}] profile: thunk time, matmuls",
           f"{matmul_total / total:.0%} ({shares(split['matmul'])})"
           f"; at {flops / matmul_s / 1e9:.0f} GFLOP/s = "
           f"{flops / matmul_s / peak:.0%} of the peak (model FLOPs / "
           f"matmul thunk time)"),
          (f"[{name}] profile: thunk time, the rest",
           f"{sum(split['other'].values()) / total:.0%} "
           f"({shares(split['other'])}); thunks "
           f"{total / steps:.2f} s per step")]


def compare_training(name: str, config, make_task, batch, tokens: int,
                     flops: float, peak: float, torch_ref=None,
                     torch_loss=None, torch_label: str = ""):
  """Rows for one model's train step against PyTorch eager, timed in
  --train_rounds interleaved rounds; returns (rows, params)."""
  compile_s, timer, params, compiled = unimm_train_s(
      config, make_task(config), batch)
  timers = {"ours": timer}
  layout = "scanned" if not config.model.scan_layers else "unrolled"
  if _OTHER_LAYOUT.value:  # the layers laid out the other way
    other = config.copy_and_resolve_references()
    other.model.scan_layers = not config.model.scan_layers
    timers["other"] = unimm_train_s(other, make_task(other), batch)[1]
  if torch_ref is not None:
    timers["torch"] = torch_train_timer(
        torch_ref, torch_loss, config.optimizer.grad_clip_norm)
  rounds = {key: [] for key in timers}
  for _ in range(_TRAIN_ROUNDS.value):  # interleaved: drift hits all alike
    for key, round_timer in timers.items():
      rounds[key].append(round_timer(_TRAIN_STEPS.value))
  median = {key: float(np.median(v)) for key, v in rounds.items()}

  def per_round(times):
    return ", ".join(f"{tokens / t:,.0f}" for t in times)

  rows = [(f"[{name}] train step compile (unimm)", f"{compile_s:.1f} s"),
          (f"[{name}] train tokens/s (unimm)",
           f"{tokens / median['ours']:,.0f}; per round "
           f"{per_round(rounds['ours'])}"),
          (f"[{name}] train model FLOP/s (MaxText formula)",
           f"{flops / median['ours'] / 1e9:.1f} GFLOP/s = "
           f"{flops / median['ours'] / peak:.1%} of the matmul peak")]
  if "other" in median:
    rows.append((f"[{name}] train tokens/s (unimm, layers {layout})",
                 f"{tokens / median['other']:,.0f}"))
  if "torch" in median:
    ratios = [t / o for t, o in zip(rounds["torch"], rounds["ours"])]
    rows.append((f"[{name}] train tokens/s ({torch_label})",
                 f"{tokens / median['torch']:,.0f}; per round "
                 f"{per_round(rounds['torch'])}"))
    rows.append((f"[{name}] train speed, unimm / PyTorch",
                 f"median of rounds {np.median(ratios):.2f}x; per round " +
                 ", ".join(f"{r:.2f}x" for r in ratios)))
  if _PROFILE_DIR.value:
    rows += profile_rows(name, config, make_task(config), params, batch,
                         compiled, timer, median["ours"], flops, peak)
  return rows, params


def main(_):
  run()


def run() -> list[tuple[str, str]]:
  """Measures and prints every row; returns them as (name, value)."""
  rng = np.random.default_rng(0)
  peak = common.matmul_peak_flops()
  print(f"devices {jax.device_count()} x {jax.devices()[0].platform}; "
        f"f32 matmul peak {peak / 1e9:.1f} GFLOP/s")
  rows = [("f32 matmul peak (2048^3 jnp.dot)", f"{peak / 1e9:.1f} GFLOP/s")]
  if "parti" in _MODELS.value:
    rows += run_parti(rng, peak)
  if "interleaved" in _MODELS.value:
    rows += run_interleaved_training(rng, peak)
    print(f"Interleaved {_SIZE.value}: prompt {_PROMPT_LENGTH.value} tokens "
          f"(ending in BOI), then {_IMAGE_LENGTH.value} image tokens")
    rows += run_interleaved(rng)
  width = max(len(r[0]) for r in rows)
  for name, value in rows:
    print(f"{name:<{width}}  {value}")
  return rows


def run_interleaved_training(rng, peak: float) -> list[tuple[str, str]]:
  """The interleaved task's train step against a same-size Llama."""
  config = interleaved_train_config(_SIZE.value, _IMAGE_LENGTH.value,
                                    _TRAIN_LENGTH.value)
  model = interleaved_task.InterleavedTask(config).model
  b, length = _TRAIN_BATCH.value, _TRAIN_LENGTH.value
  print(f"Interleaved {_SIZE.value} training: width {model.embed_dim}, "
        f"{model.num_layers} layers, {model.num_kv_heads} key/value heads, "
        f"batch {b} x {length} tokens")
  batch = interleaved_train_batch(rng, b, length, model.image_length,
                                  _PROMPT_LENGTH.value)
  llama = torch_llama(model) if _TORCH.value else None
  loss = torch_loss_fn(llama, input_ids=batch["tokens"],
                       labels=batch["tokens"])
  rows, _ = compare_training(
      "interleaved", config, interleaved_task.InterleavedTask, batch,
      b * length, interleaved_training_flops(model, b, length), peak,
      llama, loss, "PyTorch eager, HF Llama same size")
  return rows


def run_parti(rng, peak: float) -> list[tuple[str, str]]:
  """The Parti rows: training and sampling."""
  m_cfg = parti_config(_SIZE.value, _IMAGE_LENGTH.value)
  model = parti_train_task(m_cfg).model
  print(f"Parti {_SIZE.value}: width {model.embed_dim}, "
        f"{model.encoder_layers} + {model.decoder_layers} layers, "
        f"{model.image_length} image tokens, text {model.text_length}")

  # ---- training: the real trainer program vs PyTorch eager.
  b = _TRAIN_BATCH.value
  batch = {"text_ids": rng.integers(2, model.text_vocab_size,
                                    (b, model.text_length)).astype(np.int32),
           "image_ids": rng.integers(0, model.image_vocab_size,
                                     (b, model.image_length)).astype(np.int32)}
  torch_ref = torch_model(model) if _TORCH.value else None
  loss = torch_loss_fn(torch_ref, input_ids=batch["text_ids"],
                       labels=batch["image_ids"])
  rows, params = compare_training(
      "parti", m_cfg, parti_train_task, batch, b * model.image_length,
      training_flops(model, b), peak, torch_ref, loss,
      "PyTorch eager, HF T5 same size")
  if torch_ref is not None:
    torch_ref.eval()

  # ---- sampling.
  greedy = SamplingParams(temperature=0.0)
  for sb in (int(x) for x in _SAMPLE_BATCHES.value):
    text = jnp.asarray(rng.integers(2, model.text_vocab_size,
                                    (sb, model.text_length)), jnp.int32)
    compile_s, run_s = unimm_sampler(model, params, text, greedy)
    ours = sb * model.image_length / run_s
    rows.append((f"[batch {sb}] sampler compile (unimm)", f"{compile_s:.1f} s"))
    rows.append((f"[batch {sb}] sampler tokens/s (unimm scan + KV cache)",
                 f"{ours:,.0f}"))
    per_token = recompute_sampler(model, params, text,
                                  min(_RECOMPUTE_TOKENS.value,
                                      model.image_length))
    rows.append((f"[batch {sb}] tokens/s recomputing the prefix",
                 f"{sb / per_token:,.0f}  -> unimm {ours * per_token / sb:.1f}x"))
    if torch_ref is not None:
      gen_s = torch_generate_s(torch_ref, sb, model)
      theirs = sb * model.image_length / gen_s
      rows.append((f"[batch {sb}] tokens/s HF generate (KV cache, PyTorch)",
                   f"{theirs:,.0f}  -> unimm {ours / theirs:.1f}x"))
  return rows


if __name__ == "__main__":
  host_memory.keep_freed_memory()  # both sides allocate through glibc
  app.run(main)
