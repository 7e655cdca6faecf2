"The benchmarks run for every method of the registry, multi-crop ones included (printed numbers, not timed tests)."
import math
import pytest
import torch
from fgssl_nb.bench import _without_views, bench_methods, timed_fit
from fgssl_nb.data import read_dataset, ssl_dls
from fgssl_nb.learner import ssl_learner


def test_without_views_keeps_multicrop_resolutions(birds):
    "DINO's local crops stay small without their random views, so the teacher still sees the 2 global views only."
    dls = ssl_dls(read_dataset(birds), size=32, bs=8, num_workers=0)
    learn = ssl_learner(dls, 'dino', size=32, precision='fp32')
    x = torch.rand(4, 3, 32, 32)
    sizes = lambda cb: [tuple(p(x).shape[-2:]) for p in cb.pipelines]
    cb = learn.run_state.method_cb
    before, local = sizes(cb), [p.local for p in cb.pipelines]
    assert len(set(before)) == 2 and any(local)  # the test means something: two resolutions, some local views
    _without_views(learn)
    assert sizes(cb) == before and [p.local for p in cb.pipelines] == local
    assert all(p.name == 'none' for p in cb.pipelines)
    plain = _without_views(ssl_learner(dls, 'simclr', size=32, precision='fp32')).run_state.method_cb
    assert all(len(p.tfms) == 0 for p in plain.pipelines)  # global views: normalisation only, as before


def test_bench_methods_runs_dino(birds):
    r, = bench_methods(['dino'], data=birds, size=32, bs=4, n_batches=1, skip=1, rounds=1)
    for k in ('train', 'train_fp32', 'bare_backbone', 'plain_fp32'): assert r[k] > 0 and math.isfinite(r[k]), (k, r)


def test_timed_fit_goes_on_into_the_next_epoch(birds):
    "Asking for more batches than one epoch holds (a big batch on a small set) times them over several epochs."
    from fastai.callback.core import Callback
    dls = ssl_dls(read_dataset(birds), size=32, bs=16, valid_pct=0.2, num_workers=0)
    learn = ssl_learner(dls, 'simclr', size=32, precision='fp32')
    seen = []
    class Count(Callback):
        def after_batch(self): seen.append(self.training)
    learn.add_cb(Count())
    n = len(dls.train) + 2
    assert timed_fit(learn, n, 1) > 0
    assert seen == [True] * (n + 1)  # skip + n training batches, no validation batch between the epochs
