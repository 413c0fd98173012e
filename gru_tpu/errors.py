"""The one exception type for mistakes a user can make (bad config, bad data, bad workdir).

The CLI prints its message as one line on stderr and exits with code 2: no traceback.
"""


class UserError(ValueError):
  """Bad input from the user. The message names the input and what to do about it."""
