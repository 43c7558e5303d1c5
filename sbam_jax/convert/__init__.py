"""PyTorch <-> JAX checkpoint mapping (reference MAE / timm key names)."""

from sbam_jax.convert.torch_keys import (MappingError, params_from_torch, params_to_torch,
                                         torch_key_for)

__all__ = ["MappingError", "params_from_torch", "params_to_torch", "torch_key_for"]
