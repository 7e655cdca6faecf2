"Batched view generation: every primitive checked by value against a closed form or an independent library."
import math
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
import kornia.enhance as KE
from fgssl_nb.data import normalize
from fgssl_nb.augment import (ViewTfm, RandResizedCrop, RandHFlip, RandColorJitter, RandGrayscale, RandSolarize,
                              RandGaussianBlur, ViewPipeline, hue_shift, blur_kernel_size, simclr_views, moco_views,
                              simsiam_views, byol_views, VIEWS, get_views, make_views, time_views)


def gen(seed=0): return torch.Generator().manual_seed(seed)


def test_flip_p1_is_exact_mirror():
    x = torch.rand(5, 3, 9, 7)
    assert torch.equal(RandHFlip(p=1.)(x), x.flip(-1))
    assert RandHFlip(p=0.)(x) is x


def test_p_selects_samples_and_leaves_the_rest_bitwise():
    x = torch.rand(200, 3, 4, 4)
    t = RandSolarize(p=0.3)
    prm = t.draw(x, gen(1))
    y = t(x, params=prm)
    on = prm['on']
    assert 30 < on.sum() < 90
    assert torch.equal(y[~on], x[~on])
    assert torch.equal(y[on], torch.where(x[on] >= 0.5, 1 - x[on], x[on]))
    with pytest.raises(ValueError, match=r'p must lie in \[0, 1\]'): RandGrayscale(p=-0.1)


def test_rrc_full_square_crop_is_plain_resize():
    x = torch.rand(4, 3, 50, 50)
    for size in (32, 50, 80):
        y = RandResizedCrop(size, scale=(1, 1), ratio=(1, 1))(x)
        torch.testing.assert_close(y, F.interpolate(x, size, mode='bilinear', align_corners=False), atol=1e-5, rtol=0)


def test_rrc_equals_torchvision_resized_crop_of_the_same_box():
    x = torch.rand(8, 3, 40, 56)
    t = RandResizedCrop((36, 30), scale=(0.35, 1.0))
    prm = t.draw(x, gen(2))
    y = t(x, params=prm)
    assert y.shape == (8, 3, 36, 30)
    for i in range(8):
        top, left, h, w = (int(prm[k][i]) for k in ('top', 'left', 'height', 'width'))
        ref = TF.resized_crop(x[i], top, left, h, w, [36, 30], antialias=False)
        # inside the one-pixel border both sample the same points of the box
        torch.testing.assert_close(y[i, :, 1:-1, 1:-1], ref[:, 1:-1, 1:-1], atol=1e-5, rtol=0)


def test_rrc_boxes_follow_scale_ratio_and_fit():
    prm = RandResizedCrop(32, scale=(0.1, 0.5), ratio=(0.6, 1.6)).draw(torch.zeros(5000, 3, 120, 90), gen(3))
    area = prm['height'] * prm['width'] / (120 * 90)
    asp = prm['width'] / prm['height']
    assert area.min() > 0.09 and area.max() < 0.51
    assert asp.min() > 0.57 and asp.max() < 1.7
    assert prm['top'].min() >= 0 and prm['left'].min() >= 0
    assert (prm['top'] + prm['height']).max() <= 120 and (prm['left'] + prm['width']).max() <= 90
    assert all(torch.equal(v, v.round()) for v in prm.values() if v.dtype.is_floating_point)
    # spread: crops start all over the image, not only at the corner
    assert prm['top'].float().std() > 10 and prm['left'].float().std() > 10


def test_rrc_fallback_is_torchvision_centre_crop():
    prm = RandResizedCrop(16, scale=(1, 1)).draw(torch.zeros(3, 3, 20, 100))
    assert [prm[k][0].item() for k in ('top', 'left', 'height', 'width')] == [0, 36, 20, 27]
    prm = RandResizedCrop(16, scale=(1, 1)).draw(torch.zeros(1, 3, 100, 20))
    assert [prm[k][0].item() for k in ('top', 'left', 'height', 'width')] == [36, 0, 27, 20]


def test_grayscale_three_equal_channels_with_bt601_weights():
    x = torch.rand(3, 3, 6, 6)
    y = RandGrayscale(p=1.)(x)
    want = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for c in range(3): torch.testing.assert_close(y[:, c], want, atol=1e-6, rtol=0)


def test_solarize_formula():
    x = torch.tensor([0.0, 0.25, 0.4999, 0.5, 0.75, 1.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    y = RandSolarize(p=1.)(x)
    assert torch.equal(y[0, 0, 0], torch.tensor([0.0, 0.25, 0.4999, 0.5, 0.25, 0.0]))


def test_hue_shift_matches_kornia_and_torchvision():
    torch.manual_seed(0)
    x, s = torch.rand(12, 3, 10, 10), torch.linspace(-0.5, 0.5, 12)
    x[0] = 0.3  # gray pixels: hue undefined, must stay gray
    y = hue_shift(x, s)
    torch.testing.assert_close(y, KE.adjust_hue(x, s * 2 * math.pi), atol=1e-5, rtol=0)
    torch.testing.assert_close(y, torch.stack([TF.adjust_hue(x[i], float(s[i])) for i in range(12)]), atol=1e-5, rtol=0)
    assert torch.equal(y[0], x[0])


@pytest.mark.parametrize('kw,key', [(dict(brightness=0.6), 'b'), (dict(contrast=0.6), 'c'), (dict(saturation=0.6), 's')])
def test_jitter_on_constant_image(kw, key):
    v = torch.tensor([0.1, 0.6, 0.9]).view(1, 3, 1, 1).expand(16, 3, 4, 4).contiguous()
    gray = 0.299 * 0.1 + 0.587 * 0.6 + 0.114 * 0.9
    t = RandColorJitter(**{**dict(brightness=0, contrast=0, saturation=0, hue=0), **kw}, p=1.)
    prm = t.draw(v, gen(4))
    f = prm[key].view(-1, 1, 1, 1)
    assert 0.39 < f.min() and f.max() < 1.61 and f.std() > 0.1
    want = v * f if key == 'b' else f * v + (1 - f) * gray
    torch.testing.assert_close(t(v, params=prm), want.clamp(0, 1), atol=1e-6, rtol=0)


@pytest.mark.parametrize('hue_fn', ['fast', 'kornia'])
def test_jitter_matches_torchvision_step_by_step(hue_fn):
    torch.manual_seed(1)
    x = torch.rand(6, 3, 12, 12)
    t = RandColorJitter(0.8, 0.8, 0.8, 0.2, p=1., hue_fn=hue_fn)
    prm = t.draw(x, gen(5))
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    ref = []
    for i in range(6):
        xi = x[i]
        for j in prm['order']: xi = fns[j](xi, float(prm['bcsh'[j]][i]))
        ref.append(xi)
    # torchvision's luma weighs red 0.2989, kornia's 0.299
    torch.testing.assert_close(t(x, params=prm), torch.stack(ref), atol=1e-3, rtol=0)


def test_blur_matches_torchvision_and_scales_with_size():
    assert [blur_kernel_size(s) for s in (20, 64, 128, 224)] == [3, 7, 13, 23]
    x = torch.rand(4, 3, 64, 64)
    t = RandGaussianBlur(p=1.)
    prm = t.draw(x, gen(6))
    assert prm['sigma'].min() >= 0.1 * 64 / 224 and prm['sigma'].max() <= 2.0 * 64 / 224
    ref = torch.stack([TF.gaussian_blur(x[i], [7, 7], [float(prm['sigma'][i])] * 2) for i in range(4)])
    torch.testing.assert_close(t(x, params=prm), ref, atol=1e-5, rtol=0)
    c = torch.full((2, 3, 32, 32), 0.42)
    torch.testing.assert_close(t(c), c, atol=1e-6, rtol=0)


def test_pipelines_shape_dtype_range_and_normalisation():
    x = torch.rand(6, 3, 40, 40)
    for name in VIEWS:
        for p in get_views(name, 32, n=1 if name != 'byol' else 2):
            p.norm = False
            torch.manual_seed(0); raw = p(x)
            assert raw.shape == (6, 3, 32, 32) and raw.dtype == torch.float32
            assert raw.min() >= 0 and raw.max() <= 1
            p.norm = True
            torch.manual_seed(0); torch.testing.assert_close(p(x), normalize(raw), atol=1e-6, rtol=0)


def test_recipes_hold_the_published_settings():
    s, m = simclr_views(64), moco_views(64)
    assert s.tfms[0].scale == (0.08, 1.0) and m.tfms[0].scale == (0.2, 1.0)
    assert (s.tfms[2].brightness, s.tfms[2].hue, s.tfms[2].p) == (0.8, 0.2, 0.4)
    assert (m.tfms[2].brightness, m.tfms[2].saturation, m.tfms[2].hue, m.tfms[2].p) == (0.4, 0.4, 0.1, 0.8)
    assert [t.p for t in m.tfms[1:]] == [0.5, 0.8, 0.2, 0.5]
    assert simsiam_views(64).name == 'simsiam' and [t.p for t in simsiam_views(64).tfms] == [t.p for t in m.tfms]
    b1, b2 = byol_views(64)
    assert [type(t).__name__ for t in b2.tfms][-1] == 'RandSolarize' and b2.tfms[-1].p == 0.2
    assert not any(isinstance(t, RandSolarize) for t in b1.tfms)
    assert (b1.tfms[4].p, b2.tfms[4].p, b1.tfms[2].saturation) == (1.0, 0.1, 0.2)


def test_identical_images_get_different_views():
    x = torch.rand(1, 3, 48, 48).expand(12, 3, 48, 48).contiguous()
    torch.manual_seed(0)
    y = moco_views(32)(x)
    d = (y[:, None] - y[None]).abs().flatten(2).amax(-1) + torch.eye(12) * 9
    assert d.min() > 1e-3


def test_same_seed_same_views_other_seed_other_views():
    x = torch.rand(8, 3, 48, 48)
    views = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed); views.append(make_views(x, simclr_views(32)))
    assert all(torch.equal(a, b) for a, b in zip(views[0], views[1]))
    assert (views[0][0] - views[2][0]).abs().max() > 0.1
    a = make_views(x, byol_views(32), generator=gen(9))
    b = make_views(x, byol_views(32), generator=gen(9))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_make_views_and_registry():
    x = torch.rand(4, 3, 32, 32)
    assert len(make_views(x, moco_views(16))) == 2 and len(make_views(x, moco_views(16), n=3)) == 3
    assert len(make_views(x, byol_views(16), n=4)) == 4
    assert set(VIEWS) == {'simclr', 'moco', 'simsiam', 'byol'}
    b1, b2 = get_views('byol', 16)
    assert (b1.name, b2.name) == ('byol1', 'byol2')
    s = get_views('simclr', 16)
    assert len(s) == 2 and s[0] is s[1] and len(get_views('moco', 16, n=3)) == 3
    assert get_views('moco', 16, scale=(0.5, 1.0))[0].tfms[0].scale == (0.5, 1.0)
    with pytest.raises(ValueError, match='choose from simclr, moco, simsiam, byol'): get_views('swav')
    with pytest.raises(ValueError, match='n must be >= 1'): make_views(x, moco_views(16), n=0)


def test_bad_input_is_refused_with_the_fix():
    p = moco_views(16)
    with pytest.raises(TypeError, match=r'x.float\(\) / 255'): p(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r'expected a \(B, 3, H, W\)'): p(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match=r'expected a \(B, 3, H, W\)'): p(torch.zeros(2, 1, 16, 16))


def test_fastai_tensorimage_input():
    from fastai.vision.all import TensorImage
    y = simclr_views(16)(TensorImage(torch.rand(2, 3, 20, 20)))
    assert type(y) is torch.Tensor and y.shape == (2, 3, 16, 16)


def test_new_transform_subclass_plugs_in():
    class Invert(ViewTfm):
        def apply(self, x): return 1 - x
    x = torch.rand(3, 3, 8, 8)
    p = ViewPipeline([Invert(p=1.)], 'inv', norm=False)
    assert torch.equal(p(x), 1 - x)


def test_time_views_reports_images_per_second():
    r = time_views(moco_views(16), bs=4, size=16, n=1, warmup=0, device='cpu')
    assert isinstance(r, float) and r > 0
    assert time_views(byol_views(16), bs=4, size=16, n=1, warmup=0, device='cpu') > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_views_match_cpu_views():
    x = torch.rand(16, 3, 64, 64)
    for name in VIEWS:
        ps = get_views(name, 48)
        torch.manual_seed(2); vc = make_views(x.cuda(), ps)
        torch.manual_seed(2); vh = make_views(x, ps)
        for a, b in zip(vc, vh):
            assert a.device.type == 'cuda'
            torch.testing.assert_close(a.cpu(), b, atol=2e-3, rtol=0)
