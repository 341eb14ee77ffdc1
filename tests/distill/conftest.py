"""The run tests of ``kdjax train`` / ``distill`` / ``eval`` / ``demo`` share the session
fixtures of ``tests/conftest.py`` (data directory, CLI runner, one tiny teacher)."""
