"""Helpers shared by the benchmarks: run a command, measure wall time and peak memory."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass


@dataclass
class Run:
    seconds: float
    peak_rss_mb: float
    returncode: int
    stderr: str


def measure(cmd: list[str], env: dict[str, str] | None = None) -> Run:
    """Run `cmd` in a child process under GNU time: wall time and the child's own peak RSS."""
    start = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "MAXRSS_KB=%M", *cmd],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    seconds = time.perf_counter() - start
    lines = proc.stderr.strip().splitlines()
    peak = next((int(x.split("=")[1]) for x in reversed(lines) if x.startswith("MAXRSS_KB=")), 0)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"benchmark step failed: {' '.join(cmd)}")
    return Run(seconds, peak / 1024, proc.returncode, proc.stderr)
