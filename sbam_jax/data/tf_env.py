"""Import TensorFlow for host-side input work only: quiet, and blind to GPUs
so that it never takes accelerator memory from JAX."""

import os


def import_tf():
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    pass  # already initialised; devices were hidden by the first caller
  return tf
