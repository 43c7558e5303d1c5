"""The errors a run reports as one line: a config that cannot work, data that
cannot be read (checkpoints included), and an output that cannot be written.

`train.py` prints each as one line (`error: ...`) and exits with status 2
for user errors, 4 for outputs that could not be written; everything else is
a bug and keeps its traceback. A leaf module, so any layer may raise them.
"""


class ConfigError(ValueError):
  """A config field that is unknown or holds an impossible value."""


class DataError(ValueError):
  """The data the config points to is missing or unusable; the message says
  which path or dataset and what to do."""


class WriteError(Exception):
  """An output (log, card, figure, checkpoint) could not be written whole: the
  run stops rather than go on with work it cannot record."""


class CheckpointError(DataError):
  """A workdir's checkpoints cannot be used (none passes verification): the
  message names the folder, what was found, and the last good step. A
  DataError, so the trainer and `convert_checkpoints.py` print it as one line."""


class SaveError(CheckpointError, WriteError):
  """A checkpoint save failed (disk full, permission, I/O): the message names
  the path, the space needed and the last good step, which stays intact."""


class StoreError(Exception):
  """A cloud-storage URL whose store cannot be reached or used (no network,
  no DNS, refused credentials, no such bucket); the message says which and
  the fix. Not a ValueError or OSError, so no handler of bad files or
  transient I/O swallows it: the run stops with status 2."""
