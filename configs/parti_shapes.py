"""Parti on the embedded 32x32 shapes data set, over a frozen ViT-VQGAN.

  # 1. an image tokenizer and a text tokenizer
  python -m unimm.main --config configs/vit_vqgan_shapes.py:codes=2048 \\
      --workdir workdirs/vit_vqgan_shapes
  python -m unimm.tools.train_text_tokenizer --output workdirs/spiece \\
      --vocab_size 256 --source shapes
  # 2. encode the images once (and --split validation for a held-out loss)
  python -m unimm.tools.pretokenize --tokenizer_workdir \\
      workdirs/vit_vqgan_shapes --text_tokenizer workdirs/spiece.model \\
      --source shapes_large --split train --out workdirs/parti_shapes_data
  # 3. train and evaluate (prompt accuracy with the shapes probe)
  python -m unimm.main --config configs/parti_shapes.py:codes=2048 \\
      --workdir workdirs/parti_shapes

Trains tiny_deep (2 + 8 layers of width 128) with Muon for the hidden
matrices at lr 1e-2, 6,000 steps at batch 64; the eval samples 200 + 200
fixed prompts at cfg_scale 1.5, temperature 0.7 (guidance at Parti's 3.0
scatters objects at this size). Pre-tokenize shapes_large's 500,000 pairs:
shapes' 50,000 are memorised by 6,000 steps.

Expected on 2 CPU cores (docs/results.md): prompt_accuracy_single /
_pair 0.965 / 0.775 in 62 min (targets 0.95 / 0.7; tokenizer ceiling
0.95 / 0.875).

Variants (arg "key=value,..."): size (a row of unimm.models.parti.SIZES:
tiny | tiny_deep | small | 350m | 750m | 3b | 20b), steps, batch,
tokenizer_workdir, text_tokenizer ("" = the copy in pretokenized_dir),
pretokenized_dir, text_vocab (>= the SentencePiece vocabulary), codes and
grid (the tokenizer's num_codes and h = w of its token grid), tokens (a
SEED tokenizer's K 1-D tokens per image instead of grid, trained with
configs/vit_vqgan_shapes.py:tokens=K; its positions are 1-D), dynamic (1:
a LaVIT tokenizer's variable-length images, configs/vit_vqgan_shapes.py:
keep=R: up to grid*grid codes then EOI, 1-D positions), text_length,
lr (the CPU sizes; the paper sizes use 4.5e-4), optimizer (muon | adamw:
unimm.train.optim; Muon for the hidden matrices, AdamW for the rest),
positions (learned_2d | learned | rope), scan (auto | true | false: nn.scan
over layers; auto unrolls them at the CPU sizes,
unimm.config_lib.scan_layers), t5 (a local Hugging Face T5 directory:
Parti's text encoder becomes that T5 encoder, initialised from its
weights).

FID and CLIP score (unimm.evaluation.generation_metrics; docs/evaluation.md),
added to eval/report.json by --mode eval when set (all off by default):
  config.eval.inception_weights  pytorch-fid's .pth (or its .npz)
  config.eval.fid_reference      reference statistics: a pytorch-fid .npz of
      mu/sigma, a folder of images, or SOURCE:SPLIT of a data source (e.g.
      "shapes:test"; cached as workdir/eval/fid_reference_*.npz)
  config.eval.clip_dir           a Hugging Face CLIP directory
  config.eval.metrics_prompts    a prompts file (one a line, or a TSV with a
      Prompt column, e.g. PartiPrompts.tsv) or SOURCE:SPLIT; "" = captions of
      the test split (fid_reference's split if it is SOURCE:SPLIT), as in
      the COCO-30k protocol
  config.eval.metrics_num_images the first N prompts (default 1000)
FID needs inception_weights and fid_reference; CLIP score needs clip_dir.
  python -m unimm.main --config configs/parti_shapes.py --mode eval \
      --workdir workdirs/parti_shapes \
      --config.eval.inception_weights=pt_inception-2015-12-05-6726825d.pth \
      --config.eval.fid_reference=shapes:test \
      --config.eval.clip_dir=clip-vit-base-patch32
"""
import os

import ml_collections

from unimm import config_lib
from unimm import parallel
from unimm.models import t5
from unimm.models.parti import parti_config


def get_config(arg=None):
  arg = config_lib.parse_arg(
      arg, size="tiny_deep", steps=6000, batch=64,
      tokenizer_workdir="workdirs/vit_vqgan_shapes", text_tokenizer="",
      pretokenized_dir="workdirs/parti_shapes_data", text_vocab=256,
      codes=512, grid=8, text_length=24, lr=1e-2, positions="learned_2d",
      scan="auto", t5="", optimizer="muon", tokens=0, dynamic=0)
  config = config_lib.base_config("parti", arg.steps)

  # The frozen tokenizers: images decode through tokenizer_workdir; the text
  # tokenizer defaults to the copy that pre-tokenization stores.
  config.tokenizer_workdir = arg.tokenizer_workdir
  config.text_tokenizer = arg.text_tokenizer
  # Parti §3 / Ho & Salimans 2022: drop the text for 10% of the examples.
  config.cfg_dropout = 0.1

  config.model = ml_collections.ConfigDict(parti_config(
      arg.size, text_vocab_size=arg.text_vocab, image_vocab_size=arg.codes,
      text_length=arg.text_length,
      image_length=arg.tokens or arg.grid * arg.grid,
      # 1-D tokens have no rows and columns: one learned table over them.
      positions="learned" if (arg.tokens or arg.dynamic) and (
          arg.positions == "learned_2d") else arg.positions,
      end_of_image=bool(arg.dynamic),
      scan_layers=config_lib.scan_layers(arg.scan, arg.size)))

  # Optional T5 text encoder (Parti §2.2), loaded from a local Hugging Face
  # directory (config.json + model.safetensors); its spiece.model, if
  # present, becomes the text tokenizer (re-run pre-tokenization with it).
  config.t5_checkpoint = arg.t5
  if arg.t5:
    t5_fields = t5.t5_config(arg.t5)
    config.model.update(text_encoder="t5", text_vocab_size=max(
        arg.text_vocab, t5_fields["vocab_size"]),
                        **{f"t5_{k}": v for k, v in t5_fields.items()})
    spiece = os.path.join(arg.t5, "spiece.model")
    if not arg.text_tokenizer and os.path.exists(spiece):
      config.text_tokenizer = spiece

  # Large sizes: Parti §4.1's optimizer settings (lr 4.5e-4, beta2 0.96,
  # decoupled weight decay 0.045); the CPU sizes (those unrolled by
  # scan=auto) take a higher rate.
  small_model = arg.size in config_lib.UNROLLED_SIZES
  config.optimizer = ml_collections.ConfigDict(dict(
      name=arg.optimizer, lr=arg.lr if small_model else 4.5e-4,
      warmup_steps=min(1000, arg.steps // 10), end_lr_fraction=0.05,
      b1=0.9, b2=0.98 if small_model else 0.96, eps=1e-8,
      weight_decay=0.01 if small_model else 0.045, grad_clip_norm=1.0))

  config.data = ml_collections.ConfigDict(dict(
      pretokenized_dir=arg.pretokenized_dir, batch_size=arg.batch,
      worker_count=0))
  config.eval = ml_collections.ConfigDict(dict(
      num_single=200, num_pair=200, prompt_seed=None, seed=0, batch_size=100,
      cfg_scale=1.5, temperature=0.7, top_k=0, top_p=1.0,
      loss_split="validation", num_loss_examples=2000,
      num_grid_samples=32,
      # FID and CLIP score in --mode eval (off while these are empty).
      inception_weights="", fid_reference="", clip_dir="",
      metrics_prompts="", metrics_num_images=1000))

  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.logical_axis_rules = parallel.STANDARD_RULES
  return config
