"The console scripts, run as a user would: through the installed entry points."
import json, subprocess, sys, shutil
from pathlib import Path
import pytest

BIN = Path(sys.executable).parent


def run(*args, **kw):
    return subprocess.run([str(BIN / args[0]), *map(str, args[1:])], capture_output=True, text=True, timeout=300, **kw)


def test_demo_end_to_end(tiny, tmp_path):
    "The main job on real data: summary, grids, a (1-epoch) pretraining, its evaluation, the supervised reference and the random floor, the table."
    r = run('fgssl_demo', '--data', tiny, '--out', tmp_path / 'run', '--size', 32, '--bs', 8, '--epochs', 1)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / 'run' / 'data_summary.json').read_text())
    assert (s['n_labeled'], s['n_train'], s['n_test'], s['n_unlabeled'], len(s['classes'])) == (50, 30, 20, 20, 5)
    for f in ('batch_labeled.png', 'batch_ssl.png'): assert (tmp_path / 'run' / f).stat().st_size > 1000
    assert '5 classes, 50 labelled images (30 train / 20 test), 20 unlabelled' in r.stdout
    rows = json.loads((tmp_path / 'run' / 'results.json').read_text())
    assert [x['name'] for x in rows] == ['simclr (1 ep)', 'supervised (1 ep, labels)', 'random init']
    assert 0 <= rows[1]['supervised_top1'] <= 1
    for x in rows: assert all(0 <= x[k] <= 1 for k in ('linear_top1', 'knn_top1', 'retrieval_rank1', 'retrieval_rank5', 'retrieval_map'))
    assert (tmp_path / 'run' / 'results.md').read_text().startswith('| method | linear top-1')
    assert '| random init |' in r.stdout


def test_demo_keeps_existing_files(birds, tmp_path):
    out = tmp_path / 'run'; out.mkdir(); (out / 'metrics.json').write_text('{"keep": 1}')
    r = run('fgssl_demo', '--data', birds, '--out', out, '--size', 32, '--bs', 4, '--epochs', 1)
    assert r.returncode == 0, r.stderr
    assert (out / 'metrics.json').read_text() == '{"keep": 1}'


@pytest.mark.parametrize('args,msg', [
    (['--data', '/no/such/folder'], 'error: data folder /no/such/folder does not exist'),
    (['--size', '0'], 'error: --size must be at least 16 px, got 0'),
    (['--method', 'swav'], "error: unknown method 'swav'"),
    (['--views', 'rainbow', '--epochs', '1'], "error: unknown views 'rainbow'"),
])
def test_demo_bad_arguments(args, msg, tmp_path):
    r = run('fgssl_demo', '--out', tmp_path / 'x', *args)
    assert r.returncode == 2 and r.stderr.strip().startswith(msg), r.stderr
    assert 'Traceback' not in r.stderr


def test_demo_corrupt_image_one_line(birds, tmp_path):
    d = Path(shutil.copytree(birds, tmp_path / 'b'))
    bad = sorted((d / 'images').rglob('*.jpg'))[0]; bad.write_bytes(b'\x00' * 100)
    r = run('fgssl_demo', '--data', d, '--out', tmp_path / 'x', '--size', 32)
    assert r.returncode == 2 and bad.name in r.stderr and 'Traceback' not in r.stderr


def test_bench_unknown_benchmark_lists_the_real_ones():
    r = run('fgssl_bench', 'speed')
    assert r.returncode != 0 and 'available: loader, methods, parts' in r.stderr and 'Traceback' not in r.stderr


def test_bench_help_explains_options():
    r = run('fgssl_bench', '--help')
    assert r.returncode == 0 and '--sizes' in r.stdout and 'images/s' in r.stdout
