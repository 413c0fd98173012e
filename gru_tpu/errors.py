"""Exceptions for what a user can fix: bad config, bad data, bad or damaged workdir.

The CLI prints their message as one line on stderr and exits with code 2: no traceback.
"""


class UserError(ValueError):
  """Bad input from the user. The message names the input and what to do about it."""


class CheckpointError(UserError):
  """A checkpoint could not be read (truncated, corrupt, missing) or written (disk full)."""

  def __init__(self, message: str, step: int | None = None):
    super().__init__(message)
    self.step = step
