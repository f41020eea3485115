"""The interleaved task with images read as Fuyu patches or through a
resampler: packed rows carry the read images, the trainer trains and saves
the model, and the loaded model's captions, answers and scores are those of
the full forward pass (cached decoding with reads is exact). On the same
rows, NExT-GPT / SEED-X output queries regress each written slot's own
code vector."""
import dataclasses
import functools
import inspect
import json
import os

import flax
import jax
import numpy as np
import optax
import pytest

from unimm import api
from unimm.data import grounding
from unimm.data import interleaved as il_data
from unimm.data import questions
from unimm.data import shapes
from unimm.inference.interleaved import InterleavedModel
from unimm.models import diffusion as detok_model
from unimm.models import image_input as image_input_lib
from unimm.models import vocab
from unimm.tokenizers import text as text_lib
from unimm.train import trainer
from unimm.train.interleaved_task import InterleavedTask

import test_interleaved_task as base  # pylint: disable=g-import-not-at-top
import test_image_output_task  # pylint: disable=g-import-not-at-top
import test_pretokenize  # pylint: disable=g-import-not-at-top

QUERIES, PATCH = 3, 8


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
  root = tmp_path_factory.mktemp("image_input_tokenizers")
  tokenizer_workdir = test_pretokenize.make_tokenizer_workdir(
      str(root / "tok"), str(root / "tfds"))
  spiece = text_lib.train_sentencepiece(il_data.document_texts(300),
                                        base.TEXT_VOCAB, str(root / "spiece"))
  return tokenizer_workdir, spiece


def _run(kind, tokenizers, tmp_path_factory):
  root = tmp_path_factory.mktemp(f"image_input_{kind}")
  tokenizer_workdir, spiece = tokenizers
  packed = str(root / "packed")
  setting = image_input_lib.ImageInput(kind, PATCH, QUERIES)
  tokenizer = api.load_tokenizer(tokenizer_workdir)
  for split, num in (("train", 24), ("validation", 8)):
    il_data.write_interleaved(tokenizer, spiece, packed, split, num,
                              base.LENGTH, documents_per_batch=24,
                              encode_batch_size=16, image_input=setting)
  config = base.tiny_config(packed, tokenizer_workdir=tokenizer_workdir,
                            text_tokenizer=spiece)
  layout = vocab.VocabLayout(base.TEXT_VOCAB, base.CODES, read_ids=True)
  config.model.update(image_input=kind, num_queries=QUERIES, patch_size=PATCH,
                      vocab_size=layout.size, read_id=layout.read_id,
                      newline_id=layout.newline_id, resampler_layers=1)
  config.data.batch_size = 8  # the 8 test devices each take a row
  config.eval.num_batches = 1
  workdir = str(root / "run")
  task = InterleavedTask(config)
  if kind == "resampler":  # the frozen encoder travels in the model state
    trainer.train(config, workdir, task)
    model = api.load_model(workdir)
  else:  # the same code paths, without the trainer's cost
    params, _ = task.init(jax.random.PRNGKey(0),
                          next(iter(task.train_data(0, 1))))
    model = task.inference_model(params)
  return dict(kind=kind, packed=packed, workdir=workdir, setting=setting,
              model=model)


# Each setting is built once; the tests share them out (the model-level
# cached = full tests of tests/models/test_image_input.py cover both).
@pytest.fixture(scope="module")
def patches(tokenizers, tmp_path_factory):
  return _run("patches", tokenizers, tmp_path_factory)


@pytest.fixture(scope="module")
def resampler(tokenizers, tmp_path_factory):
  return _run("resampler", tokenizers, tmp_path_factory)


@pytest.mark.parametrize("name", ["patches", "resampler"])
def test_rows_carry_the_image_opening_each_document(name, request):
  run = request.getfixturevalue(name)
  metadata = il_data.load_metadata(run["packed"], "train")
  assert il_data.image_input_of(metadata) == run["setting"]
  n = metadata["num_rows"]
  batch = next(iter(il_data.packed_dataset(
      run["packed"], "train", batch_size=n, shuffle=False, seed=0)))
  assert batch["reads"].shape == (n, il_data.read_length(metadata),
                                  PATCH * PATCH * 3)
  source = il_data.pretokenize.shard_source(run["packed"], "train",
                                            metadata, n)
  side = 32 // PATCH
  per_image = side * (side + 1) if run["kind"] == "patches" else QUERIES
  layout = run["model"].layout
  read_rows = 0
  for r in range(n):
    # A row's reads are the pixel patches of its documents' opening images,
    # rendered again from the documents' ids; the other images are codes.
    documents = [il_data.make_document(0, int(i))
                 for i in il_data.parse_row(source[r])["documents"]]
    opening = [d.scenes[0] for d in documents
               if not isinstance(d.segments[0], str)]
    expected = np.zeros((0, PATCH * PATCH * 3), np.uint8)
    if opening:
      expected = np.concatenate([image_input_lib.patchify(
          shapes.render(scene, 32), PATCH) for scene in opening])
    reads = batch["reads"][r]
    np.testing.assert_array_equal(reads[:len(expected)], expected)
    assert not reads[len(expected):].any()
    assert int(layout.is_read(batch["tokens"][r]).sum()) == (
        per_image * len(opening))
    read_rows += bool(opening)
  assert read_rows >= 2


def _queries_config(patches, tokenizers):
  """The patches rows' config with NExT-GPT / SEED-X output queries."""
  tokenizer_workdir, spiece = tokenizers
  config = base.tiny_config(patches["packed"],
                            tokenizer_workdir=tokenizer_workdir,
                            text_tokenizer=spiece)
  layout = patches["model"].layout
  tokenizer = api.load_tokenizer(tokenizer_workdir)
  config.model.update(image_input="patches", patch_size=PATCH,
                      num_queries=QUERIES,
                      vocab_size=layout.size, read_id=layout.read_id,
                      newline_id=layout.newline_id, image_output="queries",
                      embedding_dim=tokenizer.model.decoder_embed_dim)
  config.eval.caption_rerank = 0.0
  return config


def test_output_queries_regress_each_written_slot_own_vector(
    patches, tokenizers, tmp_path):
  tokenizer_workdir, _ = tokenizers
  config = _queries_config(patches, tokenizers)
  layout = patches["model"].layout
  tokenizer = api.load_tokenizer(tokenizer_workdir)
  task = InterleavedTask(config)
  batch = {k: jax.numpy.asarray(v)
           for k, v in next(iter(task.train_data(0, 1))).items()}
  params, state = task.init(jax.random.PRNGKey(0), batch)
  params = flax.linen.unbox(params)
  # By hand: each written code slot's projection against its own vector.
  _, projected = task.model.apply(
      {"params": params}, batch["tokens"], batch["segment_ids"],
      batch["positions"], reads=batch["reads"], regress=True)
  tokens = np.asarray(batch["tokens"])
  written = layout.is_image(tokens) & (np.asarray(batch["loss_mask"]) > 0)
  written[:, 0] = False
  table = np.asarray(task.code_table)
  error = np.mean((np.asarray(projected) - table[np.clip(
      tokens - layout.image_offset, 0, len(table) - 1)]) ** 2, axis=-1)
  expected = error[written].mean() / table.var(axis=0).mean()
  loss_fn = jax.jit(functools.partial(task.loss, rng=None))
  _, (metrics, _) = loss_fn(params, state, batch)
  np.testing.assert_allclose(float(metrics["image_loss"]), expected,
                             rtol=1e-4)
  # It falls on a fixed batch; the table stays the tokenizer's.
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state):
    grads, (metrics, _) = jax.grad(loss_fn, has_aux=True)(
        params, state, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  opt_state = tx.init(params)
  for _ in range(15):
    params, opt_state, metrics = step(params, opt_state)
  assert float(metrics["image_loss"]) < 0.7 * expected, (expected, metrics)
  np.testing.assert_array_equal(params["frozen_image_table"], table)
  images = task.inference_model(params).sample(["a big red circle"], seed=0)
  assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8
  # CoDi-2: the de-tokenizer's flow loss on every written image, from the
  # projections of its span, reaches the model (and not the table).
  config.detokenizer_workdir = test_image_output_task._random_detokenizer(  # pylint: disable=protected-access
      str(tmp_path / "detok"), tokenizer_workdir)
  config.loss.update(diffusion_weight=1.0, drop_text_rate=0.0)
  codi = InterleavedTask(config)
  _, state = codi.init(jax.random.PRNGKey(0), batch)
  rng = jax.random.PRNGKey(3)
  flow = jax.jit(codi.diffusion_loss)
  _, projected = codi.model.apply(
      {"params": params}, batch["tokens"], batch["segment_ids"],
      batch["positions"], reads=batch["reads"], regress=True)
  spans = [(r, s) for r, s in zip(*np.nonzero(written))
           if not written[r, s - 1]]
  assert len(spans) >= 2
  k = codi.model.image_length
  # By hand: the spans in order, padded to the static bound with weight 0
  # (the same draws of t and noise as the task's).
  most = tokens.shape[0] * (tokens.shape[1] // (k + 2))
  pad = [spans[0]] * (most - len(spans))
  ids = np.stack([tokens[r, s:s + k] for r, s in spans + pad])
  images = codi.output_tokenizer.model.apply(
      {"params": state["tokenizer"]},
      (ids - layout.image_offset).reshape(-1, *tokenizer.grid),
      method=type(codi.output_tokenizer.model).decode)
  conditions = np.stack([np.asarray(projected)[r, s:s + k]
                         for r, s in spans + pad])
  weights = (np.arange(most) < len(spans)).astype(np.float32)
  expected = detok_model.flow_matching_loss(
      codi.detokenizer.model, state["detokenizer"], images, conditions,
      jax.random.fold_in(rng, 1), weights=weights)[0]
  (_, (metrics, _)), grads = jax.jit(jax.value_and_grad(
      codi.loss, has_aux=True))(params, state, batch, rng)
  np.testing.assert_allclose(float(metrics["diffusion_loss"]),
                             float(expected), rtol=1e-4)
  # It reaches the model (and not the table).
  assert np.abs(grads["image_out"]["kernel"]).sum() > 0
  assert not np.any(grads["frozen_image_table"])
  # Without a reading setting nothing would read the given images.
  plain = vocab.VocabLayout(base.TEXT_VOCAB, base.CODES)
  config.model.update(image_input="codes", vocab_size=plain.size,
                      read_id=-1, newline_id=-1)
  with pytest.raises(ValueError, match="image_input=patches or resampler"):
    InterleavedTask(config)


def test_output_queries_restore_and_edit_through_the_source_decoder(
    patches, tokenizers, tmp_path, monkeypatch):
  """An output-query run (NExT-GPT / SEED-X) restores and samples bit for
  bit as trained; with SEED-X's editing de-tokenizer, generate() decodes a
  written image from its projections with the image before it as the
  source (a text-to-image sample: from its condition alone)."""
  import test_parti_task  # pylint: disable=g-import-not-at-top
  test_parti_task.use_pixel_probe(monkeypatch)
  tokenizer_workdir, _ = tokenizers
  config = _queries_config(patches, tokenizers)
  config.detokenizer_workdir = test_image_output_task._random_detokenizer(  # pylint: disable=protected-access
      str(tmp_path / "detok"), tokenizer_workdir, source=1)
  config.data.batch_size = 8  # the 8 test devices each take a row
  workdir = str(tmp_path / "run")
  task = InterleavedTask(config)
  state = trainer.train(config, workdir, task)
  model = api.load_model(workdir)
  trained = task.inference_model(flax.linen.unbox(state.params),
                                 int(state.step))
  prompts = ["a big red circle", "a small blue star"]
  np.testing.assert_array_equal(model.sample(prompts, seed=1),
                                trained.sample(prompts, seed=1))
  rng = np.random.default_rng(0)
  image = shapes.render(shapes.scene_from_rng(rng, 1), 32)
  document = [image, "make it blue"]
  calls = []
  decode = model.detokenizer.decode_conditions

  def spy(conditions, **kw):
    calls.append((kw.get("source"), decode(conditions, **kw)))
    return calls[-1][1]

  def opening_an_image(m):
    """The untrained model's next token made BOI: the prompt ends in it,
    and the written row is read back from it."""
    encode, segments = m._encode, m._segments  # pylint: disable=protected-access
    monkeypatch.setattr(m, "_encode", lambda documents: (
        [np.append(r, vocab.BOI).astype(np.int32)
         for r in encode(documents)[0]], encode(documents)[1]))
    monkeypatch.setattr(m, "_segments", lambda row: segments(
        np.concatenate([[vocab.BOI], row])))

  for m in (model, trained):
    opening_an_image(m)
  monkeypatch.setattr(model.detokenizer, "decode_conditions", spy)
  out = model.generate(document, seed=2, max_images=1,
                       max_new_tokens=model.image_length + 8)
  written = [x for x in out if not isinstance(x, str)]
  assert len(written) == 1 and len(calls) == 1
  np.testing.assert_array_equal(calls[0][0], image[None])
  np.testing.assert_array_equal(written[0], calls[0][1][0])
  again = trained.generate(document, seed=2, max_images=1,
                           max_new_tokens=model.image_length + 8)
  np.testing.assert_array_equal(
      [x for x in again if not isinstance(x, str)][0], written[0])
  # Without a source-image de-tokenizer the written vectors show as their
  # nearest codes (the tokenizer's decoder): another picture.
  plain = dataclasses.replace(trained, detokenizer=None)
  opening_an_image(plain)
  shown = [x for x in plain.generate(document, seed=2, max_images=1,
                                     max_new_tokens=model.image_length + 8)
           if not isinstance(x, str)]
  assert len(shown) == 1 and not np.array_equal(shown[0], written[0])


def test_a_resampler_run_trains_saves_and_loads(resampler):
  # The frozen encoder travelled in the model state; the loaded model reads
  # as the rows were packed.
  assert resampler["model"].image_input == resampler["setting"]
  with open(os.path.join(resampler["workdir"], "eval", "report.json")) as f:
    report = json.load(f)
  assert report["steps"] == 2 and np.isfinite(report["eval_loss"])


@functools.lru_cache(maxsize=4)
def _forward(module):
  return jax.jit(lambda params, tokens, reads: module.apply(
      params, tokens, reads=reads))


def _logits(model, doc, reads):
  """Full-forward logits of one document [T, V] (no cache): right-padded
  to a fixed length, which changes nothing before it (causal)."""
  tokens = np.zeros((1, 2 * base.LENGTH), np.int32)
  tokens[0, :len(doc)] = doc
  return np.asarray(_forward(model.model)(
      {"params": model.params}, tokens, reads), np.float64)[0, :len(doc)]


def _naive_text(model, image, prompt, max_tokens, locations=False):
  """Greedy text by full forward passes over [BOS, image read, prompt,
  text so far] (no cache); locations: location ids allowed too."""
  rows, reads = model._encode([[image, prompt]])  # pylint: disable=protected-access
  doc = list(rows[0])
  allowed = model._text_ids().copy()  # pylint: disable=protected-access
  allowed[vocab.EOS] = True
  if locations:
    allowed |= model.layout.is_location(np.arange(model.layout.size))
  for _ in range(max_tokens):
    logits = _logits(model, doc, reads)[-1]
    token = int(np.argmax(np.where(allowed, logits, -np.inf)))
    if token == vocab.EOS:
      break
    doc.append(token)
  text = np.asarray(doc[len(rows[0]):], np.int32)
  if locations:  # text runs and location runs, written as markup
    return model._text_of(text)  # pylint: disable=protected-access
  return model.text_tokenizer.decode(
      model.layout.joint_to_text(text)[None])[0].strip()


def test_captions_and_answers_are_the_full_forward_greedy_ones(patches):
  model = patches["model"]
  rng = np.random.default_rng(0)
  images = [shapes.render(shapes.scene_from_rng(rng), 32) for _ in range(2)]
  # Patches read any size: a 64-pixel image beside them.
  images.append(shapes.render(shapes.scene_from_rng(rng), 64))
  got = model.caption(np.stack(images[:2]), num_beams=1, rerank_weight=0.0,
                      max_new_tokens=4)
  got += [model.caption([image], num_beams=1, rerank_weight=0.0,
                        max_new_tokens=4)[0] for image in images[2:]]
  assert got == [_naive_text(model, image, il_data.CAPTION_PROMPT, 4)
                 for image in images]
  asked = ["what colour is the star?", "how many objects are there?"]
  assert model.answer(images[:2], asked, max_new_tokens=3) == [
      _naive_text(model, image, q, 3) for image, q in zip(images, asked)]
  budget = inspect.signature(InterleavedModel.answer).parameters[
      "max_new_tokens"].default
  assert model.answer(images[:2], asked) == [
      _naive_text(model, image, q, budget)
      for image, q in zip(images, asked)]


def test_the_default_answer_budget_holds_any_answer_spelt_by_letter():
  # "purple" is 5 pieces of a 128-piece SentencePiece model: a budget of 4
  # answered "purp". Room for a word-start piece, a piece per letter, EOS.
  budget = inspect.signature(InterleavedModel.answer).parameters[
      "max_new_tokens"].default
  assert budget >= max(len(word) for word in questions.ANSWERS) + 2


def test_scores_are_the_full_forward_ones(resampler):
  model = resampler["model"]
  rng = np.random.default_rng(1)
  scenes = [shapes.scene_from_rng(rng) for _ in range(2)]
  images = np.stack([shapes.render(s, 32) for s in scenes])
  captions = [shapes.caption(s, 0) for s in scenes]
  scores = model.score(images, captions)["caption_given_image"]
  for image, caption, score in zip(images, captions, scores):
    rows, reads = model._encode([[image, il_data.CAPTION_PROMPT, caption]])  # pylint: disable=protected-access
    doc = np.concatenate([rows[0], [vocab.EOS]]).astype(np.int32)
    logits = _logits(model, doc, reads)
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    start = len(model._encode([[image, il_data.CAPTION_PROMPT]])[0][0])  # pylint: disable=protected-access
    expected = sum(logp[t - 1, doc[t]] for t in range(start, len(doc)))
    np.testing.assert_allclose(score, expected, rtol=1e-4, atol=1e-3)


def test_boxes_and_grounded_captions_are_the_full_forward_greedy_ones(
    tokenizers, tmp_path, monkeypatch):
  tokenizer_workdir, spiece = tokenizers
  packed = str(tmp_path / "packed")
  il_data.write_interleaved(api.load_tokenizer(tokenizer_workdir), spiece,
                            packed, "train", 24, base.LENGTH,
                            kinds=("refer", "grounded_caption", "draw_box"),
                            weights=(2, 1, 1), encode_batch_size=16)
  config = base.tiny_config(packed, tokenizer_workdir=tokenizer_workdir,
                            text_tokenizer=spiece)
  config.vocab.location_bins = 16
  config.model.vocab_size = vocab.VocabLayout(
      base.TEXT_VOCAB, base.CODES, location_bins=16).size
  task = InterleavedTask(config)
  batch = {k: jax.numpy.asarray(v)
           for k, v in next(iter(task.train_data(0, 1))).items()}
  # Rows packed on another grid are refused, naming both settings.
  coarse = str(tmp_path / "packed8")
  metadata = il_data.write_interleaved(
      api.load_tokenizer(tokenizer_workdir), spiece, coarse, "train", 8,
      base.LENGTH, kinds=("refer",), encode_batch_size=16, location_bins=8)
  assert metadata["layout"]["location_bins"] == 8
  with pytest.raises(ValueError, match=r"8x8 location grid but config.vocab"
                     r".location_bins=16; set config arg bins=8 or re-pack "
                     r"with --location_bins 16"):
    config.data.packed_dir = coarse
    next(iter(InterleavedTask(config).train_data(0, 1)))
  config.data.packed_dir = packed
  params, state = task.init(jax.random.PRNGKey(0), batch)
  params = flax.linen.unbox(params)
  tx = optax.adam(3e-2)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(lambda p: task.loss(p, state, batch, None)[0])(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(30):  # enough to learn that boxes follow "where is"
    params, opt_state = step(params, opt_state)
  model = task.inference_model(params)
  docs = [il_data.make_document(9, i, kinds=("refer",)) for i in range(6)]
  images = np.stack([shapes.render(d.scenes[0], 32) for d in docs])
  phrases = [d.question[len("where is "):-1] for d in docs]
  boxes = model.ground(images, phrases)
  layout = model.layout
  allowed = model._text_ids() | layout.is_location(np.arange(layout.size))  # pylint: disable=protected-access
  allowed[[vocab.EOS, vocab.BOI]] = True
  for image, phrase, box in zip(images, phrases, boxes):
    rows, reads = model._encode([[image, f"where is {phrase}?"]])  # pylint: disable=protected-access
    doc = list(rows[0])
    for _ in range(2):
      logits = _logits(model, doc, reads)[-1]
      doc.append(int(np.argmax(np.where(allowed, logits, -np.inf))))
    pair = np.array(doc[-2:])
    if layout.is_location(pair).all():
      np.testing.assert_allclose(box, grounding.locations_to_box(
          grounding.BoxTokens(*(pair - layout.location_offset).tolist(), 16),
          32))
    else:
      assert box is None
  assert any(box is not None for box in boxes)
  with pytest.raises(ValueError, match="Phrase 0 is empty"):
    model.ground(images[:1], [" "])
  # What the model writes is the answer: a top-left / bottom-right pair is
  # a box; words (a phrase naming nothing) or a reversed pair are None,
  # never a box made up.
  off = layout.location_offset
  words = layout.text_to_joint(model.text_tokenizer.pieces(
      [grounding.NOT_FOUND_ANSWER.format("a blue square")])[0])[:2]
  written = np.array([[off + 17, off + 52], words, [off + 52, off + 17]])
  with monkeypatch.context() as patch:
    patch.setattr(model, "_continue", lambda rows, **_: written)
    got = model.ground(images[:3], phrases[:3])
  np.testing.assert_allclose(got[0], grounding.locations_to_box(
      grounding.BoxTokens(17, 52, 16), 32))
  assert got[1] is None and got[2] is None
  # Grounded captions: greedy over text and location ids after
  # GROUNDED_PROMPT; what the model writes is markup parse_text reads.
  got = model.caption(images[:2], grounded=True, num_beams=1,
                      max_new_tokens=6)
  assert got == [_naive_text(model, image, il_data.GROUNDED_PROMPT, 6,
                             locations=True) for image in images[:2]]
  with pytest.raises(ValueError, match="not reranked"):
    model.caption(images[:1], grounded=True, num_beams=2, rerank_weight=0.5)
  # A box in markup and a BoxTokens segment are the same document.
  box = grounding.BoxTokens(17, 52, 16)
  as_markup = model._encode([["draw a red star in " + box.text]])  # pylint: disable=protected-access
  as_box = model._encode([["draw a red star in", box]])  # pylint: disable=protected-access
  np.testing.assert_array_equal(as_markup[0][0], as_box[0][0])
  assert model.layout.is_location(as_box[0][0]).sum() == 2
  with pytest.raises(ValueError, match="5x5 grid"):
    model._encode([["draw a star in", grounding.BoxTokens(0, 6, 5)]])  # pylint: disable=protected-access
  # Boxes are ids in the document like its words: a request with more
  # boxes than the context holds is the context's clear error, before
  # anything compiles.
  many = "draw " + " and ".join(f"a red star in {box.text}" for _ in range(100))
  with pytest.raises(ValueError, match=r"exceeds the model's context of \d+ "
                     r"tokens \(config.model.max_len\)"):
    model.generate([many])


def test_grounding_needs_location_ids(patches):
  image = np.zeros((1, 32, 32, 3), np.uint8)
  with pytest.raises(ValueError, match="no location ids"):
    patches["model"].ground(image, ["the star"])
  with pytest.raises(ValueError, match="no location ids"):
    patches["model"].caption(image, grounded=True)
  with pytest.raises(ValueError, match="no location ids"):
    patches["model"].generate(["draw a star in <box><loc_0><loc_17></box>"])


def test_images_a_setting_cannot_read_are_clear_errors(patches, resampler):
  """Through the API, before anything compiles: patches need sides that
  are multiples of the patch size; the resampler reads the tokenizer's
  resolution only."""
  with pytest.raises(ValueError, match=r"multiples of patch_size=\d+; got "
                     r"30x32.*config.model.patch_size"):
    patches["model"].caption(np.zeros((1, 30, 32, 3), np.uint8))
  with pytest.raises(ValueError, match=r"shape \(64, 64, 3\).*expected uint8 "
                     r"\[32, 32, 3\].*resize it to 32x32"):
    resampler["model"].caption(np.zeros((1, 64, 64, 3), np.uint8))
