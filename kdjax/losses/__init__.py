"""Pure-functional knowledge-distillation losses and their registry.

Every loss returns per-example values (the caller reduces) unless its docstring says
it is batch-level. Importing this package registers the whole catalog.
"""

from kdjax.losses import schedules
from kdjax.losses.registry import Objective
from kdjax.losses.registry import Term
from kdjax.losses.registry import build_objective
from kdjax.losses.registry import catalog
from kdjax.losses.registry import get
from kdjax.losses.registry import reduce_value
from kdjax.losses.registry import register
from kdjax.losses.schedules import make_schedule

# --- response (logit) losses: kdjax/losses/logits.py, sparse.py, sampled.py, sequence.py, uld.py
from kdjax.losses import divergences
from kdjax.losses import logits
from kdjax.losses import progressive
from kdjax.losses import sampled
from kdjax.losses import sequence
from kdjax.losses import sparse
from kdjax.losses.divergences import generalized_jsd
from kdjax.losses.divergences import js_divergence
from kdjax.losses.divergences import sinkhorn_kd
from kdjax.losses.divergences import skew_kl
from kdjax.losses.divergences import skew_reverse_kl
from kdjax.losses.divergences import tvd
from kdjax.losses.logits import adaptive_weight_kd
from kdjax.losses.logits import bdkd
from kdjax.losses.logits import ce
from kdjax.losses.logits import dist
from kdjax.losses.logits import dist_inter_class
from kdjax.losses.logits import dist_intra_class
from kdjax.losses.logits import dkd
from kdjax.losses.logits import kd
from kdjax.losses.logits import logit_standardized_kd
from kdjax.losses.logits import pld
from kdjax.losses.logits import reverse_kl
from kdjax.losses.logits import standardize_logits
from kdjax.losses.logits import tf_kd
from kdjax.losses.progressive import TAIDState
from kdjax.losses.progressive import ctkd
from kdjax.losses.progressive import ctkd_reversal
from kdjax.losses.progressive import ctkd_temperature
from kdjax.losses.progressive import ctkd_temperature_param
from kdjax.losses.progressive import gradient_reversal
from kdjax.losses.progressive import taid
from kdjax.losses.progressive import taid_init
from kdjax.losses.progressive import taid_update
from kdjax.losses.sampled import sampled_kd
from kdjax.losses.sequence import chunked
from kdjax.losses.sequence import chunked_kd
from kdjax.losses.sparse import sparse_generalized_jsd
from kdjax.losses.sparse import sparse_kd
from kdjax.losses.sparse import sparse_reverse_kl
from kdjax.losses.sparse import sparse_tvd
from kdjax.losses.uld import uld_alignment
from kdjax.losses.uld import uld_loss

# --- feature and relation losses: kdjax/losses/features.py, relations.py
from kdjax.losses import features
from kdjax.losses import minilm
from kdjax.losses import projectors
from kdjax.losses import relations
from kdjax.losses.crd import MemoryState
from kdjax.losses.crd import QueueState
from kdjax.losses.crd import crd_init
from kdjax.losses.crd import crd_loss
from kdjax.losses.crd import crd_memory_init
from kdjax.losses.crd import crd_nce_loss
from kdjax.losses.crd import crd_queue_init
from kdjax.losses.crd import crd_queue_loss
from kdjax.losses.crd import crd_queue_push
from kdjax.losses.crd import crd_sample_negatives
from kdjax.losses.features import attention_map
from kdjax.losses.features import attention_transfer
from kdjax.losses.features import batch_class_means
from kdjax.losses.features import fitnet
from kdjax.losses.features import fitnet_init
from kdjax.losses.features import fitnet_regress
from kdjax.losses.features import hidden_cosine
from kdjax.losses.features import hidden_mse
from kdjax.losses.features import nd_loss
from kdjax.losses.lelp import lelp_directions
from kdjax.losses.lelp import lelp_loss
from kdjax.losses.lelp import lelp_targets
from kdjax.losses.minilm import attention_kl
from kdjax.losses.minilm import minilm_attention
from kdjax.losses.minilm import value_relation_kl
from kdjax.losses.ofa import ofa_head_apply
from kdjax.losses.ofa import ofa_head_init
from kdjax.losses.ofa import ofa_loss
from kdjax.losses.ofa import ofa_projector_apply
from kdjax.losses.ofa import ofa_projector_init
from kdjax.losses.relations import correlation_congruence
from kdjax.losses.relations import linear_cka
from kdjax.losses.relations import pkt
from kdjax.losses.relations import rkd_angle
from kdjax.losses.relations import rkd_distance
from kdjax.losses.relations import similarity_preserving
from kdjax.losses.trg import trg_loss
