"""compass_kernels.benchmarking.timers on a fake clock: what is timed, how often, which median."""

from __future__ import annotations

import pytest

from compass_kernels.benchmarking import timers


class FakeClock:
    """perf_counter that only moves when a timed function runs: each call of ``step(name)`` advances
    it by the next duration listed for ``name``."""

    def __init__(self, durations: dict):
        self.now, self.durations, self.calls = 0.0, {k: list(v) for k, v in durations.items()}, []

    def perf_counter(self):
        return self.now

    def step(self, name):
        self.calls.append(name)
        self.now += self.durations[name].pop(0)


@pytest.fixture
def clock(monkeypatch):
    def make(durations):
        c = FakeClock(durations)
        monkeypatch.setattr(timers.time, "perf_counter", c.perf_counter)
        return c
    return make


def test_median_time_skips_warmup_and_takes_the_median(clock):
    c = clock({"f": [100.0, 5.0, 1.0, 3.0]})                     # the first call is the warm-up
    assert timers.time_calls(lambda: c.step("f"), reps=3, warmup=1) == [5.0, 1.0, 3.0]
    c = clock({"f": [100.0, 5.0, 1.0, 3.0, 4.0]})
    assert timers.median_time(lambda: c.step("f"), reps=4, warmup=1) == 3.5   # mean of the middle two
    assert c.calls == ["f"] * 5


def test_median_times_interleaves(clock):
    c = clock({"a": [9.0, 1.0, 2.0, 30.0], "b": [9.0, 4.0, 6.0, 5.0]})
    t = timers.median_times({"a": lambda: c.step("a"), "b": lambda: c.step("b")}, reps=3, warmup=1)
    assert c.calls == ["a", "b"] * 4
    assert t == {"a": 2.0, "b": 5.0}


def test_device_timer_on_cpu_is_the_wall_clock(clock):
    c = clock({"f": [7.0] + [0.002] * 4})
    t = timers.DeviceTimer("cpu", calls=4, reps=3)(lambda: c.step("f"))
    assert t["how"] == "wall" and t["ms"] == t["eager_ms"] == pytest.approx(2.0)   # ms per call
    assert len(c.calls) == 5                                     # one warm-up, then the calls


def test_sync_is_a_no_op_off_cuda():
    timers.sync(None)
    timers.sync("cpu")


@pytest.mark.parametrize("call", [
    lambda: timers.time_calls(lambda: None, reps=0),
    lambda: timers.median_times({"a": lambda: None}, reps=0),
    lambda: timers.DeviceTimer("cpu", calls=0),
])
def test_bad_repetitions_are_named(call):
    with pytest.raises(ValueError, match="reps|calls"):
        call()
