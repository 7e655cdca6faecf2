"""Execute the notebooks top to bottom and keep their outputs (figures as PNG at dpi 72, tables, logs) in the files.

    python scripts/run_notebooks.py [NOTEBOOK ...] [--fast | --missing] [--keep-going]

Default: every notebook of nbs/ with all its cells, the `#| slow` ones included (the papers' figures and the
comparison grids: about an hour and a half on 2 CPU cores; the grids reuse the run folders in runs/ when they are
there). `--fast` skips the `#| slow` cells, keeping the outputs they already have; `--missing` runs only those
`#| slow` cells that have no output yet (with every other cell, so that they find what they need). Cells marked `#| eval: false` never
run, and `#| gpu` cells only where CUDA is (elsewhere they keep their outputs). A failing cell stops that notebook (its file is left unchanged) and, without `--keep-going`, the script. After
each notebook, `nbdev_clean` strips metadata (the outputs stay). tests/test_notebooks.py checks that every cell that
draws a figure has an image output."""
import os, re, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUP = "%matplotlib inline\nimport matplotlib; matplotlib.rcParams['figure.dpi'] = 72"


def _skip(cell, fast: bool = False, missing: bool = False, cuda: bool = False) -> bool:
    flags = [l.replace(' ', '') for l in cell.source.splitlines() if l.startswith('#|')]
    slow = '#|slow' in flags
    return ('#|eval:false' in flags or ('#|gpu' in flags and not cuda)
            or (slow and (fast or (missing and bool(cell.get('outputs'))))))


def run_notebook(path: Path, fast: bool = False, missing: bool = False) -> float:
    "Execute `path` in its folder (as nbdev_test does), write it back with its outputs; returns the seconds it took."
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    t0, cwd = time.time(), os.getcwd()
    os.chdir(path.parent)
    try:
        nb, sh = read_nb(path.name), CaptureShell(mpl_format='png')  # 'retina' (the default) doubles the bytes
        sh.run_cell(SETUP)
        import torch
        cuda = torch.cuda.is_available()
        for c in nb.cells:
            if c.cell_type != 'code' or _skip(c, fast, missing, cuda): continue
            sh.cell(c)
            if sh.exc: raise RuntimeError(f"{path.name}, cell {c.get('id')} ({c.source.splitlines()[0][:60]!r}): {sh.exc}")
        write_nb(nb, path.name)
    finally: os.chdir(cwd)
    subprocess.run(['nbdev_clean', '--fname', str(path)], check=True, cwd=ROOT)
    return time.time() - t0


if __name__ == '__main__':
    if {'-h', '--help'} & set(sys.argv[1:]): print(__doc__); sys.exit(0)
    unknown = [a for a in sys.argv[1:] if a.startswith('-') and a not in ('--fast', '--missing', '--keep-going')]
    if unknown: sys.exit(f"run_notebooks: unknown option {unknown[0]}; see --help")
    args = [a for a in sys.argv[1:] if not a.startswith('--')]
    fast, missing, keep_going = '--fast' in sys.argv, '--missing' in sys.argv, '--keep-going' in sys.argv
    paths = [Path(a).resolve() for a in args] or sorted((ROOT / 'nbs').glob('*.ipynb'))
    failed = []
    for p in paths:
        print(f"{p.name} ...", flush=True)
        try: print(f"{p.name}: {run_notebook(p, fast, missing):.0f} s", flush=True)
        except Exception as e:
            print(f"error: {e}", file=sys.stderr, flush=True); failed.append(p.name)
            if not keep_going: sys.exit(1)
    if failed: print(f"failed: {', '.join(failed)}", file=sys.stderr); sys.exit(1)
