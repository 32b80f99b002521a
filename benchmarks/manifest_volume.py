"""What a large manifest costs before the first image is scored (issue 30, point 9).

    python benchmarks/manifest_volume.py --rows 1000000

Writes a CSV manifest of ROWS distinct rows (``img/0000000.png`` ...; the first is a real image, the others do not
exist: they would be error rows), loads the demo model, then times ``memdetect.workflows.scan.scan`` on the manifest up to
the end of its first scored batch (the scan is stopped there) and measures the peak resident memory of that phase
(Linux: the peak is reset through ``/proc/self/clear_refs`` after the model is loaded, then read from ``VmHWM``).
Prints one JSON line: rows, seconds, rows per second, peak RSS above the loaded model (MB) and bytes per row.
Run it with PYTHONPATH pointing at the checkout to measure (an older one gives the "before" numbers).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class _Stop(Exception):
    pass


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from memdetect import Detector
    from memdetect.workflows.scan import scan

    tmp = Path(tempfile.mkdtemp(prefix="memdetect-manifest-"))
    try:
        (tmp / "img").mkdir()
        shutil.copy(REPO / "examples" / "demo" / "gen_0000.png", tmp / "img" / "0000000.png")
        manifest = tmp / "manifest.csv"
        with open(manifest, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "caption"])
            for i in range(args.rows):
                w.writerow([f"img/{i:07d}.png", f"sample {i}"])
        det = Detector.from_pretrained("demo", device="cpu", batch_size=16)
        base = _rss_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM (the peak) to the current RSS
            f.write("5")

        def first_batch(done: int, total: int) -> None:
            raise _Stop

        t0 = time.perf_counter()
        try:
            scan(det, [manifest], num_workers=0, on_batch=first_batch)
        except _Stop:
            pass
        seconds = time.perf_counter() - t0
        peak = _rss_kb("VmHWM") - base
        print(json.dumps({"rows": args.rows, "seconds": round(seconds, 2),
                          "rows_per_s": round(args.rows / seconds), "peak_rss_mb": round(peak / 1024, 1),
                          "bytes_per_row": round(peak * 1024 / args.rows), "python": sys.version.split()[0]}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
