"Bad input: each case is converted (and the result checked) or stops with an error naming the file and the problem."
import shutil
from pathlib import Path
import numpy as np
import pytest
from PIL import Image
from fgssl_nb.data import (read_dataset, read_cub, read_imagefolder, load_image, labeled_dls, ssl_dls, ImageError, verify_images,
                           AnnotationError)


@pytest.fixture
def cub(birds, tmp_path):
    "A writable copy of the small toy-bird set."
    return Path(shutil.copytree(birds, tmp_path / 'cub'))


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope does not exist'): read_dataset(tmp_path / 'nope')


def test_layout_matches_nothing(tmp_path):
    (tmp_path / 'notes.txt').write_text('hello')
    with pytest.raises(ValueError, match='no known data set layout.*images.txt'): read_dataset(tmp_path)
    with pytest.raises(ValueError, match="unknown layout 'coco'"): read_dataset(tmp_path, layout='coco')


def test_missing_split_file(cub):
    (cub / 'train_test_split.txt').unlink()
    with pytest.raises(FileNotFoundError, match=r'train_test_split.txt is missing: expected "<image id> <1 if train'): read_dataset(cub)


def test_id_without_label(cub):
    f = cub / 'image_class_labels.txt'
    f.write_text('\n'.join(f.read_text().splitlines()[1:]) + '\n')  # drop id 1
    with pytest.raises(ValueError, match=r'image_class_labels.txt: no entry for image id\(s\) 1 '): read_dataset(cub)


def test_label_out_of_range(cub):
    f = cub / 'image_class_labels.txt'
    f.write_text(f.read_text().replace('1 1\n', '1 99\n', 1))
    with pytest.raises(ValueError, match='image id 1 has label 99, outside 1..8'): read_dataset(cub)


def test_malformed_line(cub):
    (cub / 'train_test_split.txt').write_text('1\n')
    with pytest.raises(ValueError, match=r'train_test_split.txt:1: expected 2 fields'): read_dataset(cub)


def test_empty_class(cub):
    with open(cub / 'classes.txt', 'a') as f: f.write('9 009.Ghost_Bird\n')
    with pytest.raises(ValueError, match='class\\(es\\) with no images: 009.Ghost_Bird'): read_dataset(cub)


def test_empty_class_folder(tmp_path, birds):
    for c in ('a', 'b'):
        (tmp_path / c).mkdir()
    for k, p in enumerate(sorted((birds / 'images').rglob('*.jpg'))[:4]): shutil.copy(p, tmp_path / 'a' / p.name)
    with pytest.raises(ValueError, match='class\\(es\\) with no images: b'): read_imagefolder(tmp_path)


def test_listed_file_missing(cub):
    victim = sorted((cub / 'images').rglob('*.jpg'))[3]; victim.unlink()
    with pytest.raises(FileNotFoundError, match=f'1 image file.*{victim.name}'): read_dataset(cub)


def _first(cub): return sorted((cub / 'images').rglob('*.jpg'))[0]


def test_corrupt_image_named_at_dls_build(cub):
    bad = _first(cub); bad.write_bytes(b'this is not a jpeg at all' * 10)
    ds = read_dataset(cub)
    with pytest.raises(ImageError, match=f'{bad.name}.*not a readable image'): labeled_dls(ds, 32, 4, num_workers=0)


def test_truncated_image_named_when_loaded(cub):
    bad = sorted((cub / 'images').rglob('*.jpg'))[-1]  # a test-split image: fastai decodes the first train item at build time
    data = bad.read_bytes(); bad.write_bytes(data[: len(data) * 4 // 5])
    dls = labeled_dls(read_dataset(cub), 32, 4, num_workers=0)  # the header is intact: found when decoded
    idx = [i for i, r in enumerate(dls.valid.items) if r.path == bad][0]
    with pytest.raises(ImageError, match=f'{bad.name}: truncated or corrupt image data'): dls.valid_ds[idx]
    with pytest.raises(ImageError, match=bad.name): verify_images([bad], deep=True)


def test_tiny_image(cub):
    bad = _first(cub); Image.new('RGB', (1, 1), 'red').save(bad, format='JPEG')
    with pytest.raises(ImageError, match=f'{bad.name}: image is 1x1 px'): load_image(bad, 32)
    with pytest.raises(ImageError, match=f'{bad.name}.*1x1 px'): ssl_dls(read_dataset(cub), 32, 4, num_workers=0)


GREY = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (48, 1))  # 48 x 64 horizontal ramp


@pytest.mark.parametrize('name,make', [
    ('grey.png', lambda: Image.fromarray(GREY)),
    ('palette.png', lambda: Image.fromarray(np.dstack([GREY] * 3)).convert('P', palette=Image.ADAPTIVE, colors=256)),
    ('sixteen.png', lambda: Image.fromarray(GREY.astype(np.uint16) * 257)),
    ('rgba.png', lambda: Image.fromarray(np.dstack([GREY] * 3 + [np.full_like(GREY, 255)]))),
    ('cmyk.jpg', lambda: Image.fromarray(np.dstack([GREY] * 3)).convert('CMYK')),
    ('cmyk.tif', lambda: Image.fromarray(np.dstack([GREY] * 3)).convert('CMYK')),
])
def test_modes_converted_to_rgb(tmp_path, name, make):
    make().save(tmp_path / name, **({'quality': 100} if name.endswith('jpg') else {}))
    im = load_image(tmp_path / name)
    assert im.mode == 'RGB' and im.size == (64, 48)
    a = np.asarray(im, float)
    tol = 4 if name.endswith('jpg') or 'palette' in name else 1
    assert np.abs(a - GREY[..., None]).mean() <= tol, f'{name}: pixel values changed by the conversion'


def test_alpha_composited_on_white(tmp_path):
    a = np.zeros((16, 16, 4), np.uint8); a[..., 0] = 255; a[:, 8:, 3] = 255  # left half transparent, right half opaque red
    Image.fromarray(a).save(tmp_path / 'half.png')
    im = np.asarray(load_image(tmp_path / 'half.png'))
    assert (im[:, :8] == 255).all() and (im[:, 8:] == [255, 0, 0]).all()


def test_exif_rotation_applied(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8); a[:, :20] = 255  # wide image, left half white
    im = Image.fromarray(a); exif = im.getexif(); exif[0x0112] = 6  # "rotate 90 CW to view"
    im.save(tmp_path / 'rot.jpg', exif=exif, quality=100)
    out = load_image(tmp_path / 'rot.jpg')
    assert out.size == (20, 40)  # shown upright: tall


def test_draft_decode_matches_full_decode(tiny):
    p = sorted((tiny / 'images').rglob('*.jpg'))[0]
    fast = np.asarray(load_image(p, 32), float)
    full = Image.open(p).convert('RGB'); s = 32 / min(full.size)
    full = full.resize((max(32, round(full.width * s)), max(32, round(full.height * s))), Image.BILINEAR, reducing_gap=2.0)
    l, t = (full.width - 32) // 2, (full.height - 32) // 2
    ref = np.asarray(full.crop((l, t, l + 32, t + 32)), float)
    assert np.abs(fast - ref).mean() < 6


# --- the annotation files: every problem as `file:line: what is wrong; how to fix`, all of them in one error

def _edit(f: Path, old: str, new: str):
    text = f.read_text(); assert old in text, (f, old); f.write_text(text.replace(old, new, 1))


def test_duplicate_id_named_with_its_line(cub):
    first = (cub / 'images.txt').read_text().splitlines()[0]
    with open(cub / 'images.txt', 'a') as f: f.write(first + '\n')  # line 33 of 32 + 1
    with pytest.raises(AnnotationError, match=r'images.txt:33: image id 1 is already on line 1; delete one of the two lines'):
        read_dataset(cub)


def test_malformed_label_named_with_its_line(cub):
    _edit(cub / 'image_class_labels.txt', '\n3 1\n', '\n3 abc\n')
    with pytest.raises(ValueError, match=r"image_class_labels.txt:3: image id 3 has label 'abc', not a whole number; "
                                         r"write its class id, 1..8 of classes.txt"): read_dataset(cub)


def test_split_must_be_one_or_zero(cub):
    _edit(cub / 'train_test_split.txt', '\n2 1\n', '\n2 yes\n')  # was silently read as "test" before
    with pytest.raises(AnnotationError, match=r"train_test_split.txt:2: image id 2 has split 'yes'; write 1 \(train\) or 0 \(test\)"):
        read_dataset(cub)


def test_same_image_under_two_ids(cub):
    lines = (cub / 'images.txt').read_text().splitlines()
    (cub / 'images.txt').write_text('\n'.join(lines[:1] + [f"2 {lines[0].split()[1]}"] + lines[2:]) + '\n')
    with pytest.raises(AnnotationError, match=r'images.txt:2: .* is already image id 1 \(line 1\); an image listed twice can land in train and test'):
        read_dataset(cub)


def test_id_only_in_a_side_file(cub):
    with open(cub / 'image_class_labels.txt', 'a') as f: f.write('99 1\n')
    with pytest.raises(AnnotationError, match=r'image_class_labels.txt: image id\(s\) 99 \(line 33\) are not in images.txt; delete those lines'):
        read_dataset(cub)


def test_class_ids_must_run_from_one(cub):
    _edit(cub / 'classes.txt', '8 ', '9 ')
    with pytest.raises(AnnotationError, match=r"classes.txt:8: class id '9' is not one of 1..8; number the 8 classes 1..8"): read_dataset(cub)


def test_bad_box_named(cub):
    _edit(cub / 'bounding_boxes.txt', '\n2 ', '\n2 x ')
    with pytest.raises(AnnotationError, match=r'bounding_boxes.txt:2: expected 5 fields'): read_dataset(cub, crop_to_box=True)
    assert len(read_dataset(cub)) > 0  # boxes that are not used do not stop a run
    _edit(cub / 'bounding_boxes.txt', '\n2 x ', '\n2 ')
    rows = (cub / 'bounding_boxes.txt').read_text().splitlines()
    rows[2] = '3 1 1 0 5'
    (cub / 'bounding_boxes.txt').write_text('\n'.join(rows) + '\n')
    with pytest.raises(AnnotationError, match=r'bounding_boxes.txt:3: image id 3 has a box of width 0 and height 5; both must be above 0'):
        read_dataset(cub, crop_to_box=True)


def test_all_problems_in_one_error(cub):
    _edit(cub / 'image_class_labels.txt', '\n3 1\n', '\n3 abc\n')
    _edit(cub / 'train_test_split.txt', '\n2 1\n', '\n')
    with open(cub / 'images.txt', 'a') as f: f.write('1 elsewhere.jpg\n')
    with pytest.raises(AnnotationError) as e: read_dataset(cub)
    assert len(e.value.problems) == 3 and str(e.value).startswith('3 problems in the annotation files:\n')
    assert [p.split(': ')[0].rsplit('/', 1)[-1] for p in e.value.problems] == ['images.txt:33', 'image_class_labels.txt:3', 'train_test_split.txt']
