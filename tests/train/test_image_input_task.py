"""The interleaved task with images read as Fuyu patches or through a
resampler: packed rows carry the read images, the trainer trains and saves
the model, and the loaded model's captions and scores are those of the
full forward pass (cached decoding with reads is exact)."""
import json
import os

import numpy as np
import pytest

from unimm import api
from unimm.data import interleaved as il_data
from unimm.data import shapes
from unimm.models import image_input as image_input_lib
from unimm.models import vocab
from unimm.tokenizers import text as text_lib
from unimm.train import trainer
from unimm.train.interleaved_task import InterleavedTask

import test_interleaved_task as base  # pylint: disable=g-import-not-at-top
import test_pretokenize  # pylint: disable=g-import-not-at-top

QUERIES, PATCH = 3, 8


@pytest.fixture(scope="module", params=["patches", "resampler"])
def run(request, tmp_path_factory):
  kind = request.param
  root = tmp_path_factory.mktemp(f"image_input_{kind}")
  tokenizer_workdir = test_pretokenize.make_tokenizer_workdir(
      str(root / "tok"), str(root / "tfds"))
  spiece = text_lib.train_sentencepiece(il_data.document_texts(300),
                                        base.TEXT_VOCAB, str(root / "spiece"))
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
  workdir = str(root / "run")
  trainer.train(config, workdir, InterleavedTask(config))
  return dict(kind=kind, packed=packed, workdir=workdir, setting=setting,
              model=api.load_model(workdir))


def test_rows_carry_the_image_opening_each_document(run):
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


def test_the_trained_model_loads_and_reports(run):
  with open(os.path.join(run["workdir"], "eval", "report.json")) as f:
    report = json.load(f)
  assert report["steps"] == 2 and np.isfinite(report["eval_loss"])
  assert run["model"].image_input == run["setting"]


def _naive_caption(model, image, max_tokens):
  """Greedy caption by full forward passes over [BOS, image read, prompt,
  caption so far] (no cache)."""
  rows, reads = model._encode([[image, il_data.CAPTION_PROMPT]])  # pylint: disable=protected-access
  doc = list(rows[0])
  allowed = model._text_ids().copy()  # pylint: disable=protected-access
  allowed[vocab.EOS] = True
  for _ in range(max_tokens):
    logits = np.asarray(model.model.apply(
        {"params": model.params}, np.asarray(doc, np.int32)[None],
        reads=reads))[0, -1]
    token = int(np.argmax(np.where(allowed, logits, -np.inf)))
    if token == vocab.EOS:
      break
    doc.append(token)
  text = np.asarray(doc[len(rows[0]):], np.int32)
  return model.text_tokenizer.decode(
      model.layout.joint_to_text(text)[None])[0].strip()


def test_captions_are_the_full_forward_greedy_ones(run):
  model = run["model"]
  rng = np.random.default_rng(0)
  images = [shapes.render(shapes.scene_from_rng(rng), 32) for _ in range(2)]
  if run["kind"] == "patches":  # any size: a 64-pixel image beside them
    images.append(shapes.render(shapes.scene_from_rng(rng), 64))
  got = [model.caption([image], num_beams=1, rerank_weight=0.0,
                       max_new_tokens=6)[0] for image in images]
  assert got == [_naive_caption(model, image, 6) for image in images]


def test_scores_are_the_full_forward_ones(run):
  model = run["model"]
  rng = np.random.default_rng(1)
  scenes = [shapes.scene_from_rng(rng) for _ in range(2)]
  images = np.stack([shapes.render(s, 32) for s in scenes])
  captions = [shapes.caption(s, 0) for s in scenes]
  scores = model.score(images, captions)["caption_given_image"]
  for image, caption, score in zip(images, captions, scores):
    rows, reads = model._encode([[image, il_data.CAPTION_PROMPT, caption]])  # pylint: disable=protected-access
    doc = np.concatenate([rows[0], [vocab.EOS]]).astype(np.int32)
    logits = np.asarray(model.model.apply({"params": model.params},
                                          doc[None], reads=reads),
                        np.float64)[0]
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    start = len(model._encode([[image, il_data.CAPTION_PROMPT]])[0][0])  # pylint: disable=protected-access
    expected = sum(logp[t - 1, doc[t]] for t in range(start, len(doc)))
    np.testing.assert_allclose(score, expected, rtol=1e-4, atol=1e-3)
