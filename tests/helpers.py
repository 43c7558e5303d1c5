"""Build a JAX model and its PyTorch twin with identical weights."""

import jax
import numpy as np
import torch
from flax import nnx

from sbam_jax.convert import params_to_torch
from sbam_jax.models import MaskedAutoencoder
from torch_reference import TorchMAE


def jax_and_torch_mae(cfg, seed=0):
  model = MaskedAutoencoder(cfg, rngs=nnx.Rngs(seed))
  state = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model)))
  ref = TorchMAE.from_config(cfg)
  ref.load_state_dict({k: torch.from_numpy(v) for k, v in params_to_torch(state).items()},
                      strict=True)
  return model, ref


def nchw(imgs):
  return torch.from_numpy(np.asarray(imgs)).permute(0, 3, 1, 2).contiguous()
