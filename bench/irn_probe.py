"""Probe: what the IRN decoder can draw from a trained model's U4 maps (the encoder fixed).

Computes U4 of two drone views of every training place and one query view of every test place,
then reports the test reconstruction error (MSE against the satellite image at its nearest turn,
what ``rec_turns=4`` scores) of the training mean image, of the model's own decoder, and of a
fresh decoder trained alone on the U4 maps for STEPS steps at each learning rate; draws test
views, the model's and the fresh decoders' reconstructions and the targets into OUT_PNG.

    python bench/irn_probe.py runs/demo/model runs/demo/data 400 1e-3,3e-3 [OUT_PNG]
"""

import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from imlnet.data.layout import list_images, list_subfolders
from imlnet.data.transforms import denormalize
from imlnet.inference import load_model, read_image
from imlnet.losses.reconstruction import reconstruction_loss
from imlnet.models.irn import IRNDecoder
from imlnet.models.units import UnitFeatures

torch.set_num_threads(2)
torch.manual_seed(0)
model_dir, data = sys.argv[1], Path(sys.argv[2])
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 300
lrs = [float(x) for x in (sys.argv[4] if len(sys.argv) > 4 else "1e-3,3e-3").split(",")]
out_png = sys.argv[5] if len(sys.argv) > 5 else "runs/irn_probe.png"
loaded = load_model(model_dir, device="cpu")
m = loaded.model.eval()


def pairs(drone_root: Path, satellite_root: Path, per_place: int):
    """The first ``per_place`` drone views of every place, each with its satellite image."""
    drone, satellite = [], []
    for place in list_subfolders(drone_root):
        views = list_images(drone_root / place)[:per_place]
        drone += views
        satellite += [list_images(satellite_root / place)[0]] * len(views)
    return drone, satellite


@torch.no_grad()
def maps(paths):
    out = []
    for i in range(0, len(paths), 128):
        x = torch.stack([loaded.transform(read_image(p)) for p in paths[i : i + 128]])
        out.append(m.encoder.forward_units(x).maps[3])
    return torch.cat(out)


@torch.no_grad()
def imgs(paths):
    return torch.stack([loaded.transform(read_image(p)) for p in paths])


t = time.perf_counter()
trd, trs = pairs(data / "train" / "drone", data / "train" / "satellite", 2)
ted, tes = pairs(data / "test" / "query_drone", data / "test" / "gallery_satellite", 1)
Ftr, Fte = maps(trd), maps(ted)
Str, Ste = imgs(trs), imgs(tes)
print(f"features {Ftr.shape} {Fte.shape} in {time.perf_counter() - t:.0f}s", flush=True)


def U(u4: torch.Tensor) -> UnitFeatures:
    """What the decoder reads of the units: U4 (Lite0 keeps no pooling indices)."""
    return UnitFeatures((None, None, None, u4), None, None)  # type: ignore[arg-type]


@torch.no_grad()
def test_loss(dec):
    dec.eval()
    return float(reconstruction_loss(dec(U(Fte[:256])), Ste[:256], 4))


mean_img = Str.mean(0, keepdim=True)
print(
    "constant (train mean) test loss",
    float(reconstruction_loss(mean_img.expand_as(Ste[:256]), Ste[:256], 4)),
)
print("trained decoder test loss", test_loss(m.irn))
# input dependence of the trained decoder: std over samples of outputs
with torch.no_grad():
    out = m.irn(U(Fte[:64]))
print(
    "trained decoder output std over samples",
    float(out.std(0).mean()),
    "targets",
    float(Ste[:64].std(0).mean()),
)

decs = {}
for lr in lrs:
    torch.manual_seed(0)
    dec = IRNDecoder(m.encoder.channels, maxpool_indices=False)
    opt = torch.optim.AdamW(dec.parameters(), lr=lr, weight_decay=1e-4)
    t = time.perf_counter()
    for step in range(steps):
        dec.train()
        idx = torch.randint(0, len(Ftr), (64,))
        loss = reconstruction_loss(dec(U(Ftr[idx])), Str[idx], 4)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 99 or step == steps - 1:
            print(
                f"lr {lr} step {step + 1} train {loss.item():.4f} test {test_loss(dec):.4f} "
                f"({time.perf_counter() - t:.0f}s)",
                flush=True,
            )
    decs[lr] = dec

rows = [("drone", imgs(ted[:6])), ("trained IRN", m.irn(U(Fte[:6])).detach())]
for lr, dec in decs.items():
    dec.eval()
    rows.append((f"decoder alone lr {lr}", dec(U(Fte[:6])).detach()))
rows.append(("satellite", Ste[:6]))
fig, ax = plt.subplots(len(rows), 6, figsize=(12, 2.1 * len(rows)))
for r, (name, x) in enumerate(rows):
    for c in range(6):
        ax[r, c].imshow(denormalize(x[c]).permute(1, 2, 0).numpy())
        ax[r, c].axis("off")
    ax[r, 0].set_title(name, loc="left", fontsize=9)
fig.tight_layout()
fig.savefig(out_png, dpi=70)
