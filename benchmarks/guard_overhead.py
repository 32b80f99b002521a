"""Overhead of ``memdetect.guard`` against the unguarded pipeline on ``demo-sd`` (CPU): one batch of normal prompts,
``pipe(...)`` and ``guarded(...)`` with the same seed, repeated, the order alternating between pairs (so neither
always runs second); the first pair is a warm-up.

    python benchmarks/guard_overhead.py REPEATS STEPS BATCH      # e.g. 3 50 8
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from diffusers import DDIMScheduler

import memdetect
from memdetect.workflows.guarding import load_guardable
from memdetect.models.presets import packaged


def main() -> None:
    reps, steps, bs = (int(a) for a in sys.argv[1:4])
    pipe, _ = load_guardable("demo-sd", device="cpu", dtype="float32")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    guarded = memdetect.guard(pipe, threshold=None)
    prompts = pd.read_csv(Path(packaged("demo-sd")) / "normal_prompts.csv")["prompt"].tolist()[:bs]
    kw = dict(prompt=prompts, num_inference_steps=steps, guidance_scale=7.5, output_type="np")
    plain, guard, own = [], [], []
    for r in range(reps + 1):
        timed = {}
        for which in (("pipe", "guarded") if r % 2 else ("guarded", "pipe")):
            t = time.perf_counter()
            res = (pipe if which == "pipe" else guarded)(generator=torch.Generator().manual_seed(r), **kw)
            timed[which] = time.perf_counter() - t
            if which == "guarded":
                out = res
        a, b = timed["pipe"], timed["guarded"]
        if r:  # the first pair is a warm-up
            plain.append(a)
            guard.append(b)
            own.append(out.guard.seconds)
        print(f"rep {r}: pipe {a:.2f}s guarded {b:.2f}s guard.seconds {out.guard.seconds:.3f}", flush=True)
    med = statistics.median
    print(f"median pipe {med(plain):.2f}s guarded {med(guard):.2f}s overhead {100 * (med(guard) / med(plain) - 1):+.1f}% "
          f"guard.seconds median {med(own):.3f}s")


if __name__ == "__main__":
    main()
