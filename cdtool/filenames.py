"""File names made from token names: safe on every system people copy exports to.

A token such as `<new1>` cannot name a file on Windows (`<`, `>`, `:`, `"`, `/`, `\\`, `|`, `?`, `*`
and control characters are refused there, and so are names such as `CON` or `aux`). The token
stays inside the file; the file is named after it with those characters left out (`new1`), and
two tokens that would get the same name (also ignoring case, as Windows and macOS compare names)
are told apart by `-2`, `-3`, ... in the order of their token strings, so the same tokens always
get the same names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_WRAPPERS = re.compile(r"[<>]")
_UNSAFE = re.compile(r'[:"/\\|?*\x00-\x1f\s]+')
_RESERVED = {"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(1, 10)}
MAX_STEM = 100


def safe_stem(token: str) -> str:
    """`<new1>` -> `new1`, `<my cat>` -> `my_cat`: a file name stem valid on Windows, macOS and Linux."""
    stem = _UNSAFE.sub("_", _WRAPPERS.sub("", token)).strip("._ ")[:MAX_STEM].rstrip(". ")
    if not stem:
        stem = "token"
    if stem.split(".")[0].lower() in _RESERVED:
        stem = f"{stem}_"
    return stem


def token_stems(tokens: Iterable[str], taken: Iterable[str] = ()) -> dict[str, str]:
    """A distinct safe stem per token (distinct also from `taken`, ignoring case): token -> stem."""
    used = {t.lower() for t in taken}
    out = {}
    for token in sorted(set(tokens)):
        base = safe_stem(token)
        stem, k = base, 1
        while stem.lower() in used:
            k += 1
            stem = f"{base}-{k}"
        used.add(stem.lower())
        out[token] = stem
    return out
