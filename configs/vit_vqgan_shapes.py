"""ViT-VQGAN tokenizer on the embedded 32x32 shapes data set.

  python -m unimm.main --config configs/vit_vqgan_shapes.py \\
      --workdir workdirs/tokenizer
  --config configs/vit_vqgan_shapes.py:size=small   (the paper's shapes)

Trains size=tiny: 4x4 patches (8x8 tokens), 512 codes of dim 16, batch 32,
8,000 steps. Expected on 2 CPU cores (docs/results.md): held-out PSNR
33.5 dB, codebook_usage 1.0, in about 8 min (target >= 30 dB, >= 0.9, <= 15
min); the shapes probe reads its reconstructions of the eval prompts'
scenes at 0.95 single / 0.855 pair (the ceiling of a text-to-image model on
it). steps=16000: 37.25 dB, 0.96 / 0.94 in 14.5 min.

Variants (arg "key=value,..."): size (tiny | small | base | large; the
paper's sizes use 256x256 images, 8x8 patches, 8192 codes of dim 32),
decoder (a different decoder size, e.g. size=small,decoder=large is the
paper's ViT-VQGAN-SL), steps, batch, and for size=tiny patch (4 -> 8x8
tokens, 8 -> 4x4 tokens) and codes, scan (auto | true | false: nn.scan over
layers; auto unrolls them at the CPU sizes, unimm.config_lib.scan_layers),
tokens (SEED: K causal 1-D tokens per image from a causal Q-Former instead
of the patch grid; 0 = the grid; unimm.tokenizers.vit_vqgan), keep
(LaVIT: a selector keeps about this fraction of the patches, in (0, 1], and
a 2-layer merger folds the dropped ones in, so an image gets a variable
number of tokens; 0 = every patch; unimm.tokenizers.dynamic), penalty
(batch | image: LaVIT's keep-ratio penalty on the batch's kept fraction,
so images may differ, or on each image's), token_decoder (cross | joint:
how the decoder reads SEED's or LaVIT's tokens, its patch slots
cross-attending to them or one bidirectional stack over both),
keep_at_encode (likelier | sampled: LaVIT's encoding keeps a patch where
keep is the likelier, or draws the decision as training does, from one
fixed key per patch slot), selector_lr (LaVIT: the selector's learning
rate as a multiple of the schedule's, config.optimizer.lr_scales; 1 = the
same), teacher (SEED / LaVIT: the workdir of a trained grid tokenizer of
the same size; the decoder predicts its codes by cross-entropy and its
frozen decoder draws them, as SEED and LaVIT decode through a frozen
generator; teacher_codes: its num_codes, 512; teacher_encoder=1: SEED's
Q-Former or LaVIT's selector and merger read the teacher's frozen encoder
tokens, as SEED's Q-Former reads a frozen ViT, instead of an encoder of
their own), token_decoder_layers (SEED / LaVIT: the depth of the decoder
that reads their tokens; 0 = the size's decoder depth; a teacher keeps its
own).

  --config configs/vit_vqgan_shapes.py:tokens=16   (SEED, 16 tokens)
  --config configs/vit_vqgan_shapes.py:tokens=16,teacher=workdirs/tokenizer
  --config configs/vit_vqgan_shapes.py:keep=0.5    (LaVIT, ~32 of 64)

Loss weights for size=tiny (the other sizes keep the paper's §3.3 weights;
docs/tokenizer.md):
- logit_laplace_weight 0 (paper 0.1): its 1/b-scaled L1-in-logit gradient
  dominates the l2 term and holds PSNR near 22 dB. It is still computed
  and logged.
- adversarial_weight 0 (paper 0.1): the StyleGAN D + R1 more than doubles
  the step time on CPU, and at 0.1 the run collapses (18.8 dB); with
  weight 0 the task drops the discriminator from the step at trace time.
  Turn it on with --config.loss.adversarial_weight=0.1 (it then starts at
  config.loss.adversarial_start_step).
- Dead codes restart from recent latents drawn in proportion to their
  quantization error (config.loss.restart_sampling="error", k-means++-like),
  so new codes go to object edges rather than the flat background.
"""
import ml_collections

from unimm import config_lib
from unimm import parallel
from unimm.tokenizers.vit_vqgan import vit_vqgan_config


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="tiny", decoder="", steps=8000,
                             batch=32, patch=4, codes=512, scan="auto",
                             tokens=0, keep=0.0, penalty="batch",
                             token_decoder="cross", keep_at_encode="likelier",
                             selector_lr=1.0, teacher="", teacher_codes=512,
                             teacher_encoder=0, token_decoder_layers=0)
  if arg.teacher and not (arg.tokens or arg.keep):
    raise ValueError(
        f"teacher={arg.teacher!r} decodes SEED's or LaVIT's tokens through a "
        "frozen grid tokenizer; pass tokens=K or keep=R too.")
  if arg.selector_lr != 1.0 and not arg.keep:
    raise ValueError(
        f"selector_lr={arg.selector_lr} scales LaVIT's token selector's "
        "learning rate, but keep=0 builds no selector; pass keep=R too.")
  config = config_lib.base_config("vit_vqgan", arg.steps)

  tiny = arg.size == "tiny"
  model = vit_vqgan_config(arg.size, decoder=arg.decoder or None,
                           scan_layers=config_lib.scan_layers(arg.scan,
                                                              arg.size),
                           num_queries=arg.tokens, keep_ratio=arg.keep,
                           token_decoder=arg.token_decoder,
                           keep_at_encode=arg.keep_at_encode,
                           teacher_codes=arg.teacher_codes if arg.teacher
                           else 0,
                           read_teacher_encoder=bool(arg.teacher_encoder),
                           token_decoder_layers=arg.token_decoder_layers)
  if tiny:
    # 32x32 shapes: 4x4 patches -> 8x8 tokens (patch=8: 4x4 tokens); 512
    # codes of dim 16.
    model.update(image_size=32, patch_size=arg.patch, num_codes=arg.codes,
                 code_dim=16)
  config.model = ml_collections.ConfigDict(model)

  config.teacher_workdir = arg.teacher
  config.discriminator = ml_collections.ConfigDict(dict(
      channel_multiplier=8 if tiny else 64,
      max_channels=32 if tiny else 512))

  # ViT-VQGAN §3.3 weights; the perceptual loss needs local LPIPS weights
  # (config.loss.perceptual_weights = path to .npz), so it is off here.
  config.loss = ml_collections.ConfigDict(dict(
      vq_weight=1.0,
      adversarial_weight=0.0 if tiny else 0.1,  # see the docstring
      perceptual_weight=0.0,
      perceptual_weights="",
      logit_laplace_weight=0.0 if tiny else 0.1,  # see the docstring
      l2_weight=1.0,
      adversarial_start_step=arg.steps // 2,
      r1_gamma=1.0,
      r1_interval=1,  # lax.cond is slow on CPU: R1 every step ...
      r1_batch_size=8,  # ... on a quarter of the batch
      usage_decay=0.99,
      dead_code_threshold=0.5,
      restart_every=100,
      restart_until_step=arg.steps * 3 // 4,
      latent_buffer_size=1024,
      restart_sampling="error",
      keep_weight=2.0,  # LaVIT (keep > 0): the keep-ratio penalty ...
      keep_penalty=arg.penalty,  # ... over the "batch" or each "image"
  ))

  config.optimizer = ml_collections.ConfigDict(dict(
      lr=2e-3 if tiny else 1e-4, warmup_steps=min(200, arg.steps // 10),
      end_lr_fraction=0.05, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0,
      grad_clip_norm=1.0))
  if arg.selector_lr != 1.0:  # LaVIT's selector at a learning rate of its own
    config.optimizer.lr_scales = {"selector": float(arg.selector_lr)}

  config.data = ml_collections.ConfigDict(dict(
      source="shapes", image_size=config.model.image_size,
      batch_size=arg.batch, data_dir=None, worker_count=0,
      # 32x32: the training split is decoded once into memory (~150 MB)
      # instead of every step (unimm.data.pipeline.InMemorySource).
      in_memory=tiny))
  config.eval = ml_collections.ConfigDict(dict(
      split="validation", num_images=1024, batch_size=128,
      # The probe read on reconstructions of the fixed prompt set (the
      # ceiling of a text-to-image model on this tokenizer); 0 = off.
      probe_prompts=200))

  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.logical_axis_rules = parallel.STANDARD_RULES
  return config
