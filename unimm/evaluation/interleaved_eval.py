"""What the interleaved model can do, read back on held-out shapes documents.

  prompt_accuracy_single  text -> image: one-object prompts, the sample read
                          by the shapes probe (every stated attribute right);
  caption_accuracy        image -> text: the generated caption parsed back to
                          attributes (shapes.parse_caption) and compared with
                          the true scene: every stated attribute and the
                          object count right (an unparseable caption is wrong);
  edit_accuracy           image + instruction -> image: the probe reads the
                          generated image, scored against the caption of the
                          scene the instruction asks for (a missing image is
                          wrong).
Held-out documents are the test split's (unimm.data.interleaved.SPLIT_SEEDS).
"""
import os

import numpy as np

from unimm.data import interleaved as documents_lib
from unimm.data import shapes
from unimm.evaluation import probe as probe_lib


def _truth(scene: shapes.Scene) -> probe_lib.PredictedScene:
  """The scene as a perfect probe would read it."""
  return probe_lib.PredictedScene(tuple(
      probe_lib.PredictedObject(o.shape, o.color, o.size, tuple(o.cell))
      for o in scene.objects))


def caption_correct(text: str, scene: shapes.Scene) -> bool:
  parsed = shapes.parse_caption(text)
  return parsed is not None and probe_lib.score_prompt(
      parsed, _truth(scene))["correct"]


def _held_out(kind: str, num: int) -> list[documents_lib.Document]:
  seed = documents_lib.SPLIT_SEEDS["test"]
  return [documents_lib.make_document(seed, i, kinds=(kind,))
          for i in range(num)]


def evaluate_generation(model, out_dir: str, *, num_prompts: int = 100,
                        num_captions: int = 100, num_edits: int = 100,
                        seed: int = 0, temperature: float = 0.0,
                        batch_size: int = 32,
                        cfg_scale: float | None = None,
                        image_temperature: float | None = None) -> dict:
  """The three accuracies (module doc) of an api.InterleavedModel; writes
  out_dir/report.json entries' values and out_dir/documents.png. Text is
  sampled at `temperature`; generated images (prompts and edits) at
  image_temperature (default: temperature), guided by cfg_scale (None:
  unguided)."""
  if image_temperature is None:
    image_temperature = temperature
  size = model.tokenizer.image_size
  probe = probe_lib.get_probe(size)
  result = {}

  prompts = [c for c, _ in probe_lib.fixed_prompt_set(num_prompts, 0)]
  samples = np.concatenate([
      model.sample(prompts[i:i + batch_size], seed=seed + i,
                   temperature=image_temperature, cfg_scale=cfg_scale)
      for i in range(0, len(prompts), batch_size)])
  result["prompt_accuracy_single"] = float(probe_lib.prompt_accuracy(
      prompts, samples, probe=probe)["prompt_accuracy_single"])
  # The ceiling: the probe on the tokenizer's reconstructions of the same
  # prompts' true scenes.
  result["reconstructed_prompt_accuracy_single"] = float(
      probe_lib.reconstruction_accuracy(
          lambda x: model.tokenizer.decode(model.tokenizer.encode(x)),
          num_prompts, 0, size, probe=probe)["prompt_accuracy_single"])

  docs = _held_out("image_caption", num_captions)
  images = np.stack([shapes.render(d.scenes[0], size) for d in docs])
  captions = []
  for i in range(0, len(docs), batch_size):
    captions += model.caption(images[i:i + batch_size])
  result["caption_accuracy"] = float(np.mean(
      [caption_correct(c, d.scenes[0]) for c, d in zip(captions, docs)]))

  edits = _held_out("edit", num_edits)
  sources = np.stack([shapes.render(d.scenes[0], size) for d in edits])
  expected = [shapes.caption(d.scenes[1], 0) for d in edits]
  outputs = []
  for i in range(0, len(edits), batch_size):
    outputs += model.generate_batch(
        [[source, d.instructions[0]] for source, d in
         zip(sources[i:i + batch_size], edits[i:i + batch_size])],
        seed=seed + i, temperature=temperature, max_images=1,
        cfg_scale=cfg_scale, image_temperature=image_temperature,
        # After the instruction the model should open the image at once.
        max_new_tokens=model.task.model.image_length + 8, max_text_tokens=8)
  generated = [next((s for s in out if not isinstance(s, str)), None)
               for out in outputs]
  found = [g is not None for g in generated]
  blank = np.zeros((size, size, 3), np.uint8)
  edited = np.stack([g if g is not None else blank for g in generated])
  per_edit = [ok and probe_lib.score_prompt(shapes.parse_caption(e),
                                             p)["correct"]
              for e, p, ok in zip(expected, probe.predict(edited), found)]
  result["edit_accuracy"] = float(np.mean(per_edit))
  result["edit_image_rate"] = float(np.mean(found))

  os.makedirs(out_dir, exist_ok=True)
  _save_documents(edits[:8], sources[:8], edited[:8], captions[:8],
                  images[:8], samples[:8], prompts[:8],
                  os.path.join(out_dir, "documents.png"))
  return result


def _save_documents(edits, sources, edited, captions, caption_images,
                    samples, prompts, path: str) -> None:
  """PNG: rows of (image, caption), (prompt, sample), (source, instruction,
  generated, expected) examples."""
  from unimm.train import parti_task  # pylint: disable=g-import-not-at-top
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
  parti_task.save_sample_grid(padded, texts, path, columns=4, cell=96)
