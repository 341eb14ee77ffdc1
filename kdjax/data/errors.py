"""Errors a user can cause in the data layer."""


class DataError(ValueError):
  """A data set, split or data option that kdjax cannot serve.

  The message is one sentence that says what to do.
  """
