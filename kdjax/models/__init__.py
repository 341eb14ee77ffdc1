"""The kdjax model zoo: Flax NNX classifiers used through a pure functional core.

``create(name, num_classes=..., input_shape=...)`` builds a registered model;
``functional(module)`` turns it into ``(apply, params, state)``. Every model
returns a :class:`ModelOutput` whose ``features`` hold ``'stage1'..'stageN'``
and ``'penultimate'``. ``char_lstm`` / ``char_gru`` (``kdjax.models.rnn``) are
next-character models over integer ids.
"""

from kdjax.models.base import ModelOutput
from kdjax.models.base import count_params
from kdjax.models.base import functional
from kdjax.models.cnn import CNN
from kdjax.models.mlp import MLP
from kdjax.models.registry import create
from kdjax.models.registry import from_config
from kdjax.models.registry import names
from kdjax.models.registry import register
from kdjax.models.rnn import CharRNN
from kdjax.models.resnet_cifar import BasicBlock
from kdjax.models.resnet_cifar import ResNetCifar
from kdjax.models.vit import ViT
from kdjax.models.wide_resnet import WideBlock
from kdjax.models.wide_resnet import WideResNet
