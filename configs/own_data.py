"""The end-to-end recipe on your own converted data set: Parti, or the
decoder-only interleaved model.

  python -m unimm.tools.convert --out DIR --image_size 32 \\
      --images_dir photos/ --captions captions.jsonl
  python -m unimm.main --config configs/own_data.py:data=DIR --workdir W
  python -m unimm.main --config configs/own_data.py:data=DIR,model=interleaved \\
      --workdir W2

runs unimm.end_to_end on DIR as configs/shapes_demo.py does on shapes, each
stage in a subdirectory of W, each skipped once complete (rerun the same
command to resume after Ctrl-C, SIGTERM or preemption):
  1. W/tokenizer/  a ViT-VQGAN trained on DIR's training images;
  2. W/text/       a SentencePiece model trained on every caption of the
                   training examples (all of a record's "captions");
  3. W/data/       the training and held-out pairs encoded once by both
                   frozen tokenizers (truncated captions are counted in
                   W/data/SPLIT.json and in the stage's log);
  4. W/parti/      Parti trained on the ids and evaluated:
                   W/parti/eval/report.json (held-out loss and the eval's
                   held-out metrics; the shapes probe does not apply);
  5. W/parti/samples/  one sample per held-out caption (the first
                   num_prompts), grid.png, and those captions in prompts.txt.
With model=interleaved, stage 2 also covers the words that ask for a
caption (unimm.data.interleaved.CAPTION_PROMPT), stage 3 packs every pair
as a caption->image and an image->caption document
(unimm.data.interleaved.write_pairs: W/data/SPLIT.json, captions cut to
text_length - 1 pieces and counted), and stages 4-5 run in W/interleaved/:
held-out text and image losses, caption retrieval both ways (R@1/R@5 by
log p(image | caption) and by log p(caption | image)),
eval/heldout_samples.png and eval/heldout_captions.tsv (each held-out
caption beside the model's caption of the image).
Before any training the recipe checks that DIR is a converted data set, that
its images are image_size x image_size, that the training and held-out
splits are not empty, that the captions allow text_vocab pieces, and logs
how many training captions exceed text_length tokens.

Held-out pairs: DIR's "validation" split when it has one (convert it with
`--split validation`); otherwise the last num_heldout examples of "train",
which SentencePiece and Parti then never see (the image tokenizer trains on
all of "train"). They give Parti's held-out loss, the tokenizer's eval
images and the sample grid's captions.

Variants (arg "key=value,..."): data (required: the converted directory),
model (parti | interleaved), image_size (32; the
size DIR was converted at), grid (8: the token grid is grid x grid, patches
of image_size / grid pixels), codes (512), tokenizer_steps, parti_steps,
batch, size (Parti: tiny | tiny_deep | small ...), lr, optimizer (muon |
adamw), text_vocab (256 SentencePiece pieces, at most what the captions
allow), text_length (32 text tokens incl. EOS), num_heldout (200; used
without a validation split), num_prompts (8 grid captions); for
model=interleaved: interleaved_steps (600), interleaved_size (tiny_deep:
unimm.models.interleaved.SIZES), interleaved_batch (32 packed rows of
3 * (grid^2 + text_length) tokens), image_input (codes | patches |
resampler: how the image opening an image->caption document is read,
unimm.models.image_input; rows grow to hold a longer read span), patch
(pixels per Fuyu patch side, 4), queries (resampler READ slots, 16),
experts (OneLLM resamplers mixed by a router, 1); lr and optimizer apply
to either model.

Measured with the defaults on scikit-learn's handwritten digits (1,597
training + 200 validation images upsampled from 8x8 to 32x32, one caption
each such as "a handwritten digit seven": `python benchmarks/own_digits.py
make --out DIR`; docs/data.md "One command on your own data",
docs/results.md), on 2 idle CPU cores: tokenizer held-out PSNR 31.8 dB,
codebook usage 1.0. Parti: 14 min in all; held-out eval_loss 6.47 (it
overfits 1,597 images in 1,200 steps), retrieval_r1 / r5 0.47 / 0.75
(chance 0.13 / 0.51), and a digit classifier reads the prompted digit in
0.98 of 200 samples (`benchmarks/own_digits.py score`). model=interleaved:
19 min in all; held-out text / image loss 0.25 / 3.80, retrieval by
log p(caption | image) R@1 / R@5 0.91 / 0.97, the prompted digit in 0.87
of samples and the right digit named in 0.87 of held-out captions.
"""
import os

import ml_collections

from unimm import config_lib
from unimm.data import pipeline
from unimm.models import image_input as image_input_lib

_HERE = os.path.dirname(os.path.abspath(__file__))

MODELS = ("parti", "interleaved")


def _heldout_splits(info: dict, data: str, num_heldout: int
                    ) -> tuple[dict[str, str], dict[str, int]]:
  """({"train": read split, "validation": read split}, their sizes)."""
  splits = info["splits"]
  if "train" not in splits:
    raise ValueError(
        f"data={data!r} has splits {sorted(splits)} but no 'train' split; "
        "convert the training images with `python -m unimm.tools.convert "
        f"--out {data} --split train ...`.")
  num_train = splits["train"]
  if "validation" in splits:
    read = {"train": "train", "validation": "validation"}
    sizes = {"train": num_train, "validation": splits["validation"]}
  else:
    if num_heldout <= 0:
      raise ValueError(
          f"num_heldout={num_heldout} and data={data!r} has no 'validation' "
          "split; expected num_heldout > 0 (held-out pairs for the eval and "
          "the sample grid), or convert a split with --split validation.")
    read = {"train": f"train[:-{num_heldout}]",
            "validation": f"train[-{num_heldout}:]"}
    sizes = {"train": num_train - num_heldout, "validation": num_heldout}
  for name, size in sizes.items():
    if size <= 0:
      raise ValueError(
          f"The {name} split of data={data!r} would be empty ({read[name]!r} "
          f"of {splits}); expected at least one example: lower num_heldout="
          f"{num_heldout} or convert more images.")
  return read, sizes


def get_config(arg=None):
  arg = config_lib.parse_arg(
      arg, data="", model="parti", image_size=32, grid=8, codes=512,
      tokenizer_steps=3000, parti_steps=1200, batch=64, size="tiny", lr=1e-2,
      optimizer="muon", text_vocab=256, text_length=32, num_heldout=200,
      num_prompts=8, interleaved_steps=600, interleaved_size="tiny_deep",
      interleaved_batch=32, image_input="codes", patch=4, queries=16,
      experts=1)
  if arg.model not in MODELS:
    raise ValueError(
        f"model={arg.model!r}; expected one of {MODELS} "
        "(configs/own_data.py:data=DIR,model=parti).")
  if arg.image_input != "codes" and arg.model != "interleaved":
    raise ValueError(
        f"image_input={arg.image_input!r} sets how the interleaved model "
        f"reads images, but model={arg.model!r} (Parti reads captions, not "
        "images); pass model=interleaved or drop image_input.")
  if not arg.data:
    raise ValueError(
        "configs/own_data.py needs data=DIR, a directory written by `python "
        "-m unimm.tools.convert --out DIR --image_size 32 ...`: pass "
        "--config configs/own_data.py:data=DIR.")
  data = os.path.abspath(arg.data)
  info = pipeline.converted_info(data, setting="data")
  if info["image_size"] != arg.image_size:
    raise ValueError(
        f"data={arg.data!r} stores {info['image_size']}x{info['image_size']} "
        f"images but image_size={arg.image_size}; pass image_size="
        f"{info['image_size']} (configs/own_data.py:data=...,image_size="
        f"{info['image_size']}) or convert again with --image_size "
        f"{arg.image_size}.")
  if arg.grid <= 0 or arg.image_size % arg.grid:
    raise ValueError(
        f"grid={arg.grid} does not divide image_size={arg.image_size}; "
        "expected the token grid to tile the image (patches of image_size / "
        "grid pixels), e.g. grid=8.")
  read_splits, sizes = _heldout_splits(info, data, arg.num_heldout)

  config = ml_collections.ConfigDict()
  config.task = "end_to_end"
  # The own-data settings unimm.end_to_end checks before any training.
  config.own_data = ml_collections.ConfigDict(dict(
      dir=data, image_size=arg.image_size, read_splits=read_splits,
      num_prompts=arg.num_prompts, text_vocab=arg.text_vocab,
      model=arg.model))

  # 1. The image tokenizer on DIR's training images (held-out ones: eval).
  patch = arg.image_size // arg.grid
  config.tokenizer = config_lib.load_config(
      os.path.join(_HERE, "vit_vqgan_shapes.py") +
      f":steps={arg.tokenizer_steps},patch={patch},codes={arg.codes}")
  tok = config.tokenizer
  tok.model.image_size = arg.image_size
  tok.data.update(source=data, image_size=arg.image_size,
                  in_memory=arg.image_size <= 64)
  tok.eval.update(split=read_splits["validation"],
                  num_images=min(tok.eval.num_images, sizes["validation"]),
                  probe_prompts=0)

  # 2. The text tokenizer: BPE over every caption of the training examples.
  config.text = ml_collections.ConfigDict(dict(
      source=data, split=read_splits["train"], seed=0,
      vocab_size=arg.text_vocab, model_type="bpe"))

  # 3. Pre-tokenization of the training and held-out pairs.
  config.pretokenize = ml_collections.ConfigDict(dict(
      source=data, splits=sizes, read_splits=read_splits, batch_size=256,
      data_dir=None))
  if arg.model == "interleaved":
    return _interleaved(config, arg)

  # 4. Parti over the grid x grid codes (paths filled in by end_to_end).
  config.parti = config_lib.load_config(
      os.path.join(_HERE, "parti_shapes.py") +
      f":size={arg.size},steps={arg.parti_steps},batch={arg.batch},"
      f"lr={arg.lr},optimizer={arg.optimizer},text_vocab={arg.text_vocab},"
      f"codes={arg.codes},grid={arg.grid},text_length={arg.text_length}")
  config.parti.eval.temperature = 0.7
  config.parti.eval.cfg_scale = 1.5
  config.parti.eval.loss_split = "validation"
  config.parti.eval.num_loss_examples = sizes["validation"]

  # 5. The sample grid: the first num_prompts held-out captions, read when
  # sampling (end_to_end writes them to parti/samples/prompts.txt).
  config.prompts = ()
  config.sampling = ml_collections.ConfigDict(dict(
      seed=0, cfg_scale=config.parti.eval.cfg_scale,
      temperature=config.parti.eval.temperature,
      top_k=config.parti.eval.top_k, top_p=config.parti.eval.top_p))
  return config


def _interleaved(config, arg):
  """Stages 4 and 5 for model=interleaved: the decoder-only model on the
  pairs as caption->image and image->caption documents."""
  # Each document is [BOS, caption (<= text_length - 1 pieces), BOI,
  # grid^2 codes, EOI, EOS] or the image first, with CAPTION_PROMPT; the
  # context also holds an image, the prompt and a caption being written
  # with the sampler's room for one more phase.
  image_tokens = arg.grid * arg.grid
  reading = image_input_lib.ImageInput(arg.image_input, arg.patch,
                                       arg.queries)
  if reading.reads_images:  # a read span may be longer than the codes
    read_tokens = reading.span_length((arg.image_size, arg.image_size, 3)) - 2
    image_tokens = max(image_tokens, read_tokens)
  length = 3 * (image_tokens + arg.text_length)
  config.pretokenize.max_text_tokens = arg.text_length - 1
  config.interleaved = config_lib.load_config(
      os.path.join(_HERE, "interleaved_shapes.py") +
      f":size={arg.interleaved_size},steps={arg.interleaved_steps},"
      f"batch={arg.interleaved_batch},length={length},lr={arg.lr},"
      f"optimizer={arg.optimizer},text_vocab={arg.text_vocab},"
      f"codes={arg.codes},grid={arg.grid},cfg=1.5,image_temp=0.7,beams=4,"
      f"rerank=0.5,image_input={arg.image_input},patch={arg.patch},"
      f"queries={arg.queries},experts={arg.experts}")
  config.interleaved.eval.update(
      num_generation=0, retrieval_pairs=32, num_grid_samples=arg.num_prompts, seed=0)
  config.prompts = ()
  config.sampling = ml_collections.ConfigDict(dict(
      seed=0, cfg_scale=1.5, temperature=0.7, top_k=0, top_p=1.0))
  return config
