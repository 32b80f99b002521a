"""Cache the pooled activations of the *selection half* of a ground-truth model (issue 29, the rule study).

Only the selection half of ``split_halves`` (seed 0, stratified) is captured: the study of selection rules
(``benchmarks/rule_study.py``) reads this file and nothing else, so it cannot look at held-out-half numbers.

python benchmarks/rule_features.py --model demo-dit --output /tmp/rule29/demo-dit.npz
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from memdetect.bench.demo import bench_folder, load_demo_set, split_halves
from memdetect.detector import Detector
from memdetect.workflows.select import DEFAULT_TIMESTEPS, candidate_layers, capture_features


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--batch-size", type=int, default=None)
    a = ap.parse_args()
    data = load_demo_set(bench_folder(a.model))
    labels, images = data.labels, data.images[data.labelled]
    sel, _ = split_halves(labels, 0.5, 0)
    det = Detector.from_pretrained(a.model, device="cpu", dtype="float32", prune=False)
    layers = candidate_layers(det)
    steps = list(dict.fromkeys([*DEFAULT_TIMESTEPS, int(det.timestep)]))
    start = time.perf_counter()
    feats = capture_features(det, images[sel], layers=layers, timesteps=steps, batch_size=a.batch_size)
    out = {f"{layer}|{t}": v.numpy().astype(np.float32) for (layer, t), v in feats.items()}
    np.savez(a.output, labels=labels[sel], grades=data.grades[sel].astype(str), positions=sel,
             default=np.array([str(det.layer), str(int(det.timestep)), det.metric]), **out)
    print(f"{a.model}: {len(sel)} selection-half images, {len(layers)} layers x {len(steps)} timesteps in "
          f"{time.perf_counter() - start:.0f} s -> {a.output}", flush=True)


if __name__ == "__main__":
    main()
