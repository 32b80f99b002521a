"""Labels for the latent ground-truth models (demo-sd, demo-dit) against VAE reconstructions of their training images.

An exact latent copy of a training image decodes to decode(encode(x)), not to x; with the small VAE trained here
(round-trip Pearson median 0.97) such copies can fall into the excluded band of the pixel labels. This script labels
the shipped generations both ways (same rule: memorized >= 0.95, generalized < 0.80, flip-, shift- and
colour-cast-invariant correlation, as the shipped labels) and reports the label counts and the std AUROC /
TPR@1%FPR at the family's default layer under each. The shipped labels are not changed by it.

    python benchmarks/latent_labels.py demo-sd      # needs ../shared/data/datasets/cifar10-jpg
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from diffusers import AutoencoderKL

from memdetect import Detector
from memdetect.bench.labels import LabelRule
from memdetect.core.metrics import bootstrap_metrics
from memdetect.models.presets import packaged
from memdetect.core.similarity import nearest_match

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gt_common import load_cifar_train  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "datasets" / "cifar10-jpg" / "cifar10-jpg.tar.gz"


def main() -> None:
    model = sys.argv[1]
    bench = Path(packaged(model.replace("-", "_") + "_bench"))
    mdir = Path(packaged(model))
    man = pd.read_csv(bench / "manifest.csv")
    grades = pd.read_csv(bench / "grades.csv")
    samples = torch.from_numpy(np.load(bench / "samples.npz")["samples"])
    cifar, names, _ = load_cifar_train(DATA)
    assert [names[i] for i in grades["train_index"]] == grades["name"].tolist()
    train = torch.from_numpy(cifar[grades["train_index"].to_numpy()])
    del cifar
    vae = AutoencoderKL.from_pretrained(mdir / "vae").eval()
    recon = []
    with torch.no_grad():
        for s in range(0, len(train), 256):
            x = train[s:s + 256].float() / 127.5 - 1
            y = vae.decode(vae.encode(x).latent_dist.mode()).sample
            recon.append(((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    recon = torch.cat(recon)
    rt = np.array([np.corrcoef(a.float().flatten(), b.float().flatten())[0, 1] for a, b in zip(train[:500], recon[:500])])
    m_raw = nearest_match(samples, train, colour="cast")  # the shipped labels' similarity
    m_rec = nearest_match(samples, recon, colour="cast")
    rule = LabelRule()
    lab_raw = np.array([rule.label(float(v)) for v in m_raw.similarity])
    lab_rec = np.array([rule.label(float(v)) for v in m_rec.similarity])
    assert (lab_raw == man["label"].to_numpy()).all(), "raw labels differ from the shipped manifest"
    det = Detector.from_pretrained(model, device="cpu")
    scores = np.concatenate([det.score_tensor(samples[s:s + 128])["std"] for s in range(0, len(samples), 128)])
    out = {"model": model, "n": len(samples), "vae_roundtrip_pearson_median_500": float(np.median(rt))}
    for name, lab, m in (("raw", lab_raw, m_raw), ("reconstructions", lab_rec, m_rec)):
        use = np.isin(lab, ["memorized", "generalized"])
        y = (lab[use] == "memorized").astype(int)
        b = bootstrap_metrics(y, scores[use], n_boot=1000)
        g = pd.Series([grades["grade"].iloc[int(i)] for i in m.index])[lab == "memorized"].value_counts().to_dict()
        out[name] = {"counts": {k: int((lab == k).sum()) for k in ("memorized", "generalized", "excluded")},
                     "memorized_by_nearest_grade": g, "std_auroc": str(b["auroc"]), "std_tpr_at_1pct_fpr": str(b["tpr"])}
    print(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
