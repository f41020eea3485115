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


def _complete_caption(scene: shapes.Scene) -> str:
  """A caption of the scene stating every attribute of every object."""
  return shapes.caption(scene,
                        shapes.COMPLETE_TEMPLATES[len(scene.objects)])


def caption_correct(text: str, scene: shapes.Scene) -> bool:
  return caption_scores(text, scene)["correct"]


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


def _held_out(kind: str, num: int) -> list[documents_lib.Document]:
  seed = documents_lib.SPLIT_SEEDS["test"]
  return [documents_lib.make_document(seed, i, kinds=(kind,))
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
                        num_referring: int = 0) -> dict:
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
                    truth=_complete_caption(d.scenes[0]), caption=c, **s)
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
  expected = [_complete_caption(d.scenes[1]) for d in edits]
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

  if num_referring > 0:
    refers = _held_out("refer", num_referring)
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
