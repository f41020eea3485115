"""LaVIT's dynamic tokens in the ViT-VQGAN (keep_ratio > 0): the selector
keeps exactly the sampled patches, in raster order, and the reconstruction
loss's straight-through gradient reaches it; ids are the kept codes then
-1 and decode as the forward pass reconstructs, whatever else is in the
batch; the host API round-trips and the interleaved packer writes spans
of each image's kept codes (sharding: test_vit_vqgan); bad settings and
ids are clear errors."""
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from unimm import config_lib
from unimm.data import interleaved
from unimm.data import pretokenize
from unimm.data import shapes
from unimm.inference import tokenizer as tokenizer_lib
from unimm.models import vocab
from unimm.tokenizers import text as text_lib
from unimm.tokenizers import dynamic
from unimm.tokenizers import vit_vqgan as vq
from unimm.train import vqgan_task

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(HERE, "..", "..", "configs")
from test_vit_vqgan import _images  # noqa: E402  pylint: disable=g-import-not-at-top

LAVIT = vq.vit_vqgan_config(
    "tiny", image_size=16, patch_size=4, num_codes=32, code_dim=4,
    encoder_num_layers=1, decoder_num_layers=1, encoder_embed_dim=32,
    decoder_embed_dim=32, encoder_mlp_dim=64, decoder_mlp_dim=64,
    keep_ratio=0.5, merger_layers=2, scan_layers=False)
N = 16  # 4x4 patches


@pytest.fixture(scope="module")
def model_and_params():
  model = vq.ViTVQGAN(**LAVIT)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0),
                                       jnp.zeros((1, 16, 16, 3), jnp.uint8)))
  return model, params


def _train_forward(model, params, images, seed=1):
  return jax.jit(lambda p, x: model.apply(
      p, x, True, rngs={"selector": jax.random.PRNGKey(seed)}))(params, images)


def test_the_straight_through_sample_is_hard_and_has_the_soft_gradient():
  log_probs = jax.nn.log_softmax(jnp.asarray(
      np.random.default_rng(0).normal(size=(4000, 2)), jnp.float32))
  rng = jax.random.PRNGKey(3)
  sample = dynamic.straight_through_gumbel(log_probs, rng)
  np.testing.assert_array_equal(np.sort(np.unique(sample)), [0.0, 1.0])
  np.testing.assert_array_equal(sample.sum(-1), 1.0)
  gumbel = jax.random.gumbel(rng, log_probs.shape)
  np.testing.assert_array_equal(
      sample[:, 0], (jnp.argmax(log_probs + gumbel, -1) == 0))
  # Keep is drawn with probability p_keep: 4,000 draws within 4 sigma.
  p = np.exp(np.asarray(log_probs[:, 0]))
  assert abs(sample[:, 0].sum() - p.sum()) < 4 * np.sqrt(np.sum(p * (1 - p)))
  grad = jax.grad(lambda lp: jnp.sum(
      dynamic.straight_through_gumbel(lp, rng)[:, 0] * jnp.arange(4000.)))(
          log_probs)
  soft_grad = jax.grad(lambda lp: jnp.sum(jax.nn.softmax(
      lp + gumbel)[:, 0] * jnp.arange(4000.)))(log_probs)
  np.testing.assert_allclose(grad, soft_grad, rtol=1e-5, atol=1e-6)


def test_the_selector_keeps_exactly_the_sampled_patches_in_raster_order(
    model_and_params):
  model, params = model_and_params
  images = jnp.asarray(_images(3))
  out = _train_forward(model, params, images)
  keep = np.asarray(out["keep"])
  assert set(np.unique(keep)) <= {0.0, 1.0} and 0 < keep.sum() < keep.size
  ids = np.asarray(out["ids"]).reshape(3, N)

  def codes(m, images, keep):  # every patch's code under these decisions
    x = m.merger(m.encoder_tokens(images), keep)
    return m.quantizer.encode(jnp.tanh(m.encoder_head(x)))

  every = np.asarray(jax.jit(functools.partial(model.apply, method=codes))(
      params, images, jnp.asarray(keep)))
  for b in range(3):
    kept = keep[b] > 0.5
    n = int(kept.sum())
    np.testing.assert_array_equal(ids[b, :n], every[b][kept])
    np.testing.assert_array_equal(ids[b, n:], -1)
    np.testing.assert_array_equal(np.asarray(out["token_mask"][b]),
                                  np.arange(N) < n)


def test_the_reconstruction_gradient_reaches_the_selector(model_and_params):
  model, params = model_and_params
  images = jnp.asarray(_images(3))
  target = images.astype(jnp.float32) / 255.0

  def l2(p):  # the reconstruction alone, not the keep-ratio penalty
    out = _train_forward(model, {"params": p}, images)
    return jnp.mean(jnp.square(out["recon"] - target))

  grads = jax.jit(jax.grad(l2))(params["params"])
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(
      grads["selector"])]
  assert all(np.isfinite(norms)) and sum(norms) > 0, norms
  # The keep-ratio penalty is (ratio - the batch's kept fraction)^2.
  out = _train_forward(model, params, images)
  np.testing.assert_allclose(
      out["losses"]["keep"], (0.5 - float(np.mean(out["keep"]))) ** 2,
      rtol=1e-5)


@pytest.mark.parametrize("token_decoder", ["cross", "joint"])
def test_ids_decode_as_the_forward_whatever_shares_the_batch(
    model_and_params, token_decoder):
  model, params = model_and_params
  if token_decoder != model.token_decoder:
    model = model.clone(token_decoder=token_decoder)
    params = nn.unbox(jax.jit(model.init)(
        jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3), jnp.uint8)))
  images = jnp.asarray(_images(4))
  decode = jax.jit(functools.partial(model.apply, method=vq.ViTVQGAN.decode))
  out = jax.jit(model.apply)(params, images)  # keep where it is likelier
  ids = jax.jit(functools.partial(model.apply, method=vq.ViTVQGAN.encode))(
      params, images)
  np.testing.assert_array_equal(ids, out["ids"])
  assert ids.shape == (4, 1, N) and model.grid == (1, N)
  decoded = decode(params, ids)
  np.testing.assert_allclose(decoded, out["recon"], atol=1e-5)
  # One image decodes the same alone as beside images of other lengths.
  lengths = np.sum(np.asarray(ids) >= 0, axis=(1, 2))
  assert len(set(lengths.tolist())) > 1, lengths
  for b in range(4):
    alone = decode(params, ids[b:b + 1])
    np.testing.assert_allclose(alone[0], decoded[b], atol=1e-5)
  host = vq.decode_ids(model, params, np.asarray(ids))
  assert host.shape == (4, 16, 16, 3) and host.dtype == np.uint8


def test_sampled_encoding_is_one_fixed_draw_per_patch_slot(
    model_and_params):
  """keep_at_encode="sampled" (LaVIT draws at inference too): the same
  image gets the same tokens, alone or in a batch."""
  model, params = model_and_params
  model = model.clone(keep_at_encode="sampled")
  encode = jax.jit(functools.partial(model.apply, method=vq.ViTVQGAN.encode))
  images = jnp.asarray(_images(3))
  ids = np.asarray(encode(params, images))
  np.testing.assert_array_equal(np.asarray(encode(params, images[1:2]))[0],
                                ids[1])
  np.testing.assert_array_equal(np.asarray(encode(params, images)), ids)
  likelier = np.asarray(jax.jit(functools.partial(
      model.clone(keep_at_encode="likelier").apply,
      method=vq.ViTVQGAN.encode))(params, images))
  assert not np.array_equal(ids, likelier)  # another rule, other tokens


def test_the_scanned_rematerialized_merger_is_the_same_function():
  """Rematerialized blocks, unrolled or scanned (what pod configs use: the
  recomputed blocks' attention weights are not kept), give the plain
  merger's outputs and gradients; scanning stacks the blocks' parameters
  on a leading "layers" axis."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 6, 16)), jnp.float32)
  keep = jnp.asarray(rng.integers(0, 2, size=(2, 6)), jnp.float32)
  kw = dict(num_layers=2, embed_dim=16, num_heads=2, mlp_dim=32)
  plain = dynamic.TokenMerger(**kw)
  params = nn.unbox(plain.init(jax.random.PRNGKey(0), x, keep))
  stacked = {"params": {k: v for k, v in params["params"].items()
                        if not k.startswith("layers_")}}
  stacked["params"]["layers"] = jax.tree.map(
      lambda *leaves: jnp.stack(leaves),
      *[params["params"][f"layers_{i}"] for i in range(2)])

  w = jnp.asarray(rng.normal(size=(2, 6, 16)), jnp.float32)

  def loss(model, p, keep):  # not sum(out ** 2): the final norm fixes it
    return jnp.sum(model.apply(p, x, keep) * w)

  want_out = plain.apply(params, x, keep)
  want_grads = jax.grad(functools.partial(loss, plain), (0, 1))(params, keep)
  for model, p in (
      (dynamic.TokenMerger(remat_policy="full", **kw), params),
      (dynamic.TokenMerger(scan_layers=True, remat_policy="full", **kw),
       stacked)):
    assert jax.tree.structure(p) == jax.tree.structure(
        nn.unbox(model.init(jax.random.PRNGKey(0), x, keep)))
    np.testing.assert_allclose(model.apply(p, x, keep), want_out,
                               rtol=1e-5, atol=1e-6)
    grads = jax.grad(functools.partial(loss, model), (0, 1))(p, keep)
    np.testing.assert_allclose(grads[1], want_grads[1], rtol=1e-5,
                               atol=1e-6)
    got = grads[0]["params"]
    if "layers" in got:  # unstack the scanned blocks' gradients
      got = dict(got, **{f"layers_{i}": jax.tree.map(
          lambda g, i=i: g[i], got["layers"]) for i in range(2)})
      del got["layers"]
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4,
                                   atol=1e-6), got, want_grads[0]["params"])


def test_the_interleaved_packer_writes_each_image_s_kept_codes(
    model_and_params, tmp_path):
  """The host API encodes and decodes; packed interleaved rows hold each
  image as BOI, its kept codes, EOI: spans of varying length (up to N),
  and the metadata says so (the interleaved task then needs
  config.model.end_of_image). (A saved 1-D tokenizer's load:
  test_seed_tokens.)"""
  model, params = model_and_params
  tokenizer = tokenizer_lib.Tokenizer(model, params,
                                      ml_collections.ConfigDict(), 1)
  images = np.asarray(_images(2))  # the host API round trip first
  ids = tokenizer.encode(images)
  assert ids.shape == (2, 1, N) and ids.min() >= -1
  assert tokenizer.decode(ids).shape == images.shape
  spiece = text_lib.train_sentencepiece(
      interleaved.document_texts(200), 48, str(tmp_path / "spiece"))
  out = str(tmp_path / "packed")
  num = 12
  metadata = interleaved.write_interleaved(
      tokenizer, spiece, out, "train", num, 128, kinds=("caption_image",))
  assert metadata["end_of_image"] and metadata["image_length"] == N
  layout = vocab.VocabLayout(metadata["layout"]["text_vocab_size"],
                             model.num_codes)
  scenes = [interleaved.make_document(metadata["seed"], i,
                                      ("caption_image",)).scenes[0]
            for i in range(num)]
  kept = tokenizer.encode(np.stack([shapes.render(scene, 16)
                                    for scene in scenes]))[:, 0]
  source = pretokenize.shard_source(out, "train", metadata,
                                    metadata["num_rows"])
  lengths = []
  for r in range(len(source)):
    record = interleaved.parse_row(source[r])
    for s, index in enumerate(record["documents"], start=1):
      [(_, codes)] = [seg for seg in layout.segments(
          record["tokens"][record["segment_ids"] == s]) if seg[0] == "image"]
      want = kept[index][kept[index] >= 0]
      np.testing.assert_array_equal(codes, want)
      lengths.append(len(codes))
  assert len(lengths) == num and len(set(lengths)) > 1, lengths


def test_bad_settings_and_ids_are_clear_errors(model_and_params):
  images = jnp.zeros((1, 16, 16, 3), jnp.uint8)
  for bad, match in ((dict(keep_ratio=1.5), r"keep_ratio=1.5.*\(0, 1\]"),
                     (dict(keep_ratio=-0.25), r"keep_ratio=-0.25"),
                     (dict(keep_ratio="half"), r"keep_ratio='half'"),
                     (dict(num_queries=4), "two kinds of tokens"),
                     (dict(merger_layers=0), "merger_layers=0"),
                     (dict(token_decoder="both"), "token_decoder='both'"),
                     (dict(keep_at_encode="top"), "keep_at_encode='top'")):
    with pytest.raises(ValueError, match=match):
      vq.ViTVQGAN(**dict(LAVIT, **bad)).init(jax.random.PRNGKey(0), images)
  with pytest.raises(ValueError, match="keep_ratio=2.0"):  # before compiling
    vqgan_task.ViTVQGANTask(config_lib.load_config(os.path.join(
        CONFIGS, "vit_vqgan_shapes.py:keep=2.0")))
  model, params = model_and_params
  hole = np.full((1, 1, N), -1, np.int32)
  hole[0, 0, 3] = 5  # a valid id after an empty slot
  with pytest.raises(ValueError, match="after an empty slot"):
    vq.decode_ids(model, params, hole)
  with pytest.raises(ValueError, match=r"-1 <= id"):
    vq.decode_ids(model, params, np.full((1, 1, N), -2, np.int32))
