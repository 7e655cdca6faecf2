"The console scripts, run as a user would: through the installed entry points."
import json, subprocess, sys, shutil
from pathlib import Path
import pytest

BIN = Path(sys.executable).parent


def run(*args, **kw):
    return subprocess.run([str(BIN / args[0]), *map(str, args[1:])], capture_output=True, text=True, timeout=300, **kw)


from test_check import plant, TEXT_FAULTS  # flowers17-tiny with three text faults, a truncated train and a garbage test image


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


DEMO_BAD_ARGUMENTS = [
    (['--data', '/no/such/folder'], 'error: data folder /no/such/folder does not exist'),
    (['--size', '0'], 'error: --size must be at least 16 px, got 0'),
    (['--method', 'swav'], "error: unknown method 'swav'"),
    (['--views', 'rainbow', '--epochs', '1'], "error: unknown views 'rainbow'"),
]


@pytest.mark.parametrize('i', range(len(DEMO_BAD_ARGUMENTS)), ids=[' '.join(a) for a, _ in DEMO_BAD_ARGUMENTS])
def test_demo_bad_arguments(cli_batch, i):
    r, _ = cli_batch([['fgssl_demo', '--out', '{tmp}/x', *a] for a, _ in DEMO_BAD_ARGUMENTS], i)
    assert r.returncode == 2 and r.stderr.strip().startswith(DEMO_BAD_ARGUMENTS[i][1]), r.stderr
    assert 'Traceback' not in r.stderr


def test_demo_corrupt_image_one_line(birds, tmp_path):
    d = Path(shutil.copytree(birds, tmp_path / 'b'))
    bad = sorted((d / 'images').rglob('*.jpg'))[0]; bad.write_bytes(b'\x00' * 100)
    r = run('fgssl_demo', '--data', d, '--out', tmp_path / 'x', '--size', 32)
    assert r.returncode == 2 and bad.name in r.stderr and 'Traceback' not in r.stderr


def test_bench_unknown_benchmark_lists_the_real_ones():
    r = run('fgssl_bench', 'speed')
    assert r.returncode != 0 and 'available: loader, methods, parts, eval, fp32, decoder, crop' in r.stderr and 'Traceback' not in r.stderr


def test_bench_help_explains_options():
    r = run('fgssl_bench', '--help')
    assert r.returncode == 0 and '--sizes' in r.stdout and 'images/s' in r.stdout


# --- issue 13: the pre-flight check and a full disk, through the console scripts

def test_pretrain_refuses_bad_data_before_training(tiny, tmp_path):
    plant(tiny, tmp_path / 'd')
    r = run('fgssl_pretrain', '--data', tmp_path / 'd', '--out', tmp_path / 'r', '--size', 32, '--bs', 8, '--epochs', 1)
    assert r.returncode == 2 and r.stderr.startswith('error: ') and 'Traceback' not in r.stderr
    for s in ('images.txt:51: image id 2 is already on line 2', "image_class_labels.txt:3: image id 3 has label 'abc'",
              '[train]: truncated or corrupt image data', '[test]: not a readable image'): assert s in r.stderr
    assert not (tmp_path / 'r' / 'checkpoint.pth').exists()


def test_pretrain_skip_bad_records_it(tiny, tmp_path):
    plant(tiny, tmp_path / 'd', text=False)
    r = run('fgssl_pretrain', '--data', tmp_path / 'd', '--out', tmp_path / 'r', '--size', 32, '--bs', 8, '--epochs', 1, '--skip_bad', '--no_knn')
    assert r.returncode == 0, r.stderr
    assert 'left out 2 unreadable image(s)' in r.stdout and (tmp_path / 'r' / 'skipped.txt').exists()
    cfg = json.loads((tmp_path / 'r' / 'config.json').read_text())
    assert cfg['data_check']['skipped_images'] == 2 and cfg['data_check']['n_test'] == 19
    # the evaluation leaves out the same images without being told (the run's config says so), and records it
    e = run('fgssl_eval', tmp_path / 'r', '--protocols', 'knn')
    assert e.returncode == 0, e.stderr
    m = json.loads((tmp_path / 'r' / 'metrics.json').read_text())
    assert (m['skipped_images'], m['skipped_train'], m['skipped_test'], m['n_train'], m['n_test']) == (2, 1, 1, 29, 19)


def test_pretrain_disk_full_one_line(birds, tmp_path):   # root only: a tmpfs too small for a ResNet-18 checkpoint
    import os
    if os.geteuid() != 0: pytest.skip('mounting a tmpfs needs root')
    d = tmp_path / 'disk'; d.mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=100m', 'tmpfs', d], capture_output=True).returncode:
        pytest.skip('cannot mount a tmpfs')
    try:
        r = run('fgssl_pretrain', '--data', birds, '--out', d / 'r', '--size', 32, '--bs', 8, '--epochs', 2, '--no_knn')
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert 'checkpoint.pth: No space left on device (needs 1' in r.stderr and 'continue with resume=True (--resume)' in r.stderr
        assert not list((d / 'r').glob('*.tmp'))
    finally: subprocess.run(['umount', '-l', d])


@pytest.mark.parametrize('cmd', [['fgssl_demo', '--epochs', '1', '--size', '32', '--bs', '8'],
                                 ['fgssl_eval', '--encoder', 'random', '--protocols', 'knn'],
                                 ['fgssl_compare', '--grid', 'system1', '--only', 'random init', 'simclr', '--epochs', '1',
                                  '--size', '32', '--bs', '8']])
def test_bad_data_one_report_every_command(cmd, tiny, tmp_path):
    "Every command that reads data stops before any work with the same report, once, exit status 2."
    bad = plant(tiny, tmp_path / 'd')
    r = run(*cmd, '--data', tmp_path / 'd', '--out', tmp_path / 'o')
    assert r.returncode == 2 and r.stderr.startswith('error: ') and 'Traceback' not in r.stderr, r.stderr[-2000:]
    assert r.stderr.count('error: ') == 1 and r.stderr.count('3 problem(s) in the annotation files and 2 unreadable') == 1
    for s in TEXT_FAULTS: assert s in r.stderr
    assert f"{bad['train']} [train]: truncated or corrupt image data" in r.stderr and f"{bad['test']} [test]: not a readable image" in r.stderr
    o = tmp_path / 'o'
    assert not [p for p in o.rglob('*') if p.is_file()] if o.exists() else True  # nothing written, nothing trained


def test_drop_optimizer(birds, tmp_path):
    import torch
    r = run('fgssl_pretrain', '--data', birds, '--out', tmp_path / 'r', '--size', 32, '--bs', 8, '--epochs', 1, '--no_knn',
            '--drop_optimizer', '--kw', 'proj_hidden=32', 'proj_dim=16')
    assert r.returncode == 0, r.stderr
    ck = torch.load(tmp_path / 'r' / 'checkpoint.pth', map_location='cpu', weights_only=False)
    assert 'opt' not in ck and 'model' in ck and (tmp_path / 'r' / 'encoder.pth').exists()
    r = run('fgssl_pretrain', '--help')
    assert r.returncode == 0 and '--skip_bad' in r.stdout and '--drop_optimizer' in r.stdout and 'SSL methods only' in r.stdout


def test_renamed_options_of_old_runs_and_old_flags():
    from fgssl_nb.cli import renamed_options
    assert renamed_options('synth-moco', {'k': 3, 'alpha': 0.5}) == {'n_dims': 3, 'alpha': 0.5}
    assert renamed_options('srgan', {'k': 1}) == {'drop_blocks': 1}
    assert renamed_options('pmg', {'backbone_lr_mult': 0.1}) == {'encoder_lr_mult': 0.1}
    assert renamed_options('simclr', {'k': 1}) == {'k': 1}  # no such rename for simclr: its own error follows
    assert renamed_options('synth-moco', {'k': 3, 'n_dims': 5}) == {'k': 3, 'n_dims': 5}  # both given: nothing guessed
