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
