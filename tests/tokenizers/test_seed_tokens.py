"""SEED's 1-D causal tokens in the ViT-VQGAN (num_queries=K): a query never
sees a later one (gradient test), the ids are [N, 1, K] and decode as the
forward pass reconstructs, the saved tokenizer loads and round-trips,
and bad settings are clear errors (sharding: test_vit_vqgan)."""
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm import api
from unimm import config_lib
from unimm.tokenizers import vit_vqgan as vq
from unimm.train import upsampler_task

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(HERE, "..", "..", "configs")
sys.path.insert(0, os.path.join(HERE, "..", "data"))
import test_pretokenize  # noqa: E402  pylint: disable=g-import-not-at-top
from test_vit_vqgan import _images  # noqa: E402  pylint: disable=g-import-not-at-top

K = 5
SEED = vq.vit_vqgan_config(
    "tiny", image_size=16, patch_size=4, num_codes=32, code_dim=4,
    encoder_num_layers=1, decoder_num_layers=1, encoder_embed_dim=32,
    decoder_embed_dim=32, encoder_mlp_dim=64, decoder_mlp_dim=64,
    num_queries=K, query_layers=2, scan_layers=False)


@pytest.fixture(scope="module")
def model_and_params():
  model = vq.ViTVQGAN(**SEED)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0),
                                       jnp.zeros((1, 16, 16, 3), jnp.uint8)))
  return model, params


def test_a_query_never_sees_a_later_one(model_and_params):
  model, params = model_and_params
  images = jnp.asarray(_images(2))

  def features(queries):  # [K]: each token's features, summed
    p = {"params": dict(params["params"], queries=queries)}
    x = model.apply(p, images, False,
                    method=vq.ViTVQGAN._encode_features)  # pylint: disable=protected-access
    return jnp.sum(x, axis=(0, 2))

  jacobian = np.abs(np.asarray(jax.jit(jax.jacrev(features))(
      params["params"]["queries"]))).sum(axis=-1)  # [K tokens, K queries]
  for k in range(K):
    # Token k depends on queries 0..k and on nothing after them.
    assert np.all(jacobian[k, :k + 1] > 0), k
    np.testing.assert_array_equal(jacobian[k, k + 1:], 0.0)


def test_ids_are_one_row_of_k_and_decode_as_the_forward(model_and_params):
  model, params = model_and_params
  images = jnp.asarray(_images(3))
  out = model.apply(params, images)
  assert model.grid == (1, K) and model.patch_grid == (4, 4)
  assert out["ids"].shape == (3, 1, K) and out["latents"].shape == (3, K, 4)
  ids = model.apply(params, images, method=vq.ViTVQGAN.encode)
  np.testing.assert_array_equal(ids, out["ids"])
  np.testing.assert_allclose(
      model.apply(params, ids, method=vq.ViTVQGAN.decode), out["recon"],
      atol=1e-5)
  # The host API checks the 1-D shape like the grid's.
  decoded = vq.decode_ids(model, params, np.asarray(ids))
  assert decoded.shape == (3, 16, 16, 3) and decoded.dtype == np.uint8
  with pytest.raises(ValueError, match=rf"\[N, 1, {K}\]"):
    vq.decode_ids(model, params, np.zeros((1, 2, 2), np.int32))


def test_a_saved_seed_tokenizer_loads_and_round_trips(tmp_path):
  """Saved by the trainer's checkpointer, loaded by load_tokenizer."""
  workdir = test_pretokenize.make_tokenizer_workdir(
      str(tmp_path / "tok"), str(tmp_path / "tfds"), num_queries=3)
  tokenizer = api.load_tokenizer(workdir)
  assert tokenizer.grid == (1, 3) and tokenizer.model.patch_grid == (4, 4)
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3),
                                             dtype=np.uint8)
  ids = tokenizer.encode(images)
  assert ids.shape == (2, 1, 3)
  decoded = tokenizer.decode(ids)
  assert decoded.shape == (2, 32, 32, 3) and decoded.dtype == np.uint8
  # The upsampler cannot place 1-D tokens in the image: a clear error.
  config = config_lib.load_config(os.path.join(
      CONFIGS, f"upsampler_shapes.py:tokenizer_workdir={workdir}"))
  with pytest.raises(ValueError, match="config arg codes=0"):
    upsampler_task.UpsamplerTask(config)


def test_bad_settings_are_clear_errors():
  images = jnp.zeros((1, 16, 16, 3), jnp.uint8)
  for bad, match in ((dict(num_queries=-2), "num_queries=-2"),
                     (dict(num_queries=2.5), "num_queries=2.5"),
                     (dict(query_layers=0), "query_layers=0")):
    with pytest.raises(ValueError, match=match):
      vq.ViTVQGAN(**dict(SEED, **bad)).init(jax.random.PRNGKey(0), images)
