"""Overhead of memdetect.guard vs the unguarded pipeline, interleaved, same batch (demo-sd, CPU)."""
import sys, time
from pathlib import Path
import torch
from diffusers import DDIMScheduler
import memdetect
from memdetect.guarding import load_guardable
import pandas as pd
from memdetect.models.presets import packaged
reps, steps, bs = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
pipe, _ = load_guardable("demo-sd", device="cpu", dtype="float32")
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
guarded = memdetect.guard(pipe, threshold=None)
prompts = pd.read_csv(Path(packaged("demo-sd")) / "normal_prompts.csv")["prompt"].tolist()[:bs]
kw = dict(prompt=prompts, num_inference_steps=steps, guidance_scale=7.5, output_type="np")
plain, guard, gsec = [], [], []
for r in range(reps + 1):
    t = time.perf_counter(); pipe(generator=torch.Generator().manual_seed(r), **kw); a = time.perf_counter() - t
    t = time.perf_counter(); o = guarded(generator=torch.Generator().manual_seed(r), **kw); b = time.perf_counter() - t
    if r:  # first pair is warm-up
        plain.append(a); guard.append(b); gsec.append(o.guard.seconds)
    print(f"rep {r}: pipe {a:.2f}s guarded {b:.2f}s guard.seconds {o.guard.seconds:.3f}", flush=True)
import statistics as st
print(f"median pipe {st.median(plain):.2f}s guarded {st.median(guard):.2f}s overhead {100*(st.median(guard)/st.median(plain)-1):+.1f}% "
      f"guard.seconds median {st.median(gsec):.3f}s")
