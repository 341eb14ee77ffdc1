"""Bad input: every numeric field of every shipped config, out of range, is refused.

For each config file under ``configs/`` and each number in it (nested groups and lists
included), the test writes a config that loads the shipped one and sets that number to
``-1`` (``-1.0``), and for a float also NaN and infinity, then runs the command that
config is for (``train`` / ``distill``, ``cache build``, ``fed run``, ``fed sweep``)
through ``kdjax.cli.main``. Each run must exit with code 2, print one line on stderr that
names the field, show no traceback, and write nothing: its workdir must not exist.

The few numbers where such a value means something are listed in ``ALLOWED``.
A handful of cases also go through a real ``python -m kdjax`` subprocess.
"""

import math
import os
import textwrap

import ml_collections
import pytest

from kdjax.cli import main as kdjax_main
from kdjax.config import load_config_file

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
CONFIGS = os.path.join(ROOT, 'configs')

# (config file, command): every shipped config, with the command it is run by.
SHIPPED = [
    ('mnist1d/teacher.py', ['train']), ('mnist1d/student_baseline.py', ['train']),
    ('mnist1d/kd.py', ['distill']), ('mnist1d/kd.py', ['cache', 'build']),
    ('digits/teacher.py', ['train']), ('digits/student_baseline.py', ['train']),
    ('digits/kd.py', ['distill']),
    ('cifar10/resnet32x4.py', ['train']), ('cifar10/resnet8x4_kd.py', ['distill']),
    ('fed/mnist1d_fedavg.py', ['fed', 'run']), ('fed/mnist1d_hetero.py', ['fed', 'run']),
    ('fed/shakespeare_fedavg.py', ['fed', 'run']), ('fed/mnist1d_sweep.py', ['fed', 'sweep']),
    ('mnist1d/kdcl.py', ['train']), ('mnist1d/one.py', ['train']),
    ('mnist1d/multi_teacher.py', ['distill']),
    ('mnist1d/takd.py', ['distill']), ('mnist1d/born_again.py', ['distill']),
    ('digits/takd.py', ['distill']), ('digits/born_again.py', ['distill']),
    ('mnist1d/curriculum.py', ['distill']), ('mnist1d/layerwise.py', ['distill']),
    ('digits/curriculum.py', ['distill']), ('digits/layerwise.py', ['distill']),
    ('mnist1d/bdkd_online.py', ['train']), ('digits/bdkd_online.py', ['train']),
    ('mnist1d/mst_distill.py', ['distill']),
]

# Numbers where an out-of-range-looking value is meaningful: a mesh axis of size -1
# takes every device; a sweep's alpha of infinity is the IID partition.
ALLOWED = {('mesh', -1), ('grid.alpha', math.inf)}


def numbers(tree, prefix=''):
  """``(dotted path, index in a list or None, value)`` of every number in a config."""
  items = tree.items() if isinstance(tree, (dict, ml_collections.ConfigDict)) else []
  for key, value in items:
    path = f'{prefix}.{key}' if prefix else str(key)
    if isinstance(value, bool) or value is None or isinstance(value, str):
      continue
    if isinstance(value, (int, float)):
      yield path, None, value
    elif isinstance(value, (dict, ml_collections.ConfigDict)):
      yield from numbers(value, path)
    elif isinstance(value, (list, tuple)):
      for i, v in enumerate(value):
        if isinstance(v, (dict, ml_collections.ConfigDict)):
          yield from numbers(v, f'{path}[{i}]')
        elif isinstance(v, (list, tuple)):
          for j, w in enumerate(v):
            if isinstance(w, (int, float)) and not isinstance(w, bool):
              yield f'{path}[{i}]', j, w
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
          yield path, i, v


def bad_values(value):
  if isinstance(value, float):
    return [-1.0, math.nan, math.inf]
  return [-1]


def cases():
  out = []
  for file, command in SHIPPED:
    config = load_config_file(os.path.join(CONFIGS, file))
    for path, index, value in numbers(config):
      for bad in bad_values(value):
        plain = path.split('[')[0]
        if any(plain == p and (bad == v or (isinstance(v, float) and math.isinf(v)
                                            and isinstance(bad, float) and math.isinf(bad)))
               for p, v in ALLOWED):
          continue
        out.append(pytest.param(file, command, path, index, bad,
                                id=f'{file}:{" ".join(command)}:{path}'
                                   f'{"" if index is None else f"[{index}]"}={bad}'))
  return out


def _setter(path: str, index, bad) -> str:
  """The line of the generated config that sets the number (``[i]`` steps into lists)."""
  value = ('math.nan' if isinstance(bad, float) and math.isnan(bad)
           else 'math.inf' if bad == math.inf else repr(bad))
  if index is None:
    return f'set_(c, {path!r}, {value})'
  return f'set_(c, {path!r}, replace(get_(c, {path!r}), {index}, {value}))'


PROGRAM = textwrap.dedent('''
    import math
    import re
    import ml_collections
    from kdjax.config import load_config_file

    def replace(seq, i, v):
      out = list(seq)
      out[i] = v
      return type(seq)(out) if isinstance(seq, tuple) else out

    def get_(c, path):
      node = c
      for p in re.findall(r'[^.\\[\\]]+', path):
        node = node[int(p)] if p.isdigit() else node[p]
      return node

    def set_(c, path, value):
      *parents, leaf = re.findall(r'[^.\\[\\]]+', path)
      node = get_(c, '.'.join(parents))
      with node.ignore_type():
        node[leaf] = value

    def get_config(arg=None):
      c = load_config_file({shipped!r})
      {setter}
      return c
''')


def _write_config(tmp_path, file, path, index, bad) -> str:
  cfg = tmp_path / 'bad_config.py'
  cfg.write_text(PROGRAM.format(shipped=os.path.join(CONFIGS, file),
                                setter=_setter(path, index, bad)))
  return str(cfg)


def _argv(command, config, workdir):
  return [*command, '--config', config, '--workdir', workdir,
          *(['--no-progress'] if command[0] == 'fed' else [])]


def _check_refused(code, err, workdir, field):
  lines = err.strip().splitlines()
  assert code == 2, (code, err[-2000:])
  assert 'Traceback' not in err, err[-2000:]
  assert len(lines) == 1 and lines[0].startswith('kdjax: error: '), err[-2000:]
  assert field in lines[0], (field, lines[0])
  assert not os.path.exists(workdir), 'a refused run wrote its workdir'


@pytest.mark.parametrize('file,command,path,index,bad', cases())
def test_every_numeric_field_out_of_range_exits_2(tmp_path, capsys, file, command, path, index,
                                                   bad):
  config = _write_config(tmp_path, file, path, index, bad)
  workdir = str(tmp_path / 'run')
  code = kdjax_main(_argv(command, config, workdir))
  err = capsys.readouterr().err
  field = path.split('.')[-1].split('[')[0]
  _check_refused(code, err, workdir, field)


def test_the_walk_covers_the_fields_it_should():
  ids = {p.id for p in cases()}
  for want in ('mnist1d/teacher.py:train:optimizer.learning_rate=-1.0',
               'mnist1d/teacher.py:train:optimizer.learning_rate=nan',
               'mnist1d/kd.py:distill:loss.terms.kd.temperature=inf',
               'mnist1d/kd.py:cache build:batch_size=-1',
               'fed/mnist1d_fedavg.py:fed run:model.kwargs.hidden[1]=-1',
               'fed/mnist1d_hetero.py:fed run:client_models[1].kwargs.hidden[0]=-1',
               'fed/mnist1d_sweep.py:fed sweep:grid.seeds[1]=-1',
               'fed/mnist1d_sweep.py:fed sweep:grid.alpha[0]=nan',
               'fed/shakespeare_fedavg.py:fed run:optimizer.learning_rate=inf'):
    assert want in ids, want
  assert not any('mesh' in i for i in ids)
  assert len(ids) > 300


@pytest.mark.parametrize('args,field', [
    (['--epochs', '0'], 'epochs'), (['--epochs', '-1'], 'epochs'), (['--k', '0'], 'k'),
    (['--k', '-3'], 'k'), (['--chunk-size', '0'], 'chunk size'), (['--dtype', 'int4'], 'dtype'),
])
def test_cache_build_flags_out_of_range_exit_2(tmp_path, capsys, args, field):
  workdir = str(tmp_path / 'cache')
  code = kdjax_main(['cache', 'build', '--config', os.path.join(CONFIGS, 'mnist1d/kd.py'),
                   '--workdir', workdir, *args])
  _check_refused(code, capsys.readouterr().err, workdir, field)


def test_a_batch_larger_than_the_split(tmp_path, capsys, data_dir, paths):
  workdir = str(tmp_path / 'run')
  code = kdjax_main(['train', '--config', f"{paths['configs']}/mnist1d/teacher.py:tiny",
                   '--workdir', workdir, f"--config.data.name={paths['small']}",
                   f'--config.data.data_dir={data_dir}', '--config.batch_size=100000'])
  _check_refused(code, capsys.readouterr().err, workdir, 'batch_size 100000 is larger than')


def test_a_workdir_that_cannot_be_created(tmp_path, capsys):
  blocker = tmp_path / 'file'
  blocker.write_text('not a folder')
  for argv in (['train', '--config', os.path.join(CONFIGS, 'mnist1d/teacher.py:tiny')],
               ['fed', 'run', '--config', os.path.join(CONFIGS, 'fed/mnist1d_fedavg.py:tiny'),
                '--no-progress']):
    code = kdjax_main([*argv, '--workdir', str(blocker / 'run')])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert 'cannot create the workdir' in err and 'is not a directory' in err
  assert blocker.read_text() == 'not a folder'


@pytest.mark.parametrize('command,config', [
    (['train'], 'mnist1d/teacher.py:tiny'),
    (['fed', 'run', '--no-progress'], 'fed/mnist1d_fedavg.py:tiny'),
])
def test_a_damaged_config_json_is_refused_and_kept(tmp_path, capsys, command, config):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_text('{"seed": 0, "num_steps": ')   # cut by a crash
  code = kdjax_main([*command, '--config', os.path.join(CONFIGS, config), '--workdir',
                   str(workdir)])
  err = capsys.readouterr().err
  assert code == 2 and len(err.strip().splitlines()) == 1, err
  assert 'config.json is not valid JSON' in err
  assert (workdir / 'config.json').read_text() == '{"seed": 0, "num_steps": '
  assert os.listdir(workdir) == ['config.json']
  code = kdjax_main(['eval', '--workdir', str(workdir)])
  assert code == 2


@pytest.mark.parametrize('argv,field', [
    (['train', '--config', 'mnist1d/teacher.py', '--config.num_steps=0'], 'num_steps'),
    (['distill', '--config', 'mnist1d/kd.py', '--config.optimizer.learning_rate=0'],
     'learning_rate'),
    (['fed', 'run', '--config', 'fed/mnist1d_fedavg.py', '--config.eval_every=-5'], 'eval_every'),
    (['fed', 'sweep', '--config', 'fed/mnist1d_sweep.py', '--config.grid.seeds=[0, -1]'], 'seeds'),
    (['cache', 'build', '--config', 'mnist1d/kd.py', '--k', '0'], 'k'),
])
def test_the_real_command_refuses_in_one_line(cli, tmp_path, argv, field):
  """The same refusals through ``python -m kdjax`` in a subprocess."""
  workdir = str(tmp_path / 'run')
  i = argv.index('--config') + 1
  argv = [*argv[:i], os.path.join(CONFIGS, argv[i]), *argv[i + 1:], '--workdir', workdir]
  out = cli(argv, check=False)
  _check_refused(out.returncode, out.stderr, workdir, field)
  assert out.stdout == ''



def test_memory_banks_with_fewer_rows_than_the_split(tmp_path, capsys, data_dir, paths):
  # CRD's NCE objective keeps a bank row per training example: a split larger than
  # n_data would have its later ids clamped onto the last row inside the jitted step.
  cfg = tmp_path / 'crd.py'
  cfg.write_text(textwrap.dedent(f'''
      from kdjax.config import load_config_file

      def get_config(arg=None):
        c = load_config_file({os.path.join(CONFIGS, 'mnist1d/kd.py:tiny')!r})
        c.loss.terms = {{'crd': {{'weight': 1.0, 'objective': 'nce', 'n_data': 16,
                                  'nce_k': 4}}}}
        return c
  '''))
  workdir = str(tmp_path / 'run')
  code = kdjax_main(['distill', '--config', str(cfg), '--workdir', workdir,
                     f"--config.data.name={paths['small']}", f'--config.data.data_dir={data_dir}'])
  _check_refused(code, capsys.readouterr().err, workdir, 'loss.terms.crd.n_data is 16')
