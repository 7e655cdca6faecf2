"System 2, synthesized pairs: known answers for the dimension selection, the perturbation and the running statistics; the wrapper vs its base method; exact resume."
import math
import pytest
from conftest import StopAfter
import torch, torch.nn as nn, torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.learner import CancelFitException
from fastai.torch_core import set_seed
from fgssl_nb.data import read_dataset, ssl_dls
from fgssl_nb.learner import ssl_learner, pretrain
from fgssl_nb.registry import get_method, method_options
from fgssl_nb.synth import (FeatureDecoder, FeatureStats, SynthPairs, frozen_bn_stats, gradcam_dim_importance,
                            low_variance_dims, perturb, recon_loss, resolve_n_dims, select_dims, synth_overhead)

SMALL = dict(moco=dict(proj_hidden=32, proj_dim=16), simsiam=dict(proj_dim=16))


def _learner(birds, method, run_dir=None, **kw):
    set_seed(0)
    dls = ssl_dls(read_dataset(birds), size=32, bs=4, num_workers=0)
    base = method.removeprefix('synth-')
    extra = dict(decoder_width=32) if base != method else {}
    return ssl_learner(dls, method, arch='resnet18', precision='fp32', run_dir=run_dir, **SMALL[base], **extra, **kw)


class Stop(Callback):
    "Stop after `n` training batches (no validation)."
    order = 100
    def __init__(self, n): self.n = n
    def after_batch(self):
        if self.training and self.iter + 1 >= self.n: raise CancelFitException


def _steps(learn, n, *cbs):
    with learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=[Stop(n), *cbs])
    return learn


# --- dimension selection -------------------------------------------------------------------------------------------

def test_low_variance_dims_constructed_matrix():
    z = torch.tensor([[1.], [-1.], [1.], [-1.]])                      # unit variance
    s = torch.tensor([3., 0.5, 2., 0.1, 0.5, 1., 0.])                  # column j has variance s[j]^2
    H = z * s + 10 * torch.arange(7.)                                  # offsets do not matter
    assert low_variance_dims(H, 3).tolist() == [6, 3, 1]               # var 0, 0.01, 0.25 (tie with column 4: lower index first)
    assert low_variance_dims(H, 4).tolist() == [6, 3, 1, 4]
    assert low_variance_dims(H, 0.5).tolist() == [6, 3, 1, 4]          # round(0.5 * 7) = 4 (Python rounds half to even)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    assert low_variance_dims(H[:, perm], 2).tolist() == [perm.tolist().index(6), perm.tolist().index(3)]


@pytest.mark.parametrize('k,msg', [(0, 'a count >= 1'), (8, 'the feature has 7'), (1.5, 'fraction in (0, 1)'), (True, 'n_dims must be'), ('3', 'n_dims must be')])
def test_resolve_n_dims_bad(k, msg):
    with pytest.raises(ValueError, match=msg.replace('(', r'\(').replace(')', r'\)')): resolve_n_dims(k, 7)


def test_resolve_n_dims():
    assert (resolve_n_dims(0.25, 512), resolve_n_dims(1e-4, 512), resolve_n_dims(3, 512), resolve_n_dims(512, 512), resolve_n_dims(3.0, 512)) == (128, 1, 3, 512, 3)


def _fd_importance(h, loss_fn, eps=1e-6):
    "Reference: ReLU(mean_b h_bd dL/dh_bd) with the gradient by central finite differences (float64)."
    h = h.double(); g = torch.zeros_like(h)
    for b in range(h.shape[0]):
        for d in range(h.shape[1]):
            e = torch.zeros_like(h); e[b, d] = eps
            g[b, d] = (loss_fn(h + e) - loss_fn(h - e)) / (2 * eps)
    return F.relu((h * g).mean(0))


def test_gradcam_ranks_ignored_dim_least_important():
    torch.manual_seed(0)
    w = torch.tensor([1., 0.5, 0., 2., 0.3], dtype=torch.float64)       # the loss does not depend on dim 2
    head = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    with torch.no_grad(): head[0].weight[:, 2] = 0
    loss_fn = lambda h: (h ** 2 * w).sum(1).mean() + 0.01 * head(h).pow(2).mean()
    h = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    imp = gradcam_dim_importance(h, loss_fn(h))
    assert torch.allclose(imp.double(), _fd_importance(h.detach(), loss_fn), atol=1e-6)
    assert imp[2] == 0 and (imp[[0, 1, 3, 4]] > 0).all()
    var = h.detach().var(0)
    var[2] = var.max() + 1                                             # even with the highest variance...
    assert select_dims(1, 'gradcam', var=var, importance=imp).tolist() == [2]  # ...it is the least important


def test_select_dims_rank_sum_and_ties():
    var = torch.tensor([0.5, 0.1, 0.3, 0.0, 0.9])
    imp = torch.tensor([0.0, 0.7, 0.0, 0.4, 0.0])
    assert select_dims(2, 'variance', var).tolist() == [3, 1]
    assert select_dims(3, 'gradcam', var, imp).tolist() == [2, 0, 4]   # equal importances: by variance
    # variance ranks [3,1,2,0,4]; importance ranks (ties by variance) [1,4,0,3,2]; sums [4,5,2,3,6]
    assert select_dims(2, 'both', var, imp).tolist() == [2, 3]
    with pytest.raises(ValueError, match='criterion must be one of'): select_dims(2, 'entropy', var)
    with pytest.raises(ValueError, match='needs the Grad-CAM'): select_dims(2, 'both', var)


# --- perturbation ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('noise', ['gaussian', 'shuffle'])
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_perturb_changes_exactly_the_selected_dims(noise, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(16, 32, generator=g)
    dims = torch.randperm(32, generator=g)[:7]
    ht = perturb(h, dims, noise, generator=g)
    changed = ht != h
    assert changed[:, dims].all()
    keep = torch.ones(32, dtype=torch.bool); keep[dims] = False
    assert torch.equal(ht[:, keep], h[:, keep])


def test_perturb_laws():
    g = torch.Generator().manual_seed(0)
    h, std = torch.randn(8, 6, generator=g), torch.rand(6, generator=g)
    dims = torch.tensor([4, 1])
    ht = perturb(h, dims, 'gaussian', scale=2.0, std=std, generator=torch.Generator().manual_seed(5))
    eps = torch.randn(8, 2, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(ht[:, dims] - h[:, dims], 2.0 * std[dims] * eps, atol=1e-6)
    ht = perturb(h, dims, 'shuffle', generator=g)
    for d in dims.tolist():
        for b in range(8):
            others = torch.cat([h[:b, d], h[b + 1:, d]])
            assert (others == ht[b, d]).any(), 'a shuffled value comes from another sample of the batch'
    half = perturb(h, dims, 'shuffle', scale=0.5, generator=torch.Generator().manual_seed(3))
    full = perturb(h, dims, 'shuffle', scale=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(half[:, dims], (h[:, dims] + full[:, dims]) / 2, atol=1e-6)
    with pytest.raises(ValueError, match='at least 2'): perturb(h[:1], dims, 'shuffle')
    with pytest.raises(ValueError, match='noise must be one of'): perturb(h, dims, 'uniform')


# --- running statistics ---------------------------------------------------------------------------------------------

def test_ema_variance_known_answers():
    g = torch.Generator().manual_seed(0)
    b = torch.randn(32, 5, generator=g) * torch.arange(1., 6) + 3
    st = FeatureStats(5)
    for _ in range(7): st.update(b, momentum=0.9)                      # constant stream: the batch's own variance
    assert torch.allclose(st.var, b.var(0, unbiased=False), atol=1e-5) and torch.allclose(st.mean, b.mean(0), atol=1e-5)
    b1, b2 = torch.randn(16, 5, generator=g), 2 - 3 * torch.randn(16, 5, generator=g)
    st = FeatureStats(5); st.update(b1, 0.5); st.update(b2, 0.5)       # equal weights: the variance of both together
    assert torch.allclose(st.var, torch.cat([b1, b2]).var(0, unbiased=False), atol=1e-5)
    m, xs = 0.7, [torch.randn(10, 5, generator=g) * (i + 1) + i for i in range(4)]
    w = [m ** 3, m ** 2 * (1 - m), m * (1 - m), 1 - m]                # closed-form EMA weights of the 4 batches
    allx = torch.cat(xs); wx = torch.cat([torch.full((10,), wi / 10) for wi in w]).double()
    mu = (wx[:, None] * allx.double()).sum(0); var = (wx[:, None] * (allx.double() - mu) ** 2).sum(0)
    st = FeatureStats(5)
    for x in xs: st.update(x, m)
    assert torch.allclose(st.mean.double(), mu, atol=1e-5) and torch.allclose(st.var.double(), var, atol=1e-4)


# --- decoder, losses, BN ------------------------------------------------------------------------------------------

def test_decoder_sizes_and_per_sample():
    dec = FeatureDecoder(64, size=32, width=32)
    h = torch.randn(5, 64)
    assert dec(h).shape == (5, 3, 32, 32) and dec(h, 24).shape == (5, 3, 24, 24)
    dec.eval()
    assert torch.allclose(dec(h)[3:4], dec(h[3:4]), atol=1e-5)        # eval mode: a per-sample function
    dec.train()
    assert not torch.allclose(dec(h)[3:4], dec(h[3:4]), atol=1e-3)    # train mode: BatchNorm couples the batch
    a, b = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 2.)
    assert recon_loss(a, b).item() == 4. and recon_loss(a, b, 'l1').item() == 2.
    with pytest.raises(ValueError, match="'mse' or 'l1'"): recon_loss(a, b, 'huber')


def test_frozen_bn_stats():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    with frozen_bn_stats(net): y = net(torch.randn(4, 3, 8, 8) * 5 + 2)
    assert all(torch.equal(sd[k], v) for k, v in net.state_dict().items())
    assert abs(y.mean().item()) < 1e-5 and net[1].momentum == 0.1


# --- the wrapped methods ------------------------------------------------------------------------------------------

def test_registered_with_options():
    for base in ('moco', 'simsiam'):
        cls = get_method(f'synth-{base}')
        assert issubclass(cls, get_method(base)) and cls.name == f'synth-{base}'
        assert {'criterion', 'alpha', 'nu', 'n_dims', 'noise', 'noise_scale', 'decoder_width'} <= method_options(cls)
        assert method_options(get_method(base)) <= method_options(cls)


@pytest.mark.parametrize('kw,msg', [(dict(criterion='entropy'), 'criterion must be one of'), (dict(n_dims=0), 'n_dims must be'),
                                    (dict(noise='uniform'), 'noise must be one of'), (dict(alpha=-1.), 'alpha and nu'),
                                    (dict(kk=3), 'has no option kk')])
def test_bad_options_one_line(birds, kw, msg):
    with pytest.raises(ValueError, match=msg): _learner(birds, 'synth-moco', **kw)


@pytest.mark.parametrize('base', ['moco', 'simsiam'])
def test_zero_weights_is_exactly_the_base_method(birds, base):
    a = _steps(_learner(birds, base), 3)
    b = _steps(_learner(birds, f'synth-{base}', alpha=0., nu=0.), 3)
    assert [l.item() for l in a.recorder.losses] == [l.item() for l in b.recorder.losses]
    sa, sb = a.model.encoder.state_dict(), b.model.encoder.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = _steps(_learner(birds, f'synth-{base}'), 3)
    assert c.recorder.losses[-1].item() != a.recorder.losses[-1].item()


def test_reconstruction_without_encoder_gradient_leaves_the_encoder_alone(birds):
    "alpha > 0, nu = 0, rec_to_encoder=False: the loss differs but the encoder follows the base method's path exactly."
    a = _steps(_learner(birds, 'moco'), 3)
    b = _steps(_learner(birds, 'synth-moco', alpha=1., nu=0., rec_to_encoder=False), 3)
    assert b.recorder.losses[0].item() > a.recorder.losses[0].item()
    sa, sb = a.model.encoder.state_dict(), b.model.encoder.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(b.model.decoder.fc.weight, _learner(birds, 'synth-moco').model.decoder.fc.weight)  # it learnt


class DecoderGrad(Callback):
    order = 50
    def after_backward(self):
        self.learn.dec_grad = sum(p.grad.abs().sum().item() for p in self.learn.model.decoder.parameters() if p.grad is not None)
        self.learn.enc_grad = sum(p.grad.abs().sum().item() for p in self.learn.model.encoder.parameters() if p.grad is not None)


@pytest.mark.parametrize('detach', [True, False])
def test_detach_decoder(birds, detach):
    learn = _steps(_learner(birds, 'synth-simsiam', alpha=0., nu=1., detach_decoder=detach), 1, DecoderGrad())
    assert (learn.dec_grad == 0) == detach and learn.enc_grad > 0


def test_gradcam_criterion_in_the_learner(birds):
    learn = _learner(birds, 'synth-moco', criterion='gradcam', n_dims=3)
    dead = [7, 200, 411]
    with torch.no_grad(): learn.model.projector[0].weight[:, dead] = 0   # the loss cannot read these dims
    _steps(learn, 1)
    imp, picked = learn.synth_pairs.last_importance, learn.synth_pairs.last_dims
    assert imp[dead].abs().sum() == 0 and imp.max() > 0
    assert imp[picked].abs().sum() == 0


def test_synth_moco_exact_resume(birds, tmp_path):
    kw = dict(criterion='both', n_dims=0.1, noise='shuffle')
    a = pretrain(_learner(birds, 'synth-moco', tmp_path / 'a', **kw), 2, run_dir=tmp_path / 'a', progress=False)
    b = _learner(birds, 'synth-moco', tmp_path / 'b', **kw); b.add_cb(StopAfter(1))
    pretrain(b, 2, run_dir=tmp_path / 'b', progress=False)
    assert torch.load(tmp_path / 'b' / 'checkpoint.pth', weights_only=False)['epoch'] == 0
    c = pretrain(_learner(birds, 'synth-moco', tmp_path / 'b', **kw), 2, run_dir=tmp_path / 'b', resume=True, progress=False)
    sa, sc = a.model.state_dict(), c.model.state_dict()
    assert {'decoder.fc.weight', 'feat_stats.var', 'feat_stats.n'} <= set(sa)
    assert all(torch.equal(sa[k], sc[k]) for k in sa), 'resumed run must end with exactly the same weights and statistics'
    rows = lambda r: [l.split(',')[:-1] for l in (tmp_path / r / 'log.csv').read_text().splitlines()]
    assert rows('a') == rows('b') and rows('a')[0][-2:] == ['L_R', 'L_Cp']
    assert all(math.isfinite(float(v)) and float(v) > 0 for r in rows('a')[1:] for v in r[-2:])


def test_synth_overhead_runs():
    r = synth_overhead('simsiam', size=32, bs=4, steps=1, skip=1, precision='fp32', proj_dim=16, decoder_width=16)
    assert r['base'] > 0 and r['synth'] > 0 and r['ratio'] == pytest.approx(r['base'] / r['synth'])


def test_callback_needs_decoder(birds):
    learn = _learner(birds, 'moco'); learn.add_cb(SynthPairs())
    with pytest.raises(ValueError, match='needs a model with .encoder, .decoder'): _steps(learn, 1)
