r"""The own-data recipe's measured set: scikit-learn's handwritten digits.

  python benchmarks/own_digits.py make --out /tmp/digits
      writes the 1,797 8x8 digits upsampled to 32x32 RGB PNGs, one caption
      each from the label ("a handwritten digit seven"), and converts them
      with unimm.tools.convert: the first 1,597 as "train", the last 200 as
      "validation" (DIR/convert_summary.json counts them).
  python -m unimm.main --config configs/own_data.py:data=/tmp/digits \
      --workdir W            (or ,model=interleaved)
  python benchmarks/own_digits.py score --data /tmp/digits --workdir W
      reads the trained model's samples with a digit classifier (logistic
      regression on 8x8 grey block means of the training images; its
      accuracy on the real held-out images is printed beside) and prints
      the fraction of samples of held-out captions that show the prompted
      digit; for an interleaved model also the fraction of held-out images
      whose caption names the right digit. One JSON line.

The digits ship with scikit-learn: no download.
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np
from PIL import Image
from sklearn import datasets
from sklearn import linear_model

import unimm
from unimm import api
from unimm.data import convert
from unimm.data import pipeline

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven",
         "eight", "nine")
NUM_TRAIN = 1597


def make(out: str) -> dict:
  """Writes and converts the digits; returns the two conversion summaries."""
  digits = datasets.load_digits()
  summaries = {}
  with tempfile.TemporaryDirectory() as root:
    for split, indices in (("train", range(NUM_TRAIN)),
                           ("validation", range(NUM_TRAIN,
                                                len(digits.images)))):
      folder = os.path.join(root, split)
      os.makedirs(folder)
      lines = []
      for i in indices:
        pixels = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(pixels).resize(
            (32, 32), Image.Resampling.BICUBIC).convert("RGB").save(
                os.path.join(folder, f"{i:04d}.png"))
        lines.append(json.dumps({
            "image": f"{i:04d}.png",
            "caption": f"a handwritten digit {NAMES[digits.target[i]]}"}))
      captions = os.path.join(folder, "captions.jsonl")
      with open(captions, "w") as f:
        f.write("\n".join(lines) + "\n")
      summaries[split] = convert.convert(
          out=out, image_size=32, split=split, images_dir=folder,
          captions=captions, image_format="png")
  return summaries


def _features(images) -> np.ndarray:
  """uint8 [N, 32, 32, 3] -> the 8x8 grey block means [N, 64]."""
  grey = np.asarray(images, np.float32).mean(-1)
  return grey.reshape(len(grey), 8, 4, 8, 4).mean((2, 4)).reshape(
      len(grey), 64) / 255.0


def _split(data: str, split: str):
  source, _ = pipeline.image_text_source(data, split, image_size=32)
  examples = [source[i] for i in range(len(source))]
  images = np.stack([np.asarray(e["image"], np.uint8) for e in examples])
  captions = [pipeline.parse_image_text(e, image_size=32)["caption"]
              for e in examples]
  labels = np.array([NAMES.index(c.split()[-1]) for c in captions])
  return images, captions, labels


def score(data: str, workdir: str, num: int = 200, seed: int = 0) -> dict:
  train_images, _, train_labels = _split(data, "train")
  images, captions, labels = _split(data, "validation")
  images, captions, labels = images[:num], captions[:num], labels[:num]
  classifier = linear_model.LogisticRegression(max_iter=2000).fit(
      _features(train_images), train_labels)
  model = unimm.load_model(workdir)
  samples = np.concatenate([model.sample(captions[i:i + 50], seed=seed)
                            for i in range(0, len(captions), 50)])
  result = {
      "workdir": workdir, "num": len(captions),
      "classifier_on_real_heldout": float(
          (classifier.predict(_features(images)) == labels).mean()),
      "prompted_digit_in_samples": float(
          (classifier.predict(_features(samples)) == labels).mean()),
  }
  if isinstance(model, api.InterleavedModel):
    written = model.caption(images)
    result["captions_name_the_digit"] = float(np.mean(
        [NAMES[label] in text.split() for label, text in zip(labels,
                                                            written)]))
  return result


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  make_args = sub.add_parser("make")
  make_args.add_argument("--out", required=True)
  score_args = sub.add_parser("score")
  score_args.add_argument("--data", required=True)
  score_args.add_argument("--workdir", required=True)
  score_args.add_argument("--num", type=int, default=200)
  args = parser.parse_args(argv)
  if args.command == "make":
    out = make(args.out)
    print(json.dumps({s: {k: v[k] for k in ("converted", "skipped")}
                      for s, v in out.items()}))
  else:
    print(json.dumps(score(args.data, args.workdir, args.num)))


if __name__ == "__main__":
  sys.exit(main())
