"""Training schemes beyond one student and one frozen teacher, on the engine's run
machinery: a scheme builds its own step and state and runs them through
:func:`kdjax.engine.setup`'s feed and :func:`kdjax.engine.train_loop`.

* ``dml``: deep mutual learning, K students trained together
  (:mod:`kdjax.schemes.dml`, on a :mod:`kdjax.schemes.cohort` of students).
* ``stages``: a run of ordinary runs, each stage's teacher an earlier stage: the
  teacher-assistant chain (TAKD) and born-again networks (:mod:`kdjax.schemes.stages`).
* ``kdcl``, ``one``: online ensembles, K branches each distilled from their own
  ensemble (averaged logits, or ONE's learned gate; :mod:`kdjax.schemes.online`).
* ``byot``, ``mean_teacher``, ``snapshot``: self-distillation in one run, the teacher
  the student itself (its deepest classifier, the EMA of its weights, its snapshots at
  cyclic learning-rate minima; :mod:`kdjax.schemes.self_distill`).
* ``multi_teacher``: one student from several frozen teachers, combined by average,
  confidence or a learned gate, with label-space maps (:mod:`kdjax.schemes.multi_teacher`).
* ``curriculum``: the teacher orders the examples easy to hard and the student sees a
  growing prefix (:mod:`kdjax.schemes.curriculum`).
* ``layerwise``: stage-wise hint training, block by block with the deeper blocks frozen,
  then logit KD over the whole student (:mod:`kdjax.schemes.layerwise`).
* ``cross``: cross-modal and cross-task KD, teacher and student on different views of the
  input or different label spaces (:mod:`kdjax.schemes.cross`).
* ``bdkd_online``: a large teacher and a compact student trained together, the student
  with BD-KD's balanced divergence (:mod:`kdjax.schemes.bdkd_online`).
* ``mst_distill``: a student on one modality from a routed mixture of cross-modal and
  multimodal teachers with learned input masks (:mod:`kdjax.schemes.mst_distill`).

A config selects one with ``config.scheme`` (``configs/mnist1d/dml.py``), and
``kdjax train`` runs it through :func:`train_scheme`.
"""

from kdjax.schemes.bdkd_online import bdkd_online_losses
from kdjax.schemes.bdkd_online import bdkd_online_options
from kdjax.schemes.bdkd_online import bdkd_online_scheme
from kdjax.schemes.bdkd_online import make_bdkd_online_step
from kdjax.schemes.bdkd_online import setup_bdkd_online
from kdjax.schemes.cohort import Cohort
from kdjax.schemes.cohort import Student
from kdjax.schemes.cohort import make_cohort
from kdjax.schemes.cross import COARSE5
from kdjax.schemes.cross import VIEWS
from kdjax.schemes.cross import cross_options
from kdjax.schemes.cross import cross_scheme
from kdjax.schemes.cross import downsample2
from kdjax.schemes.cross import mapped_teacher
from kdjax.schemes.cross import relabel
from kdjax.schemes.cross import setup_cross
from kdjax.schemes.cross import spectrogram
from kdjax.schemes.cross import view_fn
from kdjax.schemes.cross import view_shape
from kdjax.schemes.curriculum import CurriculumSetup
from kdjax.schemes.curriculum import CurriculumSource
from kdjax.schemes.curriculum import curriculum_options
from kdjax.schemes.curriculum import curriculum_scheme
from kdjax.schemes.curriculum import difficulty_order
from kdjax.schemes.curriculum import pacing_fraction
from kdjax.schemes.curriculum import pacing_sizes
from kdjax.schemes.curriculum import setup_curriculum
from kdjax.schemes.curriculum import teacher_logits
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
from kdjax.schemes.layerwise import LayerStage
from kdjax.schemes.layerwise import block_names
from kdjax.schemes.layerwise import depth_masks
from kdjax.schemes.layerwise import frozen
from kdjax.schemes.layerwise import layerwise_options
from kdjax.schemes.layerwise import layerwise_scheme
from kdjax.schemes.layerwise import parameter_names
from kdjax.schemes.layerwise import plan_layerwise
from kdjax.schemes.layerwise import run_layer_stage
from kdjax.schemes.mst_distill import load_balance
from kdjax.schemes.mst_distill import make_mst_init
from kdjax.schemes.mst_distill import make_mst_step
from kdjax.schemes.mst_distill import mask_apply
from kdjax.schemes.mst_distill import mst_distill_scheme
from kdjax.schemes.mst_distill import mst_options
from kdjax.schemes.mst_distill import routed_target
from kdjax.schemes.mst_distill import router_probs
from kdjax.schemes.mst_distill import setup_mst
from kdjax.schemes.mst_distill import top_k_weights
from kdjax.schemes.multi_teacher import check_label_maps
from kdjax.schemes.multi_teacher import combine_teachers
from kdjax.schemes.multi_teacher import confidence_weights
from kdjax.schemes.multi_teacher import label_map_matrix
from kdjax.schemes.multi_teacher import make_multi_teacher_init
from kdjax.schemes.multi_teacher import make_multi_teacher_step
from kdjax.schemes.multi_teacher import map_probabilities
from kdjax.schemes.multi_teacher import multi_teacher_options
from kdjax.schemes.multi_teacher import multi_teacher_scheme
from kdjax.schemes.multi_teacher import setup_multi_teacher
from kdjax.schemes.online import ensemble_logits
from kdjax.schemes.online import gate_apply
from kdjax.schemes.online import init_gate
from kdjax.schemes.online import make_online_evaluator
from kdjax.schemes.online import make_online_init
from kdjax.schemes.online import make_online_step
from kdjax.schemes.online import online_ensemble_apply
from kdjax.schemes.online import online_options
from kdjax.schemes.online import online_scheme
from kdjax.schemes.online import setup_online
from kdjax.schemes.run import SCHEMES
from kdjax.schemes.run import train_scheme
from kdjax.schemes.self_distill import byot_loss
from kdjax.schemes.self_distill import cyclic_cosine
from kdjax.schemes.self_distill import ema_update
from kdjax.schemes.self_distill import ensemble_probs
from kdjax.schemes.self_distill import init_heads
from kdjax.schemes.self_distill import make_self_init
from kdjax.schemes.self_distill import make_self_step
from kdjax.schemes.self_distill import rampup
from kdjax.schemes.self_distill import self_options
from kdjax.schemes.self_distill import self_scheme
from kdjax.schemes.self_distill import setup_self
from kdjax.schemes.stages import Stage
from kdjax.schemes.stages import check_resumable
from kdjax.schemes.stages import check_stages
from kdjax.schemes.stages import ensemble_metrics
from kdjax.schemes.stages import eval_logits
from kdjax.schemes.stages import expand_stages
from kdjax.schemes.stages import plan_stages
from kdjax.schemes.stages import run_stage
from kdjax.schemes.stages import run_stages
from kdjax.schemes.stages import stages_config
