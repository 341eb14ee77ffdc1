r"""On-policy batches: the student writes the continuations it is distilled on.

A *policy* is the feed's plug-in between the source's batch and the teacher's forward
(``docs/architecture.md``, "The path of one batch"). It sees step ``s``'s batch of
prompt -> continuation records (``shakespeare_lm``'s ``prompts_*`` splits: ``prompt_ids``
left-padded to ``P``, the teacher-forced view ``x``/``label``/``mask`` of ``L = P + C``
tokens), the student of the train state before step ``s`` and a key of that step, and
returns the batch the step trains on: the dataset's own, or the prompts continued by
the student's samples (:func:`continue_prompts`), which the live teacher then scores.

* :func:`gkd` — Generalized Knowledge Distillation (Agarwal et al., ICLR 2024): with
  probability :math:`\lambda` per step (one coin per batch, as TRL's ``GKDTrainer``)
  the student samples the continuations; otherwise the batch keeps the dataset's
  (or, with ``seq_kd``, the teacher's samples). The objective is the config's, usually
  ``generalized_jsd(beta)``.
* :func:`distillm` — DistiLLM's adaptive off-policy sampling (Ko et al., ICML 2024):
  fresh student samples go into a replay buffer that later steps reuse, and the
  probability of training on student outputs rises when the validation loss stops
  improving (:func:`distillm_threshold`). The buffer is part of the policy's state.

A policy's state rides in the train state's ``loss_state`` under :data:`STATE_KEY`
(:func:`carry_policy_state` makes the objective keep it), so it is checkpointed and
resumed with the rest of the state; stateless policies carry ``{}``.

References:
  Agarwal, Vieillard, Zhou, Stanczyk, Ramos, Geist, Bachem. On-Policy Distillation of
  Language Models: Learning from Self-Generated Mistakes. ICLR 2024. arXiv:2306.13649.
  Peer: huggingface/trl ``GKDTrainer`` (``lmbda``, ``beta``, ``temperature``,
  ``max_new_tokens``, ``seq_kd``).
  Ko, Kim, Chen, Yun. DistiLLM: Towards Streamlined Distillation for Large Language
  Models. ICML 2024. arXiv:2402.03898. Reference code: jongwooko/distillm,
  ``finetune.py`` (the adaptive threshold), ``distillm/buffer.py`` (the replay buffer).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import data as kdata
from kdjax import teacher as teacher_lib
from kdjax.data.text import PAD_ID
from kdjax.engine.config import REPLAY_RATIOS
from kdjax.errors import UserError
from kdjax.losses import Objective
from kdjax.models.decoding import Generation
from kdjax.models.decoding import check_context
from kdjax.models.decoding import sample
from kdjax.models.transformer import DecoderConfig
from kdjax.models.transformer import init_cache

Batch = dict[str, Any]

# Where a policy's state lives in the train state: ``loss_state[STATE_KEY]``.
STATE_KEY = 'on_policy'
# The source columns every policy here reads besides the batch's model inputs.
PROMPT_KEYS = ('prompt_ids', 'prompt_mask')
# The columns of a batch row an on-policy continuation rewrites (and DistiLLM stores).
ROW_KEYS = ('x', 'label', 'mask', 'segment_ids', 'positions')
# A policy's key is the step's key folded with this: the models reseed their RNG streams
# with fold_in(step key, stream index), small numbers, so the draws stay apart.
_POLICY_STREAM = 0x7FFFFFFF


class Policy(NamedTuple):
  """An on-policy plug-in of the feed (see the module docstring).

  Attributes:
    keys: the source columns it reads besides the model inputs (``prompt_ids``, ...).
    init: ``init() -> state``, its state before step 0 (a pytree; ``{}`` if none).
    apply: ``apply(batch, state, *, student, teacher, step, rng) -> (batch, state,
      metrics)``, pure and jittable: ``student`` is ``(params, model_state)``,
      ``teacher`` the live teacher's variables (or None), ``step`` the optimizer step,
      ``metrics`` ``(sum, count)`` pairs.
    evaluated: ``evaluated(state, eval_metrics) -> state`` after an evaluation (None:
      the policy ignores evaluations).
  """

  keys: tuple[str, ...]
  init: Callable[[], Any]
  apply: Callable[..., tuple[Batch, Any, dict]]
  evaluated: Callable[[Any, dict], Any] | None = None


class Sampler(NamedTuple):
  """How a policy samples continuations from a decoder.

  Attributes:
    apply: the decoder's pure ``apply(params, state, ids, **kwargs)``.
    config: its :class:`~kdjax.models.DecoderConfig` (for its key/value cache).
    max_new_tokens: tokens sampled per prompt (at most the batch's ``C``).
    temperature: 0 for greedy decoding.
    top_k: optional top-k cut (None: none).
    top_p: optional nucleus cut (None: none).
    stop_tokens: ids that end a continuation (kept in it, as ``<eos>`` in the data).
  """

  apply: Callable[..., Any]
  config: DecoderConfig
  max_new_tokens: int
  temperature: float = 1.0
  top_k: int | None = None
  top_p: float | None = None
  stop_tokens: tuple[int, ...] = ()

  def __call__(self, variables, prompt_ids, prompt_mask, rng) -> Generation:
    """Samples ``[batch, max_new_tokens]`` continuations of left-padded prompts from the
    decoder with ``variables = (params, model_state)``, under ``stop_gradient``."""
    params, state = jax.lax.stop_gradient(variables)
    return sample(self.apply, params, state, prompt_ids, prompt_mask, rng,
                  init_cache=functools.partial(init_cache, self.config),
                  max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                  top_k=self.top_k, top_p=self.top_p, stop_tokens=self.stop_tokens,
                  pad_id=PAD_ID, max_positions=self.config.max_positions)


def step_key(train_state) -> jax.Array:
  """The key of the policy at the train state's step: the step's key (the one the
  student's dropout folds its streams from) folded with a constant of its own."""
  key = jax.random.fold_in(jax.random.wrap_key_data(train_state.rng), train_state.step)
  return jax.random.fold_in(key, _POLICY_STREAM)


# --------------------------------------------------------------------------- the batch

def continue_prompts(batch: Batch, tokens: jax.Array, mask: jax.Array) -> Batch:
  """The batch with its continuations replaced by ``tokens``, teacher-forced.

  The layout is the prompt records' (:mod:`kdjax.data.text`): ``x`` is the left-padded
  prompt ``[P]`` then the new continuation, right-padded to ``C = L - P``; ``label`` the
  next real token (``<pad>`` where the token or its successor is padding); ``mask``
  True exactly where the target is a continuation token (``mask[P - 1 + j] = mask_j``);
  ``segment_ids`` 1 on real tokens; ``positions`` 0, 1, ... from the first real prompt
  token (0 on padding). Other columns are kept.

  Args:
    batch: a batch of prompt records (``prompt_ids``, ``prompt_mask``, ``x``, ...).
    tokens: ``[B, N]`` continuation ids, ``N <= C``; padding after a stop token.
    mask: ``[B, N]``: the real continuation tokens (a prefix of each row).

  Returns:
    The new batch.

  >>> b = {'prompt_ids': jnp.array([[0, 5, 6, 1]]), 'prompt_mask': jnp.array([[0, 1, 1, 1]]),
  ...      'x': jnp.zeros((1, 7), jnp.int32)}
  >>> out = continue_prompts(b, jnp.array([[7, 1]]), jnp.array([[True, True]]))
  >>> out['x'].tolist(), out['label'].tolist(), out['mask'].astype(int).tolist()
  ([[0, 5, 6, 1, 7, 1, 0]], [[0, 6, 1, 7, 1, 0, 0]], [[0, 0, 0, 1, 1, 0, 0]])
  >>> out['positions'].tolist(), out['segment_ids'].tolist()
  ([[0, 0, 1, 2, 3, 4, 0]], [[0, 1, 1, 1, 1, 1, 0]])
  """
  prompt, prompt_mask = batch['prompt_ids'], batch['prompt_mask'].astype(bool)
  b, p = prompt.shape
  c = batch['x'].shape[1] - p
  n = tokens.shape[1]
  if n > c:
    raise ValueError(f'{n} new tokens do not fit the batch\'s {c} continuation tokens')
  mask = mask.astype(bool)
  tokens = jnp.where(mask, tokens.astype(jnp.int32), PAD_ID)
  gen = jnp.pad(tokens, ((0, 0), (0, c - n)), constant_values=PAD_ID)
  gen_mask = jnp.pad(mask, ((0, 0), (0, c - n)))
  x = jnp.concatenate([prompt.astype(jnp.int32), gen], axis=1)
  real = jnp.concatenate([prompt_mask, gen_mask], axis=1)
  nxt = jnp.pad(x[:, 1:], ((0, 0), (0, 1)), constant_values=PAD_ID)
  real_next = jnp.pad(real[:, 1:], ((0, 0), (0, 1)))
  label = jnp.where(real & real_next, nxt, PAD_ID)
  loss_mask = jnp.concatenate([jnp.zeros((b, p - 1), bool), gen_mask,
                               jnp.zeros((b, 1), bool)], axis=1)
  positions = jnp.where(real, jnp.cumsum(real, axis=1, dtype=jnp.int32) - 1, 0)
  return dict(batch, x=x, label=label, mask=loss_mask, segment_ids=real.astype(jnp.int32),
              positions=positions)


def _fraction(flag) -> tuple[jax.Array, jax.Array]:
  return jnp.asarray(flag, jnp.float32), jnp.ones((), jnp.float32)


# --------------------------------------------------------------------------- GKD

def gkd(student: Sampler, *, lmbda: float, teacher: Sampler | None = None) -> Policy:
  r"""GKD's mix of on-policy and fixed continuations.

  Each step draws :math:`u \sim U[0, 1)` from its key's first half
  (``coin, draw = jax.random.split(step key)``); when :math:`u < \lambda` the student
  samples every prompt's continuation with ``draw`` and the batch becomes
  :func:`continue_prompts` of them (the loss mask covers the sampled tokens, the stop
  token included); otherwise the batch keeps the dataset's continuations or, with a
  ``teacher`` sampler (TRL's ``seq_kd``), the teacher's samples drawn with ``draw``.
  :math:`\lambda = 0` is supervised KD on the dataset's continuations,
  :math:`\lambda = 1` pure on-policy distillation.

  Args:
    student: the student's :class:`Sampler`.
    lmbda: :math:`\lambda \in [0, 1]`, the probability of an on-policy batch.
    teacher: the teacher's :class:`Sampler` for sequence-level KD off-policy, or None.

  Returns:
    A stateless :class:`Policy`; its metric ``on_policy/student`` is 1 on an
    on-policy step.

  References:
    Agarwal et al. On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes. ICLR 2024 (Algorithm 1). TRL's ``GKDTrainer`` draws the
    same per-batch coin (``random.random() <= lmbda``).
  """

  sample_student, sample_teacher = student, teacher

  def apply(batch, state, *, student: Any, teacher: Any = None, step=None, rng):
    del step
    coin, draw = jax.random.split(rng)
    on_policy = jax.random.uniform(coin) < lmbda

    def from_student(b):
      out = sample_student(student, b['prompt_ids'], b['prompt_mask'], draw)
      return continue_prompts(b, out.tokens, out.mask)

    def off_policy(b):
      if sample_teacher is None:     # supervised KD: the data's continuations
        return b
      out = sample_teacher(teacher, b['prompt_ids'], b['prompt_mask'], draw)
      return continue_prompts(b, out.tokens, out.mask)

    batch = jax.lax.cond(on_policy, from_student, off_policy, batch)
    return batch, state, {'on_policy/student': _fraction(on_policy)}

  return Policy(keys=PROMPT_KEYS, init=dict, apply=apply)


# --------------------------------------------------------------------------- DistiLLM

def distillm(student: Sampler, *, capacity: int, batch_size: int, seq_len: int,
             num_steps: int, init_threshold: float = 0.0, threshold_step: float = 0.1,
             loss_eps: float = 0.1, replay_ratio: str = 'decreasing') -> Policy:
  r"""DistiLLM's adaptive off-policy sampling with a replay buffer.

  The state holds the threshold :math:`\psi` (``init_threshold`` at first), the
  reference validation loss (NaN until the first evaluation), and a ring buffer of
  ``capacity`` student-generated rows (``x``, ``label``, ``mask``, ``segment_ids``,
  ``positions``; the oldest are overwritten first, as the reference's
  ``deque(maxlen=capacity)``). At step :math:`n` (1-based, of :math:`N`) with
  :math:`u \sim U[0, 1)` and the fresh-sample probability
  :math:`\rho = \psi(1 - n/N)` (``'decreasing'``, the reference's default),
  :math:`\psi/2` (``'constant'``) or :math:`\psi n/N` (``'increasing'``):

  * :math:`u < \rho`, or :math:`u < \psi` while the buffer is not full: the student
    samples the batch's continuations; they are trained on and pushed to the buffer;
  * else :math:`u < \psi`: ``batch_size`` distinct rows drawn uniformly from the
    buffer are trained on;
  * else: the dataset's batch.

  After each evaluation :func:`distillm_threshold` raises :math:`\psi`. The keys:
  ``coin, draw, pick = jax.random.split(step key, 3)``.

  Args:
    student: the student's :class:`Sampler`.
    capacity: rows the buffer holds (``>= batch_size``).
    batch_size: the global batch.
    seq_len: ``L``, the rows' length.
    num_steps: :math:`N`.
    init_threshold: :math:`\psi` before the first raise.
    threshold_step: what a raise adds to :math:`\psi` (capped at 1).
    loss_eps: how much the validation loss must rise to raise :math:`\psi`.
    replay_ratio: ``'decreasing'``, ``'constant'`` or ``'increasing'``.

  Returns:
    A :class:`Policy` with a state; its metrics ``on_policy/student`` (fresh samples)
    and ``on_policy/replay`` (a replayed batch) are 1 on such steps, and
    ``on_policy/threshold`` is :math:`\psi`.

  References:
    Ko et al. DistiLLM: Towards Streamlined Distillation for Large Language Models.
    ICML 2024, Section 3.2 (adaptive off-policy approach). jongwooko/distillm,
    ``finetune.py`` (``finetune``: the branch on ``r``, ``samp_threshold`` and the
    update after ``evaluate``) and ``distillm/buffer.py`` (``ReplayBuffer``).
  """
  if replay_ratio not in REPLAY_RATIOS:
    raise ValueError(f'replay_ratio must be one of {REPLAY_RATIOS}, got {replay_ratio!r}')
  if capacity < batch_size:
    raise ValueError(f'the replay buffer ({capacity} rows) must hold a batch ({batch_size})')

  sample_student = student

  def init():
    rows = {k: jnp.zeros((capacity, seq_len), bool if k == 'mask' else jnp.int32)
            for k in ROW_KEYS}
    return {'buffer': rows, 'filled': jnp.zeros((), jnp.int32),
            'next': jnp.zeros((), jnp.int32),
            'threshold': jnp.asarray(init_threshold, jnp.float32),
            'reference': jnp.asarray(jnp.nan, jnp.float32)}

  def fresh_probability(psi, step):
    progress = (jnp.asarray(step, jnp.float32) + 1.0) / num_steps
    if replay_ratio == 'constant':
      return 0.5 * psi
    if replay_ratio == 'increasing':
      return psi * progress
    return psi * (1.0 - progress)

  def push(state, batch):
    slots = (state['next'] + jnp.arange(batch_size)) % capacity
    rows = {k: state['buffer'][k].at[slots].set(batch[k].astype(state['buffer'][k].dtype))
            for k in ROW_KEYS}
    return dict(state, buffer=rows, next=(state['next'] + batch_size) % capacity,
                filled=jnp.minimum(state['filled'] + batch_size, capacity))

  def apply(batch, state, *, student: Any, teacher: Any = None, step, rng):
    del teacher
    coin, draw, pick = jax.random.split(rng, 3)
    u = jax.random.uniform(coin)
    psi = state['threshold']
    fresh = jnp.logical_or(u < fresh_probability(psi, step),
                           jnp.logical_and(u < psi, state['filled'] < capacity))
    replay = jnp.logical_and(jnp.logical_not(fresh), u < psi)

    def dataset(b, s):
      return b, s

    def generated(b, s):
      out = sample_student(student, b['prompt_ids'], b['prompt_mask'], draw)
      b = continue_prompts(b, out.tokens, out.mask)
      return b, push(s, b)

    def replayed(b, s):
      rows = jax.random.choice(pick, capacity, (batch_size,), replace=False)
      return dict(b, **{k: jnp.take(s['buffer'][k], rows, axis=0) for k in ROW_KEYS}), s

    branch = jnp.where(fresh, 1, jnp.where(replay, 2, 0))
    batch, state = jax.lax.switch(branch, (dataset, generated, replayed), batch, state)
    return batch, state, {'on_policy/student': _fraction(fresh),
                          'on_policy/replay': _fraction(replay),
                          'on_policy/threshold': _fraction(psi)}

  def evaluated(state, metrics):
    threshold, reference = distillm_threshold(state['threshold'], state['reference'],
                                              metrics['loss'], step=threshold_step,
                                              eps=loss_eps)
    return dict(state, threshold=threshold, reference=reference)

  return Policy(keys=PROMPT_KEYS, init=init, apply=apply, evaluated=evaluated)


def distillm_threshold(threshold, reference, loss, *, step: float = 0.1, eps: float = 0.1):
  r"""DistiLLM's raise of the student-output threshold after an evaluation.

  .. math::

    \text{if } L_{\mathrm{val}} \ge L_{\mathrm{ref}} + \epsilon:\quad
    \psi \leftarrow \min(\psi + \delta, 1),\quad L_{\mathrm{ref}} \leftarrow L_{\mathrm{val}}

  :math:`L_{\mathrm{ref}}` moves only on a raise (as in the reference code). Before any
  reference (NaN) the validation loss becomes it: the reference code evaluates once
  before training, the engine's first evaluation comes after ``eval_every`` steps.

  Args:
    threshold: :math:`\psi`.
    reference: :math:`L_{\mathrm{ref}}`, NaN for none yet.
    loss: :math:`L_{\mathrm{val}}`, this evaluation's loss.
    step: :math:`\delta`.
    eps: :math:`\epsilon`.

  Returns:
    ``(threshold, reference)``, float32.

  >>> t, r = distillm_threshold(0.0, float('nan'), 3.0)
  >>> float(t), float(r)
  (0.0, 3.0)
  >>> t, r = distillm_threshold(t, r, 3.05)      # not 0.1 above the reference: no raise
  >>> float(t), float(r)
  (0.0, 3.0)
  >>> t, r = distillm_threshold(t, r, 3.2)
  >>> round(float(t), 4), round(float(r), 4)
  (0.1, 3.2)
  """
  threshold = jnp.asarray(threshold, jnp.float32)
  reference = jnp.asarray(reference, jnp.float32)
  loss = jnp.asarray(loss, jnp.float32)
  first = jnp.isnan(reference)
  rise = jnp.logical_and(jnp.logical_not(first), loss >= reference + eps)
  threshold = jnp.where(rise, jnp.minimum(threshold + step, 1.0), threshold)
  reference = jnp.where(jnp.logical_or(first, rise), loss, reference)
  return threshold, reference


# --------------------------------------------------------------------------- the state

def carry_policy_state(objective: Objective, policy: Policy) -> Objective:
  """The objective with the policy's state in its state (``state[STATE_KEY]``): made by
  its ``init``, passed through its ``apply`` as the policy left it.

  Raises:
    ValueError: a loss term is named :data:`STATE_KEY`.
  """
  if STATE_KEY in objective.names:
    raise ValueError(f'a loss term may not be named {STATE_KEY!r} in an on-policy run')

  def init(rng, inputs):
    params, state = objective.init(rng, inputs)
    return params, dict(state, **{STATE_KEY: policy.init()})

  def apply(params, state, inputs):
    own = {k: v for k, v in state.items() if k != STATE_KEY}
    loss, new, metrics = objective.apply(params, own, inputs)
    return loss, dict(new, **{STATE_KEY: state[STATE_KEY]}), metrics

  return objective._replace(init=init, apply=apply)


def policy_state(train_state) -> Any:
  """The policy's part of a train state."""
  return train_state.loss_state[STATE_KEY]


def with_policy_state(train_state, state):
  """``train_state`` with the policy's part replaced by ``state``."""
  return train_state.replace(loss_state=dict(train_state.loss_state, **{STATE_KEY: state}))


def run(policy: Policy, batch: Batch, train_state, *, teacher=None) -> tuple[Batch, Any, dict]:
  """One policy application at ``train_state``'s step: the student of ``train_state``
  samples with :func:`step_key`; returns ``(batch, train state, metrics)`` with the
  policy's new state in the train state."""
  batch, state, metrics = policy.apply(
      batch, policy_state(train_state),
      student=(train_state.params['student'], train_state.model_state), teacher=teacher,
      step=train_state.step, rng=step_key(train_state))
  return batch, with_policy_state(train_state, state), metrics


def decoder_config(model, *, num_classes: int, input_shape: Sequence[int]
                   ) -> DecoderConfig | None:
  """The :class:`~kdjax.models.DecoderConfig` of a model config group (``name``,
  ``kwargs``, ``dtype``), built abstractly; None when the model is not a decoder."""
  from flax import nnx

  from kdjax.models import create
  get = model.get if hasattr(model, 'get') else (lambda k, d=None: getattr(model, k, d))
  kwargs = get('kwargs') or {}
  kwargs = dict(kwargs.to_dict() if hasattr(kwargs, 'to_dict') else kwargs)
  module = nnx.eval_shape(lambda: create(get('name'), num_classes=num_classes,
                                         input_shape=tuple(input_shape),
                                         dtype=jnp.dtype(get('dtype') or 'float32'), **kwargs))
  config = getattr(module, 'config', None)
  return config if isinstance(config, DecoderConfig) else None


def sampler_from_config(apply: Callable[..., Any], decoder: DecoderConfig, options,
                        stop_tokens: Sequence[int]) -> Sampler:
  """A :class:`Sampler` from ``config.on_policy``'s sampling fields (``max_new_tokens``,
  ``temperature``, ``top_k`` (0: none), ``top_p`` (1: none))."""
  top_k = int(options.top_k)
  top_p = float(options.top_p)
  return Sampler(apply, decoder, int(options.max_new_tokens), float(options.temperature),
                 top_k or None, None if top_p >= 1.0 else top_p,
                 tuple(int(t) for t in stop_tokens))


def from_config(config, spec, *, apply, teacher, data) -> Policy:
  """The policy of ``config.on_policy``, after the checks that need the data and the
  models: prompt records in the train split, a decoder student (and teacher, for
  ``seq_kd``), prompts plus ``max_new_tokens`` within its context and within the rows."""
  options = config.on_policy
  prompt_len, seq_len = _prompt_shape(config, data)
  new_tokens = int(options.max_new_tokens)
  decoders = {'student': decoder_config(config.model, num_classes=spec.num_classes,
                                                   input_shape=spec.input_shape)}
  seq_kd = options.method == 'gkd' and bool(options.seq_kd)
  if seq_kd:
    if teacher is None:
      raise UserError('config.on_policy.seq_kd samples from the teacher: set '
                      'config.teacher.workdir or config.teacher.hf_path')
    # The teacher's context is its own (its max_positions, or the rows it was trained
    # on), not this run's rows: its decoder as built for that many tokens.
    context = teacher_lib.context_length(teacher)
    decoders['teacher'] = decoder_config(
        teacher.config.model, num_classes=teacher.num_classes,
        input_shape=(context,) if context else spec.input_shape)
  for who, decoder in decoders.items():
    if decoder is None:
      raise UserError(f'on-policy distillation samples from the {who}, which must be a decoder '
                      f'language model (llama, gpt2, qwen2 or decoder)')
    check_context(prompt_len, new_tokens, decoder.max_positions, who=f'the {who}\'s',
                  fix='lower config.on_policy.max_new_tokens or use shorter prompts')
  if new_tokens > seq_len - prompt_len:
    raise UserError(f'config.on_policy.max_new_tokens={new_tokens} is more than the '
                    f'{seq_len - prompt_len} continuation tokens of a '
                    f'{config.data.train_split} row; lower it')
  stops = tuple(options.stop_tokens)
  student = sampler_from_config(apply, decoders['student'], options, stops)
  if options.method == 'gkd':
    teacher_sampler = (sampler_from_config(teacher.apply, decoders['teacher'],
                                                      options, stops) if seq_kd else None)
    return gkd(student, lmbda=float(options.lmbda), teacher=teacher_sampler)
  return distillm(
      student, capacity=int(options.capacity), batch_size=int(config.batch_size),
      seq_len=seq_len, num_steps=int(config.num_steps),
      init_threshold=float(options.init_threshold),
      threshold_step=float(options.threshold_step), loss_eps=float(options.loss_eps),
      replay_ratio=str(options.replay_ratio))


def _prompt_shape(config, data) -> tuple[int, int]:
  """``(P, L)`` of the train split's prompt records; a split without prompts is refused."""
  if data is not None:
    first = {k: np.asarray(v[0]) for k, v in data.train.items()}
  else:
    source = kdata.load_source(config.data.name, config.data.train_split,
                               data_dir=config.data.data_dir or None)
    first = {k: np.asarray(v) for k, v in source[0].items()}
  if 'prompt_ids' not in first or not np.any(first.get('prompt_mask', 0)):
    raise UserError(f'on-policy distillation continues prompts, and '
                    f'{config.data.name}:{config.data.train_split} has none; use a prompt '
                    'split such as --config.data.train_split=prompts_train')
  length = first['x'] if 'x' in first else first['input_ids']
  return int(first['prompt_ids'].shape[-1]), int(length.shape[-1])
