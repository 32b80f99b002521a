"""What searching by content costs `memdetect audit` (issue 30 family): resolving a folder of many small files that
are not images, by suffix only (``--suffix-only``, ``scan``'s search) and by content too (``audit``'s default).

    python benchmarks/sniff_cost.py --files 20000

Writes FILES small files without an image suffix (code and text, 200 to 4,000 bytes; 100 a folder) plus one 64 MB
log file, then times ``memdetect.store.sources.resolve`` on the folder REPEAT times each way (page cache warm: every run
after a first untimed one) and counts the bytes the process read (``/proc/self/io`` ``rchar``: bytes returned by
read system calls; listing folders is not counted). Prints one JSON line per way: seconds (median, min), per file,
bytes read in all and per file, images found. Then the same for a tar shard of those files (one member each, the
64 MB log included), where the suffix-only search reads every member header anyway.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tarfile
import tempfile
import time
from pathlib import Path


def _rchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return 0


def make_tree(root: Path, files: int) -> None:
    body = b"def f(x):\n    return x + 1  # a line of code\n"
    for k in range(files):
        d = root / f"pkg{k // 100:04d}"
        if k % 100 == 0:
            d.mkdir(parents=True)
        name = ("mod%05d.py", "notes%05d.md", "data%05d.json", "LICENSE%05d")[k % 4] % k
        (d / name).write_bytes(body * (4 + k % 80))
    with open(root / "big.log", "wb") as f:  # one large file: still only its first bytes are read
        f.truncate(64 * 2**20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    from memdetect.store.sources import resolve

    tmp = Path(tempfile.mkdtemp(prefix="memdetect-sniff-"))
    try:
        make_tree(tmp / "pr", args.files)
        n = args.files + 1
        with tarfile.open(tmp / "pr.tar", "w") as tar:
            tar.add(tmp / "pr", arcname="pr")
        for what, sniff in ((tmp / "pr", False), (tmp / "pr", True), (tmp / "pr.tar", False), (tmp / "pr.tar", True)):
            resolve([what], sniff=sniff)  # untimed: the page cache and the dentry cache warm
            times, reads = [], []
            for _ in range(args.repeat):
                r0, t0 = _rchar(), time.perf_counter()
                items = resolve([what], sniff=sniff)
                times.append(time.perf_counter() - t0)
                reads.append(_rchar() - r0)
            print(json.dumps({"input": "tar" if what.suffix else "folder",
                              "search": "content" if sniff else "suffix-only", "files": n,
                              "seconds_median": round(statistics.median(times), 4), "seconds_min": round(min(times), 4),
                              "us_per_file": round(statistics.median(times) / n * 1e6, 2),
                              "bytes_read": int(statistics.median(reads)),
                              "bytes_read_per_file": round(statistics.median(reads) / n, 2),
                              "images_found": len(items)}), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
