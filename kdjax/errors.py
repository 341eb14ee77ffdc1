"""Errors a user can cause. The CLI prints them on one line and exits with code 2."""


class UserError(Exception):
  """A mistake in the command, config, data or workdir, with what to do about it."""
