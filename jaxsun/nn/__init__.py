"""Flax NNX modules of the jaxsun decoder.

Axis conventions used in shape comments throughout: B batch, T tokens in this call,
S cache slots (max_len), D d_model, H query heads, Hkv key/value heads, G = H / Hkv,
hd head_dim, V vocabulary, F d_ff, L n_layers. Logical axis names of parameters: "vocab",
"embed", "heads" (H * hd), "kv_heads" (Hkv * hd), "mlp" (F), "norm", and "layers" (L, the
leading axis of a scanned model's stacked blocks).
"""

from jaxsun.nn.attention import ATTENTION_KINDS, AttendInputs, Attention, register_attention
from jaxsun.nn.decoder import (Block, Decoder, Mode, stack_layers, stack_state,
                               unstack_layers, unstack_state)
from jaxsun.nn.layers import Embedding, Linear, RMSNorm, SwiGLU, apply_rope

__all__ = [
    "ATTENTION_KINDS", "AttendInputs", "Attention", "Block", "Decoder", "Embedding",
    "Linear", "Mode", "RMSNorm", "SwiGLU", "apply_rope", "register_attention",
    "stack_layers", "stack_state", "unstack_layers", "unstack_state",
]
