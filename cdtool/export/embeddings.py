"""The token files of an export: diffusers' `{token: embedding}` files and AUTOMATIC1111's embeddings,
named by the token's Windows-safe stem (cdtool/filenames.py).

An SDXL embedding holds a token's rows in both text encoders, `clip_l` (the text_encoder's, 768
wide on the real model) and `clip_g` (text_encoder_2's, 1280 wide): the file AUTOMATIC1111 and
ComfyUI read. diffusers loads it a part at a time:
`pipe.load_textual_inversion(f["clip_l"], token=..., text_encoder=pipe.text_encoder,
tokenizer=pipe.tokenizer)`, and `f["clip_g"]` with `pipe.text_encoder_2, pipe.tokenizer_2`.
"""

from __future__ import annotations

import torch

from cdtool.choices import SDXL
from cdtool.delta.file import Delta
from cdtool.errors import CdtoolError

SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")  # text_encoder's rows, text_encoder_2's
# The stems of the files an export writes itself: a token's file never takes one of these names.
RESERVED_STEMS = (
    "pytorch_lora_weights",
    "pytorch_custom_diffusion_weights",
    "lora",
    "learned_embeds",
    "README",
    "samples",
)


def is_sdxl(delta: Delta) -> bool:
    return delta.kind == SDXL


def sdxl_embedding(delta: Delta, token: str) -> dict[str, torch.Tensor]:
    """The two-encoder embedding of one token: {clip_l: [n, dim], clip_g: [n, dim_2]}."""
    if token not in delta.tokens_2:
        raise CdtoolError(f"token {token} has no rows for SDXL's second text encoder")
    rows = (delta.tokens[token], delta.tokens_2[token])
    return {k: e.reshape(-1, e.shape[-1]).contiguous() for k, e in zip(SDXL_EMBEDDING_KEYS, rows, strict=True)}


def token_file_stems(delta: Delta) -> dict[str, str]:
    """token -> the stem of its files: Windows-safe, distinct, never one of RESERVED_STEMS."""
    from cdtool.filenames import token_stems

    return token_stems(delta.tokens, RESERVED_STEMS)


def token_files(delta: Delta) -> dict[str, dict[str, torch.Tensor]]:
    """`<stem>.safetensors` -> {token: embedding}, as diffusers writes them for
    `pipe.load_textual_inversion(folder, weight_name=...)` (the token is the file's key)."""
    stems = token_file_stems(delta)
    if is_sdxl(delta):  # both encoders' rows
        return {f"{stems[t]}.safetensors": sdxl_embedding(delta, t) for t in delta.tokens}
    return {
        f"{stems[t]}.safetensors": {t: (e[0] if e.shape[0] == 1 else e).contiguous()} for t, e in delta.tokens.items()
    }


def a1111_embeddings(delta: Delta) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
    """`<stem>.safetensors` -> (tensors, metadata) of AUTOMATIC1111's embedding file: `emb_params`
    [n_vectors, dim]; the UI's prompt word is the file's stem, and the token stays in the metadata."""
    stems = token_file_stems(delta)
    if is_sdxl(delta):  # the UI reads SDXL embeddings as {clip_l, clip_g}
        return {f"{stems[t]}.safetensors": (sdxl_embedding(delta, t), {"token": t}) for t in delta.tokens}
    return {
        f"{stems[t]}.safetensors": ({"emb_params": e.reshape(-1, e.shape[-1]).contiguous()}, {"token": t})
        for t, e in delta.tokens.items()
    }
