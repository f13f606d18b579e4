"""Helpers shared by the benchmarks: run a command, measure wall time and peak memory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass


@dataclass
class Run:
    seconds: float
    peak_rss_mb: float
    peak_gpu_mb: float  # 0 without an NVIDIA GPU
    returncode: int
    stderr: str


def _gpu_used_mb() -> float:
    """GPU memory held by all compute processes now (the benchmarks run one child at a time)."""
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
    ).stdout
    return float(sum(int(x) for x in out.split() if x.isdigit()))


# Runs the command as its own child and reports that child's peak RSS. Linux records the old memory
# image's high-water mark on exec, so a command forked straight from this (possibly large) process
# would report at least this process's footprint; forked from this small wrapper it reports its own
# (plus the wrapper's few MB), as GNU time does.
_WRAPPER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write(f"\\nMAXRSS_KB={usage.ru_maxrss}\\n")
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def measure(cmd: list[str], env: dict[str, str] | None = None) -> Run:
    """Run `cmd` in a child process: wall time, its own peak RSS and, with an NVIDIA GPU, the peak GPU
    memory nvidia-smi reports (polled every 0.1 s; what the process holds, CUDA context and allocator
    cache included)."""
    peak_gpu, done = [0.0], threading.Event()

    def poll() -> None:
        while not done.wait(0.1):
            peak_gpu[0] = max(peak_gpu[0], _gpu_used_mb())

    poller = threading.Thread(target=poll, daemon=True) if shutil.which("nvidia-smi") else None
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRAPPER, *cmd],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, **(env or {})},
        )
        if poller:
            poller.start()
        proc.wait()
        seconds = time.perf_counter() - start
        done.set()
        if poller:
            poller.join()
        err.seek(0)
        stderr = err.read()
    lines = stderr.strip().splitlines()
    peak = next((int(x.split("=")[1]) for x in reversed(lines) if x.startswith("MAXRSS_KB=")), 0)
    if proc.returncode != 0:
        sys.stderr.write(stderr)
        raise SystemExit(f"benchmark step failed: {' '.join(cmd)}")
    return Run(seconds, peak / 1024, peak_gpu[0], proc.returncode, stderr)


@dataclass
class Rate:
    """Steps per second from repeated (S steps, 2S steps) pairs of whole runs."""

    median: float | None  # None when the pairs cannot measure it
    low: float | None  # the slowest and fastest pair
    high: float | None
    startup_s: float | None  # t(S) - S / rate, the time from command to the first step (median)
    why: str = ""  # what made it unmeasurable


def pair_rate(short: list[float], long: list[float], steps: int, min_share: float = 0.2) -> Rate:
    """steps / (t(2S) - t(S)) per pair, start-up cancelled. A pair whose difference is under
    `min_share` of its t(S) is start-up noise (S steps take too little time to see): the rate is
    then refused, with the reason, rather than printed as a huge number."""
    if not short or len(short) != len(long):
        raise ValueError("need as many S-step runs as 2S-step runs")
    diffs = [b - a for a, b in zip(short, long, strict=True)]
    bad = [(d, a) for d, a in zip(diffs, short, strict=True) if d < min_share * a]
    if bad:
        d, a = bad[0]
        return Rate(None, None, None, None, f"t(2S) - t(S) = {d:.2f} s against t(S) = {a:.2f} s: raise --steps")
    rates = sorted(steps / d for d in diffs)
    med = _median(rates)
    startup = _median([a - steps / med for a in short])
    return Rate(med, rates[0], rates[-1], startup)


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2
