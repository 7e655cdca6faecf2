"""How an SSL method adapts an ImageNet start: one run per setting of the encoder's learning-rate multiplier, head
warm-up and frozen BatchNorm statistics, each evaluated with the frozen-feature protocols (linear, k-NN, retrieval).

    python scripts/adapt_sweep.py DATA METHOD EPOCHS [--seed S] [--out runs/adapt] VARIANT [VARIANT ...]

A VARIANT is `name:key=value,key=value` (`base:` for none), for example `lr0.1_bn:encoder_lr_mult=0.1,freeze_bn=True`;
parts that start with `--` are command-line flags (`crop1.5:--crop_from=1.5`).
Every run is `fgssl_pretrain --method METHOD --arch efficientnet_lite0 --pretrained --size 96 --bs 64` (the lcr
preset's setting) into OUT/<data>/<method>_e<EPOCHS>_s<S>/<name>, resumed if interrupted, skipped when its
metrics.json exists. The frozen ImageNet encoder is evaluated once per data set (OUT/<data>/imagenet). Prints one row
per run and appends it to OUT/summary.csv."""
import argparse, csv, json, subprocess, sys, time
from pathlib import Path

KEYS = ['linear_top1', 'knn_top1', 'retrieval_rank1', 'retrieval_rank5', 'retrieval_map']

def sh(*cmd):
    print('$', ' '.join(map(str, cmd)), flush=True)
    subprocess.run(list(map(str, cmd)), check=True)

def evaluated(run: Path, *extra):
    if not (run / 'metrics.json').exists(): sh('fgssl_eval', *extra, '--protocols', 'linear', 'knn', 'retrieval')
    return json.loads((run / 'metrics.json').read_text())

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('data'); ap.add_argument('method'); ap.add_argument('epochs', type=int)
    ap.add_argument('variants', nargs='+'); ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--out', default='runs/adapt')
    a = ap.parse_args()
    root = Path(a.out) / Path(a.data).name
    base = root / 'imagenet'
    rows = [dict(data=Path(a.data).name, run='imagenet (frozen)', seconds=0,
                 **{k: evaluated(base, '--encoder', 'imagenet', '--arch', 'efficientnet_lite0', '--size', 96, '--data', a.data, '--out', base).get(k) for k in KEYS})]
    for v in a.variants:
        name, _, kws = v.partition(':')
        parts = [p for p in kws.split(',') if p]
        kw = [p for p in parts if not p.startswith('--')]
        flags = [x for p in parts if p.startswith('--') for x in p.split('=', 1)]  # e.g. --crop_from=1.5
        run = root / f'{a.method}_e{a.epochs}_s{a.seed}' / name
        t0 = time.time()
        if not (run / 'encoder.pth').exists():
            sh('fgssl_pretrain', '--method', a.method, '--data', a.data, '--arch', 'efficientnet_lite0', '--pretrained',
               '--size', 96, '--bs', 64, '--epochs', a.epochs, '--seed', a.seed, '--out', run,
               *(['--resume'] if (run / 'checkpoint.pth').exists() else []), *flags, *(['--kw', *kw] if kw else []))
        m = evaluated(run, run)
        rows.append(dict(data=Path(a.data).name, run=f'{a.method} e{a.epochs} s{a.seed} {name}', seconds=round(time.time() - t0),
                         **{k: m.get(k) for k in KEYS}))
        print(rows[-1], flush=True)
    f = Path(a.out) / 'summary.csv'
    new = not f.exists()
    with f.open('a', newline='') as fh:
        w = csv.DictWriter(fh, fieldnames=['data', 'run', 'seconds', *KEYS])
        if new: w.writeheader()
        w.writerows(rows)
    for r in rows: print(' | '.join(str(r[k]) if not isinstance(r[k], float) else f'{100 * r[k]:.1f}' for k in r))

if __name__ == '__main__': sys.exit(main())
