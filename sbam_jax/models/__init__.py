"""Flax NNX models: the MAE pre-training model and the ViT classifier."""

from sbam_jax.models.layers import patchify, unpatchify
from sbam_jax.models.mae import Encoder, MAEOutput, MaskedAutoencoder
from sbam_jax.models.sizes import SIZES, ModelConfig, model_config
from sbam_jax.models.vit import VisionTransformer

__all__ = ["Encoder", "MAEOutput", "MaskedAutoencoder", "ModelConfig", "SIZES",
           "VisionTransformer", "model_config", "patchify", "unpatchify"]
