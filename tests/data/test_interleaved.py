"""Interleaved shapes documents: deterministic, edits legal and parseable,
tokens decode back, packing keeps documents whole and apart, the CLI writes
shards that packed_dataset reads."""
import collections
import dataclasses
import json
import os
import sys

from absl import flags
import numpy as np
import pytest

from unimm import api
from unimm.data import interleaved as il
from unimm.data import pretokenize
from unimm.data import questions
from unimm.data import shapes
from unimm.models import vocab
from unimm.tokenizers import text as text_lib
from unimm.tools import pack_interleaved

sys.path.insert(0, os.path.dirname(__file__))
import test_pretokenize  # noqa: E402  pylint: disable=g-import-not-at-top

CODES, GRID = 16, 4


def fake_image_ids(images):
  """uint8 [N, 32, 32, 3] -> [N, 4, 4] codes: a hash of each 8x8 patch."""
  n = len(images)
  patches = images.reshape(n, GRID, 8, GRID, 8, 3).astype(np.int64)
  weights = np.arange(1, 8 * 8 * 3 + 1).reshape(8, 1, 8, 3)
  return (patches * weights).sum(axis=(2, 4, 5)) % CODES  # [N, 4, 4]


@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory):
  # test_pretokenize.make_text_tokenizer trains on captions only, which
  # lack instruction letters ("k" of "make"); train on document texts.
  prefix = str(tmp_path_factory.mktemp("spiece") / "spiece")
  path = text_lib.train_sentencepiece(il.document_texts(300), 64, prefix)
  return text_lib.TextTokenizer.load(path)


def _scenes(num):
  """Random scenes plus two-object scenes sharing a shape or a colour."""
  rng = np.random.default_rng(7)
  scenes = [shapes.scene_from_rng(rng) for _ in range(num)]
  obj = lambda shape, color, cell: shapes.Object(  # noqa: E731
      shape, color, "small", cell, (0.1, -0.1))
  scenes.append(shapes.Scene((obj("circle", "red", (0, 0)),
                              obj("circle", "blue", (0, 2))), "left of", 1))
  scenes.append(shapes.Scene((obj("star", "red", (2, 1)),
                              obj("square", "red", (0, 1))), "below", 2))
  scenes.append(shapes.Scene((obj("cross", "white", (1, 1)),), None, 3))
  return scenes


def _full(scene):
  """Everything about a scene, offsets included (== ignores them)."""
  return json.dumps(dataclasses.asdict(scene), sort_keys=True)


def test_documents_are_deterministic_per_seed_and_index():
  first = [il.make_document(3, i) for i in range(40)]
  again = [il.make_document(3, i) for i in reversed(range(40))][::-1]
  assert [(d.kind, d.texts, [_full(s) for s in d.scenes]) for d in first] \
      == [(d.kind, d.texts, [_full(s) for s in d.scenes]) for d in again]
  other = [il.make_document(4, i) for i in range(40)]
  assert [d.texts for d in other] != [d.texts for d in first]
  assert {d.kind for d in first} == set(il.DEFAULT_KINDS)
  assert all(d.seed == 3 and d.index == i for i, d in enumerate(first))
  edits = [il.make_document(0, i, kinds=("edit",)) for i in range(20)]
  assert {d.kind for d in edits} == {"edit"}
  only = [il.make_document(0, i, weights=(0, 1, 0)) for i in range(20)]
  assert {d.kind for d in only} == {"image_caption"}
  with pytest.raises(ValueError, match="--kinds"):
    il.make_document(0, 0, kinds=("story",))
  with pytest.raises(ValueError, match="--weights"):
    il.make_document(0, 0, weights=(1, 1))


def test_document_structure():
  docs = [il.make_document(1, i) for i in range(300)]
  for d in docs:
    kinds = ["text" if isinstance(s, str) else "scene" for s in d.segments]
    assert list(d.scenes) == [s for s in d.segments if isinstance(
        s, shapes.Scene)]
    if d.kind == "caption_image":
      assert kinds == ["text", "scene"] and d.segments[0] == d.caption
    elif d.kind == "image_caption":
      assert kinds == ["scene", "text", "text"]
      assert d.segments[1:] == [il.CAPTION_PROMPT, d.caption]
    else:
      assert 1 <= len(d.edits) <= il.MAX_EDITS and d.caption is None
      assert kinds == ["scene"] + ["text", "scene"] * len(d.edits)
      assert list(d.instructions) == d.texts
    if d.caption is not None:  # the caption describes its scene
      parsed = shapes.parse_caption(d.caption)
      assert [(o.shape, o.color) for o in parsed.objects] == [
          (o.shape, o.color) for o in d.scenes[0].objects]
  ops = collections.Counter(e.op for d in docs for e in d.edits)
  assert set(ops) == set(il.EDIT_OPS)


def _candidates(scene):
  """Every edit in the grammar's reach of this scene (minimal refs, 'it')."""
  refs = {None} | {il.object_ref(scene, k) for k in range(len(scene.objects))}
  out = []
  for ref in refs:
    out += [il.Edit("move", ref, direction=d) for d in il.DIRECTIONS]
    out += [il.Edit("recolor", ref, color=c) for c in shapes.COLORS]
    out += [il.Edit("reshape", ref, shape=s) for s in shapes.SHAPES]
    out += [il.Edit("resize", ref, size=z) for z in shapes.SIZES]
    if ref is not None:
      out.append(il.Edit("remove", ref))
  out += [il.Edit("add", None, shape=s, color=c, size=z, relation=r)
          for s in shapes.SHAPES for c in shapes.COLORS
          for z in shapes.SIZES for r in shapes.RELATIONS]
  return out


def _expected(scene, edit):
  """The edited scene, written out per operation."""
  objects = list(scene.objects)
  if edit.op == "add":
    (obj,) = objects
    d_row, d_col = il.ADD_OFFSETS[edit.relation]
    new = shapes.Object(edit.shape, edit.color, edit.size,
                        (obj.cell[0] + d_row, obj.cell[1] + d_col))
    inverse = {"left of": "right of", "right of": "left of",
               "above": "below", "below": "above"}[edit.relation]
    return shapes.Scene((obj, new), inverse, scene.background)
  (k,) = [k for k, o in enumerate(objects)
          if edit.target is None or edit.target.matches(o)]
  obj = objects[k]
  if edit.op == "remove":
    return shapes.Scene((objects[1 - k],), None, scene.background)
  if edit.op == "move":
    d_row, d_col = il.DIRECTIONS[edit.direction]
    obj = dataclasses.replace(obj, cell=(obj.cell[0] + d_row,
                                         obj.cell[1] + d_col))
  elif edit.op == "resize":
    obj = shapes.Object(obj.shape, obj.color, edit.size, obj.cell)
  else:
    field = "color" if edit.op == "recolor" else "shape"
    obj = dataclasses.replace(obj, **{field: getattr(edit, field)})
  objects[k] = obj
  return shapes.Scene(tuple(objects), scene.relation, scene.background)


def _dominant(relation, cell0, cell1):
  return (cell0, cell1) in shapes._RELATION_CELL_PAIRS[relation]  # pylint: disable=protected-access


def test_every_legal_edit_is_valid_and_round_trips():
  num_legal = collections.Counter()
  for scene in _scenes(80):
    legal = il.legal_edits(scene)
    flat = [e for edits in legal.values() for e in edits]
    assert len(set(flat)) == len(flat)
    assert set(legal) == {e.op for e in flat}
    # legal_edits is exactly the set of candidates apply_edit accepts.
    accepted = set()
    for edit in _candidates(scene):
      try:
        il.apply_edit(scene, edit)
        accepted.add(edit)
      except ValueError:
        pass
    assert accepted == set(flat)
    for edit in flat:
      num_legal[edit.op] += 1
      text = il.instruction(edit)
      parsed = il.parse_instruction(text)
      assert parsed == edit, text
      assert il.parse_instruction(f"  {text.capitalize()}. ") == edit
      edited = il.apply_edit(scene, parsed)
      assert edited == _expected(scene, edit), text
      # Valid: rebuilding it re-runs every check of Object and Scene.
      shapes.Scene(tuple(shapes.Object(o.shape, o.color, o.size, o.cell,
                                       o.offset) for o in edited.objects),
                   edited.relation, edited.background)
      assert edited.background == scene.background
      if len(edited.objects) == 2:
        a, b = edited.objects
        assert (a.shape, a.color) != (b.shape, b.color)
        assert _dominant(edited.relation, a.cell, b.cell), text
  assert set(num_legal) == set(il.EDIT_OPS)


def test_instructions_name_one_object_in_two_object_scenes():
  two = [s for s in _scenes(80) if len(s.objects) == 2]
  assert any(a.shape == b.shape for a, b in (s.objects for s in two))
  for scene in two:
    a, b = scene.objects
    for edit in (e for edits in il.legal_edits(scene).values()
                 for e in edits):
      text = il.instruction(edit)
      assert edit.target is not None and not text.endswith(" it")
      (k,) = [k for k, o in enumerate(scene.objects)
              if il.parse_instruction(text).target.matches(o)]
      # The colour is said exactly when the shapes alone are ambiguous.
      assert (edit.target.color is not None) == (a.shape == b.shape)
      unchanged = scene.objects[1 - k]
      edited = il.apply_edit(scene, edit)
      assert unchanged in edited.objects  # only the named object changed
      if edit.op == "remove":
        assert edited.objects == (unchanged,)
        assert text == f"remove {il._ref_text(edit.target)}"  # pylint: disable=protected-access
  scene = two[0]
  with pytest.raises(ValueError, match="two objects"):
    il.apply_edit(scene, il.Edit("resize", None, size="big"))
  with pytest.raises(ValueError, match="no object"):
    missing = next(s for s in shapes.SHAPES
                   if s not in (o.shape for o in scene.objects))
    il.apply_edit(scene, il.Edit("resize", il.ObjectRef(missing),
                                 size="big"))
  for garbage in ("move it sideways", "remove it", "make it", "paint it red",
                  "add a red circle below it"):
    with pytest.raises(ValueError, match="Cannot parse"):
      il.parse_instruction(garbage)


def test_tokenized_documents_decode_back(text_tokenizer):
  layout = vocab.VocabLayout(text_tokenizer.vocab_size, CODES)
  docs = [il.make_document(2, i) for i in range(40)]
  calls = []

  def image_ids_fn(images):
    calls.append(images.shape)
    return fake_image_ids(images)

  tokens = il.tokenize_documents(docs, text_tokenizer, image_ids_fn, layout)
  num_scenes = sum(len(d.scenes) for d in docs)
  assert calls == [(num_scenes, 32, 32, 3)]  # one encoder call per batch
  for doc, ids in zip(docs, tokens):
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert ids[0] == vocab.BOS and ids[-1] == vocab.EOS
    assert (ids[1:-1] > vocab.EOS).all()  # no PAD/BOS/EOS inside
    assert not np.isin(layout.joint_to_text(ids[layout.is_text(ids)]),
                       [text_tokenizer.pad_id, text_tokenizer.eos_id]).any()
    runs = layout.segments(ids)
    # Adjacent texts (a caption request and its caption) make one text run.
    expected = []
    for segment in doc.segments:
      if isinstance(segment, str) and expected and isinstance(
          expected[-1], str):
        expected[-1] += " " + segment
      else:
        expected.append(segment)
    assert len(runs) == len(expected)
    for (kind, run), segment in zip(runs, expected):
      if isinstance(segment, str):
        assert kind == "text"
        assert text_tokenizer.decode(run[None]) == [segment]
      else:
        assert kind == "image" and run.shape == (GRID * GRID,)
        np.testing.assert_array_equal(
            run, fake_image_ids(shapes.render(segment, 32)[None]).reshape(-1))
    # Image spans: exactly h*w image ids between each BOI and EOI.
    bois, eois = np.flatnonzero(ids == vocab.BOI), np.flatnonzero(
        ids == vocab.EOI)
    np.testing.assert_array_equal(eois - bois, GRID * GRID + 1)
    assert layout.is_image(ids).sum() == GRID * GRID * len(doc.scenes)
  np.testing.assert_array_equal(
      il.tokenize_document(docs[5], text_tokenizer, fake_image_ids, layout),
      tokens[5])
  small = vocab.VocabLayout(text_tokenizer.vocab_size - 1, CODES)
  with pytest.raises(ValueError, match="VocabLayout"):
    il.tokenize_documents(docs[:1], text_tokenizer, fake_image_ids, small)
  with pytest.raises(ValueError, match="num_codes"):
    il.tokenize_documents(docs[:1], text_tokenizer, fake_image_ids,
                          vocab.VocabLayout(text_tokenizer.vocab_size, 8))


def test_pack_small_example():
  docs = [np.arange(1, 6), np.arange(11, 15), np.arange(21, 24),
          np.arange(31, 33)]  # lengths 5, 4, 3, 2
  packed = il.pack(docs, 8)
  # First fit: 0 -> row 0; 1 -> row 1; 2 fills row 0; 3 -> row 1.
  np.testing.assert_array_equal(packed["tokens"], [
      [1, 2, 3, 4, 5, 21, 22, 23], [11, 12, 13, 14, 31, 32, 0, 0]])
  np.testing.assert_array_equal(packed["segment_ids"], [
      [1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 2, 2, 0, 0]])
  np.testing.assert_array_equal(packed["positions"], [
      [0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 0, 0]])
  np.testing.assert_array_equal(packed["loss_mask"], [
      [0, 1, 1, 1, 1, 0, 1, 1], [0, 1, 1, 1, 0, 1, 0, 0]])
  assert all(v.dtype == np.int32 for v in packed.values())


def _unpack(packed):
  """Documents per row, in row order: [[doc tokens, ...], ...]."""
  rows = []
  for tokens, segments in zip(packed["tokens"], packed["segment_ids"]):
    rows.append([tokens[segments == s] for s in range(1, segments.max() + 1)])
  return rows


def test_pack_keeps_documents_whole_in_order_and_apart(text_tokenizer):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from unimm.nn import transformer  # pylint: disable=g-import-not-at-top
  layout = vocab.VocabLayout(text_tokenizer.vocab_size, CODES)
  docs = il.tokenize_documents([il.make_document(5, i) for i in range(60)],
                               text_tokenizer, fake_image_ids, layout)
  length = 160
  packed = il.pack(docs, length)
  n = len(packed["tokens"])
  assert all(v.shape == (n, length) for v in packed.values())
  assert n < len(docs)  # rows hold several documents
  rows = _unpack(packed)
  # Every document exactly once and intact; in input order within a row.
  found = {}
  for r, row in enumerate(rows):
    for doc in row:
      (index,) = [i for i, d in enumerate(docs) if np.array_equal(d, doc)
                  and i not in found]
      found[index] = r
  assert sorted(found) == list(range(len(docs)))
  for r in range(n):
    indices = [i for i in sorted(found) if found[i] == r]
    assert [len(docs[i]) for i in indices] == [len(d) for d in rows[r]]
  # First fit: no document fits into the free space an earlier row had
  # when it was placed.
  free = []
  for i, d in enumerate(docs):
    earlier = [r for r in range(len(free)) if free[r] >= len(d)]
    row = found[i]
    assert row == (earlier[0] if earlier else len(free))
    if row == len(free):
      free.append(length)
    free[row] -= len(d)
  # Padding is PAD with segment 0; positions count from each BOS.
  pad = packed["segment_ids"] == 0
  assert (packed["tokens"][pad] == vocab.PAD).all()
  assert (packed["tokens"][packed["positions"] == 0][
      ~pad[packed["positions"] == 0]] == vocab.BOS).all()
  expected = il.packed_features(packed["segment_ids"])
  for key in ("positions", "loss_mask"):
    np.testing.assert_array_equal(packed[key], expected[key])
  assert packed["loss_mask"].sum() == sum(len(d) - 1 for d in docs)
  # The model's mask lets a token see only earlier tokens of its document.
  seg = jnp.asarray(packed["segment_ids"])
  pos = jnp.asarray(packed["positions"])
  mask = np.asarray(transformer.attention_mask(seg, seg, pos, pos,
                                               causal=True))  # [N, L, L]
  slots = np.arange(length)
  same = (packed["segment_ids"][:, :, None] == packed["segment_ids"][
      :, None, :]) & ~pad[:, :, None]
  np.testing.assert_array_equal(mask, same & (slots[None, :] <= slots[:, None]))
  # Overlong documents name their length, the context and the setting.
  with pytest.raises(ValueError, match=r"Document 1 has 9 tokens.*context "
                     r"length 8.*config\.model\.max_len"):
    il.pack([np.ones(3, np.int32), np.ones(9, np.int32)], 8)


@pytest.fixture(scope="module")
def written(tmp_path_factory, text_tokenizer):
  """The CLI (unimm.tools.pack_interleaved) run on a tiny random ViT-VQGAN
  (16 codes, 4x4 grid)."""
  root = tmp_path_factory.mktemp("interleaved")
  workdir = test_pretokenize.make_tokenizer_workdir(
      str(root / "tokenizer"), str(root / "tfds"))
  spiece = str(root / "spiece.model")
  with open(spiece, "wb") as f:
    f.write(text_tokenizer.model_proto)
  out = str(root / "out")
  flag_values = flags.FlagValues()
  pack_interleaved.define_flags(flag_values)
  flag_values([
      "interleaved", f"--tokenizer_workdir={workdir}",
      f"--text_tokenizer={spiece}", f"--out={out}", "--split=validation",
      "--num_documents=50", "--length=200", "--documents_per_batch=20",
      "--encode_batch_size=16", "--records_per_shard=4",
      "--kinds=caption_image,edit", "--weights=1,3"])
  metadata = pack_interleaved.main(["pack_interleaved"], flag_values)
  return dict(out=out, metadata=metadata, workdir=workdir)


def test_cli_writes_shards_that_packed_dataset_reads(written, text_tokenizer):
  out, metadata = written["out"], written["metadata"]
  assert metadata == json.load(open(os.path.join(out, "validation.json")))
  assert metadata["num_documents"] == 50 and metadata["length"] == 200
  assert metadata["seed"] == il.SPLIT_SEEDS["validation"]
  assert metadata["layout"]["size"] == 5 + text_tokenizer.vocab_size + CODES
  assert metadata["grid"] == [GRID, GRID] and metadata["kinds"] == [
      "caption_image", "edit"]
  assert sum(metadata["kind_counts"].values()) == 50
  assert metadata["num_unknown_text_tokens"] == 0
  assert len(metadata["shards"]) == -(-metadata["num_rows"] // 4)
  assert sorted(n for n in os.listdir(out) if n.endswith(".array_record")) \
      == metadata["shards"]
  # The rows hold documents 0..49, each exactly as tokenize_documents makes
  # it with the same tokenizer.
  docs = [il.make_document(metadata["seed"], i, metadata["kinds"],
                           metadata["weights"]) for i in range(50)]
  tokenizer = api.load_tokenizer(written["workdir"])
  layout = vocab.VocabLayout(**{k: metadata["layout"][k] for k in (
      "text_vocab_size", "image_vocab_size")})
  want = il.tokenize_documents(
      docs, text_tokenizer,
      lambda x: pretokenize.encode_images(tokenizer, x, 16), layout)
  source = pretokenize.shard_source(out, "validation", metadata,
                                    metadata["num_rows"])
  records = [il.parse_row(source[i]) for i in range(len(source))]
  assert sorted(i for r in records for i in r["documents"]) == list(range(50))
  assert all((np.diff(r["documents"]) > 0).all() for r in records)
  for record in records:
    segments = record["segment_ids"]
    for s, index in enumerate(record["documents"], start=1):
      np.testing.assert_array_equal(record["tokens"][segments == s],
                                    want[index])
  # packed_dataset: batches of packed rows, every row once per epoch.
  batches = list(il.packed_dataset(out, "validation", batch_size=3,
                                   shuffle=True, seed=0, num_epochs=1))
  assert len(batches) == metadata["num_rows"] // 3
  assert set(batches[0]) == {"tokens", "segment_ids", "positions",
                             "loss_mask"}
  for batch in batches:
    assert all(v.shape == (3, 200) and v.dtype == np.int32
               for v in batch.values())
    expected = il.packed_features(batch["segment_ids"])
    np.testing.assert_array_equal(batch["positions"], expected["positions"])
    np.testing.assert_array_equal(batch["loss_mask"], expected["loss_mask"])
  rows = sorted(r.tobytes() for b in batches for r in b["tokens"])
  all_rows = sorted(r["tokens"].tobytes() for r in records)
  assert not collections.Counter(rows) - collections.Counter(all_rows)
  # Errors name the fix.
  with pytest.raises(ValueError, match="unimm.tools.pack_interleaved --split train"):
    il.packed_dataset(out, "train", batch_size=2, shuffle=False, seed=0)
  with pytest.raises(ValueError, match="not interleaved rows"):
    json.dump({"format": pretokenize.FORMAT}, open(os.path.join(
        out, "train.json"), "w"))
    il.packed_dataset(out, "train", batch_size=2, shuffle=False, seed=0)
  with pytest.raises(ValueError, match="older format.*re-pack"):
    json.dump({"format": il.FORMAT.replace("/v2", "/v1")}, open(
        os.path.join(out, "train.json"), "w"))
    il.packed_dataset(out, "train", batch_size=2, shuffle=False, seed=0)


def test_question_documents_ask_about_their_scene():
  docs = [il.make_document(3, i, kinds=("question",)) for i in range(20)]
  for d in docs:
    assert d.kind == "question" and d.segments[0] == d.scenes[0]
    assert d.segments[1:] == [d.question, d.answer]
    kind = questions.kind_of(d.question)
    if kind in ("color", "shape", "size", "relation"):  # no drawn negatives
      assert (d.question, d.answer) in questions.questions(
          d.scenes[0], np.random.default_rng(0))
  texts = il.document_texts(20, 3, kinds=("question",))
  assert texts == [t for d in docs for t in (d.question, d.answer)]
  # Not in the default mix: the default stream is unchanged.
  assert il.DEFAULT_KINDS == ("caption_image", "image_caption", "edit")
  assert [il.make_document(0, i).kind for i in range(30)] == [
      il.make_document(0, i, il.DEFAULT_KINDS).kind
      for i in range(30)]


def test_refer_documents_box_the_object_they_name():
  from unimm.data import grounding  # pylint: disable=g-import-not-at-top
  docs = [il.make_document(4, i, kinds=("refer",)) for i in range(60)]
  absent = 0
  for d in docs:
    scene = d.scenes[0]
    assert d.segments == [scene, d.question, d.answer]
    phrase = d.question[len("where is "):-1]
    if isinstance(d.answer, str):  # names nothing in the scene
      absent += 1
      assert not grounding.find_objects(scene, phrase)
      assert d.answer == grounding.not_found_answer(phrase)
    else:
      index = grounding.find_object(scene, phrase)
      assert d.answer == grounding.box_to_locations(
          shapes.object_boxes(scene, 32)[index], 32)
  assert 0 < absent < 30


def test_grounded_captions_and_drawing_requests_box_every_object():
  from unimm.data import grounding  # pylint: disable=g-import-not-at-top
  kinds = ("grounded_caption", "draw_box")
  docs = [il.make_document(6, i, kinds=kinds) for i in range(40)]
  assert {d.kind for d in docs} == set(kinds)
  for d in docs:
    scene = d.scenes[0]
    truth = grounding.object_locations(scene, 32)
    boxes = [s for s in d.segments if isinstance(s, grounding.BoxTokens)]
    if d.kind == "grounded_caption":
      assert d.segments[:2] == [scene, il.GROUNDED_PROMPT]
      words = [s for s in d.segments[2:] if isinstance(s, str)]
      assert " ".join(words) == d.caption
      assert shapes.parse_caption(d.caption) is not None
      # Each box follows its object's phrase; the caption's order.
      assert d.segments[2:] == [s.text if isinstance(s, grounding.Phrase)
                                else s for s in d.answer]
      assert sorted(b.tl for b in boxes) == sorted(b.tl for b in truth)
    else:
      assert d.segments[-1] == scene and boxes == truth
      assert d.texts[0].startswith("draw ")
  # The kinds' words go to the text tokenizer's corpus.
  texts = il.document_texts(40, 6, kinds)
  assert il.GROUNDED_PROMPT in texts and any(
      t.startswith("draw ") for t in texts)


def test_bins_set_only_the_boxes_of_grounded_documents():
  from unimm.data import grounding  # pylint: disable=g-import-not-at-top
  kinds = ("refer", "grounded_caption", "draw_box", "image_caption")
  for i in range(40):
    fine = il.make_document(8, i, kinds=kinds, bins=32)
    coarse = il.make_document(8, i, kinds=kinds)
    assert fine.scenes == coarse.scenes and fine.texts == coarse.texts
    boxes = [[s for s in d.segments if isinstance(s, grounding.BoxTokens)]
             for d in (fine, coarse)]
    assert len(boxes[0]) == len(boxes[1])
    for box in boxes[0]:
      assert box.bins == 32
      assert any(grounding.iou(grounding.locations_to_box(box, 32), truth)
                 >= 0.5 for truth in shapes.object_boxes(fine.scenes[0], 32))
    assert all(b.bins == grounding.DEFAULT_BINS for b in boxes[1])
  with pytest.raises(ValueError, match="bins=0"):
    il.make_document(8, 0, kinds=kinds, bins=0)


def test_no_request_after_an_image_starts_another():
  """What follows a document's opening image asks for one thing: no such
  text is the first words of another (else a model asked one request
  would go on with the rest of the longer one)."""
  requests = {d.segments[1] for i in range(300)
              for d in [il.make_document(3, i, kinds=il.KINDS)]
              if isinstance(d.segments[0], shapes.Scene)}
  assert {il.CAPTION_PROMPT, il.GROUNDED_PROMPT} <= requests
  words = [tuple(r.split()) for r in requests]
  clashes = [(" ".join(a), " ".join(b)) for a in words for b in words
             if a != b and b[:len(a)] == a]
  assert not clashes, clashes
