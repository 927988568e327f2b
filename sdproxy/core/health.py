"""Pure: a node's health state machine (up, down, disabled) and its probe cooldown.

::

    up ──failure (request or probe)──▶ down ──probe succeeds──▶ up
                                       │ ▲
                                       └─┘ probe fails: cooldown grows (base x 2^(n-1), capped)

    disable (by hand) ▶ disabled: takes no work; still probed, so its up/down stays known
    enable  (by hand) ▶ back to the up/down it was in, probed at once

Clocks are arguments (Unix seconds): the same calls give the same states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

NodeState = Literal["up", "down", "disabled"]


def cooldown_s(failures: int, base_s: float, max_s: float) -> float:
    """Seconds to wait before probing a node after ``failures`` failures in a row."""
    if failures <= 0:
        return 0.0
    # Past 2^60 the float overflows long before the cap matters; stop doubling early.
    return min(max_s, base_s * 2.0 ** min(failures - 1, 60))


@dataclass
class NodeHealth:
    """What sdproxy believes about one node's health, and when to look again."""

    cooldown_base_s: float = 2.0
    cooldown_max_s: float = 60.0
    up: bool = False
    disabled: bool = False
    reason: str = "not probed yet"  # why the node is in its state, for /cluster/status
    consecutive_failures: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    last_down_at: float | None = None  # when a failure last marked it down
    last_ok_at: float | None = None
    next_probe_at: float | None = None  # a down node is not probed before this

    @property
    def state(self) -> NodeState:
        if self.disabled:
            return "disabled"
        return "up" if self.up else "down"

    @property
    def state_reason(self) -> str:
        return "disabled by hand" if self.disabled else self.reason

    @property
    def usable(self) -> bool:
        """The node may be given work."""
        return self.up and not self.disabled

    def record_ok(self, now: float) -> bool:
        """A call succeeded; True if the node was down and is now back."""
        came_back = not self.up
        self.up = True
        self.consecutive_failures = 0
        self.last_ok_at = now
        self.next_probe_at = None
        if came_back:
            self.reason = "answered"
        return came_back

    def record_failure(self, error: str, now: float, *, probe: bool) -> bool:
        """A call failed; the node is down until a probe succeeds. True if it was up."""
        went_down = self.up
        self.up = False
        self.consecutive_failures += 1
        self.last_error = error
        self.last_error_at = now
        self.last_down_at = now
        self.reason = "probe failed" if probe else "a request failed"
        wait = cooldown_s(self.consecutive_failures, self.cooldown_base_s, self.cooldown_max_s)
        self.next_probe_at = now + wait
        return went_down

    def note_error(self, error: str, now: float) -> None:
        """An error that does not take the node out (a job raised): shown in the status."""
        self.last_error = error
        self.last_error_at = now

    def probe_due(self, now: float) -> bool:
        """A down node is probed once its cooldown has passed."""
        return self.next_probe_at is None or now >= self.next_probe_at

    def disable(self) -> None:
        self.disabled = True

    def enable(self, now: float) -> None:
        """Back into service; probe at once so a stale 'down' does not linger."""
        self.disabled = False
        self.next_probe_at = now
