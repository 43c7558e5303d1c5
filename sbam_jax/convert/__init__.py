"""Checkpoint conversion between PyTorch formats and this project's parameters.

torch_keys: reference (MAE / timm) names <-> parameter tree; hf_keys: Hugging
Face names <-> reference names; formats: what a state dict holds; readers /
exporters: whole files and folders (`convert_checkpoints.py` drives them);
torch_io: safe reading and atomic writing of .pth / .safetensors.
"""

from sbam_jax.convert.torch_keys import (MappingError, params_from_torch, params_to_torch,
                                         torch_key_for)

__all__ = ["MappingError", "params_from_torch", "params_to_torch", "torch_key_for"]
