"""MNIST-1D student baseline: the MLP trained from labels only.

    kdjax train --config configs/mnist1d/student_baseline.py --workdir workdirs/baseline
    kdjax train --config configs/mnist1d/student_baseline.py:paper --workdir workdirs/mlp_paper

Variant 'paper': the MNIST-1D paper's MLP and recipe, transcribed from its code
(github.com/greydanus/mnist1d, notebooks/models.py `MLPBase` and notebooks/train.py
`get_model_args`/`train_model`, the same in the 2020 first commit's models.py and
train.py; the benchmark notebook notebooks/mnist1d-classification.ipynb sets
total_steps = 6000). Model: Linear(40, 100) -> ReLU, then a residual layer
h + ReLU(Linear(100, 100) h), then Linear(100, 10): 15,210 parameters. Recipe: Adam (no
weight decay), constant learning rate 1e-2, batch 100, 6000 steps, the test set scored
every 250 steps. The data is the paper's: kdjax's MNIST-1D train/test splits equal the
repository's frozen mnist1d_data.pkl. Differences that remain: kdjax shuffles the
training set every epoch (the paper's loop walks it in order), and its layers start
from LeCun-normal kernels and zero biases (PyTorch's default init is uniform in
+-1/sqrt(fan_in) for both). Paper: 68% test accuracy (Greydanus & Kobak, "Scaling down
deep learning with MNIST-1D", ICML 2024, arXiv:2011.14439; the repository README's
table); kdjax, 3 seeds: 67.9 +- 1.1% at the last step, 68.2 +- 1.0% at the best
evaluation (benchmarks/RESULTS.md, "MNIST-1D: the paper's models and recipe").
"""

from kdjax.engine.config import base_config


def get_config(arg=None):
  c = base_config()
  c.data.name = 'mnist1d'
  c.model.name = 'mlp'
  c.num_steps = 3000
  c.batch_size = 128
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 2e-3
  c.optimizer.weight_decay = 1e-4
  c.eval_every = 500
  c.checkpoint_every = 1000
  c.loss.terms = {'ce': {'weight': 1.0}}
  if arg == 'tiny':
    c.num_steps = 100
    c.eval_every = c.checkpoint_every = c.log_every = 50
    c.steps_per_call = 25
  elif arg == 'paper':
    c.model.kwargs.hidden = (100, 100)
    c.model.kwargs.residual = True
    c.num_steps = 6000
    c.batch_size = 100
    c.optimizer.name = 'adam'
    c.optimizer.learning_rate = 1e-2
    c.optimizer.weight_decay = 0.0
    c.optimizer.schedule = 'constant'
    c.optimizer.warmup_steps = 0
    c.eval_every = 250
    c.checkpoint_every = 1000
  elif arg:
    raise ValueError(f'unknown variant {arg!r}; use tiny, paper or nothing')
  return c
