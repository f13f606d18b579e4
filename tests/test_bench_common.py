"""The benchmarks' measuring helper: a child's own wall time and peak memory, failures loud."""

from __future__ import annotations

import sys

import pytest

from benchmarks.common import measure


def test_measure_reads_the_childs_own_peak_memory():
    small = measure([sys.executable, "-c", "pass"])
    big = measure([sys.executable, "-c", "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])"])
    assert big.returncode == 0 and big.seconds > 0
    # the 300 MiB the second child touched, not this process's own footprint
    assert big.peak_rss_mb - small.peak_rss_mb > 250
    assert small.peak_rss_mb < 250


def test_a_failing_step_stops_the_benchmark(capsys):
    with pytest.raises(SystemExit, match="benchmark step failed"):
        measure([sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"])
    assert "boom" in capsys.readouterr().err


def test_pair_rate_is_the_median_pair_and_cancels_startup():
    from benchmarks.common import pair_rate

    # 10 steps/s with 4 s start-up, one slow pair
    short = [6.0, 6.1, 5.9]
    long = [8.0, 8.1, 9.9]
    r = pair_rate(short, long, 20)
    assert r.median == pytest.approx(10.0) and r.low == pytest.approx(5.0) and r.high == pytest.approx(10.0)
    assert r.startup_s == pytest.approx(4.0)


def test_pair_rate_refuses_what_it_cannot_measure():
    from benchmarks.common import pair_rate

    # t(2S) - t(S) near zero: a noisy machine, not 4e10 steps/s
    r = pair_rate([12.0, 12.0], [12.3, 12.0000000001], 40)
    assert r.median is None and r.why.startswith("t(2S) - t(S) = 0.30 s against t(S) = 12.00 s")
    with pytest.raises(ValueError):
        pair_rate([1.0], [], 10)
