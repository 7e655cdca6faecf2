"Multi-crop on the built-in data: k-NN / mAP after pretraining SimCLR, and training images/s, with and without 4 local views.
`python scripts/bench_multicrop.py EPOCHS OUT` (run it alone: a timing taken while another job runs is void)."
import json, sys, time
from pathlib import Path
import torch
from fgssl_nb.cli import pretrain_run, evaluate_run
from fgssl_nb.bench import timed_fit
from fgssl_nb.data import read_dataset, ssl_dls
from fgssl_nb.learner import ssl_learner
epochs, out = int(sys.argv[1]), Path(sys.argv[2])
rows = []
for lv in (0, 4):
    run = out / f'simclr_local{lv}'
    t0 = time.perf_counter()
    pretrain_run('simclr', 'default', epochs=epochs, out=run, views='hue', knn=False, progress=False, **({'local_views': lv} if lv else {}))
    secs = time.perf_counter() - t0
    m = evaluate_run(run, protocols=('knn', 'retrieval'))
    dls = ssl_dls(read_dataset('default'), size=64, bs=64)
    ips = max(timed_fit(ssl_learner(dls, 'simclr', views='hue', local_views=lv), 6, 2) for _ in range(2))
    rows.append(dict(local_views=lv, knn_top1=m.get('knn_top1'), rank1=m.get('retrieval_rank1'), mAP=m.get('retrieval_map'), images_per_s=ips, pretrain_s=secs))
    print(rows[-1], flush=True)
print(json.dumps(rows, indent=1))
