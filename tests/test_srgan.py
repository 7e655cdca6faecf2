"SRGAN pretext: architectures against hand formulas, LR making against PIL, fastai GAN bookkeeping, exact resume, downstream lessons."
import json, math
import numpy as np
import pytest
from conftest import StopAfter
import torch, torch.nn as nn, torch.nn.functional as F
from PIL import Image
from fastai.callback.core import Callback
from fastai.learner import CancelFitException
from fastai.torch_core import set_seed
from fgssl_nb.data import read_dataset, ssl_dls, normalize, denormalize
from fgssl_nb.learner import pretrain
from fgssl_nb.runs import load_encoder
from fgssl_nb.registry import get_method
from fgssl_nb.models import create_encoder
from fgssl_nb.srgan import (SRResNet, Discriminator, downsample, content_mse, srgan_gen_loss, srgan_crit_loss, psnr,
                            srgan_learner, train_srgan, srgan_g_encoder, srgan_d_encoder, SRGANClassifier,
                            srgan_head_eval, FrozenNoStep)

TINY = dict(n_blocks=3, nf=16, d_nf=8, precision='fp32')
n_params = lambda m: sum(p.numel() for p in m.parameters())


def conv(ci, co, k): return k * k * ci * co + co


def test_generator_4x_and_parameter_formula():
    "SRResNet: head 9x9 + PReLU, B x (conv-BN-PReLU-conv-BN), conv+BN, 2 x (conv to 4nf + PReLU), 9x9 tail."
    for B, nf in ((16, 64), (2, 8)):
        expect = conv(3, nf, 9) + 1 + B * (2 * conv(nf, nf, 3) + 4 * nf + 1) + conv(nf, nf, 3) + 2 * nf \
                 + 2 * (conv(nf, 4 * nf, 3) + 1) + conv(nf, 3, 9)
        assert n_params(SRResNet(B, nf)) == expect
    assert n_params(SRResNet(16)) == 1_549_462  # the paper's ~1.55 M
    assert SRResNet(2, 8)(torch.randn(2, 3, 10, 14)).shape == (2, 3, 40, 56)


def test_pixel_shuffle_by_hand():
    "The rearrangement SRResNet's upsamplers rely on: out[c, 2h+i, 2w+j] = in[4c + 2i + j, h, w]."
    x = torch.arange(8.).view(1, 8, 1, 1)
    assert torch.equal(nn.PixelShuffle(2)(x)[0], torch.tensor([[[0., 1], [2, 3]], [[4, 5], [6, 7]]]))


def test_discriminator_size_agnostic_and_parameter_formula():
    chans, ci, expect = [64, 64, 128, 128, 256, 256, 512, 512], 3, 0
    for i, co in enumerate(chans): expect += conv(ci, co, 3) + (2 * co if i else 0); ci = co  # no BN in block 1
    assert n_params(Discriminator()) == expect + 512 * 1024 + 1024 + 1024 + 1
    d = Discriminator(nf=8).eval()
    for s in (24, 32, 64): assert d(torch.randn(2, 3, s, s)).shape == (2,)
    assert d.features(torch.randn(1, 3, 64, 64)).shape[-1] == 4  # four stride-2 blocks


def test_downsample_matches_pil():
    x = torch.rand(1, 3, 24, 32)
    def pil(method):
        return torch.stack([torch.tensor(np.asarray(Image.fromarray(c.numpy(), mode='F').resize((8, 6), method))) for c in x[0]])[None]
    assert torch.allclose(downsample(x, 4), pil(Image.BICUBIC), atol=1e-5)
    assert torch.allclose(downsample(x, 4, 'area'), pil(Image.BOX), atol=1e-5)
    with pytest.raises(ValueError, match="'bicubic' or 'area'"): downsample(x, 4, 'nearest')


def test_losses_and_psnr_hand_values():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.isclose(content_mse(a, b), F.mse_loss(denormalize(a), denormalize(b)), atol=1e-6)
    z = torch.zeros(3)
    assert math.isclose(srgan_gen_loss(z, a, b).item(), content_mse(a, b).item() + 1e-3 * math.log(2), rel_tol=1e-5)
    assert math.isclose(srgan_crit_loss(z, z).item(), 2 * math.log(2), rel_tol=1e-6)
    assert math.isclose(srgan_crit_loss(z + 2, z - 1).item(), math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1)), rel_tol=1e-6)
    assert torch.allclose(psnr(torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.1)), torch.tensor([20.]))


def _dls(birds, bs=4): return ssl_dls(read_dataset(birds), size=32, bs=bs, num_workers=0)


class StepWatch(Callback):
    order = 99
    def before_fit(self): self.log = []
    def before_step(self): self.w = [[p.detach().clone() for p in m.parameters()] for m in (self.model.generator, self.model.critic)]
    def after_step(self):
        moved = [any(not torch.equal(p, q) for p, q in zip(m.parameters(), w)) for m, w in zip((self.model.generator, self.model.critic), self.w)]
        self.log.append((self.learn.gan_trainer.gen_mode, *moved))


def test_each_step_trains_exactly_one_network(birds):
    "fastai's single optimiser would step the frozen half too (Adam momentum on zero grads): FrozenNoStep prevents it."
    set_seed(0)
    learn = srgan_learner(_dls(birds), **TINY)
    w = StepWatch()
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-3, cbs=[w])
    assert [m for m, *_ in w.log[:4]] == [False, True, False, True]  # critic, generator, ...
    assert all(g == gm and c == (not gm) for gm, g, c in w.log), w.log
    learn.remove_cb(FrozenNoStep)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=[w])
    assert not any(g and not gm for gm, g, _ in w.log), "torch's fused Adam skips parameters without a gradient"
    from fastai.optimizer import Adam
    learn.opt_func, learn.opt = Adam, None  # fastai's Python Adam steps the frozen half too (momentum on zero gradients)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=[w])
    assert any(g and not gm for gm, g, _ in w.log), 'without FrozenNoStep the frozen generator moves (the reason for it)'


def test_warmup_trains_generator_on_content_only(birds):
    "warmup=1: epoch 0 = generator steps only, with the adversarial term off; epoch 1 alternates (generator first, after validation)."
    set_seed(0)
    dls = _dls(birds)
    learn = srgan_learner(dls, warmup=1, **TINY)
    class Adv(Callback):
        def before_fit(self): self.seen = []
        def after_loss(self):
            if self.training: self.seen.append((self.epoch, self.learn.loss_func.gen_loss_func.adversarial))
    w, adv = StepWatch(), Adv()
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-3, cbs=[w, adv])
    n = len(dls.train)
    assert w.log[:n] == [(True, True, False)] * n and [m for m, *_ in w.log[n:]] == [i % 2 == 0 for i in range(n)]
    assert adv.seen == [(0, False)] * n + [(1, True)] * n




def _run(birds, d, stop=None, resume=False):
    set_seed(0)
    learn = srgan_learner(_dls(birds), run_dir=d, **TINY)
    if stop: learn.add_cb(StopAfter(stop))
    return pretrain(learn, 2, run_dir=d, resume=resume, progress=False)


def test_resume_gives_identical_weights(birds, tmp_path):
    "Interrupted after epoch 1 and resumed from checkpoint.pth: bit-identical weights, the same log, the GAN mode restored."
    a = _run(birds, tmp_path / 'a')
    _run(birds, tmp_path / 'b', stop=1)
    ck = torch.load(tmp_path / 'b' / 'checkpoint.pth', weights_only=False)
    assert ck['epoch'] == 0 and ck['model']['_extra_state'] == {'gen_mode': True}
    c = _run(birds, tmp_path / 'b', resume=True)
    sa, sc = a.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sc[k]) for k in sa if k != '_extra_state'), 'resumed GAN must end with exactly the same weights'
    la, lb = [(tmp_path / x / 'log.csv').read_text().splitlines() for x in 'ab']
    assert len(lb) == 3 and [l.split(',')[:5] for l in la] == [l.split(',')[:5] for l in lb]


def test_trainer_run_folder_and_encoders(birds, tmp_path):
    "The registered trainer writes the run folder; both encoders round-trip through load_encoder and equal the trained nets."
    assert get_method('srgan') is train_srgan
    learn = train_srgan(read_dataset(birds), tmp_path, size=32, bs=4, epochs=1, workers=0, progress=False, drop_blocks=1, pool=2,
                        n_blocks=3, nf=16, d_nf=8, precision='fp32', config=dict(method='srgan'))
    assert {'config.json', 'log.csv', 'checkpoint.pth', 'encoder.pth', 'encoder_d.pth'} <= {p.name for p in tmp_path.iterdir()}
    cfg = json.loads((tmp_path / 'config.json').read_text())
    assert cfg['method'] == 'srgan' and cfg['srgan']['n_blocks'] == 3 and cfg['srgan']['drop_blocks'] == 1
    g, d = load_encoder(tmp_path / 'encoder.pth').eval(), load_encoder(tmp_path / 'encoder_d.pth').eval()
    assert g.arch == 'srgan_g' and g.arch_kwargs == dict(n_blocks=3, drop_blocks=1, nf=16, down=4, pool=2, lr_mode='bicubic')
    assert g.num_features == 64 and len(g.blocks) == 2 and d.num_features == 1024
    G, D = learn.model.generator.eval(), learn.model.critic.eval()
    hr = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        lr = normalize(downsample(hr).clamp(0, 1))
        ref = G.blocks[1](G.blocks[0](G.head(lr)))  # the first n_blocks - k blocks, by hand
        assert torch.allclose(g(normalize(hr)), F.adaptive_avg_pool2d(ref, 2).flatten(1), atol=1e-5)
        assert torch.allclose(d(normalize(hr)), D.embed(normalize(hr)), atol=1e-6)
    from fgssl_nb.evaluate import evaluate_encoder
    r = evaluate_encoder(g, read_dataset(birds), size=32, bs=8, protocols=('linear', 'knn'), num_workers=0)
    assert 0 <= r['linear_top1'] <= 1 and 0 <= r['knn_top1'] <= 1


def test_head_lessons(birds):
    "Dropout off at eval, on in training; trunk weights and BN statistics untouched by head training; the head is trained."
    torch.manual_seed(0)
    g = SRResNet(3, nf=16)
    with torch.no_grad():  # non-trivial BN statistics, so 'unchanged' means something
        for m in g.modules():
            if isinstance(m, nn.BatchNorm2d): m.running_mean.uniform_(-.5, .5); m.running_var.uniform_(.5, 2)
    enc = srgan_g_encoder(g, drop_blocks=1)
    clf = SRGANClassifier(enc, 4, dropout=0.5, in_size=32)
    x = normalize(torch.rand(3, 3, 32, 32))
    with torch.no_grad():
        clf.eval(); assert torch.equal(clf(x), clf(x))
        clf.train(); assert not torch.equal(clf(x), clf(x)) and not clf.trunk.training
    before = {k: v.clone() for k, v in enc.state_dict().items()}

    class Snap(Callback):
        def before_train(self):
            if self.epoch == 0: self.head = {k: v.clone() for k, v in self.learn.model.module.head.state_dict().items()}
    snap = Snap()
    res, learn = srgan_head_eval(enc, read_dataset(birds), size=32, bs=8, epochs=2, num_workers=0, cbs=[snap], return_learner=True)
    model = learn.model.module
    assert all(torch.equal(model.trunk.state_dict()[k], v) for k, v in before.items()), 'frozen trunk (incl. BN stats) changed'
    assert {id(p) for pg in learn.opt.param_lists for p in pg} == {id(p) for p in model.head.parameters()}
    assert all(not torch.equal(snap.head[k], v) for k, v in model.head.state_dict().items() if k.endswith('weight'))
    assert set(res) >= {'head_top1'} and 0 <= res['head_top1'] <= 1
    dres = srgan_head_eval(srgan_d_encoder(Discriminator(nf=8)), read_dataset(birds), size=32, bs=8, epochs=1, num_workers=0)
    assert dres['head_arch'] == 'srgan_d'


def test_bad_arguments(birds, tmp_path):
    ds = read_dataset(birds)
    with pytest.raises(ValueError, match='multiple of the SR scale 4'): train_srgan(ds, tmp_path, size=30, epochs=1)
    with pytest.raises(ValueError, match='drop --pretrained'): train_srgan(ds, tmp_path, pretrained=True, epochs=1)
    with pytest.raises(ValueError, match=r'drop_blocks \(residual blocks dropped'): srgan_learner(_dls(birds), n_blocks=2, drop_blocks=2)
    with pytest.raises(ValueError, match='power of 2'): SRResNet(scale=3)
    with pytest.raises(ValueError, match='srgan_g or srgan_d'): srgan_head_eval(create_encoder('resnet18'), ds, size=32)
    with pytest.raises(ValueError, match='fgssl_pretrain --method srgan'): create_encoder('srgan_g', pretrained=True)
