"""Interoperability: Hugging Face safetensors checkpoints in and out (`jaxsun.interop.hf`)."""

from jaxsun.interop.hf import (hf_config, load_hf, load_hf_split, model_config, save_hf,
                               save_hf_split)
from jaxsun.interop.safetensors_io import CheckpointError

__all__ = ["CheckpointError", "hf_config", "load_hf", "load_hf_split", "model_config",
           "save_hf", "save_hf_split"]
