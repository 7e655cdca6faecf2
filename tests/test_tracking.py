"--log tensorboard / wandb: TensorBoard event files with the run's scalars, resumable steps, one-line errors."
import importlib.util, subprocess, sys
from pathlib import Path
import pytest
from fastai.torch_core import set_seed
from fgssl_nb.data import read_dataset, ssl_dls
from fgssl_nb.learner import ssl_learner, pretrain
from conftest import StopAfter

BIN = Path(sys.executable).parent
needs_tb = pytest.mark.skipif(importlib.util.find_spec('tensorboard') is None, reason='tensorboard not installed (pip install tensorboard)')


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    steps = {}
    for f in sorted((run_dir / 'tensorboard').glob('events.out.tfevents.*')):
        ea = EventAccumulator(str(f)); ea.Reload()
        for tag in ea.Tags()['scalars']: steps.setdefault(tag, []).extend(e.step for e in ea.Scalars(tag))
    return steps


def _learner(birds, run_dir):
    set_seed(0)
    return ssl_learner(ssl_dls(read_dataset(birds), size=32, bs=4, num_workers=0), 'simclr', run_dir=run_dir, precision='fp32',
                       proj_hidden=32, proj_dim=16)


@needs_tb
def test_tensorboard_event_file_holds_the_run_and_a_resume_continues_it(birds, tmp_path):
    learn = _learner(birds, tmp_path / 'r'); learn.add_cb(StopAfter(1))
    pretrain(learn, 2, run_dir=tmp_path / 'r', progress=False, log='tensorboard')
    n = len(learn.dls.train)
    s = _scalars(tmp_path / 'r')
    assert s['train_loss'] == list(range(1, n + 1)) and s['valid_loss'] == [n]
    pretrain(_learner(birds, tmp_path / 'r'), 2, run_dir=tmp_path / 'r', resume=True, progress=False, log='tensorboard')
    s = _scalars(tmp_path / 'r')
    assert s['train_loss'] == list(range(1, 2 * n + 1)), 'the resumed run continues the curve, it does not redraw epoch 1'
    assert s['valid_loss'] == [n, 2 * n] and 'z_std' in s and 'lr_0' in s


@pytest.mark.parametrize('log, msg', [('mlflow', "--log takes tensorboard and/or wandb, got 'mlflow'")]
                         + ([('wandb', '--log wandb needs the wandb package: pip install wandb')] if importlib.util.find_spec('wandb') is None else []))
def test_bad_log_is_one_line_before_anything_runs(birds, tmp_path, log, msg):
    r = subprocess.run([str(BIN / 'fgssl_pretrain'), '--data', str(birds), '--out', str(tmp_path / 'x'), '--log', log],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == f'error: {msg}' and not (tmp_path / 'x').exists()
