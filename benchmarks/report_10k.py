"""How long an audit of 10,000 images takes to write its HTML page, and how large the page is.

    python benchmarks/report_10k.py --config memdetect.toml --work /tmp/report-10k

Writes 10,000 PNGs under ``--work`` (the 140 demo images, each copy with its own +-2 noise so no two are the same
file), audits them with the demo model and the config (from ``memdetect calibrate examples/demo-reference --model
demo``), then times what ``--html`` adds: the evidence of the top 20 flagged images and the page. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def make_images(folder: Path, n: int) -> None:
    src = [p for d in ("demo", "demo-reference") for p in sorted((REPO / "examples" / d).glob("*.png"))]
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.png"))) >= n:
        return
    rng = np.random.default_rng(0)
    arrs = [np.asarray(Image.open(p).convert("RGB"), np.int16) for p in src]
    for i in range(n):
        a = arrs[i % len(arrs)] + rng.integers(-2, 3, arrs[0].shape)
        Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(folder / f"{src[i % len(src)].stem}_{i:05d}.png")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--work", default="/tmp/report-10k")
    ap.add_argument("-n", type=int, default=10_000)
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    from memdetect import Detector
    from memdetect.workflows import evidence
    from memdetect.workflows.ci import audit
    from memdetect.config import load_config
    from memdetect.workflows.html_report import write_html
    from memdetect.store.io import display_path

    work = Path(args.work)
    make_images(work / "images", args.n)
    cfg = load_config(args.config)
    det = Detector.from_pretrained(cfg.model, cfg.model_path, device="cpu", threshold=cfg.threshold)
    t0 = time.perf_counter()
    done = audit(det, [work / "images"], output=work / "report.csv", annotations="none", num_workers=0,
                 state_dir=work / "state", reference=cfg.reference_for(cfg.metric))
    t1 = time.perf_counter()
    res = done.result
    files = {display_path(f): f for f in res.files}
    ev = evidence.collect(det, res.frame, files, top=args.top, reference=cfg.reference_for(cfg.metric),
                          channels=cfg.channels)
    t2 = time.perf_counter()
    page = write_html(res.frame, work / "report.html", res.settings_dict, files=files, evidence=ev)
    t3 = time.perf_counter()
    print(json.dumps({"images": len(res.frame), "flagged": int(done.summary["flagged"]), "scan_s": round(t1 - t0, 1),
                      "evidence_s": round(t2 - t1, 2), "write_html_s": round(t3 - t2, 2),
                      "html_s": round(t3 - t1, 2), "html_bytes": page.stat().st_size}))


if __name__ == "__main__":
    main()
