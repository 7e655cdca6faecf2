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
        for p in get_views(name, 32):  # both pipelines of the pair recipes (byol, the fine-grained variants)
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
    assert set(VIEWS) == {'simclr', 'moco', 'simsiam', 'byol', 'hue', 'gamma', 'dropout', 'regions', 'patchswap', 'dcl', 'jigsaw'}
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


# --- fine-grained variants (system 1) ---------------------------------------------------------------------------
from fgssl_nb.augment import (tile_shuffle, random_tile_perms, local_tile_perms, RandGamma, CoarseDropout, CroppedRegion,
                              RandPatchSwap, RandJigsaw, LocalJigsaw, variant_views)


def _slow_tile_shuffle(x, n, perms):
    "Reference: copy input tile perms[b, j] to output place j, one tile at a time; leftover strips untouched."
    th, tw = x.shape[-2] // n, x.shape[-1] // n
    out = x.clone()
    for b in range(len(x)):
        for j, i in enumerate(perms[b].tolist()):
            (rj, cj), (ri, ci) = divmod(j, n), divmod(i, n)
            out[b, :, rj * th:(rj + 1) * th, cj * tw:(cj + 1) * tw] = x[b, :, ri * th:(ri + 1) * th, ci * tw:(ci + 1) * tw]
    return out


def test_tile_shuffle_known_permutation_and_slow_loop():
    x = torch.arange(16.).view(1, 1, 4, 4)
    assert torch.equal(tile_shuffle(x, 2, torch.tensor([[3, 2, 1, 0]]))[0, 0],
                       torch.tensor([[10., 11, 8, 9], [14, 15, 12, 13], [2, 3, 0, 1], [6, 7, 4, 5]]))
    assert torch.equal(tile_shuffle(x, 2, torch.tensor([[0, 1, 2, 3]])), x)
    g = gen(10)
    for (H, W), n in [((32, 32), 4), ((30, 35), 4), ((21, 21), 7), ((64, 64), 8), ((10, 10), 1)]:
        x = torch.rand(6, 3, H, W, generator=g)
        perms = random_tile_perms(6, n, g)
        assert torch.equal(tile_shuffle(x, n, perms), _slow_tile_shuffle(x, n, perms))
    p = random_tile_perms(500, 3, gen(11))
    assert p.dtype == torch.long and torch.equal(p.sort(1).values, torch.arange(9).expand(500, 9))
    assert torch.equal(p, random_tile_perms(500, 3, gen(11)))
    # uniform: every tile lands in every place about equally often
    counts = torch.zeros(9, 9).index_put_((torch.arange(9).repeat(500), p.flatten()), torch.ones(4500), accumulate=True)
    assert counts.min() > 25 and counts.max() < 90
    with pytest.raises(ValueError, match=r'perms must have shape \(B, n\*n\)'): tile_shuffle(x, 2, torch.zeros(6, 3, dtype=torch.long))
    with pytest.raises(ValueError, match='larger than the image'): tile_shuffle(x, 11, random_tile_perms(6, 11))
    with pytest.raises(ValueError, match='tile indices'): tile_shuffle(x, 2, torch.full((6, 4), 4))


def test_gamma_is_recoverable_per_sample():
    x = torch.rand(10, 3, 12, 12, generator=gen(20)).clamp(0.02, 0.98)
    t = RandGamma((0.5, 2.5))
    prm = t.draw(x, gen(21))
    y = t(x, params=prm)
    ratio = (y.log() / x.log()).flatten(1)  # log(x ** g) / log(x) = g at every pixel
    torch.testing.assert_close(ratio.median(1).values, prm['g'], atol=1e-4, rtol=0)
    assert ratio.std(1).max() < 1e-3
    assert 0.5 <= prm['g'].min() and prm['g'].max() <= 2.5 and prm['g'].unique().numel() == 10
    with pytest.raises(ValueError, match='gamma must satisfy'): RandGamma((2.0, 1.0))


def _holes_mask(x, prm):
    m = torch.zeros(x.shape[0], *x.shape[-2:], dtype=torch.bool)
    for b in range(len(x)):
        for k in range(int(prm['count'][b])):
            t, l, s = int(prm['top'][b, k]), int(prm['left'][b, k]), int(prm['side'][b])
            m[b, t:t + s, l:l + s] = True
    return m


def test_coarse_dropout_holes_count_area_and_untouched_pixels():
    x = torch.rand(24, 3, 64, 48) + 0.1
    t = CoarseDropout(n_holes=(5, 20), hole_frac=(0.05, 0.2), fill=0.0)
    prm = t.draw(x, gen(22))
    y, m = t(x, params=prm), _holes_mask(x, prm)
    mm = m[:, None].expand_as(x)
    assert torch.equal(y[~mm], x[~mm]) and (y[mm] == 0).all()
    assert prm['count'].min() >= 5 and prm['count'].max() <= 20 and prm['count'].unique().numel() > 4
    assert prm['side'].min() >= round(0.05 * 48) and prm['side'].max() <= round(0.2 * 48)  # fraction of the shorter side
    area, hole = m.flatten(1).sum(1), prm['side'] ** 2  # one side per image, as in system 1's code
    assert (area >= hole).all() and (area <= hole * prm['count']).all()
    assert prm['side'].shape == (24,) and prm['top'].shape == (24, 20)
    # the published default: 10-25 px holes at 512 px
    prm = CoarseDropout().draw(torch.zeros(200, 3, 512, 512), gen(23))
    assert prm['side'].min() == 10 and prm['side'].max() == 25
    y = CoarseDropout(fill=0.5)(torch.zeros(4, 3, 32, 32), gen(24))
    assert set(y.unique().tolist()) == {0.0, 0.5}
    with pytest.raises(ValueError, match='n_holes must be a pair of ints'): CoarseDropout(n_holes=(5.5, 20))


@pytest.mark.parametrize('centre', [True, False])
def test_cropped_region_inside_equals_source_outside_blank(centre):
    x = torch.rand(16, 3, 36, 52) * 0.9
    t = CroppedRegion(frac=(0.4, 0.6), fill=1.0, centre=centre)
    prm = t.draw(x, gen(25))
    y = t(x, params=prm)
    for b in range(16):
        h, w, top, left = (int(prm[k][b]) for k in ('height', 'width', 'top', 'left'))
        assert round(0.4 * 36) <= h <= round(0.6 * 36) and round(0.4 * 52) <= w <= round(0.6 * 52)
        dt, dl = ((36 - h) // 2, (52 - w) // 2) if centre else (top, left)
        assert torch.equal(y[b, :, dt:dt + h, dl:dl + w], x[b, :, top:top + h, left:left + w])
        out = torch.ones(36, 52, dtype=torch.bool); out[dt:dt + h, dl:dl + w] = False
        assert (y[b][:, out] == 1).all()
    assert prm['top'].unique().numel() > 3 and prm['left'].unique().numel() > 3


def test_patch_swap_exchanges_exactly_two_patches_and_swap_back():
    x = torch.rand(64, 3, 40, 56)
    t = RandPatchSwap((0.3, 0.5))
    prm = t.draw(x, gen(26))
    y = t(x, params=prm)
    for b in range(64):
        s, t1, l1, t2, l2 = (int(prm[k][b]) for k in ('side', 'top1', 'left1', 'top2', 'left2'))
        assert round(0.3 * 40) <= s <= 20
        assert t1 + s <= t2 or t2 + s <= t1 or l1 + s <= l2 or l2 + s <= l1
        assert min(t1, t2, l1, l2) >= 0 and max(t1, t2) + s <= 40 and max(l1, l2) + s <= 56
        assert torch.equal(y[b, :, t1:t1 + s, l1:l1 + s], x[b, :, t2:t2 + s, l2:l2 + s])
        assert torch.equal(y[b, :, t2:t2 + s, l2:l2 + s], x[b, :, t1:t1 + s, l1:l1 + s])
        changed = (y[b] != x[b]).any(0)
        assert changed.sum() == (changed[t1:t1 + s, l1:l1 + s].sum() + changed[t2:t2 + s, l2:l2 + s].sum())
    assert torch.equal(t(y, params=prm), x)
    # both separations (rows and columns) occur
    vert = (prm['top1'] - prm['top2']).abs() >= prm['side']
    horiz = (prm['left1'] - prm['left2']).abs() >= prm['side']
    assert vert.any() and horiz.any()
    with pytest.raises(ValueError, match='frac must satisfy'): RandPatchSwap((0.3, 0.7))


def _tiles(x, n):
    B, C, H, W = x.shape
    th, tw = H // n, W // n
    return x[..., :n * th, :n * tw].reshape(B, C, n, th, n, tw).permute(0, 2, 4, 1, 3, 5).reshape(B, n * n, -1)


@pytest.mark.parametrize('tfm', [RandJigsaw(4), RandJigsaw(8), LocalJigsaw(7, 2), LocalJigsaw(3, 1)])
def test_jigsaw_output_tiles_are_a_permutation_of_input_tiles(tfm):
    x = torch.rand(8, 3, 64, 64)
    prm = tfm.draw(x, gen(27))
    y = tfm(x, params=prm)
    a, b = _tiles(x, tfm.n), _tiles(y, tfm.n)
    srt = lambda z: z.gather(1, z.sum(-1).argsort(1)[..., None].expand_as(z))  # tiles as a multiset: sorted by their sum
    assert torch.equal(srt(a), srt(b))
    assert torch.equal(y, tile_shuffle(x, tfm.n, prm['perms']))
    r = 64 % tfm.n  # leftover strips (64 = 7 * 9 + 1) stay in place
    if r: assert torch.equal(y[..., 64 - r:, :], x[..., 64 - r:, :]) and torch.equal(y[..., 64 - r:], x[..., 64 - r:])
    assert not torch.equal(x, y)


def test_dcl_displacement_bound_is_2k_minus_1_and_reached():
    for n, k in [(7, 2), (7, 1), (5, 3)]:
        p = local_tile_perms(3000, n, k, gen(28))
        assert torch.equal(p.sort(1).values, torch.arange(n * n).expand_as(p))
        pos = torch.arange(n * n)
        dr, dc = (p // n - pos // n).abs(), (p % n - pos % n).abs()
        bound = min(2 * k - 1, n - 1)
        assert dr.max() == bound and dc.max() == bound
    # k = 0 moves nothing; RandJigsaw's uniform perms move tiles much further
    assert torch.equal(local_tile_perms(2, 4, 0, gen(29)), torch.arange(16).expand(2, 16))
    far = random_tile_perms(500, 7, gen(30))
    assert ((far % 7 - torch.arange(49) % 7).abs().max(1).values > 3).float().mean() > 0.9


def test_local_tile_perms_matches_two_pass_sort_reference():
    B, n, k = 4, 7, 2
    p = local_tile_perms(B, n, k, gen(31))
    g = gen(31)
    u, v = ((-k + 2 * k * torch.rand(B * n * n, generator=g)).view(B, n, n) for _ in range(2))
    for b in range(B):
        grid = [[r * n + c for c in range(n)] for r in range(n)]
        grid = [[grid[r][i] for i in sorted(range(n), key=lambda i: (i + float(u[b, r, i]), i))] for r in range(n)]
        cols = [[grid[j][c] for j in sorted(range(n), key=lambda j: (j + float(v[b, c, j]), j))] for c in range(n)]
        assert p[b].tolist() == [cols[c][r] for r in range(n) for c in range(n)]


FG = [RandGamma(), CoarseDropout(), CroppedRegion(), RandPatchSwap(), RandJigsaw(4), LocalJigsaw(7, 2)]


@pytest.mark.parametrize('tfm', FG, ids=lambda t: type(t).__name__)
def test_variants_per_sample_params_and_seeded(tfm):
    x = torch.rand(1, 3, 56, 56).expand(12, 3, 56, 56).contiguous()
    y = tfm(x, gen(32))
    d = (y[:, None] - y[None]).abs().flatten(2).amax(-1) + torch.eye(12) * 9
    assert d.min() > 0  # identical images, all different outputs
    assert torch.equal(tfm(x, gen(32)), y) and not torch.equal(tfm(x, gen(33)), y)
    torch.manual_seed(34); a = tfm(x)
    torch.manual_seed(34); assert torch.equal(tfm(x), a)
    # p: unselected samples pass through bit for bit
    t = type(tfm)(**{**({'n': tfm.n} if hasattr(tfm, 'n') else {}), 'p': 0.5})
    prm = t.draw(x, gen(35))
    z = t(x, params=prm)
    assert prm['on'].any() and not prm['on'].all()
    assert torch.equal(z[~prm['on']], x[~prm['on']]) and (z[prm['on']] != x[prm['on']]).flatten(1).any(1).all()


@pytest.mark.parametrize('name,cls', [('gamma', RandGamma), ('dropout', CoarseDropout), ('regions', CroppedRegion),
                                      ('patchswap', RandPatchSwap), ('dcl', LocalJigsaw), ('jigsaw', RandJigsaw)])
def test_variant_recipes_second_view_is_simclr_then_variant_then_normalise(name, cls):
    x = torch.rand(6, 3, 48, 48)
    ps = get_views(name, 32)
    assert len(ps) == 2 and ps[0].name == 'simclr' and ps[1].name == f'simclr+{name}'
    a, b = ps
    assert [type(t) for t in b.tfms] == [type(t) for t in a.tfms] + [cls] and b.norm
    torch.manual_seed(0); v = b(x)
    torch.manual_seed(0); raw = ViewPipeline(list(b.tfms)[:-1], norm=False)(x)
    torch.testing.assert_close(v, normalize(b.tfms[-1](raw)), atol=1e-6, rtol=0)
    assert len(make_views(x, ps)) == 2


def test_variant_recipe_kwargs_reach_variant_and_simclr():
    assert get_views('gamma', 32, gamma=(1.0, 1.2))[1].tfms[-1].gamma == (1.0, 1.2)
    d = get_views('dcl', 32, grid=3, radius=1)[1].tfms[-1]
    assert (d.n, d.radius) == (3, 1)
    assert get_views('jigsaw', 32, grid=2)[1].tfms[-1].n == 2
    assert get_views('dropout', 32, n_holes=[1, 2])[1].tfms[-1].n_holes == (1, 2)
    assert get_views('regions', 32, centre=False)[1].tfms[-1].centre is False
    assert get_views('patchswap', 32, scale=(0.5, 1.0))[1].tfms[0].scale == (0.5, 1.0)
    assert get_views('gamma', 32, jitter_p=0.8)[0].tfms[2].p == 0.8
    a, b = variant_views(RandGamma(), 16, 'g')
    assert b.name == 'simclr+g' and a is not b and a.tfms[0] is not b.tfms[0]


def test_variant_bad_arguments():
    with pytest.raises(ValueError, match='larger than the image'): RandJigsaw(8)(torch.rand(2, 3, 6, 6))
    with pytest.raises(ValueError, match='grid size n must be a positive int'): LocalJigsaw(0)
    with pytest.raises(ValueError, match='neighbourhood radius must be >= 0'): LocalJigsaw(7, -1)
    with pytest.raises(ValueError, match='frac must satisfy'): CroppedRegion((0.0, 0.5))
    with pytest.raises(ValueError, match='hole_frac must be a'): CoarseDropout(hole_frac=0.1)
