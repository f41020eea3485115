"""The decoder-only interleaved model on shapes documents.

  python -m unimm.main --config configs/vit_vqgan_shapes.py:steps=16000 \\
      --workdir workdirs/tok_16k
  python -m unimm.tokenizers.text --output workdirs/interleaved_text/spiece \\
      --vocab_size 128 --source interleaved --num_captions 20000
  python -m unimm.data.interleaved --tokenizer_workdir workdirs/tok_16k \\
      --text_tokenizer workdirs/interleaved_text/spiece.model \\
      --out workdirs/interleaved_data --split train --num_documents 500000 \\
      --length 320
  (and --split validation --num_documents 2000)
  python -m unimm.main --config configs/interleaved_shapes.py \\
      --workdir workdirs/interleaved

Documents: caption then image, image then caption, and edit stories
(unimm.data.interleaved), packed into rows of `length` tokens. The text
tokenizer must be trained on interleaved.document_texts (instructions have
words that captions lack).

Measured (2 CPU cores, README results, probe v2): these defaults (tiny_deep:
8 layers of width 128, multi-head attention (kv_heads=4); Muon at lr 1e-2;
3,000 steps at batch 32 on 500,000 documents packed with the 16,000-step
tokenizer (37.25 dB; ceilings: prompts 0.96, edits 0.96); 87 min at 0.57-0.6
steps/s, session 23) give prompt_accuracy_single 0.935 (0.96 in a second
sampling draw), caption_accuracy 0.715, edit_accuracy 0.59 (0.595) on
held-out documents: text-to-image above its target 0.9, captions and edits
below theirs (0.95 / 0.7). That run resumed to 6,000 steps (copy
checkpoints/3000 into a new workdir, add steps=6000: a warm restart of the
cosine schedule, 88 min more, session 24): 0.965 (0.97) / 0.81 / 0.675
(0.685), validation loss 0.306 -> 0.293 (two-object captions 0.636, mostly
the two objects' places swapped; edited shape 0.785); and to 9,000
steps (checkpoints/6000, steps=9000, 93 min): 0.965 (0.98) / 0.80 / 0.705
(0.71), validation loss 0.288: edits at their target, captions flat.
Those captions were greedy; beam search (beams=4, session 25) reads them
at 0.815 (3,000 steps) and 0.825 (9,000), and the eval's default since
session 26, 8 beams reranked by log p(image | caption) at weight 0.5
(rerank=0.5), at 0.94 and 0.975: at 9,000 steps all three targets are met
(0.965 / 0.975 / 0.705). Image-then-caption
documents at twice the weight (--weights 1,2,1 when packing; 3,000 steps)
gave 0.935 / 0.72 / 0.515: no better captions, worse edits. The
same recipe on the 8,000-step tokenizer
(workdirs/tokenizer, 34.12 dB; ceilings 0.95 / 0.91) and 200,000
documents (session 19, 97 min) gave 0.845 / 0.72 / 0.44, and that run,
trained on to 12,000 steps, 0.91 / 0.82 / 0.53: the better tokenizer is
worth more to drawing and editing than 9,000 more steps, but not to
captions (two-object 0.455; 28 of the 54 failed ones name one object
twice). The session-19 run resumed to
6,000 steps (copy checkpoints/3000 into a new workdir, add steps=6000: a
warm restart of the cosine schedule, 90 min more, session 20): 0.865 / 0.80
/ 0.48, validation loss 0.3895 -> 0.3745 (one-object captions 0.97,
two-object 0.626; edits still miss the shape, 0.615); again to 9,000 steps
(checkpoints/6000, steps=9000, 91 min, session 21): 0.92 (0.895 in a second
sampling draw) / 0.82 / 0.51, validation loss 0.368 (edited shape 0.64); and
to 12,000 steps on 500,000 documents (checkpoints/9000, steps=12000,
packed_dir=workdirs/interleaved_data_500k packed with --num_documents 500000;
86 min, session 22): 0.91 (0.93) / 0.82 / 0.53 (0.54), validation loss 0.361
with no train/validation gap, captions (two-object 0.667) and edits (edited
shape 0.65) hardly moved. The model's
default, multi-query attention (kv_heads=1: one 32-wide key/value head
shared by the 4 query heads at this width), gave 0.80 / 0.67 / 0.405 on the
same documents (session 18, 78 min) and 0.775 / 0.695 / 0.38 on 50,000
(session 16): more documents lowered the validation loss (0.413 -> 0.396;
0.3895 with kv_heads=4) but not the accuracies; the key/value heads lift
two-object captions (0.39 -> 0.515) and, less surely, the rest. size=tiny (4
layers), MQA, 50,000 documents, 3,500 steps: 0.61 / 0.66 / 0.355 in 51 min.
The earlier defaults (tiny, AdamW, 5,000 steps, 72 min; probe v1 readings
for the images) gave 0.73 / 0.59 / 0.36, and resumed to 8,000 steps 0.825 /
0.595 / 0.37 with the validation loss flat (0.371) while the training loss
fell: on 50,000 documents the image tokens overfit and captions and edits
stall. Trained on caption-then-image documents alone (batch 32, lr 1e-2) the
4-layer model reaches prompt_accuracy_single 0.745 in 1,500 steps (its
tokenizer's ceiling 0.79). caption_accuracy does not use the probe (README,
"The probe's share"). The earlier recipe (batch=16,lr=3e-3) gave 0.01 / 0.09
/ 0.00 after 6,000 steps.

Variants (arg "key=value,..."): size (unimm.models.interleaved.SIZES:
tiny | tiny_deep | small | 1b | 7b), kv_heads (key/value heads: 1 =
multi-query, as Gemini; the size's num_heads = multi-head), steps, batch,
length (= config.model.max_len), text_vocab, codes, grid (image tokens per
side), packed_dir, tokenizer_workdir, text_tokenizer, lr, image_positions
(1d | 2d), qk_norm, text_weight, image_weight, drop_text (the rate of
documents trained without their text, for classifier-free guidance), cfg
(the eval's guidance scale for generated images; 1 = none), image_temp
(the eval's sampling temperature for images; its text is greedy), beams
(the eval's beam width for captions; 1 = greedy), rerank (the weight of
log p(image | caption) when reranking those beams; 0 = none), dtype,
remat, scan (auto | true | false: nn.scan over layers; auto unrolls them
at the CPU sizes, unimm.config_lib.scan_layers), optimizer (muon | adamw:
unimm.train.optim).
"""
import ml_collections

from unimm import config_lib
from unimm import parallel
from unimm.models.interleaved import interleaved_config


def get_config(arg=None):
  arg = config_lib.parse_arg(
      arg, size="tiny_deep", kv_heads=4, steps=3000, batch=32, length=320,
      text_vocab=128, codes=512, grid=8, packed_dir="workdirs/interleaved_data",
      tokenizer_workdir="workdirs/tok_16k",
      text_tokenizer="workdirs/interleaved_text/spiece.model", lr=1e-2,
      image_positions="2d", qk_norm=1, text_weight=1.0, image_weight=1.0,
      drop_text=0.1, cfg=1.5, image_temp=0.5, beams=8, rerank=0.5, dtype="float32",
      remat="none", scan="auto", optimizer="muon")
  config = config_lib.base_config("interleaved", arg.steps)
  config.tokenizer_workdir = arg.tokenizer_workdir
  config.text_tokenizer = arg.text_tokenizer
  config.vocab = ml_collections.ConfigDict(dict(
      text_vocab_size=arg.text_vocab, image_vocab_size=arg.codes))
  config.model = ml_collections.ConfigDict(interleaved_config(
      arg.size, num_kv_heads=arg.kv_heads,
      vocab_size=5 + arg.text_vocab + arg.codes, max_len=arg.length,
      image_length=arg.grid * arg.grid, image_positions=arg.image_positions,
      qk_norm=bool(arg.qk_norm), dtype=arg.dtype, param_dtype=arg.dtype,
      remat_policy=arg.remat,
      scan_layers=config_lib.scan_layers(arg.scan, arg.size)))
  config.loss = ml_collections.ConfigDict(dict(
      text_weight=arg.text_weight, image_weight=arg.image_weight,
      drop_text_rate=arg.drop_text))
  config.optimizer = ml_collections.ConfigDict(dict(
      name=arg.optimizer, lr=arg.lr, warmup_steps=min(200, arg.steps // 10),
      end_lr_fraction=0.05,
      b1=0.9, b2=0.99, eps=1e-8, weight_decay=1e-4, grad_clip_norm=1.0))
  config.data = ml_collections.ConfigDict(dict(
      packed_dir=arg.packed_dir, batch_size=arg.batch))
  config.eval = ml_collections.ConfigDict(dict(
      split="validation", batch_size=arg.batch, num_batches=8,
      num_generation=200, generation_batch_size=50, temperature=0.0,
      image_temperature=float(arg.image_temp), cfg_scale=float(arg.cfg),
      caption_beams=int(arg.beams), caption_rerank=float(arg.rerank)))
  config.log_every_steps = 50
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.logical_axis_rules = parallel.STANDARD_RULES
  return config
