"""Modifier tokens: validation, initialiser resolution, adding tokens with their embedding rows, and
a trainable-rows embedding."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cdtool.delta.file import Delta
from cdtool.errors import CdtoolError, UsageError

if TYPE_CHECKING:
    from cdtool.models.conditioning import TextSide

# The default initialisers: rare pieces of the CLIP vocabulary, looked up as vocabulary entries (not
# by tokenising the words: "ktn" as text becomes two pieces, and the diffusers script's
# `tokenizer.encode([...])` lookup crashes under transformers 5). The first three are the reference's
# (ids 42170, 47629, 43514, as the official CompVis code hard-codes them); the others are further
# three-letter pieces among CLIP's last merges (ids above 48000), chosen to carry no common meaning.
DEFAULT_INIT = (
    "ktn", "pll", "ucd</w>", "hta</w>", "rcn</w>", "waj</w>", "omd</w>", "ulf</w>",
    "pgs</w>", "gsp</w>", "ucn</w>", "ccu</w>", "wbo</w>", "dru</w>", "ofi</w>", "afs</w>",
)  # fmt: skip
_NEW_K = re.compile(r"^<new([1-9][0-9]*)>$")


def token_names(token: str, n_vectors: int) -> list[str]:
    """The tokenizer entries of a token with n vectors (diffusers' textual-inversion convention)."""
    return [token] + [f"{token}_{i}" for i in range(1, n_vectors)]


def is_existing_word(tokenizer: Any, token: str) -> bool:
    """True when `token` is already in the vocabulary or encodes to one existing piece."""
    if token in tokenizer.get_vocab():
        return True
    ids = tokenizer(token, add_special_tokens=False).input_ids
    return len(ids) == 1 and ids[0] < tokenizer.vocab_size


def identifier_problem(tokenizer: Any, token: str) -> str | None:
    """What keeps `token` from being a DreamBooth identifier, or None: the identifier is an existing
    word of the vocabulary that a prompt writes as exactly one token (its embedding row is used as
    it is, never trained), so "sks" is one and "<new1>" (four pieces) is not."""
    problem = token_name_problem(token)
    if problem:
        return problem
    ids = tokenizer(token, add_special_tokens=False).input_ids
    if len(ids) != 1:
        pieces = ", ".join(t.removesuffix("</w>") for t in tokenizer.convert_ids_to_tokens(ids))
        return f"is {len(ids)} vocabulary tokens ({pieces}), not one existing token"
    return None


def default_init_tokens(tokens: Sequence[str]) -> list[str]:
    """The default initialiser of each token of one run. A token `<newK>` starts from the K-th
    entry of DEFAULT_INIT, so that concepts trained separately as <new1>, <new2>, ... start apart
    (and a joint run of <new1>, <new2> starts as the reference's does); any other token from the
    entry its name hashes to. Within one run a taken entry passes to the next free one."""
    picks: list[str] = []
    for token in tokens:
        m = _NEW_K.match(token)
        if m:
            k = int(m.group(1)) - 1
            if k >= len(DEFAULT_INIT):
                raise UsageError(
                    f"{token}: there are default initialisers for <new1> to <new{len(DEFAULT_INIT)}>; give --init-token"
                )
        else:
            k = int(hashlib.sha256(token.encode()).hexdigest(), 16) % len(DEFAULT_INIT)
        for step in range(len(DEFAULT_INIT)):
            candidate = DEFAULT_INIT[(k + step) % len(DEFAULT_INIT)]
            if candidate not in picks:
                picks.append(candidate)
                break
        else:
            raise UsageError(f"more than {len(DEFAULT_INIT)} concepts in one run: give each an --init-token")
    return picks


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
    problem = token_name_problem(token)
    if problem:
        raise UsageError(f"token {token!r} {problem}; use one word such as <new1>")
    if is_existing_word(tokenizer, token):
        raise CdtoolError(f"token {token!r} already exists in the vocabulary; use a new one such as <new1>")


def plan_new_tokens(
    tokenizer: Any, encoder: Any, deltas: Sequence[Delta], second: bool = False
) -> dict[str, torch.Tensor]:
    """The deltas' token entries and their embedding rows (with `second`, their rows for SDXL's
    second text encoder), refusing existing words, rows of another width than the text encoder's
    and tokens two deltas define differently."""
    dim = encoder.get_input_embeddings().weight.shape[1]
    which = "second text encoder" if second else "text encoder"
    planned: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for d in deltas:
        for token, emb in (d.tokens_2 if second else d.tokens).items():
            if emb.shape[-1] != dim:
                raise CdtoolError(
                    f"{d.origin or 'delta'}: token {token} has a {emb.shape[-1]}-dim embedding, the "
                    f"model's {which} uses {dim}; is the delta for another base model?"
                )
            for entry, row in zip(token_names(token, emb.shape[0]), emb, strict=True):
                if entry in planned:
                    if not torch.equal(planned[entry], row.float()):
                        raise CdtoolError(
                            f"token {entry} is defined differently by {origin[entry]} and "
                            f"{d.origin or 'another delta'}; merge them with `cdtool merge`, which renames collisions"
                        )
                    continue
                if is_existing_word(tokenizer, entry):
                    raise CdtoolError(
                        f"{d.origin or 'delta'}: token {entry!r} already exists in the model's "
                        "vocabulary; a modifier token must be new, such as <new1>"
                    )
                planned[entry] = row.float()
                origin[entry] = d.origin or "a delta"
    return planned


def plan_text_tokens(text: TextSide, deltas: Sequence[Delta]) -> list[dict[str, torch.Tensor]]:
    """Per text encoder, the entries and rows `add_text_tokens` adds. For SDXL every token needs its
    rows in both encoders; a base with one encoder refuses second-encoder rows."""
    pairs = enumerate(zip(text.tokenizers, text.encoders, strict=True))
    plans = [plan_new_tokens(t, e, deltas, second=i == 1) for i, (t, e) in pairs]
    for d in deltas:
        if d.tokens and text.xl and set(d.tokens_2) != set(d.tokens):
            token = sorted(set(d.tokens) - set(d.tokens_2))[0]
            raise CdtoolError(
                f"{d.origin or 'delta'}: token {token} has no rows for the model's second text encoder; "
                "is the delta for a Stable Diffusion 1.x or 2.x base?"
            )
        if d.tokens_2 and not text.xl:
            raise CdtoolError(
                f"{d.origin or 'delta'} holds rows for a second text encoder, which the model has not; is it for SDXL?"
            )
    return plans


def add_text_tokens(text: TextSide, plans: Sequence[Mapping[str, torch.Tensor]]) -> list[int]:
    """Add the planned entries to every tokenizer and text encoder, at the same ids in each (the
    pipeline tokenises a prompt once per tokenizer); returns the ids."""
    ids = [add_token_rows(t, e, plan) for t, e, plan in zip(text.tokenizers, text.encoders, plans, strict=True)]
    if any(i != ids[0] for i in ids):
        raise CdtoolError("the model's tokenizers gave the new tokens different ids; their vocabularies differ")
    return ids[0]


def add_token_rows(tokenizer: Any, encoder: Any, rows: Mapping[str, torch.Tensor]) -> list[int]:
    """Add each token entry to the tokenizer and its row to the text encoder's embedding table;
    returns the entries' ids."""
    if not rows:
        return []
    tokenizer.add_tokens(list(rows))
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids = tokenizer.convert_tokens_to_ids(list(rows))
    table = encoder.get_input_embeddings().weight
    with torch.no_grad():
        for i, row in zip(ids, rows.values(), strict=True):
            table[i] = row.to(table.dtype)
    return ids


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
