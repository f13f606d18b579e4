"""DreamBench (Ruiz et al. 2023): a parser for the dataset's own `prompts_and_classes.txt`, so
cdtool can sample its prompts without shipping a copy of them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cdtool.errors import CdtoolError

LIVE_CLASSES = ("cat", "dog")  # the benchmark's live subjects are its pets
_PROMPT = re.compile(r"""^\s*(['"])(.*?)\1\s*\.format\(\s*unique_token\s*,\s*class_token\s*\)""")


@dataclass
class DreamBench:
    classes: dict[str, str]  # subject name -> class noun
    object_prompts: list[str]  # templates with {0} (token) and {1} (class)
    live_prompts: list[str]

    def prompts(self, subject: str, token: str) -> tuple[str, list[str]]:
        """(class noun, the subject's prompts with the token filled in)."""
        if subject not in self.classes:
            raise CdtoolError(f"DreamBench has no subject {subject!r}; subjects: {', '.join(sorted(self.classes))}")
        noun = self.classes[subject]
        templates = self.live_prompts if noun in LIVE_CLASSES else self.object_prompts
        return noun, [t.format(token, noun) for t in templates]


def parse(path: Path) -> DreamBench:
    """Read prompts_and_classes.txt: a `subject_name,class` table, then the object and the live
    subject prompt lists."""
    if not path.is_file():
        raise CdtoolError(f"{path}: no such file (DreamBench's dataset/prompts_and_classes.txt)")
    classes: dict[str, str] = {}
    lists: dict[str, list[str]] = {"object": [], "live": []}
    section = None
    for line in path.read_text(encoding="utf-8").splitlines():
        low = line.strip().lower()
        if low.startswith("object prompts"):
            section = "object"
        elif low.startswith("live subject prompts"):
            section = "live"
        elif low == "classes":
            section = "classes"
        elif section == "classes" and "," in line and not low.startswith("subject_name"):
            name, _, noun = line.partition(",")
            classes[name.strip()] = noun.strip()
        elif section in lists:
            m = _PROMPT.match(line)
            if m:
                lists[section].append(m.group(2))
    if not classes or not lists["object"] or not lists["live"]:
        raise CdtoolError(f"{path}: not DreamBench's prompts_and_classes.txt (classes and both prompt lists expected)")
    return DreamBench(classes, lists["object"], lists["live"])
