"""Where `memdetect bench laion` spends its time on a tiny Stable Diffusion (issue 32).

    python benchmarks/profile_bench_laion.py --workdir /tmp/laion-prof [--steps 50] [--generations 4] [--threads 1]
    python benchmarks/profile_bench_laion.py --workdir /tmp/laion-prof --unet-calls 100 --threads 2

The first form builds the tests' tiny SD (``tests/conftest.py::make_tiny_sd``) in WORKDIR, writes the 4 + 4 prompts
of ``tests/test_bench_paper.py``, and runs ``memdetect.bench.paper.run_laion`` under cProfile with ``--threads``
torch threads (nothing is downloaded: NeMo falls back to leave-one-out statistics), printing the wall time and the
40 most expensive calls by cumulative time. The second times one UNet call (batch 8, as 4 generations with
classifier-free guidance) with the given thread count. Run it with PYTHONPATH at the checkout to measure; the
numbers and the machine's load are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--unet-calls", type=int, default=0, help="time this many UNet calls instead of the bench")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import os

    os.environ["MEMDETECT_KEEP_THREADS"] = "1"  # the thread count given here is the one measured
    from tests.conftest import make_tiny_sd
    from tests.test_bench_paper import MEMORIZED, NORMAL

    root = args.workdir
    root.mkdir(parents=True, exist_ok=True)
    sd = root / "tiny-sd"
    if not sd.exists():
        make_tiny_sd(sd)
    if args.unet_calls:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(sd / "unet").eval()
        x, cond, t = torch.randn(8, 4, 8, 8), torch.randn(8, 77, 16), torch.tensor(500)
        with torch.no_grad():
            for _ in range(5):
                unet(x, t, cond)
            t0 = time.perf_counter()
            for _ in range(args.unet_calls):
                unet(x, t, cond)
        print(f"threads={args.threads}: {(time.perf_counter() - t0) / args.unet_calls * 1000:.2f} ms per UNet call")
        return

    from memdetect.bench import nemo_stats
    from memdetect.bench.paper import run_laion

    def no_download(**kwargs):
        raise RuntimeError("no download in a profile")

    nemo_stats.fetch_published = no_download
    (root / "m.txt").write_text("\n".join(MEMORIZED))
    (root / "n.csv").write_text("prompt,source\n" + "".join(f'"{p}",coco\n' for p in NORMAL))
    shutil.rmtree(root / "out", ignore_errors=True)
    t0 = time.perf_counter()
    prof = cProfile.Profile()
    prof.enable()
    run_laion(root / "out", model="sd14", model_path=str(sd), memorized=root / "m.txt", normal=root / "n.csv",
              generations=args.generations, steps=args.steps, guidance=7.5, device="cpu", dtype="float32", seed=0,
              n_boot=1000)
    prof.disable()
    print(f"wall {time.perf_counter() - t0:.1f} s with {args.threads} torch thread(s)")
    prof.dump_stats(root / "profile.out")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main()
