"""The one sampler: every model decodes through `step` with an explicit cache.

A decode step is `step(params, cache, tokens [B, 1], position) -> (logits
[B, V], cache)`; Parti's and the interleaved model's steps differ only inside.
Image spans have a static length and decode with one `jax.lax.scan` over a
preallocated cache carried in the loop; text spans that stop at EOS use the
same step inside `jax.lax.while_loop`, and so does beam search
(`beam_decode`, for captions: the cache holds each example's beams and is
gathered after each step). Classifier-free guidance and contrastive
decoding double the batch ([cond; uncond]) and score tokens from both
halves' logits; both halves then receive the same token. Every draw is
one uniform through the softmax's cumulative sum (`inverse_cdf`), and a
loop makes its uniforms before it starts (`draw_uniforms`).

Speculative Jacobi decoding (`sjd_decode`, SamplingParams.sjd_window)
decodes an image span with a window step that scores W tokens per model
call and accepts a prefix of them; its output has the distribution of
scan_decode's (greedy: the same tokens).
"""
import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

StepFn = Callable[[Any, Any, jax.Array, jax.Array], tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to turn logits into tokens. Hashable: part of the compiled program.

  temperature 0 is greedy. top_k 0 and top_p 1 disable those filters.
  cfg_scale None disables classifier-free guidance; with a scale s the
  logits are u + s (c - u) (Parti §3, after Ho & Salimans 2022), so s = 1 is
  plain conditional sampling.

  contrastive_alpha None disables contrastive decoding; with alpha set,
  tokens are scored by CD-K (CM3Leon, arXiv 2309.02591, after Li et al.
  2022, arXiv 2210.15097): log p_c - log p_u over the plausible head
  {v : p_c(v) >= alpha * p_c^(k)}, where p_c^(k) is the contrastive_k-th
  largest conditional probability (k = 1 is Li et al.'s alpha * max);
  tokens outside the head are never drawn. The expert is the conditional
  half and the amateur the unconditional half of the same doubled batch
  that guidance uses, so CD-K and cfg_scale are alternatives, not a
  composition: setting both is an error.

  sjd_window 0 decodes image spans one token per model call; W >= 2
  decodes them by speculative Jacobi decoding (Teng et al. 2024, arXiv
  2410.01699) with W tokens per call (sjd_decode): the same distribution
  (greedy: the same tokens) in fewer calls.
  """
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  cfg_scale: float | None = None
  contrastive_alpha: float | None = None
  contrastive_k: int = 1
  sjd_window: int = 0

  @property
  def doubled(self) -> bool:
    """Whether the decoder runs a [cond; uncond] batch (2B rows): with
    guidance or contrastive decoding."""
    return self.cfg_scale is not None or self.contrastive_alpha is not None

  @classmethod
  def from_config(cls, settings, vocab_size: int) -> "SamplingParams":
    """Validated SamplingParams from a config section or dict: the keys
    temperature, top_k, top_p, cfg_scale, contrastive_alpha, contrastive_k,
    sjd_window (missing ones take the defaults above; cfg_scale or
    contrastive_alpha None or "" turns that option off, as a config writes
    it, and sjd_window None or "" is 0)."""
    get = settings.get
    cfg_scale = get("cfg_scale", None)
    alpha = get("contrastive_alpha", None)
    window = get("sjd_window", cls.sjd_window)
    return cls(
        temperature=float(get("temperature", cls.temperature)),
        top_k=int(get("top_k", cls.top_k)),
        top_p=float(get("top_p", cls.top_p)),
        cfg_scale=None if cfg_scale in (None, "") else float(cfg_scale),
        contrastive_alpha=None if alpha in (None, "") else float(alpha),
        contrastive_k=int(get("contrastive_k", cls.contrastive_k)),
        sjd_window=0 if window in (None, "") else window,
    ).validate(vocab_size)

  def validate(self, vocab_size: int) -> "SamplingParams":
    if not self.temperature >= 0:
      raise ValueError(f"temperature must be >= 0 (0 = greedy), got "
                       f"{self.temperature}.")
    if not 0 <= self.top_k <= vocab_size:
      raise ValueError(f"top_k must be in [0, vocab size {vocab_size}] "
                       f"(0 disables it), got {self.top_k}.")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1] (1 disables it), got "
                       f"{self.top_p}.")
    if self.cfg_scale is not None and not self.cfg_scale >= 0:
      raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}.")
    alpha = self.contrastive_alpha
    if alpha is not None and not 0 < alpha <= 1:
      raise ValueError(f"contrastive_alpha must be in (0, 1] (None disables "
                       f"contrastive decoding), got {self.contrastive_alpha}.")
    if not 1 <= self.contrastive_k <= vocab_size:
      raise ValueError(f"contrastive_k must be in [1, vocab size {vocab_size}]"
                       f", got {self.contrastive_k}.")
    if self.contrastive_alpha is not None and self.cfg_scale is not None:
      raise ValueError(
          f"contrastive_alpha={self.contrastive_alpha} and cfg_scale="
          f"{self.cfg_scale} are both set; contrastive decoding and guidance "
          "are alternatives over the same [cond; uncond] batch. Set "
          "cfg_scale=None to decode contrastively, or contrastive_alpha=None "
          "to guide.")
    self.check_sjd_window()
    return self

  def check_sjd_window(self) -> None:
    """ValueError unless sjd_window is 0 (off) or an int >= 2."""
    window = self.sjd_window
    if (isinstance(window, bool) or not isinstance(window, (int, np.integer))
        or window == 1 or window < 0):
      raise ValueError(
          f"sjd_window={window!r}; expected 0 (off: one token per model "
          "call) or an int >= 2 (the draft tokens speculative Jacobi "
          "decoding scores per model call, e.g. 8).")


def seed_key(seed) -> jax.Array:
  """The PRNG key (uint32 [2]) of an integer seed: [high, low] 32-bit words,
  so every seed in [0, 2**64) has its own key (jax.random.PRNGKey(seed)
  for seeds below 2**32); a negative seed counts modulo 2**64. Anything but
  an int (a float, a bool, a string) is a TypeError."""
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise TypeError(f"seed={seed!r} ({type(seed).__name__}); expected an "
                    "int.")
  seed = int(seed)
  if not -2**63 <= seed < 2**64:
    raise ValueError(f"seed={seed}; expected an int in [-2**63, 2**64).")
  seed %= 2**64
  return jnp.asarray(np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32))


def guided_logits(logits, cfg_scale):
  """[2B, V] logits of [cond; uncond] -> [B, V] guided logits."""
  cond, uncond = jnp.split(logits, 2, axis=0)
  return uncond + cfg_scale * (cond - uncond)


def contrastive_logits(logits, alpha: float, k: int, allowed=None):
  """[2B, V] logits of [cond; uncond] -> [B, V] CD-K scores.

  The score is log p_c - log p_u (CM3Leon's CD-K; Li et al. 2022)
  inside the head {v : p_c(v) >= alpha * p_c^(k)} and the float32 minimum
  outside it. The allowed mask (bool [V] or [B, V]) applies to the expert
  before the head is taken, so p_c is renormalised over the allowed tokens,
  p_c^(k) is the k-th largest allowed probability, and a disallowed token
  is never in the head. The amateur is normalised over the whole
  vocabulary: renormalising it too would shift a row's scores by a
  constant, which changes no draw.
  """
  cond, uncond = jnp.split(logits.astype(jnp.float32), 2, axis=0)
  neg = jnp.finfo(jnp.float32).min
  if allowed is not None:
    cond = jnp.where(allowed, cond, neg)
  expert = jax.nn.log_softmax(cond, axis=-1)  # [B, V]
  amateur = jax.nn.log_softmax(uncond, axis=-1)  # [B, V]
  kth = jax.lax.top_k(expert, k)[0][:, -1:]  # [B, 1]
  head = expert >= kth + jnp.log(jnp.float32(alpha))
  if allowed is not None:  # fewer than k allowed tokens: kth is disallowed
    head &= allowed
  return jnp.where(head, expert - amateur, neg)


def filter_logits(logits, sampling: SamplingParams, allowed=None):
  """Applies the allowed-token mask, top-k and top-p to logits [B, V]."""
  logits = logits.astype(jnp.float32)
  neg = jnp.finfo(jnp.float32).min
  if allowed is not None:  # bool [V] or [B, V]
    logits = jnp.where(allowed, logits, neg)
  if sampling.top_k:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]  # [B, 1]
    logits = jnp.where(logits < kth, neg, logits)
  if sampling.top_p < 1:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always >= 1 token).
    before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.where(before < sampling.top_p, sorted_logits, jnp.inf).min(
        axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, neg, logits)
  return logits


def processed_logits(logits, sampling: SamplingParams, allowed=None):
  """The scores tokens are drawn from: logits [B, V], or [2B, V] when
  sampling.doubled -> [B, V] (before the temperature).

  Guidance or CD-K first turns the two halves into one score per token;
  the allowed mask, top-k and top-p then filter it, as for plain logits
  (so top-p takes the mass of softmax(CD score), within the head).
  """
  if sampling.cfg_scale is not None:
    logits = guided_logits(logits, sampling.cfg_scale)
  elif sampling.contrastive_alpha is not None:
    logits = contrastive_logits(logits, sampling.contrastive_alpha,
                                sampling.contrastive_k, allowed)
  return filter_logits(logits, sampling, allowed)


def next_token(logits, u, sampling: SamplingParams, allowed=None):
  """Samples one token per row from logits [B, V], or [2B, V] when
  sampling.doubled -> [B]: processed_logits scaled by the temperature
  (0: the argmax), drawn by inverse_cdf with the uniforms u [B]
  (draw_uniforms)."""
  logits = processed_logits(logits, sampling, allowed)
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return inverse_cdf(jax.nn.softmax(logits / sampling.temperature, axis=-1),
                     u)


def draw_uniforms(rng, shape) -> jax.Array:
  """Uniforms in (0, 1) of `shape`, for a whole decoding loop's draws.

  The loops make them in one call before they start and index them per
  step: on a CPU every jax.random call inside a loop body is a loop of its
  own (the threefry rounds), which costs as much as a tiny model's whole
  step.
  """
  return jax.random.uniform(rng, shape, minval=jnp.finfo(jnp.float32).tiny)


def inverse_cdf(weights, u):
  """A draw from each row of weights [..., V] by one uniform u [...] in
  (0, 1): the first index whose cumulative weight exceeds u times the
  total. weights are >= 0 and not all 0 (not necessarily normalised); their
  leading axes broadcast against u's. Zero weights are never drawn. One
  uniform per draw, where jax.random.categorical's Gumbel-max makes V
  variates, five to eight times slower on a CPU."""
  cdf = jnp.cumsum(weights.astype(jnp.float32), axis=-1)
  threshold = u[..., None] * cdf[..., -1:]
  return jnp.minimum(jnp.sum(cdf < threshold, axis=-1),
                     weights.shape[-1] - 1).astype(jnp.int32)


def _both_halves(tokens, sampling):
  if not sampling.doubled:
    return tokens
  return jnp.concatenate([tokens, tokens], axis=0)


def scan_decode(step: StepFn, params, cache, first_tokens, start_position,
                num_tokens: int, rng, sampling: SamplingParams, allowed=None,
                active=None, pad_id: int = 0):
  """Decodes exactly `num_tokens` tokens with one lax.scan.

  first_tokens [B]: the token at `start_position` (e.g. BOS or the last
  prompt token); each scan step feeds one token and samples the next.
  When sampling.doubled (CFG or CD-K) the cache holds 2B rows
  ([cond; uncond]). active [B] bool
  (optional): inactive rows are fed and emit pad_id (for steps that, like
  the interleaved model's, ignore pad tokens). Returns (tokens
  [B, num_tokens] int32, cache).
  """

  def body(carry, xs):
    cache, tokens = carry  # tokens: [B]
    i, u = xs
    logits, cache = step(params, cache, _both_halves(tokens, sampling)[:, None],
                         start_position + i)
    tokens = next_token(logits, u, sampling, allowed)
    if active is not None:
      tokens = jnp.where(active, tokens, pad_id)
    return (cache, tokens), tokens

  if active is not None:
    first_tokens = jnp.where(active, first_tokens, pad_id)

  (cache, _), tokens = jax.lax.scan(
      body, (cache, first_tokens.astype(jnp.int32)),
      (jnp.arange(num_tokens, dtype=jnp.int32),
       draw_uniforms(rng, (num_tokens, first_tokens.shape[0]))))
  return tokens.T, cache  # [B, num_tokens]


WindowStepFn = Callable[[Any, Any, jax.Array, jax.Array],
                        tuple[jax.Array, Any]]


@flax.struct.dataclass
class _JacobiState:
  cache: Any
  seq: jax.Array  # [B, N + W]: the fed token, then tokens and drafts
  q: jax.Array  # [B, W - 1, V] the distributions the drafts were drawn from
  t: jax.Array  # [B] tokens accepted per row
  i: jax.Array  # scalar: model calls so far


def sjd_decode(window_step: WindowStepFn, params, cache, first_tokens,
               start_position, num_tokens: int, rng, sampling: SamplingParams,
               allowed=None, active=None, pad_id: int = 0):
  """scan_decode's tokens by speculative Jacobi decoding, in one while_loop.

  Speculative Jacobi decoding (SJD; Teng et al. 2024, arXiv 2410.01699)
  keeps W - 1 draft tokens (W = sampling.sjd_window, cut to num_tokens)
  after each row's accepted ones. One call window_step(params, cache,
  tokens [B', W], position) -> (logits [B', W, V], cache) scores the last
  accepted token and the drafts, fed at position..position+W-1 (causal
  within the window, the cache before it). Drafts are accepted left to
  right by the speculative test (accept x w.p. min(1, p(x) / q(x)), q the
  distribution x was drawn from); the first rejected one is replaced by a
  draw from the residual max(0, p - q) normalised, or, when every draft
  passes, one more token is drawn from p (Leviathan et al. 2023, §2.3).
  So each call makes 1 to W tokens, and the output has exactly the
  distribution of scan_decode's; at temperature 0 a draft passes iff it is
  the argmax, which gives scan_decode's greedy tokens. p is
  processed_logits (guidance or CD-K over [cond; uncond], the allowed mask,
  top-k, top-p) over the temperature. The tokens p gives after the new
  one are the next drafts (q = p, as SJD's Jacobi iteration); drafts
  beyond the window are drawn uniformly over the allowed tokens.

  Rows accept different numbers of tokens but share the cache position:
  each call starts at the slowest row's first unaccepted token (at most
  num_tokens - W), and a row that is ahead feeds its accepted tokens again
  (their keys and values do not change) before its drafts. Cache slots
  past the accepted tokens hold drafts' keys and values until a later call
  overwrites them; causal masks keep them unseen. active [B] bool and
  pad_id as scan_decode. Returns (tokens [B, num_tokens] int32, cache,
  model calls: a scalar int32, num_tokens or fewer).
  """
  sampling.check_sjd_window()
  if not sampling.sjd_window:
    raise ValueError("sjd_decode needs sampling.sjd_window >= 2 (0 decodes "
                     "with scan_decode).")
  n, b = num_tokens, first_tokens.shape[0]
  w = min(sampling.sjd_window, n)
  greedy = sampling.temperature == 0
  first_tokens = first_tokens.astype(jnp.int32)
  if active is not None:
    first_tokens = jnp.where(active, first_tokens, pad_id)
  # The vocabulary size V, from the window step's output shape.
  probe = jnp.zeros((first_tokens.shape[0] * (2 if sampling.doubled else 1),
                     w), jnp.int32)
  v = jax.eval_shape(lambda c, x: window_step(params, c, x, start_position)[0],
                     cache, probe).shape[-1]
  # Uniform drafts over the allowed tokens (SJD's initialisation).
  allowed_v = jnp.ones((v,), bool) if allowed is None else allowed
  uniform = jnp.broadcast_to(allowed_v / jnp.sum(allowed_v, axis=-1,
                                                 keepdims=True),
                             (b, v)).astype(jnp.float32)  # [B, V]

  def uniform_drafts(u):  # uniforms [B, W - 1] -> drafts [B, W - 1]
    return inverse_cdf(uniform[:, None], u)  # [B, 1, V] broadcasts

  # Each call's uniforms (draw_uniforms; every draw by inverse_cdf): the
  # acceptance tests [B, W - 1], the new token [B, 1], the call's own draws
  # [B, W] and the uniform drafts [B, W - 1]; greedy needs only the last.
  # Call n's are the first drafts'.
  sizes = [w - 1, 1, w, w - 1]
  if greedy:
    sizes = sizes[-1:]
  all_uniforms = draw_uniforms(rng, (n + 1, b, sum(sizes)))

  def uniforms(i):
    return jnp.split(all_uniforms[i], np.cumsum(sizes)[:-1], axis=1)

  def per_row(x, index):  # x [B, K, ...] at index [B, J] -> [B, J, ...]
    index = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)

  def cond(s):
    return (s.i < n) & (jnp.min(s.t) < n)

  def body(s):
    *noise, noise_init = uniforms(s.i)
    start = jnp.minimum(jnp.min(s.t), n - w)  # the window's first slot
    window = jax.lax.dynamic_slice_in_dim(s.seq, start, w, axis=1)  # [B, W]
    logits, cache = window_step(params, s.cache,
                                _both_halves(window, sampling),
                                start_position + start)  # [B', W, V]
    rows_allowed = allowed
    if allowed is not None and allowed.ndim == 2:  # [B, V] -> [B * W, V]
      rows_allowed = jnp.repeat(allowed, w, axis=0)
    scores = processed_logits(logits.reshape(-1, v), sampling, rows_allowed)
    scores = scores.reshape(b, w, v)  # [B, W, V]
    # Relative to each row's first unaccepted token t: j = 0..W-1 scores
    # token t + j given the accepted tokens and drafts t..t+j-1.
    offset = s.t - start  # [B] >= 0
    valid = jnp.maximum(w - offset, 0)  # [B] positions this call scores
    rel = jnp.clip(offset[:, None] + jnp.arange(w), 0, w - 1)  # [B, W]
    scores = per_row(scores, rel)
    drafts = per_row(s.seq, 1 + s.t[:, None] + jnp.arange(w - 1))  # [B, W-1]
    checked = jnp.arange(w - 1) < valid[:, None] - 1  # drafts in the window
    if greedy:
      best = jnp.argmax(scores, axis=-1).astype(jnp.int32)  # [B, W]
      passed = drafts == best[:, :-1]
    else:
      p = jax.nn.softmax(scores / sampling.temperature, axis=-1)  # [B, W, V]
      p_draft = jnp.take_along_axis(p[:, :-1], drafts[..., None],
                                    axis=-1)[..., 0]  # [B, W - 1]
      q_draft = jnp.take_along_axis(s.q, drafts[..., None], axis=-1)[..., 0]
      noise_accept, noise_new, noise_fresh = noise
      passed = noise_accept * q_draft < p_draft  # w.p. min(1, p / q)
    passed &= checked
    k = jnp.sum(jnp.cumprod(passed, axis=1), axis=1)  # [B] accepted drafts
    moves = valid > 0
    k = jnp.where(moves, k, 0)
    if greedy:
      token = per_row(best, k[:, None])[:, 0]
      fresh = best
    else:
      p_k = per_row(p, k[:, None])[:, 0]  # [B, V]
      q_k = per_row(s.q, jnp.minimum(k, w - 2)[:, None])[:, 0]
      residual = jnp.maximum(p_k - q_k, 0.0)
      use_residual = (k < valid - 1) & (jnp.sum(residual, axis=-1) > 0)
      token = inverse_cdf(jnp.where(use_residual[:, None], residual, p_k),
                           noise_new[:, 0])
      fresh = inverse_cdf(p, noise_fresh)
    # The next drafts: this call's tokens after the new one, then uniform.
    source = k[:, None] + 1 + jnp.arange(w - 1)  # [B, W - 1]
    scored = source < valid[:, None]
    new_drafts = jnp.where(scored, per_row(fresh, jnp.minimum(source, w - 1)),
                           uniform_drafts(noise_init))
    if greedy:
      new_q = s.q
    else:
      new_q = jnp.where(scored[..., None],
                        per_row(p, jnp.minimum(source, w - 1)),
                        uniform[:, None])
      new_q = jnp.where(moves[:, None, None], new_q, s.q)
    tail = jnp.concatenate([token[:, None], new_drafts], axis=1)  # [B, W]
    written = jax.vmap(lambda row, x, i: jax.lax.dynamic_update_slice(
        row, x, (i,)))(s.seq, tail, 1 + s.t + k)
    seq = jnp.where(moves[:, None], written, s.seq)
    t = jnp.where(moves, s.t + k + 1, s.t)
    return _JacobiState(cache, seq, new_q, t, s.i + 1)

  drafts = uniform_drafts(uniforms(n)[-1])
  t = jnp.zeros((b,), jnp.int32)
  if active is not None:  # inactive rows are done: PAD throughout
    drafts = jnp.where(active[:, None], drafts, pad_id)
    t = jnp.where(active, t, n)
  seq = jnp.full((b, n + w), pad_id, jnp.int32).at[:, 0].set(first_tokens)
  seq = seq.at[:, 1:w].set(drafts)
  q = jnp.broadcast_to(uniform[:, None], (b, w - 1, v))
  s = jax.lax.while_loop(cond, body, _JacobiState(cache, seq, q, t,
                                                  jnp.zeros((), jnp.int32)))
  return s.seq[:, 1:n + 1], s.cache, s.i


@flax.struct.dataclass
class _WhileState:
  cache: Any
  tokens: jax.Array  # [B] the last token fed
  output: jax.Array  # [B, max_tokens]
  done: jax.Array  # [B] bool
  length: jax.Array  # [B] tokens emitted up to and including the stop token
  i: jax.Array  # scalar step


def while_decode(step: StepFn, params, cache, first_tokens, start_position,
                 max_tokens: int, rng, sampling: SamplingParams, stop_tokens,
                 allowed=None, pad_id: int = 0, done=None):
  """Decodes until every row emitted a stop token or max_tokens were made.

  The same step and logits processing as scan_decode, in lax.while_loop.
  A row's stop token is not fed (the cache ends before it); rows that
  stopped then receive pad_id (their outputs are masked); done
  [B] bool (optional) marks rows that are finished from the start.
  Returns (tokens [B, max_tokens], lengths [B], cache, steps taken).
  """
  b = first_tokens.shape[0]
  stop_tokens = jnp.asarray(stop_tokens, jnp.int32).reshape(-1)
  all_uniforms = draw_uniforms(rng, (max_tokens, b))

  def cond(s):
    return (s.i < max_tokens) & ~jnp.all(s.done)

  def body(s):
    logits, cache = step(params, s.cache, _both_halves(s.tokens, sampling)[:, None],
                         start_position + s.i)
    tokens = next_token(logits, all_uniforms[s.i], sampling, allowed)
    tokens = jnp.where(s.done, pad_id, tokens)
    output = s.output.at[:, s.i].set(tokens)
    stopped = jnp.isin(tokens, stop_tokens) & ~s.done
    length = jnp.where(s.done, s.length, s.i + 1)
    # A stop token is emitted but not fed: the caller decides what follows
    # it (e.g. feeds BOI to start an image span).
    fed = jnp.where(stopped, pad_id, tokens)
    return _WhileState(cache, fed, output, s.done | stopped, length,
                       s.i + 1)

  done = jnp.zeros((b,), bool) if done is None else done.astype(bool)
  init = _WhileState(cache,
                     jnp.where(done, pad_id, first_tokens).astype(jnp.int32),
                     jnp.full((b, max_tokens), pad_id, jnp.int32),
                     done, jnp.zeros((b,), jnp.int32),
                     jnp.zeros((), jnp.int32))
  s = jax.lax.while_loop(cond, body, init)
  return s.output, s.length, s.cache, s.i


@flax.struct.dataclass
class _BeamState:
  cache: Any  # B*K rows, beam-major within each example
  tokens: jax.Array  # [B*K] the last token fed
  output: jax.Array  # [B, K, max_tokens]
  scores: jax.Array  # [B, K] summed log-probabilities
  done: jax.Array  # [B, K] bool: the beam emitted a stop token
  i: jax.Array  # scalar step


def beam_decode(step: StepFn, params, cache, first_tokens, start_position,
                max_tokens: int, beam_size: int, stop_tokens, reorder,
                allowed=None, pad_id: int = 0):
  """Beam search with the same step and cache as while_decode.

  The cache holds B * beam_size rows (each example's beams adjacent) and
  first_tokens [B * beam_size] repeats each example's next token. Beams
  are ranked by their summed log-probability (no length penalty); a beam
  that emitted a stop token is finished and goes on at no cost, fed
  pad_id. reorder(cache, rows [B * beam_size]) gathers cache rows (each
  model knows its cache layout). The search ends when every example's
  beams are all finished (none can then overtake them: log-probabilities
  only fall) or after max_tokens. Returns (tokens [B, beam_size,
  max_tokens], PAD after each beam's stop token; scores [B, beam_size];
  steps taken): every example's final beams, best first (an n-best list).
  """
  bk = first_tokens.shape[0]
  if bk % beam_size:
    raise ValueError(f"{bk} rows is not a multiple of beam_size "
                     f"{beam_size}.")
  b, k = bk // beam_size, beam_size
  stop_tokens = jnp.asarray(stop_tokens, jnp.int32).reshape(-1)
  greedy = SamplingParams(temperature=0.0)

  def cond(s):
    return (s.i < max_tokens) & ~jnp.all(s.done)

  def body(s):
    logits, cache = step(params, s.cache, s.tokens[:, None],
                         start_position + s.i)
    logp = jax.nn.log_softmax(filter_logits(logits, greedy, allowed), axis=-1)
    v = logp.shape[-1]
    logp = logp.reshape(b, k, v)
    # A finished beam has one continuation, PAD, at no cost.
    finished = jnp.where(jnp.arange(v) == pad_id, 0.0, -jnp.inf)
    logp = jnp.where(s.done[..., None], finished, logp)
    candidates = (s.scores[..., None] + logp).reshape(b, k * v)
    scores, index = jax.lax.top_k(candidates, k)  # [B, K]
    parent, tokens = index // v, (index % v).astype(jnp.int32)
    rows = (jnp.arange(b)[:, None] * k + parent).reshape(-1)
    was_done = jnp.take_along_axis(s.done, parent, axis=1)
    output = jnp.take_along_axis(s.output, parent[..., None], axis=1)
    tokens = jnp.where(was_done, pad_id, tokens)
    output = output.at[:, :, s.i].set(tokens)
    stopped = jnp.isin(tokens, stop_tokens) & ~was_done
    fed = jnp.where(stopped | was_done, pad_id, tokens).reshape(-1)
    return _BeamState(reorder(cache, rows), fed, output, scores,
                      was_done | stopped, s.i + 1)

  # Only the first beam of each example is live at the start: k copies of
  # one prefix would fill the beam with one hypothesis.
  scores = jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf)
  init = _BeamState(cache, first_tokens.astype(jnp.int32),
                    jnp.full((b, k, max_tokens), pad_id, jnp.int32),
                    jnp.broadcast_to(scores, (b, k)),
                    jnp.zeros((b, k), bool), jnp.zeros((), jnp.int32))
  s = jax.lax.while_loop(cond, body, init)
  # top_k keeps the beams sorted: beam 0 is the best.
  return s.output, s.scores, s.i
