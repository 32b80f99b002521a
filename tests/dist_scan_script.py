"""``memdetect`` as one torchrun rank, for tests/test_largescan.py (not collected: no ``test_`` prefix).

With ``MEMDETECT_TEST_DIE_AFTER_BATCHES=K`` and ``MEMDETECT_TEST_DIE_RANK=R``, rank R is SIGKILLed right after its
K-th scored batch has been journaled: a preempted node, mid-scan.
"""

import os
import signal
import sys

die_after = int(os.environ.get("MEMDETECT_TEST_DIE_AFTER_BATCHES", "0"))
if die_after and os.environ.get("RANK") == os.environ.get("MEMDETECT_TEST_DIE_RANK"):
    from memdetect.store import journal
    append = journal.Journal.append
    seen = {"batches": 0}

    def append_then_die(self, records):
        append(self, records)
        seen["batches"] += 1
        if seen["batches"] >= die_after:
            os.kill(os.getpid(), signal.SIGKILL)

    journal.Journal.append = append_then_die

from memdetect.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
