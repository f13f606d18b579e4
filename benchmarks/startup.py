"""Start-up: how long `cdtool --help`, `cdtool COMMAND --help` and `cdtool --version` take, beside
huggingface_hub's `hf --help` in the same run.

    python benchmarks/startup.py [--repeats 7]

Each command runs in a fresh process, all of them in turn, `--repeats` rounds (the first round
warms the file cache and is not counted); reports the median wall time, the range and the peak RSS.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import measure


def commands() -> dict[str, list[str]]:
    """The commands compared, found beside this Python (the venv's entry points)."""
    bin_dir = Path(sys.executable).parent
    cdtool = str(bin_dir / "cdtool") if (bin_dir / "cdtool").exists() else shutil.which("cdtool")
    hf = str(bin_dir / "hf") if (bin_dir / "hf").exists() else shutil.which("hf")
    if cdtool is None or hf is None:
        raise SystemExit("needs the cdtool and hf entry points (pip install -e . installs both)")
    return {
        "cdtool --help": [cdtool, "--help"],
        "cdtool train --help": [cdtool, "train", "--help"],
        "cdtool merge --help": [cdtool, "merge", "--help"],
        "cdtool --version": [cdtool, "--version"],
        "hf --help": [hf, "--help"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7, help="rounds of every command (the first is not counted)")
    args = ap.parse_args()
    cmds = commands()
    times: dict[str, list[float]] = {k: [] for k in cmds}
    peaks: dict[str, float] = dict.fromkeys(cmds, 0.0)
    for round_ in range(max(args.repeats, 2)):
        for name, cmd in cmds.items():
            run = measure(cmd)
            if round_ > 0:
                times[name].append(run.seconds)
                peaks[name] = max(peaks[name], run.peak_rss_mb)
    hf = statistics.median(times["hf --help"])
    print("| command | wall s (median; range) | peak RSS MB | vs `hf --help` |")
    print("| --- | ---: | ---: | ---: |")
    for name in cmds:
        t = times[name]
        med = statistics.median(t)
        print(f"| `{name}` | {med:.2f} ({min(t):.2f}-{max(t):.2f}) | {peaks[name]:.0f} | {med / hf:.2f}x |")
    print(f"\n{len(times['hf --help'])} counted rounds each")


if __name__ == "__main__":
    main()
