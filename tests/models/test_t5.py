"""T5 encoder: unimm's port matches transformers' T5EncoderModel on random
weights that the test creates and saves (the Hugging Face layout)."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from unimm.models import t5

torch = pytest.importorskip("torch")  # the "torch-ref" / "test" extra
transformers = pytest.importorskip("transformers")


def _save_random_t5(directory: str, feed_forward_proj: str) -> None:
  torch.manual_seed(0)
  config = transformers.T5Config(
      vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2,
      num_heads=4, feed_forward_proj=feed_forward_proj,
      relative_attention_num_buckets=8, relative_attention_max_distance=20,
      dropout_rate=0.0)
  model = transformers.T5EncoderModel(config).eval()
  with torch.no_grad():  # non-trivial norm scales
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.mul_(1.0 + 0.5 * torch.rand_like(p))
  model.save_pretrained(directory, safe_serialization=True)


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])
def test_outputs_match_transformers(tmp_path, feed_forward_proj):
  directory = str(tmp_path / feed_forward_proj)
  _save_random_t5(directory, feed_forward_proj)
  rng = np.random.default_rng(0)
  ids = rng.integers(2, 100, (3, 30))  # long enough for the log buckets
  mask = np.ones_like(ids)
  mask[1, 21:] = 0
  mask[2, 5:] = 0
  ids = ids * mask
  reference = transformers.T5EncoderModel.from_pretrained(directory).eval()
  with torch.no_grad():
    want = reference(input_ids=torch.tensor(ids),
                     attention_mask=torch.tensor(mask)).last_hidden_state
  model, params = t5.load_t5_encoder(directory)
  got = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(got)[valid], want.numpy()[valid],
                             atol=1e-4, rtol=1e-4)


def test_buckets_match_transformers():
  from transformers.models.t5 import modeling_t5  # pylint: disable=g-import-not-at-top
  relative = torch.arange(200)[None, :] - torch.arange(200)[:, None]
  want = modeling_t5.T5Attention._relative_position_bucket(
      relative, bidirectional=True, num_buckets=32, max_distance=128)
  np.testing.assert_array_equal(
      t5.relative_position_buckets(200, 200, 32, 128), want.numpy())


def test_a_wrong_shape_names_the_tensor(tmp_path):
  directory = str(tmp_path / "t5")
  _save_random_t5(directory, "relu")
  with open(os.path.join(directory, "config.json")) as f:
    config = json.load(f)
  config["d_ff"] = 96  # the saved wi/wo are 128 wide
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match=r"DenseReluDense\.wi\.weight"):
    t5.load_t5_encoder(directory)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="No T5 config"):
    t5.load_t5_encoder(str(tmp_path))


def test_parti_text_encoder_starts_from_the_checkpoint(tmp_path):
  import sys  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from unimm import config_lib  # pylint: disable=g-import-not-at-top
  from unimm.models import parti  # pylint: disable=g-import-not-at-top
  directory = str(tmp_path / "t5")
  _save_random_t5(directory, "gated-gelu")
  configs = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
  sys.path.insert(0, os.path.abspath(configs))
  import parti_shapes  # pylint: disable=g-import-not-at-top
  config = parti_shapes.get_config(f"t5={directory},text_vocab=64,grid=2")
  assert config.t5_checkpoint == directory
  config.model.update(embed_dim=32, num_heads=2, num_kv_heads=2,
                      head_dim=16, mlp_dim=64, decoder_layers=1)
  model = config_lib.build_module(parti.Parti, config.model)
  assert model.text_vocab_size == 100  # raised to T5's vocabulary
  ids = jnp.asarray(np.random.default_rng(1).integers(1, 100, (2, 24)))
  params = model.init(jax.random.key(0), ids, jnp.zeros((2, 4), jnp.int32))
  params = parti.load_t5_into(params, directory)
  t5_out = model.apply(params, ids, method=lambda m, x: m.t5(x, x != 0))
  reference = transformers.T5EncoderModel.from_pretrained(directory).eval()
  with torch.no_grad():
    want = reference(input_ids=torch.tensor(np.asarray(ids))
                     ).last_hidden_state.numpy()
  np.testing.assert_allclose(t5_out, want, atol=1e-4, rtol=1e-4)
  encoded, _ = model.apply(params, ids, method=parti.Parti.encode)
  assert encoded.shape == (2, 24, 32)  # projected to the decoder's width
  logits = model.apply(params, ids, jnp.zeros((2, 4), jnp.int32))
  assert logits.shape == (2, 4, 512) and np.isfinite(logits).all()
