"The k-NN monitor every N epochs (and its feat_std), and the curves a grid draws from it."
import subprocess, sys
from pathlib import Path
import numpy as np, pandas as pd
import torch, torch.nn.functional as F

BIN = Path(sys.executable).parent


def _run(*args, timeout=600):
    return subprocess.run([str(BIN / args[0]), *map(str, args[1:])], capture_output=True, text=True, timeout=timeout)


def test_knn_every_logs_the_monitor_and_feat_std_matches_the_saved_encoder(birds, tmp_path):
    from fgssl_nb.runs import load_encoder
    from fgssl_nb.data import read_dataset, labeled_dls
    from fgssl_nb.evaluate import extract_features
    r = _run('fgssl_pretrain', '--data', birds, '--out', tmp_path / 'r', '--size', 32, '--bs', 8, '--epochs', 3, '--knn_every', 2,
             '--precision', 'fp32', '--workers', 0, '--kw', 'proj_hidden=32', 'proj_dim=16')
    assert r.returncode == 0, r.stderr[-800:]
    log = pd.read_csv(tmp_path / 'r' / 'log.csv')
    assert log.knn_top1.isna().tolist() == [True, False, False]  # after epoch 2 (every 2nd) and after the last (3)
    assert log.feat_std.isna().tolist() == [True, False, False]
    # feat_std, recomputed from the saved encoder's test features with numpy: per-dim std of the L2-normalised rows x sqrt(d)
    enc = load_encoder(tmp_path / 'r' / 'encoder.pth')
    dls = labeled_dls(read_dataset(birds), size=32, bs=8, num_workers=0)
    f, _ = extract_features(enc, dls.valid)
    z = F.normalize(f.double(), dim=1).numpy()
    want = z.std(0, ddof=1).mean() * np.sqrt(z.shape[1])
    assert abs(log.feat_std.iloc[-1] - want) < 1e-6 and 0 < want < 1.5


def test_knn_every_must_not_be_negative(birds, tmp_path):
    r = _run('fgssl_pretrain', '--data', birds, '--out', tmp_path / 'r', '--size', 32, '--bs', 8, '--epochs', 1, '--knn_every', -1)
    assert r.returncode != 0 and '--knn_every must be >= 0' in r.stderr and not (tmp_path / 'r').exists()
    r = _run('fgssl_compare', '--grid', 'curves', '--data', birds, '--knn_every', -2, '--out', tmp_path / 'g')
    assert r.returncode != 0 and '--knn_every must be >= 0' in r.stderr and not (tmp_path / 'g').exists()


def test_compare_draws_the_curves_and_prints_the_crossings(birds, tmp_path):
    r = _run('fgssl_compare', '--grid', 'curves', '--only', 'random init', 'simclr', '--data', birds, '--size', 32, '--bs', 8,
             '--epochs', 2, '--knn_every', 1, '--out', tmp_path)
    assert r.returncode == 0, r.stderr[-800:]
    assert (tmp_path / 'curves.png').exists() and 'k-NN monitor every 1 epoch(s)' in r.stdout
    assert '| crosses the floor at epoch |' in r.stdout and '| simclr ' in r.stdout
    assert 'clear of it' not in r.stdout  # a floor of one seed has no spread to clear
    from fgssl_nb.curves import read_curves, crossing_table
    cur = read_curves(tmp_path)
    assert sorted(cur[cur.name == 'simclr'].epoch) == [1, 2] and cur[cur.kind == 'baseline'].name.tolist() == ['random init']
    # the monitor's last value is fgssl_eval's k-NN top-1 of the saved encoder (results.csv)
    res = pd.read_csv(tmp_path / 'results.csv').set_index('name')
    assert abs(cur[(cur.name == 'simclr') & (cur.epoch == 2)].knn_top1.item() - res.knn_top1['simclr']) < 1e-6
    t = crossing_table(cur, floor='random init')
    assert t.attrs['floor'] == res.knn_top1['random init']
    c = t.loc[0, 'crosses the floor at epoch']
    assert c in ('never', '1', '2')
    log = cur[cur.name == 'simclr'].set_index('epoch').knn_top1  # the table's crossing, recomputed from the two values
    assert c == ('never' if log[2] <= res.knn_top1['random init'] else '1' if log[1] > res.knn_top1['random init'] else '2')
    # the floor evaluated for a second seed: the table adds the epoch each run clears the floor's mean + 2 sd over its seeds
    rec0 = tmp_path / 'random_init' / 'seed0' / 'metrics.json'; before = rec0.read_text()
    r = _run('fgssl_compare', '--grid', 'curves', '--only', 'random init', '--seeds', 0, 1, '--data', birds, '--size', 32, '--bs', 8,
             '--epochs', 2, '--knn_every', 1, '--out', tmp_path)
    assert r.returncode == 0, r.stderr[-800:]
    assert rec0.read_text() == before  # seed 0's record reused, not evaluated again
    fl = pd.read_csv(tmp_path / 'results.csv').query("name == 'random init'").knn_top1
    level = fl.mean() + 2 * fl.std(ddof=1)
    want = 'never' if log[2] <= level else '1' if log[1] > level else '2'
    assert '| clear of it (+2 sd) at epoch |' in r.stdout and r.stdout.rstrip().splitlines()[-1].endswith(f' | {want} |')


def test_compare_without_the_floor_or_the_monitor(birds, tmp_path):
    # the monitor on, the grid without its floor entry: the curves and the table, no crossing ('n/a')
    r = _run('fgssl_compare', '--grid', 'curves', '--only', 'simclr', '--data', birds, '--size', 32, '--bs', 8, '--epochs', 1,
             '--knn_every', 1, '--out', tmp_path / 'a')
    assert r.returncode == 0, r.stderr[-800:]
    assert (tmp_path / 'a' / 'curves.png').exists() and '| simclr | 1 | 1 |' in r.stdout and '| n/a |' in r.stdout
    # the same run folder again with the monitor now off: nothing retrained, no curves drawn from a grid without a monitor
    r = _run('fgssl_compare', '--grid', 'system1', '--only', 'random init', '--data', birds, '--size', 32, '--bs', 8, '--out', tmp_path / 'b')
    assert r.returncode == 0 and (tmp_path / 'b' / 'results.png').exists() and not (tmp_path / 'b' / 'curves.png').exists()
    assert 'crosses the floor' not in r.stdout


def test_supervised_monitor_and_resume_of_a_finished_run(birds, tmp_path):
    from fgssl_nb.cli import pretrain_run
    import json
    pretrain_run('supervised', birds, size=32, bs=8, epochs=2, knn=1, out=tmp_path / 's', progress=False, precision='fp32')
    log = pd.read_csv(tmp_path / 's' / 'log.csv')
    assert log.knn_top1.notna().all() and log.feat_std.notna().all() and 'accuracy' in log
    assert json.loads((tmp_path / 's' / 'config.json').read_text())['knn_every'] == 1
    # resuming a finished run: nothing trains, no monitor pass outside fit, the log unchanged
    before = (tmp_path / 's' / 'log.csv').read_text()
    pretrain_run('supervised', birds, size=32, bs=8, epochs=2, knn=1, out=tmp_path / 's', progress=False, resume=True)
    assert (tmp_path / 's' / 'log.csv').read_text() == before


def test_a_resumed_log_keeps_its_rows_under_new_columns(tmp_path):
    from fgssl_nb.runs import realign_log
    f = tmp_path / 'log.csv'
    f.write_text('epoch,train_loss,knn_top1,time\n0,2.5,0.25,00:10\n1,2.0,0.5,00:09\n')
    realign_log(f, ['epoch', 'train_loss', 'knn_top1', 'feat_std', 'time'])  # a run from before feat_std, resumed
    df = pd.read_csv(f)
    assert df.columns.tolist() == ['epoch', 'train_loss', 'knn_top1', 'feat_std', 'time']
    assert df.knn_top1.tolist() == [0.25, 0.5] and df.feat_std.isna().all() and df.time.tolist() == ['00:10', '00:09']
    realign_log(f, ['epoch', 'train_loss', 'time'])  # the monitor dropped: its columns go, the rest line up
    assert pd.read_csv(f).columns.tolist() == ['epoch', 'train_loss', 'time'] and pd.read_csv(f).time.tolist() == ['00:10', '00:09']


def test_pmg_monitor_reads_its_encoder(birds, tmp_path):
    "PMG's k-NN monitor (the system 1 grid's curves) measures the encoder it saves: its last value is fgssl_eval's k-NN top-1."
    from fgssl_nb.cli import pretrain_run, evaluate_run
    pretrain_run('pmg', birds, size=32, bs=8, epochs=2, knn=1, out=tmp_path / 'p', progress=False, precision='fp32', width=0.25)
    log = pd.read_csv(tmp_path / 'p' / 'log.csv')
    assert log.knn_top1.notna().all() and log.feat_std.notna().all()
    m = evaluate_run(tmp_path / 'p', birds, ('knn',))
    assert abs(log.knn_top1.iloc[-1] - m['knn_top1']) < 1e-6
    # PMG's own numbers still land under their names with the monitor's metrics appended after them
    assert (m['supervised_top1'], m['pmg_concat_top1']) == (log.pmg_top1.iloc[-1], log.concat_top1.iloc[-1])
