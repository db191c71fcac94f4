"""jaxsun: decoders with separable prefill/decode parameter trees, in JAX/Flax NNX.

The public surface of the core:

    ModelConfig, Decoder, Mode          the model and its execution modes
    KVCache                             the explicit cache pytree
    SplitModel, split_forward, ...      one graphdef, a prefill tree and a decode tree
    generate, SamplingConfig            generation through the split

the modules `jaxsun.lora` (LoRA adapters on one tree, shared base arrays) and
`jaxsun.shared_inference` (SUN's mixed-model decode batches, PrefillShare's shared
prompt KV), and the subpackages `jaxsun.train` (trainer, optimizers, checkpoints, metrics),
`jaxsun.data` (corpora, tokenizers, tasks, TFDS + grain pipelines; grain and tfds load
on first use) and `jaxsun.jobs` (the experiments behind `experiments/launch.py`).
"""

from jaxsun.config import PRESETS, ModelConfig, RopeScaling
from jaxsun.generation import GenerateOutput, SamplingConfig, decode_step, generate, prefill
from jaxsun.kv_cache import KVCache, LayerCache
from jaxsun.nn import Decoder, Mode
from jaxsun.split import (LAST_PROMPT_TOKEN, TRAINABILITY, SplitModel, apply_updates,
                          make_optimizer, make_train_step, next_token_loss, param_labels,
                          split_forward)

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "ModelConfig", "RopeScaling", "Decoder", "Mode", "KVCache", "LayerCache", "SplitModel",
    "split_forward", "next_token_loss", "param_labels", "make_optimizer", "apply_updates",
    "make_train_step", "TRAINABILITY", "LAST_PROMPT_TOKEN", "generate", "prefill",
    "decode_step", "SamplingConfig", "GenerateOutput",
]
