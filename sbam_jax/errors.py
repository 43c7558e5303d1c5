"""The errors a run reports as one line: a config that cannot work, data that
cannot be read (user errors), and an output that cannot be written.

`train.py` prints each as one line (`error: ...`) and exits with status 2
for user errors, 4 for outputs; everything else is a bug and keeps its
traceback. A leaf module, so any layer may raise them.
"""


class ConfigError(ValueError):
  """A config field that is unknown or holds an impossible value."""


class DataError(ValueError):
  """The data the config points to is missing or unusable; the message says
  which path or dataset and what to do."""


class WriteError(OSError):
  """An output (log, card, figure) could not be written whole: the run stops
  rather than go on with work it cannot record."""
