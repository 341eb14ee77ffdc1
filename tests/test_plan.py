"""``kdjax plan``: the run's step compiled ahead of time for a TPU slice (libtpu's abstract
devices) and for N GPUs (N CPU devices), on ``configs/lm/plan_7b_to_1b.py:tiny``."""

import json
import math

import pytest

from kdjax import plan as plan_lib
from kdjax.config import load_config
from kdjax.errors import UserError

TINY = 'configs/lm/plan_7b_to_1b.py:tiny'
KEYS = ('fits', 'peak_bytes_per_chip', 'hbm_bytes_per_chip', 'flops_per_step',
        'estimated_step_seconds', 'param_bytes', 'optimizer_bytes', 'teacher_bytes',
        'temp_bytes', 'collectives', 'mfu')


@pytest.fixture(scope='module')
def tpu_plan(root):
  """One compile for a v5e:2x2 slice, in this process (libtpu from
  ``<sys.prefix>/libtpu`` or ``$KDJAX_LIBTPU_PATH``; ``make test`` installs it)."""
  try:
    plan_lib.libtpu_library()
  except UserError as e:
    pytest.fail(str(e))
  config = load_config(f'{root}/{TINY}')
  return plan_lib.plan(config, topology='v5e:2x2'), config


def test_tpu_plan_fits_with_plausible_figures(tpu_plan, tmp_path):
  p, config = tpu_plan
  path = tmp_path / 'plan.json'
  plan_lib.write_json(p, str(path))
  got = json.loads(path.read_text())
  assert set(KEYS) <= set(got)
  assert got['fits'] is True and got['devices'] == 4 and got['mesh'] == {'data': 2, 'fsdp': 2}
  assert 0 < got['peak_bytes_per_chip'] <= got['hbm_bytes_per_chip'] == 16 * 2**30
  assert got['flops_per_step'] > 0 and got['estimated_step_seconds'] > 0
  assert got['flops_per_step_global'] == pytest.approx(4 * got['flops_per_step'])
  # float32 parameters, nearly all split over fsdp=2 (the norms' scales replicated)
  full = 4 * got['student_params']
  assert full / 2 <= got['param_bytes'] <= 0.6 * full
  assert got['optimizer_bytes'] == pytest.approx(2 * got['param_bytes'], rel=0.05)  # adam m, v
  # the teacher's bfloat16 weights, split likewise
  assert got['teacher_bytes'] <= 0.6 * 2 * got['teacher_params']
  # FSDP gathers the weights: the optimized program has all-gathers
  assert got['collectives']['all-gather']['count'] > 0
  rows, seq = int(config.batch_size), int(config.plan.seq_len)
  assert got['tokens_per_step'] == rows * seq
  assert 'fits: peak' in plan_lib.format_plan(p).splitlines()[0]


def test_devices_mode_plans_for_gpus(cli, root, tmp_path):
  path = tmp_path / 'plan.json'
  out = cli(['plan', '--config', f'{root}/{TINY}', '--devices', '2', '--gpu', 'h100',
             '--mesh', 'data=1,fsdp=2', '--json', str(path)])
  got = json.loads(path.read_text())
  assert got['fits'] is True and got['devices'] == 2 and got['chip']['name'] == 'h100'
  assert got['mesh'] == {'data': 1, 'fsdp': 2}
  assert 0 < got['peak_bytes_per_chip'] <= got['hbm_bytes_per_chip'] == 80 * 10**9
  assert got['flops_per_step'] > 0 and got['estimated_step_seconds'] > 0
  full = 4 * got['student_params']
  assert full / 2 <= got['param_bytes'] <= 0.6 * full
  assert got['collectives']['all-gather']['count'] > 0
  assert out.stdout.startswith('fits: peak')


def test_a_plan_over_memory_exits_2_with_one_line(kdjax_main, root, tmp_path):
  path = tmp_path / 'plan.json'
  out = kdjax_main(['plan', '--config', f'{root}/{TINY}', '--topology', 'v5e:2x2',
                    '--hbm-gib', '1e-6', '--json', str(path)], check=False)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith('kdjax: plan does not fit: peak'), out.stderr
  got = json.loads(path.read_text())
  assert got['fits'] is False and got['peak_bytes_per_chip'] > got['hbm_bytes_per_chip']
  assert got['largest_buffers'] and 'DOES NOT FIT' in out.stdout.splitlines()[0]


def test_missing_libtpu_is_one_line_naming_the_install(kdjax_main, root, tmp_path, monkeypatch):
  monkeypatch.setenv(plan_lib.LIBTPU_ENV, str(tmp_path / 'nowhere'))
  path = tmp_path / 'plan.json'
  out = kdjax_main(['plan', '--config', f'{root}/{TINY}', '--topology', 'v5e:2x2',
                    '--json', str(path)], check=False)
  assert out.returncode == 2
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and 'pip install --target' in lines[0], out.stderr
  assert str(tmp_path / 'nowhere') in lines[0] and plan_lib.LIBTPU_PIN in lines[0]
  assert not path.exists()


def test_libtpu_is_found_in_its_folder_forms(tmp_path):
  lib = tmp_path / 'libtpu' / 'libtpu.so'
  lib.parent.mkdir()
  lib.write_bytes(b'')
  for given in (tmp_path, lib.parent, lib):   # pip --target folder, the package, the file
    assert plan_lib.libtpu_library(str(given)) == str(lib)


def test_bad_targets_are_user_errors():
  with pytest.raises(UserError, match='GENERATION:SHAPE'):
    plan_lib.tpu_target('v9x:2x2')
  with pytest.raises(UserError, match='name=size'):
    plan_lib.parse_mesh('data:4')
  with pytest.raises(UserError, match='--gpu'):
    plan_lib.gpu_target(1, 'tpu')


def test_collective_bytes_ring_model():
  hlo = '\n'.join([
      '%a = f32[1024]{0} all-reduce(f32[1024]{0} %x), replica_groups={{0,1,2,3}}',
      '%r = f32[256]{0} reduce-scatter(f32[1024]{0} %y), replica_groups=[1,4]<=[4]',
      '%s = (f32[8]{0}, f32[32]{0}) all-gather-start(f32[8]{0} %z), replica_groups={{0,1,2,3}}',
      '%d = f32[32]{0} all-gather-done((f32[8]{0}, f32[32]{0}) %s)',
  ])
  got = plan_lib.collective_bytes(hlo)
  assert got['all-reduce'] == {'count': 1, 'bytes': 4096, 'link_bytes': 2 * 4096 * 3 / 4}
  assert got['reduce-scatter'] == {'count': 1, 'bytes': 4096, 'link_bytes': 4096 * 3 / 4}
  assert got['all-gather'] == {'count': 1, 'bytes': 128, 'link_bytes': 128 * 3 / 4}


def test_chip_table_units():
  v5e = plan_lib.CHIPS['v5e']
  assert v5e.hbm_bytes == 16 * 2**30 and math.isclose(v5e.peak_flops, 197e12)
  assert set(plan_lib.TPUS) | set(plan_lib.GPUS) == set(plan_lib.CHIPS)
