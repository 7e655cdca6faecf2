"""Stage the records of the finished runs of the grids kept in git (`runs/lcr2`, `runs/curves`): each grid's
`results.csv` and, for every run folder with a `metrics.json` (finished and evaluated), its small files. Runs still
training are left out: a half-written record would stop a later grid from training that run again.
Usage: python scripts/keep_records.py [grid folder ...]   (default: runs/lcr2/* runs/curves/*)"""
import subprocess, sys
from pathlib import Path

KEEP = ('config.json', 'metrics.json', 'log.csv', 'decoder_pairs.png', 'results.csv', 'results.md', 'results.png', 'curves.png', 'errors.json')

def records(grid: Path) -> list[Path]:
    "The files of `grid` worth keeping: its tables and figures, and the small files of its finished runs."
    files = [grid / f for f in KEEP if (grid / f).exists()]
    for run in sorted(grid.glob('*/seed*')):
        if (run / 'metrics.json').exists(): files += [run / f for f in KEEP if (run / f).exists()]
    return files

if __name__ == '__main__':
    grids = [Path(a) for a in sys.argv[1:]] or sorted(p for d in ('runs/lcr2', 'runs/curves') for p in Path(d).glob('*') if p.is_dir())
    files = [f for g in grids for f in records(g)]
    if files: subprocess.run(['git', 'add', '--', *map(str, files)], check=True)
    print(f"staged {len(files)} files of {len(grids)} grid(s)")
