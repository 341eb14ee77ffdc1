"""kdjax's layers, as ``docs/architecture.md`` draws them, checked on the source.

Every import of every module under ``kdjax/`` is read from its syntax tree, function-level
imports included, and resolved to the module it loads (``from kdjax.a import b`` is the
submodule ``kdjax.a.b`` when there is one, else the module ``kdjax.a``; importing
``kdjax.a.b`` also runs the package ``kdjax.a``). The tests fail on:

* a cycle between modules;
* an import against the layer order (a layer imports only layers below it; the units of
  one layer, such as ``distill`` and ``federated``, do not import each other);
* a private name (``_x``) of another module, imported or read through a module.
"""

from __future__ import annotations

import ast
import os
import re
from collections import defaultdict

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))

# Bottom to top; the units of one layer are siblings (see docs/architecture.md).
LAYERS = (
    ('kdjax.errors',),
    ('kdjax.storage',),
    ('kdjax.config',),
    ('kdjax.workdir',),
    ('kdjax.losses', 'kdjax.models', 'kdjax.data', 'kdjax.parallel'),
    ('kdjax.teacher',),
    ('kdjax.engine',),
    ('kdjax.cache',),
    ('kdjax.distill', 'kdjax.federated', 'kdjax.schemes', 'kdjax.plan'),
    ('kdjax.demo',),
    ('kdjax.demo_lm',),
    ('kdjax.cli',),
    ('kdjax.__main__',),
)


def modules_of(root: str, package: str = 'kdjax') -> dict[str, str]:
  """``{module name: file}`` for every ``.py`` file of ``package`` under ``root``."""
  out = {}
  base = os.path.join(root, package)
  for folder, _, files in os.walk(base):
    for f in files:
      if not f.endswith('.py'):
        continue
      rel = os.path.relpath(os.path.join(folder, f), root)[:-3].split(os.sep)
      if rel[-1] == '__init__':
        rel = rel[:-1]
      out['.'.join(rel)] = os.path.join(folder, f)
  return out


def _parents(name: str) -> list[str]:
  parts = name.split('.')
  return ['.'.join(parts[:i]) for i in range(2, len(parts))]


def imports_of(name: str, path: str, modules: dict[str, str]) -> list[tuple[str, int, str]]:
  """``(imported module, line, private name or '')`` for every kdjax import in a module,
  at any depth (function bodies too), and every ``module._private`` it reads."""
  tree = ast.parse(open(path).read(), path)
  is_package = os.path.basename(path) == '__init__.py'
  out, aliases = [], {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.split('.')[0] == 'kdjax' and alias.name in modules:
          out.append((alias.name, node.lineno, ''))
          aliases[alias.asname or alias.name] = alias.name
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:   # relative: resolve against this module's package
        pkg = name.split('.') if is_package else name.split('.')[:-1]
        pkg = pkg[:len(pkg) - node.level + 1]
        base = '.'.join(pkg + ([node.module] if node.module else []))
      if base.split('.')[0] != 'kdjax':
        continue
      for alias in node.names:
        sub = f'{base}.{alias.name}'
        if sub in modules:
          out.append((sub, node.lineno, ''))
          aliases[alias.asname or alias.name] = sub
        else:
          private = alias.name if alias.name.startswith('_') else ''
          out.append((base, node.lineno, private))
  for node in ast.walk(tree):   # module._private reads
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in aliases and node.attr.startswith('_')
        and not node.attr.startswith('__')):
      out.append((aliases[node.value.id], node.lineno, node.attr))
  return out


def graph(root: str = ROOT) -> tuple[dict[str, set[str]], list[tuple[str, str, int, str]]]:
  """The module graph (with the packages each import runs) and every import edge."""
  modules = modules_of(root)
  edges, listed = defaultdict(set), []
  for name, path in modules.items():
    own = set(_parents(name + '.x'))
    for target, line, private in imports_of(name, path, modules):
      listed.append((name, target, line, private))
      for t in [target] + _parents(target):
        if t != name and t not in own and t in modules:
          edges[name].add(t)
  return edges, listed


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in sorted(edges.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return out


def unit_of(module: str) -> str:
  return '.'.join(module.split('.')[:2])


def layer_of(module: str) -> int:
  unit = unit_of(module)
  for i, units in enumerate(LAYERS):
    if unit in units:
      return i
  raise KeyError(f'{module} is in no layer of LAYERS (docs/architecture.md): add it there')


def layer_violations(listed) -> list[str]:
  bad = []
  for src, dst, line, _ in listed:
    if unit_of(src) == unit_of(dst) or dst == 'kdjax':
      continue
    a, b = layer_of(src), layer_of(dst)
    if b > a:
      bad.append(f'{src}:{line} imports {dst}, a higher layer')
    elif b == a:
      bad.append(f'{src}:{line} imports its sibling {dst}')
  return bad


def private_imports(listed) -> list[str]:
  return [f'{src}:{line} uses {dst}.{private}' for src, dst, line, private in listed
          if private and dst != src]


def test_no_import_cycles():
  found = cycles(graph()[0])
  assert not found, '\n'.join(' <-> '.join(c) for c in found)


def test_imports_follow_the_layers():
  bad = layer_violations(graph()[1])
  assert not bad, '\n'.join(bad)


def test_no_module_uses_another_modules_private_names():
  bad = private_imports(graph()[1])
  assert not bad, '\n'.join(bad)


def test_every_module_is_in_a_layer():
  for module in modules_of(ROOT):
    if module != 'kdjax':
      layer_of(module)


def test_the_architecture_doc_lists_the_layers():
  doc = open(os.path.join(ROOT, 'docs', 'architecture.md')).read()
  diagram = doc.split('```')[1]
  for units in LAYERS:
    for unit in units:
      assert re.search(rf'(^|\s){unit[len("kdjax."):]}(\s|$)', diagram, re.M), unit


@pytest.fixture
def fake_tree(tmp_path):
  """A kdjax tree of its own: engine and teacher, written per test."""
  def write(files: dict[str, str]) -> str:
    for rel, text in files.items():
      path = tmp_path / rel
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(text)
    return str(tmp_path)
  return write


def test_the_checks_catch_a_cycle_a_layer_and_a_private_name(fake_tree):
  root = fake_tree({
      'kdjax/__init__.py': '',
      'kdjax/teacher.py': 'def load():\n  from kdjax.engine import loop\n',   # upward, in a function
      'kdjax/engine/__init__.py': 'from kdjax.engine.loop import run\n',
      'kdjax/engine/loop.py': 'from kdjax import teacher\nfrom kdjax.engine.feed import _gather\n'
                              'def run():\n  return teacher._secret\n',
      'kdjax/engine/feed.py': '_gather = None\n',
      'kdjax/distill/__init__.py': '',
      'kdjax/distill/train.py': 'import kdjax.federated.run\n',                # a sibling
      'kdjax/federated/__init__.py': '',
      'kdjax/federated/run.py': '',
  })
  edges, listed = graph(root)
  assert cycles(edges) == [['kdjax.engine', 'kdjax.engine.loop', 'kdjax.teacher']]
  bad = layer_violations(listed)
  assert 'kdjax.teacher:2 imports kdjax.engine.loop, a higher layer' in bad
  assert 'kdjax.distill.train:1 imports its sibling kdjax.federated.run' in bad
  assert private_imports(listed) == ['kdjax.engine.loop:2 uses kdjax.engine.feed._gather',
                                     'kdjax.engine.loop:4 uses kdjax.teacher._secret']
