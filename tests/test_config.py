"""Config files and command-line overrides."""

import textwrap

import ml_collections
import pytest

from kdjax.config import apply_override, load_config, split_overrides
from kdjax.engine.config import base_config
from kdjax.errors import UserError


def test_overrides_types_and_unknown_keys():
  c = base_config()
  apply_override(c, 'num_steps', '400')
  apply_override(c, 'optimizer.learning_rate', '3e-3')
  apply_override(c, 'optimizer.learning_rate', '1')          # int accepted for a float
  apply_override(c, 'progress', 'false')
  apply_override(c, 'loss.terms', "{'kd': {'weight': 1.0, 'temperature': 2.0}}")
  apply_override(c, 'loss.terms.kd', "{'weight': 0.5}")
  apply_override(c, 'mesh', "[('data', 2)]")
  assert c.num_steps == 400 and c.optimizer.learning_rate == 1.0 and c.progress is False
  assert c.loss.terms.kd.weight == 0.5 and list(c.mesh) == [('data', 2)]
  with pytest.raises(UserError, match='unknown config key'):
    apply_override(c, 'num_stepz', '3')
  with pytest.raises(UserError, match='unknown config key'):
    apply_override(c, 'optimizerr.lr', '3')
  with pytest.raises(UserError, match='takes a int'):
    apply_override(c, 'num_steps', 'many')
  with pytest.raises(UserError, match='takes a int'):
    apply_override(c, 'num_steps', '1.5')
  with pytest.raises(UserError, match='true or false'):
    apply_override(c, 'progress', '3')


def test_split_overrides():
  rest, ov = split_overrides(['train', '--config', 'a.py', '--config.seed=3', '--config.x.y', '4'])
  assert rest == ['train', '--config', 'a.py'] and ov == [('seed', '3'), ('x.y', '4')]


def test_load_config_file(tmp_path):
  path = tmp_path / 'c.py'
  path.write_text(textwrap.dedent('''
      import ml_collections
      def get_config(arg=None):
        c = ml_collections.ConfigDict({'a': 1, 'v': arg or ''})
        if arg not in (None, 'tiny'):
          raise ValueError('unknown variant')
        return c
  '''))
  assert load_config(f'{path}:tiny').v == 'tiny'
  assert load_config(str(path), [('a', '5')]).a == 5
  with pytest.raises(UserError, match='not found'):
    load_config(str(tmp_path / 'missing.py'))
  with pytest.raises(UserError, match='unknown variant'):
    load_config(f'{path}:huge')


@pytest.mark.parametrize('name', ['mnist1d/teacher.py', 'mnist1d/student_baseline.py', 'mnist1d/kd.py',
                                  'digits/teacher.py', 'digits/student_baseline.py', 'digits/kd.py',
                                  'cifar10/resnet32x4.py', 'cifar10/resnet8x4_kd.py',
                                  'cifar10/resnet8x4_dkd.py', 'mnist1d/dkd.py', 'mnist1d/dml.py',
                                  'digits/dml.py', 'lm/teacher.py', 'lm/student.py',
                                  'lm/token_kd.py', 'lm/minilm.py', 'lm/gkd.py', 'lm/distillm.py',
                                  'lm/taid.py', 'lm/cached_kd.py', 'lm/seq_kd.py'])
def test_shipped_configs_have_tiny(name):
  import os
  root = os.path.join(os.path.dirname(__file__), '..', 'configs')
  c = load_config(os.path.join(root, name) + ':tiny')
  assert isinstance(c, ml_collections.ConfigDict) and c.num_steps <= 200
