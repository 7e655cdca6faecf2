"""Does the joint phase keep what the decoder warm-up taught? (system 2, `synth-moco` from an ImageNet start)

    python scripts/decoder_joint.py DATA EPOCHS "NAME|{options}" ...

One warm-up (5 epochs, MSE + perceptual, on cached features of the frozen ImageNet EfficientNet-Lite0, 96 px), then
for each variant: the warmed-up model, EPOCHS joint epochs of synth-moco (variance criterion, nu 0.1, L_R kept out of the
encoder, perceptual 1) with the variant's options, and the decoder's fidelity on the test split (`pair_fidelity`:
k-NN top-1 of the decoded test images against the training features). Example (the run quoted in 20_synth_pairs):

    python scripts/decoder_joint.py ../shared/data/cars40 1 "x10|{'decoder_lr_mult': 10.}" "x1|{'decoder_lr_mult': 1.}" "x0.1|{'decoder_lr_mult': 0.1}"
"""
import ast, copy, sys, time
from fastai.torch_core import set_seed
from fgssl_nb.data import read_dataset, ssl_dls
from fgssl_nb.learner import ssl_learner
from fgssl_nb.synth import fidelity_data, pair_fidelity, select_dims, noise_std

BASE = dict(rec_to_encoder=False, nu=0.1, perceptual=1.0, criterion='variance')


def learner(ds, **kw):
    set_seed(0)
    dls = ssl_dls(ds, size=96, bs=64, num_workers=0, verify=None)
    return ssl_learner(dls, 'synth-moco', arch='efficientnet_lite0', pretrained=True, **{**BASE, **kw})


def fidelity(learn, ds, dims, var) -> dict:
    enc = learn.model.encoder
    m, _ = pair_fidelity(enc, learn.model.decoder, fidelity_data(enc, ds, 96), dims, std=noise_std(var, 'dim'))
    return m


if __name__ == '__main__':
    data, epochs = sys.argv[1], int(sys.argv[2])
    variants = [(v.split('|', 1)[0], ast.literal_eval(v.split('|', 1)[1])) for v in sys.argv[3:]]
    ds = read_dataset(data)
    t0 = time.time()
    l0 = learner(ds, decoder_warmup=5)
    l0.synth_pairs.warm_up(l0.model)
    warm = copy.deepcopy(l0.model.state_dict())
    fd = fidelity_data(l0.model.encoder, ds, 96)
    var = fd['train_f'].var(0, unbiased=False)
    dims = select_dims(0.25, 'variance', var=var)
    m = fidelity(l0, ds, dims, var)
    print(f"after warm-up ({time.time() - t0:.0f} s): decoded k-NN top-1 {m['decoder_knn_top1']:.3f} (input {m['decoder_knn_top1_input']:.3f}, "
          f"chance {m['decoder_chance']:.3f}), PSNR {m['decoder_psnr']:.2f}", flush=True)
    for name, kw in variants:
        t0 = time.time()
        l = learner(ds, **kw); l.model.load_state_dict(warm); l.synth_pairs.warmed = True
        with l.no_bar(): l.fit_one_cycle(epochs, l.run_state.default_lr, pct_start=0.1)
        m = fidelity(l, ds, dims, var)
        print(f"{name} ({time.time() - t0:.0f} s): decoded k-NN top-1 {m['decoder_knn_top1']:.3f} (input {m['decoder_knn_top1_input']:.3f}), "
              f"PSNR {m['decoder_psnr']:.2f}; last log row {[round(x, 3) for x in l.recorder.values[-1]]}", flush=True)
