"""`cdtool --help`, `--version` and a command's `--help` start without torch or the model libraries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "diffusers", "transformers", "open_clip", "safetensors", "PIL")
# `python -m cdtool ARGS`, then the heavy modules it imported, as the last line of stdout
PROBE = f"""
import runpy, sys
sys.argv = ["cdtool", *sys.argv[1:]]
try:
    runpy.run_module("cdtool", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
LIGHT_COMMANDS = [
    "prep",
    "regset",
    "train",
    "sample",
    "score",
    "get-deltas",
    "merge",
    "compress",
    "export",
    "info",
    "demo",
]


@pytest.mark.parametrize("args", [["--help"], ["--version"], *([c, "--help"] for c in LIGHT_COMMANDS)], ids=" ".join)
def test_help_and_version_import_no_model_library(args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, timeout=300, check=True
    )
    assert done.stdout.splitlines()[-1] == "[]", done.stdout[-500:]


def test_the_probe_sees_an_import():
    """The probe itself: a command that does load torch is reported."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = PROBE.replace("except SystemExit:\n    pass\n", "except SystemExit:\n    pass\nimport torch\n")
    done = subprocess.run(
        [sys.executable, "-c", code, "--version"], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.stdout.splitlines()[-1] == "['torch']"
