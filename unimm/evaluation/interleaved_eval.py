"""What the interleaved model can do, read back on held-out shapes documents.

  prompt_accuracy_single  text -> image: one-object prompts, the sample read
                          by the shapes probe (every stated attribute right);
  caption_accuracy        image -> text: the generated caption parsed back to
                          attributes (shapes.parse_caption) and compared with
                          the true scene: every stated attribute and the
                          object count right (an unparseable caption is wrong);
  edit_accuracy           image + instruction -> image: the probe reads the
                          generated image, scored against a caption of the
                          scene the instruction asks for that states every
                          attribute of every object
                          (shapes.COMPLETE_TEMPLATES; a missing image is
                          wrong).
Each comes with a breakdown, the first thing to read when it is low:
prompt_{shape,color,size,position,count}_accuracy; caption_accuracy_single /
_pair (one- / two-object scenes), caption_{attribute}_accuracy and
caption_parse_rate (captions that read as a shapes caption at all); and
edit_accuracy_{op} per instruction kind (unimm.data.interleaved.EDIT_OPS)
and edit_{attribute}_accuracy (of the edited image).
  question_accuracy       image + question -> one-word answer
                          (unimm.data.questions, held-out scenes),
                          exact match after normalize_answer; with
                          question_accuracy_{kind} per question kind
                          (num_questions > 0; for models trained on
                          question documents).
  referring_accuracy      image + "where is the blue square?" -> box
                          (model.ground): IoU >= 0.5 with the object's
                          pixel box (shapes.object_boxes), over held-out
                          refer documents that name an object
                          (num_referring > 0); referring_accuracy_single /
                          _pair by object count; referring_ceiling, the
                          same score for the true location ids (what 16
                          bins allow); referring_absent_accuracy, the
                          share of phrases naming nothing that get no box.
  grounded_caption_accuracy
                          image -> grounded caption (model.caption(...,
                          grounded=True)): the words right (as
                          caption_accuracy) and every object's box right,
                          each box after its object's phrase at IoU >= 0.5
                          (num_grounded > 0); grounded_caption_words_accuracy
                          / _boxes_accuracy apart, and the ceiling of the
                          true location ids (grounded_caption_ceiling).
  draw_box_accuracy       "draw a red star in <box>..</box> [and ...]" ->
                          image: the probe finds every requested object
                          (colour and shape) in the cell its box lies in
                          (num_drawn > 0); draw_box_object_accuracy per
                          object; draw_box_ceiling, the probe on the
                          tokenizer's reconstructions of the true scenes.
Two ceilings, the probe on the image tokenizer's reconstructions of the true
scenes: reconstructed_prompt_accuracy_single (the prompts') and
reconstructed_edit_accuracy (the edited scenes'): what a model that writes
this tokenizer's codes can score at most, read by this probe.
Held-out documents are the test split's (unimm.data.interleaved.SPLIT_SEEDS).
out_dir/verdicts.jsonl has one line per prompt, caption and edit (what
was asked, what the model gave, and the verdicts), to compare two
checkpoints document by document.
"""
import json
import os
import re

from etils import epath
import jax
import numpy as np

from unimm.data import grounding
from unimm.data import interleaved as documents_lib
from unimm.data import questions as questions_lib
from unimm.data import shapes
from unimm.evaluation import grids
from unimm.evaluation import probe as probe_lib
from unimm.evaluation import reports


def _truth(scene: shapes.Scene) -> probe_lib.PredictedScene:
  """The scene as a perfect probe would read it."""
  return probe_lib.PredictedScene(tuple(
      probe_lib.PredictedObject(o.shape, o.color, o.size, tuple(o.cell))
      for o in scene.objects))


def caption_scores(text: str, scene: shapes.Scene) -> dict[str, bool]:
  """probe.score_prompt of the caption against the true scene; a caption
  that does not parse gets shape, color, count and correct wrong."""
  parsed = shapes.parse_caption(text)
  if parsed is None:
    return dict(shape=False, color=False, count=False, correct=False)
  return probe_lib.score_prompt(parsed, _truth(scene))


def caption_correct(text: str, scene: shapes.Scene) -> bool:
  return caption_scores(text, scene)["correct"]


# A grounded caption's phrase before its box: "[a|an] [SIZE] COLOR SHAPE".
_BOXED_PHRASE = re.compile(
    r"(?:an? )?(?:(?:" + "|".join(shapes.SIZES) + r") )?(?P<color>"
    + "|".join(shapes.COLORS) + r") (?P<shape>" + "|".join(shapes.SHAPES)
    + r")$")


def grounded_caption_scores(text: str, scene: shapes.Scene, bins: int,
                            image_size: int = 32) -> dict[str, bool]:
  """A grounded caption's verdicts: words (its words alone are a right
  caption, caption_correct), boxes (each box follows the phrase of a
  different object, "a big red star <box>..</box>", at IoU >= 0.5 with
  that object's pixel box, and every object has one) and correct (both).
  Markup that does not parse is wrong on all three."""
  try:
    segments = grounding.parse_text(text, bins)
  except ValueError:
    return dict(correct=False, words=False, boxes=False)
  words = caption_correct(grounding.plain_text(segments), scene)
  truth = shapes.object_boxes(scene, image_size)
  boxed, boxes = set(), True
  for k, segment in enumerate(segments):
    if not isinstance(segment, grounding.BoxTokens):
      continue
    before = segments[k - 1] if k else None
    if isinstance(before, grounding.Phrase):
      before = before.text
    match = (_BOXED_PHRASE.search(" ".join(before.split()))
             if isinstance(before, str) else None)
    found = [] if match is None else grounding.find_objects(
        scene, shapes.ObjectRef(match["shape"], match["color"]))
    if (len(found) != 1 or found[0] in boxed or grounding.iou(
        grounding.locations_to_box(segment, image_size),
        truth[found[0]]) < 0.5):
      boxes = False
      break
    boxed.add(found[0])
  boxes = boxes and len(boxed) == len(scene.objects)
  return dict(correct=words and boxes, words=words, boxes=boxes)


def drawn_in_boxes(predicted: probe_lib.PredictedScene, scene: shapes.Scene,
                   image_size: int = 32,
                   bins: int = grounding.DEFAULT_BINS) -> list[bool]:
  """Per object a draw_box request asks for (scene.objects, each in its
  box, grounding.draw_request): whether the probe found an object of its
  colour and shape in the cell that its box's centre lies in."""
  cell = image_size / shapes.GRID
  out = []
  for obj, tokens in zip(scene.objects, grounding.object_locations(
      scene, image_size, bins)):
    x0, y0, x1, y1 = grounding.locations_to_box(tokens, image_size)
    where = (min(int((y0 + y1) / 2 // cell), shapes.GRID - 1),
             min(int((x0 + x1) / 2 // cell), shapes.GRID - 1))
    out.append(any(p.cell == where and p.color == obj.color
                   and p.shape == obj.shape for p in predicted.objects))
  return out


def _mean(values) -> float:
  return float(np.mean(values)) if len(values) else float("nan")


def _add_mean(result: dict[str, float], key: str, values) -> None:
  """result[key] = the mean of values; no key (not NaN) when empty."""
  if values:
    result[key] = _mean(values)


def _breakdown(prefix: str, scores: list[dict[str, bool]]) -> dict[str, float]:
  """{prefix}_{attribute}_accuracy over the scores that state it."""
  return {f"{prefix}_{name}_accuracy": _mean([s[name] for s in scores
                                              if name in s])
          for name in probe_lib.ATTRIBUTES if any(name in s for s in scores)}


def _held_out(kind: str, num: int,
              bins: int = grounding.DEFAULT_BINS
              ) -> list[documents_lib.Document]:
  seed = documents_lib.SPLIT_SEEDS["test"]
  return [documents_lib.make_document(seed, i, kinds=(kind,), bins=bins)
          for i in range(num)]


def evaluate_generation(model, out_dir: str, *, num_prompts: int = 100,
                        num_captions: int = 100, num_edits: int = 100,
                        seed: int = 0, temperature: float = 0.0,
                        batch_size: int = 32,
                        cfg_scale: float | None = None,
                        image_temperature: float | None = None,
                        caption_beams: int = 1,
                        caption_rerank: float = 0.0,
                        num_questions: int = 0,
                        num_referring: int = 0, num_grounded: int = 0,
                        num_drawn: int = 0) -> dict:
  """The three accuracies (module doc) of an api.InterleavedModel; writes
  out_dir/report.json entries' values and out_dir/documents.png. Text is
  sampled at `temperature`; generated images (prompts and edits) at
  image_temperature (default: temperature), guided by cfg_scale (None:
  unguided); captions are greedy, or with caption_beams > 1 the likeliest
  that beam search of that width finds, or with caption_rerank w > 0 its
  final beams reranked by the image's likelihood after each (model.caption's
  num_beams and rerank_weight)."""
  if image_temperature is None:
    image_temperature = temperature
  size = model.tokenizer.image_size
  probe = probe_lib.get_probe(size)
  result = {}

  def reconstruct(images):  # the tokenizer's encode + decode
    return np.asarray(model.tokenizer.decode(model.tokenizer.encode(images)))

  def score_images(texts, images):  # the probe's reading against captions
    return [probe_lib.score_prompt(shapes.parse_caption(t), p)
            for t, p in zip(texts, probe.predict(images))]

  # One-object prompts (fixed_prompt_set's singles).
  prompts = [c for c, _ in probe_lib.fixed_prompt_set(num_prompts, 0)]
  samples = np.concatenate([
      model.sample(prompts[i:i + batch_size], seed=seed + i,
                   temperature=image_temperature, cfg_scale=cfg_scale)
      for i in range(0, len(prompts), batch_size)])
  prompt_scores = score_images(prompts, samples)
  verdicts = [dict(task="prompt", index=i, prompt=p, **s)
              for i, (p, s) in enumerate(zip(prompts, prompt_scores))]
  result["prompt_accuracy_single"] = _mean(
      [s["correct"] for s in prompt_scores])
  result.update(_breakdown("prompt", prompt_scores))
  # The ceiling: the probe on the tokenizer's reconstructions of the same
  # prompts' true scenes.
  result["reconstructed_prompt_accuracy_single"] = float(
      probe_lib.reconstruction_accuracy(
          reconstruct, num_prompts, 0, size,
          probe=probe)["prompt_accuracy_single"])

  docs = _held_out("image_caption", num_captions)
  images = np.stack([shapes.render(d.scenes[0], size) for d in docs])
  captions = []
  for i in range(0, len(docs), batch_size):
    captions += model.caption(images[i:i + batch_size],
                              num_beams=caption_beams,
                              rerank_weight=caption_rerank)
  scores = [caption_scores(c, d.scenes[0]) for c, d in zip(captions, docs)]
  result["caption_accuracy"] = _mean([s["correct"] for s in scores])
  result["caption_beams"] = caption_beams
  result["caption_rerank_weight"] = caption_rerank
  verdicts += [dict(task="caption", index=i,
                    truth=shapes.complete_caption(d.scenes[0]), caption=c, **s)
               for i, (c, d, s) in enumerate(zip(captions, docs, scores))]
  # Captions are asked for with interleaved.CAPTION_PROMPT after the image
  # (model.caption); without it an image goes on with a caption or an edit
  # instruction alike, and a caption that does not parse is often the latter.
  result["caption_parse_rate"] = _mean(
      [shapes.parse_caption(c) is not None for c in captions])
  for count, name in ((1, "single"), (2, "pair")):
    _add_mean(result, f"caption_accuracy_{name}",
              [s["correct"] for s, d in zip(scores, docs)
               if len(d.scenes[0].objects) == count])
  result.update(_breakdown("caption", scores))

  edits = _held_out("edit", num_edits)
  sources = np.stack([shapes.render(d.scenes[0], size) for d in edits])
  expected = [shapes.complete_caption(d.scenes[1]) for d in edits]
  outputs = []
  for i in range(0, len(edits), batch_size):
    outputs += model.generate_batch(
        [[source, d.instructions[0]] for source, d in
         zip(sources[i:i + batch_size], edits[i:i + batch_size])],
        seed=seed + i, temperature=temperature, max_images=1,
        cfg_scale=cfg_scale, image_temperature=image_temperature,
        # After the instruction the model should open the image at once.
        max_new_tokens=model.image_length + 8, max_text_tokens=8)
  generated = [next((s for s in out if not isinstance(s, str)), None)
               for out in outputs]
  found = [g is not None for g in generated]
  blank = np.zeros((size, size, 3), np.uint8)
  edited = np.stack([g if g is not None else blank for g in generated])
  edit_scores = [s if ok else {k: False for k in s}  # no image: all wrong
                 for s, ok in zip(score_images(expected, edited), found)]
  per_edit = [s["correct"] for s in edit_scores]
  verdicts += [dict(task="edit", index=i, op=d.edits[0].op,
                    instruction=d.instructions[0], expected=e,
                    image_found=ok, **s)
               for i, (d, e, ok, s) in enumerate(
                   zip(edits, expected, found, edit_scores))]
  result["edit_accuracy"] = _mean(per_edit)
  result.update(_breakdown("edit", edit_scores))
  for op in documents_lib.EDIT_OPS:
    _add_mean(result, f"edit_accuracy_{op}",
              [ok for ok, d in zip(per_edit, edits) if d.edits[0].op == op])
  result["edit_image_rate"] = float(np.mean(found))
  # The ceiling: the probe on the tokenizer's reconstructions of the scenes
  # the instructions ask for (as for prompts above).
  targets = np.stack([shapes.render(d.scenes[1], size) for d in edits])
  reconstructed = np.concatenate([
      reconstruct(targets[i:i + batch_size])
      for i in range(0, len(targets), batch_size)])
  result["reconstructed_edit_accuracy"] = _mean(
      [s["correct"] for s in score_images(expected, reconstructed)])

  if num_questions > 0:
    asked = _held_out("question", num_questions)
    scenes = np.stack([shapes.render(d.scenes[0], size) for d in asked])
    answers = []
    for i in range(0, len(asked), batch_size):
      answers += model.answer(scenes[i:i + batch_size],
                              [d.question for d in asked[i:i + batch_size]])
    right = [questions_lib.normalize_answer(a)
             == questions_lib.normalize_answer(d.answer)
             for a, d in zip(answers, asked)]
    result["question_accuracy"] = _mean(right)
    kinds = [questions_lib.kind_of(d.question) for d in asked]
    for kind in questions_lib.KINDS:
      _add_mean(result, f"question_accuracy_{kind}",
                [ok for ok, k in zip(right, kinds) if k == kind])
    verdicts += [dict(task="question", index=i, question=d.question,
                      truth=d.answer, answer=a, correct=ok)
                 for i, (d, a, ok) in enumerate(zip(asked, answers, right))]

  # The grounded kinds' boxes on the model's grid (a model without one
  # says so when asked to ground).
  bins = grounding.DEFAULT_BINS
  if num_referring or num_grounded or num_drawn:
    bins = model.layout.location_bins or bins
  if num_referring > 0:
    refers = _held_out("refer", num_referring, bins)
    scenes = np.stack([shapes.render(d.scenes[0], size) for d in refers])
    phrases = [d.question[len("where is "):-1] for d in refers]
    boxes = []
    for i in range(0, len(refers), batch_size):
      boxes += model.ground(scenes[i:i + batch_size],
                            phrases[i:i + batch_size])
    named = [isinstance(d.answer, grounding.BoxTokens) for d in refers]
    hits, ceiling = [], []
    for d, box, is_named, phrase in zip(refers, boxes, named, phrases):
      if not is_named:
        continue
      truth = shapes.object_boxes(d.scenes[0], size)[
          grounding.find_object(d.scenes[0], phrase)]
      hits.append(box is not None and grounding.iou(box, truth) >= 0.5)
      ceiling.append(grounding.iou(
          grounding.locations_to_box(d.answer, size), truth) >= 0.5)
    result["referring_accuracy"] = _mean(hits)
    result["referring_ceiling"] = _mean(ceiling)
    counts = [len(d.scenes[0].objects) for d, n in zip(refers, named) if n]
    for count, name in ((1, "single"), (2, "pair")):
      _add_mean(result, f"referring_accuracy_{name}",
                [h for h, c in zip(hits, counts) if c == count])
    _add_mean(result, "referring_absent_accuracy",
              [box is None for box, n in zip(boxes, named) if not n])
    verdicts += [dict(task="refer", index=i, question=d.question,
                      box=None if b is None else [float(v) for v in b],
                      named=n)
                 for i, (d, b, n) in enumerate(zip(refers, boxes, named))]

  if num_grounded > 0:
    docs = _held_out("grounded_caption", num_grounded, bins)
    scenes = np.stack([shapes.render(d.scenes[0], size) for d in docs])
    texts = []
    for i in range(0, len(docs), batch_size):
      texts += model.caption(scenes[i:i + batch_size], grounded=True,
                             num_beams=caption_beams)
    scores = [grounded_caption_scores(t, d.scenes[0], bins, size)
              for t, d in zip(texts, docs)]
    for key, name in (("correct", ""), ("words", "_words"),
                      ("boxes", "_boxes")):
      result[f"grounded_caption{name}_accuracy"] = _mean(
          [s[key] for s in scores])
    result["grounded_caption_ceiling"] = _mean(
        [grounded_caption_scores(grounding.to_text(d.answer), d.scenes[0],
                                 bins, size)["boxes"] for d in docs])
    verdicts += [dict(task="grounded_caption", index=i,
                      truth=grounding.to_text(d.answer), caption=t, **s)
                 for i, (t, d, s) in enumerate(zip(texts, docs, scores))]

  if num_drawn > 0:
    drawn_docs = _held_out("draw_box", num_drawn, bins)
    requests = [[s for s in d.segments if not isinstance(s, shapes.Scene)]
                for d in drawn_docs]
    drawn = []
    for i in range(0, len(requests), batch_size):
      outputs = model.generate_batch(
          requests[i:i + batch_size], seed=seed + i, temperature=temperature,
          max_images=1, cfg_scale=cfg_scale,
          image_temperature=image_temperature,
          max_new_tokens=model.image_length + 8, max_text_tokens=8)
      drawn += [next((s for s in out if not isinstance(s, str)), None)
                for out in outputs]
    blank = np.zeros((size, size, 3), np.uint8)
    read = probe.predict(np.stack([g if g is not None else blank
                                   for g in drawn]))
    per_object = [drawn_in_boxes(p, d.scenes[0], size, bins) if g is not None
                  else [False] * len(d.scenes[0].objects)
                  for p, d, g in zip(read, drawn_docs, drawn)]
    result["draw_box_accuracy"] = _mean([all(h) for h in per_object])
    result["draw_box_object_accuracy"] = _mean(
        [h for hits in per_object for h in hits])
    truths = np.stack([shapes.render(d.scenes[0], size) for d in drawn_docs])
    rebuilt = probe.predict(np.concatenate([
        reconstruct(truths[i:i + batch_size])
        for i in range(0, len(truths), batch_size)]))
    result["draw_box_ceiling"] = _mean(
        [all(drawn_in_boxes(p, d.scenes[0], size, bins))
         for p, d in zip(rebuilt, drawn_docs)])
    verdicts += [dict(task="draw_box", index=i,
                      request=grounding.to_text(r), image_found=g is not None,
                      found=h, correct=all(h))
                 for i, (r, g, h) in enumerate(zip(requests, drawn,
                                                   per_object))]

  if jax.process_index() == 0:  # one writer (every process computed these)
    epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
    epath.Path(out_dir, "verdicts.jsonl").write_text("".join(
        json.dumps(reports.to_json(verdict)) + "\n" for verdict in verdicts))
    _save_documents(edits[:8], sources[:8], edited[:8], captions[:8],
                    images[:8], samples[:8], prompts[:8],
                    os.path.join(out_dir, "documents.png"))
  return result


def _save_documents(edits, sources, edited, captions, caption_images,
                    samples, prompts, path: str) -> None:
  """PNG: rows of (image, caption), (prompt, sample), (source, instruction,
  generated, expected) examples."""
  size = sources.shape[1]
  tiles, texts = [], []
  for image, text in zip(caption_images, captions):
    tiles.append(image)
    texts.append(f"caption: {text}")
  for image, prompt in zip(samples, prompts):
    tiles.append(image)
    texts.append(f"prompt: {prompt}")
  for doc, source, out in zip(edits, sources, edited):
    truth = shapes.render(doc.scenes[1], size)
    tiles.append(np.concatenate([source, out, truth], axis=1))
    texts.append(f"{doc.instructions[0]} (source | generated | expected)")
  height = max(t.shape[0] for t in tiles)
  width = max(t.shape[1] for t in tiles)
  padded = [np.pad(t, ((0, height - t.shape[0]), (0, width - t.shape[1]),
                       (0, 0)), constant_values=255) for t in tiles]
  grids.save_image_grid(padded, texts, path, columns=4, cell=96)
