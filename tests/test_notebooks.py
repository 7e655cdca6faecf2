"""The committed notebooks show their results: every cell that draws a figure holds an image output, nbs/ stays small,
and no cell mixes imports with other code (nbdev's doc processing runs every cell with an import)."""
import json, re, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted((ROOT / 'nbs').glob('*.ipynb'))
sys.path.insert(0, str(ROOT / 'scripts'))
# calls that draw a figure in the notebook (not into a file only)
DRAWS = re.compile(r"plt\.(subplots|figure|imshow|plot|bar|hist|scatter)\(|\.show_batch\(|\.plot_loss\(|\bshow_cam\(|\bcam_grid\("
                   r"|\bpair_grid\(|\bplot_results\(|\bfeature_densities\(|\bvariance_spectrum\(|\btsne_plot\(|\bplot_label_efficiency\("
                   r"|\bshow_views\(|\.plot\(|\bplot_curves\(")


def _code_cells(p):
    for i, c in enumerate(json.loads(p.read_text())['cells']):
        if c['cell_type'] == 'code': yield i, ''.join(c['source']), c.get('outputs', [])


def _draws(src: str) -> bool:
    flags = [l.replace(' ', '') for l in src.splitlines() if l.startswith('#|')]
    if any(f.startswith(('#|export', '#|eval:false')) for f in flags): return False
    return bool(DRAWS.search('\n'.join(re.sub(r'#.*$', '', l) for l in src.splitlines())))  # comments do not draw


def test_every_figure_cell_has_an_image():
    missing = [f"{p.name} cell {i}: {src.splitlines()[0][:70]!r}" for p in NBS for i, src, outs in _code_cells(p)
               if _draws(src) and not any('image/png' in o.get('data', {}) for o in outs)]
    assert not missing, "cells that draw a figure without an image output (run scripts/run_notebooks.py):\n" + '\n'.join(missing)


def test_the_detector_sees_figures():  # the test above can fail: these sources draw, these do not
    assert _draws("fig, ax = plt.subplots(1, 2)") and _draws("ax = plot_curves(cur, floor=None)") and _draws("#| slow\nlearn.recorder.plot_loss()") and _draws("dls.show_batch(max_n=8)")
    assert not _draws("#| export\ndef f(): plt.subplots()") and not _draws("x = 1  # plt.subplots(")


def test_notebooks_stay_small():
    total = sum(p.stat().st_size for p in (ROOT / 'nbs').rglob('*') if p.is_file())
    assert total < 20e6, f"nbs/ holds {total / 1e6:.1f} MB: lower the dpi or the number of figures"


def test_no_cell_mixes_imports_with_code():
    from split_imports import split_cell
    mixed = [f"{p.name} cell {i}" for p in NBS for i, src, _ in _code_cells(p) if split_cell(src) is not None]
    assert not mixed, "cells mixing imports with code (python scripts/split_imports.py fixes them): " + ', '.join(mixed)
