#!/usr/bin/env python3
"""Writes the JobSet manifest that runs one kdjax command on a TPU slice in GKE.

One Job of ``hosts`` pods (one pod per TPU VM of the slice, ``completionMode:
Indexed``), every pod running ``python -m kdjax ARGS`` with
``KDJAX_DISTRIBUTED_AUTO=1``: ``jax.distributed.initialize()`` then finds the slice
from what GKE puts into each pod of an indexed Job on a multi-host TPU node pool
(``TPU_WORKER_ID``, ``TPU_WORKER_HOSTNAMES``; JAX's ``GkeTpuCluster``). JobSet gives
the pods stable host names through a headless service (``spec.network``), and
Kubernetes gives each pod its index as ``JOB_COMPLETION_INDEX``.

    python launch/gke_jobset.py --accelerator v5e --topology 4x4 \\
        --image us-docker.pkg.dev/PROJECT/REPO/kdjax:latest --service-account kdjax \\
        -- distill --config configs/cifar10/resnet8x4_kd.py --workdir gs://BUCKET/kd \\
        --config.teacher.workdir=gs://BUCKET/teacher > kd.yaml    # or --apply

Arguments of the kdjax command of the form ``gs://BUCKET/PATH`` (or
``--flag=gs://BUCKET/PATH``) are rewritten to ``/gcs/BUCKET/PATH`` and every such
bucket is mounted there with the Cloud Storage FUSE CSI driver, because kdjax writes
its workdir through the local filesystem API (``--no-gcsfuse`` passes them unchanged).

The slice table (``SYSTEMS``): topology -> chips (the product of its dimensions) ->
TPU VMs (hosts, Kubernetes nodes) of ``chips_per_host`` chips each, as GKE provisions them:

  v4   tpu-v4-podslice       2x2x1 2x2x2 2x2x4 2x4x4 4x4x4 4x4x8 4x8x8 8x8x8 8x8x12
                             8x8x16 8x16x16; 4 chips per VM (ct4p-hightpu-4t)
  v5e  tpu-v5-lite-podslice  1x1 2x2 2x4 4x4 4x8 8x8 8x16 16x16; 1x1: one 1-chip VM
                             (ct5lp-hightpu-1t); 2x2: one 4-chip VM (-4t); 2x4: one 8-chip
                             VM (-8t) or two 4-chip VMs (-4t); larger: 4 chips per VM (-4t)
  v5p  tpu-v5p-slice         2x2x1 2x2x2 2x2x4 2x4x4, and AxBxC with A <= B <= C all
                             multiples of 4, up to 8960 chips; 4 chips per VM
                             (ct5p-hightpu-4t)
  v6e  tpu-v6e-slice         as v5e (ct6e-standard-1t, -4t, -8t)

So v5e 4x4 is 16 chips on 4 VMs of 4, v4 2x2x4 is 16 chips on 4 VMs of 4, and v5e
2x4 is one 8-chip VM unless ``--chips-per-host 4`` asks for the two-VM node pool.
(The Cloud TPU API's own v5e table counts 8 chips per host, 4x4 = 2 hosts; GKE's
multi-host v5e and v6e node pools use the 4-chip machine type, so a GKE 4x4 slice is
4 nodes.)

References (what each gave; the GKE "Plan TPUs in GKE" page,
cloud.google.com/kubernetes-engine/docs/concepts/plan-tpus, is the table's home):
  xpk (github.com/AI-Hypercomputer/xpk, src/xpk/core/system_characteristics.py): the
  GKE accelerator labels and machine types, the topologies of v4, v5e, v5p and v6e, and
  4 chips per VM for every slice of more than one chip.
  GKE, "About node pool auto-creation" (.../concepts/node-auto-provisioning): a
  ct5lp-hightpu-4t node pool of topology 16x16 has 64 nodes. GKE, "Deploy TPU
  Multislice" (.../how-to/tpu-multislice): ct4p-hightpu-4t 2x2x1 and ct5lp-hightpu-4t
  2x2 are single-host.
  Cloud TPU, "TPU v5e" (cloud.google.com/tpu/docs/v5e) and "Supported versions": the v5e
  shapes, VMs of 1, 4 or 8 chips, v5litepod-1/-4/-8 = ct5lp-hightpu-1t/-4t/-8t.
  Cloud TPU, "TPU v5p" (cloud.google.com/tpu/docs/v5p): 8960 chips in a v5p pod, full
  cubes from 4x4x4 (it schedules at most 16x16x24 = 6144 chips in one slice; xpk's GKE
  list goes to 16x20x28 = 8960, the bound used here).
  JobSet (github.com/kubernetes-sigs/jobset, examples/simple/exclusive-placement.yaml,
  examples/simple/jobset-with-network.yaml): apiVersion, the exclusive-topology
  annotation, spec.network. JAX (jax/_src/clusters/cloud_tpu_cluster.py): GkeTpuCluster
  reads TPU_WORKER_ID and TPU_WORKER_HOSTNAMES. GKE, "Mount Cloud Storage buckets as CSI
  ephemeral volumes" (.../how-to/cloud-storage-fuse-csi-driver-ephemeral).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import subprocess
import sys

try:   # one line per mistake, exit code 2, as every kdjax command
  from kdjax.errors import UserError
except ImportError:   # run from a checkout without kdjax installed (a laptop with kubectl)
  class UserError(Exception):
    """A mistake in the command line, with what to do about it."""

API_VERSION = 'jobset.x-k8s.io/v1alpha2'
ACCELERATOR_LABEL = 'cloud.google.com/gke-tpu-accelerator'
TOPOLOGY_LABEL = 'cloud.google.com/gke-tpu-topology'
TPU_RESOURCE = 'google.com/tpu'
EXCLUSIVE_TOPOLOGY = 'alpha.jobset.sigs.k8s.io/exclusive-topology'
GCSFUSE_DRIVER = 'gcsfuse.csi.storage.gke.io'
GCS_MOUNT_ROOT = '/gcs'
# The GKE TPU examples open these: the TPU runtime (8471) and its metrics (8080).
TPU_PORTS = (8471, 8080)

_2D = ('1x1', '2x2', '2x4', '4x4', '4x8', '8x8', '8x16', '16x16')
_SUB_CUBE = ('2x2x1', '2x2x2', '2x2x4', '2x4x4')


@dataclasses.dataclass(frozen=True)
class TpuSystem:
  """One TPU generation as GKE offers it.

  Attributes:
    gke_accelerator: the ``cloud.google.com/gke-tpu-accelerator`` node label.
    machine_prefix: the node machine type without its ``-<chips>t`` suffix.
    rank: 2 or 3 (dimensions of a topology).
    topologies: the shapes offered, or None for the v5p rule (see the module).
    max_chips: the largest slice.
  """
  gke_accelerator: str
  machine_prefix: str
  rank: int
  topologies: tuple[str, ...] | None
  max_chips: int


SYSTEMS = {
    'v4': TpuSystem('tpu-v4-podslice', 'ct4p-hightpu', 3,
                    _SUB_CUBE + ('4x4x4', '4x4x8', '4x8x8', '8x8x8', '8x8x12', '8x8x16',
                                 '8x16x16'), 4096),
    'v5e': TpuSystem('tpu-v5-lite-podslice', 'ct5lp-hightpu', 2, _2D, 256),
    'v5p': TpuSystem('tpu-v5p-slice', 'ct5p-hightpu', 3, None, 8960),
    'v6e': TpuSystem('tpu-v6e-slice', 'ct6e-standard', 2, _2D, 256),
}
_BY_LABEL = {s.gke_accelerator: name for name, s in SYSTEMS.items()}


@dataclasses.dataclass(frozen=True)
class SliceShape:
  """A TPU slice as GKE schedules it.

  Attributes:
    system: ``v4``, ``v5e``, ``v5p`` or ``v6e``.
    gke_accelerator: the node label value.
    topology: the ``cloud.google.com/gke-tpu-topology`` value, e.g. ``4x4``.
    chips: chips in the slice.
    hosts: TPU VMs (Kubernetes nodes, and pods of the Job).
    chips_per_host: the ``google.com/tpu`` each pod asks for.
    machine_type: the node pool's machine type.
  """
  system: str
  gke_accelerator: str
  topology: str
  chips: int
  hosts: int
  chips_per_host: int
  machine_type: str


def parse_topology(text: str, rank: int) -> tuple[int, ...]:
  """The dimensions of a topology string such as ``4x4`` or ``2x2x4``.

  Args:
    text: ``AxB`` or ``AxBxC``, positive integers.
    rank: how many dimensions the accelerator's topologies have.

  Returns:
    The dimensions, in the order written.

  >>> parse_topology('2x2x4', 3)
  (2, 2, 4)
  >>> try:
  ...   parse_topology('4x4', 3)
  ... except UserError as e:
  ...   print(e)
  topology '4x4' has 2 dimensions; this accelerator's have 3 (AxBxC).
  """
  if not re.fullmatch(r'[1-9][0-9]*(x[1-9][0-9]*)*', text):
    raise UserError(f'topology {text!r} is not of the form AxB or AxBxC (positive integers).')
  dims = tuple(int(d) for d in text.split('x'))
  if len(dims) != rank:
    form = 'AxB' if rank == 2 else 'AxBxC'
    raise UserError(f'topology {text!r} has {len(dims)} dimensions; this accelerator\'s have '
                    f'{rank} ({form}).')
  return dims


def _valid_v5p(dims: tuple[int, ...], text: str) -> bool:
  if text in _SUB_CUBE:
    return True
  return list(dims) == sorted(dims) and all(d % 4 == 0 for d in dims)


def slice_shape(accelerator: str, topology: str, chips_per_host: int | None = None) -> SliceShape:
  """How many TPU VMs, of how many chips, make the slice ``accelerator`` ``topology``.

  Args:
    accelerator: ``v4``, ``v5e``, ``v5p``, ``v6e`` or the GKE label
      (``tpu-v4-podslice``, ``tpu-v5-lite-podslice``, ``tpu-v5p-slice``,
      ``tpu-v6e-slice``).
    topology: the slice's shape, e.g. ``4x4`` (v5e, v6e) or ``2x2x4`` (v4, v5p).
    chips_per_host: only for v5e and v6e ``2x4``, which GKE offers as one 8-chip VM
      (the default) or as two 4-chip VMs; None elsewhere.

  Returns:
    The :class:`SliceShape`.

  Raises:
    UserError: an unknown accelerator, a topology it does not offer, or a
      ``chips_per_host`` that slice cannot have.

  >>> s = slice_shape('v5e', '4x4')
  >>> (s.chips, s.hosts, s.chips_per_host, s.machine_type)
  (16, 4, 4, 'ct5lp-hightpu-4t')
  >>> s = slice_shape('tpu-v4-podslice', '2x2x4')
  >>> (s.chips, s.hosts, s.chips_per_host)
  (16, 4, 4)
  """
  name = _BY_LABEL.get(accelerator, accelerator)
  if name not in SYSTEMS:
    known = ', '.join(f'{n} ({s.gke_accelerator})' for n, s in SYSTEMS.items())
    raise UserError(f'unknown accelerator {accelerator!r}; use one of {known}.')
  system = SYSTEMS[name]
  dims = parse_topology(topology, system.rank)
  chips = math.prod(dims)
  if system.topologies is not None:
    ok = topology in system.topologies
    offered = ' '.join(system.topologies)
  else:
    ok = _valid_v5p(dims, topology) and chips <= system.max_chips
    offered = (' '.join(_SUB_CUBE) + f', or AxBxC with A<=B<=C multiples of 4 and at most '
               f'{system.max_chips} chips')
  if not ok:
    raise UserError(f'{name} has no {topology} slice in GKE; use one of: {offered}.')

  if system.rank == 2 and chips == 8:
    choices = (8, 4)   # one ct5lp-hightpu-8t / ct6e-standard-8t, or two -4t
  elif chips < 4:
    choices = (chips,)   # 1x1: the -1t machine
  else:
    choices = (4,)
  if chips_per_host is None:
    per_host = choices[0]
  elif chips_per_host in choices:
    per_host = chips_per_host
  else:
    allowed = ' or '.join(str(c) for c in choices)
    raise UserError(f'a {name} {topology} slice has {allowed} chips per host in GKE, not '
                    f'{chips_per_host}; drop --chips-per-host or use {allowed}.')
  return SliceShape(system=name, gke_accelerator=system.gke_accelerator, topology=topology,
                    chips=chips, hosts=chips // per_host, chips_per_host=per_host,
                    machine_type=f'{system.machine_prefix}-{per_host}t')


def gcs_to_mounts(args: list[str], root: str = GCS_MOUNT_ROOT) -> tuple[list[str], list[str]]:
  """Rewrites every ``gs://BUCKET/PATH`` argument to ``ROOT/BUCKET/PATH``.

  Args:
    args: the kdjax command's arguments.
    root: where the buckets are mounted.

  Returns:
    The rewritten arguments and the buckets they name, in order of appearance.

  >>> gcs_to_mounts(['--workdir', 'gs://b/kd', '--config.teacher.workdir=gs://t/x', 'gs:/no'])
  (['--workdir', '/gcs/b/kd', '--config.teacher.workdir=/gcs/t/x', 'gs:/no'], ['b', 't'])
  """
  out, buckets = [], []
  for a in args:
    m = re.fullmatch(r'(--[^=]+=)?gs://([a-z0-9][-_.a-z0-9]*)(/.*)?', a)
    if m:
      prefix, bucket, path = m.group(1) or '', m.group(2), m.group(3) or ''
      if bucket not in buckets:
        buckets.append(bucket)
      a = f'{prefix}{root}/{bucket}{path}'
    out.append(a)
  return out, buckets


def jobset(shape: SliceShape, *, name: str, image: str, kdjax_args: list[str],
           env: dict[str, str] | None = None, namespace: str | None = None,
           service_account: str | None = None, buckets: tuple[str, ...] = (),
           max_restarts: int = 0) -> dict:
  """The JobSet manifest (a dict, ready for YAML) running ``python -m kdjax ARGS``.

  Args:
    shape: the slice (see :func:`slice_shape`).
    name: the JobSet's name (a DNS label).
    image: the container image, with kdjax and ``jax[tpu]`` installed.
    kdjax_args: the arguments after ``python -m kdjax``.
    env: extra environment variables for every pod.
    namespace: the Kubernetes namespace, or None for kubectl's current one.
    service_account: the Kubernetes service account (Workload Identity: the one
      allowed to read and write the buckets), or None.
    buckets: Cloud Storage buckets to mount at ``/gcs/<bucket>`` in every pod.
    max_restarts: how often JobSet recreates the whole slice after a pod fails.

  Returns:
    The manifest.

  >>> m = jobset(slice_shape('v5e', '4x4'), name='kd', image='img', kdjax_args=['eval'])
  >>> job = m['spec']['replicatedJobs'][0]['template']['spec']
  >>> (job['parallelism'], job['completions'], job['completionMode'])
  (4, 4, 'Indexed')
  >>> job['template']['spec']['containers'][0]['resources']['limits']
  {'google.com/tpu': 4}
  """
  environment = {'KDJAX_DISTRIBUTED_AUTO': '1', **(env or {})}
  container = {
      'name': 'kdjax',
      'image': image,
      'command': ['python', '-m', 'kdjax', *kdjax_args],
      'env': [{'name': k, 'value': v} for k, v in environment.items()],
      'ports': [{'containerPort': p} for p in TPU_PORTS],
      'resources': {'requests': {TPU_RESOURCE: shape.chips_per_host},
                    'limits': {TPU_RESOURCE: shape.chips_per_host}},
  }
  pod_spec = {'restartPolicy': 'Never'}
  if service_account:
    pod_spec['serviceAccountName'] = service_account
  pod_spec['nodeSelector'] = {ACCELERATOR_LABEL: shape.gke_accelerator,
                              TOPOLOGY_LABEL: shape.topology}
  pod_spec['containers'] = [container]
  pod_template = {'spec': pod_spec}
  if buckets:   # GKE's Cloud Storage FUSE CSI driver, one ephemeral volume per bucket
    pod_template = {'metadata': {'annotations': {'gke-gcsfuse/volumes': 'true'}},
                    'spec': pod_spec}
    pod_spec['volumes'] = [
        {'name': f'gcs-{i}', 'csi': {'driver': GCSFUSE_DRIVER, 'volumeAttributes': {
            'bucketName': b, 'mountOptions': 'implicit-dirs,rename-dir-limit=100000'}}}
        for i, b in enumerate(buckets)]
    container['volumeMounts'] = [{'name': f'gcs-{i}', 'mountPath': f'{GCS_MOUNT_ROOT}/{b}'}
                                 for i, b in enumerate(buckets)]
  metadata = {'name': name, 'annotations': {EXCLUSIVE_TOPOLOGY: 'cloud.google.com/gke-nodepool'}}
  if namespace:
    metadata['namespace'] = namespace
  return {
      'apiVersion': API_VERSION,
      'kind': 'JobSet',
      'metadata': metadata,
      'spec': {
          'failurePolicy': {'maxRestarts': max_restarts},
          'network': {'enableDNSHostnames': True},
          'replicatedJobs': [{
              'name': 'slice',
              'replicas': 1,
              'template': {'spec': {
                  'parallelism': shape.hosts,
                  'completions': shape.hosts,
                  'completionMode': 'Indexed',
                  'backoffLimit': 0,
                  'template': pod_template,
              }},
          }],
      },
  }


def to_yaml(manifest: dict, header: str = '') -> str:
  """``manifest`` as YAML text (PyYAML when installed; else JSON, which is YAML too),
  after ``header`` as ``#`` comment lines.

  >>> print(to_yaml({'kind': 'JobSet', 'spec': {'n': 2}}, 'a slice'), end='')
  # a slice
  kind: JobSet
  spec:
    n: 2
  """
  try:
    import yaml
    text = yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False, width=1000)
  except ImportError:
    text = json.dumps(manifest, indent=2) + '\n'
  comment = ''.join(f'# {line}\n' for line in header.splitlines())
  return comment + text


class _Parser(argparse.ArgumentParser):
  """argparse whose mistakes are one line on stderr and exit code 2."""

  def error(self, message):
    raise UserError(f'{message}; see --help.')


def _parser() -> argparse.ArgumentParser:
  p = _Parser(
      prog='launch/gke_jobset.py',
      description='Writes (or applies) a JobSet that runs `python -m kdjax ARGS` on every '
                  'VM of a GKE TPU slice.',
      epilog='Everything after -- is the kdjax command, e.g. -- distill --config ... '
             '--workdir gs://BUCKET/run')
  p.add_argument('--accelerator', required=True,
                 help='v4, v5e, v5p, v6e or the GKE label (tpu-v5-lite-podslice, ...)')
  p.add_argument('--topology', required=True, help='the slice shape, e.g. 4x4 or 2x2x4')
  p.add_argument('--chips-per-host', type=int, default=None,
                 help='v5e/v6e 2x4 only: 8 (one VM, default) or 4 (two VMs)')
  p.add_argument('--image', required=True, help='container image with kdjax and jax[tpu]')
  p.add_argument('--name', default='kdjax', help='JobSet name (default: kdjax)')
  p.add_argument('--namespace', default=None)
  p.add_argument('--service-account', default=None,
                 help='Kubernetes service account (Workload Identity for the buckets)')
  p.add_argument('--env', action='append', default=[], metavar='KEY=VALUE',
                 help='extra environment variable (repeatable)')
  p.add_argument('--max-restarts', type=int, default=0,
                 help='times JobSet recreates the slice after a failure (default 0)')
  p.add_argument('--no-gcsfuse', action='store_true',
                 help='pass gs:// arguments to kdjax unchanged (no bucket mounts)')
  out = p.add_mutually_exclusive_group()
  out.add_argument('--dry-run', action='store_true',
                   help='print the manifest (the default)')
  out.add_argument('--apply', action='store_true', help='pipe it to `kubectl apply -f -`')
  return p


def build(argv: list[str]) -> tuple[str, argparse.Namespace]:
  """The manifest's YAML text and the parsed options for command line ``argv``.

  Raises:
    UserError: any mistake in ``argv``.
  """
  if '--' in argv:
    cut = argv.index('--')
    own, kdjax_args = argv[:cut], argv[cut + 1:]
  else:
    own, kdjax_args = argv, []
  opts = _parser().parse_args(own)
  if not kdjax_args:
    raise UserError('no kdjax command; put it after --, e.g. -- distill --config FILE '
                    '--workdir gs://BUCKET/run.')
  if not re.fullmatch(r'[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?', opts.name):
    raise UserError(f'--name {opts.name!r} must be a DNS label: lowercase letters, digits and '
                    '-, at most 40 characters.')
  if opts.max_restarts < 0:
    raise UserError(f'--max-restarts must be >= 0, got {opts.max_restarts}.')
  env = {}
  for item in opts.env:
    key, sep, value = item.partition('=')
    if not sep or not re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*', key):
      raise UserError(f'--env {item!r} is not KEY=VALUE.')
    env[key] = value
  shape = slice_shape(opts.accelerator, opts.topology, opts.chips_per_host)
  buckets: list[str] = []
  if not opts.no_gcsfuse:
    kdjax_args, buckets = gcs_to_mounts(kdjax_args)
  manifest = jobset(shape, name=opts.name, image=opts.image, kdjax_args=kdjax_args, env=env,
                    namespace=opts.namespace, service_account=opts.service_account,
                    buckets=tuple(buckets), max_restarts=opts.max_restarts)
  header = (f'{shape.system} {shape.topology}: {shape.chips} chips on {shape.hosts} TPU VM(s) of '
            f'{shape.chips_per_host} ({shape.machine_type}); one pod per VM.\n'
            f'Needs the JobSet controller in the cluster and a {shape.machine_type} '
            f'{shape.topology} TPU node pool.')
  return to_yaml(manifest, header), opts


def main(argv: list[str] | None = None) -> int:
  """Prints the manifest (or applies it with kubectl); 2 and one line on a mistake."""
  argv = sys.argv[1:] if argv is None else argv
  try:
    text, opts = build(argv)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if not opts.apply:
    sys.stdout.write(text)
    return 0
  try:
    return subprocess.run(['kubectl', 'apply', '-f', '-'], input=text, text=True).returncode
  except FileNotFoundError:
    print('error: kubectl is not on PATH; install it, or run with --dry-run and apply the '
          'output yourself.', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
