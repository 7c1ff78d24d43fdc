"""A circuit breaker per pool member: who is worth trying now."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from merger.router.pool import BreakerSettings

log = logging.getLogger("merger.conductor")


@dataclass
class _MemberHealth:
    failures: deque[float] = field(default_factory=deque)
    open_until: float = 0.0
    on_probation: bool = False  # cooled down after opening: the next failure reopens at once


class CircuitBreaker:
    """N failures within `window_s` open a member's circuit for `cooldown_s`. After the cooldown the member
    is tried again; one more failure reopens it at once, one success closes it. A member that answers 429
    with Retry-After is left alone that long (at most `max_retry_after_s`)."""

    def __init__(
        self, settings: BreakerSettings, names: Sequence[str], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.clock = clock
        self._health = {name: _MemberHealth() for name in names}

    def available(self, name: str) -> bool:
        return self.clock() >= self._health[name].open_until

    def record_success(self, name: str) -> None:
        self._health[name] = _MemberHealth()

    def record_failure(self, name: str, retry_after_s: float | None = None) -> None:
        health, now = self._health[name], self.clock()
        health.failures.append(now)
        while health.failures and now - health.failures[0] > self.settings.window_s:
            health.failures.popleft()
        if retry_after_s is not None:
            pause = min(retry_after_s, self.settings.max_retry_after_s)
            health.open_until = max(health.open_until, now + pause)
            log.warning("member %s: asked to retry after %.0fs; circuit open that long", name, pause)
        elif health.on_probation or len(health.failures) >= self.settings.failures:
            health.open_until = now + self.settings.cooldown_s
            health.failures.clear()
            health.on_probation = True
            log.warning("member %s: circuit open for %.0fs", name, self.settings.cooldown_s)

    def state(self) -> dict[str, dict[str, Any]]:
        return {
            name: {
                "state": "closed" if self.available(name) else "open",
                "recent_failures": len(health.failures),
            }
            for name, health in self._health.items()
        }
