"""kdjax's logit losses against their authors' public code, in float64.

Each reference below is the formula of the cited file, written out here in PyTorch
(torch's own ``log_softmax``, ``kl_div``, ``cdist`` and autograd, the same calls the
references make); kdjax's per-example values are averaged as the reference reduces
them. Values and gradients (with respect to the student's logits) agree to 1e-6.
Where kdjax's value differs by a constant of the student (a cross-entropy against a
KL), the test says so and compares the value with that constant added.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax.losses as L

torch = pytest.importorskip('torch')
F = torch.nn.functional

RTOL, ATOL = 1e-6, 1e-9
# Test programs only: XLA:CPU's backend optimizations cost more compile time than these
# tiny arrays ever give back.
FAST_COMPILE = {'xla_backend_optimization_level': 0}


@pytest.fixture(autouse=True)
def _float64_highest_precision():
  with jax.enable_x64(True), jax.default_matmul_precision('highest'):
    yield


def make(seed, shape, scale=2.0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=shape) * scale, rng.normal(size=shape) * scale


def labels_for(seed, shape, classes):
  return np.random.default_rng(seed + 100).integers(0, classes, size=shape)


def ref_value_and_grad(fn, s, *args):
  """A torch reference's scalar and its gradient with respect to ``s``."""
  st = torch.tensor(s, dtype=torch.float64, requires_grad=True)
  value = fn(st, *args)
  value.backward()
  return value.item(), st.grad.numpy()


def compiled(fn, reduce=jnp.mean):
  """``(s, *args) -> (reduce(fn(s, *args)), its gradient)``, jitted; ``reduce`` of kdjax's
  per-example values is the reference's reduction (mean: the batch mean)."""
  return jax.jit(jax.value_and_grad(lambda s, *args: reduce(fn(s, *args))),
                 compiler_options=FAST_COMPILE)


def run(compiled_fn, s, *args):
  value, grad = compiled_fn(jnp.asarray(s), *(jnp.asarray(a) for a in args))
  return float(value), np.asarray(grad)


def kdjax_value_and_grad(fn, s, *args, reduce=jnp.mean):
  return run(compiled(fn, reduce), s, *args)


def assert_match(got, want, offset=0.0):
  np.testing.assert_allclose(got[0] + offset, want[0], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(got[1], want[1], rtol=RTOL, atol=ATOL)


def tt(x):
  return torch.tensor(np.asarray(x), dtype=torch.float64)


# --------------------------------------------------------------------------- kd, dkd
# megvii-research/mdistiller, mdistiller/distillers/KD.py (kd_loss) and DKD.py (dkd_loss).


def mdistiller_kd(logits_student, logits_teacher, temperature):
  log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
  pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
  loss = F.kl_div(log_pred_student, pred_teacher, reduction='none').sum(1).mean()
  return loss * temperature**2


def mdistiller_dkd(logits_student, logits_teacher, target, alpha, beta, temperature):
  gt = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
  other = ~gt

  def cat_mask(p):
    return torch.cat([(p * gt).sum(1, keepdim=True), (p * other).sum(1, keepdim=True)], 1)

  pred_student = cat_mask(F.softmax(logits_student / temperature, dim=1))
  pred_teacher = cat_mask(F.softmax(logits_teacher / temperature, dim=1))
  tckd = (F.kl_div(torch.log(pred_student), pred_teacher, reduction='sum')
          * temperature**2 / target.shape[0])
  pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt, dim=1)
  log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt, dim=1)
  nckd = (F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction='sum')
          * temperature**2 / target.shape[0])
  return alpha * tckd + beta * nckd


def test_kd_matches_mdistiller():
  s, t = make(0, (6, 10))
  assert_match(kdjax_value_and_grad(lambda s_, t_: L.kd(s_, t_, temperature=4.0), s, t),
               ref_value_and_grad(mdistiller_kd, s, tt(t), 4.0))


def test_dkd_matches_mdistiller():
  s, t = make(1, (6, 10))
  y = labels_for(1, (6,), 10)
  got = kdjax_value_and_grad(L.dkd, s, t, y)
  want = ref_value_and_grad(mdistiller_dkd, s, tt(t), torch.tensor(y), 1.0, 8.0, 4.0)
  assert_match(got, want)


@pytest.mark.parametrize('config, steps_per_epoch, warmup',
                         [('cifar10/resnet8x4_dkd.py', 50_000 // 64, 20),
                          ('cifar10/resnet8x4_dkd.py:tiny', 1, 4),
                          ('mnist1d/dkd.py', 4000 // 128, 20),
                          ('mnist1d/dkd.py:tiny', 5, 4)])
def test_dkd_configs_ramp_the_weight_like_mdistiller(paths, config, steps_per_epoch, warmup):
  """mdistiller's DKD.forward_train: CE + min(epoch / warmup, 1) * dkd_loss, epochs from 1."""
  from kdjax.config import load_config
  c = load_config(f"{paths['configs']}/{config}")
  terms = c.loss.terms.to_dict()
  assert terms['ce'] == {'weight': 1.0}
  dkd = dict(terms['dkd'])
  weight = L.make_schedule(dkd.pop('weight'))
  assert dkd == dict(alpha=1.0, beta=8.0, temperature=4.0)
  steps = np.arange(0, min(c.num_steps, (warmup + 2) * steps_per_epoch))
  want = np.minimum((steps // steps_per_epoch + 1) / warmup, 1.0)
  np.testing.assert_allclose(jax.vmap(weight)(jnp.asarray(steps)), want, rtol=1e-7)
  assert float(weight(c.num_steps - 1)) == 1.0


def test_dkd_config_objective_is_mdistillers_loss(paths):
  from kdjax.config import load_config
  c = load_config(f"{paths['configs']}/cifar10/resnet8x4_dkd.py")
  objective = L.build_objective(c.loss.terms.to_dict())
  s, t = make(2, (4, 10))
  y = labels_for(2, (4,), 10)
  inputs = dict(student_logits=jnp.asarray(s), teacher_logits=jnp.asarray(t),
                labels=jnp.asarray(y))
  params, state = objective.init(jax.random.key(0), inputs)
  apply = jax.jit(objective.apply, compiler_options=FAST_COMPILE)
  ce = F.cross_entropy(tt(s), torch.tensor(y)).item()
  dkd = mdistiller_dkd(tt(s), tt(t), torch.tensor(y), 1.0, 8.0, 4.0).item()
  for step, epoch in [(0, 1), (781 * 5 + 3, 6), (781 * 30, 31)]:
    loss, _, _ = apply(params, state, {**inputs, 'step': jnp.asarray(step)})
    np.testing.assert_allclose(float(loss), ce + min(epoch / 20, 1.0) * dkd, rtol=1e-6)


# --------------------------------------------------------------------------- tf_kd
# yuanli2333/Teacher-free-Knowledge-Distillation, my_loss_function.py
# (loss_kd_regularization; correct_prob 0.99 in the code, reg_temperature 20,
# multiplier 100 and reg_alpha 0.1 in experiments/base_experiments/base_resnet18/params.json).


def tfkd_soft_regu(outputs, labels, temperature, multiplier, correct_prob=0.99):
  k = outputs.size(1)
  teacher_soft = torch.ones_like(outputs) * (1 - correct_prob) / (k - 1)
  for i in range(outputs.shape[0]):
    teacher_soft[i, labels[i]] = correct_prob
  return torch.nn.KLDivLoss()(F.log_softmax(outputs, dim=1),
                              F.softmax(teacher_soft / temperature, dim=1)) * multiplier


def tfkd_regularization(outputs, labels, alpha, temperature, multiplier):
  return ((1.0 - alpha) * F.cross_entropy(outputs, labels)
          + alpha * tfkd_soft_regu(outputs, labels, temperature, multiplier))


@pytest.mark.filterwarnings('ignore:reduction')  # the reference's nn.KLDivLoss()
def test_tf_kd_default_is_the_reference_soft_term():
  s, _ = make(3, (6, 10))
  y = labels_for(3, (6,), 10)
  assert_match(kdjax_value_and_grad(L.tf_kd, s, y),
               ref_value_and_grad(tfkd_soft_regu, s, torch.tensor(y), 20.0, 100.0))


@pytest.mark.filterwarnings('ignore:reduction')  # the reference's nn.KLDivLoss()
def test_tf_kd_objective_is_loss_kd_regularization():
  """(1 - alpha) CE + alpha * loss_soft_regu as two weighted terms."""
  s, _ = make(4, (6, 10))
  y = labels_for(4, (6,), 10)
  objective = L.build_objective({'ce': dict(weight=0.9), 'tf_kd': dict(weight=0.1)})
  inputs = dict(student_logits=jnp.asarray(s), labels=jnp.asarray(y))
  params, state = objective.init(jax.random.key(0), inputs)
  got = jax.jit(jax.value_and_grad(lambda s_: objective.apply(
      params, state, {**inputs, 'student_logits': s_})[0]),
                compiler_options=FAST_COMPILE)(jnp.asarray(s))
  want = ref_value_and_grad(tfkd_regularization, s, torch.tensor(y), 0.1, 20.0, 100.0)
  assert_match((float(got[0]), np.asarray(got[1])), want)


# --------------------------------------------------------------------------- lskd
# sunshangquan/logit-standardization-KD, mdistiller/distillers/KD.py (normalize, kd_loss
# with logit_stand=True; base temperature 2 from tools/train.py).


def lskd_reference(logits_student, logits_teacher, temperature):
  def normalize(logit):
    mean = logit.mean(dim=-1, keepdims=True)
    stdv = logit.std(dim=-1, keepdims=True)
    return (logit - mean) / (1e-7 + stdv)
  return mdistiller_kd(normalize(logits_student), normalize(logits_teacher), temperature)


LSKD = compiled(L.logit_standardized_kd)
LSKD_POPULATION = compiled(lambda s, t: L.logit_standardized_kd(s, t, ddof=0))


@pytest.mark.parametrize('classes', [2, 10, 100])
def test_logit_standardized_kd_matches_the_authors_code(classes):
  s, t = make(5, (6, classes))
  assert_match(run(LSKD, s, t), ref_value_and_grad(lskd_reference, s, tt(t), 2.0))
  if classes == 2:
    # The population standard deviation (ddof=0) is another loss, most of all for few
    # classes: at 2 the z-scores are sqrt(2) times the reference's, i.e. the reference at
    # temperature 2 / sqrt(2), times (sqrt(2))^2 for the T^2 factor.
    other, _ = run(LSKD_POPULATION, s, t)
    np.testing.assert_allclose(other, 2.0 * lskd_reference(tt(s), tt(t), math.sqrt(2)).item(),
                               rtol=1e-6)
    assert abs(other - lskd_reference(tt(s), tt(t), 2.0).item()) > 0.1


# --------------------------------------------------------------------------- sinkhorn
# 2018cx/SinKD, loss.py (Sinkhorn: T = 2, sinkhorn_loss with epsilon 0.1, 20 iterations of
# sinkhorn_normalized, torch.cdist p=1; forward multiplies by 0.001).


def sinkd_loss(y_s, y_t, temperature=2.0, epsilon=0.1, n_iters=20):
  x = F.softmax(y_s / temperature, dim=1)
  y = F.softmax(y_t / temperature, dim=1)
  wxy = torch.cdist(x, y, p=1)
  plan = torch.exp(-wxy / epsilon)
  for _ in range(n_iters):
    plan = plan / torch.sum(plan, dim=1, keepdim=True)
    plan = plan / torch.sum(plan, dim=0, keepdim=True)
  return torch.sum(plan * wxy)


SINKHORN = compiled(lambda s, t, where: L.sinkhorn_kd(s, t, where=where))


def test_sinkhorn_kd_default_is_sinkd():
  s, t = make(6, (7, 5))
  assert_match(run(SINKHORN, s, t, np.ones(7, bool)),
               ref_value_and_grad(sinkd_loss, s, tt(t)))


def test_sinkhorn_kd_masked_examples_are_the_reference_on_the_rest():
  s, t = make(7, (7, 5))
  where = np.array([True, True, False, True, True, False, True])
  got = run(SINKHORN, s, t, where)
  want = ref_value_and_grad(sinkd_loss, s[where], tt(t[where]))
  np.testing.assert_allclose(got[0], want[0], rtol=RTOL)
  np.testing.assert_allclose(got[1][where], want[1], rtol=RTOL, atol=ATOL)
  np.testing.assert_array_equal(got[1][~where], 0.0)


# --------------------------------------------------------------------------- DistiLLM
# jongwooko/distillm, distillm/losses.py. Token losses [batch, time, vocab] averaged over
# the tokens whose label is not -100 (kdjax: where); inf_mask: an infinite logit on either
# side zeroes the entry.


def _token_mean(x, mask):
  return torch.sum(x.view(-1) * mask.view(-1)) / torch.sum(mask.view(-1))


def distillm_forward_kl(logits, teacher_logits, mask):
  teacher_probs = F.softmax(teacher_logits, dim=-1)
  inf_mask = torch.isinf(logits)
  logprobs = F.log_softmax(logits, dim=-1)
  prod = torch.masked_fill(teacher_probs * logprobs, inf_mask, 0)
  return -_token_mean(torch.sum(prod, dim=-1), mask)


def distillm_reverse_kl(logits, teacher_logits, mask):
  probs = F.softmax(logits, dim=-1)
  logprobs = F.log_softmax(logits, dim=-1)
  teacher_logprobs = F.log_softmax(teacher_logits, dim=-1)
  inf_mask = torch.isinf(teacher_logits) | torch.isinf(logits)
  prod = torch.masked_fill(probs * teacher_logprobs, inf_mask, 0)
  prod = prod - torch.masked_fill(probs * logprobs, inf_mask, 0)
  return -_token_mean(torch.sum(prod, dim=-1), mask)


def distillm_js_distance(logits, teacher_logits, mask, lam=0.9):
  teacher_probs = F.softmax(teacher_logits, dim=-1)
  probs = F.softmax(logits, dim=-1)
  mixed_logprobs = torch.log((1 - lam) * teacher_probs + lam * probs)
  teacher_logprobs = F.log_softmax(teacher_logits, dim=-1)
  logprobs = F.log_softmax(logits, dim=-1)
  inf_mask = torch.isinf(logits) | torch.isinf(teacher_logits)
  prod = torch.masked_fill(probs * mixed_logprobs, inf_mask, 0)
  prod = prod - torch.masked_fill(probs * logprobs, inf_mask, 0)
  loss = lam * -_token_mean(torch.sum(prod, dim=-1), mask)
  prod = torch.masked_fill(teacher_probs * mixed_logprobs, inf_mask, 0)
  prod = prod - torch.masked_fill(teacher_probs * teacher_logprobs, inf_mask, 0)
  return loss + (1 - lam) * -_token_mean(torch.sum(prod, dim=-1), mask)


def distillm_tv_distance(logits, teacher_logits, mask):
  diff = torch.abs(F.softmax(teacher_logits, dim=-1) - F.softmax(logits, dim=-1))
  inf_mask = torch.isinf(logits) | torch.isinf(teacher_logits)
  return _token_mean(torch.sum(0.5 * torch.masked_fill(diff, inf_mask, 0), dim=-1), mask)


def distillm_skewed_forward_kl(logits, teacher_logits, mask, lam=0.1):
  teacher_probs = F.softmax(teacher_logits, dim=-1)
  mixed_logprobs = torch.log(lam * teacher_probs + (1 - lam) * F.softmax(logits, dim=-1))
  inf_mask = torch.isinf(logits) | torch.isinf(teacher_logits)
  prod = torch.masked_fill(teacher_probs * mixed_logprobs, inf_mask, 0)
  return -_token_mean(torch.sum(prod, dim=-1), mask)


def distillm_skewed_reverse_kl(logits, teacher_logits, mask, lam=0.1):
  probs = F.softmax(logits, dim=-1)
  mixed_logprobs = torch.log((1 - lam) * F.softmax(teacher_logits, dim=-1) + lam * probs)
  logprobs = F.log_softmax(logits, dim=-1)
  inf_mask = torch.isinf(logits) | torch.isinf(teacher_logits)
  prod = torch.masked_fill(probs * mixed_logprobs, inf_mask, 0)
  prod = prod - torch.masked_fill(probs * logprobs, inf_mask, 0)
  return -_token_mean(torch.sum(prod, dim=-1), mask)


def token_mean(fn):
  """``fn(s, t, where)`` averaged over the tokens ``where`` is True (the labeled ones)."""
  def mean(s, t, where):
    return jnp.sum(jnp.where(where, fn(s, t, where), 0.0)) / jnp.sum(where)
  return mean


def teacher_entropy(t, where, skip):
  """The token mean of -sum p log p over the entries DistiLLM keeps: a forward KL's
  cross-entropy minus the KL."""
  p = np.exp(t - t.max(-1, keepdims=True))
  p = p / p.sum(-1, keepdims=True)
  with np.errstate(divide='ignore', invalid='ignore'):
    terms = np.where(skip | (p == 0), 0.0, -p * np.log(p))
  return float(terms.sum(-1)[where].mean())


# name -> (kdjax per-token loss, DistiLLM function, whether DistiLLM's value is the
# cross-entropy: kdjax's KL plus the teacher's entropy)
DISTILLM = {
    'reverse_kl': (lambda s, t, w: L.reverse_kl(s, t, where=w), distillm_reverse_kl, False),
    'tvd': (lambda s, t, w: L.tvd(s, t, where=w), distillm_tv_distance, False),
    'skew_reverse_kl': (lambda s, t, w: L.skew_reverse_kl(s, t, alpha=0.1, where=w),
                        distillm_skewed_reverse_kl, False),
    'js_distance': (lambda s, t, w: L.generalized_jsd(s, t, beta=0.1, where=w),
                    distillm_js_distance, False),
    'forward_kl': (lambda s, t, w: L.kd(s, t, where=w), distillm_forward_kl, True),
    'skew_kl': (lambda s, t, w: L.skew_kl(s, t, alpha=0.1, where=w), distillm_skewed_forward_kl,
                True),
}


DISTILLM_COMPILED = {name: compiled(token_mean(fn), reduce=lambda v: v)
                     for name, (fn, _, _) in DISTILLM.items()}


@pytest.mark.parametrize('padding', ['none', 'both', 'student', 'teacher'])
@pytest.mark.parametrize('name', list(DISTILLM))
def test_distillm_losses(name, padding):
  """Values always; gradients where the reference's are finite. With -inf columns the
  reference masks the value but not every gradient: the masked product's other factor
  is -inf (reverse KL's ``log p``, the mixtures' ``log m``), and 0 * -inf is NaN in its
  backward pass. kdjax's gradients are finite in every case (test_infinite_logits.py)."""
  s, t = make(8, (2, 3, 7))
  where = np.array([[True, True, False], [True, False, True]])   # labels != -100
  if padding in ('both', 'student'):
    s[..., [1, 5]] = -np.inf
  if padding in ('both', 'teacher'):
    t[..., [1, 5] if padding == 'both' else [3]] = -np.inf
  _, reference, cross_entropy = DISTILLM[name]
  got = run(DISTILLM_COMPILED[name], s, t, where)
  want = ref_value_and_grad(reference, s, tt(t), torch.tensor(where))
  offset = teacher_entropy(t, where, np.isinf(s)) if cross_entropy else 0.0
  assert np.all(np.isfinite(got[1]))
  if padding == 'none' or np.all(np.isfinite(want[1])):
    assert_match(got, want, offset)
  else:
    np.testing.assert_allclose(got[0] + offset, want[0], rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------- GKD
# huggingface/trl, trl/experimental/gkd/gkd_trainer.py (GKDTrainer.generalized_jsd_loss,
# reduction 'batchmean' over the tokens with a label; no T^2 factor).


def trl_generalized_jsd(student_logits, teacher_logits, labels, beta, temperature):
  student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
  teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
  if beta == 0:
    jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction='none', log_target=True)
  elif beta == 1:
    jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction='none', log_target=True)
  else:
    beta = torch.tensor(beta, dtype=student_log_probs.dtype)
    mixture = torch.logsumexp(torch.stack([student_log_probs + torch.log1p(-beta),
                                           teacher_log_probs + torch.log(beta)]), dim=0)
    jsd = (beta * F.kl_div(mixture, teacher_log_probs, reduction='none', log_target=True)
           + (1 - beta) * F.kl_div(mixture, student_log_probs, reduction='none',
                                   log_target=True))
  mask = labels != -100
  return jsd[mask].sum() / mask.sum()


@pytest.mark.parametrize('beta', [0.0, 0.2, 1.0])
def test_generalized_jsd_matches_trl(beta):
  s, t = make(9, (2, 3, 6))
  labels = np.array([[5, -100, 2], [1, 3, -100]])
  where = labels != -100
  temperature = 2.0
  got = kdjax_value_and_grad(
      token_mean(lambda s_, t_, w: L.generalized_jsd(s_, t_, beta=beta, temperature=temperature,
                                                     where=w) / temperature**2),
      s, t, where, reduce=lambda v: v)
  want = ref_value_and_grad(trl_generalized_jsd, s, tt(t), torch.tensor(labels), beta,
                            temperature)
  assert_match(got, want)


# --------------------------------------------------------------------------- TAID
# SakanaAI/TAID, src/distil_losses/taid.py (TAID.compute_loss, TAID.update_t) and
# src/distil_losses/fkl.py (forward_kl: the cross-entropy, DistiLLM's).


def taid_compute_loss(logits, teacher_logits, mask, t):
  p_t = F.softmax((1 - t) * logits.detach() + t * teacher_logits, dim=-1)
  logprobs = F.log_softmax(logits, dim=-1)
  prod = torch.masked_fill(p_t * logprobs, torch.isinf(logits), 0)
  return -_token_mean(torch.sum(prod, dim=-1), mask)


class TaidUpdate:
  """TAID.update_t with its float32 buffers."""

  def __init__(self, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99):
    self.t_start, self.t_end, self.alpha, self.beta = t_start, t_end, alpha, beta
    self.t = torch.tensor(t_start, dtype=torch.float32)
    self.prev_loss = torch.tensor(float('inf'), dtype=torch.float32)
    self.momentum = torch.zeros([], dtype=torch.float32)

  def __call__(self, loss, global_step, num_train_steps):
    if torch.isinf(self.prev_loss):
      self.prev_loss = loss
      return
    relative_change = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
    self.momentum = self.beta * self.momentum + (1 - self.beta) * relative_change
    progress = global_step / num_train_steps
    t_target = self.t_start + (self.t_end - self.t_start) * progress
    delta_t = self.alpha * torch.sigmoid(self.momentum) * (1 - self.t)
    t = min(self.t_end, max(t_target, self.t + delta_t))
    self.t = t if isinstance(t, torch.Tensor) else torch.tensor(t, dtype=torch.float32)
    self.prev_loss = loss


def test_taid_loss_matches_the_reference_up_to_the_target_entropy():
  s, t = make(10, (2, 3, 6))
  where = np.array([[True, False, True], [True, True, False]])
  got = kdjax_value_and_grad(
      token_mean(lambda s_, t_, w: L.taid(s_, t_, interpolation=0.7, where=w)), s, t, where,
      reduce=lambda v: v)
  want = ref_value_and_grad(taid_compute_loss, s, tt(t), torch.tensor(where), 0.7)
  assert_match(got, want, teacher_entropy(0.3 * s + 0.7 * t, where, np.zeros(s.shape, bool)))


def test_taid_update_matches_the_reference():
  losses = [3.0, 2.2, 1.5, 1.6, 1.1, 0.9, 0.85, 0.5, 0.45, 0.44, 0.43, 0.40]
  kw = dict(t_start=0.2, t_end=0.9, alpha=0.2, beta=0.5)
  reference = TaidUpdate(**kw)
  state = L.taid_init(0.2)
  update = jax.jit(lambda state, loss, step: L.taid_update(state, loss, step, total_steps=10,
                                                           **kw),
                   compiler_options=FAST_COMPILE)
  for step, loss in enumerate(losses):
    reference(torch.tensor(loss, dtype=torch.float32), step, 10)
    state = update(state, jnp.asarray(loss, jnp.float32), jnp.asarray(step))
    np.testing.assert_allclose(float(state.interpolation), float(reference.t), rtol=1e-6)
    np.testing.assert_allclose(float(state.momentum), float(reference.momentum), rtol=1e-6,
                               atol=1e-9)


def test_taid_term_follows_the_reference_trajectory():
  """The registered term: loss at the current t, then t updated from the cross-entropy."""
  s, t = make(11, (4, 6))
  total = 5
  objective = L.build_objective({'taid': dict(total_steps=total, alpha=0.05)})
  inputs = dict(student_logits=jnp.asarray(s), teacher_logits=jnp.asarray(t))
  params, state = objective.init(jax.random.key(0), inputs)
  reference = TaidUpdate(alpha=0.05)
  mask = torch.ones(4)
  apply = jax.jit(objective.apply, compiler_options=FAST_COMPILE)
  for step in range(total + 2):
    # A different student each step, so that the loss (and t) moves.
    s_step = s * (1.0 - 0.1 * step)
    ce = taid_compute_loss(tt(s_step), tt(t), mask, reference.t.double())
    loss, state, _ = apply(params, state, {**inputs, 'step': jnp.asarray(step),
                                          'student_logits': jnp.asarray(s_step)})
    reference(ce.detach().float(), step, total)
    np.testing.assert_allclose(float(state['taid'].interpolation), float(reference.t),
                               rtol=1e-6)
  assert float(reference.t) == pytest.approx(1.0)


# --------------------------------------------------------------------------- bdkd
# BD-KD (Amara et al., arXiv:2212.12965) publishes no code; its abstract's rule, with
# kdjax's closed-form entropy weight (docs/losses.md), written out in torch.


def bdkd_formula(logits_student, logits_teacher, temperature, eps=1e-6, side='student'):
  if side == 'student':
    logits_teacher = logits_teacher.detach()
  else:
    logits_student = logits_student.detach()
  log_q = F.log_softmax(logits_student / temperature, dim=-1)
  log_p = F.log_softmax(logits_teacher / temperature, dim=-1)
  h_p = -(log_p.exp() * log_p).sum(-1)
  h_q = -(log_q.exp() * log_q).sum(-1)
  w = ((h_p + eps) / (h_p + h_q + 2 * eps)).detach()
  forward = (log_p.exp() * (log_p - log_q)).sum(-1)
  reverse = (log_q.exp() * (log_q - log_p)).sum(-1)
  return (temperature**2 * (w * forward + (1 - w) * reverse)).mean()


def test_bdkd_matches_its_formula_on_both_sides():
  s, t = make(12, (6, 8))
  assert_match(kdjax_value_and_grad(lambda s_, t_: L.bdkd(s_, t_, temperature=2.0), s, t),
               ref_value_and_grad(bdkd_formula, s, tt(t), 2.0))
  # The teacher-side term of online KD: the gradient goes to the teacher.
  got = kdjax_value_and_grad(lambda t_, s_: L.bdkd(s_, t_, temperature=2.0, side='teacher'),
                             t, s)
  want = ref_value_and_grad(lambda t_: bdkd_formula(tt(s), t_, 2.0, side='teacher'), t)
  assert_match(got, want)
  assert math.isfinite(got[0])
