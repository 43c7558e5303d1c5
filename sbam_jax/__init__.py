"""SBAM (salience-based adaptive masking) for MAE pre-training in JAX / Flax NNX.

`sbam_jax.masking` is the model-independent masking API; `sbam_jax.models`
holds the MAE and ViT modules. Importing the package never imports TensorFlow.
"""

__version__ = "0.1.0"
