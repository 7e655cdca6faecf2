"""System 2's decoder as part of a run: decoder.pth written and reloaded, exact across resume (warm-up included), the
decoder protocol of fgssl_eval end to end, its bad input, and the ImageNet-start settings reaching fgssl_pretrain."""
import json, shutil, subprocess, sys
from pathlib import Path
import pytest
import torch
from conftest import StopAfter

BIN = Path(sys.executable).parent
SMALL = ['--kw', 'proj_hidden=32', 'proj_dim=16', 'decoder_width=16', 'queue_size=16']


def run(*args):
    return subprocess.run([str(BIN / args[0]), *map(str, args[1:])], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def synth_run(tiny, tmp_path_factory):
    "A finished 1-epoch synth-moco run (Grad-CAM criterion, 2 warm-up epochs) on flowers17-tiny, 32 px."
    out = tmp_path_factory.mktemp('synth') / 'run'
    r = run('fgssl_pretrain', '--method', 'synth-moco', '--data', tiny, '--out', out, '--size', 32, '--bs', 8, '--epochs', 1,
            '--no_knn', '--criterion', 'gradcam', '--n_dims', 0.5, '--decoder_warmup', 2, *SMALL)
    assert r.returncode == 0, r.stderr
    yield out, r
    shutil.rmtree(out.parent, ignore_errors=True)  # its checkpoints: free /tmp for the later tests


def test_pretrain_writes_decoder_after_a_warmup(synth_run):
    out, r = synth_run
    assert 'decoder warm-up: 2 epochs on cached features of 50 images' in r.stdout  # the whole pool of 50 (no hold-out by default)
    ck = torch.load(out / 'decoder.pth', map_location='cpu', weights_only=False)
    assert ck['config']['in_dim'] == 512 and ck['encoder_arch'] == 'resnet18'
    assert ck['pairs'] == dict(criterion='gradcam', n_dims=0.5, noise='gaussian', noise_scale=1.0, noise_ref='dim')
    model = torch.load(out / 'checkpoint.pth', map_location='cpu', weights_only=False)['model']
    assert all(torch.equal(v, model[f'decoder.{k}']) for k, v in ck['state_dict'].items())  # the trained decoder itself
    assert json.loads((out / 'config.json').read_text())['method_kwargs']['decoder_warmup'] == 2


def test_eval_decoder_protocol(synth_run):
    out, _ = synth_run
    r = run('fgssl_eval', out, '--protocols', 'decoder', 'knn')
    assert r.returncode == 0, r.stderr
    m = json.loads((out / 'metrics.json').read_text())
    for k in ('decoder_knn_top1', 'decoder_knn_top1_perturbed', 'decoder_knn_top1_input', 'decoder_pair_change', 'knn_top1'):
        assert 0 <= m[k] <= 1.5, (k, m[k])
    assert m['decoder_knn_top1_input'] == m['knn_top1']  # the ceiling is the encoder's own k-NN on the real test images
    assert m['decoder_criterion'] == 'gradcam' and m['decoder_n_dims'] == 256 and m['decoder_chance'] == 0.2
    assert m['decoder_pair_change'] > 0 and 5 < m['decoder_psnr_mean_image'] < 30 and m['decoder_psnr'] > 0
    assert (out / 'decoder_pairs.png').stat().st_size > 5000


def test_eval_decoder_bad_input(synth_run, tiny, tmp_path):
    out, _ = synth_run
    # a run of a method without a decoder: one line naming the missing file
    r = run('fgssl_pretrain', '--method', 'moco', '--data', tiny, '--out', tmp_path / 'moco', '--size', 32, '--bs', 8, '--epochs', 1,
            '--no_knn', '--kw', 'proj_hidden=32', 'proj_dim=16', 'queue_size=16')
    assert r.returncode == 0, r.stderr
    r = run('fgssl_eval', tmp_path / 'moco', '--protocols', 'decoder')
    assert r.returncode == 2 and r.stderr.count('\n') == 1
    assert 'decoder.pth does not exist' in r.stderr and 'this run is moco' in r.stderr
    # a decoder file from another architecture: one line, nothing overwritten
    ck = torch.load(out / 'decoder.pth', map_location='cpu', weights_only=False)
    torch.save(dict(ck, encoder_arch='resnet50', num_features=2048), tmp_path / 'moco' / 'decoder.pth')
    before = (tmp_path / 'moco' / 'metrics.json').read_text() if (tmp_path / 'moco' / 'metrics.json').exists() else None
    r = run('fgssl_eval', tmp_path / 'moco', '--protocols', 'decoder')
    assert r.returncode == 2 and r.stderr.count('\n') == 1
    assert 'decodes 2048-d features of resnet50, but the encoder is resnet18 (512-d)' in r.stderr
    after = (tmp_path / 'moco' / 'metrics.json').read_text() if (tmp_path / 'moco' / 'metrics.json').exists() else None
    assert after == before
    # a baseline encoder has no decoder
    r = run('fgssl_eval', '--encoder', 'random', '--data', tiny, '--out', tmp_path / 'rnd', '--protocols', 'decoder')
    assert r.returncode == 2 and 'give its run folder, not --encoder' in r.stderr


def test_decoder_survives_resume(birds, tmp_path):
    "Interrupted after epoch 1 of 2 and resumed: the warm-up is not repeated and decoder.pth equals an uninterrupted run's."
    from fastai.torch_core import set_seed
    from fgssl_nb.data import read_dataset, ssl_dls
    from fgssl_nb.learner import ssl_learner, pretrain
    def learner():
        set_seed(0)
        dls = ssl_dls(read_dataset(birds), size=32, bs=4, num_workers=0)
        return ssl_learner(dls, 'synth-moco', arch='resnet18', precision='fp32', proj_hidden=32, proj_dim=16, decoder_width=16,
                           decoder_warmup=2, perceptual=0.5)
    a = learner(); pretrain(a, 2, run_dir=tmp_path / 'a', progress=False)
    assert a.synth_pairs.warmed and len(a.synth_pairs.warmup_losses) == 2
    b = learner(); b.add_cb(StopAfter(1)); pretrain(b, 2, run_dir=tmp_path / 'b', progress=False)
    assert not (tmp_path / 'b' / 'decoder.pth').exists()
    c = learner(); pretrain(c, 2, run_dir=tmp_path / 'b', resume=True, progress=False)
    assert c.synth_pairs.warmup_losses is None  # the resumed run did not warm up again
    da = torch.load(tmp_path / 'a' / 'decoder.pth', weights_only=False); db = torch.load(tmp_path / 'b' / 'decoder.pth', weights_only=False)
    assert all(torch.equal(da['state_dict'][k], db['state_dict'][k]) for k in da['state_dict'])
    assert all(torch.equal(da['feat_stats'][k], db['feat_stats'][k]) for k in da['feat_stats'] if k != 'imp')
    log = (tmp_path / 'a' / 'log.csv').read_text().splitlines()[0].split(',')
    assert 'L_P' in log  # the perceptual term has its log column


def test_imagenet_settings_reach_pretrain(tiny, tmp_path):
    "--pretrained fills in the ImageNet-start settings of a synth method (what is given on the command line wins); --help says both."
    from fgssl_nb.cli import SYNTH_IMAGENET, SYNTH_SCRATCH, ADAPT_IMAGENET, start_options
    from fgssl_nb.synth import SynthPairs
    import inspect
    defaults = {k: p.default for k, p in inspect.signature(SynthPairs.__init__).parameters.items()}
    assert all(defaults[k] == v for k, v in SYNTH_SCRATCH.items())  # the scratch column of --help is the code's default
    assert start_options('synth-moco', True, {'nu': 0.5}) == {**ADAPT_IMAGENET, **SYNTH_IMAGENET, 'nu': 0.5}
    assert start_options('synth-moco', False, {'nu': 0.5}) == {'nu': 0.5} and start_options('moco', False, {}) == {}
    assert start_options('moco', True, {'freeze_bn': False}) == {**ADAPT_IMAGENET, 'freeze_bn': False}  # every SSL method adapts
    assert start_options('supervised', True, {}) == {}  # the trainers keep their own settings
    r = run('fgssl_pretrain', '--method', 'synth-simsiam', '--data', tiny, '--out', tmp_path / 'r', '--size', 32, '--bs', 8,
            '--epochs', 1, '--no_knn', '--arch', 'efficientnet_lite0', '--pretrained', '--decoder_warmup', 1,
            '--kw', 'proj_dim=16', 'decoder_width=16')
    assert r.returncode == 0, r.stderr
    kw = json.loads((tmp_path / 'r' / 'config.json').read_text())['method_kwargs']
    assert kw == {**ADAPT_IMAGENET, **SYNTH_IMAGENET, 'decoder_warmup': 1, 'proj_dim': 16, 'decoder_width': 16}
    assert 'decoder warm-up: 1 epochs' in r.stdout
    h = ' '.join(run('fgssl_pretrain', '--help').stdout.split())  # argparse wraps the lines
    assert f"{SYNTH_IMAGENET['nu']:g} with --pretrained" in h and f"{SYNTH_IMAGENET['decoder_warmup']} with" in h


def test_resnet_form_through_the_learner(birds, tmp_path):
    "decoder_form='resnet' reaches the model, and decoder.pth rebuilds that form."
    from fastai.torch_core import set_seed
    from fgssl_nb.data import read_dataset, ssl_dls
    from fgssl_nb.learner import ssl_learner
    from fgssl_nb.synth import UpResBlock, save_decoder, load_decoder
    set_seed(0)
    dls = ssl_dls(read_dataset(birds), size=32, bs=4, num_workers=0)
    learn = ssl_learner(dls, 'synth-simsiam', arch='resnet18', precision='fp32', proj_dim=16, decoder_width=16, decoder_form='resnet')
    assert any(isinstance(m, UpResBlock) for m in learn.model.decoder.modules())
    save_decoder(learn.model, tmp_path / 'decoder.pth', learn.synth_pairs)
    dec, rec = load_decoder(tmp_path / 'decoder.pth', learn.model.encoder)
    assert dec.form == 'resnet' and rec['config']['form'] == 'resnet'
    assert all(torch.equal(a, b) for a, b in zip(dec.state_dict().values(), learn.model.decoder.state_dict().values()))
