"""Centralized runs: ``kdjax train`` (from labels) and ``kdjax distill`` (from a teacher,
live or cached), and ``kdjax eval``, on the run machinery of :mod:`kdjax.engine`."""

from kdjax.distill.evaluate import evaluate_workdir
from kdjax.distill.train import train_and_evaluate
