"""MNIST-1D teacher: the 1-D CNN trained from labels.

    kdjax train --config configs/mnist1d/teacher.py --workdir workdirs/teacher
    kdjax train --config configs/mnist1d/teacher.py:tiny --workdir /tmp/t   # seconds
    kdjax train --config configs/mnist1d/teacher.py:paper --workdir workdirs/cnn_paper

Variant 'paper': the MNIST-1D paper's CNN and recipe, transcribed from its code
(github.com/greydanus/mnist1d, notebooks/models.py `ConvBase` and notebooks/train.py
`get_model_args`/`train_model`, the same in the 2020 first commit's models.py and
train.py; the benchmark notebook notebooks/mnist1d-classification.ipynb sets
total_steps = 6000). Model: three convs, 1 -> 25 -> 25 -> 25 channels, kernels 5, 3, 3,
stride 2, padding 1 (length 40 -> 19 -> 10 -> 5), ReLU, flatten (125) -> Linear(10):
5,210 parameters. Recipe: Adam (no weight decay), constant learning rate 1e-2, batch
100, 6000 steps, the test set scored every 250 steps. The data is the paper's: kdjax's
MNIST-1D train/test splits equal the repository's frozen mnist1d_data.pkl. Differences
that remain: kdjax shuffles the training set every epoch (the paper's loop walks it in
order), and its layers start from LeCun-normal kernels and zero biases (PyTorch's
default init is uniform in +-1/sqrt(fan_in) for both). Paper: 94% test accuracy
(Greydanus & Kobak, "Scaling down deep learning with MNIST-1D", ICML 2024,
arXiv:2011.14439; the repository README's table); kdjax, 3 seeds: 93.3 +- 0.5% at the
last step, 93.4 +- 0.6% at the best evaluation (benchmarks/RESULTS.md, "MNIST-1D: the
paper's models and recipe").
"""

from kdjax.engine.config import base_config


def get_config(arg=None):
  c = base_config()
  c.data.name = 'mnist1d'
  c.model.name = 'cnn1d'
  c.num_steps = 2000
  c.batch_size = 128
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 3e-3
  c.optimizer.weight_decay = 1e-4
  c.optimizer.warmup_steps = 100
  c.eval_every = 500
  c.checkpoint_every = 1000
  c.loss.terms = {'ce': {'weight': 1.0}}
  if arg == 'tiny':
    c.num_steps = 100
    c.eval_every = c.checkpoint_every = c.log_every = 50
    c.steps_per_call = 25
    c.optimizer.warmup_steps = 0
  elif arg == 'paper':
    c.model.kwargs.channels = (25, 25, 25)
    c.model.kwargs.kernel_sizes = (5, 3, 3)
    c.model.kwargs.strides = 2
    c.model.kwargs.padding = 1
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
