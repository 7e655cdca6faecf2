"Evaluation protocols cross-checked against independent references: scikit-learn and slow per-query loops."
import numpy as np
import pytest
import torch, torch.nn as nn
import torchvision
from torch.utils.data import DataLoader, TensorDataset
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler
from fgssl_nb.data import read_dataset, labeled_dls, normalize
from fgssl_nb.evaluate import (extract_features, eval_dl, linear_probe, fit_logistic, standardize, knn_classify, knn_top1,
                               retrieval_metrics, few_shot_indices, label_efficiency, fine_tune, evaluate_encoder,
                               evaluate_features, WD_GRID)


pytestmark = pytest.mark.usefixtures('one_thread')  # conftest: small tensors run faster on one thread


def resnet18(seed=0):
    torch.manual_seed(seed)
    enc = nn.Sequential(*list(torchvision.models.resnet18(num_classes=10).children())[:-1], nn.Flatten())
    enc.num_features = 512
    return enc


def blobs(seed, n_per_class=40, n_classes=5, d=32, spread=0.5):
    "Overlapping Gaussian classes (shared centres), shifted and scaled so standardisation matters."
    centres = torch.randn(n_classes, d, generator=torch.Generator().manual_seed(123)) * spread
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    return (centres[y] + torch.randn(len(y), d, generator=g)) * 3 - 2, y


# ---------------------------------------------------------------- k-NN
@pytest.mark.parametrize('k', [1, 3, 7, 20])
@pytest.mark.parametrize('n_classes', [2, 5])
def test_knn_majority_vote_matches_sklearn(k, n_classes):
    g = torch.Generator().manual_seed(k * 10 + n_classes)
    tr, te = torch.randn(150, 12, generator=g), torch.randn(80, 12, generator=g)  # continuous: no distance ties
    ytr = torch.randint(0, n_classes, (150,), generator=g)
    sk = KNeighborsClassifier(n_neighbors=k, metric='cosine', weights='uniform').fit(tr.numpy(), ytr.numpy())
    assert knn_classify(tr, ytr, te, k=k, weighted=False).tolist() == sk.predict(te.numpy()).tolist()


def test_knn_weighted_vote_matches_loop():
    g = torch.Generator().manual_seed(5)
    tr, te = torch.randn(100, 10, generator=g).double(), torch.randn(40, 10, generator=g).double()
    ytr = torch.randint(0, 4, (100,), generator=g)
    k, T = 15, 0.1
    ref = []
    for q in te:
        sims = np.array([float(q @ t / (q.norm() * t.norm())) for t in tr])
        top = np.argsort(-sims)[:k]
        votes = np.zeros(4)
        for j in top: votes[int(ytr[j])] += np.exp(sims[j] / T)
        ref.append(int(votes.argmax()))
    assert knn_classify(tr, ytr, te, k=k, temperature=T).tolist() == ref
    # knn_top1 is the accuracy of those predictions
    yte = torch.randint(0, 4, (40,), generator=g)
    assert knn_top1(tr, ytr, te, yte, k=k, temperature=T) == pytest.approx(np.mean(np.array(ref) == yte.numpy()))


def test_knn_weighting_matters_and_scale_invariant():
    "A near neighbour outvotes two far ones only with the exp(sim/T) weights; feature norms do not matter."
    tr = torch.tensor([[1.0, 0.02], [0.6, 0.8], [0.6, -0.8]])
    ytr = torch.tensor([0, 1, 1])
    q = torch.tensor([[1.0, 0.0]])
    assert knn_classify(tr, ytr, q, k=3, weighted=False).item() == 1
    assert knn_classify(tr, ytr, q, k=3, temperature=0.07).item() == 0
    assert knn_classify(tr * torch.tensor([[5.0], [0.1], [2.0]]), ytr, q * 9, k=3).item() == 0


# ---------------------------------------------------------------- retrieval
def retrieval_loop(feats, labels, ks):
    "The obvious per-query loop; AP from scikit-learn."
    f = feats / feats.norm(dim=1, keepdim=True)
    hits, aps = {k: [] for k in ks}, []
    for i in range(len(f)):
        others = [j for j in range(len(f)) if j != i]
        rel = [int(labels[j] == labels[i]) for j in others]
        if not any(rel): continue
        sims = [float(f[i] @ f[j]) for j in others]
        ranked = [others[t] for t in np.argsort(-np.array(sims), kind='stable')]
        for k in ks: hits[k].append(any(labels[j] == labels[i] for j in ranked[:k]))
        aps.append(average_precision_score(rel, sims))
    return {**{f'rank{k}': float(np.mean(hits[k])) for k in ks}, 'map': float(np.mean(aps))}


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_retrieval_matches_loop_and_sklearn_ap(seed):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(70, 6, generator=g) * torch.rand(70, 1, generator=g) * 4  # varied norms: only directions count
    y = torch.randint(0, 6, (70,), generator=g)
    y[3] = 9  # a class with a single item: that query is skipped
    got, ref = retrieval_metrics(f, y, ks=(1, 2, 5, 10)), retrieval_loop(f, y, (1, 2, 5, 10))
    assert list(got) == list(ref)
    for key in ref: assert got[key] == pytest.approx(ref[key], abs=1e-9), key


def test_retrieval_chunking_is_invisible():
    g = torch.Generator().manual_seed(7)
    f, y = torch.randn(50, 5, generator=g), torch.randint(0, 3, (50,), generator=g)
    assert retrieval_metrics(f, y, chunk=7) == pytest.approx(retrieval_metrics(f, y, chunk=1024), abs=1e-12)


def test_retrieval_hand_case():
    "Unit vectors at 0, 20, 50, 90, 95 degrees, classes 0 1 0 1 1: APs 1/2, 5/12, 1/4, 5/6, 5/6 (see the notebook)."
    ang = torch.tensor([0., 20., 50., 90., 95.]).deg2rad()
    f = torch.stack([ang.cos(), ang.sin()], 1) * torch.tensor([[1.], [3.], [0.5], [2.], [7.]])
    y = torch.tensor([0, 1, 0, 1, 1])
    r = retrieval_metrics(f, y, ks=(1, 2, 3, 4))
    assert r == pytest.approx(dict(rank1=2 / 5, rank2=3 / 5, rank3=4 / 5, rank4=1.0, map=17 / 30), abs=1e-12)
    # a lone-class item at 200 degrees ranks last for everyone and is skipped as a query: nothing changes
    a = torch.tensor(200.).deg2rad()
    r6 = retrieval_metrics(torch.cat([f, torch.stack([a.cos(), a.sin()])[None]]), torch.cat([y, torch.tensor([2])]), ks=(1, 2, 3, 4))
    assert r6 == pytest.approx(r, abs=1e-12)
    # perfect clusters: everything is 1
    assert retrieval_metrics(torch.tensor([[1., 0], [1, .1], [0, 1], [.1, 1]]), torch.tensor([0, 0, 1, 1])) == \
        pytest.approx(dict(rank1=1.0, rank5=1.0, map=1.0))


def test_retrieval_bad_input():
    with pytest.raises(ValueError, match='at least 2'): retrieval_metrics(torch.randn(1, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match='no query'): retrieval_metrics(torch.randn(3, 3), torch.tensor([0, 1, 2]))


# ---------------------------------------------------------------- linear probe
@pytest.mark.parametrize('wd', [1e-3, 1e-2, 1e-1])
def test_linear_probe_matches_sklearn(wd):
    "Mean CE + wd/2 ||W||^2 (bias free) on standardised features == LogisticRegression(C=1/(N wd))."
    Xtr, ytr = blobs(0); Xte, yte = blobs(1)
    r = linear_probe(Xtr, ytr, Xte, yte, wd=wd)
    sc = StandardScaler().fit(Xtr.double().numpy())
    sk = LogisticRegression(C=1 / (len(Xtr) * wd), tol=1e-10, max_iter=10_000).fit(sc.transform(Xtr.double().numpy()), ytr.numpy())
    p = sk.predict_proba(sc.transform(Xte.double().numpy()))
    assert (r['pred'].numpy() == p.argmax(1)).mean() >= 0.98
    np.testing.assert_allclose(r['probs'].numpy(), p, atol=1e-3)
    assert 0.4 < r['top1'] < 1.0  # an informative, non-trivial problem
    assert r['top1'] == pytest.approx((p.argmax(1) == yte.numpy()).mean(), abs=0.02)


def test_fit_logistic_optimum():
    "At the returned weights the gradient of the objective vanishes (first-order optimality)."
    X, y = blobs(3)
    (Xs,) = standardize(X.double())
    lin = fit_logistic(Xs, y, wd=0.05)
    W, b = lin.weight.clone().requires_grad_(), lin.bias.clone().requires_grad_()
    loss = nn.functional.cross_entropy(Xs @ W.T + b, y) + 0.05 / 2 * W.pow(2).sum()
    gW, gb = torch.autograd.grad(loss, (W, b))
    assert gW.abs().max() < 1e-5 and gb.abs().max() < 1e-5


def test_linear_probe_wd_chosen_on_train_only():
    Xtr, ytr = blobs(0); Xte, yte = blobs(1)
    r = linear_probe(Xtr, ytr, Xte, yte)
    assert r['wd'] in WD_GRID and set(r['val_top1']) == set(WD_GRID)
    assert linear_probe(Xtr, ytr, Xte, torch.zeros_like(yte))['wd'] == r['wd']
    assert linear_probe(Xtr, ytr, Xte * 0 + 1, yte)['wd'] == r['wd']
    assert r['top1'] == pytest.approx(linear_probe(Xtr, ytr, Xte, yte, wd=r['wd'])['top1'])


def test_standardize_uses_train_statistics():
    a = torch.tensor([[1., 5.], [3., 5.]]); b = torch.tensor([[2., 7.]])
    sa, sb = standardize(a, b)
    assert torch.allclose(sa, torch.tensor([[-1., 0.], [1., 0.]])) and torch.allclose(sb, torch.tensor([[0., 2.]]))


# ---------------------------------------------------------------- label efficiency
def test_label_efficiency():
    Xtr, ytr = blobs(0); Xte, yte = blobs(1)
    df = label_efficiency(Xtr, ytr, Xte, yte, shots=(1, 5, None), seeds=(0, 1, 2), wd=0.01)
    assert df['n_train'].tolist() == [5, 25, 200] and df['runs'].tolist() == [3, 3, 1]
    accs = [linear_probe(Xtr[i], ytr[i], Xte, yte, wd=0.01)['top1']
            for i in (torch.as_tensor(few_shot_indices(ytr.numpy(), 5, s)) for s in (0, 1, 2))]
    assert df['top1_mean'][1] == pytest.approx(np.mean(accs)) and df['top1_std'][1] == pytest.approx(np.std(accs, ddof=1))
    assert df['top1_mean'][2] == pytest.approx(linear_probe(Xtr, ytr, Xte, yte, wd=0.01)['top1'])
    idx = few_shot_indices(np.array([0, 0, 0, 1, 1, 2]), 2, seed=0)
    assert np.bincount(np.array([0, 0, 0, 1, 1, 2])[idx]).tolist() == [2, 2, 1]


# ---------------------------------------------------------------- feature extraction
def test_extract_features_eval_mode_and_restore():
    enc = resnet18()
    x = torch.rand(12, 3, 32, 32); y = torch.arange(12) % 3
    enc.train()
    with torch.no_grad():
        for _ in range(3): enc(normalize(torch.rand(6, 3, 32, 32)))  # running stats away from init
    enc[4][0].bn2.eval()  # one sub-module deliberately in eval mode
    stats = {k: v.clone() for k, v in enc.state_dict().items()}
    dl = DataLoader(TensorDataset(x, y), batch_size=5)
    f_train, l = extract_features(enc, dl)
    assert enc.training and enc[1].training and not enc[4][0].bn2.training
    assert all(torch.equal(enc.state_dict()[k], v) for k, v in stats.items())  # running stats untouched
    enc.eval()
    f_eval, _ = extract_features(enc, dl)
    assert torch.equal(f_train, f_eval) and torch.equal(l, y)
    with torch.no_grad(): ref = enc(normalize(x))
    torch.testing.assert_close(f_eval, ref, atol=1e-5, rtol=1e-5)
    # batch composition does not matter in eval mode
    torch.testing.assert_close(extract_features(enc, DataLoader(TensorDataset(x, y), batch_size=12))[0], f_eval, atol=1e-5, rtol=1e-5)
    assert f_eval.dtype == torch.float32 and l.dtype == torch.int64


def test_extract_features_refuses_unordered_torch_loaders():
    enc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    ds = TensorDataset(torch.rand(6, 3, 8, 8), torch.arange(6))
    with pytest.raises(ValueError, match='shuffle=False'): extract_features(enc, DataLoader(ds, batch_size=4, shuffle=True))
    with pytest.raises(ValueError, match='drop_last'): extract_features(enc, DataLoader(ds, batch_size=4, drop_last=True))
    f, l = extract_features(enc, DataLoader(TensorDataset(torch.rand(5, 3, 8, 8)), batch_size=2))
    assert f.shape == (5, 3) and l.tolist() == [-1] * 5  # no labels in the loader


@pytest.fixture(scope='module')
def bird_dls(tmp_path_factory):
    from fgssl_nb.toybirds import make_toybirds
    ds = read_dataset(make_toybirds(tmp_path_factory.mktemp('evbirds') / 'tb', n_per_class=6, n_unlabeled=0, size=48))
    return ds, labeled_dls(ds, size=32, bs=8, num_workers=0)


def test_extract_features_fastai_order(bird_dls):
    ds, dls = bird_dls
    enc = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten())
    f, y = extract_features(enc, eval_dl(dls, 'train'))
    assert y.tolist() == ds.labels[ds.train_idxs].tolist() and len(torch.unique(f, dim=0)) == len(f)
    f2, y2 = extract_features(enc, dls.train)  # shuffled, drop_last: replaced by an ordered, complete copy
    assert torch.equal(y2, y) and torch.allclose(f2, f)
    ft, yt = extract_features(enc, eval_dl(dls, 'valid'))
    assert yt.tolist() == ds.labels[ds.test_idxs].tolist()
    with pytest.raises(ValueError, match="'train' or 'valid'"): eval_dl(dls, 'val')


# ---------------------------------------------------------------- fine-tuning and the whole evaluation
def test_fine_tune_leaves_caller_encoder_alone(bird_dls):
    ds, dls = bird_dls
    enc = resnet18().eval()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    top1, learn = fine_tune(enc, dls, epochs=1, lr=1e-3, encoder_lr_mult=0.1, return_learner=True)
    assert isinstance(top1, float) and 0 <= top1 <= 1
    assert all(torch.equal(enc.state_dict()[k], v) for k, v in before.items()) and not enc.training
    lrs = [h['lr'] for h in learn.opt.hypers]
    assert len(lrs) == 2 and lrs[0] / lrs[1] == pytest.approx(0.1)
    tuned = learn.model[0].module.state_dict()
    assert any(not torch.equal(tuned[k].cpu(), v) for k, v in before.items() if v.is_floating_point())


def test_evaluate_encoder_keys_and_values(bird_dls):
    ds, dls = bird_dls
    pix = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten()); pix.num_features = 48
    m, feats = evaluate_encoder(pix, ds, size=32, bs=8, num_workers=0, return_features=True)
    assert list(m) == ['linear_top1', 'knn_top1', 'retrieval_rank1', 'retrieval_rank5', 'retrieval_map']
    assert all(isinstance(v, float) and 0 <= v <= 1 for v in m.values())
    (trf, try_), (tef, tey) = feats['train'], feats['test']
    assert (len(trf), len(tef)) == (len(ds.train_idxs), len(ds.test_idxs))
    assert m['linear_top1'] == pytest.approx(linear_probe(trf, try_, tef, tey)['top1'])
    assert m['knn_top1'] == pytest.approx(knn_top1(trf, try_, tef, tey))
    r = retrieval_metrics(tef, tey)
    assert (m['retrieval_rank1'], m['retrieval_rank5'], m['retrieval_map']) == pytest.approx((r['rank1'], r['rank5'], r['map']))
    assert evaluate_features(trf, try_, tef, tey) == pytest.approx(m)
    assert list(evaluate_encoder(pix, dls, protocols=('knn',))) == ['knn_top1']
    with pytest.raises(ValueError, match='linaer'): evaluate_encoder(pix, dls, protocols=('linaer',))


# ---------------------------------------------------------------- fine-tuning options: train_layers, class_weights, head
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader as FastaiDataLoader
from fgssl_nb.evaluate import balanced_class_weights, split_encoder, train_labels
from fgssl_nb.models import create_encoder


def test_balanced_class_weights_favour_the_minority():
    "w_c = N / (C n_c), as scikit-learn's compute_class_weight('balanced'); the rare class weighs most."
    from sklearn.utils.class_weight import compute_class_weight
    y = np.array([0] * 9 + [1] * 3 + [2] * 1)
    w = balanced_class_weights(torch.as_tensor(y))
    np.testing.assert_allclose(w.numpy(), compute_class_weight('balanced', classes=np.arange(3), y=y), rtol=1e-6)
    assert w[2] > w[1] > w[0] and w[2] / w[0] == pytest.approx(9.0)


class _FirstHead(Callback):
    "The head's weights as training starts (before_train: fastai's `validate` also fires before_fit)."
    def before_train(self):
        if not hasattr(self.learn, 'head0'): self.learn.head0 = {k: v.clone() for k, v in self.model[2].state_dict().items()}


def _imbalanced_dls(n0=200, n1=20, seed=0):
    "Two overlapping 1-d classes (means 0 and 1, std 1) as (B, 3, 1, 1) 'images'; 10:1 in train, balanced in test."
    import random
    random.seed(seed)  # fastai draws each loader's shuffling seed from Python's `random` when it is made
    g = torch.Generator().manual_seed(seed)
    def make(a, b):
        y = torch.cat([torch.zeros(a), torch.ones(b)]).long()
        x = (y.float() + torch.randn(len(y), generator=g))[:, None, None, None].expand(-1, 3, 1, 1).contiguous()
        return TensorDataset(x * 0.2 + 0.45, y)   # inside [0, 1]-ish: the ImageNet normalisation is affine anyway
    return DataLoaders(FastaiDataLoader(make(n0, n1), bs=22, shuffle=True, drop_last=True), FastaiDataLoader(make(200, 200), bs=100), device='cpu')


@pytest.mark.parametrize('seed', [0, 1])
def test_class_weights_move_predictions_to_the_minority(seed):
    "On 10:1 overlapping classes, an unweighted head rarely predicts the minority; 'balanced' predicts it about half the time."
    dls = _imbalanced_dls(seed=seed)
    assert train_labels(dls).bincount().tolist() == [200, 20]
    enc = nn.Flatten(); enc.num_features = 3
    share = {}
    for cw in (None, 'balanced'):
        _, learn = fine_tune(enc, dls, epochs=8, lr=0.05, train_layers='none', n_classes=2, class_weights=cw, return_learner=True)
        with learn.no_bar(): preds, _ = learn.get_preds(dl=dls.valid)
        share[cw] = preds.argmax(1).float().mean().item()
    assert share[None] < 0.15 and 0.3 < share['balanced'] < 0.7, share  # measured: unweighted 0.007 / 0.002, balanced 0.40 / 0.44 (seeds 0 / 1)


def test_fine_tune_layer4_keeps_the_frozen_part_frozen(bird_dls):
    "Stem + layer1-3 (weights and BatchNorm running statistics) bit-identical; layer4 and the MLP head trained."
    ds, dls = bird_dls
    enc = create_encoder('resnet18').train()
    with torch.no_grad(): enc(torch.randn(8, 3, 32, 32))  # running stats away from init
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    top1, learn = fine_tune(enc, dls, epochs=1, lr=1e-2, train_layers='layer4', head='mlp', cbs=[_FirstHead()], return_learner=True)
    tuned = learn.model[0].module.state_dict()
    assert all(torch.equal(tuned[k], v) for k, v in before.items() if not k.startswith('body.7.'))
    assert not torch.equal(tuned['body.7.0.bn1.running_mean'], before['body.7.0.bn1.running_mean'])
    assert not torch.equal(tuned['body.7.1.conv2.weight'], before['body.7.1.conv2.weight'])
    assert all(not torch.equal(learn.model[2].state_dict()[k], v) for k, v in learn.head0.items()), 'the head must learn'
    assert [type(m).__name__ for m in learn.model[2]] == ['Linear', 'ReLU', 'Dropout', 'Linear']
    assert learn.model[2][0].out_features == 256
    assert sum(len(pg) for pg in learn.opt.param_lists) == len(list(enc.body[7].parameters())) + 4
    assert all(torch.equal(enc.state_dict()[k], v) for k, v in before.items())


def test_fine_tune_frozen_encoder(bird_dls):
    ds, dls = bird_dls
    enc = resnet18().train()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    _, learn = fine_tune(enc, dls, epochs=1, lr=1e-2, train_layers='none', cbs=[_FirstHead()], return_learner=True)
    assert len(learn.opt.param_lists) == 1
    assert all(torch.equal(learn.model[0].module.state_dict()[k], v) for k, v in before.items())
    assert not torch.equal(learn.model[2].weight, learn.head0['weight'])
    assert train_labels(dls).tolist() == ds.labels[ds.train_idxs].tolist()


def test_fine_tune_bad_options(bird_dls):
    ds, dls = bird_dls
    enc = resnet18()
    with pytest.raises(ValueError, match='train_layers must be one of'): fine_tune(enc, dls, epochs=0, train_layers='layer2')
    with pytest.raises(ValueError, match="use train_layers='all' or 'none'"):
        fine_tune(nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten()), dls, epochs=0, train_layers='layer4')
    with pytest.raises(ValueError, match="'balanced', a tensor or None"): fine_tune(enc, dls, epochs=0, class_weights='inverse')
    with pytest.raises(ValueError, match='one weight per class'): fine_tune(enc, dls, epochs=0, class_weights=torch.ones(3))
    with pytest.raises(ValueError, match="head must be"): fine_tune(enc, dls, epochs=0, head='svm')
    assert [len(split_encoder(enc, t)[0]) for t in ('all', 'layer3+4', 'layer4', 'none')] == [1, 2, 1, 0]
