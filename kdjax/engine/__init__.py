"""The run machinery: setup from a config, feeds, the one train step, the loop,
checkpoints through :mod:`kdjax.workdir`, and the metrics writers.

A run reads: :func:`setup` (everything built from the config) -> a :class:`Feed`
(the source's examples, augmented, with the teacher's entries) -> :func:`train_loop`
(jitted calls of :func:`make_train_step`, evaluation, checkpoints, logs, preemption,
a stop at a non-finite loss). See ``docs/architecture.md``.
"""

from kdjax.engine.config import base_config
from kdjax.engine.config import validate
from kdjax.engine.evaluate import make_evaluator
from kdjax.engine.feed import DeviceSource
from kdjax.engine.feed import Feed
from kdjax.engine.feed import StreamSource
from kdjax.engine.feed import TeacherAhead
from kdjax.engine.feed import packed_permutation
from kdjax.engine.loop import Fitted
from kdjax.engine.loop import LoopResult
from kdjax.engine.loop import Schedule
from kdjax.engine.loop import TrainCalls
from kdjax.engine.loop import fit
from kdjax.engine.loop import fit_workdir
from kdjax.engine.loop import train_loop
from kdjax.engine.loop import write_summary
from kdjax.engine.metrics import Accumulator
from kdjax.engine.metrics import MetricsWriter
from kdjax.engine.optim import make_optimizer
from kdjax.engine.policy import Policy
from kdjax.engine.policy import Sampler
from kdjax.engine.policy import continue_prompts
from kdjax.engine.policy import distillm
from kdjax.engine.policy import gkd
from kdjax.engine.setup import Data
from kdjax.engine.setup import Setup
from kdjax.engine.setup import setup
from kdjax.engine.state import TrainState
from kdjax.engine.step import accuracy
from kdjax.engine.step import init_train_state
from kdjax.engine.step import make_train_step
