"""Stage the records of the finished runs of the grids kept in git (`runs/lcr2/<data>`, `runs/curves/<data>`, `runs/system1/<data>`): each
grid's results.csv/.md/.png and, for every finished and evaluated run, its small files (config.json, metrics.json,
log.csv, figures; never weights). A run counts as finished when its metrics.json has every number of the grid's
protocols and it has its final encoder.pth, or no weights at all (a kept record). A run still training, or one being
extended past an old evaluation, is left out: its record would be reused later as if it were finished.
Usage: python scripts/keep_records.py [grid folder ...]   (default: every grid under runs/lcr2, runs/curves and runs/system1)"""
import subprocess, sys
from pathlib import Path
from fgssl_nb.compare import kept_record, run_metrics

ROOT = Path(__file__).resolve().parents[1]
KEEP = ('config.json', 'metrics.json', 'log.csv', 'decoder_pairs.png', 'results.csv', 'results.md', 'results.png', 'curves.png', 'errors.json')

def finished(run: Path) -> bool:
    "Evaluated after its last epoch: a complete metrics.json written after its encoder.pth, or a kept record."
    if kept_record(run): return True
    m, w = run / 'metrics.json', run / 'encoder.pth'
    if not (m.exists() and w.exists()) or m.stat().st_mtime < w.stat().st_mtime: return False
    return run_metrics(run) is not None

def records(grid: Path) -> list[Path]:
    "The files of `grid` worth keeping: its tables and figures, and the small files of its finished runs."
    files = [grid / f for f in KEEP if (grid / f).exists()]
    for run in sorted(grid.glob('*/seed*')):
        if finished(run): files += [run / f for f in KEEP if (run / f).exists()]
    return files

if __name__ == '__main__':
    grids = [Path(a).resolve() for a in sys.argv[1:]] or sorted(p for d in ('runs/lcr2', 'runs/curves', 'runs/system1') for p in (ROOT / d).glob('*') if p.is_dir())
    files = [f for g in grids for f in records(g)]
    if not files: sys.exit(f"nothing to stage: no grid folder with a results.csv or finished runs among {[str(g) for g in grids] or 'runs/lcr2/*, runs/curves/*, runs/system1/*'}")
    subprocess.run(['git', 'add', '--', *map(str, files)], check=True, cwd=ROOT)
    print(f"staged {len(files)} files of {len(grids)} grid(s)")
