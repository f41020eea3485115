"""Shared Flax Linen layers used by every unimm model."""
from unimm.nn.attention import (Attention, apply_rope, dot_product_attention,
                                 weighted_attention)
from unimm.nn.layers import (Embedder, LearnedPositions, Mlp, PatchEmbed,
                             PatchUnembed, constrain, dense, dtype_of,
                             norm_layer, partitioned, sincos_positions_2d)
from unimm.nn.transformer import (CACHE_LOGICAL_AXES, REMAT_POLICIES,
                                  TransformerBlock, TransformerStack,
                                  attention_mask, init_cache, remat_block)

