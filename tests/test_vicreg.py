"VICReg: the loss against an independent slow reference (values, terms, gradients), known answers, a tiny training run."
import math
import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from fastai.torch_core import set_seed
from fgssl_nb.data import read_dataset, ssl_dls
from fgssl_nb.learner import ssl_learner
from fgssl_nb.registry import get_method, method_names
from fgssl_nb.vicreg import off_diagonal, vicreg_terms, vicreg_total, vicreg_loss, VICReg

pytestmark = pytest.mark.usefixtures('one_thread')  # conftest: small tensors run faster on one thread


def _slow(z1, z2, sim=25., var=25., cov=1., eps=1e-4, gamma=1.):
    "VICReg written out with numpy float64 loops, following facebookresearch/vicreg main_vicreg.py's normalisation."
    a, b = np.asarray(z1, dtype=np.float64), np.asarray(z2, dtype=np.float64)
    n, d = a.shape
    inv = 0.
    for i in range(n):
        for k in range(d): inv += (a[i, k] - b[i, k]) ** 2
    inv /= n * d
    def branch(z):
        mu = [sum(z[i, k] for i in range(n)) / n for k in range(d)]
        C = np.zeros((d, d))
        for k in range(d):
            for l in range(d): C[k, l] = sum((z[i, k] - mu[k]) * (z[i, l] - mu[l]) for i in range(n)) / (n - 1)
        hinge = sum(max(0., gamma - math.sqrt(C[k, k] + eps)) for k in range(d)) / d
        off = sum(C[k, l] ** 2 for k in range(d) for l in range(d) if l != k) / d
        return hinge, off
    (h1, c1), (h2, c2) = branch(a), branch(b)
    terms = dict(invariance=inv, variance=h1 / 2 + h2 / 2, covariance=c1 + c2)
    return sim * inv + var * terms['variance'] + cov * terms['covariance'], terms


@pytest.mark.parametrize('n,d,scale', [(2, 3, 1.), (6, 4, 0.2), (9, 5, 1.), (5, 8, 4.)])
def test_loss_and_terms_match_slow_reference(n, d, scale):
    g = torch.Generator().manual_seed(n * 100 + d)
    z1, z2 = torch.randn(n, d, generator=g) * scale, torch.randn(n, d, generator=g) * scale + 0.5
    ref, ref_terms = _slow(z1, z2)
    assert vicreg_loss(z1, z2).item() == pytest.approx(ref, rel=1e-5)
    terms = vicreg_terms(z1, z2)
    for k in ('invariance', 'variance', 'covariance'): assert terms[k].item() == pytest.approx(ref_terms[k], rel=1e-5, abs=1e-7), k
    assert vicreg_total(terms).item() == pytest.approx(ref, rel=1e-5)
    opts = dict(sim=2., var=3., cov=0.5, eps=1e-2, gamma=1.5)
    assert vicreg_loss(z1, z2, *opts.values()).item() == pytest.approx(_slow(z1, z2, *opts.values())[0], rel=1e-5)


def test_gradient_matches_double_reference():
    "The float32 loss's gradient (through off_diagonal's view and the hinge) equals a float64 autograd of the plain formula."
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(10, 6, generator=g) * 0.7, torch.randn(10, 6, generator=g) * 0.7
    z1[:, 2] *= 3  # one dimension above the hinge
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    vicreg_loss(a, b).backward()
    x, y = z1.double().requires_grad_(), z2.double().requires_grad_()
    def reg(z):
        zc = z - z.mean(0); C = zc.T @ zc / (len(z) - 1)
        return torch.relu(1 - torch.sqrt(torch.diagonal(C) + 1e-4)).mean(), (C ** 2).sum() - (torch.diagonal(C) ** 2).sum()
    (v1, c1), (v2, c2) = reg(x), reg(y)
    (25 * ((x - y) ** 2).mean() + 25 * (v1 + v2) / 2 + (c1 + c2) / 6).backward()
    torch.testing.assert_close(a.grad.double(), x.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b.grad.double(), y.grad, rtol=1e-4, atol=1e-6)


def test_known_answers():
    # identical views, zero-mean orthogonal columns (Hadamard signs) of stds 1/sqrt3, 2/sqrt3, 4/sqrt3: only the first pays
    H = torch.tensor([[1., 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]])[:, 1:]
    t = vicreg_terms(H * torch.tensor([0.5, 1., 2.]), H * torch.tensor([0.5, 1., 2.]), eps=0.)
    assert t['invariance'].item() == 0 and abs(t['covariance'].item()) < 1e-12
    assert t['variance'].item() == pytest.approx((1 - 1 / math.sqrt(3)) / 3, rel=1e-6)
    # two copies of one column (variance 4/3): off-diagonal covariance 4/3 twice, / d = 2, both branches
    u = torch.tensor([[1.], [-1.], [1.], [-1.]]); z = torch.cat([u, u], 1)
    t = vicreg_terms(z, z, eps=0.)
    assert t['variance'].item() == 0 and t['covariance'].item() == pytest.approx(32 / 9, rel=1e-6)
    # collapse: every image on one point costs var_weight * (1 - sqrt(eps)) although the views agree exactly
    c = torch.full((8, 16), 3.)
    assert vicreg_loss(c, c).item() == pytest.approx(25 * (1 - 1e-2), rel=1e-6)
    assert vicreg_loss(c, c, var_weight=0.).item() == 0
    # the terms do not depend on the order of the images in the batch
    g = torch.Generator().manual_seed(3); z1, z2 = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    p = torch.randperm(7, generator=g)
    assert vicreg_loss(z1[p], z2[p]).item() == pytest.approx(vicreg_loss(z1, z2).item(), rel=1e-6)
    assert off_diagonal(torch.arange(16.).view(4, 4)).tolist() == [k for k in range(16) if k % 5]


def test_low_precision_inputs_give_float32():
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(32, 64, generator=g), torch.randn(32, 64, generator=g)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = vicreg_loss(z1.bfloat16(), z2.bfloat16())
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(vicreg_loss(z1.bfloat16().float(), z2.bfloat16().float()).item(), rel=1e-5)


def test_registered():
    assert 'vicreg' in method_names('ssl') and get_method('vicreg') is VICReg
    assert VICReg.view_recipe == 'byol' and not VICReg.multicrop and VICReg.wd == 1e-6


class LossProbe(Callback):
    "Checks, at every training step, that the loss is the weighted sum of the terms the method recorded."
    order = 12
    def before_fit(self): self.seen = 0
    def after_loss(self):
        if not self.training: return
        m = self.learn.run_state.method_cb
        want = vicreg_total(m.terms, m.sim_weight, m.var_weight, m.cov_weight)
        assert torch.isclose(self.learn.loss.detach().float(), want, rtol=1e-5), (self.learn.loss, want)
        self.seen += 1


def test_one_epoch_trains(birds):
    set_seed(0)
    dls = ssl_dls(read_dataset(birds), size=32, bs=16, num_workers=0)
    learn = ssl_learner(dls, 'vicreg', arch='resnet18', precision='fp32', proj_hidden=64, proj_dim=48, sim_weight=10.)
    cb = learn.run_state.method_cb
    assert isinstance(cb, VICReg) and cb.sim_weight == 10. and cb.var_weight == 25.  # options reach __init__
    lins = [m for m in learn.model.projector if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in lins] == [(512, 64), (64, 64), (64, 48)]  # 3-layer expander
    w0 = {k: v.clone() for k, v in learn.model.state_dict().items() if v.is_floating_point()}
    probe = LossProbe()
    learn.fit_one_cycle(1, 1e-3, cbs=probe)
    loss = learn.recorder.values[-1][0]
    assert math.isfinite(loss) and probe.seen >= 1
    # a plausible VICReg value: the variance hinge alone is below 25, invariance and covariance are finite and >= 0
    t = {k: v.item() for k, v in cb.terms.items()}
    assert 0 <= t['variance'] < 1 and t['invariance'] >= 0 and t['covariance'] >= 0, t
    sd = learn.model.state_dict()
    assert not torch.equal(w0['projector.0.weight'], sd['projector.0.weight']), 'expander did not train'
    assert any(not torch.equal(w0[k], sd[k]) for k in w0 if k.startswith('encoder.')), 'encoder did not train'
