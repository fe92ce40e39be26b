"""Timing calls against each other: round-robin, in alternating order, in bursts.

On shared cores the load changes while candidates are timed; taking turns, in
an order reversed every round, makes a change hit every candidate alike.
Calls shorter than `BURST_S` are timed in bursts, above the clock's noise.

Example:
>>> timers = {"a": timed(lambda: sum(range(100))), "b": timed(lambda: None, burst=3)}
>>> seconds = round_robin(timers, rounds=4)
>>> {name: len(times) for name, times in seconds.items()}
{'a': 4, 'b': 4}
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)

BURST_S = 0.1  # a timing at least this long, in calls of the same thing


def timed(fn: Callable[[], Any], burst: int = 1) -> Callable[[], float]:
    """A timer: calling it runs `fn` `burst` times and returns the seconds of one call.

    `fn` must wait for its result (e.g. bring a value to the host), or it
    times only the dispatch.
    """
    def timer() -> float:
        start = time.perf_counter()
        for _ in range(burst):
            fn()
        return (time.perf_counter() - start) / burst

    return timer


def burst_size(seconds: float) -> int:
    """Calls of `seconds` each that make a timing of at least `BURST_S`.

    Example:
    >>> burst_size(0.003), burst_size(2.0)
    (34, 1)
    """
    return max(1, math.ceil(BURST_S / max(seconds, 1e-6)))


def round_robin(timers: dict[K, Callable[[], float]], rounds: int,
                more: Callable[[int, float], bool] | None = None) -> dict[K, list[float]]:
    """Each timer's seconds over `rounds` rounds, in an order reversed every round.

    Compile and warm up first: every round counts. With `more`, rounds go on
    while `more(rounds_done, last_round_seconds)` is true.

    Args:
        timers: name → a callable returning the seconds it measured (`timed`).
        rounds: int. Rounds at least (each timer once per round).
        more: callable or None. Asked after `rounds` rounds. Defaults to None.

    Returns:
        name → one entry of seconds per round.
    """
    seconds: dict[K, list[float]] = {name: [] for name in timers}
    order = list(timers)
    done, round_s = 0, 0.0
    while done < rounds or (more is not None and more(done, round_s)):
        start = time.perf_counter()
        for name in order if done % 2 == 0 else order[::-1]:
            seconds[name].append(timers[name]())
        done, round_s = done + 1, time.perf_counter() - start
    return seconds
