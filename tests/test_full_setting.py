"""The papers' full settings, written down (issue: the full setting from one command): the presets' resolved
configurations against the papers' values, the flags behind them (--weights, --ssl_holdout, --crop_from, --device,
--dry_run), the MoCo queue never silently capped, encoders exported under torchvision / timm names, and their bad input."""
import json, subprocess, sys
from pathlib import Path
import numpy as np
import pytest, torch

BIN = Path(sys.executable).parent


def run(*args, **kw):
    return subprocess.run([str(BIN / args[0]), *map(str, args[1:])], capture_output=True, text=True, timeout=300, **kw)


def _blocks(stdout: str) -> dict:
    "The JSON configurations a --dry_run prints, by entry name (`[name]` lines before each)."
    out, name, buf = {}, None, []
    for line in stdout.splitlines():
        if line.startswith('[') and line.endswith(']'):
            if name and buf: out[name] = json.loads('\n'.join(buf))
            name, buf = line[1:-1], []
        elif name is not None: buf.append(line)
    if name and buf: out[name] = json.loads('\n'.join(buf))
    return out


def test_lcr_paper_preset_is_the_papers_setting(tmp_path):
    "LCR's MoCo v2 protocol (SPEC: ResNet-50 ImageNet, queue 65,536, m 0.999, SGD 0.03 at batch 128, 100 epochs, 224 px); nothing is read or written."
    r = run('fgssl_compare', '--preset', 'lcr-paper', '--data', tmp_path / 'none_yet', '--out', tmp_path / 'g', '--dry_run')
    assert r.returncode == 0, r.stderr
    cfg = _blocks(r.stdout)
    assert list(cfg) == ['imagenet (frozen)', 'moco', 'synth-moco (variance)', 'synth-moco (gradcam)', 'simsiam',
                         'synth-simsiam (variance)', 'supervised']
    assert cfg['imagenet (frozen)'] == dict(encoder='imagenet', arch='resnet50', weights='V1', size=224)
    for name in ('moco', 'synth-moco (variance)', 'synth-moco (gradcam)'):
        c = cfg[name]
        assert (c['arch'], c['pretrained'], c['size'], c['bs'], c['epochs'], c['lr']) == ('resnet50', 'V1', 224, 128, 100, pytest.approx(0.03))
        assert (c['method_kwargs']['queue_size'], c['method_kwargs']['momentum']) == (65536, 0.999)
        assert (c['ssl_holdout'], c['source_size']) == (0.0, 336)
        assert c['method_kwargs']['encoder_lr_mult'] == 1.0 and c['method_kwargs']['freeze_bn'] is False  # no CPU adaptation
    assert cfg['simsiam']['lr'] == pytest.approx(0.05 * 128 / 256)  # SimSiam's rule, lr 0.05 x batch / 256
    assert not (tmp_path / 'g').exists()


def test_lcr_paper_preset_on_more_processes_and_a_given_batch(tmp_path):
    "--bs given on the command line wins over the preset, and the learning rates follow it linearly (MoCo: 0.03 per 128)."
    r = run('fgssl_compare', '--preset', 'lcr-paper', '--bs', 256, '--only', 'moco', '--dry_run')
    assert r.returncode == 0, r.stderr
    c = _blocks(r.stdout)['moco']
    assert (c['bs'], c['lr']) == (256, pytest.approx(0.06))


def test_system1_paper_preset_per_entry_settings():
    "Seed 1's published code: SimCLR 512 px, batch 64, Adam 1e-3, 500 epochs, MLP 512-512-512, tau 0.5; Jigsaw 15 epochs, batch 32, SGD 0.01; PMG ResNet-50 V1, 448 px, batch 16, lr 2e-3, backbone x0.1, wd 5e-4."
    r = run('fgssl_compare', '--preset', 'system1-paper', '--dry_run')
    assert r.returncode == 0, r.stderr
    cfg = _blocks(r.stdout)
    s = cfg['simclr']
    assert (s['arch'], s['pretrained'], s['size'], s['bs'], s['lr'], s['epochs'], s['ssl_holdout']) == ('resnet18', False, 512, 64, 0.001, 500, 0.2)
    assert s['method_kwargs'] == dict(proj_hidden=512, proj_dim=512, temperature=0.5)
    assert cfg['simclr + gamma']['views'] == 'gamma'
    j = cfg['jigsaw']
    assert (j['size'], j['bs'], j['lr'], j['epochs']) == (225, 32, 0.01, 15)
    p = cfg['pmg']
    assert (p['arch'], p['pretrained'], p['size'], p['bs'], p['lr'], p['epochs']) == ('resnet50', 'V1', 448, 16, 0.002, 100)
    assert p['method_kwargs'] == dict(encoder_lr_mult=0.1, wd=5e-4)
    g = cfg['srgan']
    assert (g['size'], g['bs'], g['lr'], g['method_kwargs']['n_blocks'], g['method_kwargs']['nf']) == (96, 32, 1e-4, 16, 64)


def test_pretrain_dry_run_prints_and_writes_nothing(tmp_path):
    r = run('fgssl_pretrain', '--method', 'synth-moco', '--arch', 'efficientnet_lite0', '--pretrained', '--bs', 128,
            '--out', tmp_path / 'r', '--dry_run', '--ssl_holdout', 0.1, '--crop_from', 1.25)
    assert r.returncode == 0, r.stderr
    c = json.loads(r.stdout)
    assert (c['global_bs'], c['lr'], c['ssl_holdout'], c['crop_from'], c['source_size']) == (128, pytest.approx(0.015), 0.1, 1.25, 80)
    assert c['method_kwargs']['decoder_warmup'] == 5  # the ImageNet start's settings are filled in
    assert not (tmp_path / 'r').exists()


BAD_SETTINGS = [
    (['--arch', 'efficientnet_lite0', '--weights', 'V1'], 'only the torchvision encoders'),
    (['--arch', 'resnet18', '--weights', 'V2'], "torchvision's resnet18 has V1 only"),
    (['--arch', 'resnet50', '--weights', 'V7'], '--weights must be V1 or V2'),
    (['--ssl_holdout', 1.0], '--ssl_holdout must be a fraction in [0, 1)'),
    (['--crop_from', 0.5], '--crop_from must be at least 1'),
]


@pytest.mark.parametrize('i', range(len(BAD_SETTINGS)), ids=[' '.join(map(str, a)) for a, _ in BAD_SETTINGS])
def test_pretrain_bad_settings_one_line(cli_batch, i):
    "Refused in one line before the (missing) data are read; all five in one process (`cli_batch`)."
    r, _ = cli_batch([['fgssl_pretrain', '--method', 'moco', '--data', '{tmp}/no_data', '--out', '{tmp}/r', *a] for a, _ in BAD_SETTINGS], i)
    msg = BAD_SETTINGS[i][1]
    assert r.returncode == 2 and msg in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_weights_versions_name_the_torchvision_weights():
    from fgssl_nb.models import torchvision_weights
    assert torchvision_weights('resnet50', 'V1') == 'IMAGENET1K_V1' and torchvision_weights('resnet50', 'v2') == 'IMAGENET1K_V2'
    assert torchvision_weights('resnet50') == 'DEFAULT'


def test_weights_downloaded_once_under_rank0_first(monkeypatch):
    "Several processes: rank 0 downloads, the others wait at the barrier and then read the cache."
    import torchvision, fgssl_nb.distributed as D
    from fgssl_nb.models import create_encoder
    calls = []
    monkeypatch.setattr(D, 'rank0_first', lambda f, *a, **k: calls.append(k) or f(**{**k, 'weights': None}))
    create_encoder('resnet18', pretrained='V1')
    assert calls == [dict(weights='IMAGENET1K_V1')]


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the message on a machine without CUDA')
def test_eval_device_cuda_without_gpu(tmp_path):
    r = run('fgssl_eval', '--encoder', 'random', '--out', tmp_path / 'e', '--device', 'cuda')
    assert r.returncode == 2 and 'no CUDA GPU here' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    r = run('fgssl_eval', '--encoder', 'random', '--out', tmp_path / 'e', '--device', 'gpu0')
    assert r.returncode == 2 and 'is not a device' in r.stderr, r.stderr


def test_eval_records_device_and_precision(birds, tmp_path):
    r = run('fgssl_eval', '--encoder', 'random', '--data', birds, '--size', 32, '--out', tmp_path / 'e', '--protocols', 'knn', '--device', 'cpu')
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / 'e' / 'metrics.json').read_text())
    assert (m['eval_device'], m['eval_precision']) == ('cpu', 'fp32')


def test_eval_precision_rule():
    from fgssl_nb.cli import eval_precision
    assert eval_precision('auto', 'cpu', 'bf16') == 'fp32'  # the CPU: exact numbers
    assert eval_precision('auto', 'cuda', 'bf16') == 'bf16' and eval_precision('auto', 'cuda', 'fp32') == 'fp32'
    assert eval_precision('fp16', 'cpu') == 'fp16'


def test_holdout_and_crop_source(birds, tmp_path):
    "The whole pool by default; --ssl_holdout holds out that fraction; --crop_from decodes the images larger and the views still come out at --size."
    from fgssl_nb.cli import pretrain_run
    a = pretrain_run('simclr', birds, size=32, bs=4, epochs=1, out=tmp_path / 'a', knn=False, progress=False, proj_hidden=16, proj_dim=8)
    n = len(a.dls.train.dataset) + len(a.dls.valid.dataset)
    assert len(a.dls.valid.dataset) == 0
    b = pretrain_run('simclr', birds, size=32, bs=4, epochs=1, out=tmp_path / 'b', knn=False, progress=False, ssl_holdout=0.25,
                     crop_from=1.5, proj_hidden=16, proj_dim=8)
    assert len(b.dls.valid.dataset) == round(0.25 * n)
    x = b.dls.one_batch()[0]
    assert x.shape[-1] == 48  # decoded at 1.5 x 32
    views = b.run_state.method_cb.make_views(x)
    assert all(v.shape[-2:] == (32, 32) for v in views)
    cfg = json.loads((tmp_path / 'b' / 'config.json').read_text())
    assert (cfg['ssl_holdout'], cfg['crop_from'], cfg['source_size']) == (0.25, 1.5, 48)


def test_every_view_recipe_outputs_size_from_a_larger_source():
    "--crop_from works for every view recipe: each pipeline starts with a crop resized to --size."
    from fgssl_nb.learner import ssl_learner
    from fgssl_nb.registry import get_method, method_names
    from fgssl_nb.compare import SYSTEM1_VIEWS
    x = torch.rand(4, 3, 48, 48)
    cls = get_method('simclr')
    for v in (None, 'simclr', 'moco', 'simsiam', 'byol', 'hue', *SYSTEM1_VIEWS):
        ps = cls.default_views(32, v)
        for p in ps: assert p(x).shape[-2:] == (32, 32), (v, p)


def test_moco_queue_asked_for_is_kept(birds):
    from fgssl_nb.data import read_dataset, ssl_dls
    from fgssl_nb.learner import ssl_learner
    dls = ssl_dls(read_dataset(birds), size=32, bs=4, num_workers=0)
    n = len(dls.train.dataset)
    assert len(ssl_learner(dls, 'moco', proj_hidden=16, proj_dim=8, queue_size=n).model.queue.keys) == n
    assert len(ssl_learner(dls, 'moco', proj_hidden=16, proj_dim=8, queue_size=65536).model.queue.keys) == (n // 4) * 4


def test_export_and_embed_end_to_end(birds, tmp_path):
    "A trained run out of the library: torchvision names (strict load, the same features) and the features of every split."
    import torchvision
    from fgssl_nb.runs import load_encoder
    from fgssl_nb.data import normalize
    r = run('fgssl_pretrain', '--method', 'simclr', '--data', birds, '--size', 32, '--bs', 4, '--epochs', 1, '--no_knn',
            '--out', tmp_path / 'r', '--kw', 'proj_hidden=16', 'proj_dim=8')
    assert r.returncode == 0, r.stderr
    r = run('fgssl_export', tmp_path / 'r', '--format', 'torchvision', '--out', tmp_path / 'tv.pth')
    assert r.returncode == 0 and 'load_state_dict' in r.stdout, r.stderr
    m = torchvision.models.resnet18(); m.fc = torch.nn.Identity()
    m.load_state_dict(torch.load(tmp_path / 'tv.pth'), strict=True)
    enc, x = load_encoder(tmp_path / 'r' / 'encoder.pth').eval(), torch.rand(3, 3, 32, 32)
    with torch.no_grad(): assert torch.allclose(m.eval()(normalize(x)), enc(normalize(x)), atol=1e-5)
    r = run('fgssl_embed', birds, '--encoder', tmp_path / 'r', '--out', tmp_path / 'emb', '--device', 'cpu')
    assert r.returncode == 0, r.stderr
    info = json.loads((tmp_path / 'emb' / 'embed.json').read_text())
    tr, ty = np.load(tmp_path / 'emb' / 'train_features.npy'), np.load(tmp_path / 'emb' / 'train_labels.npy')
    assert tr.shape[1] == 512 and len(tr) == len(ty) == info['files']['train']['labels'] and info['size'] == 32
    assert (tmp_path / 'emb' / 'unlabeled_features.npy').exists()


@pytest.mark.parametrize('arch,fmt,msg', [
    ('efficientnet_lite0', 'torchvision', 'no torchvision equivalent'),
    ('srgan_g', 'timm', 'no timm equivalent'),
    ('resnet18', 'onnx', '--format must be torchvision or timm'),
])
def test_export_bad_input_one_line(arch, fmt, msg, tmp_path):
    from fgssl_nb.models import create_encoder
    from fgssl_nb.runs import save_encoder
    save_encoder(create_encoder(arch), tmp_path / 'encoder.pth')
    r = run('fgssl_export', tmp_path, '--format', fmt)
    assert r.returncode == 2 and msg in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert not (tmp_path / f'encoder_{fmt}.pth').exists()


def test_export_missing_run_one_line(tmp_path):
    r = run('fgssl_export', tmp_path / 'nothing')
    assert r.returncode == 2 and 'does not exist' in r.stderr, r.stderr


def test_compare_flags_reach_the_entries():
    "--weights, --ssl_holdout, --crop_from on fgssl_compare: into every SSL entry's configuration and the baseline's weights."
    r = run('fgssl_compare', '--grid', 'lcr', '--arch', 'resnet50', '--weights', 'V2', '--size', 64, '--ssl_holdout', 0.1,
            '--crop_from', 1.25, '--only', 'init', 'simsiam', '--dry_run')
    assert r.returncode == 0, r.stderr
    cfg = _blocks(r.stdout)
    assert cfg['imagenet (frozen)']['weights'] == 'V2'
    s = cfg['simsiam']
    assert (s['pretrained'], s['ssl_holdout'], s['crop_from'], s['source_size']) == ('V2', 0.1, 1.25, 80)
    bad = run('fgssl_compare', '--grid', 'lcr', '--arch', 'efficientnet_lite0', '--weights', 'V1', '--only', 'moco', '--dry_run')
    assert bad.returncode == 2 and 'only the torchvision encoders' in bad.stderr, bad.stderr
