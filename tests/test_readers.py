"Every reader on real image files, in the exact file formats of the official data sets."
import shutil, tarfile
from pathlib import Path
import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat
from fgssl_nb.data import (read_dataset, read_cub, read_aircraft, read_cars, read_flowers102, read_imagefolder,
                           detect_layout, load_image, labeled_dls, ssl_dls, download_dataset, FLOWERS102_NAMES)
from conftest import tiny_rows


def test_cub_counts_from_files(tiny):
    ds = read_dataset(tiny)
    rows, classes = tiny_rows(tiny)
    assert ds.layout == 'cub' and ds.classes == classes
    assert [p.relative_to(tiny / 'images').as_posix() for p in ds.items] == [r[0] for r in rows]
    assert ds.labels.tolist() == [r[1] for r in rows] and ds.is_train.tolist() == [r[2] for r in rows]
    assert (ds.is_train.sum(), (~ds.is_train).sum(), len(ds.unlabeled)) == (30, 20, 20)


def test_cub_full_flowers17():
    from conftest import SHARED
    if not (SHARED / 'flowers17').exists(): pytest.skip('needs ../shared/data/flowers17')
    ds = read_dataset(SHARED / 'flowers17')
    assert (len(ds), ds.c, ds.is_train.sum()) == (1360, 17, 680)
    assert np.bincount(ds.labels[~ds.is_train]).tolist() == [40] * 17


def test_cub_crop_to_box(birds):
    ds = read_cub(birds, crop_to_box=True)
    x, y, w, h = map(float, (birds / 'bounding_boxes.txt').read_text().split('\n')[0].split()[1:])
    np.testing.assert_allclose(ds.boxes[0], [x, y, x + w, y + h])
    got = np.asarray(load_image(ds.items[0], box=ds.boxes[0]))
    ref = np.asarray(Image.open(ds.items[0]).convert('RGB').crop((round(x), round(y), round(x + w), round(y + h))))
    assert got.shape == ref.shape and np.array_equal(got, ref)


def _aircraft(tiny, dest):
    rows, classes = tiny_rows(tiny)
    names = [f'Model {c.split(".")[1]} 7{i}7' for i, c in enumerate(classes)]  # names with spaces, like "Boeing 707"
    (dest / 'data' / 'images').mkdir(parents=True)
    tv, te = [], []
    for k, (rel, lab, tr) in enumerate(rows):
        im = np.asarray(Image.open(tiny / 'images' / rel).convert('RGB'))
        banner = np.zeros((20, im.shape[1], 3), np.uint8); banner[..., 0] = 255  # pure red, like the copyright strip
        Image.fromarray(np.concatenate([im, banner])).save(dest / 'data' / 'images' / f'{1000000 + k}.jpg', quality=95)
        (tv if tr else te).append(f'{1000000 + k} {names[lab]}')
    for lvl in ('variant', 'family', 'manufacturer'):
        (dest / 'data' / f'images_{lvl}_trainval.txt').write_text('\n'.join(tv) + '\n')
        (dest / 'data' / f'images_{lvl}_test.txt').write_text('\n'.join(te) + '\n')
    (dest / 'data' / 'variants.txt').write_text('\n'.join(names) + '\n')
    return rows, names


def test_aircraft(tiny, tmp_path):
    rows, names = _aircraft(tiny, tmp_path / 'fgvc-aircraft-2013b')
    ds = read_dataset(tmp_path / 'fgvc-aircraft-2013b')
    assert ds.layout == 'aircraft' and ds.classes == names and ds.trim_bottom == 20
    assert (ds.is_train.sum(), (~ds.is_train).sum()) == (30, 20)
    assert sorted(ds.labels.tolist()) == sorted(r[1] for r in rows)
    im = np.asarray(load_image(ds.items[0], trim_bottom=ds.trim_bottom), int)
    orig = Image.open(ds.items[0])
    assert im.shape[0] == orig.height - 20
    red = (im[..., 0] > 200) & (im[..., 1] < 60) & (im[..., 2] < 60)
    assert red[-3:].mean() < 0.5, "the banner must be cut off"
    fam = read_aircraft(tmp_path / 'fgvc-aircraft-2013b', level='family')  # no families.txt: names from the lists
    assert fam.c == 5
    with pytest.raises(FileNotFoundError, match='images_variant_train.txt'):
        read_aircraft(tmp_path / 'fgvc-aircraft-2013b', train_split='train')


def _struct(rows, fields):
    dt = [(f, 'O') for f in fields]
    return np.array([tuple(r[f] for f in fields) for r in rows], dtype=dt)


def test_cars_devkit_and_all_in_one(tiny, tmp_path):
    rows, classes = tiny_rows(tiny)
    root = tmp_path / 'stanford-cars'
    for d in ('cars_train', 'cars_test', 'devkit', 'car_ims'): (root / d).mkdir(parents=True)
    tr, te, allrows = [], [], []
    for k, (rel, lab, is_tr) in enumerate(rows):
        fname = f'{k + 1:05d}.jpg'
        shutil.copy(tiny / 'images' / rel, root / ('cars_train' if is_tr else 'cars_test') / fname)
        shutil.copy(tiny / 'images' / rel, root / 'car_ims' / f'{k + 1:06d}.jpg')
        w, h = Image.open(tiny / 'images' / rel).size
        r = dict(bbox_x1=3, bbox_y1=4, bbox_x2=w - 5, bbox_y2=h - 6, fname=fname, **{'class': lab + 1})
        (tr if is_tr else te).append(r)
        allrows.append(dict(r, relative_im_path=f'car_ims/{k + 1:06d}.jpg', test=int(not is_tr)))
    names = np.array([f'{c[4:]} Sedan 2012' for c in classes], dtype=object)
    f6 = ['bbox_x1', 'bbox_y1', 'bbox_x2', 'bbox_y2', 'class', 'fname']
    savemat(root / 'devkit' / 'cars_meta.mat', {'class_names': names[None]})
    savemat(root / 'devkit' / 'cars_train_annos.mat', {'annotations': _struct(tr, f6)[None]})
    savemat(root / 'cars_test_annos_withlabels.mat', {'annotations': _struct(te, f6)[None]})
    assert read_dataset(root).boxes is None  # full images unless asked (the CUB reader's default too)
    ds = read_dataset(root, crop_to_box=True)
    assert ds.layout == 'cars' and ds.classes == list(names)
    assert (ds.is_train.sum(), (~ds.is_train).sum()) == (30, 20)
    assert ds.labels.tolist() == [r['class'] - 1 for r in tr + te]
    np.testing.assert_allclose(ds.boxes[0][:2], [3, 4])
    assert load_image(ds.items[0], 32, box=ds.boxes[0]).size == (32, 32)
    # the all-in-one annotation file
    one = tmp_path / 'cars-one'; one.mkdir(); shutil.copytree(root / 'car_ims', one / 'car_ims')
    f7 = ['bbox_x1', 'bbox_y1', 'bbox_x2', 'bbox_y2', 'class', 'relative_im_path', 'test']
    savemat(one / 'cars_annos.mat', {'annotations': _struct(allrows, f7)[None], 'class_names': names[None]})
    ds1 = read_dataset(one)
    assert ds1.layout == 'cars' and ds1.is_train.tolist() == [r[2] for r in rows]
    assert ds1.labels.tolist() == [r[1] for r in rows]
    # a devkit without the labelled test file says which file it needs
    (root / 'cars_test_annos_withlabels.mat').unlink()
    with pytest.raises(FileNotFoundError, match='cars_test_annos_withlabels.mat'):
        read_cars(root)


def test_flowers102_official_and_fastai(tiny, tmp_path):
    rows, classes = tiny_rows(tiny)
    root = tmp_path / 'flowers102'; (root / 'jpg').mkdir(parents=True)
    for k, (rel, _, _) in enumerate(rows): shutil.copy(tiny / 'images' / rel, root / 'jpg' / f'image_{k + 1:05d}.jpg')
    labels = np.array([r[1] + 1 for r in rows])
    savemat(root / 'imagelabels.mat', {'labels': labels[None]})
    trn = [k + 1 for k, r in enumerate(rows) if r[2]]
    savemat(root / 'setid.mat', {'trnid': np.array(trn[::2])[None], 'valid': np.array(trn[1::2])[None],
                                 'tstid': np.array([k + 1 for k, r in enumerate(rows) if not r[2]])[None]})
    ds = read_dataset(root)
    assert ds.layout == 'flowers102' and ds.c == 5 and ds.classes[0] == 'class_001'
    assert (ds.is_train.sum(), (~ds.is_train).sum()) == (30, 20)
    for p, l in zip(ds.items, ds.labels): assert l == labels[int(p.stem.split('_')[1]) - 1] - 1
    # fastai's copy: txt lists with 0-based labels
    fa = tmp_path / 'oxford-102-flowers'; shutil.copytree(root / 'jpg', fa / 'jpg')
    for f, sel in (('train.txt', trn[::2]), ('valid.txt', trn[1::2]), ('test.txt', [k + 1 for k, r in enumerate(rows) if not r[2]])):
        (fa / f).write_text(''.join(f'jpg/image_{i:05d}.jpg {labels[i - 1] - 1}\n' for i in sel))
    ds2 = read_dataset(fa)
    assert sorted(map(str, ds2.items)) == sorted(str(p).replace(str(root), str(fa)) for p in ds.items)
    assert len(FLOWERS102_NAMES) == 102 and FLOWERS102_NAMES[0] == 'pink primrose'


def test_imagefolder_split_and_single(tiny, tmp_path):
    rows, classes = tiny_rows(tiny)
    tt, one = tmp_path / 'tt', tmp_path / 'one'
    for rel, lab, tr in rows:
        for dst in (tt / ('train' if tr else 'test') / classes[lab], one / classes[lab]):
            dst.mkdir(parents=True, exist_ok=True); shutil.copy(tiny / 'images' / rel, dst)
    shutil.copytree(tiny / 'unlabeled', one / 'unlabeled')
    ds = read_dataset(tt)
    assert ds.layout == 'imagefolder' and ds.classes == sorted(classes)
    assert (ds.is_train.sum(), (~ds.is_train).sum()) == (30, 20)
    a, b, c = read_dataset(one), read_imagefolder(one, seed=0), read_imagefolder(one, seed=1)
    assert a.c == 5 and len(a) == 50 and len(a.unlabeled) == 20 and 'unlabeled' not in a.classes
    assert np.bincount(a.labels[~a.is_train]).tolist() == [5] * 5      # stratified 50 % split
    assert a.is_train.tolist() == b.is_train.tolist() != c.is_train.tolist()  # seeded


def test_detect_nested_and_download_tar_gz(tiny, tmp_path):
    _aircraft(tiny, tmp_path / 'src' / 'fgvc-aircraft-2013b')
    arch = tmp_path / 'fgvc-aircraft-2013b.tar.gz'
    with tarfile.open(arch, 'w:gz') as t: t.add(tmp_path / 'src' / 'fgvc-aircraft-2013b', arcname='fgvc-aircraft-2013b')
    got = download_dataset('aircraft', base=tmp_path / 'fastai', url=arch.as_uri())
    assert detect_layout(got)[0] == 'aircraft' and len(read_dataset(got)) == 50
    # a CUB set one folder deeper than the path given is still found
    (tmp_path / 'outer').mkdir(); shutil.copytree(tiny, tmp_path / 'outer' / 'CUB_200_2011')
    assert detect_layout(tmp_path / 'outer') == ('cub', tmp_path / 'outer' / 'CUB_200_2011')


def test_dls_labels_and_pools(birds):
    ds = read_dataset(birds)
    dls = labeled_dls(ds, size=32, bs=4, num_workers=0)
    xs, ys = zip(*[dls.valid_ds[i] for i in range(len(dls.valid_ds))])
    assert [int(y) for y in ys] == ds.labels[ds.test_idxs].tolist()
    carved = labeled_dls(ds, size=32, bs=4, valid=0.25, num_workers=0)
    assert len(carved.valid_ds) == 4 and len(carved.train_ds) == 12 and not ({r.path for r in carved.valid.items} & {ds.items[i] for i in ds.test_idxs})
    s = ssl_dls(ds, size=32, bs=4, valid_pct=0.0, num_workers=0)
    assert len(s.train_ds) == 16 + 6
