"""A stop asked for (SIGINT/SIGTERM during `merger run`), seen wherever the run is.

`merger run` installs `StopRequest` first thing, before torch and lm-eval are imported, so a signal at
any moment of a run asks for a stop rather than killing the process.

The search loop and the end of a run check it between jobs; lm-eval's model calls check it between
batches (merger.scoring.lm_eval_bridge) and raise `StopRequested`, which is a BaseException so that no
`except Exception` (a candidate's failure policy) mistakes it for a failed candidate. Whatever was in
flight is not recorded, and a resume scores it again.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

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


class StopRequest:
    """SIGINT/SIGTERM: the first asks the run to stop (`requested`, and merger.common.stopping: the scoring
    in flight ends at its next lm-eval batch, the state on disk is the last checkpoint); a second stops
    now."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        clear_stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        clear_stop()

    def check(self) -> None:
        """`StopRequested` once a stop was asked for."""
        if self.requested:
            raise StopRequested

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        request_stop()
