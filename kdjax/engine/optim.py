"""Optimizers from the config (optax)."""

from __future__ import annotations

import optax


def make_optimizer(cfg, num_steps: int) -> optax.GradientTransformation:
  """An optax optimizer from ``config.optimizer``.

  >>> import ml_collections
  >>> cfg = ml_collections.ConfigDict(dict(name='sgd', learning_rate=0.1, schedule='cosine',
  ...     warmup_steps=10, weight_decay=5e-4, momentum=0.9, grad_clip_norm=0.0))
  >>> tx = make_optimizer(cfg, 100)
  """
  lr = float(cfg.learning_rate)
  if cfg.schedule == 'constant':
    schedule = optax.constant_schedule(lr)
    if cfg.warmup_steps:
      schedule = optax.join_schedules(
          [optax.linear_schedule(0.0, lr, cfg.warmup_steps), schedule], [cfg.warmup_steps])
  elif cfg.schedule == 'cosine':
    schedule = optax.warmup_cosine_decay_schedule(
        0.0 if cfg.warmup_steps else lr, lr, max(int(cfg.warmup_steps), 0),
        max(num_steps, int(cfg.warmup_steps) + 1), end_value=0.0)
  elif cfg.schedule == 'step':
    # Multiply the rate by decay_factor at each of decay_steps (CIFAR recipes).
    schedule = optax.piecewise_constant_schedule(
        lr, {int(s): float(cfg.decay_factor) for s in cfg.decay_steps})
    if cfg.warmup_steps:
      schedule = optax.join_schedules(
          [optax.linear_schedule(0.0, lr, cfg.warmup_steps), schedule], [cfg.warmup_steps])
  else:
    raise ValueError(f'unknown optimizer.schedule {cfg.schedule!r}; use constant, cosine or step')
  if cfg.name == 'adam':
    tx = optax.adam(schedule)
    if cfg.weight_decay:
      tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay), tx)
  elif cfg.name == 'adamw':
    tx = optax.adamw(schedule, weight_decay=cfg.weight_decay)
  elif cfg.name == 'sgd':
    tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay) if cfg.weight_decay else optax.identity(),
                     optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=False))
  else:
    raise ValueError(f'unknown optimizer.name {cfg.name!r}; use adam, adamw or sgd')
  if cfg.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  return tx
