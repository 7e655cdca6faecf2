"The comparison runner: a failing entry does not lose the others, a re-run trains nothing, the CLI prints the table."
import json, shutil, subprocess, sys
import pytest
from pathlib import Path
import pandas as pd
from fgssl_nb.compare import run_grid, run_entry, summarize, results_markdown

BIN = Path(sys.executable).parent
SMALL = dict(proj_hidden=32, proj_dim=16)


def test_failing_entry_is_recorded_and_the_grid_goes_on(birds, tmp_path):
    grid = [dict(name='bad', method='simclr', kw=dict(no_such_option=1)),
            dict(name='simclr', method='simclr', kw=SMALL)]
    df = run_grid(grid, birds, seeds=(0,), out=tmp_path, epochs=1, size=32, bs=8)
    assert list(df.name) == ['simclr']
    assert 'no option no_such_option' in json.loads((tmp_path / 'errors.json').read_text())['bad seed 0']
    saved = pd.read_csv(tmp_path / 'results.csv')
    assert list(saved.name) == ['simclr'] and 0 <= saved.linear_top1[0] <= 1 and saved.seconds[0] > 0
    # the run's record kept without its weights (as git keeps the published grids): reused, not trained again
    run = tmp_path / 'simclr' / 'seed0'
    for f in ('encoder.pth', 'checkpoint.pth'): (run / f).unlink()
    (run / 'metrics.json').write_text(json.dumps({**json.loads((run / 'metrics.json').read_text()), 'linear_top1': 0.123}))
    again = run_grid(grid[1:], birds, seeds=(0,), out=tmp_path, epochs=1, size=32, bs=8)
    assert again.linear_top1[0] == 0.123 and not (run / 'checkpoint.pth').exists() and not (run / 'encoder.pth').exists()
    assert again.seconds.isna().all()  # nothing computed now; results.csv keeps the seconds the run was made in
    assert pd.read_csv(tmp_path / 'results.csv')[['linear_top1', 'seconds']].values.tolist() == [[0.123, saved.seconds[0]]]
    # a record of a training on other images (its config.json's data_check: one training image fewer) is refused, kept as it was
    from fgssl_nb.compare import SettingMismatch
    cfg_file = run / 'config.json'; cfg = json.loads(cfg_file.read_text())
    n = cfg['data_check']['n_train']
    cfg_file.write_text(json.dumps({**cfg, 'data_check': {**cfg['data_check'], 'n_train': n - 1}}))
    with pytest.raises(SettingMismatch, match=f"a training on other data \\(n_train: {n - 1} then, {n} now\\)"):
        run_grid(grid[1:], birds, seeds=(0,), out=tmp_path, epochs=1, size=32, bs=8)
    with pytest.raises(SettingMismatch, match='a training on other data'):  # one entry run on its own: the same refusal
        run_entry(grid[1], birds, seed=0, out=tmp_path, epochs=1, size=32, bs=8)
    assert json.loads((run / 'metrics.json').read_text())['linear_top1'] == 0.123 and not (run / 'encoder.pth').exists()
    cfg_file.write_text(json.dumps(cfg))
    # an incomplete record is no record: trained again, and its old numbers are not reported beside the new weights
    (run / 'metrics.json').write_text(json.dumps(dict(linear_top1=0.123)))
    third = run_grid(grid[1:], birds, seeds=(0,), out=tmp_path, epochs=1, size=32, bs=8)
    assert (run / 'encoder.pth').exists() and third.linear_top1[0] != 0.123 and 'retrieval_map' in third
    # an encoder trained on other data is refused too, its metrics complete or not (they would be of two data sets)
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, 'data_check': {**cfg['data_check'], 'n_train': n - 1}}))
    (run / 'metrics.json').write_text(json.dumps(dict(linear_top1=0.5)))
    with pytest.raises(SettingMismatch, match='a training on other data'):
        run_grid(grid[1:], birds, seeds=(0,), out=tmp_path, epochs=1, size=32, bs=8)
    with pytest.raises(SettingMismatch, match='a training on other data'):
        run_entry(grid[1], birds, seed=0, out=tmp_path, epochs=1, size=32, bs=8)
    assert (run / 'encoder.pth').exists() and json.loads((run / 'metrics.json').read_text()) == dict(linear_top1=0.5)
    cfg_file.write_text(json.dumps(cfg))
    # a training that resumes (checkpoint.pth, no encoder.pth) drops the old numbers, complete or not: they are of other weights
    (run / 'encoder.pth').unlink()
    (run / 'metrics.json').write_text(json.dumps({**json.loads((run / 'metrics.json').read_text()), 'linear_top1': 0.123}))
    fourth = run_grid(grid[1:], birds, seeds=(0,), out=tmp_path, epochs=1, size=32, bs=8)
    assert (run / 'encoder.pth').exists() and fourth.linear_top1[0] != 0.123 and fourth.seconds[0] > 0
    assert json.loads((run / 'metrics.json').read_text())['linear_top1'] == fourth.linear_top1[0]


def test_cli_compare_end_to_end(birds, tmp_path):
    r = subprocess.run([str(BIN / 'fgssl_compare'), '--grid', 'system1', '--data', str(birds), '--only', 'random init', 'simclr',
                        '--seeds', '0', '1', '--size', '32', '--bs', '8', '--epochs', '1', '--out', str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-800:]
    df = pd.read_csv(tmp_path / 'results.csv')
    assert sorted(zip(df.name, df.seed)) == [('random init', 0), ('random init', 1), ('simclr', 0), ('simclr', 1)]
    assert (tmp_path / 'results.png').exists()
    s = summarize(df)
    assert s.loc['random init', 'seeds'] == 2
    assert results_markdown(s).splitlines()[2].startswith('| random init | 2 |')
    assert '| random init | 2 |' in r.stdout
    # the paper's ranking: only the claim whose two entries ran, its gaps computed from the rows written
    lin = df.set_index(['name', 'seed']).linear_top1
    gap = 100 * (lin['simclr'] - lin['random init'])
    row = next((l for l in r.stdout.splitlines() if l.startswith('| simclr > random init |')), None)
    assert row, r.stdout[-2000:]
    cells = [c.strip() for c in row.strip('|').split('|')]
    assert cells[1] == '2' and cells[2] == f"{round(gap.mean(), 1) + 0:+.1f} ({int((gap > 0).sum())}/2)", row
    assert r.stdout.count(' > ') == 1  # no claim about entries that did not run
    assert row in (tmp_path / 'results.md').read_text()  # kept beside the table
    bad = subprocess.run([str(BIN / 'fgssl_compare'), '--grid', 'nope'], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().endswith("choose from system1, system2, alpha, lcr, curves, system1-paper")


def test_write_error_stops_the_grid(birds, tmp_path, monkeypatch):
    "A full disk is not one failed entry among others: the grid stops at once with that error, nothing recorded as failed."
    import pytest
    from fgssl_nb import compare
    from fgssl_nb.runs import WriteError
    calls = []
    def full(e, *a, **k):
        calls.append(e['name']); raise WriteError(f"could not write {tmp_path}/x/checkpoint.pth: No space left on device")
    monkeypatch.setattr(compare, 'run_entry', full)
    grid = [dict(name='a', encoder='random'), dict(name='b', encoder='random')]
    with pytest.raises(WriteError): run_grid(grid, birds, seeds=(0,), out=tmp_path, epochs=1, size=32, bs=8)
    assert calls == ['a'] and not (tmp_path / 'errors.json').exists()


def test_bad_data_stop_the_grid_before_the_first_entry(birds, tmp_path):
    from fgssl_nb.check import PreflightError
    d = shutil.copytree(birds, tmp_path / 'd')
    img = sorted((d / 'images').rglob('*.jpg'))[0]; img.write_bytes(b'\x00' * 100)
    with pytest.raises(PreflightError, match='1 unreadable image'):
        run_grid([dict(name='random init', encoder='random')], d, seeds=(0,), out=tmp_path / 'o', size=32)
    assert list((tmp_path / 'o').iterdir()) == []
    df = run_grid([dict(name='random init', encoder='random')], d, seeds=(0,), out=tmp_path / 'o', size=32, skip_bad=True)
    assert len(df) == 1 and (tmp_path / 'o' / 'random_init' / 'seed0' / 'skipped.txt').exists()
    assert json.loads((tmp_path / 'o' / 'random_init' / 'seed0' / 'metrics.json').read_text())['skipped_images'] == 1


def test_only_with_no_match_lists_the_entries(tmp_path):
    "`--only synth-moco` (the entry is 'synth-moco (variance)') is an error naming the real entries, before anything runs."
    import pytest
    from fgssl_nb.compare import run_grid
    with pytest.raises(ValueError, match=r"--only 'synth-moco' matches no entry of this grid; its entries: 'random init', 'moco', 'synth-moco \(variance\)'"):
        run_grid('system2', only=['synth-moco'], out=tmp_path / 'g')
    assert not (tmp_path / 'g').exists()
    r = subprocess.run([str(BIN / 'fgssl_compare'), '--grid', 'system2', '--only', 'synth-moco', 'moco', '--out', str(tmp_path / 'g')],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and "'synth-moco (gradcam)'" in r.stderr


def test_baseline_record_is_reused_only_for_its_data_and_weights(birds, tmp_path):
    "A complete baseline record is reused (nothing evaluated, the file untouched); another data set in the same --out is refused."
    from fgssl_nb.compare import SettingMismatch
    grid = [dict(name='random init', encoder='random')]
    first = run_grid(grid, birds, seeds=(0,), out=tmp_path / 'o', size=32)
    rec = tmp_path / 'o' / 'random_init' / 'seed0' / 'metrics.json'
    m = json.loads(rec.read_text()); assert m['weights'] is None and first.seconds[0] > 0
    rec.write_text(json.dumps({**m, 'knn_top1': 0.777}))            # a mark: reused numbers come from this file
    # the same data set reached by another path (as from nbs/ or another working folder): reused
    other_path = tmp_path / 'link'; other_path.mkdir(); (other_path / birds.name).symlink_to(birds)
    again = run_grid(grid, other_path / birds.name, seeds=(0,), out=tmp_path / 'o', size=32)
    assert again.knn_top1[0] == 0.777 and again.seconds.isna().all() and json.loads(rec.read_text())['knn_top1'] == 0.777
    # a record of other weights (here V1 ImageNet weights, where none are asked for) is evaluated again
    rec.write_text(json.dumps({**m, 'knn_top1': 0.777, 'weights': 'V1'}))
    third = run_grid(grid, birds, seeds=(0,), out=tmp_path / 'o', size=32)
    assert third.knn_top1[0] == pytest.approx(m['knn_top1'], abs=1e-9) and json.loads(rec.read_text())['weights'] is None
    # another data set into the same folder: refused before anything is computed, the record kept
    d = shutil.copytree(birds, tmp_path / 'other_birds')
    with pytest.raises(SettingMismatch, match=f"data={birds.name!r}; this run asks for data='other_birds'"):
        run_grid(grid, d, seeds=(0,), out=tmp_path / 'o', size=32)
    assert json.loads(rec.read_text())['knn_top1'] == m['knn_top1']


def test_an_imagenet_record_must_name_its_weights(birds):
    "An ImageNet baseline's record from before the weights were kept is not reused; one with other split sizes neither."
    from fgssl_nb.compare import _reusable_baseline
    from fgssl_nb.check import check_for_run
    _, info = check_for_run(birds, None, verbose=False)
    rec = dict(linear_top1=0.5, **info)
    assert not _reusable_baseline(rec, 'imagenet', None, birds, False)              # no 'weights' key: evaluated again
    assert _reusable_baseline({**rec, 'weights': None}, 'imagenet', None, birds, False)
    assert not _reusable_baseline({**rec, 'weights': 'V1'}, 'imagenet', 'V2', birds, False)
    assert _reusable_baseline(rec, 'random', None, birds, False)                    # a random encoder has no weights to name
    assert not _reusable_baseline({**rec, 'n_test': info['n_test'] - 1}, 'random', None, birds, False)  # other images
