"""Clocks for benchmarks: wall-clock medians on any device, device time on CUDA.

``median_time(fn, reps)`` is the one wall clock: ``warmup`` untimed calls, then ``reps`` timed
calls, each between two device synchronisations when ``device`` is CUDA (so the time covers the
kernels the call launched), and the median (shared machines stall single calls by 100s of ms;
the median ignores them). ``median_times`` compares several callables *interleaved* (fn1, fn2, ...,
fn1, ...), so that load from other processes hits them alike. ``DeviceTimer`` measures device
time without host overhead on CUDA (a CUDA graph of back-to-back calls replayed between an event
pair, or plain events when capture fails) and falls back to the wall clock elsewhere.
pytest-benchmark keeps its own clock in the ``bench/`` suites; these are for scripts and
experiments.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

__all__ = ["DeviceTimer", "median_time", "median_times", "sync", "time_calls"]


def sync(device: str | torch.device | None = None) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU or when ``device`` is None."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], reps: int, warmup: int = 1,
               device: str | torch.device | None = None) -> list[float]:
    """Wall seconds of each of ``reps`` calls of ``fn()`` after ``warmup`` untimed calls."""
    if reps < 1:
        raise ValueError(f"time_calls: reps must be >= 1, got {reps}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def median_time(fn: Callable[[], object], reps: int, warmup: int = 1,
                device: str | torch.device | None = None) -> float:
    """Median wall seconds of one call of ``fn()`` (see ``time_calls``)."""
    return statistics.median(time_calls(fn, reps, warmup, device))


def median_times(fns: dict, reps: int, warmup: int = 1, device: str | torch.device | None = None) -> dict:
    """``{name: median wall seconds}`` of each callable in ``fns``, the callables *interleaved*
    (fn1, fn2, ..., fn1, ...) so that load from other processes on a shared machine hits them alike."""
    if reps < 1:
        raise ValueError(f"median_times: reps must be >= 1, got {reps}")
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


class DeviceTimer:
    """``timer(fn) -> {"ms": device ms per call, "eager_ms": wall ms per eager call, "how": ...}``.

    On CUDA, ``calls`` back-to-back calls are captured in one CUDA graph and replayed between an
    event pair (``how="graph"``), or run eagerly between the events when capture fails (a host sync,
    an allocation the pool refuses: ``how="events"``); ``ms`` is the median of ``reps`` replays
    divided by ``calls``. ``eager_ms`` is the wall time per eager call, host overhead included. On
    any other device both are the wall time per call (``how="wall"``).
    """

    def __init__(self, device: str, calls: int = 10, reps: int = 10):
        if calls < 1 or reps < 1:
            raise ValueError(f"DeviceTimer: calls and reps must be >= 1, got calls={calls}, reps={reps}")
        self.device, self.calls, self.reps = device, calls, reps

    def eager_ms(self, fn: Callable[[], object]) -> float:
        """Wall ms per call over ``calls`` back-to-back eager calls, after one warm-up call."""
        fn()
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(self.calls):
            fn()
        sync(self.device)
        return (time.perf_counter() - t0) * 1e3 / self.calls

    def __call__(self, fn: Callable[[], object]) -> dict:
        eager = self.eager_ms(fn)
        if torch.device(self.device).type != "cuda":
            return {"ms": eager, "eager_ms": eager, "how": "wall"}
        how, run = "events", lambda: [fn() for _ in range(self.calls)]
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(self.calls):
                    fn()
            graph.replay()
            how, run = "graph", graph.replay
        except Exception:  # not capturable: time the eager calls between events
            torch.cuda.synchronize()
        times = []
        for _ in range(self.reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / self.calls)
        return {"ms": statistics.median(times), "eager_ms": eager, "how": how}
