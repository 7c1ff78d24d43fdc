"""A stop asked for (SIGINT/SIGTERM during `merger run`), seen wherever the run is.

The search loop and the end of a run check it between jobs; lm-eval's model calls check it between
batches (merger.scoring.lm_eval_bridge) and raise `StopRequested`, which is a BaseException so that no
`except Exception` (a candidate's failure policy) mistakes it for a failed candidate. Whatever was in
flight is not recorded, and a resume scores it again.
"""

from __future__ import annotations

import threading

_requested = threading.Event()


class StopRequested(BaseException):
    """Raised between lm-eval batches once a stop was asked for."""


def request_stop() -> None:
    _requested.set()


def clear_stop() -> None:
    _requested.clear()


def stop_requested() -> bool:
    return _requested.is_set()


def check_stop() -> None:
    if _requested.is_set():
        raise StopRequested
