"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU): what each process computes, saved per rank.
Usage: ddp_worker.py OUT DATA"""
import sys
from pathlib import Path
import torch, torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from fastai.torch_core import set_seed
from fgssl_nb.distributed import init_distributed, rank, world_size, gather_nograd
from fgssl_nb.simclr import nt_xent, multicrop_nt_xent
from fgssl_nb.vicreg import vicreg_terms, vicreg_total
from fgssl_nb.distributed import gather_with_grad
from fgssl_nb.synth import FeatureStats, SynthPairs
from fgssl_nb.dino import update_center

B, D_IN = 8, 10
RUN_METHODS = dict(simclr=2, moco=2, **{'synth-moco': 2}, byol=1, simsiam=1, vicreg=1, dino=1, jigsaw=1)  # method: epochs


def toy():  # BN-free: every process computes exactly what one process would
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, 16), nn.ReLU(), nn.Linear(16, 8))


def inputs(n_views=2):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(B, D_IN, generator=g) for _ in range(n_views)]


def naive_gather(z):  # the common bug: other ranks' blocks without gradient, own block with it
    parts = list(gather_nograd(z).chunk(world_size()))
    parts[rank()] = z
    return torch.cat(parts)


def naive_nt_xent(z1, z2, t=0.5):  # the one-process formula on the gathered batch, averaged over this rank's anchors
    import torch.nn.functional as F
    z1, z2 = naive_gather(z1), naive_gather(z2)
    n, r, m = B // world_size(), rank(), len(z1)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = (z @ z.T / t).masked_fill(torch.eye(2 * m, dtype=torch.bool), float('-inf'))
    target = torch.cat([torch.arange(m, 2 * m), torch.arange(m)])
    own = torch.cat([torch.arange(r * n, (r + 1) * n), torch.arange(m + r * n, m + (r + 1) * n)])
    return F.cross_entropy(sim[own], target[own])


def loss_and_grads(loss_fn, n_views=2):
    "Loss (averaged over processes) and DDP-averaged parameter gradients of `loss_fn(*embeddings of this rank's images)`."
    model = DDP(toy())
    n, r = B // world_size(), rank()
    zs = [model.module(x[r * n:(r + 1) * n]) for x in inputs(n_views)[1:]]
    loss = loss_fn(model(inputs(n_views)[0][r * n:(r + 1) * n]), *zs)
    loss.backward()
    l = loss.detach().clone(); torch.distributed.all_reduce(l); l /= world_size()
    return dict(loss=l, grads=[p.grad.clone() for p in model.parameters()])


def collectives(out: Path):
    res = dict(simclr=loss_and_grads(nt_xent), naive=loss_and_grads(naive_nt_xent),
               multicrop=loss_and_grads(lambda *zs: multicrop_nt_xent(list(zs), [(0, 1), (0, 2), (1, 2)]), 3),
               vicreg=loss_and_grads(lambda z1, z2: vicreg_total(vicreg_terms(gather_with_grad(z1), gather_with_grad(z2)))))
    g = torch.Generator().manual_seed(2)
    hs = [torch.randn(B, 5, generator=g) * torch.arange(1, 6) + 3 for _ in range(2)]
    n, r = B // world_size(), rank()
    fs = FeatureStats(5)
    for h in hs: fs.update(h[r * n:(r + 1) * n])
    res['feat_stats'] = dict(mean=fs.mean.clone(), var=fs.var.clone())
    center = torch.zeros(1, 5); update_center(center, hs[0][r * n:(r + 1) * n], 0.9)
    res['center'] = center
    # what fgssl_nb.distributed's subclasses fix on a machine without CUDA
    from fastai.distributed import DistributedDL
    from fgssl_nb.distributed import FgsslDistributedDL
    try: res['fastai_broadcast'] = DistributedDL._broadcast(None, [rank() + 1, 2, 3], 0)
    except Exception as e: res['fastai_broadcast'] = f"{type(e).__name__}: {e}"
    res['our_broadcast'] = FgsslDistributedDL._broadcast(None, [rank() + 1, 2, 3], 0)
    try: DDP(nn.SyncBatchNorm(3))(torch.randn(4, 3)); res['syncbn'] = 'ok'
    except Exception as e: res['syncbn'] = f"{type(e).__name__}: {e}"
    torch.save(res, out / f'collectives{rank()}.pt')


def runs(out: Path, data: Path):
    from fgssl_nb.data import read_dataset, ssl_dls
    from fgssl_nb.learner import ssl_learner, pretrain
    ds = read_dataset(data)
    for method in RUN_METHODS:
        set_seed(rank())
        dls = ssl_dls(ds, size=32, bs=4, seed=0, num_workers=0)
        learn = ssl_learner(dls, method, precision='fp32', run_dir=out / method, queue_size=16) if 'moco' in method else \
                ssl_learner(dls, method, precision='fp32', run_dir=out / method)
        pretrain(learn, RUN_METHODS[method], run_dir=out / method, progress=False)
        synth = [c for c in learn.cbs if isinstance(c, SynthPairs)]
        torch.save(dict(model=learn.model.state_dict(), dims=synth[0].last_dims if synth else None,
                        n_batches=len(dls.train)), out / method / f'rank{rank()}.pt')


if __name__ == '__main__':
    out, data = Path(sys.argv[1]), Path(sys.argv[2])
    assert init_distributed() == 2, 'run me with torchrun --nproc_per_node 2'
    collectives(out)
    runs(out, data)
