"""Pilot runs behind the demo VAE's recipe: a plain L1 (+ KL) loop on the demo spec's VAE, then a whole 64³ phantom
encoded and decoded, to choose patch size, learning rate and KL weight before the long run (bench/demo/README.md).

    python bench/demo/vae_pilot.py LR KL STEPS PATCH [BATCH]     # phantoms from a recipe work folder

Reads the recipe's phantoms (`/tmp/maisi-demo-recipe/phantoms`, phantoms 1-40 train, phantom 0 is decoded) and the
demo spec with num_splits 1 (the trainer's setting). Prints latent sigma and mean spread, the mean absolute HU error
and the liver and lung medians (reconstructed/true), for a sampled latent and for its mean. One thread.
"""
import sys, time, torch, numpy as np, nibabel as nib
torch.set_num_threads(1); torch.manual_seed(0)
from maisi_cli.models import get_model
from maisi_cli.engine.networks import build_network
def demo_spec_without_splits():
    import json
    import tempfile
    from pathlib import Path

    document = json.loads((Path(__file__).resolve().parents[2] / "maisi_cli/resources/models/demo.json").read_text())
    document["network"]["autoencoder_def"]["num_splits"] = 1
    path = Path(tempfile.mkdtemp()) / "demo1.json"
    path.write_text(json.dumps(document))
    return get_model(str(path))


lr, klw, steps, patch = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]); batch = int(sys.argv[5]) if len(sys.argv) > 5 else 1
spec = demo_spec_without_splits()
vae = build_network(spec, 'autoencoder').train()
vols = []
for k in range(1, 41):
    im = np.asarray(nib.load(f'/tmp/maisi-demo-recipe/phantoms/phantom_{k:04d}_image.nii.gz').dataobj, dtype=np.float32)
    vols.append(torch.from_numpy((np.clip(im, -1000, 1000) + 1000) / 2000))
opt = torch.optim.Adam(vae.parameters(), lr=lr)
rng = np.random.default_rng(0); t0 = time.time()
for step in range(steps):
    xs = []
    for b in range(batch):
        v = vols[rng.integers(len(vols))]; o = rng.integers(0, 64 - patch + 1, 3)
        xs.append(v[o[0]:o[0]+patch, o[1]:o[1]+patch, o[2]:o[2]+patch][None])
    x = torch.stack(xs)
    r, mu, sigma = vae(x)
    kl = 0.5 * torch.sum(mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2)) - 1, dim=[1,2,3,4]).mean()
    loss = (r - x).abs().mean() + klw * kl
    opt.zero_grad(); loss.backward(); opt.step()
vae.eval()
im = np.asarray(nib.load('/tmp/maisi-demo-recipe/phantoms/phantom_0000_image.nii.gz').dataobj, dtype=np.float32)
lb = np.asarray(nib.load('/tmp/maisi-demo-recipe/phantoms/phantom_0000_label.nii.gz').dataobj)
x = torch.from_numpy((np.clip(im, -1000, 1000) + 1000) / 2000)[None, None]
with torch.no_grad():
    mu, sigma = vae.encode(x); rs = vae.decode(vae.sampling(mu, sigma)); rm = vae.decode(mu)
out = []
for r in (rs, rm):
    rec = r[0,0].numpy() * 2000 - 1000
    out.append(f"mae {np.abs(rec-im).mean():.0f} liver {np.median(rec[lb==1]):.0f}/{np.median(im[lb==1]):.0f} lung {np.median(rec[np.isin(lb,[28,29,30,31,32])]):.0f}")
print(f"lr {lr} kl {klw} steps {steps} patch {patch} batch {batch}: sigma {sigma.mean():.3f} mu_std {mu.std():.2f} | sampled {out[0]} | mu {out[1]} | {time.time()-t0:.0f}s", flush=True)
