"Jigsaw pretext: permutation set, batched tiles vs a per-image loop, the network, the loss, a tiny run, exact resume."
import itertools
from pathlib import Path
import numpy as np
import pytest
from conftest import StopAfter
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.callback.training import GradientClip
from fastai.learner import CancelFitException
from fastai.torch_core import set_seed
from fgssl_nb.augment import RandColorJitter, RandGrayscale
from fgssl_nb.data import read_dataset, ssl_dls, normalize
from fgssl_nb.learner import ssl_learner, pretrain
from fgssl_nb.runs import load_encoder
from fgssl_nb.registry import get_method
from fgssl_nb.models import create_encoder
from fgssl_nb.jigsaw import (hamming_permutations, pairwise_hamming, permutation_set, save_permutations, load_permutations,
                             tile_geometry, JigsawTiles, JigsawNet, Jigsaw, perm_acc, puzzle_accuracy)


def _ham(a, b): return sum(x != y for x, y in zip(a, b))


# --- the permutation set
def test_hamming_set_p100():
    p = hamming_permutations(100, 9, seed=0)
    assert p.shape == (100, 9) and p.dtype == np.int64
    assert all(sorted(r) == list(range(9)) for r in p.tolist()), 'every row is a permutation of 0..8'
    assert len({tuple(r) for r in p.tolist()}) == 100, 'distinct'
    dmin = min(_ham(a, b) for a, b in itertools.combinations(p.tolist(), 2))  # plain pairwise loop
    assert dmin >= 6, dmin
    assert np.array_equal(p, hamming_permutations(100, 9, seed=0)), 'same seed, same set'
    assert not np.array_equal(p, hamming_permutations(100, 9, seed=1)), 'another seed, another set'
    assert np.array_equal(pairwise_hamming(p[:5]), [[_ham(a, b) for b in p[:5].tolist()] for a in p[:5].tolist()])


def test_greedy_rule_max_min():
    "Each pick's minimum distance to the earlier picks is the largest any unpicked permutation has (the greedy rule itself)."
    for tiles, P, seed in [(5, 15, 0), (6, 40, 2)]:
        p = hamming_permutations(P, tiles, seed).tolist()
        cands = list(itertools.permutations(range(tiles)))
        for k in range(1, P):
            best = max(min(_ham(c, s) for s in p[:k]) for c in cands if list(c) not in p[:k])
            assert min(_ham(p[k], s) for s in p[:k]) == best, (tiles, k)
    assert sorted(map(tuple, hamming_permutations(24, 4).tolist())) == list(itertools.permutations(range(4)))


def test_permutation_files(tmp_path):
    p = hamming_permutations(20, 9)
    f = save_permutations(p, tmp_path / 'run' / 'permutations.npy')
    assert np.array_equal(load_permutations(f, tiles=9), p)
    (tmp_path / 'bad.npy').write_bytes(b'junk')
    with pytest.raises(ValueError, match='unreadable permutation file.*delete it'): load_permutations(tmp_path / 'bad.npy')
    np.save(tmp_path / 'dup.npy', np.stack([p[0], p[0]]))
    with pytest.raises(ValueError, match='distinct'): load_permutations(tmp_path / 'dup.npy')
    with pytest.raises(ValueError, match='the grid has 4'): load_permutations(f, tiles=4)
    with pytest.raises(FileNotFoundError, match='no saved permutation set'): load_permutations(tmp_path / 'none.npy')
    # the cache: computed once, then read back as it is (a run keeps its set)
    c = permutation_set(20, 9, 0, cache_dir=tmp_path / 'cache')
    assert np.array_equal(c, p) and (tmp_path / 'cache' / 'perms-P20-t9-s0.npy').exists()
    np.save(tmp_path / 'cache' / 'perms-P20-t9-s0.npy', p[::-1])
    assert np.array_equal(permutation_set(20, 9, 0, cache_dir=tmp_path / 'cache'), p[::-1])


@pytest.mark.parametrize('args,msg', [((100, 16), 'tiles must be 2..9'), ((25, 4), r'P must be 1..24'), ((0, 9), 'P must be')])
def test_hamming_bad_args(args, msg):
    with pytest.raises(ValueError, match=msg): hamming_permutations(*args)


# --- tiles
def tiles_reference(x, perms, grid, tile_frac, tfms, params):
    "One image, one tile at a time: slice, jitter with this tile's parameters, normalise, place by the permutation."
    S, n = x.shape[-1], grid * grid
    cell = S // grid; t = round(cell * tile_frac); m = (S - grid * cell) // 2
    out = []
    for b in range(len(x)):
        tiles = []
        for k in range(n):
            oy, ox = (int(v) for v in params['offsets'][b, k])
            r, c = divmod(k, grid)
            tile = x[b:b + 1, :, m + r * cell + oy:m + r * cell + oy + t, m + c * cell + ox:m + c * cell + ox + t]
            for tf, tp in zip(tfms, params['tfms']):
                j = b * n + k
                tile = tf(tile, params={key: v[j:j + 1] if torch.is_tensor(v) and v.ndim and len(v) == len(x) * n else v
                                        for key, v in tp.items()})
            tiles.append(normalize(tile)[0])
        perm = perms[int(params['labels'][b])]
        out.append(torch.stack([tiles[perm[i]] for i in range(n)]))
    return torch.stack(out)


@pytest.mark.parametrize('S,grid', [(48, 3), (64, 3), (50, 2)])
def test_tiles_match_per_image_loop(S, grid):
    perms = hamming_permutations(12, grid * grid, seed=1)
    tfms = [RandColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8), RandGrayscale(0.3)]
    tiler = JigsawTiles(perms, grid, tfms=tfms)
    x = torch.rand(3, 3, S, S, generator=torch.Generator().manual_seed(0))
    tiles, labels = tiler(x, torch.Generator().manual_seed(5))
    params = tiler.draw(x, torch.Generator().manual_seed(5))  # the same generator seed gives the same draws
    assert torch.equal(labels, params['labels'])
    ref = tiles_reference(x, perms, grid, 64 / 75, tfms, params)
    assert tiles.shape == ref.shape == (3, grid * grid, 3, round(S // grid * 64 / 75), round(S // grid * 64 / 75))
    assert torch.allclose(tiles, ref, atol=1e-5)


def test_tile_geometry_spec_numbers():
    assert tile_geometry(225) == (75, 64, 0) and tile_geometry(64) == (21, 18, 0) and tile_geometry(96) == (32, 27, 0)
    with pytest.raises(ValueError, match='use a size of at least'): tile_geometry(12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_tiles_on_cuda_equal_cpu():
    perms = hamming_permutations(10, 9)
    tiler = JigsawTiles(perms, 3, tfms=[RandColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8)])
    x = torch.rand(4, 3, 64, 64)
    p = tiler.draw(x, torch.Generator().manual_seed(0))
    a, la = tiler(x, params=p)
    b, lb = tiler(x.cuda(), params=p)
    assert b.is_cuda and torch.equal(la, lb.cpu()) and torch.allclose(a, b.cpu(), atol=1e-4)


# --- network and loss
def test_jigsawnet_concatenates_shared_trunk_features():
    torch.manual_seed(0)
    net = JigsawNet(create_encoder('resnet18'), hamming_permutations(7, 9), grid=3, dropout=0.5).eval()
    x = torch.randn(2, 9, 3, 16, 16)
    with torch.no_grad():
        feats = torch.stack([torch.cat([net.encoder(x[b, i:i + 1])[0] for i in range(9)]) for b in range(2)])
        ref = feats @ net.head[1].weight.T + net.head[1].bias
        assert torch.allclose(net(x), ref, atol=1e-4)
        assert (net(x[:, [2, 1, 0, *range(3, 9)]]) - ref).abs().max() > 1e-3, 'tile order must matter'
    assert net.head[1].in_features == 9 * 512 and net.perms.tolist() == hamming_permutations(7, 9).tolist()
    with pytest.raises(ValueError, match='dropout'): JigsawNet(create_encoder('resnet18'), hamming_permutations(7, 9), dropout=1.0)


def test_loss_is_cross_entropy():
    cb = Jigsaw(Jigsaw.default_views(32))
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(8, 12, generator=g), torch.randint(12, (8,), generator=g)
    assert torch.allclose(cb.loss(logits, y), F.cross_entropy(logits, y), atol=1e-6)
    slow = np.mean([-np.log(np.exp(l) / np.exp(l).sum())[t] for l, t in zip(logits.double().numpy(), y.numpy())])
    assert abs(cb.loss(logits, y).item() - slow) < 1e-5
    assert perm_acc(torch.eye(4), torch.tensor([0, 1, 3, 3])).item() == 0.75


# --- the method on the Learner path
def _learner(birds, run_dir, size=32, bs=8, **kw):
    set_seed(0)
    dls = ssl_dls(read_dataset(birds), size=size, bs=bs, num_workers=0)
    return ssl_learner(dls, 'jigsaw', arch='resnet18', run_dir=run_dir, precision='fp32', **dict(dict(n_perms=10), **kw))


def test_method_registered_and_configured(birds):
    assert get_method('jigsaw') is Jigsaw
    learn = _learner(birds, None, n_perms=12, grid=3, dropout=0.3)
    assert learn.model.head[1].out_features == 12 and learn.model.head[0].p == 0.3 and len(learn.model.perms) == 12
    assert learn.moms == (0.9, 0.9, 0.9) and learn.run_state.default_lr == 1e-2 and learn.wd == 5e-4
    assert [c.max_norm for c in learn.cbs if isinstance(c, GradientClip)] == [4.0]
    with pytest.raises(ValueError, match='takes no views'): Jigsaw.default_views(32, 'simclr')
    with pytest.raises(ValueError, match='grid must be 2 or 3'): _learner(birds, None, grid=4)




def test_resume_gives_identical_weights(birds, tmp_path):
    "As tests/test_learner.py: stop after epoch 1 of 2, resume: bit-identical weights (dropout, puzzles, jitter all replayed)."
    a = pretrain(_learner(birds, tmp_path / 'a'), 2, run_dir=tmp_path / 'a', progress=False)
    b = _learner(birds, tmp_path / 'b'); b.add_cb(StopAfter(1))
    pretrain(b, 2, run_dir=tmp_path / 'b', progress=False)
    assert torch.load(tmp_path / 'b' / 'checkpoint.pth', weights_only=False)['epoch'] == 0
    assert not (tmp_path / 'b' / 'encoder.pth').exists()
    c = pretrain(_learner(birds, tmp_path / 'b'), 2, run_dir=tmp_path / 'b', resume=True, progress=False)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sc[k]) for k in sa), 'resumed run must end with exactly the same weights'
    assert not all(torch.equal(sa[k], sb[k]) for k in sa), 'the second epoch changed the weights'
    log_a, log_b = (tmp_path / 'a' / 'log.csv').read_text().splitlines(), (tmp_path / 'b' / 'log.csv').read_text().splitlines()
    assert log_a[0].split(',')[:4] == ['epoch', 'train_loss', 'valid_loss', 'perm_acc']
    assert len(log_b) == 3 and [l.split(',')[:4] for l in log_a] == [l.split(',')[:4] for l in log_b]
    # the run folder keeps the permutation set; the trunk is exported as a standard encoder
    assert np.array_equal(load_permutations(tmp_path / 'a' / 'permutations.npy'), a.model.perms.numpy())
    enc = load_encoder(tmp_path / 'a' / 'encoder.pth').eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(): assert torch.allclose(enc(x), a.model.encoder.eval()(x), atol=1e-6)


def test_tiny_run_learns(birds):
    "20 short epochs at 48 px, 4 permutations: fresh puzzles of the training images are solved well above chance (25%)."
    learn = _learner(birds, None, size=48, bs=8, n_perms=4, dropout=0.0)
    learn.fit_one_cycle(20, learn.run_state.default_lr, moms=learn.moms)
    losses = [v[0] for v in learn.recorder.values]
    assert losses[-1] < losses[0], losses
    x = torch.cat([b[0] for b in learn.dls.train.new(shuffle=False, drop_last=False)]).as_subclass(torch.Tensor)
    acc = puzzle_accuracy(learn.model, learn.run_state.method_cb.tiler, x, draws=5)
    assert acc > 0.4, acc


def test_puzzle_accuracy_counts():
    "An oracle network that reads the label off the tiles scores 1; one that always answers 0 scores the share of label 0."
    perms = hamming_permutations(4, 9)
    tiler = JigsawTiles(perms, 3, norm=False)
    S = 48; r, c = torch.meshgrid(torch.arange(S), torch.arange(S), indexing='ij')
    x = (r // 16 * 3 + c // 16).float().expand(6, 3, S, S).clone()  # pixel value = index of its cell
    class Oracle(torch.nn.Module):
        def __init__(self): super().__init__(); self.w = torch.nn.Parameter(torch.zeros(1))
        def forward(self, t):
            order = t[:, :, 0, 0, 0].long()                         # (B, 9) cell index at each position
            return torch.stack([(order == torch.as_tensor(perms)[k]).all(1).float() for k in range(4)], 1)
    assert puzzle_accuracy(Oracle(), tiler, x, draws=3) == 1.0
    class Zero(Oracle):
        def forward(self, t): return torch.tensor([[1., 0, 0, 0]]).expand(len(t), 4)
    g = torch.Generator().manual_seed(0)
    share = sum((tiler.draw(x, g)['labels'] == 0).sum().item() for _ in range(3)) / 18
    assert abs(puzzle_accuracy(Zero(), tiler, x, draws=3) - share) < 1e-9
