"""CIFAR-10 distillation: ResNet32x4 teacher -> ResNet8x4 student (Hinton KD, T=4).

The recipe of the CRD / mdistiller benchmarks: SGD 0.05, momentum 0.9, weight decay
5e-4, batch 64, 240 epochs, rate x0.1 at epochs 150/180/210, loss 0.1 CE + 0.9 KD (mdistiller's
KD.LOSS.CE_WEIGHT and KD_WEIGHT; RepDistiller's `-r 0.1 -a 0.9`).

    kdjax distill --config configs/cifar10/resnet8x4_kd.py --workdir workdirs/cifar_kd \
        --config.teacher.workdir=workdirs/cifar_r32x4
"""

from kdjax.config import sibling

resnet32x4 = sibling(__file__, 'resnet32x4')  # the shared CIFAR-10 recipe


def get_config(arg=None):
  c = resnet32x4.get_config(None)
  c.model.name = 'resnet8x4'
  c.loss.terms = {'ce': {'weight': 0.1}, 'kd': {'weight': 0.9, 'temperature': 4.0}}
  if arg == 'tiny':
    resnet32x4.tiny(c)
    c.model.kwargs = {'widths': (8, 8, 16, 16)}
  elif arg:
    raise ValueError(f'unknown variant {arg!r}; use tiny or nothing')
  return c
