"""When the scheduler's idle hook runs our pool and admission-counter checks: once per idle
period, after it has lasted a while (they read the whole location map, and SGLang calls
on_idle on every pass of its idle loop)."""

from __future__ import annotations

from sglang_kvc.patches.scheduler import IdleCheckTimer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_checks_run_once_per_idle_period_after_the_delay():
    clock = Clock()
    timer = IdleCheckTimer(delay_s=1.0, clock=clock)
    assert not timer.due(forward_ct=5)  # the server just went idle
    clock.now += 0.5
    assert not timer.due(forward_ct=5)  # a request arriving now is not kept waiting by them
    clock.now += 0.6
    assert timer.due(forward_ct=5)
    clock.now += 10
    assert not timer.due(forward_ct=5)  # once per period
    assert not timer.due(forward_ct=9)  # forwards ran: a new period starts
    clock.now += 1.0
    assert timer.due(forward_ct=9)
