"""Every notebook runs top to bottom (code cells executed in order, tiny settings)."""

import glob
import json
import os

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, 'notebooks', '*.ipynb')))


@pytest.mark.slow
@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, monkeypatch, tmp_path_factory):
  monkeypatch.setenv('KDJAX_NOTEBOOK_TINY', '1')
  data_dir = os.environ.get('KDJAX_TEST_DATA_DIR') or str(tmp_path_factory.getbasetemp().parent / 'kdjax_data')
  monkeypatch.setenv('KDJAX_DATA_DIR', data_dir)
  monkeypatch.chdir(os.path.join(ROOT, 'notebooks'))
  import matplotlib
  matplotlib.use('Agg')
  cells = json.load(open(path))['cells']
  namespace = {'__name__': '__notebook__'}
  for i, cell in enumerate(cells):
    if cell['cell_type'] != 'code':
      continue
    source = ''.join(cell['source'])
    exec(compile(source, f'{os.path.basename(path)}[cell {i}]', 'exec'), namespace)
  assert NOTEBOOKS
