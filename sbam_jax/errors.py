"""The two kinds of user error: a config that cannot work, data that cannot be read.

`train.py` prints either as one line and exits with status 2; everything else
is a bug and keeps its traceback. A leaf module, so any layer may raise them.
"""


class ConfigError(ValueError):
  """A config field that is unknown or holds an impossible value."""


class DataError(ValueError):
  """The data the config points to is missing or unusable; the message says
  which path or dataset and what to do."""
