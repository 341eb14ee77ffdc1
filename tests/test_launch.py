"""The launchers in ``launch/``: TPU VM slices, SLURM and GKE (JobSet).

Each is run as its user runs it, in dry-run mode (what it would do, printed) and, where a
stand-in for ``gcloud``, ``sbatch``/``srun`` or ``kubectl`` on ``PATH`` can play the
cluster, for real: the kdjax arguments must reach ``python -m kdjax`` word for word
(spaces, ``=``, quotes, ``$``, an empty word), with ``KDJAX_DISTRIBUTED_AUTO=1``.
The GKE generator is checked against the slice table (hosts x chips per host = the chips
of the topology) and its manifest is parsed back with ``yaml.safe_load``.
"""

from __future__ import annotations

import doctest
import importlib.util
import io
import math
import os
import shlex
import stat
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
LAUNCH = os.path.join(ROOT, 'launch')

# Words a shell would split, expand or unquote if a launcher quoted them wrong.
TRICKY = ['distill', '--config', 'configs/mnist1d/kd.py', '--workdir', 'gs://bkt/runs/kd',
          '--config.teacher.workdir=gs://bkt/teacher',
          "--config.loss.terms={'kd': {'weight': 0.9, 'temperature': 4.0}}",
          '--config.note=a b=c', "it's", '', 'x"y$HOME`id`\\', '--config.seed=0']
# TRICKY as kdjax sees it once the buckets are mounted on a TPU VM.
TRICKY_MOUNTED = [a.replace('gs://', '/mnt/gcs/') for a in TRICKY]


def _run(script, *args, env=None):
  full = {**os.environ, 'KDJAX_DRY_RUN': '', **(env or {})}
  return subprocess.run(['bash', os.path.join(LAUNCH, script), *args], capture_output=True,
                        text=True, env=full, timeout=60)


def _stub(folder, name, body):
  path = os.path.join(folder, name)
  with open(path, 'w') as f:
    f.write('#!/usr/bin/env bash\n' + body)
  os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


@pytest.fixture
def stubs(tmp_path):
  """A ``bin`` folder for stand-in commands, and a ``python``/``python3`` there that
  records its arguments (NUL-separated) and ``KDJAX_DISTRIBUTED_AUTO``."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  record = ('printf "%s\\0" "$@" > "$STUB_OUT/argv"\n'
            'printf "%s" "${KDJAX_DISTRIBUTED_AUTO-unset}" > "$STUB_OUT/auto"\n'
            'printf "%s" "${EXTRA-unset}" > "$STUB_OUT/extra"\n')
  _stub(bin_dir, 'python', record)
  _stub(bin_dir, 'python3', record)
  env = {'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'STUB_OUT': str(tmp_path)}
  return bin_dir, env, tmp_path


def _recorded(out_dir):
  argv = (out_dir / 'argv').read_bytes().decode().split('\0')[:-1]
  return argv, (out_dir / 'auto').read_text(), (out_dir / 'extra').read_text()


def _one_error_line(out):
  assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
  assert out.stdout == ''
  lines = out.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), out.stderr
  return lines[0]


# --------------------------------------------------------------------------- TPU VM

def _remote_command(line):
  """The ``--command=`` of a printed ``gcloud ... ssh`` line, checked to be valid bash."""
  argv = shlex.split(line)
  command = [a for a in argv if a.startswith('--command=')]
  assert len(command) == 1, argv
  command = command[0][len('--command='):]
  syntax = subprocess.run(['bash', '-n', '-c', command], capture_output=True, text=True)
  assert syntax.returncode == 0, (command, syntax.stderr)
  return command


def _kdjax_words(ssh_line):
  """The words before ``python3 -m kdjax`` in a printed ssh line's remote command, and
  the kdjax arguments after it."""
  words = shlex.split(_remote_command(ssh_line))
  for i in range(len(words) - 2):
    if words[i:i + 3] == ['python3', '-m', 'kdjax']:
      return words[:i], words[i + 3:]
  raise AssertionError(f'no python3 -m kdjax in {words}')


def test_tpu_vm_dry_run_prints_every_gcloud_command():
  out = _run('tpu_vm.sh', '--name', 'my-tpu', '--zone', 'us-central2-b', '--project', 'proj',
             '--setup', '--create', 'v5litepod-16', '--runtime-version', 'v2-alpha-tpuv5-lite',
             '--env', 'EXTRA=a b', '--dry-run', '--', *TRICKY)
  assert out.returncode == 0 and out.stderr == '', out.stderr
  lines = out.stdout.splitlines()
  assert len(lines) == 6, lines
  create, describe, pack, scp, setup, ssh = lines
  assert shlex.split(create)[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create',
                                     'my-tpu']
  assert {'--node-id=my-tpu', '--accelerator-type=v5litepod-16',
          '--runtime-version=v2-alpha-tpuv5-lite'} <= set(shlex.split(create))
  assert 'queued-resources describe my-tpu' in describe
  assert 'ls-files' in pack and 'tar' in pack
  for line in (scp, setup, ssh):
    argv = shlex.split(line)
    assert argv[:4] == ['gcloud', 'compute', 'tpus', 'tpu-vm']
    assert '--worker=all' in argv and '--zone=us-central2-b' in argv and '--project=proj' in argv
  tarball = shlex.split(pack)[-1]
  assert shlex.split(scp)[5:7] == [tarball, 'my-tpu:kdjax-src.tgz']
  assert "pip install -q -c requirements.lock -e . 'jax[tpu]'" in shlex.split(setup)[-1]
  assert 'gcsfuse' in _remote_command(setup)   # a gs:// argument: --setup installs it
  before, kdjax_args = _kdjax_words(ssh)
  assert kdjax_args == TRICKY_MOUNTED
  assert 'KDJAX_DISTRIBUTED_AUTO=1' in before and 'EXTRA=a b' in before
  assert before.count('gcsfuse') == 1 and '/mnt/gcs/bkt' in before   # one bucket, one mount


def test_tpu_vm_detach():
  out = _run('tpu_vm.sh', '--name', 't', '--zone', 'z', '--detach', '--dry-run', '--', *TRICKY)
  assert out.returncode == 0, out.stderr
  before, after = _kdjax_words(out.stdout)
  assert before[-1] == 'nohup'
  assert after == TRICKY_MOUNTED + ['>', 'kdjax.log', '2>&1', '<', '/dev/null', '&']


def test_tpu_vm_no_gcsfuse_passes_gs_paths_through():
  out = _run('tpu_vm.sh', '--name', 't', '--zone', 'z', '--no-gcsfuse', '--dry-run', '--',
             *TRICKY)
  assert out.returncode == 0, out.stderr
  (ssh,) = out.stdout.splitlines()
  before, kdjax_args = _kdjax_words(ssh)
  assert kdjax_args == TRICKY and 'gcsfuse' not in ssh
  assert '--project' not in ssh   # gcloud's default project


def test_tpu_vm_runs_the_command_on_the_workers(stubs):
  """Not a dry run: a stand-in gcloud runs --command the way ssh's remote shell would."""
  bin_dir, env, tmp = stubs
  home = tmp / 'home'
  (home / 'kdjax').mkdir(parents=True)
  _stub(bin_dir, 'gcloud', 'printf "%s\\n" "$*" >> "$STUB_OUT/gcloud.log"\n'
        'for a in "$@"; do case $a in --command=*) cd "$STUB_OUT/home" && '
        'exec bash -c "${a#--command=}";; esac; done\n')
  args = [a.replace('gs://', '/shared/') for a in TRICKY]
  out = _run('tpu_vm.sh', '--name', 't', '--zone', 'z', '--allow-local-workdir',
             '--env', 'EXTRA=x y', '--', *args, env=env)
  assert out.returncode == 0, out.stderr
  argv, auto, extra = _recorded(tmp)
  assert argv == ['-m', 'kdjax', *args]
  assert (auto, extra) == ('1', 'x y')
  assert '--worker=all' in (tmp / 'gcloud.log').read_text()


def test_tpu_pod_sh_is_tpu_vm_sh():
  out = _run('tpu_pod.sh', 'old-tpu', 'europe-west4-a', *TRICKY, env={'KDJAX_DRY_RUN': '1'})
  assert out.returncode == 0, out.stderr
  (ssh,) = out.stdout.splitlines()
  assert 'tpu-vm ssh old-tpu --worker=all --zone=europe-west4-a' in ssh
  assert _kdjax_words(ssh)[1] == TRICKY_MOUNTED


@pytest.mark.parametrize('args, says', [
    (['--zone', 'z', '--', 'eval'], '--name'),
    (['--name', 't', '--', 'eval'], '--zone'),
    (['--name', 't', '--zone', 'z'], 'no kdjax command'),
    (['--name', 't', '--zone', 'z', '--', 'eval', '--workdir', '/tmp/w'], "worker's own disk"),
    (['--name', 't', '--zone', 'z', '--', 'eval', '--workdir=runs/w'], "worker's own disk"),
    (['--name', 't', '--zone', 'z', '--create', 'v4-8', '--', 'eval'], '--runtime-version'),
    (['--name', 't', '--zone', 'z', '--spot', '--', 'eval'], '--create'),
    (['--name', 't', '--zone', 'z', '--env', 'NOEQUALS', '--', 'eval'], 'KEY=VALUE'),
    (['--name', 't', '--zone', 'z', '--bogus', '--', 'eval'], 'unknown option --bogus'),
    (['--name', 't', '--zone'], '--zone needs a value'),
])
def test_tpu_vm_refuses_with_one_line(args, says):
  line = _one_error_line(_run('tpu_vm.sh', '--dry-run', *args))
  assert says in line


# --------------------------------------------------------------------------- SLURM

def _sbatch_script(stdout):
  lines = stdout.splitlines()
  assert lines[0].endswith("<<'KDJAX_SBATCH'") and lines[-1] == 'KDJAX_SBATCH', stdout
  return shlex.split(lines[0].split('<<')[0]), lines[1:-1]


def test_slurm_dry_run_one_task_per_gpu():
  out = _run('slurm.sh', '--nodes', '4', '--gpus-per-node', '4', '--partition', 'gpu',
             '--time', '02:00:00', '--sbatch-arg=--qos=high', '--env', 'EXTRA=a b',
             '--dry-run', '--', *TRICKY)
  assert out.returncode == 0 and out.stderr == '', out.stderr
  sbatch, script = _sbatch_script(out.stdout)
  assert sbatch == ['sbatch', '--qos=high']
  assert script[0] == '#!/usr/bin/env bash'
  for directive in ('--nodes=4', '--ntasks-per-node=4', '--gpus-per-node=4',
                    '--partition=gpu', '--time=02:00:00', '--signal=TERM@120'):
    assert f'#SBATCH {directive}' in script
  assert not any('gpus-per-task' in line or 'CUDA_VISIBLE_DEVICES' in line for line in script)
  assert 'export KDJAX_DISTRIBUTED_AUTO=1' in script
  (srun,) = [line for line in script if line.startswith('srun ')]
  words = shlex.split(srun)
  assert words[:5] == ['srun', '--kill-on-bad-exit=1', 'python', '-m', 'kdjax']
  assert words[5:] == TRICKY


_SLURM_STUBS = {
    # sbatch: run the batch script from stdin; srun: drop srun's options, run the rest.
    'sbatch': 'cat > "$STUB_OUT/batch.sh"\nbash "$STUB_OUT/batch.sh"\n',
    'srun': 'printf "%s\\n" "$*" > "$STUB_OUT/srun.log"\n'
            'while [[ $1 == --* ]]; do shift; done\nexec "$@"\n',
}


@pytest.mark.parametrize('how', ['submit', 'paste dry run'])
def test_slurm_submission_reaches_kdjax(stubs, how):
  bin_dir, env, tmp = stubs
  for name, body in _SLURM_STUBS.items():
    _stub(bin_dir, name, body)
  args = ['--nodes', '2', '--env', 'EXTRA=x y', '--', *TRICKY]
  if how == 'submit':
    out = _run('slurm.sh', *args, env=env)
  else:   # the printed here-document, run by a shell, submits the same job
    printed = _run('slurm.sh', '--dry-run', *args)
    assert printed.returncode == 0, printed.stderr
    out = subprocess.run(['bash', '-c', printed.stdout], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=60)
  assert out.returncode == 0, out.stderr
  argv, auto, extra = _recorded(tmp)
  assert argv == ['-m', 'kdjax', *TRICKY]
  assert (auto, extra) == ('1', 'x y')
  assert '#SBATCH --ntasks-per-node=8' in (tmp / 'batch.sh').read_text()


def test_slurm_sbatch_file(stubs):
  """``sbatch launch/slurm.sbatch ARGS``: one task per GPU, ARGS passed through intact."""
  text = open(os.path.join(LAUNCH, 'slurm.sbatch')).read()
  tasks = [line.split('=')[1] for line in text.splitlines()
           if line.startswith('#SBATCH --ntasks-per-node=')]
  gpus = [line.split('=')[1] for line in text.splitlines()
          if line.startswith('#SBATCH --gpus-per-node=')]
  assert tasks == gpus and len(tasks) == 1
  bin_dir, env, tmp = stubs
  _stub(bin_dir, 'srun', _SLURM_STUBS['srun'])
  out = _run('slurm.sbatch', *TRICKY, env=env)
  assert out.returncode == 0, out.stderr
  argv, auto, _ = _recorded(tmp)
  assert argv == ['-m', 'kdjax', *TRICKY] and auto == '1'


@pytest.mark.parametrize('args, says', [
    (['--nodes', '0', '--', 'eval'], '--nodes'),
    (['--gpus-per-node', 'eight', '--', 'eval'], '--gpus-per-node'),
    (['--job-name', 'a b', '--', 'eval'], 'has a space'),
    (['--env', '1X=y', '--', 'eval'], 'KEY=VALUE'),
    (['--nodes', '2'], 'no kdjax command'),
    (['--gpus', '8', '--', 'eval'], 'unknown option --gpus'),
])
def test_slurm_refuses_with_one_line(args, says):
  assert says in _one_error_line(_run('slurm.sh', '--dry-run', *args))


# --------------------------------------------------------------------------- GKE

@pytest.fixture(scope='module')
def gke():
  spec = importlib.util.spec_from_file_location('kdjax_launch_gke_jobset',
                                                os.path.join(LAUNCH, 'gke_jobset.py'))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  yield module
  del sys.modules[spec.name]


def test_gke_doctests(gke):
  result = doctest.testmod(gke)
  assert result.attempted > 0 and result.failed == 0


# (accelerator, topology, chips_per_host asked) -> (chips, hosts, chips per host, machine)
SLICES = [
    ('v5e', '4x4', None, 16, 4, 4, 'ct5lp-hightpu-4t'),
    ('tpu-v5-lite-podslice', '16x16', None, 256, 64, 4, 'ct5lp-hightpu-4t'),
    ('v5e', '1x1', None, 1, 1, 1, 'ct5lp-hightpu-1t'),
    ('v5e', '2x2', None, 4, 1, 4, 'ct5lp-hightpu-4t'),
    ('v5e', '2x4', None, 8, 1, 8, 'ct5lp-hightpu-8t'),
    ('v5e', '2x4', 4, 8, 2, 4, 'ct5lp-hightpu-4t'),
    ('v6e', '8x16', None, 128, 32, 4, 'ct6e-standard-4t'),
    ('v4', '2x2x1', None, 4, 1, 4, 'ct4p-hightpu-4t'),
    ('v4', '2x2x4', None, 16, 4, 4, 'ct4p-hightpu-4t'),
    ('tpu-v4-podslice', '8x16x16', None, 2048, 512, 4, 'ct4p-hightpu-4t'),
    ('v5p', '2x4x4', None, 32, 8, 4, 'ct5p-hightpu-4t'),
    ('tpu-v5p-slice', '16x20x28', None, 8960, 2240, 4, 'ct5p-hightpu-4t'),
]


@pytest.mark.parametrize('accelerator, topology, asked, chips, hosts, per_host, machine', SLICES)
def test_gke_slice_table(gke, accelerator, topology, asked, chips, hosts, per_host, machine):
  s = gke.slice_shape(accelerator, topology, asked)
  assert (s.chips, s.hosts, s.chips_per_host, s.machine_type) == (chips, hosts, per_host, machine)
  assert s.hosts * s.chips_per_host == math.prod(int(d) for d in topology.split('x'))


def _manifest(gke, capsys, *argv):
  assert gke.main(list(argv)) == 0
  out = capsys.readouterr()
  assert out.err == ''
  return yaml.safe_load(out.out), out.out


@pytest.mark.parametrize('accelerator, topology, hosts, label', [
    ('v5e', '4x4', 4, 'tpu-v5-lite-podslice'),
    ('v4', '2x2x4', 4, 'tpu-v4-podslice'),
    ('v6e', '2x4', 1, 'tpu-v6e-slice'),
])
def test_gke_jobset_manifest(gke, capsys, accelerator, topology, hosts, label):
  m, text = _manifest(gke, capsys, '--accelerator', accelerator, '--topology', topology,
                      '--image', 'us-docker.pkg.dev/p/r/kdjax:1', '--name', 'kd-run',
                      '--service-account', 'kdjax', '--env', 'EXTRA=a b', '--dry-run', '--',
                      *TRICKY)
  assert text.startswith('# ')   # the slice, in words
  assert (m['apiVersion'], m['kind']) == ('jobset.x-k8s.io/v1alpha2', 'JobSet')
  assert m['metadata']['name'] == 'kd-run'
  assert m['metadata']['annotations'] == {
      'alpha.jobset.sigs.k8s.io/exclusive-topology': 'cloud.google.com/gke-nodepool'}
  (rjob,) = m['spec']['replicatedJobs']
  assert rjob['replicas'] == 1
  job = rjob['template']['spec']
  assert job['parallelism'] == job['completions'] == hosts
  assert job['completionMode'] == 'Indexed' and job['backoffLimit'] == 0
  pod = job['template']['spec']
  assert pod['nodeSelector'] == {'cloud.google.com/gke-tpu-accelerator': label,
                                 'cloud.google.com/gke-tpu-topology': topology}
  assert pod['serviceAccountName'] == 'kdjax'
  (c,) = pod['containers']
  chips = math.prod(int(d) for d in topology.split('x'))
  assert c['resources']['limits'] == c['resources']['requests'] == {'google.com/tpu':
                                                                     chips // hosts}
  assert c['command'] == ['python', '-m', 'kdjax',
                          *[a.replace('gs://', '/gcs/') for a in TRICKY]]
  assert {'name': 'KDJAX_DISTRIBUTED_AUTO', 'value': '1'} in c['env']
  assert {'name': 'EXTRA', 'value': 'a b'} in c['env']
  assert job['template']['metadata']['annotations'] == {'gke-gcsfuse/volumes': 'true'}
  (volume,) = pod['volumes']
  assert volume['csi']['driver'] == 'gcsfuse.csi.storage.gke.io'
  assert volume['csi']['volumeAttributes']['bucketName'] == 'bkt'
  assert c['volumeMounts'] == [{'name': volume['name'], 'mountPath': '/gcs/bkt'}]


def test_gke_no_gcsfuse(gke, capsys):
  m, _ = _manifest(gke, capsys, '--accelerator', 'v5p', '--topology', '2x2x1', '--image', 'i',
                   '--no-gcsfuse', '--', 'eval', '--workdir', 'gs://b/w')
  pod = m['spec']['replicatedJobs'][0]['template']['spec']['template']
  assert 'metadata' not in pod and 'volumes' not in pod['spec']
  assert pod['spec']['containers'][0]['command'][-1] == 'gs://b/w'


def test_gke_apply_pipes_to_kubectl(gke, stubs, capsys, monkeypatch):
  bin_dir, env, tmp = stubs
  _stub(bin_dir, 'kubectl', 'printf "%s\\n" "$*" > "$STUB_OUT/kubectl.args"\n'
        'cat > "$STUB_OUT/applied.yaml"\n')
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  argv = ['--accelerator', 'v5e', '--topology', '4x4', '--image', 'i', '--', 'eval',
          '--workdir', 'gs://b/w']
  assert gke.main(['--apply', *argv]) == 0
  assert (tmp / 'kubectl.args').read_text() == 'apply -f -\n'
  applied = yaml.safe_load((tmp / 'applied.yaml').read_text())
  assert gke.main(argv) == 0
  assert applied == yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize('argv, says', [
    (['--accelerator', 'v9', '--topology', '4x4'], "unknown accelerator 'v9'"),
    (['--accelerator', 'tpu-v5-podslice', '--topology', '4x4'], 'unknown accelerator'),
    (['--accelerator', 'v5e', '--topology', '3x3'], 'v5e has no 3x3 slice'),
    (['--accelerator', 'v5e', '--topology', '4x2'], 'v5e has no 4x2 slice'),
    (['--accelerator', 'v6e', '--topology', '2x2x2'], 'has 3 dimensions'),
    (['--accelerator', 'v4', '--topology', '4x4'], 'has 2 dimensions'),
    (['--accelerator', 'v4', '--topology', '4x4x12'], 'v4 has no 4x4x12 slice'),
    (['--accelerator', 'v5p', '--topology', '4x4x6'], 'v5p has no 4x4x6 slice'),
    (['--accelerator', 'v5p', '--topology', '8x4x4'], 'v5p has no 8x4x4 slice'),
    (['--accelerator', 'v5p', '--topology', '16x24x28'], 'at most 8960 chips'),
    (['--accelerator', 'v5e', '--topology', 'four'], 'not of the form'),
    (['--accelerator', 'v5e', '--topology', '4x4', '--chips-per-host', '8'], '--chips-per-host'),
    (['--accelerator', 'v5e', '--topology', '2x4', '--chips-per-host', '2'], '8 or 4'),
    (['--accelerator', 'v5e', '--topology', '4x4', '--name', 'Big_Name'], 'DNS label'),
    (['--accelerator', 'v5e', '--topology', '4x4', '--env', 'X'], 'KEY=VALUE'),
    (['--accelerator', 'v5e', '--topology', '4x4', '--max-restarts', '-1'], '--max-restarts'),
    (['--topology', '4x4'], 'required: --accelerator'),
])
def test_gke_bad_input_one_line_exit_2(gke, capsys, argv, says):
  assert gke.main([*argv, '--image', 'i', '--', 'eval']) == 2
  out = capsys.readouterr()
  assert out.out == ''
  lines = out.err.splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and says in lines[0], out.err


def test_gke_script_exits_2():
  """As a program, not in-process: one line, exit code 2."""
  out = subprocess.run([sys.executable, os.path.join(LAUNCH, 'gke_jobset.py'), '--accelerator',
                        'v5e', '--topology', '5x5', '--image', 'i', '--', 'eval'],
                       capture_output=True, text=True, timeout=60)
  _one_error_line(out)
  assert 'v5e has no 5x5 slice' in out.stderr


def test_gke_missing_command(gke, capsys):
  assert gke.main(['--accelerator', 'v5e', '--topology', '4x4', '--image', 'i']) == 2
  assert capsys.readouterr().err.count('\n') == 1


def test_gke_yaml_fallback_is_json(gke, monkeypatch):
  """Without PyYAML the manifest is JSON, which is YAML as well."""
  monkeypatch.setitem(sys.modules, 'yaml', None)   # `import yaml` now raises ImportError
  text = gke.to_yaml({'kind': 'JobSet', 'spec': {'n': 2}}, 'slice')
  assert text.startswith('# slice\n{')
  monkeypatch.undo()
  assert yaml.safe_load(io.StringIO(text)) == {'kind': 'JobSet', 'spec': {'n': 2}}
