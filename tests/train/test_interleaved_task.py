"""The interleaved task: the loss falls on packed documents; the trainer
trains and evaluates it."""
import json
import os
import shutil
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unimm import api
from unimm import export
from unimm.inference import interleaved as inference
from unimm.data import interleaved as il_data
from unimm.tokenizers import text as text_lib
from unimm.train import trainer
from unimm.train.interleaved_task import InterleavedTask
from unimm.train.interleaved_task import drop_text

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "..", "configs")))
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "data")))
import interleaved_shapes  # noqa: E402  pylint: disable=g-import-not-at-top
import test_pretokenize  # noqa: E402  pylint: disable=g-import-not-at-top

LENGTH, TEXT_VOCAB, CODES, GRID = 160, 64, 16, 4


def tiny_config(packed_dir, arg="", **kw):
  config = interleaved_shapes.get_config(
      f"size=tiny,steps=2,batch=4,length={LENGTH},text_vocab={TEXT_VOCAB},"
      f"codes={CODES},grid={GRID},packed_dir={packed_dir}{arg}")
  config.model.update(embed_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
                      num_layers=2)
  config.eval.update(batch_size=4, num_batches=2, num_generation=0)
  config.log_every_steps = 1
  for key, value in kw.items():
    config[key] = value
  return config


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("interleaved_task")
  workdir = test_pretokenize.make_tokenizer_workdir(str(root / "tok"),
                                                    str(root / "tfds"))
  spiece = text_lib.train_sentencepiece(il_data.document_texts(300),
                                        TEXT_VOCAB, str(root / "spiece"))
  out = str(root / "packed")
  tokenizer = api.load_tokenizer(workdir)
  for split, num in (("train", 40), ("validation", 12)):
    il_data.write_interleaved(tokenizer, spiece, out, split, num, LENGTH,
                              documents_per_batch=20, encode_batch_size=16,
                              tokenizer_workdir=workdir)
  return dict(packed_dir=out, tokenizer_workdir=workdir, text_tokenizer=spiece)


@pytest.fixture(scope="module")
def packed_dir(files):
  return files["packed_dir"]


def test_loss_falls_on_a_fixed_batch(packed_dir):
  task = InterleavedTask(tiny_config(packed_dir))
  batch = next(iter(task.train_data(0, 1)))
  assert batch["tokens"].shape == (4, LENGTH)
  params, state = task.init(jax.random.PRNGKey(0), batch)
  params = nn.unbox(params)
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}

  @jax.jit
  def step(params, opt_state):
    (loss, (metrics, _)), grads = jax.value_and_grad(
        task.loss, has_aux=True)(params, state, batch, None)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, metrics

  losses = []
  for _ in range(12):
    params, opt_state, loss, metrics = step(params, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.7 * losses[0], losses
  # Both modalities are in the batch and are learned.
  assert metrics["text_loss"] > 0 and metrics["image_loss"] > 0
  assert set(metrics) == {"text_loss", "image_loss", "text_accuracy",
                          "image_accuracy", "tokens_per_row"}


def test_loss_weights_move_the_total_between_modalities(packed_dir):
  task = InterleavedTask(tiny_config(packed_dir))
  batch = {k: jnp.asarray(v) for k, v in next(iter(
      task.train_data(0, 1))).items()}
  params, state = task.init(jax.random.PRNGKey(1), batch)
  _, (metrics, _) = task.loss(params, state, batch, None)
  for text_weight, image_weight, expected in (
      (1.0, 0.0, "text_loss"), (0.0, 1.0, "image_loss")):
    config = tiny_config(packed_dir)
    config.loss.update(text_weight=text_weight, image_weight=image_weight)
    loss, _ = InterleavedTask(config).loss(params, state, batch, None)
    np.testing.assert_allclose(float(loss), float(metrics[expected]),
                               rtol=1e-5)


def test_trainer_trains_evaluates_and_the_model_generates(files, tmp_path,
                                                         monkeypatch):
  import test_parti_task  # pylint: disable=g-import-not-at-top
  test_parti_task.use_pixel_probe(monkeypatch)  # no probe training here
  config = tiny_config(files["packed_dir"],
                       tokenizer_workdir=files["tokenizer_workdir"],
                       text_tokenizer=files["text_tokenizer"])
  config.data.batch_size = 8  # the 8 test devices each take a row
  config.eval.update(num_generation=3, generation_batch_size=3,
                     cfg_scale=2.0)
  workdir = str(tmp_path / "run")
  state = trainer.train(config, workdir, InterleavedTask(config))
  assert int(state.step) == 2
  with open(os.path.join(workdir, "eval", "report.json")) as f:
    report = json.load(f)
  assert report["steps"] == 2 and report["eval_loss"] > 0
  assert report["cfg_scale"] == 2.0
  assert report["caption_beams"] == config.eval.caption_beams > 1
  assert report["caption_rerank_weight"] == config.eval.caption_rerank > 0
  for key in ("prompt_accuracy_single", "caption_accuracy", "edit_accuracy",
              "reconstructed_prompt_accuracy_single",
              "reconstructed_edit_accuracy"):
    assert 0.0 <= report[key] <= 1.0
  assert os.path.exists(os.path.join(workdir, "eval", "documents.png"))

  model = api.load_model(workdir)
  assert isinstance(model, api.InterleavedModel)
  # The API's defaults are the eval's settings.
  assert model.settings["cfg_scale"] == 2.0
  assert model.settings["caption_beams"] == config.eval.caption_beams
  images = model.sample(["a big red circle", "a small blue star"], seed=0,
                        cfg_scale=None)
  assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(images, model.sample(
      ["a big red circle", "a small blue star"], seed=0, cfg_scale=None))
  np.testing.assert_array_equal(
      model.sample(["a big red circle", "a small blue star"], seed=0),
      model.sample(["a big red circle", "a small blue star"], seed=0,
                   cfg_scale=2.0))
  guided = model.sample(["a big red circle", "a small blue star"], seed=0,
                        cfg_scale=3.0)
  assert guided.shape == images.shape
  np.testing.assert_array_equal(images, model.sample(
      ["a big red circle", "a small blue star"], seed=0, cfg_scale=1.0))
  with pytest.raises(ValueError, match="cfg_scale must be >= 0"):
    model.sample(["a big red circle"], cfg_scale=-1.0)
  # A row that ends asking for one image too many (BOI past max_images):
  # the unfinished span is dropped, the finished one kept.
  layout = model.layout
  codes = layout.image_span(  # BOI, codes, EOI
      (np.arange(GRID * GRID) % CODES).reshape(GRID, GRID))
  row = np.concatenate([layout.text_to_joint(np.array([7, 8])), codes,
                        [3], [0, 0]])
  kinds = [type(s).__name__ for s in model._segments(row)]  # pylint: disable=protected-access
  assert kinds == ["str", "ndarray"], kinds
  captions = model.caption(images, num_beams=1, rerank_weight=0.0)
  assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
  # caption() asks as the training documents do: image, then the request.
  asked = model.generate_batch(
      [[image, il_data.CAPTION_PROMPT] for image in images], temperature=0.0,
      max_new_tokens=48, max_images=0, max_text_tokens=48)
  assert captions == [" ".join(s.strip() for s in out) for out in asked]
  beamed = model.caption(images, num_beams=3)
  assert len(beamed) == 2 and all(isinstance(c, str) for c in beamed)
  with pytest.raises(ValueError, match="temperature=0 or num_beams=1"):
    model.caption(images, num_beams=3, temperature=0.5)
  # Reranked by the image's likelihood alone (a weight that drowns the
  # caption's): the beam whose caption makes the image likeliest, by a full
  # forward pass over [BOS, caption, BOI, codes].
  from unimm.models import interleaved as il  # pylint: disable=g-import-not-at-top
  from unimm.models import vocab  # pylint: disable=g-import-not-at-top
  rows, _ = model._encode([[image, il_data.CAPTION_PROMPT]  # pylint: disable=protected-access
                           for image in images])
  beams, _ = il.beam_search_text(
      model.model, {"params": model.params}, inference.left_pad(rows),
      text_ids=model._text_ids(), eos_id=vocab.EOS, beam_size=3,  # pylint: disable=protected-access
      max_text_tokens=48)
  reranked = model.caption(images, num_beams=3, rerank_weight=1e6)
  picks = []
  for row, candidates, got in zip(rows, beams, reranked):
    codes = row[2:2 + GRID * GRID]
    image_lp = []
    for beam in candidates:
      text = [t for t in beam if t not in (vocab.PAD, vocab.EOS)]
      doc = np.array([vocab.BOS, *text, vocab.BOI, *codes], np.int32)
      logits = np.asarray(model.model.apply(
          {"params": model.params}, doc[None])[0], np.float64)
      logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
      image_lp.append(sum(logp[t - 1, doc[t]]
                          for t in range(len(text) + 2, len(doc))))
    picks.append(int(np.argmax(image_lp)))
    best = candidates[picks[-1]]
    assert got == " ".join(s.strip() for s in model._segments(best)  # pylint: disable=protected-access
                           if isinstance(s, str))
  assert any(picks)  # not the best beam somewhere (else this proves nothing)
  with pytest.raises(ValueError, match="pass num_beams > 1"):
    model.caption(images, num_beams=1, rerank_weight=0.5)
  with pytest.raises(ValueError, match="rerank_weight=-1"):
    model.caption(images, num_beams=3, rerank_weight=-1.0)
  new = model.generate(["a big red circle", images[0], "make it blue"],
                       seed=1, max_new_tokens=24, max_images=1)
  for segment in new:
    assert isinstance(segment, str) or segment.shape == (32, 32, 3)
  # Its tokenizers gone: the error names the setting to fix.
  for path, setting in ((files["tokenizer_workdir"], "tokenizer_workdir"),
                        (files["text_tokenizer"], "text_tokenizer")):
    os.rename(path, path + ".moved")
    try:
      with pytest.raises(ValueError, match=f"needs {setting}="):
        api.load_model(workdir)
    finally:
      os.rename(path + ".moved", path)
  with pytest.raises(ValueError, match=r"expected uint8 \[32, 32, 3\]"):
    model.generate([np.zeros((64, 64, 3), np.uint8)])
  # Exported, moved and loaded without its tokenizers' folders: the same
  # captions and samples.
  out = str(tmp_path / "export")
  assert export.export(workdir, out)["task"] == "interleaved"
  moved = str(tmp_path / "moved" / "il")
  shutil.move(out, moved)
  gone = [files["tokenizer_workdir"], files["text_tokenizer"], workdir]
  for path in gone:
    os.rename(path, path + ".gone")
  try:
    travelled = api.load_model(moved)
    np.testing.assert_array_equal(
        travelled.sample(["a big red circle", "a small blue star"], seed=0,
                         cfg_scale=None), images)
    assert travelled.caption(images, num_beams=1,
                             rerank_weight=0.0) == captions
  finally:
    for path in gone:
      os.rename(path + ".gone", path)
  with pytest.raises(ValueError, match="config.model.max_len"):
    model.generate(["a big red circle " * 200])


def test_lavit_tokens_train_and_sample_as_variable_length_spans(
    files, tmp_path, monkeypatch):
  """Rows packed with a LaVIT tokenizer (spans of each image's kept codes)
  need config.model.end_of_image (dynamic=1); that model trains,
  evaluates, and writes images of up to GRID^2 codes ended by its own EOI,
  which the tokenizer decodes with the empty slots -1."""
  import test_parti_task  # pylint: disable=g-import-not-at-top
  test_parti_task.use_pixel_probe(monkeypatch)  # no probe training here
  tok = test_pretokenize.make_tokenizer_workdir(
      str(tmp_path / "lavit"), str(tmp_path / "tfds"), keep_ratio=0.5,
      merger_layers=1)
  tokenizer = api.load_tokenizer(tok)
  out = str(tmp_path / "packed")
  for split, num in (("train", 24), ("validation", 8)):
    meta = il_data.write_interleaved(
        tokenizer, files["text_tokenizer"], out, split, num, LENGTH,
        encode_batch_size=16, tokenizer_workdir=tok)
  assert meta["end_of_image"]
  with pytest.raises(ValueError, match="variable-length image spans.*"
                     "dynamic=1"):
    InterleavedTask(tiny_config(out)).train_data(0, 1)
  config = tiny_config(out, ",dynamic=1", tokenizer_workdir=tok,
                       text_tokenizer=files["text_tokenizer"])
  assert config.model.end_of_image and config.model.image_positions == "1d"
  config.data.batch_size = 8
  config.eval.update(num_generation=2, generation_batch_size=2,
                     caption_beams=1, caption_rerank=0.0)
  workdir = str(tmp_path / "run")
  trainer.train(config, workdir, InterleavedTask(config))
  with open(os.path.join(workdir, "eval", "report.json")) as f:
    report = json.load(f)
  assert np.isfinite(report["eval_loss"])
  assert 0.0 <= report["prompt_accuracy_single"] <= 1.0

  model = api.load_model(workdir)
  prompts = ["a big red circle", "a small blue star", "a green square"]
  images = model.sample(prompts, seed=0, temperature=1.0, cfg_scale=None)
  # The same draw, decoded by hand: each span's codes then -1.
  rows = [np.concatenate([r, [3]]) for r in model._encode(  # pylint: disable=protected-access
      [[p] for p in prompts])[0]]
  out_ids = model._continue(  # pylint: disable=protected-access
      rows, seed=0, temperature=1.0, top_k=0, top_p=1.0, cfg_scale=None,
      image_temperature=1.0, max_new_tokens=GRID * GRID + 1, max_images=1,
      max_text_tokens=1)
  ids = np.full((len(prompts), 1, GRID * GRID), -1, np.int32)
  for i, row in enumerate(out_ids):
    codes = [t - model.layout.image_offset for t in row[:GRID * GRID]
             if model.layout.is_image(t)]
    ids[i, 0, :len(codes)] = codes
  np.testing.assert_array_equal(images, tokenizer.decode(ids))


def test_mismatched_vocabulary_is_a_clear_error(packed_dir):
  config = tiny_config(packed_dir)
  config.vocab.text_vocab_size = TEXT_VOCAB + 1
  config.model.vocab_size = 5 + TEXT_VOCAB + 1 + CODES
  with pytest.raises(ValueError, match="config.model.vocab_size"):
    InterleavedTask(config).train_data(0, 1)
  config.model.vocab_size = 7
  with pytest.raises(ValueError, match="set vocab_size = 5"):
    InterleavedTask(config)


def test_grounding_evals_without_location_ids_fail_at_construction(
    packed_dir):
  for name in ("num_referring", "num_grounded", "num_drawn"):
    config = tiny_config(packed_dir)
    config.eval[name] = 5
    with pytest.raises(ValueError, match=f"'{name}': 5.*bins=16"):
      InterleavedTask(config)


def test_a_context_too_short_for_the_eval_fails_at_construction(packed_dir):
  config = tiny_config(packed_dir)
  config.eval.num_generation = 4
  config.model.max_len = 3 * GRID * GRID + 39
  with pytest.raises(ValueError, match="length=.*num_generation=0"):
    InterleavedTask(config)
  config.model.max_len += 1
  InterleavedTask(config)


def test_text_dropout_is_what_the_unconditional_sampler_sees(packed_dir):
  """drop_text removes a document's text and compacts its row; the model's
  logits on it equal a cached prefill of the document with its text as PAD
  (the CFG unconditional half), and rate 0 changes nothing."""
  config = tiny_config(packed_dir)
  task = InterleavedTask(config)
  batch = {k: jnp.asarray(v) for k, v in next(iter(
      task.train_data(0, 1))).items()}
  rng = jax.random.PRNGKey(3)
  same = drop_text(batch, rng, 0.0, task.is_text)
  for key in batch:
    np.testing.assert_array_equal(same[key], batch[key])
  dropped = drop_text(batch, rng, 1.0, task.is_text)
  tokens, segments = np.asarray(batch["tokens"]), np.asarray(
      batch["segment_ids"])
  is_text = np.asarray(task.is_text(batch["tokens"]))
  assert is_text.any()
  for row in range(tokens.shape[0]):
    keep = (segments[row] > 0) & ~is_text[row]
    n = int(keep.sum())
    np.testing.assert_array_equal(dropped["tokens"][row, :n],
                                  tokens[row][keep])
    np.testing.assert_array_equal(dropped["segment_ids"][row, :n],
                                  segments[row][keep])
    assert not np.asarray(dropped["segment_ids"][row, n:]).any()
    np.testing.assert_array_equal(
        np.asarray(dropped["positions"][row]),
        il_data.packed_features(np.asarray(dropped["segment_ids"][row:row + 1]
                                           ))["positions"][0])
  params, _ = task.init(jax.random.PRNGKey(0), batch)
  params = {"params": nn.unbox(params)}
  model = task.model
  logits = model.apply(params, dropped["tokens"], dropped["segment_ids"],
                       dropped["positions"])
  doc = tokens[0][segments[0] == 1]
  as_pad = np.where(np.asarray(task.is_text(jnp.asarray(doc))), 0, doc)
  cache = model.init_cache(1, len(doc))
  cached, _ = model.apply(params, jnp.asarray(as_pad)[None], cache, 0,
                          method=type(model).decode_step)
  last = int((np.asarray(dropped["segment_ids"][0]) == 1).sum()) - 1
  np.testing.assert_allclose(cached[0], logits[0, last], atol=1e-5, rtol=1e-5)
