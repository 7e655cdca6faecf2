"""The prepared GPU check (at most 8 minutes on one GPU): prints one markdown table for the README.

    python scripts/gpu_check.py [--out DIR] [--smoke]

1. MoCo v2 and synth-moco on ResNet-50 at 224 px, batch 64, bf16 and fp16: 50 training steps each (after 5 warm-up
   steps), source images/s and peak GPU memory;
2. evaluation on the GPU: `fgssl_eval`'s path (features on CUDA, float32 probes) for a ResNet-50 at 224 px, seconds;
3. where two or more GPUs exist: a 2-process NCCL run of MoCo v2 under torchrun (one epoch), its exit status.
Data: generated toy birds at 256 px (the device machine has no data sets and no network; no ImageNet weights either,
so the encoders start from random weights: the speed is the same). `--smoke`: the same path on the CPU at toy sizes
(ResNet-18, 32 px, 3 steps), to check the script itself; scripts/gpu_check.sh runs the rest (CUDA tests, gpu cells)."""
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path


def row(**kw): return kw


def train_rows(data, arch, size, bs, steps, device, precisions):
    import torch
    from fgssl_nb.data import read_dataset, ssl_dls
    from fgssl_nb.learner import ssl_learner
    from fgssl_nb.bench import timed_fit
    ds, rows = read_dataset(data), []
    for method in ('moco', 'synth-moco'):
        for prec in precisions:
            dls = ssl_dls(ds, size=size, bs=bs, valid_pct=0.0, num_workers=min(8, os.cpu_count() or 1), device=device)
            kw = dict(decoder_width=64) if method.startswith('synth') else {}
            learn = ssl_learner(dls, method, arch=arch, precision=prec, **kw)
            if device.type == 'cuda': torch.cuda.reset_peak_memory_stats()
            try: ips = timed_fit(learn, steps, skip=5 if steps >= 10 else 1)
            except Exception as e: rows.append(row(check=f'{method} {prec}', result=f'failed: {type(e).__name__}: {str(e)[:80]}')); continue
            mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == 'cuda' else float('nan')
            rows.append(row(check=f'{method} {arch} {size}px batch {bs}, {prec}', result=f'{ips:.0f} img/s, peak {mem:.1f} GiB'))
            del learn, dls
            if device.type == 'cuda': torch.cuda.empty_cache()
    return rows


def eval_row(data, arch, size, device, out):
    from fgssl_nb.cli import evaluate_run
    t0 = time.perf_counter()
    m = evaluate_run(encoder='random', arch=arch, data=data, size=size, out=out, device=str(device))
    return row(check=f'evaluation {arch} {size}px on {m["eval_device"]} ({m["eval_precision"]} features)',
               result=f'{time.perf_counter() - t0:.1f} s, {m["n_train"] + m["n_test"]} images')


def nccl_row(data, out):
    import torch
    if torch.cuda.device_count() < 2: return row(check='2-process NCCL run', result=f'skipped: {torch.cuda.device_count()} GPU')
    exe = Path(sys.executable).parent
    r = subprocess.run([str(exe / 'torchrun'), '--standalone', '--nproc_per_node', '2', str(exe / 'fgssl_pretrain'), '--method', 'moco',
                        '--data', str(data), '--size', '64', '--bs', '32', '--epochs', '1', '--no_knn', '--out', str(out)],
                       capture_output=True, text=True, timeout=300)
    return row(check='2-process NCCL run (torchrun, MoCo v2, 1 epoch)', result='ok' if r.returncode == 0 else f'failed: {r.stderr[-200:]}')


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', default=None, help='folder for the table (gpu_check.md) and the runs (default: a temporary folder)')
    ap.add_argument('--smoke', action='store_true', help='the same checks on the CPU at toy sizes')
    a = ap.parse_args(argv)
    import torch
    from fgssl_nb.toybirds import make_toybirds
    out = Path(a.out or tempfile.mkdtemp()); out.mkdir(parents=True, exist_ok=True)
    if not a.smoke and not torch.cuda.is_available(): raise SystemExit('gpu_check: no CUDA GPU here (use --smoke for the CPU check of the script)')
    device = torch.device('cpu' if a.smoke else 'cuda')
    arch, size, bs, steps = ('resnet18', 32, 8, 3) if a.smoke else ('resnet50', 224, 64, 50)
    data = make_toybirds(out / 'toybirds', n_per_class=8 if a.smoke else 40, n_unlabeled=16 if a.smoke else 320, size=48 if a.smoke else 256)
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'
    rows = train_rows(data, arch, size, bs, steps, device, ('fp32',) if a.smoke else ('bf16', 'fp16'))
    rows.append(eval_row(data, arch, size, device, out / 'eval'))
    if not a.smoke: rows.append(nccl_row(data, out / 'nccl'))
    lines = [f'GPU check on {name} ({torch.cuda.device_count()} GPU), torch {torch.__version__}, {time.strftime("%Y-%m-%d")}', '',
             '| check | result |', '| --- | --- |'] + [f"| {r['check']} | {r['result']} |" for r in rows]
    table = '\n'.join(lines)
    (out / 'gpu_check.md').write_text(table + '\n')
    print(table)
    print(f'\n{time.perf_counter() - t0:.0f} s; table in {out / "gpu_check.md"}')


if __name__ == '__main__': sys.exit(main())
