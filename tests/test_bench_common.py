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
