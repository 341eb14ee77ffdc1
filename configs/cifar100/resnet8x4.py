"""CIFAR-100 distillation: ResNet32x4 teacher -> ResNet8x4 student, one variant per method.

The student recipes of mdistiller's CIFAR-100 benchmark (megvii-research/mdistiller,
``configs/cifar100/<method>.yaml`` and ``configs/cifar100/dkd/res32x4_res8x4.yaml`` for
the solver, the loss options from the defaults of ``mdistiller/engine/cfg.py``, which
those files leave as they are): the teacher's recipe (configs/cifar100/resnet32x4.py:
SGD 0.05, momentum 0.9, weight decay 5e-4, batch 64, 240 epochs, rate x0.1 at epochs
150/180/210) with the student and the method's loss terms. docs/cifar_benchmark.md has
the published table and what differs from mdistiller.

Variants ``:<method>`` and ``:<method>,tiny`` (seconds, for tests on mock data), with
``<method>`` one of ``METHODS``:

    kdjax train --config configs/cifar100/resnet32x4.py --workdir workdirs/c100_r32x4
    kdjax train --config configs/cifar100/resnet8x4.py:vanilla --workdir workdirs/c100_r8x4
    kdjax distill --config configs/cifar100/resnet8x4.py:dkd --workdir workdirs/c100_dkd \\
        --config.teacher.workdir=workdirs/c100_r32x4

Feature names: mdistiller's ``feats[i]`` (``i`` = 1, 2, 3: the stage outputs after
their last ReLU) is kdjax's ``stage<i>``, its ``pooled_feat`` is ``penultimate``
(kdjax/models/resnet_cifar.py). Weights carry over unchanged (docs/losses.md), except
RKD's, whose two parts kdjax averages over distinct pairs and triplets where mdistiller
averages over all ``n^2`` and ``n^3`` index tuples: ``rkd_factors``.
"""

from kdjax.config import sibling
from kdjax.losses.schedules import epoch_ramp

resnet32x4 = sibling(__file__, 'resnet32x4')   # the teacher's recipe, shared

N_TRAIN = 50_000          # CIFAR-100's training split: CRD's memory-bank rows
DKD_WARMUP_EPOCHS = 20    # mdistiller's DKD.WARMUP
CRD_NEGATIVES = 16384     # mdistiller's CRD.NCE.K

METHODS = ('vanilla', 'kd', 'dkd', 'fitnet', 'at', 'sp', 'rkd', 'pkt', 'crd')

# Methods of the published tables without a kdjax loss: no config, a pointer instead.
NOT_IN_KDJAX = {
    'vid': 'kdjax has no VID loss (variational information distillation)',
    'cc': ("kdjax's correlation_congruence is the paper's Gaussian-kernel CC, not the "
           "reference code's (RepDistiller distiller_zoo/CC.py) behind the published number"),
    'reviewkd': 'kdjax has no ReviewKD loss (attention-based fusion of review features)',
    'ofd': 'kdjax has no OFD loss (margin ReLU on pre-activation features)',
    'nst': 'kdjax has no NST loss (neuron selectivity transfer)',
    'kdsvd': 'kdjax has no KDSVD loss',
    'ab': 'kdjax has no AB loss (activation boundaries)',
    'ft': 'kdjax has no FT loss (factor transfer)',
    'fsp': 'kdjax has no FSP loss',
    'dot': 'DOT is an optimizer (distillation-oriented trainer), not in kdjax',
}


def rkd_factors(batch_size: int) -> tuple[float, float]:
  """``(distance, angle)``: kdjax's RKD weights per unit of mdistiller's, at ``batch_size``.

  mdistiller's ``F.smooth_l1_loss`` means run over all ``n^2`` distance entries and all
  ``n^3`` angle entries, whose degenerate ones (``i = j``; a repeated index among three)
  are zero on both sides; kdjax's ``rkd_distance`` and ``rkd_angle`` average over the
  ``n(n-1)`` distinct pairs and ``n(n-1)(n-2)`` distinct triplets. The same loss is
  then kdjax's value times ``(n-1)/n`` and ``(n-1)(n-2)/n^2``.

  >>> rkd_factors(4)
  (0.75, 0.375)
  """
  n = batch_size
  return (n - 1) / n, (n - 1) * (n - 2) / n ** 2


def terms(method: str, *, batch_size: int, steps_per_epoch: int,
          warmup_epochs: int = DKD_WARMUP_EPOCHS, n_data: int = N_TRAIN,
          nce_k: int = CRD_NEGATIVES) -> dict:
  """The ``loss.terms`` of ``method`` with mdistiller's weights (``mdistiller/engine/cfg.py``).

  Args:
    method: one of ``METHODS``.
    batch_size: the training batch (RKD's factors depend on it).
    steps_per_epoch: optimizer steps per epoch (DKD's warm-up is in epochs).
    warmup_epochs: DKD's warm-up, ``min(epoch / warmup_epochs, 1)`` over 1-based epochs.
    n_data: CRD's memory-bank rows, the training split's size.
    nce_k: CRD's negatives per example.

  Returns:
    A ``{term: options}`` mapping for ``config.loss.terms``.
  """
  ce = {'ce': {'weight': 1.0}}     # every method's CE_WEIGHT is 1 but KD's
  if method == 'vanilla':
    return ce
  if method == 'kd':               # KD.TEMPERATURE 4, KD.LOSS.CE_WEIGHT 0.1, KD_WEIGHT 0.9
    return {'ce': {'weight': 0.1}, 'kd': {'weight': 0.9, 'temperature': 4.0}}
  if method == 'dkd':              # DKD.ALPHA 1, BETA 8, T 4, WARMUP 20
    return {**ce, 'dkd': {'weight': epoch_ramp(steps_per_epoch, warmup_epochs),
                          'alpha': 1.0, 'beta': 8.0, 'temperature': 4.0}}
  if method == 'fitnet':           # FITNET.HINT_LAYER 2 (feats[2]), FEAT_WEIGHT 100
    return {**ce, 'fitnet': {'weight': 100.0, 'student': 'stage2', 'teacher': 'stage2'}}
  if method == 'at':               # AT.P 2, FEAT_WEIGHT 1000, on feats[1:] (every stage)
    return {**ce, 'attention_transfer': {'weight': 1000.0, 'p': 2.0}}
  if method == 'sp':               # SP.LOSS.FEAT_WEIGHT 3000 on feats[-1]
    return {**ce, 'similarity_preserving': {'weight': 3000.0, 'student': 'stage3',
                                            'teacher': 'stage3'}}
  if method == 'rkd':              # RKD.DISTANCE_WEIGHT 25, ANGLE_WEIGHT 50 on pooled_feat
    distance, angle = rkd_factors(batch_size)
    return {**ce, 'rkd_distance': {'weight': 25.0 * distance},
            'rkd_angle': {'weight': 50.0 * angle}}
  if method == 'pkt':              # PKT.LOSS.FEAT_WEIGHT 30000 on pooled_feat
    return {**ce, 'pkt': {'weight': 30000.0}}
  if method == 'crd':              # CRD.LOSS.FEAT_WEIGHT 0.8, FEAT.DIM 128, NCE K/MOMENTUM/T
    return {**ce, 'crd': {'weight': 0.8, 'objective': 'nce', 'dim': 128, 'n_data': n_data,
                          'nce_k': nce_k, 'momentum': 0.5, 'temperature': 0.07}}
  if method in NOT_IN_KDJAX:
    raise ValueError(f'no config for {method!r}: {NOT_IN_KDJAX[method]} '
                     '(see docs/cifar_benchmark.md); use one of ' + ', '.join(METHODS))
  raise ValueError(f'unknown method {method!r}; use one of {", ".join(METHODS)}, '
                   'optionally with ,tiny')


def get_config(arg=None):
  parts = [p for p in (arg or '').split(',') if p]
  tiny = 'tiny' in parts
  methods = [p for p in parts if p != 'tiny']
  if len(methods) != 1:
    raise ValueError(f'name one method: {", ".join(METHODS)}, e.g. '
                     'configs/cifar100/resnet8x4.py:dkd or :dkd,tiny')
  c = resnet32x4.get_config(None)
  c.model.name = 'resnet8x4'
  options = dict(batch_size=c.batch_size, steps_per_epoch=resnet32x4.STEPS_PER_EPOCH)
  if tiny:
    resnet32x4.tiny(c)
    c.model.kwargs = {'widths': (8, 8, 16, 16)}
    # One-step "epochs" for DKD's ramp (1/4, 1/2, 3/4, 1); CRD's banks hold the first
    # 32 training examples (TFDS mock data has at least that many), 16 negatives each.
    options = dict(batch_size=c.batch_size, steps_per_epoch=1, warmup_epochs=4, n_data=32,
                   nce_k=16)
    if methods[0] == 'crd':
      c.data.train_split = 'train[:32]'
  c.loss.terms = terms(methods[0], **options)
  return c
