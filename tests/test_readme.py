"""The README's first cdtool snippet runs as written, on the built-in toy model, in an empty folder.

bash reads the snippet from README.md itself (so the two cannot drift) with `cdtool` a shell function
that records each command line as the shell expanded it; the test then runs those command lines in
order, in this process (one interpreter start instead of one per command), with the few steps and
images the snippet's variables allow.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from cdtool.delta.importers import read_delta

README = Path(__file__).resolve().parent.parent / "README.md"
RECORD = 'n=0\ncdtool() { n=$((n + 1)); printf "%s\\0" "$@" > "$CDTOOL_RECORD/$(printf %03d $n)"; }\n'


def snippets() -> list[str]:
    """The README's shell snippets that run cdtool (the set-up's `make` lines are not among them)."""
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    return [b for b in blocks if re.search(r"^cdtool ", b, flags=re.M)]


def command_lines(snippet: str, folder: Path, env: dict[str, str]) -> list[list[str]]:
    """Each `cdtool ...` of the snippet as bash expands it: its argument list."""
    record = folder / ".record"
    record.mkdir()
    subprocess.run(
        ["bash", "-euo", "pipefail", "-c", RECORD + snippet],
        cwd=folder,
        env={**os.environ, **env, "CDTOOL_RECORD": str(record)},
        check=True,
    )
    return [f.read_bytes().decode().split("\0")[:-1] for f in sorted(record.iterdir())]


def test_the_first_snippet_runs_as_written(cli, tmp_path, monkeypatch):
    snippet = snippets()[0]
    assert "--model toy" in snippet
    lines = command_lines(snippet, tmp_path, {"STEPS": "2", "REG": "2", "N": "1", "SAMPLE_STEPS": "2"})
    assert [line[0] for line in lines] == [
        "demo", "prep", "prep", "regset", "regset", "train", "train", "merge", "compress", "sample", "score", "export",
    ]  # fmt: skip
    monkeypatch.chdir(tmp_path)
    for line in lines:
        cli(*line)
    merged = read_delta(tmp_path / "shapes.r16.safetensors")
    assert set(merged.tokens) == {"<new6>", "<new7>"} and merged.base_model == "toy"
    prompts = json.loads((tmp_path / "out" / "prompts.json").read_text())
    assert set(prompts.values()) == {"a <new6> circle and a <new7> square on a blue background"}
    assert (tmp_path / "out" / "grid.png").is_file()
    assert (tmp_path / "circle.run" / "loss.png").is_file() and (tmp_path / "circle.run" / "samples.png").is_file()
    assert sorted(p.name for p in (tmp_path / "shapes-lora").iterdir()) == [
        ".cdtool-output.json", "README.md", "new6.safetensors", "new7.safetensors",
        "pytorch_lora_weights.safetensors",
    ]  # fmt: skip


def test_the_stable_diffusion_snippet_is_the_same_job():
    """The second snippet runs the same commands on Stable Diffusion 1.5 (it needs the model, so here
    only its command list is checked against the first's)."""
    first, second = snippets()[:2]
    assert "M=stable-diffusion-v1-5/stable-diffusion-v1-5" in second
    commands = [re.findall(r"^cdtool (\S+)", s, flags=re.M) for s in (first, second)]
    assert commands[1] == [c for c in commands[0] if c != "demo"]


def test_the_set_up_commands_are_make_targets():
    """The README's set-up section names `make demo` and `make test`, and the Makefile has both."""
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    targets = [m for b in blocks for m in re.findall(r"^make (\S+)", b, flags=re.M)]
    makefile = (README.parent / "Makefile").read_text(encoding="utf-8")
    assert targets == ["demo", "test"]
    assert all(re.search(rf"^{t}:", makefile, flags=re.M) for t in targets)
