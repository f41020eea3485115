"""The decoder-only interleaved model on shapes documents.

  python -m unimm.main --config configs/vit_vqgan_shapes.py:steps=16000 \\
      --workdir workdirs/tok_16k
  python -m unimm.tools.train_text_tokenizer \\
      --output workdirs/interleaved_text/spiece --vocab_size 128 \\
      --source interleaved --num_captions 20000
  python -m unimm.tools.pack_interleaved --tokenizer_workdir workdirs/tok_16k \\
      --text_tokenizer workdirs/interleaved_text/spiece.model \\
      --out workdirs/interleaved_data --split train --num_documents 500000 \\
      --length 320
  (and --split validation --num_documents 2000)
  python -m unimm.main --config configs/interleaved_shapes.py \\
      --workdir workdirs/interleaved

Trains tiny_deep (8 layers of width 128, kv_heads=4) with Muon at lr 1e-2
for 3,000 steps at batch 32 on packed caption->image, image->caption and
edit documents (unimm.data.interleaved). The text tokenizer must be trained
on the documents' texts (instructions have words that captions lack). To
train on, copy checkpoints/3000 into a new workdir and add steps=6000 (then
9,000): the cosine schedule restarts for the new total (docs/interleaved.md).

Expected on 2 CPU cores (held-out text->image / caption / edit accuracy;
docs/results.md): 3,000 steps in 87 min 0.935 / 0.94 / 0.59; 9,000 steps
0.965 / 0.975 / 0.705 (targets 0.9 / 0.95 / 0.7).

Variants (arg "key=value,..."): size (unimm.models.interleaved.SIZES:
tiny | tiny_deep | small | 1b | 7b), kv_heads (key/value heads: 1 =
multi-query, as Gemini; the size's num_heads = multi-head), steps, batch,
length (= config.model.max_len), text_vocab, codes, grid (image tokens per
side), tokens (a SEED tokenizer's K 1-D tokens per image instead of grid;
their positions are 1-D), dynamic (1: a LaVIT tokenizer's variable-length
images, spans of up to grid^2 kept codes that the model ends with EOI,
1-D positions; config.model.end_of_image), packed_dir, tokenizer_workdir,
text_tokenizer, lr, image_positions (1d | 2d), qk_norm, text_weight,
image_weight, drop_text (the rate of documents trained without their
text, for classifier-free guidance), cfg
(the eval's guidance scale for generated images; 1 = none), image_temp
(the eval's sampling temperature for images; its text is greedy), beams
(the eval's beam width for captions; 1 = greedy), rerank (the weight of
log p(image | caption) when reranking those beams; 0 = none), dtype,
remat, scan (auto | true | false: nn.scan over layers; auto unrolls them
at the CPU sizes, unimm.config_lib.scan_layers), optimizer (muon | adamw:
unimm.train.optim), image_input (codes | patches | resampler: how the image
opening a document is read, unimm.models.image_input; pack the rows with
the same --image_input, --patch_size, --num_queries), patch (pixels per
patch side), queries (the resampler's READ slots per image), experts
(OneLLM's routed resamplers), questions (held-out questions the eval asks:
question_accuracy, for models packed with --kinds ...,question), bins
(Kosmos-2 location bins per side, as the rows were packed with
--location_bins, default 16, when --kinds holds refer, grounded_caption or
draw_box; 0 = no location ids), referring
(held-out referring expressions the eval grounds: referring_accuracy),
grounded (held-out images the eval asks grounded captions of:
grounded_caption_accuracy), drawn (held-out requests to draw in boxes:
draw_box_accuracy), output (codes | embeddings | queries: what the model
writes in image spans; embeddings = Emu's regression of the tokenizer's
code vectors, queries = NExT-GPT / SEED-X output queries projected to
them in one pass, with image_input=patches or resampler;
unimm.models.interleaved; set rerank=0), embedding_dim (their
width: the tokenizer's decoder width), detokenizer_workdir (the diffusion
de-tokenizer, trained with condition=codes on the same tokenizer, that
decodes regressed images; empty: their nearest codes by the tokenizer),
head (l2 | gmm: GIVT's mixture of diagonal Gaussians, sampled at
image_temp), mixtures (its components), diffusion (CoDi-2: the weight of
the de-tokenizer's flow loss back-propagated into output queries; 0 =
off; needs output=queries and detokenizer_workdir).
"""
import ml_collections

from unimm import config_lib
from unimm import parallel
from unimm.models.interleaved import interleaved_config
from unimm.models.vocab import VocabLayout


def get_config(arg=None):
  arg = config_lib.parse_arg(
      arg, size="tiny_deep", kv_heads=4, steps=3000, batch=32, length=320,
      text_vocab=128, codes=512, grid=8, packed_dir="workdirs/interleaved_data",
      tokenizer_workdir="workdirs/tok_16k",
      text_tokenizer="workdirs/interleaved_text/spiece.model", lr=1e-2,
      image_positions="2d", qk_norm=1, text_weight=1.0, image_weight=1.0,
      drop_text=0.1, cfg=1.5, image_temp=0.5, beams=8, rerank=0.5, dtype="float32",
      remat="none", scan="auto", optimizer="muon", image_input="codes",
      patch=4, queries=16, experts=1, questions=0, bins=0, referring=0,
      grounded=0, drawn=0, output="codes", embedding_dim=64,
      detokenizer_workdir="", head="l2", mixtures=16, diffusion=0.0,
      tokens=0, dynamic=0)
  config = config_lib.base_config("interleaved", arg.steps)
  config.tokenizer_workdir = arg.tokenizer_workdir
  config.text_tokenizer = arg.text_tokenizer
  config.detokenizer_workdir = arg.detokenizer_workdir
  config.vocab = ml_collections.ConfigDict(dict(
      text_vocab_size=arg.text_vocab, image_vocab_size=arg.codes,
      location_bins=arg.bins))
  layout = VocabLayout(arg.text_vocab, arg.codes,
                       read_ids=arg.image_input != "codes",
                       location_bins=arg.bins)
  config.model = ml_collections.ConfigDict(interleaved_config(
      arg.size, num_kv_heads=arg.kv_heads, **layout.model_ids(),
      image_input=arg.image_input, patch_size=arg.patch,
      num_queries=arg.queries, num_experts=arg.experts,
      feature_length=arg.grid * arg.grid, max_len=arg.length,
      image_length=arg.tokens or arg.grid * arg.grid,
      end_of_image=bool(arg.dynamic),
      # 1-D and dynamic tokens have no rows and columns.
      image_positions=("1d" if arg.tokens or arg.dynamic
                       else arg.image_positions),
      qk_norm=bool(arg.qk_norm), dtype=arg.dtype, param_dtype=arg.dtype,
      remat_policy=arg.remat, image_output=arg.output,
      embedding_dim=arg.embedding_dim if arg.output != "codes" else 0,
      image_codes=arg.codes,
      image_head=arg.head, mixtures=arg.mixtures if arg.head == "gmm" else 1,
      scan_layers=config_lib.scan_layers(arg.scan, arg.size)))
  config.loss = ml_collections.ConfigDict(dict(
      text_weight=arg.text_weight, image_weight=arg.image_weight,
      drop_text_rate=arg.drop_text, diffusion_weight=arg.diffusion))
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
      caption_beams=int(arg.beams), caption_rerank=float(arg.rerank),
      num_questions=int(arg.questions), num_referring=int(arg.referring),
      num_grounded=int(arg.grounded), num_drawn=int(arg.drawn)))
  config.log_every_steps = 50
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.logical_axis_rules = parallel.STANDARD_RULES
  return config
