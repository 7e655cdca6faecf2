"""Distributed training on 2 CPU processes (torchrun, gloo): the contrastive losses and their gradients equal one process
with the whole batch, queues / statistics / weights are identical on both ranks, one process writes, a killed rank stops the
run, and --resume with the same world size ends where an uninterrupted run does."""
import os, shutil, signal, subprocess, sys, time
from pathlib import Path
import pytest, torch
from fastcore.test import test_close as close

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(not shutil.which('torchrun', path=str(BIN)), reason='needs torchrun (torch) in the environment')


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1', FGSSL_DIST_TIMEOUT='120')
    env.pop('WORLD_SIZE', None)
    if torch.cuda.device_count() < 2: env['CUDA_VISIBLE_DEVICES'] = ''  # fewer GPUs than processes: gloo on the CPU, GPUs hidden
    return env


def torchrun(*args, timeout=300, **kw):
    return subprocess.run([str(BIN / 'torchrun'), '--standalone', '--nproc_per_node', '2', *map(str, args)],
                          capture_output=True, text=True, env=_env(), timeout=timeout, **kw)


sys.path.insert(0, str(ROOT / 'tests'))


@pytest.fixture(scope='module')
def worker(birds, tmp_path_factory):
    "Each rank's results of tests/ddp_worker.py (collectives, then 2-epoch SimCLR, MoCo, synth-MoCo runs)."
    out = tmp_path_factory.mktemp('ddp')
    r = torchrun(ROOT / 'tests' / 'ddp_worker.py', out, birds)
    assert r.returncode == 0, r.stderr[-3000:]
    yield out, r
    shutil.rmtree(out, ignore_errors=True)  # its checkpoints: free /tmp for the later tests


def _ranks(out, name):
    return [torch.load(out / name.format(r), weights_only=False) for r in (0, 1)]


# ---- the one-process references, computed here (no process group)
def _reference(loss_fn, n_views=2):
    import ddp_worker as w
    model = w.toy()
    xs = w.inputs(n_views)
    loss = loss_fn(*[model(x) for x in xs])
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


@pytest.fixture(scope='module')
def refs():
    from fgssl_nb.simclr import nt_xent, multicrop_nt_xent
    from fgssl_nb.vicreg import vicreg_terms, vicreg_total
    return dict(simclr=_reference(nt_xent), naive=_reference(nt_xent),
                multicrop=_reference(lambda *zs: multicrop_nt_xent(list(zs), [(0, 1), (0, 2), (1, 2)]), 3),
                vicreg=_reference(lambda z1, z2: vicreg_total(vicreg_terms(z1, z2))))


@pytest.mark.parametrize('loss', ['simclr', 'multicrop', 'vicreg'])
def test_two_processes_give_the_loss_and_gradient_of_one(worker, refs, loss):
    out, _ = worker
    for res in _ranks(out, 'collectives{}.pt'):
        close(res[loss]['loss'], refs[loss][0], eps=1e-5)
        for g, g_ref in zip(res[loss]['grads'], refs[loss][1]): close(g, g_ref, eps=1e-5)


def test_gather_without_all_reduce_gets_the_gradient_wrong(worker, refs):
    "The test above can fail: the common gather bug (no all-reduce in backward) gives the right loss and a wrong gradient."
    res = _ranks(worker[0], 'collectives{}.pt')[0]['naive']
    close(res['loss'], refs['naive'][0], eps=1e-5)
    assert max((g - r).abs().max().item() for g, r in zip(res['grads'], refs['naive'][1])) > 1e-3


def test_feature_stats_and_dino_centre_are_those_of_the_global_batch(worker):
    from fgssl_nb.synth import FeatureStats
    from fgssl_nb.dino import update_center
    g = torch.Generator().manual_seed(2)
    hs = [torch.randn(8, 5, generator=g) * torch.arange(1, 6) + 3 for _ in range(2)]
    fs = FeatureStats(5)
    for h in hs: fs.update(h)
    center = update_center(torch.zeros(1, 5), hs[0], 0.9)
    for res in _ranks(worker[0], 'collectives{}.pt'):
        close(res['feat_stats']['mean'], fs.mean, eps=1e-5); close(res['feat_stats']['var'], fs.var, eps=1e-4)
        close(res['center'], center, eps=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason='shows what fails on machines without CUDA')
def test_what_the_cpu_subclasses_fix(worker):
    "fastai's DistributedDL broadcasts its indices with .cuda() and SyncBatchNorm needs CUDA: FgsslDistributedDL and the trainer avoid both."
    for r, res in enumerate(_ranks(worker[0], 'collectives{}.pt')):
        assert isinstance(res['fastai_broadcast'], str), 'fastai broadcasts on CUDA: expected to fail on a machine without it'
        assert res['our_broadcast'] == [1, 2, 3]  # rank 0's list on both ranks
        assert res['syncbn'] != 'ok'


@pytest.mark.parametrize('method', ['simclr', 'moco', 'synth-moco', 'byol', 'simsiam', 'vicreg', 'dino', 'jigsaw'])
def test_both_ranks_end_with_identical_weights_and_one_writer(worker, method):
    from ddp_worker import RUN_METHODS
    out = worker[0] / method
    a, b = _ranks(out, 'rank{}.pt')
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model']), 'the two processes drifted apart'
    ck = torch.load(out / 'checkpoint.pth', weights_only=False)
    assert ck['world_size'] == 2 and len(ck['rng_ranks']) == 2
    assert not torch.equal(ck['rng_ranks'][0]['torch'], ck['rng_ranks'][1]['torch'])  # each process its own augmentations
    assert all(torch.equal(ck['model'][k], a['model'][k]) for k in a['model'])  # rank 0 wrote the checkpoint
    assert len((out / 'log.csv').read_text().splitlines()) == 1 + RUN_METHODS[method]  # header + a row per epoch: one writer


def test_moco_queue_holds_the_keys_of_both_ranks(worker):
    a, b = _ranks(worker[0] / 'moco', 'rank{}.pt')
    assert torch.equal(a['model']['queue.keys'], b['model']['queue.keys'])
    # each step pushes the keys of both processes: 2 ranks x 4 images, 2 epochs
    assert a['model']['queue.ptr'].item() == (2 * 4 * 2 * a['n_batches']) % len(a['model']['queue.keys'])


def test_synth_picks_the_same_dims_on_both_ranks(worker):
    a, b = _ranks(worker[0] / 'synth-moco', 'rank{}.pt')
    assert a['dims'] is not None and torch.equal(a['dims'], b['dims'])
    assert torch.equal(a['model']['feat_stats.var'], b['model']['feat_stats.var'])


def _cmd(data, out, epochs, *extra):
    return ['--no-python', 'fgssl_pretrain', '--method', 'simclr', '--data', data, '--out', out, '--epochs', epochs,
            '--size', '32', '--bs', '4', '--workers', '0', '--no_knn', '--precision', 'fp32', *extra]


def test_killed_rank_stops_the_run_and_resume_matches(birds, tmp_path):
    import psutil
    full = torchrun(*_cmd(birds, tmp_path / 'full', 4))
    assert full.returncode == 0, full.stderr[-3000:]
    assert 'global batch 8' in full.stdout
    p = subprocess.Popen([str(BIN / 'torchrun'), '--standalone', '--nproc_per_node', '2', *map(str, _cmd(birds, tmp_path / 'cut', 4))],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    ck, t0 = tmp_path / 'cut' / 'checkpoint.pth', time.time()
    while not ck.exists() and time.time() - t0 < 300: time.sleep(0.05)
    rank1 = [c for c in psutil.Process(p.pid).children(recursive=True) if c.environ().get('RANK') == '1']
    assert rank1, 'no rank-1 worker found'
    rank1[0].send_signal(signal.SIGKILL); t_kill = time.time()
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and time.time() - t_kill < 60, 'the surviving rank must stop, not hang'
    assert 'another process of this run failed or was stopped' in err and 'continue with --resume' in err, err[-2000:]
    assert not (tmp_path / 'cut' / 'encoder.pth').exists()
    # another world size: refused in one line
    one = subprocess.run([str(BIN / 'fgssl_pretrain'), *map(str, _cmd(birds, tmp_path / 'cut', 4, '--resume')[2:])],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert one.returncode == 2 and 'was written by a run on 2 processes, this one has 1' in one.stderr, one.stderr[-2000:]
    r = torchrun(*_cmd(birds, tmp_path / 'cut', 4, '--resume'))
    assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(tmp_path / 'full' / 'encoder.pth', weights_only=False)['state_dict']
    b = torch.load(tmp_path / 'cut' / 'encoder.pth', weights_only=False)['state_dict']
    assert all(torch.equal(a[k], b[k]) for k in a), 'killed and resumed on 2 processes: weights differ from the uninterrupted run'
    assert len((tmp_path / 'cut' / 'log.csv').read_text().splitlines()) == 5


def test_srgan_refuses_in_one_line(birds, tmp_path):
    r = torchrun('--no-python', 'fgssl_pretrain', '--method', 'srgan', '--data', birds, '--out', tmp_path / 's', '--epochs', 1,
                 '--size', 32, '--bs', 4, '--workers', 0)
    assert r.returncode != 0 and 'error: srgan does not run on several processes' in r.stderr, r.stderr[-2000:]
