"""ViT-VQGAN at the paper's sizes, for the AOT planner (no data needed).

  python -m unimm.plan --config configs/vit_vqgan_plan.py:size=base \\
      --mesh fsdp=8

Variants (arg "key=value,..."): size (small | base | large, the encoder and
decoder of ViT-VQGAN Table 1; tiny for tests), decoder (another decoder
size, e.g. size=small,decoder=large is ViT-VQGAN-SL), batch (global), remat
(none | full | dots | dots_no_batch), dtype (bfloat16 as on TPU pods),
tokens (SEED's 1-D causal tokens through a 12-layer Q-Former instead of the
grid; SEED's paper shape is tokens=32), keep (LaVIT's dynamic tokens: a
selector keeps about this fraction of the patches and a 12-layer merger
folds the dropped ones in, as LaVIT's tokenizer; 0 = the grid).

256x256 images, 8x8 patches (32x32 tokens), 8192 codes of dim 32, the
StyleGAN discriminator and the §3.3 loss weights (the perceptual loss needs
local LPIPS weights and is off, as in configs/vit_vqgan_shapes.py). Layers
are scanned and rematerialized as a pod run would.

Expected (python -m unimm.plan --table, batch 1 per chip; docs/scaling.md):
small, base and large fit a v4-8 at <= 1.7, 3.1 and 8.4 GiB per chip.
"""
import ml_collections

from unimm import config_lib
from unimm import parallel
from unimm.tokenizers.vit_vqgan import vit_vqgan_config


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="base", decoder="", batch=256,
                             remat="full", dtype="bfloat16", tokens=0,
                             keep=0.0)
  config = config_lib.base_config("vit_vqgan", total_steps=500_000)
  config.model = ml_collections.ConfigDict(vit_vqgan_config(
      arg.size, decoder=arg.decoder or None, scan_layers=True,
      remat_policy=arg.remat, dtype=arg.dtype, param_dtype=arg.dtype,
      num_queries=arg.tokens, query_layers=12, keep_ratio=arg.keep,
      merger_layers=12))
  tiny = arg.size == "tiny"
  config.discriminator = ml_collections.ConfigDict(dict(
      channel_multiplier=8 if tiny else 64, max_channels=32 if tiny else 512))
  config.loss = ml_collections.ConfigDict(dict(
      vq_weight=1.0, adversarial_weight=0.1, perceptual_weight=0.0,
      logit_laplace_weight=0.1, l2_weight=1.0, adversarial_start_step=50_000,
      r1_gamma=10.0, r1_interval=4, latent_buffer_size=4096))
  # ViT-VQGAN §4.1: Adam (0.9, 0.99), lr 1e-4 after 50k warm-up steps.
  config.optimizer = ml_collections.ConfigDict(dict(
      lr=1e-4, warmup_steps=50_000, end_lr_fraction=0.05, b1=0.9, b2=0.99,
      eps=1e-8, weight_decay=1e-4, grad_clip_norm=1.0))
  config.data = ml_collections.ConfigDict(dict(
      image_size=config.model.image_size, batch_size=arg.batch))
  config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  config.logical_axis_rules = parallel.STANDARD_RULES
  return config
