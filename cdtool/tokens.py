"""Modifier tokens: validation, initialiser resolution, and a trainable-rows embedding."""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any

import torch

from cdtool.errors import CdtoolError, UsageError

# The reference initialisers for the 1st, 2nd and 3rd concept: rare pieces of the CLIP vocabulary.
# They are looked up as vocabulary entries (ids 42170, 47629, 43514 in CLIP's vocabulary, as the
# official CompVis code hard-codes them), not by tokenising the words: "ktn" as text becomes two
# pieces, and the diffusers script's `tokenizer.encode([...])` lookup crashes under transformers 5.
DEFAULT_INIT = ("ktn", "pll", "ucd</w>")


def default_init_token(index: int) -> str:
    if index >= len(DEFAULT_INIT):
        raise UsageError(f"concept {index + 1}: there are default initialiser tokens for 3 concepts; give --init-token")
    return DEFAULT_INIT[index]


def resolve_init_token(tokenizer: Any, text: str) -> int:
    """The vocabulary id a modifier token is initialised from. The default initialisers are the
    reference's vocabulary entries (see DEFAULT_INIT); any other text is read as the word a prompt
    would write, as diffusers' textual inversion script reads its initializer (`dog` is the piece
    `dog</w>`), and failing that as a vocabulary entry (`ktn`, which as text is two pieces)."""
    vocab = tokenizer.get_vocab()
    if text in DEFAULT_INIT and text in vocab:
        return int(vocab[text])
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) == 1:
        return int(ids[0])
    if text in vocab:
        return int(vocab[text])
    raise CdtoolError(f"initialiser token {text!r} is {len(ids)} vocabulary pieces; choose a word that is one piece")


MAX_TOKEN_LENGTH = 100


def token_name_problem(token: str) -> str | None:
    """What is wrong with `token` as a token name, or None. Token names are data from strangers
    (delta files, concept.json) and become file names (`<new1>.safetensors`): one word of printable
    characters, no path separator, not starting with a dot."""
    if not token.strip():
        return "is empty"
    if len(token) > MAX_TOKEN_LENGTH:
        return f"is longer than {MAX_TOKEN_LENGTH} characters"
    if any(c.isspace() for c in token):
        return "holds white space"
    if any(unicodedata.category(c).startswith("C") for c in token):
        return "holds control characters"
    if "/" in token or "\\" in token:
        return "holds a path separator"
    if token.startswith("."):
        return "starts with a dot"
    return None


def check_token_name(token: str, source: str | Path) -> None:
    """Refuse a token name read from `source` (a file) that could not be a token (see token_name_problem)."""
    problem = token_name_problem(token)
    if problem:
        raise CdtoolError(f"{source}: token name {token!r} {problem}; a token is one word such as <new1>")


def check_new_token(tokenizer: Any, token: str) -> None:
    """A modifier token must be a valid name (token_name_problem) and not already mean something."""
    from cdtool.apply import is_existing_word

    problem = token_name_problem(token)
    if problem:
        raise UsageError(f"token {token!r} {problem}; use one word such as <new1>")
    if is_existing_word(tokenizer, token):
        raise CdtoolError(f"token {token!r} already exists in the vocabulary; use a new one such as <new1>")


class TokenRows(torch.nn.Module):
    """The embedding rows of the new tokens, trained alone: a hook on the frozen embedding table
    replaces the rows of new-token ids, so every other row stays bit-identical (AdamW's weight
    decay on the whole table, as in the reference, would change them)."""

    def __init__(self, init: torch.Tensor, first_id: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(init.clone().float())
        self.first_id = first_id

    def hook(self, _module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        ids = args[0]
        new = ids >= self.first_id
        if not bool(new.any()):
            return output
        rows = self.weight.to(output.dtype)[(ids - self.first_id).clamp_min(0)]
        return torch.where(new[..., None], rows, output)


def attach_token_rows(encoder: Any, init: torch.Tensor, first_id: int) -> TokenRows:
    """Register TokenRows as a submodule of the text encoder (so wrappers such as DDP see its
    parameter) and hook it into the token embedding."""
    rows = TokenRows(init, first_id)
    encoder.add_module("cdtool_token_rows", rows)
    encoder.get_input_embeddings().register_forward_hook(rows.hook)
    return rows
