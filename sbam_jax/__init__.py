"""SBAM (salience-based adaptive masking) for MAE pre-training in JAX / Flax NNX.

`sbam_jax.masking` is the model-independent masking API; `sbam_jax.models`
holds the MAE and ViT modules. Importing the package never imports TensorFlow.

Cloud storage: etils.epath (orbax's and tfds' path type) serves gs:// URLs
through TensorFlow's gfile whenever TensorFlow is installed, a second GCS
client beside fsspec/gcsfs, which `sbam_jax.files` uses. The default here
makes epath use fsspec too (set EPATH_USE_TF=true before importing sbam_jax
to get gfile back); it must be set before epath first resolves a URL.
"""

import os as _os

_os.environ.setdefault("EPATH_USE_TF", "false")

__version__ = "0.1.0"
