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
from kdjax.models.base import model_kwargs
from kdjax.models.bert import BertConfig
from kdjax.models.bert import BertEncoder
from kdjax.models.bert import mean_pool_normalize
from kdjax.models.bert import sentence_embeddings
from kdjax.models.bert import sentence_tokenizer
from kdjax.models.bert import tokenize_texts
from kdjax.models.cnn import CNN
from kdjax.models.decoding import Generation
from kdjax.models.decoding import generate
from kdjax.models.decoding import generator
from kdjax.models.decoding import left_pad
from kdjax.models.decoding import sample
from kdjax.models.hf import Family
from kdjax.models.hf import HFTensor
from kdjax.models.hf import from_pretrained
from kdjax.models.hf import load_tokenizer
from kdjax.models.hf import save_pretrained
from kdjax.models.mlp import MLP
from kdjax.models.registry import create
from kdjax.models.registry import from_config
from kdjax.models.registry import names
from kdjax.models.registry import register
from kdjax.models.rnn import CharRNN
from kdjax.models.resnet_cifar import BasicBlock
from kdjax.models.resnet_cifar import ResNetCifar
from kdjax.models.transformer import Decoder
from kdjax.models.transformer import DecoderConfig
from kdjax.models.transformer import KVCache
from kdjax.models.transformer import init_cache
from kdjax.models.vit import ViT
from kdjax.models.wide_resnet import WideBlock
from kdjax.models.wide_resnet import WideResNet
