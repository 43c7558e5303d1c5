"""Import TensorFlow for host-side input work only: quiet, and blind to GPUs
so that it never takes accelerator memory from JAX. Also the one stateless
seed helper every host transform uses."""

import os


def import_tf():
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    pass  # already initialised; devices were hidden by the first caller
  return tf


def split_seed(seed, n: int):
  """`n` independent stateless seeds from one (a list of int64[2] tensors).
  Called inside tf.data functions, after `import_tf` configured TensorFlow."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.unstack(tf.random.experimental.stateless_split(seed, n))
