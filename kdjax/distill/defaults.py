"""The base config every config file in ``configs/`` starts from.

Every field here can be overridden on the command line
(``--config.optimizer.learning_rate=3e-3``); unknown keys and wrong types are
refused.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_steps = 1000
  c.batch_size = 256               # global batch, over all devices and hosts
  c.log_every = 50
  c.eval_every = 500
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.steps_per_call = 50            # steps fused in one jitted call (lax.scan), device-fed data
  c.progress = True

  c.mesh = [('data', -1)]
  c.partition_rules = [('.*', None)]  # (regex over parameter paths, None | spec | 'fsdp')

  c.data = ml_collections.ConfigDict()
  c.data.name = 'mnist1d'
  c.data.data_dir = ''             # '' -> $KDJAX_DATA_DIR or ~/.cache/kdjax/tensorflow_datasets
  c.data.train_split = 'train'
  c.data.eval_split = 'test'
  c.data.feed = 'auto'             # 'device' (whole split on device), 'stream' (grain), 'auto'
  c.data.device_max_bytes = 1 << 30
  c.data.augment = ml_collections.ConfigDict({'kind': 'none'})
  c.data.eval_batch_size = 1000

  c.model = ml_collections.ConfigDict()
  c.model.name = 'mlp'
  c.model.kwargs = ml_collections.ConfigDict()
  c.model.dtype = 'float32'

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'adam'        # adam | adamw | sgd
  c.optimizer.learning_rate = 1e-3
  c.optimizer.schedule = 'cosine'  # constant | cosine | step
  c.optimizer.decay_steps = [0]    # 'step': where the rate is multiplied by decay_factor
  c.optimizer.decay_factor = 0.1
  c.optimizer.warmup_steps = 0
  c.optimizer.weight_decay = 0.0
  c.optimizer.momentum = 0.9
  c.optimizer.grad_clip_norm = 0.0

  c.loss = ml_collections.ConfigDict()
  c.loss.terms = ml_collections.ConfigDict({'ce': {'weight': 1.0}})

  c.teacher = ml_collections.ConfigDict()
  c.teacher.workdir = ''           # a finished `kdjax train` workdir
  c.teacher.partition_rules = [('.*', None)]
  c.teacher.cache = ''             # a `kdjax cache build` directory (teacher-cache issue)
  # Stream feed: load the cache whole up to this size, else read rows per batch from its
  # chunk files ('auto'); 'memory' or 'chunks' force one (kdjax.cache.read.choose_reader).
  c.teacher.cache_reader = 'auto'
  c.teacher.cache_memory_max_bytes = 1 << 30
  # Devices set apart for a live teacher (the last ones; the student's mesh takes the
  # rest). 0: the teacher runs inside the student's step. >0 (device feed, one process):
  # the teacher's forward for the next fused call runs on its own devices while the
  # student's call runs (kdjax.distill.step.make_teacher_steps); same result either way.
  c.teacher.devices = 0
  return c


# Fields that define what a checkpoint means. A workdir whose saved config differs in
# any of them holds another run's checkpoints and is refused.
IDENTITY_FIELDS = ('seed', 'batch_size', 'data.name', 'data.train_split', 'data.augment',
                   'model', 'optimizer', 'loss', 'teacher.workdir', 'teacher.cache')
