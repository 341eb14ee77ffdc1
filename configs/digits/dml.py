"""UCI digits deep mutual learning: four small MLP students (the baseline's) trained
together, each from the labels and from the other three (kdjax.schemes.dml).

    kdjax train --config configs/digits/dml.py --workdir workdirs/digits_dml
    kdjax train --config configs/digits/dml.py:tiny --workdir /tmp/digits_dml   # seconds
"""

from kdjax.config import sibling
from kdjax.schemes import dml_scheme

student_baseline = sibling(__file__, 'student_baseline')  # same students, same recipe


def get_config(arg=None):
  c = student_baseline.get_config(arg)   # '' or 'tiny'
  c.loss.terms = {'ce': {'weight': 1.0}}
  c.scheme = dml_scheme(num_students=4, temperature=1.0, weight=1.0)
  return c
