"""The end-to-end demo on the embedded shapes world (unimm.end_to_end).

  python -m unimm.main --config configs/shapes_demo.py --workdir workdirs/demo

trains a ViT-VQGAN on 32x32 shapes (6,000 steps), a SentencePiece model on
their captions, pre-tokenizes 50,000 pairs once, trains Parti tiny on the
ids (1,600 steps with Muon for the hidden matrices, unimm.train.optim),
evaluates it with the shapes probe (workdirs/demo/parti/eval/report.json,
samples.png) and samples a grid for a few prompts
(workdirs/demo/parti/samples/grid.png). Rerunning resumes; --mode sample /
eval act on the Parti stage:

  python -m unimm.main --config configs/shapes_demo.py --workdir workdirs/demo \\
      --mode sample --prompts "a big red circle at the top left"

Expected on 2 CPU cores (docs/results.md): prompt_accuracy_single 0.805 in
17 min 36 s (target 0.8 in 20 min; tokenizer ceiling 0.88). The eval samples
at cfg_scale 1.5, temperature 0.05, chosen on prompts of another seed than
the eval's.

With model=interleaved (another workdir) the same tokenizer recipe is
followed by a SentencePiece model on the shapes documents' texts, 200,000
caption->image, image->caption and edit documents packed into rows
(unimm.data.interleaved), and the decoder-only model of
configs/interleaved_shapes.py (tiny_deep, Muon) trained for 2,000 steps
and scored on captions, prompts and edits (interleaved/eval/report.json):

  python -m unimm.main --config configs/shapes_demo.py:model=interleaved \\
      --workdir workdirs/demo_interleaved

Expected on 2 CPU cores: text-to-image / caption / edit accuracy 0.685 /
0.845 / 0.32 (ceilings 0.88 / - / 0.85) in about 80 min; exported, it is
the packaged unimm.load_model("shapes-interleaved").

Variants (arg "key=value,..."): model (parti | interleaved),
interleaved_steps, num_documents (packed training documents),
tokenizer_steps, parti_steps, num_train
(pre-tokenized training examples), batch, size, lr and optimizer (Parti:
muon | adamw), tokens (SEED's K 1-D causal tokens per image instead of the
8x8 grid, for the tokenizer and Parti; 0 = the grid), keep (LaVIT's
dynamic tokens keeping about this fraction of the 64 patches, for the
tokenizer and the model's variable-length images; 0 = the grid),
token_decoder (cross | joint: how the tokenizer's decoder reads SEED's or
LaVIT's tokens; configs/vit_vqgan_shapes.py), teacher (the workdir of a
trained grid tokenizer through whose frozen decoder SEED's or LaVIT's
tokens are decoded, and teacher_encoder=1 to read its frozen encoder;
configs/vit_vqgan_shapes.py).
"""
import os

import ml_collections

from unimm import config_lib

_HERE = os.path.dirname(os.path.abspath(__file__))

PROMPTS = (
    "a big red circle at the top left",
    "a small blue square in the center",
    "a big yellow triangle at the bottom right",
    "a green star on the left",
    "a big white cross at the top",
    "a small purple diamond at the bottom",
    "an orange circle on the right",
    "a big cyan square at the bottom left",
)


MODELS = ("parti", "interleaved")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, model="parti", tokenizer_steps=6000,
                             parti_steps=1600, num_train=50000, batch=64,
                             size="tiny", lr=1e-2, optimizer="muon", tokens=0,
                             keep=0.0, token_decoder="cross", teacher="",
                             teacher_encoder=0,
                             interleaved_steps=2000,
                             num_documents=200000)
  if arg.model not in MODELS:
    raise ValueError(f"model={arg.model!r}; expected one of {MODELS} "
                     "(configs/shapes_demo.py:model=interleaved).")
  config = ml_collections.ConfigDict()
  config.task = "end_to_end"

  # 1. The tokenizer: 4x4 patches -> 8x8 tokens, 512 codes.
  config.tokenizer = config_lib.load_config(
      os.path.join(_HERE, "vit_vqgan_shapes.py") +
      f":steps={arg.tokenizer_steps},tokens={arg.tokens},keep={arg.keep},"
      f"token_decoder={arg.token_decoder},teacher={arg.teacher},"
      f"teacher_encoder={arg.teacher_encoder}")

  if arg.model == "interleaved":
    return _interleaved(config, arg)

  # 2. The text tokenizer: BPE over shapes captions.
  config.text = ml_collections.ConfigDict(dict(
      source="shapes", num_captions=20000, seed=0, vocab_size=256,
      model_type="bpe"))

  # 3. Pre-tokenization: train + a held-out split for the eval loss.
  config.pretokenize = ml_collections.ConfigDict(dict(
      source="shapes", splits={"train": arg.num_train, "validation": 2000},
      batch_size=256, data_dir=None))

  # 4. Parti over the 8x8 grid (paths are filled in by unimm.end_to_end),
  # with a high learning rate and Muon for the short run, and a cooler,
  # more guided sampler (chosen on 300 prompts of another prompt seed than
  # the eval's).
  config.parti = config_lib.load_config(
      os.path.join(_HERE, "parti_shapes.py") +
      f":size={arg.size},steps={arg.parti_steps},batch={arg.batch},"
      f"lr={arg.lr},optimizer={arg.optimizer},tokens={arg.tokens},"
      f"dynamic={int(bool(arg.keep))}")
  config.parti.eval.temperature = 0.05
  config.parti.eval.cfg_scale = 1.5

  # 5. The sample grid.
  config.prompts = PROMPTS
  config.sampling = ml_collections.ConfigDict(dict(
      seed=0, cfg_scale=config.parti.eval.cfg_scale,
      temperature=config.parti.eval.temperature,
      top_k=config.parti.eval.top_k, top_p=config.parti.eval.top_p))
  return config


def _interleaved(config, arg):
  """Stages 2-5 for model=interleaved: the decoder-only model on packed
  caption->image, image->caption and edit documents."""
  # 2. The text tokenizer: BPE over the documents' texts (instructions have
  # words that captions lack).
  config.text = ml_collections.ConfigDict(dict(
      source="shapes", num_captions=20000, seed=0, vocab_size=128,
      model_type="bpe"))
  # 3. The documents, tokenized and packed into rows of 320 tokens.
  config.pretokenize = ml_collections.ConfigDict(dict(
      source="shapes",
      splits={"train": arg.num_documents, "validation": 2000},
      batch_size=256, data_dir=None))
  # 4. The model: configs/interleaved_shapes.py's tiny_deep with Muon.
  config.interleaved = config_lib.load_config(
      os.path.join(_HERE, "interleaved_shapes.py") +
      f":steps={arg.interleaved_steps},tokens={arg.tokens},"
      f"dynamic={int(bool(arg.keep))}")
  ev = config.interleaved.eval
  # 5. The sample grid, at the eval's image settings.
  config.prompts = PROMPTS
  config.sampling = ml_collections.ConfigDict(dict(
      seed=0, cfg_scale=ev.cfg_scale, temperature=ev.image_temperature,
      top_k=0, top_p=1.0))
  return config
