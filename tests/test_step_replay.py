"""One training step of the methods without negatives against a hand-written one (issue 23: BYOL never crosses the floor
on flowers17 and SimSiam only late; is it a defect?): the gradients of each loss as its paper writes it, and BYOL's
target network after the optimiser step."""
import copy, importlib
import pytest, torch, torch.nn.functional as F
from fastai.callback.core import Callback, CancelFitException
from fastai.torch_core import set_seed
from fgssl_nb.data import read_dataset, ssl_dls
from fgssl_nb.learner import ssl_learner
from fgssl_nb.models import cosine_momentum, ema_update as _ema
from fgssl_nb.byol import multicrop_byol_loss as _byol_loss


class OneStep(Callback):
    "Records the first training step: the views, the model before it, the online gradients, the model after it; then stops."
    order = 6  # after the method (5) has made the views
    def before_batch(self):
        self.views = [x.detach().clone() for x in self.learn.xb]
        self.before = copy.deepcopy(self.learn.model)
    def after_backward(self):
        self.grads = {n: p.grad.detach().clone() for n, p in self.learn.model.named_parameters() if p.grad is not None}
    def after_batch(self):
        self.after = copy.deepcopy(self.learn.model); raise CancelFitException()


def _replay(method, birds, **options):
    "The recorded first step of `method` on the toy birds (fp32, tiny heads), and the model before it in train mode."
    set_seed(0)
    dls = ssl_dls(read_dataset(birds), size=32, bs=8, num_workers=0, device='cpu')  # fp32 on the CPU: no TF32
    learn = ssl_learner(dls, method, arch='resnet18', precision='fp32', knn_every=0, **options)
    rec = OneStep()
    learn.fit(1, 1e-3, cbs=rec)
    rec.before.train(); rec.before.zero_grad()
    return rec, len(dls.train)


def _same_gradients(rec, ref):
    "The library's gradients against those of the hand-written loss, parameter by parameter."
    online = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert set(online) == set(rec.grads) and not any(n.startswith('target.') for n in online)
    assert any(n.startswith('encoder.') for n in online) and any(n.startswith('predictor.') for n in online)
    for n, g in online.items():
        # relative, float32 sums in another order: ~1e-6; a bias feeding a BatchNorm has a zero gradient (rounding noise);
        # the others here have norms of 0.1 and more
        err = ((rec.grads[n] - g).norm() / g.norm().clamp_min(1e-2)).item()
        assert err < 1e-4, f"{n}: the library's gradient is {err:.2e} (relative) away from the hand-written loss's"


def _unit(a): return a / a.norm(dim=1, keepdim=True)


def _reference_loss(m, views):
    "The paper's loss, written out: ||q1/|q1| - z2'/|z2'|||^2 + ||q2/|q2| - z1'/|z1'|||^2, batch mean; z' from the target, no gradient."
    x = views[0]                                   # both global views, one batch (as the library forwards them)
    b = x.shape[0] // 2
    q = m.predictor(m.projector(m.encoder(x)))
    with torch.no_grad(): t = m.target(x)
    q1, q2, t1, t2 = q[:b], q[b:], t[:b], t[b:]
    return ((_unit(q1) - _unit(t2)) ** 2).sum(1).mean() + ((_unit(q2) - _unit(t1)) ** 2).sum(1).mean()


def _check_byol(birds):
    rec, n_steps = _replay('byol', birds, proj_hidden=32, proj_dim=16, momentum=0.9)
    ref = rec.before
    for p in ref.target.parameters(): assert not p.requires_grad    # the target is not trained by the optimiser
    _reference_loss(ref, rec.views).backward()
    _same_gradients(rec, ref)
    # the target after the step: m * target before + (1 - m) * online after, m the cosine schedule at step 0 (its base)
    m = cosine_momentum(0.9, 0, n_steps)
    assert m == 0.9
    before, after = dict(rec.before.named_parameters()), dict(rec.after.named_parameters())
    online = {'target.0.': 'encoder.', 'target.1.': 'projector.'}   # the target is Sequential(encoder, projector)
    targets = [n for n in before if n.startswith('target.')]
    assert len(targets) == sum(n.startswith(('encoder.', 'projector.')) for n in before)
    for n in targets:
        o = online[n[:9]] + n[9:]
        torch.testing.assert_close(after[n], m * before[n] + (1 - m) * after[o], rtol=1e-5, atol=1e-7, msg=lambda s: f"{n}: {s}")


def _check_simsiam(birds):
    "SimSiam's loss as its paper writes it: D(p1, stopgrad(z2)) / 2 + D(p2, stopgrad(z1)) / 2, D minus the mean cosine."
    rec, _ = _replay('simsiam', birds, proj_dim=16, pred_hidden=8)
    m, x = rec.before, rec.views[0]
    b = x.shape[0] // 2
    z = m.projector(m.encoder(x)); p = m.predictor(z)
    D = lambda p, z: -(_unit(p) * _unit(z.detach())).sum(1).mean()
    (D(p[:b], z[b:]) / 2 + D(p[b:], z[:b]) / 2).backward()
    _same_gradients(rec, m)


def test_one_byol_step_matches_a_hand_written_one(birds): _check_byol(birds)


def test_one_simsiam_step_matches_a_hand_written_one(birds): _check_simsiam(birds)


def _swapped_targets(qs, zs, pairs): return _byol_loss(qs, zs[::-1], pairs)
def _reversed_ema(online, target, m): return _ema(online, target, 1 - m)
def _no_stopgrad(ps, zs, pairs):
    i, j = zip(*pairs)
    return -F.cosine_similarity(torch.stack([ps[k] for k in j]), torch.stack([zs[k] for k in i]), dim=-1).mean()


@pytest.mark.parametrize('module,name,defect,check', [
    ('byol', 'multicrop_byol_loss', _swapped_targets, _check_byol),      # each prediction against its own view's target
    ('models', 'ema_update', _reversed_ema, _check_byol),                # target = (1 - m) * target + m * online
    ('simsiam', 'multicrop_simsiam_loss', _no_stopgrad, _check_simsiam)])  # the gradient through z as well
def test_the_replay_catches_planted_defects(birds, monkeypatch, module, name, defect, check):
    monkeypatch.setattr(importlib.import_module(f'fgssl_nb.{module}'), name, defect)
    with pytest.raises(AssertionError): check(birds)
