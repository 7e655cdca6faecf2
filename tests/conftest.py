import os, shutil
from pathlib import Path
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / 'shared' / 'data'


@pytest.fixture(scope='session')
def tiny():
    "The shared flowers17-tiny set (CUB layout, 5 classes, 30 train / 20 test, 20 unlabelled)."
    p = SHARED / 'flowers17-tiny'
    if not p.exists(): pytest.skip(f"needs the project's shared sample data at {p} (see shared/data/README.md)")
    return p


@pytest.fixture(scope='session')
def birds(tmp_path_factory):
    "A small built-in toy-bird set (so the suite means something without ../shared)."
    from fgssl_nb.toybirds import make_toybirds
    return make_toybirds(tmp_path_factory.mktemp('birds') / 'toybirds', n_per_class=4, n_unlabeled=6, size=64)


@pytest.fixture(autouse=True)
def _cache_home(tmp_path_factory, monkeypatch):
    "Keep generated default data out of the user's home during tests."
    monkeypatch.setenv('FGSSL_HOME', str(tmp_path_factory.getbasetemp() / 'fgssl_home'))


def tiny_rows(tiny):
    "(relative path, 0-based label, is_train) of flowers17-tiny, read straight from its files."
    rd = lambda f: dict(l.split(maxsplit=1) for l in (tiny / f).read_text().splitlines() if l.strip())
    imgs, labs, split = rd('images.txt'), rd('image_class_labels.txt'), rd('train_test_split.txt')
    classes = [n for _, n in sorted((int(k), v) for k, v in rd('classes.txt').items())]
    return [(imgs[i], int(labs[i]) - 1, split[i] == '1') for i in imgs], classes


from fastai.callback.core import Callback
from fastai.learner import CancelFitException


class StopAfter(Callback):
    "Simulates an interruption right after epoch `n` was checkpointed (tests of exact resume)."
    order = 99
    def __init__(self, n: int = 1): self.n = n
    def after_epoch(self):
        if self.epoch + 1 == self.n: raise CancelFitException


@pytest.fixture(scope='module')
def one_thread():
    "Small tensors on a shared 2-core machine: one torch thread is several times faster than two (use via pytestmark)."
    import torch
    old = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


import json, subprocess, sys, types


class CLIBatch:
    """Runs all the commands of a parameter list in one Python process, once, and hands each parametrized test the
    result of its own: one import of torch and fastai (about 6 s on 2 cores) instead of one per command. For commands
    that stop on a bad argument; anything that trains belongs in a process of its own. '{tmp}' in a command is a
    fresh folder of its own. What the driver itself writes outside the commands' captured streams (a C-level warning
    on file descriptor 2) fails the batch, so nothing is hidden that a lone run would show. A failed batch fails
    every test of its list at once (it is not run again per test)."""
    def __init__(self, factory): self.factory, self.done = factory, {}

    def __call__(self, commands: list, i: int):
        "(result with `returncode`, `stdout`, `stderr`; its '{tmp}' folder) of `commands[i]`."
        key = json.dumps([[str(a) for a in c] for c in commands])
        if key not in self.done:
            tmps = [self.factory.mktemp('cli') for _ in commands]
            argvs = [[str(a).replace('{tmp}', str(t)) for a in c] for c, t in zip(commands, tmps)]
            try:
                r = subprocess.run([sys.executable, str(Path(__file__).parent / 'cli_driver.py')], input=json.dumps(argvs),
                                   capture_output=True, text=True, timeout=60 + 30 * len(commands))
                ok = r.returncode == 0 and '@@results@@' in r.stdout and not r.stderr.strip()
                self.done[key] = ([(types.SimpleNamespace(**x), t) for x, t in zip(json.loads(r.stdout.rsplit('@@results@@', 1)[1]), tmps)]
                                  if ok else f"the CLI batch failed (exit {r.returncode}): {r.stderr[-2000:]}")
            except subprocess.TimeoutExpired as e: self.done[key] = f"the CLI batch timed out: {e}"
        res = self.done[key]
        if isinstance(res, str): pytest.fail(res)
        return res[i]


@pytest.fixture(scope='session')
def cli_batch(tmp_path_factory): return CLIBatch(tmp_path_factory)
