"""The distillation engine: train state, step builder, loop, teacher, checkpoints."""

from kdjax.distill.defaults import base_config
from kdjax.distill.loop import train_and_evaluate
from kdjax.distill.state import TrainState
from kdjax.distill.step import TeacherFns
from kdjax.distill.step import make_eval_step
from kdjax.distill.step import make_fused_steps
from kdjax.distill.step import make_teacher_steps
from kdjax.distill.step import make_train_step
from kdjax.distill.teacher import load_teacher
