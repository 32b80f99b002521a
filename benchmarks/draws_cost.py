"""Seconds per image of the scan path for K noise draws (``--draws K``), K interleaved and repeated.

For each model: the default detector (early exit, pruned, the family's CPU batch size), 256 of the model's shipped
generations, ``Detector.score_tensor`` batch by batch; K = 1, 2, 4 in turn, ``--repeats`` rounds, one untimed
warm-up per K. Prints the median seconds per image of each K and its ratio to K = 1.

    OMP_NUM_THREADS=1 python benchmarks/draws_cost.py --model demo demo-sd demo-dit demo-edm
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from memdetect import Detector
from memdetect.bench.demo import bench_folder, load_demo_set


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", nargs="+", default=["demo"])
    ap.add_argument("--draws", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    print(f"torch threads {torch.get_num_threads()}")
    print("| model | batch | " + " | ".join(f"K={k} s/image (x K=1)" for k in args.draws) + " |")
    print("|---|---|" + "---|" * len(args.draws))
    for model in args.model:
        dets = {k: Detector.from_pretrained(model, device="cpu", dtype="float32", draws=k) for k in args.draws}
        images = load_demo_set(bench_folder(model)).images[: args.images]
        bs = dets[args.draws[0]].batch_size
        times: dict[int, list[float]] = {k: [] for k in args.draws}
        for det in dets.values():
            det.score_tensor(images[:bs])  # warm-up
        for _ in range(args.repeats):
            for k, det in dets.items():
                t0 = time.perf_counter()
                for i in range(0, len(images), bs):
                    det.score_tensor(images[i:i + bs])
                times[k].append((time.perf_counter() - t0) / len(images))
        med = {k: float(np.median(v)) for k, v in times.items()}
        base = med[args.draws[0]]
        print(f"| {model} | {bs} | " + " | ".join(f"{med[k]:.4f} ({med[k] / base:.2f})" for k in args.draws) + " |")


if __name__ == "__main__":
    main()
