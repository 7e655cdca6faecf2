"DINO: the loss against an independent slow reference (values, gradients), known answers, the head, the schedules, training runs."
import math
import numpy as np
import pytest
from conftest import StopAfter
import torch
import torch.nn as nn
from fastai.callback.core import Callback
from fastai.torch_core import set_seed
from fgssl_nb.data import read_dataset, ssl_dls
from fgssl_nb.learner import ssl_learner, pretrain
from fgssl_nb.models import cosine_momentum
from fgssl_nb.registry import get_method, method_names
from fgssl_nb.dino import DINOHead, NormedLinear, dino_loss, teacher_probs, teacher_temperature, update_center, entropy, DINO

pytestmark = pytest.mark.usefixtures('one_thread')  # conftest: small tensors run faster on one thread


def _slow(s_views, t_views, center, st, tt):
    "DINO's loss written out with numpy float64 loops: mean over pairs (i, j != i) of the batch-mean cross-entropy."
    s, t, c = (np.asarray(x, dtype=np.float64) for x in (s_views, t_views, center))
    c = c.reshape(-1)
    pairs = [(i, j) for i in range(len(t)) for j in range(len(s)) if j != i]
    total = 0.
    for i, j in pairs:
        B, K = t[i].shape
        acc = 0.
        for b in range(B):
            a = [(t[i][b][k] - c[k]) / tt for k in range(K)]
            m = max(a); e = [math.exp(u - m) for u in a]; p = [v / sum(e) for v in e]
            z = [s[j][b][k] / st for k in range(K)]
            mz = max(z); lse = mz + math.log(sum(math.exp(u - mz) for u in z))
            acc -= sum(p[k] * (z[k] - lse) for k in range(K))
        total += acc / B
    return total / len(pairs)


@pytest.mark.parametrize('V,G,B,K,st,tt', [(2, 2, 3, 5, 0.1, 0.04), (6, 2, 4, 7, 0.1, 0.04), (4, 2, 2, 9, 1., 1.),
                                          (3, 1, 5, 4, 0.2, 0.07), (12, 2, 2, 6, 0.1, 0.04)])
def test_loss_matches_slow_reference(V, G, B, K, st, tt):
    g = torch.Generator().manual_seed(V * 100 + K)
    s = torch.randn(V, B, K, generator=g, dtype=torch.float64) * 0.5
    t = torch.randn(G, B, K, generator=g, dtype=torch.float64) * 0.3
    c = torch.randn(1, K, generator=g, dtype=torch.float64) * 0.1
    ref = _slow(s.numpy(), t.numpy(), c.numpy(), st, tt)
    for out in (dino_loss(list(s), list(t), c, G, st, tt), dino_loss(s.reshape(V * B, K), t.reshape(G * B, K), c, G, st, tt)):
        assert out.dtype == torch.float64 and out.item() == pytest.approx(ref, rel=1e-10, abs=1e-12)
    f = dino_loss(list(s.float()), list(t.float()), c.float(), G, st, tt)
    assert f.dtype == torch.float32 and f.item() == pytest.approx(ref, rel=1e-4)


def test_gradient_closed_form_and_no_teacher_gradient():
    "d/ds_j of H(p_i, softmax(s_j / st)) = (softmax(s_j / st) - p_i) / st, averaged over batch and pairs."
    V, G, B, K, st, tt = 5, 2, 3, 6, 0.1, 0.04
    g = torch.Generator().manual_seed(1)
    s = torch.randn(V, B, K, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(G, B, K, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(1, K, generator=g, dtype=torch.float64)
    dino_loss(list(s), list(t), c, G, st, tt).backward()
    sn, tn, cn = s.detach().numpy(), t.detach().numpy(), c.numpy().reshape(-1)
    sm = lambda x: np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    pairs = [(i, j) for i in range(G) for j in range(V) if j != i]
    want = np.zeros((V, B, K))
    for i, j in pairs:
        for b in range(B): want[j, b] += (sm(sn[j, b] / st) - sm((tn[i, b] - cn) / tt)) / st / B / len(pairs)
    np.testing.assert_allclose(s.grad.numpy(), want, rtol=1e-9, atol=1e-12)
    assert t.grad is None


def test_known_answers():
    K, B = 7, 3
    z = [torch.zeros(B, K) for _ in range(6)]
    assert dino_loss(z, z[:2], torch.zeros(1, K), 2).item() == pytest.approx(math.log(K), rel=1e-6)  # uniform vs uniform
    t = torch.full((B, K), -1., dtype=torch.float64); t[:, 2] = 1.   # one-hot after sharpening by 0.04
    s = torch.zeros(B, K, dtype=torch.float64); s[:, 2] = 0.5
    want = -math.log(math.exp(5) / (math.exp(5) + K - 1))
    assert dino_loss([s] * 3, [t] * 2, torch.zeros(1, K, dtype=torch.float64), 2).item() == pytest.approx(want, rel=1e-9)
    # a common offset of teacher and centre cancels; a student equal to a sharp teacher pays only the entropy
    g = torch.Generator().manual_seed(0)
    s, t, c, d = (torch.randn(n, K, generator=g, dtype=torch.float64) for n in (4 * B, 2 * B, 1, 1))
    assert dino_loss(s, t + 3 * d, c + 3 * d, 2).item() == pytest.approx(dino_loss(s, t, c, 2).item(), rel=1e-12)
    with pytest.raises(ValueError, match='multiple of the batch'): dino_loss(torch.randn(7, K), torch.randn(4, K), torch.zeros(1, K), 2)
    with pytest.raises(ValueError, match='expected 2 teacher views'): dino_loss([torch.randn(B, K)], [torch.randn(B, K)] * 2, torch.zeros(1, K), 2)


def test_loss_is_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(2)
    s, t, c = torch.randn(6 * 8, 512, generator=g), torch.randn(2 * 8, 512, generator=g), torch.randn(1, 512, generator=g) * 0.1
    ref = dino_loss(s, t, c, 2)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = dino_loss(s.bfloat16(), t.bfloat16(), c, 2)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(dino_loss(s.bfloat16().float(), t.bfloat16().float(), c, 2).item(), rel=1e-5)
    assert out.item() == pytest.approx(ref.item(), rel=2e-2)


def test_head_matches_torch_weight_norm():
    "The explicit normalised weight equals torch's parametrized weight_norm with the gain fixed at 1."
    torch.manual_seed(0)
    h = DINOHead(16, out_dim=40, hidden=12, bottleneck=8, n_layers=3, use_bn=False)
    ref = nn.utils.parametrizations.weight_norm(nn.Linear(8, 40, bias=False), dim=0)
    with torch.no_grad():
        ref.parametrizations.weight.original1.copy_(h.last_layer.weight_v)
        ref.parametrizations.weight.original0.fill_(1.)
    x = torch.randn(5, 16)
    feat = nn.functional.normalize(h.mlp(x), dim=-1)
    torch.testing.assert_close(h(x), ref(feat), rtol=1e-6, atol=1e-6)
    assert h(x).abs().max() <= 1 + 1e-6  # cosines
    assert [m.out_features for m in h.mlp if isinstance(m, nn.Linear)] == [12, 12, 8]
    assert all(isinstance(m, nn.GELU) for m in h.mlp[1::2])
    assert [n for n, _ in h.last_layer.named_parameters()] == ['weight_v']  # gain fixed: not a parameter
    free = NormedLinear(8, 40, fix_norm=False)
    assert free.weight_g.requires_grad and torch.equal(free.weight_g, torch.ones(40, 1))
    bn = DINOHead(16, 40, 12, 8, use_bn=True)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in bn.mlp) == 2


def test_schedules_and_centre():
    assert teacher_temperature(0.7) == 0.04
    assert [teacher_temperature(p, 0.07, 0.04, 0.3) for p in (0., 0.15, 0.3, 1.)] == pytest.approx([0.04, 0.055, 0.07, 0.07])
    c = torch.zeros(1, 3)
    o = torch.tensor([[1., 2., 3.], [3., 2., 1.]])
    update_center(c, o, 0.9); update_center(c, o, 0.9)
    torch.testing.assert_close(c, torch.full((1, 3), 0.38))
    p = torch.tensor([[0.5, 0.5, 0.], [1., 0., 0.]])
    torch.testing.assert_close(entropy(p), torch.tensor([math.log(2), 0.]))
    torch.testing.assert_close(teacher_probs(torch.tensor([[1., 2.]]), torch.tensor([[1., 1.]]), 1.), torch.softmax(torch.tensor([[0., 1.]]), -1))


def test_registered_and_views():
    assert 'dino' in method_names('ssl') and get_method('dino') is DINO
    ps = DINO.default_views(64)
    assert [p.local for p in ps] == [False] * 2 + [True] * 4
    assert [p.tfms[0].size for p in ps] == [(64, 64)] * 2 + [(32, 32)] * 4
    assert [p.tfms[0].scale for p in ps] == [(0.4, 1.)] * 2 + [(0.05, 0.4)] * 4
    assert len(DINO.default_views(64, local_views=-1)) == 2 and len(DINO.default_views(64, local_views=10)) == 12
    # the recipe still applies (`views`): the CLI's demo gives the toy birds its colour-blind `hue` views, as for the others
    from fgssl_nb.cli import demo_views
    assert DINO.takes_views() and demo_views('default', 'dino') == 'hue'
    assert all(p.name.startswith('hue') for p in DINO.default_views(64, 'hue'))


class EMACheck(Callback):
    "After DINO's after_step: teacher = m * old teacher + (1 - m) * new student, centre = 0.9 * old + 0.1 * batch mean."
    order = 50
    def __init__(self, cb): self.cb, self.checked = cb, 0
    def before_step(self):
        m = self.learn.model
        self.t_old = [p.detach().clone() for p in m.target.parameters()]
        self.c_old = m.center.clone()
    def after_step(self):
        m, total = self.learn.model, self.n_epoch * len(self.dls.train)
        mom = cosine_momentum(0.996, round(self.pct_train * total), total)
        student = list(m.encoder.parameters()) + list(m.projector.parameters())
        for t_old, s, t in zip(self.t_old, student, m.target.parameters()):
            torch.testing.assert_close(t, mom * t_old + (1 - mom) * s.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.center, 0.9 * self.c_old + 0.1 * self.cb._teacher_out.mean(0, keepdim=True), rtol=1e-5, atol=1e-6)
        self.checked += 1


def test_one_epoch_on_builtin_data():
    "1 epoch, 32 px, batch 16, fp32: finite loss; student, teacher (exactly its EMA) and centre moved; teacher != student."
    set_seed(0)
    dls = ssl_dls(read_dataset('default'), size=32, bs=16, num_workers=0)
    learn = ssl_learner(dls, 'dino', arch='resnet18', out_dim=512, hidden=64, bottleneck=32, precision='fp32')
    cb = learn.run_state.method_cb
    assert type(cb) is DINO
    s0 = [p.detach().clone() for p in learn.model.encoder.parameters()]
    t0 = [p.detach().clone() for p in learn.model.target.parameters()]
    check = EMACheck(cb)
    learn.fit_one_cycle(1, DINO.lr, cbs=check)
    train_loss, valid_loss = learn.recorder.values[-1][:2]
    assert math.isfinite(train_loss) and math.isfinite(valid_loss)
    assert 0 < valid_loss < 2 * math.log(512)
    assert check.checked == len(dls.train)
    assert any(not torch.equal(a, b) for a, b in zip(s0, learn.model.encoder.parameters())), 'student did not train'
    assert any(not torch.equal(a, b) for a, b in zip(t0, learn.model.target.parameters())), 'teacher did not move'
    assert any(not torch.equal(a, b) for a, b in zip(learn.model.encoder.parameters(), learn.model.target[0].parameters())), 'teacher = student'
    assert learn.model.center.abs().sum() > 0 and torch.isfinite(learn.model.center).all()
    assert set(cb.terms) == {'teacher_entropy', 'mean_entropy', 'kl'}
    assert 0 <= cb.terms['teacher_entropy'] <= math.log(512) + 1e-4 and cb.terms['kl'] >= -1e-4


def test_resume_is_exact(birds, tmp_path):
    "Interrupted after epoch 1 and resumed: the same weights, teacher and centre as an uninterrupted run."
    def run(d, stop=None, resume=False):
        set_seed(0)
        dls = ssl_dls(read_dataset(birds), size=32, bs=4, num_workers=0)
        learn = ssl_learner(dls, 'dino', arch='resnet18', out_dim=64, hidden=32, bottleneck=16, warmup_teacher_temp=0.02,
                            freeze_last_layer=1, run_dir=d, precision='fp32')
        if stop: learn.add_cb(StopAfter(stop))
        return pretrain(learn, 3, run_dir=d, resume=resume, progress=False)
    a = run(tmp_path / 'a')
    run(tmp_path / 'b', stop=1)
    assert torch.load(tmp_path / 'b' / 'checkpoint.pth', weights_only=False)['epoch'] == 0
    c = run(tmp_path / 'b', resume=True)
    sa, sc = a.model.state_dict(), c.model.state_dict()
    assert 'center' in sa and sa['center'].abs().sum() > 0
    assert all(torch.equal(sa[k], sc[k]) for k in sa), 'resumed run must end with exactly the same weights, teacher and centre'
