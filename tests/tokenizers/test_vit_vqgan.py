"""Tests for the ViT-VQGAN model, its size table and host-side API."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm import parallel
from unimm.tokenizers import vit_vqgan as vq

TINY = vq.vit_vqgan_config(
    "tiny", image_size=16, patch_size=4, num_codes=32, code_dim=4,
    encoder_num_layers=1, decoder_num_layers=1, encoder_embed_dim=32,
    decoder_embed_dim=32, encoder_mlp_dim=64, decoder_mlp_dim=64)


@pytest.fixture(scope="module")
def model_and_params():
  model = vq.ViTVQGAN(**TINY)
  images = jnp.zeros((2, 16, 16, 3), jnp.uint8)
  boxed = model.init(jax.random.PRNGKey(0), images)
  return model, boxed


def _images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3),
                                              dtype=np.uint8)


def test_forward_shapes(model_and_params):
  model, boxed = model_and_params
  out = model.apply(nn.unbox(boxed), jnp.asarray(_images(2)))
  assert out["mu"].shape == out["log_scale"].shape == (2, 16, 16, 3)
  assert out["recon"].shape == (2, 16, 16, 3)
  assert float(out["recon"].min()) >= 0 and float(out["recon"].max()) <= 1
  assert out["ids"].shape == (2, 4, 4) and out["ids"].dtype == jnp.int32
  assert out["latents"].shape == (2, 16, 4)
  assert set(out["losses"]) == {"codebook", "commitment", "vq"}


def test_encode_decode_consistent_with_forward(model_and_params):
  model, boxed = model_and_params
  params = nn.unbox(boxed)
  images = jnp.asarray(_images(3))
  ids = model.apply(params, images, method=model.encode)
  assert ids.shape == (3, 4, 4)
  out = model.apply(params, images)
  np.testing.assert_array_equal(ids, out["ids"])
  decoded = model.apply(params, ids, method=model.decode)
  assert decoded.shape == (3, 16, 16, 3)
  np.testing.assert_allclose(decoded, out["recon"], atol=1e-5)


def test_reconstruction_path_is_differentiable(model_and_params):
  model, boxed = model_and_params
  params = nn.unbox(boxed)
  images = jnp.asarray(_images(2))

  def loss(p):
    out = model.apply(p, images, train=True)
    return jnp.mean(jnp.square(out["recon"] - images / 255.0)) + out[
        "losses"]["vq"]

  grads = jax.grad(loss)(params)["params"]
  # Gradients reach both the decoder and, through the straight-through
  # estimator, the encoder's first layer.
  for name in ("patch_embed", "encoder_head", "decoder_head",
               "patch_unembed"):
    leaves = jax.tree.leaves(grads[name])
    assert all(np.isfinite(g).all() for g in leaves)
    assert max(float(jnp.abs(g).max()) for g in leaves) > 0, name


def test_patch_size_must_divide_image_size():
  with pytest.raises(ValueError, match="config.model.patch_size"):
    vq.validate_config(**{**TINY, "patch_size": 5})
  with pytest.raises(ValueError, match="config.model.patch_size"):
    vq.ViTVQGAN(**{**TINY, "patch_size": 5}).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3), jnp.uint8))


def test_host_api_checks_inputs(model_and_params):
  model, boxed = model_and_params
  ids = vq.encode_images(model, boxed, _images(2))
  assert ids.shape == (2, 4, 4) and ids.dtype == np.int32
  pixels = vq.decode_ids(model, boxed, ids)
  assert pixels.shape == (2, 16, 16, 3) and pixels.dtype == np.uint8
  with pytest.raises(ValueError, match="uint8"):
    vq.encode_images(model, boxed, _images(2).astype(np.float32))
  with pytest.raises(ValueError, match=r"\[N, 16, 16, 3\].*image_size"):
    vq.encode_images(model, boxed, np.zeros((2, 32, 32, 3), np.uint8))
  with pytest.raises(ValueError, match="num_codes=32"):
    vq.decode_ids(model, boxed, np.full((1, 4, 4), 32))
  with pytest.raises(ValueError, match="num_codes=32"):
    vq.decode_ids(model, boxed, np.full((1, 4, 4), -1))
  with pytest.raises(ValueError, match=r"\[N, 4, 4\]"):
    vq.decode_ids(model, boxed, np.zeros((1, 16), np.int32))


def test_size_table_matches_the_paper():
  small, base, large = (vq.SIZES[s] for s in ("small", "base", "large"))
  assert (small["encoder_num_layers"], small["encoder_embed_dim"],
          small["encoder_num_heads"], small["encoder_mlp_dim"]) == (
              8, 512, 8, 2048)
  assert (base["encoder_num_layers"], base["encoder_embed_dim"],
          base["encoder_num_heads"], base["encoder_mlp_dim"]) == (
              12, 768, 12, 3072)
  assert (large["decoder_num_layers"], large["decoder_embed_dim"],
          large["decoder_num_heads"], large["decoder_mlp_dim"]) == (
              32, 1280, 16, 5120)
  sl = vq.vit_vqgan_config("small", decoder="large")
  assert sl["encoder_embed_dim"] == 512 and sl["decoder_embed_dim"] == 1280
  assert sl["num_codes"] == 8192 and sl["code_dim"] == 32
  with pytest.raises(ValueError, match="size"):
    vq.vit_vqgan_config("huge")
  with pytest.raises(ValueError, match="Unknown ViTVQGAN fields"):
    vq.vit_vqgan_config("tiny", num_tokens=3)


@pytest.mark.parametrize("tokens", [
    {},  # the grid
    dict(num_queries=32, query_layers=12),  # SEED's paper shape
    dict(keep_ratio=0.5, merger_layers=12),  # LaVIT's (a 12-layer merger)
], ids=["grid", "seed", "lavit"])
def test_every_parameter_resolves_on_an_8_device_mesh(tokens):
  model = vq.ViTVQGAN(**vq.vit_vqgan_config("small", **tokens))
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                         jnp.zeros((1, 256, 256, 3), jnp.uint8))
  specs = nn.get_partition_spec(boxed)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(
      x, nn.LogicallyPartitioned))
  assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  shardings = nn.logical_to_mesh_sharding(specs, mesh,
                                          parallel.STANDARD_RULES)
  num_params = sum(np.prod(x.value.shape) for x in leaves)
  if not tokens:
    assert 40e6 < num_params < 80e6  # two ViT-Small stacks + heads
  assert len(jax.tree.leaves(shardings)) == len(leaves)
