"Grad-CAM against hand-derived maps, its hygiene (hooks, grads, modes), and the interpretation figures and box scores."
import shutil
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch, torch.nn as nn, torch.nn.functional as F
import torchvision
from PIL import Image
from fgssl_nb.data import read_dataset, normalize
from fgssl_nb.evaluate import Normalized
from fgssl_nb.models import create_encoder, SSLModel, mlp
from fgssl_nb.interpret import (grad_cam, default_target_layer, to_image, show_cam, cam_grid, pair_grid, class_separation,
                                variance_dims, feature_densities, variance_spectrum, image_boxes, load_boxed, box_mass, peak_in_box,
                                tsne_embed, tsne_plot)


@pytest.fixture(autouse=True)
def _close_figs():
    yield
    plt.close('all')


def _minmax_ref(cam):
    "Reference per-image min-max scaling of a (B, h, w) map that is not constant."
    lo, hi = cam.flatten(1).min(1).values[:, None, None], cam.flatten(1).max(1).values[:, None, None]
    return (cam - lo) / (hi - lo)


def _up(cam, size):
    return F.interpolate(cam[:, None], size=size, mode='bilinear', align_corners=False)[:, 0]


class OnePixel(nn.Module):
    "Channel 0 = 1 - x, channel 1 = x; class 0 = 2 * A[1, 3, 5], class 1 = -A[1, 3, 5]."
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([-1., 1.]).view(2, 1, 1, 1)); self.conv.bias.copy_(torch.tensor([1., 0.]))
    def forward(self, x):
        a = self.conv(x)
        return torch.stack([2 * a[:, 1, 3, 5], -a[:, 1, 3, 5]], 1)


def test_single_location_score_gives_map_there_only():
    x = torch.zeros(2, 1, 8, 8); x[:, 0, 3, 5] = 1
    net = OnePixel()
    expected = torch.zeros(2, 8, 8); expected[:, 3, 5] = 1
    assert torch.equal(grad_cam(net, x, net.conv, target=0), expected)
    assert torch.equal(grad_cam(net, x, 'conv', target=None), expected)       # predicted class is 0
    neg = grad_cam(net, x, net.conv, target=1)                                # negative weight: ReLU leaves nothing
    assert torch.equal(neg, torch.zeros(2, 8, 8)) and not neg.isnan().any()
    flat = nn.Sequential(nn.Conv2d(1, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())   # constant map: no preference -> ones
    assert torch.equal(grad_cam(flat, torch.ones(1, 1, 8, 8), flat[0], target=lambda o: o.sum() * 10 + o.sum().abs() * 20), torch.ones(1, 8, 8))
    one = nn.Sequential(nn.Conv2d(3, 4, 3, stride=8), nn.AdaptiveAvgPool2d(1), nn.Flatten())  # a 1x1 map, upsampled
    assert set(grad_cam(one, torch.randn(3, 3, 9, 9), one[0], target=0).unique().tolist()) <= {0.0, 1.0}


def _gap_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


def test_gap_linear_net_equals_class_activation_map():
    "For conv -> GAP -> linear, alpha_c = W[k, c] / (h w): Grad-CAM is CAM (Zhou et al.), computed here without autograd."
    net, x, k = _gap_net(), torch.randn(3, 3, 8, 8), torch.tensor([0, 2, 3])
    with torch.no_grad():
        ref = _minmax_ref(_up(F.relu(torch.einsum('bc,bchw->bhw', net[3].weight[k], net[0](x))), (8, 8)))
    torch.testing.assert_close(grad_cam(net, x, net[0], target=k), ref, atol=1e-5, rtol=0)


def test_nonlinear_net_matches_split_autograd_reference_image_by_image():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 5, 1), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(5, 3))
    with torch.no_grad(): net[1].running_mean.uniform_(-1, 1); net[1].running_var.uniform_(0.5, 2)
    x, k = torch.randn(4, 3, 12, 12), [0, 1, 2, 1]
    cams = grad_cam(net.train(), x, net[4], target=torch.tensor(k))
    assert net.training
    net.eval()
    for i in range(4):
        A = net[:5](x[i:i + 1]).detach().requires_grad_()
        g, = torch.autograd.grad(net[5:](A)[0, k[i]], A)
        ref = _minmax_ref(_up(F.relu((g.mean((2, 3), keepdim=True) * A).sum(1)).detach(), (12, 12)))
        torch.testing.assert_close(cams[i], ref[0], atol=1e-5, rtol=0)


def test_scalar_loss_target_closed_form():
    "L = sum(o^2)/2 -> dL/do = o -> alpha_c = sum_k o_k W[k, c] / (h w)."
    net, x = _gap_net(2), torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        ref = _minmax_ref(_up(F.relu(torch.einsum('bc,bchw->bhw', net(x) @ net[3].weight, net[0](x))), (8, 8)))
    torch.testing.assert_close(grad_cam(net, x, net[0], target=lambda o: (o ** 2).sum() / 2), ref, atol=1e-5, rtol=0)
    # one value per image is summed: the same maps
    torch.testing.assert_close(grad_cam(net, x, net[0], target=lambda o: (o ** 2).sum(1) / 2), ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match='scalar'): grad_cam(net, x, net[0], target=lambda o: o)


def test_nothing_left_behind_even_on_error():
    net = _gap_net(3)
    net.train(); net[0].eval()
    net[0].weight.grad = torch.full_like(net[0].weight, 7.0)
    net[3].weight.requires_grad_(False)
    flags, modes = [p.requires_grad for p in net.parameters()], [m.training for m in net.modules()]
    x = torch.randn(2, 3, 8, 8)
    def check():
        assert all(not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks for m in net.modules())
        assert [p.requires_grad for p in net.parameters()] == flags and [m.training for m in net.modules()] == modes
        assert torch.equal(net[0].weight.grad, torch.full_like(net[0].weight, 7.0))
        assert all(p.grad is None for n, p in net.named_parameters() if n != '0.weight')
        assert not x.requires_grad
    grad_cam(net, x, net[0], target=1); check()
    with pytest.raises(RuntimeError, match='boom'): grad_cam(net, x, net[0], target=lambda o: (_ for _ in ()).throw(RuntimeError('boom')))
    check()
    with pytest.raises(ValueError): grad_cam(net, x, net[0], target=9)
    check()
    with torch.no_grad(): a = grad_cam(net, x, net[0], target=1)
    with torch.inference_mode(): b = grad_cam(net, x.clone(), net[0], target=1)
    torch.testing.assert_close(a, b)
    check()


def test_frozen_model_works_and_batch_does_not_matter():
    enc = create_encoder('resnet18')
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))    # layer4: 2x2 maps
    cams = grad_cam(enc, normalize(x), target=3)
    assert cams.shape == (4, 64, 64) and cams.min() >= 0 and cams.max() <= 1
    assert all(c.max() in (0.0, 1.0) for c in cams)
    for p in enc.parameters(): p.requires_grad_(False)
    torch.testing.assert_close(grad_cam(enc, normalize(x[1:2]), target=3)[0], cams[1], atol=1e-5, rtol=0)
    assert all(not p.requires_grad and p.grad is None for p in enc.parameters())


def test_default_target_layer():
    enc = create_encoder('resnet18')
    assert default_target_layer(enc) is enc.body[-1]
    assert default_target_layer(SSLModel(enc, mlp(512, 16, 8), momentum=True)) is enc.body[-1]
    assert default_target_layer(nn.Sequential(Normalized(enc), nn.Flatten(), nn.Linear(512, 3))) is enc.body[-1]
    tv = torchvision.models.resnet18()
    assert default_target_layer(tv) is tv.layer4
    with pytest.raises(ValueError, match='target_layer='): default_target_layer(nn.Linear(2, 2))


def test_bad_arguments_name_the_fix():
    net, x = _gap_net(), torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r'\(B, C, h, w\)'): grad_cam(net, x, net[2])
    with pytest.raises(ValueError, match='not a sub-module'): grad_cam(net, x, nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match='no sub-module'): grad_cam(net, x, 'layer4')
    with pytest.raises(ValueError, match='out of range'): grad_cam(net, x, net[0], target=4)
    with pytest.raises(ValueError, match='2 class indices'): grad_cam(net, torch.randn(3, 3, 8, 8), net[0], target=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match='image batch'): grad_cam(net, x[0], net[0])


def test_to_image_and_overlays():
    img = torch.rand(3, 6, 5)
    normed = (img - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    np.testing.assert_allclose(to_image(normed), img.permute(1, 2, 0).numpy(), atol=1e-5)
    np.testing.assert_allclose(to_image(img), img.permute(1, 2, 0).numpy(), atol=1e-6)
    np.testing.assert_allclose(to_image(Image.new('RGB', (5, 6), (255, 0, 0)))[..., 0], np.ones((6, 5)))
    ax = show_cam(img, torch.linspace(0, 1, 9).view(3, 3), box=(1, 1, 4, 4))
    assert ax.images[1].get_array().shape == (6, 5) and len(ax.patches) == 1
    fig = pair_grid([img[None].expand(3, -1, -1, -1), [normed]], titles=['a', 'b'])
    assert len(fig.axes) == 6 and len(fig.axes[3].images) == 1 and len(fig.axes[4].images) == 0
    np.testing.assert_allclose(fig.axes[3].images[0].get_array(), img.permute(1, 2, 0).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match='titles'): pair_grid([[img]], titles=['a', 'b'])


def test_cam_grid_maps_are_grad_cam():
    a, b = _gap_net(0), _gap_net(1)
    x = torch.rand(3, 3, 8, 8)
    fig = cam_grid({'a': a, 'b': b}, x, target={'a': 0, 'b': 1}, norm=normalize)
    assert len(fig.axes) == 9
    torch.testing.assert_close(fig.cams['a'], grad_cam(a, normalize(x), target=0))
    torch.testing.assert_close(fig.cams['b'], grad_cam(b, normalize(x), target=1))


def test_feature_figures_known_answer():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    f = torch.randn(300, 4, generator=g) * torch.tensor([1.0, 0.1, 0.0, 0.5])
    f[:, 0] += torch.where(y == 0, -2.0, 2.0)
    fig, dims = feature_densities(f, y, classes=(0, 1))
    assert dims == (0, 1) == variance_dims(f)                     # dim 2 is constant: skipped
    f2 = f.clone(); f2[:, 2] = 1e-5 * torch.randn(300, generator=g)          # nearly constant (var 1e-10 << 1e-6 x max): skipped too
    assert variance_dims(f2) == (0, 1) and variance_dims(f2, rel_eps=0) == (0, 2)
    fa, fb = f[y == 0].double().numpy(), f[y == 1].double().numpy()
    with np.errstate(invalid='ignore'): ref = np.abs(fa.mean(0) - fb.mean(0)) / np.sqrt((fa.var(0) + fb.var(0)) / 2)
    sep = class_separation(f, y, 0, 1)
    np.testing.assert_allclose(sep[[0, 1, 3]], ref[[0, 1, 3]], rtol=1e-12)
    assert sep[2] == 0 and sep[0] > 3
    ax = variance_spectrum(f)
    np.testing.assert_allclose(ax.lines[0].get_ydata()[:3], np.sort(f.double().var(0, unbiased=False).numpy())[::-1][:3], rtol=1e-12)
    with pytest.raises(ValueError, match='at least 2'): class_separation(f[:3], y[:3], 0, 1)


def test_box_scores_hand_values():
    c = torch.zeros(2, 4, 4); c[:, :2, :2] = 1; c[:, 3, 3] = 1
    boxes = [(0, 0, 2, 2), (2, 2, 4, 4)]
    torch.testing.assert_close(box_mass(c, boxes), torch.tensor([0.8, 0.2], dtype=torch.float64))
    assert peak_in_box(c, boxes).tolist() == [True, False]
    torch.testing.assert_close(box_mass(torch.ones(1, 4, 4), [(0.6, 0, 2, 4)]), torch.tensor([0.25], dtype=torch.float64))
    assert box_mass(torch.zeros(1, 4, 4), [(0, 0, 4, 4)]).isnan().all()


def test_image_boxes_follow_resize_and_crop(birds, tmp_path):
    shutil.copytree(birds, tmp_path / 'b')                        # a private copy: one image is altered below
    birds = tmp_path / 'b'
    ds = read_dataset(birds)
    rows = [l.split() for l in (birds / 'bounding_boxes.txt').read_text().splitlines()]
    x, y, w, h = map(float, rows[5][1:])                          # the birds are 64 px
    np.testing.assert_allclose(image_boxes(ds, [5])[0], [x, y, x + w, y + h])
    np.testing.assert_allclose(image_boxes(ds, [5], 32)[0], np.clip([x / 2, y / 2, (x + w) / 2, (y + h) / 2], 0, 32))
    wide = Image.new('RGB', (96, 64)); wide.paste(Image.open(ds.items[5])); wide.save(ds.items[5])
    # 96x64 at size 32 -> 48x32, centre crop from column 8; squished: x / 3, y / 2
    np.testing.assert_allclose(image_boxes(ds, [5], 32)[0], np.clip([x / 2 - 8, y / 2, (x + w) / 2 - 8, (y + h) / 2], 0, 32))
    np.testing.assert_allclose(image_boxes(ds, [5], 32, resize='squish')[0], [x / 3, y / 2, (x + w) / 3, (y + h) / 2])
    xb, yb, bb = load_boxed(ds, [0, 5], 32)
    assert xb.shape == (2, 3, 32, 32) and 0 <= xb.min() and xb.max() <= 1 and yb.tolist() == ds.labels[[0, 5]].tolist()
    with pytest.raises(ValueError, match='crop_to_box'): image_boxes(read_dataset(birds, crop_to_box=True), [0])



def _loo_knn(x, y, k=5):
    "Leave-one-out k-NN top-1 (Euclidean, majority vote)."
    d = ((x[:, None] - x[None]) ** 2).sum(-1); np.fill_diagonal(d, np.inf)
    votes = y[np.argsort(d, 1)[:, :k]]
    return float((np.array([np.bincount(v, minlength=y.max() + 1).argmax() for v in votes]) == y).mean())


def test_tsne_plot_one_panel_per_set_and_clusters_stay_apart():
    "Three classes 8.5 apart in 40-d (unit noise): 5-NN in the plane is perfect, also after a rotation of the features."
    pytest.importorskip('sklearn')
    rng = np.random.default_rng(1)
    y = np.arange(90) % 3
    x = rng.normal(size=(90, 40)); x[np.arange(90), y] += 6.0               # class c: mean 6 along axis c
    q, _ = np.linalg.qr(rng.normal(size=(40, 40)))                          # a random rotation: same distances
    assert _loo_knn(x, y) == 1.0
    fig, axs = plt.subplots(1, 2)
    out = tsne_plot({'clusters': torch.tensor(x, dtype=torch.float32), 'rotated': x @ q}, torch.tensor(y),
                    classes=['a', 'b', 'c'], axs=axs)
    assert out is fig and len(fig.axes) == 2
    assert [ax.get_title() for ax in fig.axes] == ['clusters', 'rotated']
    assert all(len(ax.collections) == 3 for ax in fig.axes)                 # one scatter per class
    assert [t.get_text() for t in fig.axes[1].get_legend().get_texts()] == ['a', 'b', 'c']
    for name, emb in out.embeddings.items():
        assert emb.shape == (90, 2) and np.isfinite(emb).all()
        assert _loo_knn(emb, y) == 1.0, name
        centres = np.stack([emb[y == c].mean(0) for c in range(3)])
        spread = max(np.linalg.norm(emb[y == c] - centres[c], axis=1).mean() for c in range(3))
        gaps = [np.linalg.norm(centres[a] - centres[b]) for a in range(3) for b in range(a + 1, 3)]
        assert min(gaps) > 2 * spread, (name, gaps, spread)
    np.testing.assert_array_equal(tsne_embed(x), out.embeddings['clusters'])   # same features, same seed
    assert len(tsne_plot({'one': x}, y).axes) == 1
    with pytest.raises(ValueError, match='90 rows for 3 labels'): tsne_plot({'a': x}, y[:3])
    with pytest.raises(ValueError, match='axs holds 2'): tsne_plot({'a': x}, y, axs=axs)
    with pytest.raises(ValueError, match='perplexity'): tsne_embed(x[:10], perplexity=10)

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_model_cpu_input():
    net, x = _gap_net().cuda(), torch.randn(2, 3, 8, 8)
    cam = grad_cam(net, x, net[0], target=1)
    assert cam.device.type == 'cpu'
    torch.testing.assert_close(cam, grad_cam(net.cpu(), x, net[0], target=1), atol=1e-4, rtol=0)
