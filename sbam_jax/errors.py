"""The two kinds of user error: a config that cannot work, data that cannot be read
(checkpoints included).

`train.py` prints either as one line and exits with status 2; everything else
is a bug and keeps its traceback. A leaf module, so any layer may raise them.
"""


class ConfigError(ValueError):
  """A config field that is unknown or holds an impossible value."""


class DataError(ValueError):
  """The data the config points to is missing or unusable; the message says
  which path or dataset and what to do."""


class CheckpointError(DataError):
  """A workdir's checkpoints cannot be used (none passes verification) or a
  save failed (disk full, permission, I/O): the message names the folder, what
  was found, and the last good step. A DataError, so the trainer and
  `convert_checkpoints.py` print it as one line."""
