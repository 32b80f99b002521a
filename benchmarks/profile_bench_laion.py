"""Where `memdetect bench laion` spends its time on a tiny Stable Diffusion and on SD 1.4's architecture (issue 32).

    python benchmarks/profile_bench_laion.py --workdir /tmp/laion-prof [--steps 50] [--generations 4] [--threads 1]
    python benchmarks/profile_bench_laion.py --workdir /tmp/laion-prof --unet-calls 100 --threads 2
    python benchmarks/profile_bench_laion.py --workdir /tmp/laion-sd14 --sd14 [--configs DIR] --limit 1 \
        --generations 2 --steps 2 --no-cprofile
    python benchmarks/profile_bench_laion.py --workdir /tmp/laion-sd14 --sd14 --parts --steps 1

``--sd14`` builds SD 1.4 from its real configs (``../shared/data/configs/sd14``, ``benchmarks/perf.py``'s
``write_model``: random weights, nothing downloaded) instead of the tiny SD; ``--limit N`` takes N memorized and N
normal prompts, NeMo's statistics then come from the other normal prompts (``--nemo-reference``). Every run prints a
table of the parts (model load, generation, PNG saving, text encoding, each method's scoring, NeMo, the tables) in
wall seconds and in this process's CPU seconds (user + system, ``time.process_time``: on a shared, loaded machine the
wall clock also counts the time other processes held the cores). Times are exclusive: a part called inside another
(text encoding inside NeMo) is counted once, in the inner part. The first prompt runs each scoring method twice (the
bench's untimed warm-up), which the table counts.

``--parts`` calls each part of one prompt's work once on one image instead (``parts_once``): what a whole run
cannot afford on a CPU. The first form builds the tests' tiny SD (``tests/conftest.py::make_tiny_sd``) in WORKDIR, writes the 4 + 4 prompts
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
import functools
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class Parts:
    """Exclusive wall and process-CPU seconds per named part (a part inside another is taken out of the outer)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.stack: list[list[float]] = []  # per open part: [inner wall, inner cpu]

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            w0, c0 = time.perf_counter(), time.process_time()
            self.stack.append([0.0, 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                inner_w, inner_c = self.stack.pop()
                w, c = time.perf_counter() - w0, time.process_time() - c0
                self.wall[name] += w - inner_w
                self.cpu[name] += c - inner_c
                self.calls[name] += 1
                if self.stack:
                    self.stack[-1][0] += w
                    self.stack[-1][1] += c
        return timed

    def table(self, total_wall: float, total_cpu: float) -> str:
        rows = ["| part | calls | wall s | CPU s | share of CPU |", "|---|---|---|---|---|"]
        for name in sorted(self.wall, key=lambda n: -self.cpu[n]):
            rows.append(f"| {name} | {self.calls[name]} | {self.wall[name]:.1f} | {self.cpu[name]:.1f} | "
                        f"{100 * self.cpu[name] / total_cpu:.0f} % |")
        rest_w, rest_c = total_wall - sum(self.wall.values()), total_cpu - sum(self.cpu.values())
        rows.append(f"| everything else | | {rest_w:.1f} | {rest_c:.1f} | {100 * rest_c / total_cpu:.0f} % |")
        rows.append(f"| **total** | | {total_wall:.1f} | {total_cpu:.1f} | 100 % |")
        return "\n".join(rows)


def instrument(parts: Parts) -> None:
    """Wrap the parts of ``run_laion`` where the bench module looks them up (module attributes, at call time)."""
    from memdetect.bench import baselines, paper

    for name, label in [("generate", "generation (sampling + VAE decode)"), ("save_png", "saving PNGs"),
                        ("ours", "ours (scan: VAE encode + early-exit forward)"), ("_ross", "Ross FLIPD (null and prompt condition)"),
                        ("_nemo_scores", "NeMo (value layers; statistics fit untimed by the bench)"),
                        ("_write_tables", "tables: bootstrap intervals, ROC plot"), ("_load", "model load")]:
        setattr(paper, name, parts.wrap(label, getattr(paper, name)))
    for name, label in [("wen_first_step", "Wen first step"), ("carlini_density", "Carlini (tiled L2)"),
                        ("wen_all_steps", "Wen all steps (norms recorded while sampling)")]:
        setattr(baselines, name, parts.wrap(label, getattr(baselines, name)))
    load = paper._load

    def load_and_wrap(*args, **kwargs):
        det = load(*args, **kwargs)
        a = det.adapter
        a.encode_condition = parts.wrap("text encoding (each prompt-using method its own)", a.encode_condition)
        return det

    paper._load = load_and_wrap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--unet-calls", type=int, default=0, help="time this many UNet calls instead of the bench")
    ap.add_argument("--sd14", action="store_true", help="SD 1.4's real architecture with random weights")
    ap.add_argument("--configs", type=Path, default=REPO.parent / "shared" / "data" / "configs")
    ap.add_argument("--limit", type=int, default=None, help="N memorized and N normal prompts")
    ap.add_argument("--no-cprofile", action="store_true", help="the parts table only (no cProfile overhead)")
    ap.add_argument("--parts", action="store_true",
                    help="one call of each part on one image (one prompt, --steps sampling steps) instead of the bench")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import os

    os.environ["MEMDETECT_KEEP_THREADS"] = "1"  # the thread count given here is the one measured
    from tests.conftest import make_tiny_sd
    from tests.test_bench_paper import MEMORIZED, NORMAL

    root = args.workdir
    root.mkdir(parents=True, exist_ok=True)
    if args.sd14:
        from benchmarks.perf import write_model

        sd = root / "sd14"
        if not (sd / ".complete").exists():
            write_model("sd14", args.configs, sd)
    else:
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

    if args.parts:
        return parts_once(sd, args.steps, args.threads, "SD 1.4 architecture, random weights, 512 px" if args.sd14 else "tiny SD")
    from memdetect.bench import nemo_stats
    from memdetect.bench.paper import run_laion

    def no_download(**kwargs):
        raise RuntimeError("no download in a profile")

    nemo_stats.fetch_published = no_download
    n = args.limit or len(MEMORIZED)
    (root / "m.txt").write_text("\n".join(MEMORIZED[:n]))
    (root / "n.csv").write_text("prompt,source\n" + "".join(f'"{p}",coco\n' for p in NORMAL[:n]))
    nemo_ref = None
    if args.limit:  # NeMo needs >= 3 reference prompts: the normal prompts not generated here, and more
        nemo_ref = root / "nemo-ref.csv"
        others = NORMAL[n:] + ["a bowl of soup on a wooden table", "two dogs running on a beach",
                               "a city street at night in the rain"]
        nemo_ref.write_text("prompt,source\n" + "".join(f'"{p}",coco\n' for p in others))
    shutil.rmtree(root / "out", ignore_errors=True)
    parts = Parts()
    instrument(parts)
    t0, c0 = time.perf_counter(), time.process_time()
    prof = None if args.no_cprofile else cProfile.Profile()
    if prof:
        prof.enable()
    run_laion(root / "out", model="sd14", model_path=str(sd), memorized=root / "m.txt", normal=root / "n.csv",
              generations=args.generations, steps=args.steps, guidance=7.5, device="cpu", dtype="float32", seed=0,
              n_boot=1000, nemo_reference=nemo_ref)
    if prof:
        prof.disable()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"wall {wall:.1f} s, process CPU {cpu:.1f} s with {args.threads} torch thread(s); "
          f"{'SD 1.4 architecture, random weights' if args.sd14 else 'tiny SD'}, {n} + {n} prompts x "
          f"{args.generations} generations, {args.steps} steps")
    print(parts.table(wall, cpu))
    if prof:
        prof.dump_stats(root / "profile.out")
        pstats.Stats(prof).sort_stats("cumulative").print_stats(40)


def parts_once(sd: Path, steps: int, threads: int, what: str) -> None:
    """Each part of one LAION prompt's work, called once on one image through the bench's own functions: the text
    encoding, the generation (``steps`` sampling steps with guidance 7.5, then the VAE decode), ours, Wen's first
    step, FLIPD without and with the prompt, Carlini's tiled L2 and NeMo's value layers. No warm-up: each number is a
    first call (the bench times scoring after an untimed warm-up)."""
    import torch

    from memdetect.bench import baselines, paper
    from memdetect.bench.generate import generate

    parts = Parts()
    t0, c0 = time.perf_counter(), time.process_time()
    det = parts.wrap("model load", paper._load)("sd14", str(sd), "laion", paper.processes(), "cpu", "float32")
    a = det.adapter
    a.decode = parts.wrap("VAE decode (1 image)", a.decode)
    a.encode = parts.wrap("VAE encode (inside ours and FLIPD)", a.encode)
    encode = parts.wrap("text encoding (1 prompt)", a.encode_condition)
    prompt = "The No Limits Business Woman Podcast"
    cond = encode([prompt])
    gen = parts.wrap(f"sampling: {steps} step(s) x 2 UNet calls (guidance), 1 image", generate)(
        a, [0], cond=cond, steps=steps, guidance=7.5)
    images = gen.images
    seeds = paper._image_seeds(images, det.seed)
    t_flipd = paper._flipd_timestep(det, None)
    parts.wrap("ours (early-exit forward)", paper.ours)(det, images)
    parts.wrap("Wen first step (2 UNet calls)", baselines.wen_first_step)(a, gen.sample.x_T, gen.sample.first_t, cond)
    parts.wrap("Ross FLIPD, null condition", baselines.flipd)(a, images, t_flipd, seeds, probes=1, cond=None)
    parts.wrap("Ross FLIPD, prompt", baselines.flipd)(a, images, t_flipd, seeds, probes=1, cond=cond)
    parts.wrap("Carlini tiled L2 (pool of 2)", baselines.carlini_density)(torch.cat([images, images.flip(-1)]),
                                                                          neighbours=1)
    values = list(a.cross_attention_values().values())
    parts.wrap("NeMo value layers (1 prompt)", baselines.nemo_activations)(values, cond)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"wall {wall:.1f} s, process CPU {cpu:.1f} s with {threads} torch thread(s); {what}, one image per part, "
          f"{steps} sampling step(s)")
    print(parts.table(wall, cpu))


if __name__ == "__main__":
    main()
