"""demo-sd3: ours std at the default layer on all labelled generations and on the held-out half (bench demo's
split_halves, seed 0), with bootstrap intervals; also the negated score as an orientation check (not a method).

    python benchmarks/demo_sd3_default.py
"""

import numpy as np

from memdetect import Detector
from memdetect.bench.demo import bench_folder, load_demo_set, split_halves
from memdetect.core.metrics import bootstrap_metrics


def main() -> None:
    det = Detector.from_pretrained("demo-sd3", device="cpu")
    data = load_demo_set(bench_folder("demo-sd3"))
    x, y = data.images[data.labelled], data.labels
    s = np.concatenate([det.score_tensor(x[i:i + 64])["std"] for i in range(0, len(x), 64)])
    _, held = split_halves(y)
    for name, part in (("all", np.arange(len(y))), ("held", held)):
        b = bootstrap_metrics(y[part], s[part], n_boot=1000)
        print(name, int(y[part].sum()), int((1 - y[part]).sum()), "auroc", b["auroc"], "tpr", b["tpr"])
        b = bootstrap_metrics(y[part], -s[part], n_boot=1000)
        print(name, "negated std (not a method, orientation check)", b["auroc"], b["tpr"])


if __name__ == "__main__":
    main()
