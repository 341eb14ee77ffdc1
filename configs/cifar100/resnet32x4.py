"""CIFAR-100 teacher: ResNet32x4 from labels (mdistiller's / CRD's recipe, 240 epochs).

The recipe of configs/cifar10/resnet32x4.py (`recipe('cifar100', arg)`): SGD 0.05,
momentum 0.9, weight decay 5e-4, batch 64, 240 epochs, rate x0.1 at epochs 150/180/210
(megvii-research/mdistiller ``configs/cifar100/vanilla.yaml``). Reads
`tfds.data_source('cifar100')`: needs the data prepared or internet once.

    kdjax train --config configs/cifar100/resnet32x4.py --workdir workdirs/c100_r32x4
    kdjax train --config configs/cifar100/resnet32x4.py:tiny ...   # a smoke run (tests use mock data)
"""

from kdjax.config import sibling

cifar10 = sibling(__file__, '../cifar10/resnet32x4')   # the shared CIFAR recipe

STEPS_PER_EPOCH = cifar10.STEPS_PER_EPOCH   # CIFAR-100 also has 50,000 training images
tiny = cifar10.tiny


def get_config(arg=None):
  return cifar10.recipe('cifar100', arg)
