"""Training schemes beyond one student and one frozen teacher, on the engine's run
machinery: a scheme builds its own step and state and runs them through
:func:`kdjax.engine.setup`'s feed and :func:`kdjax.engine.train_loop`.

* ``dml``: deep mutual learning, K students trained together
  (:mod:`kdjax.schemes.dml`, on a :mod:`kdjax.schemes.cohort` of students).

A config selects one with ``config.scheme`` (``configs/mnist1d/dml.py``), and
``kdjax train`` runs it through :func:`train_scheme`.
"""

from kdjax.schemes.cohort import Cohort
from kdjax.schemes.cohort import Student
from kdjax.schemes.cohort import make_cohort
from kdjax.schemes.dml import DMLSetup
from kdjax.schemes.dml import cohort_metrics
from kdjax.schemes.dml import dml_scheme
from kdjax.schemes.dml import ensemble_apply
from kdjax.schemes.dml import make_cohort_evaluator
from kdjax.schemes.dml import make_dml_init
from kdjax.schemes.dml import make_dml_step
from kdjax.schemes.dml import mutual_kl
from kdjax.schemes.dml import scheme_options
from kdjax.schemes.dml import setup_dml
from kdjax.schemes.run import SCHEMES
from kdjax.schemes.run import train_scheme
