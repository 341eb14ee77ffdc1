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


# libtpu's optimized HLO (trimmed from the 7B -> 1B plan, benchmarks/RESULTS.md): one
# asynchronous all-gather written three times (start fusion, continuation fusion, done
# fusion; one channel_id), its groups in the mesh form, a reduce-scatter as an all-reduce
# inside an all-reduce-scatter fusion, and a collective-permute-start with context scalars.
TPU_HLO = r"""
%fused_computation.918 (param_0.2926: bf16[256,11008]) -> (bf16[256,11008], bf16[4096,11008], s32[2], u32[]) {
  %param_0.2926 = bf16[256,11008]{1,0:T(8,128)(2,1)S(1)} parameter(0)
  %all-gather.432 = bf16[4096,11008]{1,0:T(8,128)(2,1)} all-gather(%param_0.2926), channel_id=39, replica_groups=mesh['axis_0'=16,'axis_1'=1,'axis_2'=16], device_ids=([16,16]T(1,0)) {'axis_0'}, dimensions={0}, use_global_device_ids=true
  ROOT %custom-call.114 = (bf16[256,11008]{1,0:T(8,128)(2,1)S(1)}, bf16[4096,11008]{1,0:T(8,128)(2,1)}, s32[2]{0:S(4)}, u32[]{:S(2)}) custom-call(%all-gather.432), custom_call_target="AsyncCollectiveStart"
}

%async_collective_fusion.920 (param_0.2848: bf16[256,11008], param_9.317: bf16[4096,11008], param_10.339: bf16[2,2048,4096]) -> (bf16[2,2048,11008], bf16[4096,11008]) {
  %param_0.2848 = bf16[256,11008]{1,0:T(8,128)(2,1)S(1)} parameter(0)
  %all-gather.434 = bf16[4096,11008]{1,0:T(8,128)(2,1)S(1)} all-gather(%param_0.2848), channel_id=39, replica_groups=mesh['axis_0'=16,'axis_1'=1,'axis_2'=16], device_ids=([16,16]T(1,0)) {'axis_0'}, dimensions={0}, use_global_device_ids=true
}

%fused_computation.897 (param_0.2851: bf16[256,11008], param_1.3007: bf16[4096,11008]) -> bf16[4096,11008] {
  %param_0.2851 = bf16[256,11008]{1,0:T(8,128)(2,1)S(1)} parameter(0)
  %all-gather.436 = bf16[4096,11008]{1,0:T(8,128)(2,1)} all-gather(%param_0.2851), channel_id=39, replica_groups=mesh['axis_0'=16,'axis_1'=1,'axis_2'=16], device_ids=([16,16]T(1,0)) {'axis_0'}, dimensions={0}, use_global_device_ids=true
  ROOT %custom-call.88 = bf16[4096,11008]{1,0:T(8,128)(2,1)S(1)} custom-call(%param_0.2851, %param_1.3007, %all-gather.436), custom_call_target="AsyncCollectiveDone"
}

%all-reduce-scatter.4 (input.4: bf16[2048,32000]) -> bf16[144,32000] {
  %input.4 = bf16[2048,32000]{1,0:T(8,128)(2,1)} parameter(0)
  %pad.71 = bf16[2304,32000]{1,0:T(8,128)(2,1)} pad(%input.4, %constant.1107), padding=0_256x0_0
  %all-reduce.60 = bf16[2304,32000]{1,0:T(8,128)(2,1)} all-reduce(%pad.71), channel_id=124, replica_groups={{0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15}}, to_apply=%add
}

ENTRY %main.83_spmd (param.31: bf16[256,11008]) -> bf16[4096,11008] {
  %collective-permute-start = (bf16[144,32000]{1,0:T(8,128)(2,1)}, bf16[144,32000]{1,0:T(8,128)(2,1)}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%fusion.5), channel_id=1, source_target_pairs={{0,1},{1,0}}
  %collective-permute-done = bf16[144,32000]{1,0:T(8,128)(2,1)} collective-permute-done(%collective-permute-start)
  %all-reduce.2 = bf16[32000,2048]{1,0:T(8,128)(2,1)} all-reduce(%scatter_custom_fusion), channel_id=75, replica_groups=mesh['axis_0'=256,'axis_1'=1,'axis_2'=1] {'axis_0','axis_1'}, use_global_device_ids=true, to_apply=%region_45
}
"""


def test_collective_bytes_counts_libtpu_async_copies_once():
  got = plan_lib.collective_bytes(TPU_HLO)
  gathered = 2 * 4096 * 11008
  assert got['all-gather'] == {'count': 1, 'bytes': gathered, 'link_bytes': gathered * 15 / 16}
  scattered = 2 * 2304 * 32000   # the padded operand, sent once (ring reduce-scatter)
  assert got['reduce-scatter'] == {'count': 1, 'bytes': scattered,
                                   'link_bytes': scattered * 15 / 16}
  reduced = 2 * 32000 * 2048
  assert got['all-reduce'] == {'count': 1, 'bytes': reduced,
                               'link_bytes': 2 * reduced * 255 / 256}
  permuted = 2 * 144 * 32000
  assert got['collective-permute'] == {'count': 1, 'bytes': permuted,
                                       'link_bytes': float(permuted)}


def test_collective_bytes_keeps_collectives_that_share_a_channel():
  """Same channel, other shapes: two collectives (libtpu numbers some so)."""
  hlo = '\n'.join([
      '%a = bf16[64]{0} all-gather(%x), channel_id=1, replica_groups={{0,1}}, dimensions={0}',
      '%b = bf16[32]{0} all-gather(%y), channel_id=1, replica_groups={{0,1}}, dimensions={0}',
      '%c = bf16[64]{0} all-gather(%z), replica_groups={{0,1}}, dimensions={0}',
      '%d = bf16[64]{0} all-gather(%z), replica_groups={{0,1}}, dimensions={0}',
  ])
  assert plan_lib.collective_bytes(hlo)['all-gather']['count'] == 4


def test_collective_bytes_reduce_scatter_with_untyped_operand():
  """libtpu prints operands without their types: the operand is the result times n."""
  hlo = ('%r = f32[256]{0} reduce-scatter(%w), channel_id=2, replica_groups={{0,1,2,3}}, '
         'dimensions={0}, to_apply=%add')
  assert plan_lib.collective_bytes(hlo)['reduce-scatter'] == {
      'count': 1, 'bytes': 4096, 'link_bytes': 4096 * 3 / 4}
