"""The end-to-end recipe on own data (configs/own_data.py) at toy size, on a
real captioned image set that ships in a package: scikit-learn's handwritten
digits (8x8 grayscale, labels 0-9), upsampled to 32x32 RGB PNGs, captioned
from their labels and converted with unimm.data.convert."""
import json
import os

from absl import flags
import numpy as np
from PIL import Image
import pytest
from sklearn import datasets

from unimm import config_lib
from unimm import end_to_end
from unimm.data import convert
from unimm.data import pipeline
from unimm.tokenizers import text as text_lib
from unimm.tools import train_text_tokenizer

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs",
                      "own_data.py")
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven",
         "eight", "nine")
TEMPLATES = ("a handwritten digit {}", "the number {} written by hand",
             "a small scanned image of the digit {}")
NUM_TRAIN, NUM_VALIDATION = 80, 16


def write_digits(root: str, first: int, count: int) -> str:
  """digits[first:first + count] as 32x32 PNGs + captions.jsonl in root.

  Each image gets two captions (two templates, by index), so records have
  several "captions".
  """
  digits = datasets.load_digits()
  os.makedirs(root, exist_ok=True)
  lines = []
  for i in range(first, first + count):
    pixels = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)  # [8, 8]
    image = Image.fromarray(pixels).resize((32, 32),
                                           Image.Resampling.BICUBIC)
    image.convert("RGB").save(os.path.join(root, f"{i:04d}.png"))
    name = NAMES[digits.target[i]]
    lines.append({"image": f"{i:04d}.png",
                  "caption": [TEMPLATES[i % 3].format(name),
                              TEMPLATES[(i + 1) % 3].format(name)]})
  path = os.path.join(root, "captions.jsonl")
  with open(path, "w") as f:
    f.write("".join(json.dumps(line) + "\n" for line in lines))
  return path


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
  """{"both": a train + validation directory, "train_only": train only}."""
  root = tmp_path_factory.mktemp("digits")
  train = write_digits(str(root / "train"), 0, NUM_TRAIN)
  validation = write_digits(str(root / "validation"), NUM_TRAIN,
                            NUM_VALIDATION)
  both, train_only = str(root / "both"), str(root / "train_only")
  for out in (both, train_only):
    convert.convert(out=out, image_size=32, split="train",
                    images_dir=str(root / "train"), captions=train,
                    image_format="png")
  convert.convert(out=both, image_size=32, split="validation",
                  images_dir=str(root / "validation"), captions=validation,
                  image_format="png")
  return {"both": both, "train_only": train_only}


def toy_config(data: str, extra: str = ""):
  """configs/own_data.py shrunk to seconds of CPU (the sizes of
  tests/test_end_to_end.py's toy demo)."""
  config = config_lib.load_config(
      f"{CONFIG}:data={data},tokenizer_steps=2,parti_steps=3,batch=8,"
      f"grid=4,codes=16,text_vocab=64{extra}")
  tok = config.tokenizer
  tok.model.update(code_dim=4, encoder_num_layers=1, decoder_num_layers=1,
                   encoder_embed_dim=16, decoder_embed_dim=16,
                   encoder_mlp_dim=32, decoder_mlp_dim=32)
  tok.loss.update(latent_buffer_size=16, restart_every=0)
  tok.data.batch_size = 8
  tok.eval.update(num_images=16, batch_size=16)
  config.pretokenize.batch_size = 32
  if "parti" in config:
    parti = config.parti
    parti.model.update(embed_dim=32, num_heads=2, num_kv_heads=2,
                       head_dim=16, mlp_dim=64, encoder_layers=1,
                       decoder_layers=1)
    parti.log_every_steps = 1
    parti.eval.update(num_single=4, num_pair=4, batch_size=8,
                      num_loss_examples=16, num_grid_samples=4)
  config.own_data.num_prompts = 4
  return config


def test_recipe_runs_every_stage_and_resumes(digits, tmp_path):
  # text_length=6: "a small scanned image of the digit seven" is cut.
  config = toy_config(digits["both"], ",text_length=6")
  assert dict(config.own_data.read_splits) == {"train": "train",
                                               "validation": "validation"}
  workdir = str(tmp_path / "own")
  paths = end_to_end.Paths(workdir)
  report = end_to_end.run(config, workdir)

  # Every stage's output.
  assert os.listdir(os.path.join(paths.tokenizer, "checkpoints")) == ["2"]
  assert os.path.isfile(paths.text_model)
  with open(os.path.join(paths.data, "train.json")) as f:
    train_meta = json.load(f)
  with open(os.path.join(paths.data, "validation.json")) as f:
    validation_meta = json.load(f)
  assert train_meta["num_examples"] == NUM_TRAIN
  assert validation_meta["num_examples"] == NUM_VALIDATION
  assert train_meta["grid"] == [4, 4] and train_meta["text_length"] == 6
  # The truncation count is the captions with more than 5 tokens + EOS.
  first_captions = pipeline.read_captions(digits["both"], "train",
                                          all_captions=False)
  lengths = text_lib.TextTokenizer.load(paths.text_model).count_tokens(
      first_captions)
  assert train_meta["num_truncated_captions"] == int((lengths > 5).sum()) > 0
  report_path = os.path.join(paths.parti, "eval", "report.json")
  with open(report_path) as f:
    assert json.load(f) == report
  assert report["steps"] == 3 and np.isfinite(report["eval_loss"])
  assert report["eval_loss_examples"] == NUM_VALIDATION

  # The sample grid is of the first held-out captions, listed beside it.
  samples = os.path.join(paths.parti, "samples")
  with open(os.path.join(samples, "prompts.txt")) as f:
    prompts = f.read().splitlines()
  assert prompts == pipeline.read_captions(
      digits["both"], "validation", all_captions=False)[:4]
  assert all(set(p.split()) & set(NAMES) for p in prompts)
  pngs = sorted(f for f in os.listdir(samples) if f.endswith(".png"))
  assert pngs == [f"{i:05d}.png" for i in range(4)] + ["grid.png"]
  assert Image.open(os.path.join(samples, "00000.png")).size == (32, 32)

  # A rerun skips every finished stage.
  stamps = {p: os.path.getmtime(p) for p in (
      paths.text_model, os.path.join(paths.data, "train.json"),
      os.path.join(paths.data, "validation.json"), report_path,
      os.path.join(samples, "grid.png"))}
  assert end_to_end.run(config, workdir) == report
  assert {p: os.path.getmtime(p) for p in stamps} == stamps


def test_text_tokenizer_reads_every_caption_of_the_train_split(digits):
  captions = pipeline.read_captions(digits["both"], "train")
  assert len(captions) == 2 * NUM_TRAIN  # two captions per image
  assert captions[:2] == [TEMPLATES[0].format("zero"),
                          TEMPLATES[1].format("zero")]
  first = pipeline.read_captions(digits["both"], "train", all_captions=False)
  assert first == captions[::2]


def test_train_text_tokenizer_tool_reads_a_converted_data_set(digits,
                                                               tmp_path):
  flag_values = flags.FlagValues()
  train_text_tokenizer.define_flags(flag_values)
  flag_values(["train_text_tokenizer", f"--output={tmp_path / 'spiece'}",
               "--vocab_size=64", f"--data={digits['both']}",
               "--data_split=validation"])
  path = train_text_tokenizer.main(["train_text_tokenizer"], flag_values)
  tokenizer = text_lib.TextTokenizer.load(path)
  captions = pipeline.read_captions(digits["both"], "validation")
  assert len(captions) == 2 * NUM_VALIDATION
  assert tokenizer.decode(tokenizer.encode(captions, 64).ids) == captions
  flag_values["source"].value = "shapes"
  with pytest.raises(ValueError, match=r"Got \['--source', '--data'\]; "
                     "pass exactly one"):
    train_text_tokenizer.main(["train_text_tokenizer"], flag_values)


def test_without_validation_the_last_examples_are_held_out(digits):
  config = toy_config(digits["train_only"], ",num_heldout=10")
  assert dict(config.own_data.read_splits) == {
      "train": "train[:-10]", "validation": "train[-10:]"}
  assert dict(config.pretokenize.splits) == {"train": NUM_TRAIN - 10,
                                             "validation": 10}
  assert config.text.split == "train[:-10]"
  assert config.tokenizer.eval.split == "train[-10:]"
  heldout = pipeline.read_captions(digits["train_only"], "train[-10:]",
                                   all_captions=False)
  everything = pipeline.read_captions(digits["train_only"], "train",
                                      all_captions=False)
  assert heldout == everything[-10:]


def test_the_config_needs_a_converted_data_dir(tmp_path):
  with pytest.raises(ValueError, match="needs data=DIR"):
    config_lib.load_config(CONFIG)
  with pytest.raises(ValueError, match=r"data='.*not_converted'.*python -m "
                     r"unimm.tools.convert --out"):
    config_lib.load_config(f"{CONFIG}:data={tmp_path / 'not_converted'}")


def test_an_unknown_model_is_refused(digits):
  with pytest.raises(ValueError, match=r"model='dalle'; expected one of "
                     r"\('parti', 'interleaved'\)"):
    config_lib.load_config(f"{CONFIG}:data={digits['both']},model=dalle")


def test_image_size_must_match_the_data_set(digits, tmp_path):
  with pytest.raises(ValueError, match=r"stores 32x32 images but "
                     r"image_size=64; pass image_size=32"):
    config_lib.load_config(f"{CONFIG}:data={digits['both']},image_size=64")
  # Changed after the config was made: the run stops before training.
  config = toy_config(digits["both"])
  config.own_data.image_size = 64
  workdir = str(tmp_path / "w")
  with pytest.raises(ValueError, match="image_size=64; pass image_size=32"):
    end_to_end.run(config, workdir)
  assert not os.path.exists(os.path.join(workdir, "tokenizer"))


def test_an_empty_split_is_refused(digits):
  with pytest.raises(ValueError, match=r"train split .* would be empty.*"
                     r"lower num_heldout=80"):
    config_lib.load_config(f"{CONFIG}:data={digits['train_only']},"
                           "num_heldout=80")
  with pytest.raises(ValueError, match="expected num_heldout > 0"):
    config_lib.load_config(f"{CONFIG}:data={digits['train_only']},"
                           "num_heldout=0")


def test_a_vocabulary_the_captions_cannot_fill_fails_before_training(
    digits, tmp_path):
  config = toy_config(digits["both"], ",text_vocab=8")
  workdir = str(tmp_path / "w")
  with pytest.raises(ValueError, match=r"vocab_size=8 .* 160 training "
                     r"captions .*the text_vocab argument"):
    end_to_end.run(config, workdir)
  assert not os.path.exists(os.path.join(workdir, "tokenizer"))
