"""Import TensorFlow for host-side input work only: quiet, and blind to GPUs
so that it never takes accelerator memory from JAX. Also the one stateless
seed helper every host transform uses."""

import os


def import_tf():
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  tf = _quiet_import()
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    pass  # already initialised; devices were hidden by the first caller
  return tf


def _quiet_import():
  """`import tensorflow` with stderr closed: its C++ libraries print start-up
  banners (oneDNN, absl) before any log level applies. An import that fails
  is repeated with stderr open, so its message is seen."""
  import sys  # pylint: disable=g-import-not-at-top
  if "tensorflow" in sys.modules:
    return sys.modules["tensorflow"]
  sys.stderr.flush()
  # (file descriptors of this process: local by nature, never a data path)
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    tf = None
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)
  if tf is None:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top,redefined-outer-name
  return tf


def split_seed(seed, n: int):
  """`n` independent stateless seeds from one (a list of int64[2] tensors).
  Called inside tf.data functions, after `import_tf` configured TensorFlow."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.unstack(tf.random.experimental.stateless_split(seed, n))
