"""The student LM distilled from the teacher cache: sparse KD on per-token top-k rows (+ CE).

    kdjax cache build --config configs/lm/cached_kd.py --cache-dir workdirs/lm_cache \
        --config.teacher.workdir=workdirs/lm_teacher
    kdjax distill --config configs/lm/cached_kd.py --workdir workdirs/lm_cached_kd \
        --config.teacher.cache=workdirs/lm_cache
    # another k or codec: pass the same overrides to the build and the run
    #   --config.cache.k=64 --config.cache.codec=log3+ef

The teacher runs once (``kdjax cache build``): per token its top-k logits, classes and
log-sum-exp, stored with the codec ``config.cache.codec`` (``kdjax.cache.codec``; bytes per
token: ``kdjax cache inspect``). The run then trains the student alone: ``sparse_kd``
with the teacher's tail kept as one bin (``missing_mass='bucket'``: the student is asked
for the teacher's top-k probabilities and its total tail mass, not a tail shape the cache
does not know; exact at ``k`` = vocabulary, where it is the dense ``kd`` of
``token_kd.py``), with the same weights as ``token_kd.py``. On the demo's teacher, k = 16
gave 1.03x the live-teacher student's perplexity this way and 1.13x with the tail spread
uniformly (``benchmarks/lm_cache.py``). A run refuses a cache built with another ``k`` or codec
than its ``config.cache``. Variants: '' (the demo size), 'tiny' (tests), 'large'.

Variant 'sampled' (with a size: 'sampled,tiny'): Random-Sampling KD (Anshumann et al. 2025,
:mod:`kdjax.cache.sampled`). The cache keeps ``config.cache.samples`` classes per token
drawn from the teacher (the unique ids and their counts, Elias-Fano coded:
``kdjax.cache.codec.sample_bytes_per_token``), and the run trains with ``sampled_kd``,
the student's cross-entropy on the counts over ``N``: an unbiased estimate of the full KD
gradient, where a top-k cache drops the tail. Same weights as above::

    kdjax cache build --config configs/lm/cached_kd.py:sampled --cache-dir workdirs/lm_rs \
        --config.teacher.workdir=workdirs/lm_teacher
    kdjax distill --config configs/lm/cached_kd.py:sampled --workdir workdirs/lm_rs_kd \
        --config.teacher.cache=workdirs/lm_rs
"""

from kdjax.cache import cache_config
from kdjax.config import sibling

student = sibling(__file__, 'student')

K, CODEC = 32, 'int4+ef'             # 52 bytes per token at 2048 classes (f32+i32: 260)
SAMPLES = 64                          # 'sampled': 56 bytes per token at 2048 classes


def get_config(arg=None):
  c = student.get_config(student.teacher.size_variant(arg, others=('sampled',)))
  if 'sampled' in (arg or '').split(','):
    c.cache = cache_config(mode='sampled', samples=SAMPLES, proposal_temperature=1.0, seed=0)
    c.loss.terms = {
        'kd': {'loss': 'sampled_kd', 'weight': 0.5, 'temperature': 1.0},
        'ce': {'weight': 0.5},
    }
    return c
  c.cache = cache_config(mode='topk', k=K, codec=CODEC)
  c.loss.terms = {
      'kd': {'loss': 'sparse_kd', 'weight': 0.5, 'temperature': 1.0, 'missing_mass': 'bucket'},
      'ce': {'weight': 0.5},
  }
  return c
