"""Digits twins of MNIST-1D scheme configs: the MNIST-1D file's scheme and loss over a
UCI digits recipe (not a config itself: it has no ``get_config``).

A scheme config for MNIST-1D is its recipe (``configs/mnist1d/student_baseline.py`` or
``teacher.py``: data, model, batch, steps, optimizer, evaluation cadence) plus what the
scheme adds (``loss``, ``scheme``, ``teacher``, ...). :func:`on_digits` keeps the
second part and takes the first from the digits file of the same role, so a digits
twin is the MNIST-1D scheme with the digits student's (or teacher's) model and budget,
and follows its MNIST-1D file when that changes.
"""

import os

from kdjax.config import sibling

# The fields of a recipe: everything a scheme config leaves as its base file sets it.
RECIPE = ('data', 'model', 'batch_size', 'num_steps', 'optimizer', 'eval_every',
          'checkpoint_every', 'log_every', 'steps_per_call')
MNIST1D = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       'mnist1d', 'kd.py')   # any file there: sibling() reads its folder
TRAIN_EXAMPLES = 1437   # UCI digits' train split


def mnist1d(name: str):
  """The config module ``configs/mnist1d/<name>.py``."""
  return sibling(MNIST1D, name)


def is_tiny(arg) -> bool:
  """Whether the variant string (``'tiny'``, ``'baseline,tiny'``, ...) asks for tiny."""
  return 'tiny' in set(filter(None, (arg or '').split(',')))


def on_digits(name: str, arg=None, *, base: str = 'student_baseline'):
  """``configs/mnist1d/<name>.py:<arg>`` with the recipe fields of
  ``configs/digits/<base>.py`` (tiny when ``arg`` asks for it).

  Args:
    name: the MNIST-1D config file's name (``'kdcl'``).
    arg: its variant (passed on; the MNIST-1D file checks it).
    base: the digits recipe the scheme is laid over (``'student_baseline'`` or
      ``'teacher'``: the role the MNIST-1D file's own base plays).

  Returns:
    The digits config.
  """
  scheme = mnist1d(name).get_config(arg)
  c = sibling(__file__, base).get_config('tiny' if is_tiny(arg) else None)
  for key, value in scheme.items():
    if key not in RECIPE:
      c[key] = value
  return c


def stages_on_digits(name: str, arg=None):
  """A born-again (stages) MNIST-1D config with its generations on the digits student
  (``configs/digits/student_baseline.py``, whose tiny variant is already seconds)."""
  c = mnist1d(name).get_config(arg)
  c.scheme.generation = c.scheme.generation.replace('mnist1d/', 'digits/', 1)
  c.scheme.overrides = {}
  return c
