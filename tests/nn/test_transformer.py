"""Properties of the shared transformer stack and attention."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm import nn as unn

B, T, D = 2, 12, 32


def make_stack(**overrides):
  kw = dict(num_layers=2, embed_dim=D, num_heads=4, num_kv_heads=2,
            head_dim=8, mlp_dim=64, causal=True, use_rope=True)
  kw.update(overrides)
  return unn.TransformerStack(**kw)


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_cached_decoding_equals_full_forward(scan_layers, num_kv_heads):
  stack = make_stack(scan_layers=scan_layers, num_kv_heads=num_kv_heads,
                     qk_norm=True, mlp_activation="swiglu", norm="rmsnorm")
  x = jax.random.normal(jax.random.key(0), (B, T, D))
  params = stack.init(jax.random.key(1), x)
  full = stack.apply(params, x)  # [B, T, D]

  cache = unn.init_cache(2, B, 16, num_kv_heads, 8)
  # Prefill 5 tokens, then decode one at a time.
  out, cache = stack.apply(params, x[:, :5], cache=cache, cache_index=0)
  outs = [out]
  for i in range(5, T):
    out, cache = stack.apply(params, x[:, i:i + 1], cache=cache,
                             cache_index=i)
    outs.append(out)
  cached = jnp.concatenate(outs, axis=1)
  np.testing.assert_allclose(cached, full, atol=1e-5, rtol=1e-5)


def test_cross_attention_cache_reuses_encoder_keys():
  stack = make_stack(cross_attention=True)
  x = jax.random.normal(jax.random.key(0), (B, T, D))
  enc = jax.random.normal(jax.random.key(2), (B, 7, D))
  enc_mask = jnp.array([[1] * 7, [1] * 4 + [0] * 3], bool)
  params = stack.init(jax.random.key(1), x, encoded=enc, encoded_mask=enc_mask)
  full = stack.apply(params, x, encoded=enc, encoded_mask=enc_mask)

  cache = unn.init_cache(2, B, T, 2, 8, cross_len=7)
  out, cache = stack.apply(params, x[:, :1], encoded=enc,
                           encoded_mask=enc_mask, cache=cache, cache_index=0)
  outs = [out]
  for i in range(1, T):  # the encoder output is no longer passed
    out, cache = stack.apply(params, x[:, i:i + 1], encoded_mask=enc_mask,
                             cache=cache, cache_index=i)
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)
  # Padding in the encoder is masked: changing padded memory changes nothing.
  enc2 = enc.at[1, 4:].set(100.0)
  full2 = stack.apply(params, x, encoded=enc2, encoded_mask=enc_mask)
  np.testing.assert_allclose(full2, full, atol=1e-5)


def test_packed_segments_do_not_see_each_other():
  stack = make_stack(use_rope=False)
  x = jax.random.normal(jax.random.key(0), (1, 10, D))
  params = stack.init(jax.random.key(1), x)
  seg = jnp.array([[1] * 6 + [2] * 4])
  pos = jnp.array([list(range(6)) + list(range(4))])
  packed = stack.apply(params, x, segment_ids=seg, positions=pos)
  first = stack.apply(params, x[:, :6])
  second = stack.apply(params, x[:, 6:])
  np.testing.assert_allclose(packed[:, :6], first, atol=1e-5)
  np.testing.assert_allclose(packed[:, 6:], second, atol=1e-5)


def test_bidirectional_encoder_sees_the_future():
  stack = make_stack(causal=False, use_rope=False)
  x = jax.random.normal(jax.random.key(0), (1, 6, D))
  params = stack.init(jax.random.key(1), x)
  a = stack.apply(params, x)
  x2 = x.at[:, -1].set(jax.random.normal(jax.random.key(3), (1, D)))
  b = stack.apply(params, x2)
  assert not np.allclose(a[:, 0], b[:, 0], atol=1e-3)
  causal = make_stack(causal=True, use_rope=False)
  a = causal.apply(params, x)
  b = causal.apply(params, x2)
  np.testing.assert_allclose(a[:, 0], b[:, 0], atol=1e-6)


def _unstack_layers(tree, num_layers):
  """Scanned params ('layers', stacked on a leading axis) -> the unrolled
  layout ('layers_0', 'layers_1', ...)."""
  out = {}
  for key, value in tree.items():
    if key == "layers":
      for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], value)
    elif isinstance(value, dict):
      out[key] = _unstack_layers(value, num_layers)
    else:
      out[key] = value
  return out


# The decoder of Parti (cross-attention, learned positions outside the
# stack) and of the interleaved model (causal RoPE, QK-norm, RMSNorm, MQA).
STACKS = {
    "parti_decoder": dict(cross_attention=True, use_rope=False),
    "interleaved": dict(qk_norm=True, norm="rmsnorm", num_kv_heads=1,
                        mlp_activation="swiglu"),
}


# Unoptimised XLA:CPU code compiles ~2x faster; equality needs no speed.
FAST_COMPILE = {"xla_backend_optimization_level": 0,
                "xla_cpu_use_fusion_emitters": False}


@pytest.mark.parametrize("stack_kind, remat_policy",
                         [("parti_decoder", "full"), ("interleaved", "dots")])
def test_remat_and_scan_give_the_same_function(stack_kind, remat_policy):
  """Scanned and unrolled layers, with remat off and on, compute the same
  outputs and gradients from the same weights (mapped between layouts)."""
  kw = STACKS[stack_kind]
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (B, T, D))
  inputs = {}
  if kw.get("cross_attention"):
    inputs = dict(encoded=jax.random.normal(keys[1], (B, 7, D)),
                  encoded_mask=jnp.array([[1] * 7, [1] * 4 + [0] * 3], bool))
  models = {(scan, remat): make_stack(scan_layers=scan, remat_policy=remat,
                                      **kw)
            for scan in (True, False) for remat in ("none", remat_policy)}
  scanned_params = nn.unbox(models[True, "none"].init(keys[2], x, **inputs))
  unrolled_params = _unstack_layers(scanned_params, 2)
  # The mapped tree is exactly the unrolled model's layout.
  expected = nn.unbox(jax.eval_shape(models[False, "none"].init, keys[2], x,
                                     **inputs))
  assert jax.tree.structure(unrolled_params) == jax.tree.structure(expected)
  jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape),
               unrolled_params, expected)
  layers = unrolled_params["params"]
  query = [layers[f"layers_{i}"]["self_attention"]["query"]["kernel"]
           for i in range(2)]
  assert not np.allclose(query[0], query[1])  # a swapped order would show

  def forward_and_grads(model, params):
    def loss(params):
      out = model.apply(params, x, **inputs)
      return jnp.sum(jnp.sin(out)), out
    return jax.jit(jax.grad(loss, has_aux=True)).lower(params).compile(
        FAST_COMPILE)

  runs = {}  # (scan, remat): (compiled function, gradients, outputs)
  for (scan, remat), model in models.items():
    params = scanned_params if scan else unrolled_params
    fn = forward_and_grads(model, params)
    runs[scan, remat] = (fn, *fn(params))
  _, want_grads, want = runs[True, "none"]
  tight = dict(rtol=1e-5, atol=1e-5)
  for (scan, remat), (_, grads, out) in runs.items():
    where = f"scan_layers={scan}, remat_policy={remat}"
    np.testing.assert_allclose(out, want, err_msg=where, **tight)
    jax.tree.map(lambda a, b, where=where: np.testing.assert_allclose(
        a, b, err_msg=where, **tight), grads,
                 want_grads if scan else _unstack_layers(want_grads, 2))
  # Swapping the two layers' weights changes the function.
  swapped = dict(layers, layers_0=layers["layers_1"],
                 layers_1=layers["layers_0"])
  unrolled_fn = runs[False, remat_policy][0]
  assert not np.allclose(unrolled_fn({"params": swapped})[1], want,
                         atol=1e-3)


def test_every_parameter_has_logical_axis_names():
  stack = make_stack(cross_attention=True, qk_norm=True)
  x = jnp.zeros((B, T, D))
  boxed = jax.eval_shape(stack.init, jax.random.key(0), x, encoded=x)
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed, is_leaf=lambda l: isinstance(l, nn.Partitioned))
  assert leaves and all(isinstance(l, nn.Partitioned) for _, l in leaves)
  for path, leaf in leaves:
    assert len(leaf.names) == len(leaf.value.shape)
    if "layers" in jax.tree_util.keystr(path):  # scanned: stacked on 'layers'
      assert leaf.names[0] == "layers"
      assert leaf.value.shape[0] == 2


def test_bad_settings_raise_before_compiling():
  with pytest.raises(ValueError, match="num_kv_heads"):
    make_stack(num_heads=4, num_kv_heads=3).init(jax.random.key(0),
                                                 jnp.zeros((1, 4, D)))
  with pytest.raises(ValueError, match="remat_policy"):
    make_stack(remat_policy="sometimes").init(jax.random.key(0),
                                              jnp.zeros((1, 4, D)))


def _reference_attention(q, k, v, mask, bias):
  """Plain grouped attention, differentiated by autodiff."""
  b, t, n, h = q.shape
  g = n // k.shape[2]
  logits = jnp.einsum("btnh,bsnh->bnts", q / np.sqrt(h),
                      jnp.repeat(k, g, axis=2))
  logits = logits + bias
  logits = jnp.where(mask[:, None], logits, unn.attention.NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bnts,bsnh->btnh", probs, jnp.repeat(v, g, axis=2))


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_attention_gradients_match_autodiff(num_kv_heads):
  """The hand-written backward (probabilities recomputed from row
  statistics, FlashAttention's row sums) gives autodiff's gradients, with
  a broadcast bias and rows that are masked entirely (padding)."""
  b, t, s, n, h = 2, 5, 7, 4, 8
  keys = jax.random.split(jax.random.PRNGKey(0), 6)
  q = jax.random.normal(keys[0], (b, t, n, h))
  k = jax.random.normal(keys[1], (b, s, num_kv_heads, h))
  v = jax.random.normal(keys[2], (b, s, num_kv_heads, h))
  bias = jax.random.normal(keys[3], (1, n, t, s))
  mask = jax.random.bernoulli(keys[4], 0.6, (b, t, s)).at[:, 2].set(False)
  cotangent = jax.random.normal(keys[5], (b, t, n, h))

  def loss(fn):
    return lambda q, k, v, bias: jnp.sum(fn(q, k, v, mask, bias) * cotangent)

  ours = lambda q, k, v, mask, bias: unn.attention.dot_product_attention(
      q, k, v, mask, bias=bias)
  np.testing.assert_allclose(ours(q, k, v, mask, bias),
                             _reference_attention(q, k, v, mask, bias),
                             atol=1e-5)
  grads = jax.grad(loss(ours), argnums=(0, 1, 2, 3))(q, k, v, bias)
  expected = jax.grad(loss(_reference_attention), argnums=(0, 1, 2, 3))(
      q, k, v, bias)
  for name, got, want in zip("q k v bias".split(), grads, expected):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5,
                               err_msg=name)


def test_weighted_attention_with_0_1_weights_is_masked_attention():
  """LaVIT's float mask: 0/1 weights give the boolean mask's attention (up
  to its eps), GQA included; the weights get a gradient; an all-zero row
  is finite."""
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (B, 5, 4, 8))
  k = jax.random.normal(keys[1], (B, 7, 2, 8))
  v = jax.random.normal(keys[2], (B, 7, 2, 8))
  mask = jax.random.bernoulli(keys[3], 0.6, (B, 5, 7)).at[:, :, 0].set(True)
  weights = mask.astype(jnp.float32)
  np.testing.assert_allclose(
      unn.weighted_attention(q, k, v, weights),
      unn.dot_product_attention(q, k, v, mask), atol=1e-5)
  grad = jax.grad(lambda w: jnp.sum(unn.weighted_attention(q, k, v, w)))(
      weights)
  assert np.all(np.isfinite(grad)) and np.abs(grad).sum() > 0
  empty = unn.weighted_attention(q, k, v, jnp.zeros((B, 5, 7)))
  assert np.all(np.isfinite(empty))
