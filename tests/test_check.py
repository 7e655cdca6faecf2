"""Issue 13: the pre-flight check finds every bad file in one report before a run (and caches what it decoded); broken
images are skipped only on request, with a record; writes that fail on a full disk say so in one line and lose nothing."""
import errno, os, shutil, subprocess, sys, time
from pathlib import Path
import pytest
import torch, torch.nn as nn
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fgssl_nb import data as fgdata
from fgssl_nb.data import read_dataset, AnnotationError
from fgssl_nb.check import preflight, check_for_run, PreflightError, check_images
from fgssl_nb.runs import WriteError, atomic_save, atomic_write_text, append_line, RunCheckpoint, RunCSVLogger, export_checkpoint, resume_from_checkpoint
from fgssl_nb.learner import pretrain, ssl_learner

pytestmark = pytest.mark.usefixtures('one_thread')


# --- a copy of flowers17-tiny with the faults of the issue planted

def plant(tiny: Path, dest: Path, text: bool = True, images: bool = True) -> dict:
    "Copy `tiny` to `dest` and plant the faults: three in the text files, a truncated train JPEG, a garbage test image."
    shutil.copytree(tiny, dest)
    rows = [l.split(maxsplit=1) for l in (dest / 'images.txt').read_text().splitlines()]
    split = dict(l.split() for l in (dest / 'train_test_split.txt').read_text().splitlines())
    if text:
        with open(dest / 'images.txt', 'a') as f: f.write(f'{rows[1][0]} {rows[1][1]}\n')     # line 51: id 2 again
        f = dest / 'image_class_labels.txt'; f.write_text(f.read_text().replace('\n3 1\n', '\n3 abc\n'))
        f = dest / 'train_test_split.txt'; f.write_text(f.read_text().replace('\n7 0\n', '\n').replace('\n7 1\n', '\n'))
    planted = {}
    if images:
        other = [(i, r) for i, r in rows if i not in ('2', '3', '7')]  # images whose text lines are fine
        planted['train'] = dest / 'images' / [r for i, r in other if split[i] == '1'][3]
        planted['test'] = dest / 'images' / [r for i, r in other if split[i] == '0'][3]
        b = planted['train'].read_bytes(); planted['train'].write_bytes(b[: len(b) * 2 // 3])
        planted['test'].write_bytes(b'\xff\xd8\xff\xe0' + bytes(range(256)) * 8)
    return planted


TEXT_FAULTS = ('images.txt:51: image id 2 is already on line 2; delete one of the two lines',
               "image_class_labels.txt:3: image id 3 has label 'abc', not a whole number; write its class id, 1..5",
               'train_test_split.txt: no entry for image id(s) 7 (images.txt line 7); add a line')


def test_one_report_lists_every_fault(tiny, tmp_path):
    bad = plant(tiny, tmp_path / 'd')
    with pytest.raises(PreflightError) as e: check_for_run(tmp_path / 'd', cache_dir=tmp_path / 'c')
    msg = str(e.value)
    for fault in TEXT_FAULTS: assert fault in msg
    assert f"{bad['train']} [train]: truncated or corrupt image data" in msg
    assert f"{bad['test']} [test]: not a readable image" in msg
    assert msg.startswith(f"{tmp_path / 'd'} (cub): 3 problem(s) in the annotation files and 2 unreadable image(s) (1 train, 1 test)")
    rep = e.value.report
    assert (len(rep.problems), set(rep.bad_images), rep.n_images) == (3, {str(bad['train']), str(bad['test'])}, 70)
    # the reader alone also reports all three text problems at once, not the first
    with pytest.raises(AnnotationError) as e2: read_dataset(tmp_path / 'd')
    assert len(e2.value.problems) == 3 and str(e2.value).startswith('3 problems in the annotation files:')


def test_clean_set_passes(tiny, tmp_path):
    ds, info = check_for_run(tiny, cache_dir=tmp_path)
    assert (len(ds), info) == (50, dict(skipped_images=0, skipped_train=0, skipped_test=0, skipped_unlabeled=0,
                                        n_train=30, n_test=20, n_unlabeled=20))


def test_second_check_decodes_nothing(tiny, tmp_path, monkeypatch):
    bad = plant(tiny, tmp_path / 'd', text=False)
    calls = []
    real = fgdata.image_problem
    monkeypatch.setattr(fgdata, 'image_problem', lambda *a: calls.append(Path(a[0])) or real(*a))
    first = preflight(tmp_path / 'd', cache_dir=tmp_path / 'c')
    assert (first.n_decoded, len(calls)) == (70, 70)
    t0 = time.perf_counter(); second = preflight(tmp_path / 'd', cache_dir=tmp_path / 'c'); dt = time.perf_counter() - t0
    assert (second.n_decoded, len(calls)) == (2, 72)           # only the two bad images decoded again
    assert second.bad_images == first.bad_images               # and still reported
    assert dt < first.seconds
    shutil.copy(tiny / 'images' / bad['train'].relative_to(tmp_path / 'd' / 'images'), bad['train'])  # repair one file
    third = preflight(tmp_path / 'd', cache_dir=tmp_path / 'c')
    assert (third.n_decoded, list(third.bad_images)) == (2, [str(bad['test'])])  # the repaired one is good again
    assert bad['train'] in calls[-2:]
    assert preflight(tmp_path / 'd', cache=False, cache_dir=tmp_path / 'c').n_decoded == 70


def test_a_passing_failure_is_not_cached(tmp_path, monkeypatch):
    "A read that failed for a passing reason (a permission fixed since, a disk hiccup) is tried again at the next check."
    from PIL import Image
    p = tmp_path / 'a.jpg'; Image.new('RGB', (32, 32)).save(p)
    real = fgdata.image_problem
    monkeypatch.setattr(fgdata, 'image_problem', lambda *a: 'Permission denied')
    assert check_images([(p, None, 0)], cache=tmp_path / 'c.json') == ({str(p): 'Permission denied'}, 1)
    monkeypatch.setattr(fgdata, 'image_problem', real)
    assert check_images([(p, None, 0)], cache=tmp_path / 'c.json') == ({}, 1)   # decoded again: good now
    assert check_images([(p, None, 0)], cache=tmp_path / 'c.json') == ({}, 0)   # and cached as good
    assert check_images([(p, None, 0)], cache=tmp_path / 'c.json', refresh=True) == ({}, 1)  # --no_cache decodes anew


def test_stale_cache_entry_is_not_trusted(tmp_path):
    from PIL import Image
    p = tmp_path / 'a.jpg'; Image.new('RGB', (32, 32)).save(p)
    assert check_images([(p, None, 0)], cache=tmp_path / 'c.json') == ({}, 1)
    p.write_bytes(b'garbage'); os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    bad, n = check_images([(p, None, 0)], cache=tmp_path / 'c.json')
    assert n == 1 and 'not a readable image' in bad[str(p)]


def test_skip_bad_leaves_images_out_with_a_record(tiny, tmp_path, capsys):
    bad = plant(tiny, tmp_path / 'd', text=False)
    with pytest.raises(PreflightError, match='pass --skip_bad to leave them out'): check_for_run(tmp_path / 'd', cache_dir=tmp_path / 'c')
    ds, info = check_for_run(tmp_path / 'd', tmp_path / 'run', skip_bad=True, cache_dir=tmp_path / 'c')
    assert info == dict(skipped_images=2, skipped_train=1, skipped_test=1, skipped_unlabeled=0, n_train=29, n_test=19, n_unlabeled=20)
    assert (len(ds), int(ds.is_train.sum()), len(ds.unlabeled)) == (48, 29, 20)
    assert bad['train'] not in ds.items and bad['test'] not in ds.items
    lines = (tmp_path / 'run' / 'skipped.txt').read_text().splitlines()
    assert lines[0].startswith('# 2 unreadable image(s)') and 'the run uses 29 train / 19 test / 20 unlabeled images' in lines[0]
    assert sorted(l.split('\t')[:2] for l in lines[2:]) == sorted([['train', str(bad['train'])], ['test', str(bad['test'])]])
    log = capsys.readouterr().out
    assert f"left out 2 unreadable image(s) (--skip_bad), listed in {tmp_path / 'run' / 'skipped.txt'}" in log
    assert str(bad['train']) in log and str(bad['test']) in log


def test_skip_bad_does_not_skip_text_problems(tiny, tmp_path):
    plant(tiny, tmp_path / 'd', images=False)
    with pytest.raises(PreflightError, match='--skip_bad does not skip them'):
        check_for_run(tmp_path / 'd', tmp_path / 'run', skip_bad=True, cache_dir=tmp_path / 'c')
    assert not (tmp_path / 'run' / 'skipped.txt').exists()


def test_skip_bad_refuses_to_empty_a_class(tmp_path, birds):
    d = Path(shutil.copytree(birds, tmp_path / 'b'))
    cls = sorted((d / 'images').iterdir())[0]
    for p in cls.iterdir(): p.write_bytes(b'garbage')
    with pytest.raises(ValueError, match=f'without its 4 unreadable image\\(s\\): class\\(es\\) with no images: {cls.name}'):
        check_for_run(d, skip_bad=True, cache_dir=tmp_path / 'c')


def test_missing_listed_file(tiny, tmp_path):
    shutil.copytree(tiny, tmp_path / 'd')
    victim = tmp_path / 'd' / 'images' / (tiny / 'images.txt').read_text().splitlines()[4].split()[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f'1 image file.*{victim.name}'): read_dataset(tmp_path / 'd')  # as before
    with pytest.raises(PreflightError) as e: check_for_run(tmp_path / 'd', skip_bad=True, cache_dir=tmp_path / 'c')
    assert f"images.txt:5: {victim} does not exist; restore the file or delete the line" in str(e.value)


def test_other_layouts_images_checked(tmp_path, tiny):
    "A class-folder set has no text files to parse; its images are decoded all the same."
    for k, p in enumerate(sorted((tiny / 'images').rglob('*.jpg'))[:12]):
        (tmp_path / 'd' / f'c{k % 2}').mkdir(parents=True, exist_ok=True); shutil.copy(p, tmp_path / 'd' / f'c{k % 2}' / p.name)
    bad = sorted((tmp_path / 'd' / 'c1').iterdir())[0]; bad.write_bytes(b'garbage')
    rep = preflight(tmp_path / 'd', cache_dir=tmp_path / 'c')
    assert (rep.layout, rep.problems, list(rep.bad_images), rep.n_images) == ('imagefolder', [], [str(bad)], 12)
    assert rep.bad_images[str(bad)][0] in ('train', 'test')


def _cli(*args, env=None):
    exe = Path(sys.executable).parent / 'fgssl_check'
    if not exe.exists(): pytest.skip(f'{exe} is not installed: `source scripts/env.sh` reinstalls after settings.ini changed')
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=300, env=env)


def test_cli_exit_codes(tiny, tmp_path):
    env = dict(os.environ, FGSSL_HOME=str(tmp_path / 'home'), OMP_NUM_THREADS='1')
    ok = _cli(tiny, env=env)
    assert (ok.returncode, ok.stderr) == (0, '') and ok.stdout.startswith(f'ok: {tiny} (cub): no problems; 70 images decoded in full (70 now')
    assert '70 images decoded in full (0 now, 70 unchanged since the last check)' in _cli(tiny, env=env).stdout  # cached
    plant(tiny, tmp_path / 'd')
    r = _cli(tmp_path / 'd', env=env)
    assert r.returncode == 2 and r.stderr.startswith('error: ') and r.stdout == ''
    for fault in TEXT_FAULTS + ('[train]: truncated or corrupt image data', '[test]: not a readable image'): assert fault in r.stderr
    r = _cli(tmp_path / 'nope', env=env)
    assert (r.returncode, r.stderr) == (2, f"error: data folder {tmp_path / 'nope'} does not exist\n")


def test_cli_help_is_fast_and_light():
    r = subprocess.run([sys.executable, '-c', 'import sys, fgssl_nb.check; print(sorted(m for m in ("torch", "fastai") if m in sys.modules))'],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == '[]'  # heavy imports happen inside the functions
    t0 = time.perf_counter(); h = _cli('--help'); dt = time.perf_counter() - t0
    assert h.returncode == 0 and h.stdout.startswith('usage: fgssl_check') and dt < 3, (dt, h.stderr)


# --- writes on a full disk

def tiny_learner(run_dir, n: int = 64) -> Learner:
    "A linear model on random data with `RunCheckpoint`: the smallest Learner that saves run checkpoints."
    g = torch.Generator().manual_seed(0)
    ds = list(zip(torch.randn(32, n, generator=g), torch.randn(32, n, generator=g)))
    dls = DataLoaders(DataLoader(ds, bs=16, shuffle=True), DataLoader(ds, bs=16), device=torch.device('cpu'))
    learn = Learner(dls, nn.Linear(n, n), loss_func=nn.MSELoss(), cbs=RunCheckpoint(run_dir), path=run_dir)
    learn.recorder.silent = True
    return learn


def fit(learn, n: int = 1, **kw):
    with learn.no_bar(): learn.fit(n, **kw)


def torch_on_full_disk(obj, f):
    "What torch.save does when the disk fills: part of the file written, then a RuntimeError raised from the OSError."
    f.write(b'PK' * 3000)
    try: raise OSError(errno.ENOSPC, 'No space left on device')
    except OSError: raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 6000 vs 5998')


def assert_one_clean_line(err, path: Path, kept: bool = True):
    msg = str(err)
    assert isinstance(err, WriteError) and isinstance(err, OSError) and '\n' not in msg, msg
    assert msg.startswith(f'could not write {path}: No space left on device (needs '), msg
    assert (f'the previous {path.name} is intact' if kept else f'no {path.name} was written') in msg, msg
    assert not list(path.parent.glob('*.tmp')), list(path.parent.iterdir())


def test_checkpoint_disk_full_injected(tmp_path, monkeypatch):
    learn = tiny_learner(tmp_path); fit(learn)
    good = (tmp_path / 'checkpoint.pth').read_bytes()
    monkeypatch.setattr(torch, 'save', torch_on_full_disk)
    with pytest.raises(WriteError) as e: fit(learn)
    assert e.value.args[0].startswith('Exception occured in `RunCheckpoint`')  # fastai rewrote args; str() is still one line
    assert_one_clean_line(e.value, tmp_path / 'checkpoint.pth')
    assert 'continue with resume=True (--resume)' in str(e.value) and e.value.errno == errno.ENOSPC
    assert (tmp_path / 'checkpoint.pth').read_bytes() == good


@pytest.fixture
def small_disk(tmp_path):
    "A 6 MB tmpfs: room for one small checkpoint, not for its replacement next to it."
    if os.geteuid() != 0: pytest.skip('mounting a small tmpfs needs root; test_checkpoint_disk_full_injected covers the same path')
    d = tmp_path / 'disk'; d.mkdir()
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=6m', 'tmpfs', str(d)], capture_output=True, text=True)
    if r.returncode: pytest.skip(f'cannot mount a tmpfs here: {r.stderr.strip()}')
    yield d
    subprocess.run(['umount', '-l', str(d)], check=False)


def test_checkpoint_on_a_really_full_disk(small_disk):
    learn = tiny_learner(small_disk, n=700)  # 0.49 M weights, fastai Adam keeps 2 more copies: ~5.9 MB per checkpoint
    fit(learn)
    good = (small_disk / 'checkpoint.pth').read_bytes()
    assert len(good) > 3e6
    with pytest.raises(WriteError) as e: fit(learn)  # the new one needs another ~5.9 MB beside the old
    assert_one_clean_line(e.value, small_disk / 'checkpoint.pth')
    assert (small_disk / 'checkpoint.pth').read_bytes() == good
    assert torch.load(small_disk / 'checkpoint.pth', weights_only=False)['epoch'] == 0
    # and the text files on the same full disk: a large one fails, the old version stays
    atomic_write_text(small_disk / 'metrics.json', '{"a": 1}')
    with pytest.raises(WriteError) as e: atomic_write_text(small_disk / 'metrics.json', 'x' * 4_000_000)
    assert_one_clean_line(e.value, small_disk / 'metrics.json')
    assert (small_disk / 'metrics.json').read_text() == '{"a": 1}'


def test_log_and_metrics_writes_fail_cleanly(tmp_path, monkeypatch):
    learn = tiny_learner(tmp_path)
    real, n = os.fsync, []
    def fsync(fd):  # the disk fills up when the second row of log.csv is written
        if os.readlink(f'/proc/self/fd/{fd}').endswith('log.csv'):
            n.append(fd)
            if len(n) == 2: raise OSError(errno.ENOSPC, 'No space left on device')
        real(fd)
    monkeypatch.setattr(os, 'fsync', fsync)
    with pytest.raises(WriteError) as e: fit(learn, 3, cbs=RunCSVLogger('log.csv'))
    assert_one_clean_line(e.value, tmp_path / 'log.csv')
    rows = (tmp_path / 'log.csv').read_text().splitlines()
    assert len(rows) == 2 and rows[0].startswith('epoch,train_loss') and rows[1].startswith('0,')  # no half row
    assert torch.load(tmp_path / 'checkpoint.pth', weights_only=False)['epoch'] == 0


def test_atomic_write_text_keeps_old_file(tmp_path, monkeypatch):
    f = atomic_write_text(tmp_path / 'results.csv', 'a,b\n1,2\n')
    monkeypatch.setattr(os, 'fsync', lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, 'No space left on device')))
    with pytest.raises(WriteError) as e: atomic_write_text(f, 'a,b\n1,2\n3,4\n')
    assert_one_clean_line(e.value, f)
    assert 'needs 12 bytes' in str(e.value) and f.read_text() == 'a,b\n1,2\n'
    with pytest.raises(WriteError) as e: append_line(tmp_path / 'new.csv', 'x\n')
    assert_one_clean_line(e.value, tmp_path / 'new.csv', kept=False)
    assert not (tmp_path / 'new.csv').exists()


def test_other_errors_are_not_write_errors(tmp_path):
    with pytest.raises(Exception) as e: atomic_save({'f': lambda: 0}, tmp_path / 'x.pth')  # a lambda cannot be pickled
    assert not isinstance(e.value, WriteError) and not list(tmp_path.iterdir())


# --- checkpoint size: an export without the optimiser state

def test_export_checkpoint_without_optimizer(tmp_path):
    (tmp_path / 'run').mkdir()
    learn = tiny_learner(tmp_path / 'run', n=128); fit(learn)
    full = tmp_path / 'run' / 'checkpoint.pth'
    slim = export_checkpoint(tmp_path / 'run', tmp_path)
    assert slim == tmp_path / 'checkpoint.pth'
    ck = torch.load(slim, weights_only=False)
    assert 'opt' not in ck and ck['epoch'] == 0 and set(ck['model']) == {'weight', 'bias'}
    w = sum(v.numel() * v.element_size() for v in ck['model'].values())  # bytes of the weights
    assert full.stat().st_size - slim.stat().st_size >= 1.9 * w  # what was dropped: Adam's two moments, twice the weights
    assert 'opt' in torch.load(export_checkpoint(full, tmp_path / 'whole.pth', keep_optimizer=True), weights_only=False)
    again = tiny_learner(tmp_path, n=128)
    ck['n_epoch'] = 3; atomic_save(ck, slim)  # an unfinished run without optimiser state cannot continue exactly
    with pytest.raises(ValueError, match='holds no optimiser state .* stopped after epoch 1 of 3: it cannot be continued'):
        resume_from_checkpoint(again, tmp_path)


def test_pretrain_drops_optimizer_after_last_epoch(birds, tmp_path):
    from fgssl_nb.data import ssl_dls
    def learner():
        return ssl_learner(ssl_dls(read_dataset(birds), size=32, bs=8, num_workers=0), 'simclr', precision='fp32',
                           run_dir=tmp_path, proj_dim=16)
    pretrain(learner(), 1, run_dir=tmp_path, progress=False, keep_optimizer=False)
    ck = torch.load(tmp_path / 'checkpoint.pth', weights_only=False)
    assert 'opt' not in ck and ck['epoch'] == 0
    before = torch.load(tmp_path / 'encoder.pth', weights_only=False)['state_dict']
    pretrain(learner(), 1, run_dir=tmp_path, resume=True, progress=False)  # finished: nothing to continue, no error
    after = torch.load(tmp_path / 'encoder.pth', weights_only=False)['state_dict']
    assert all(torch.equal(before[k], after[k]) for k in before)  # the encoder written again is the trained one


def test_unwritable_folder_says_so(tmp_path):
    with pytest.raises(WriteError) as e: atomic_write_text(tmp_path / 'gone' / 'metrics.json', '{}', hint='run the evaluation again')
    msg = str(e.value)
    assert msg.startswith(f"could not write {tmp_path / 'gone' / 'metrics.json'}: No such file or directory") and '\n' not in msg
    assert msg.endswith(f"check that {tmp_path / 'gone'} exists and is writable, then run the evaluation again")


def test_truncated_checkpoint_on_resume_is_one_line(tmp_path):
    learn = tiny_learner(tmp_path); fit(learn)
    f = tmp_path / 'checkpoint.pth'; f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # killed mid-copy, say
    with pytest.raises(ValueError) as e: resume_from_checkpoint(tiny_learner(tmp_path), tmp_path)
    assert str(e.value).startswith(f'{f}: unreadable checkpoint (') and '\n' not in str(e.value)
