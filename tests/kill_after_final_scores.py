"""`python tests/kill_after_final_scores.py N run RECIPE ...`: the real `merger` command, which SIGKILLs
itself right after the ledger has committed its Nth final score: a kill at a known point of the
finish phase, with no timing involved."""

from __future__ import annotations

import os
import signal
import sys

from merger import cli
from merger.rundir.ledger import FinalScore, Ledger


def main() -> int:
    limit = int(sys.argv[1])
    record = Ledger.record_final_score
    recorded = 0

    def record_then_die(ledger: Ledger, score: FinalScore) -> None:
        nonlocal recorded
        record(ledger, score)
        recorded += 1
        if recorded >= limit:
            os.kill(os.getpid(), signal.SIGKILL)

    Ledger.record_final_score = record_then_die  # type: ignore[method-assign]
    return cli.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
