"""The text conditioning the UNet receives, computed exactly as each diffusers pipeline computes it.

Stable Diffusion 1.x and 2.x (`StableDiffusionPipeline.encode_prompt`): the text encoder's last
hidden state (after its final layer norm) for the prompt padded to the tokenizer's length with the
tokenizer's own padding token (end-of-text for 1.x; "!" for 2.x's OpenCLIP tokenizer), with an
attention mask only where the encoder's config asks for one.

Stable Diffusion XL (`StableDiffusionXLPipeline.encode_prompt`, `_get_add_time_ids`): both encoders'
penultimate hidden states (before the final layer norm) concatenated along the features (768 + 1280
= 2048 on the real model), the pooled and projected embedding of the second encoder (`text_embeds`),
and the time ids: original size, crop top-left corner and target size.

Training and both merges take their text features from here, so the rows a merge solves for are the
rows the UNet's key/value projections read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cdtool.errors import CdtoolError

TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")  # the pipelines' names of their text encoders


@dataclass
class TextSide:
    """A base's tokenizers and text encoders in the pipeline's order: one of each for SD 1.x/2.x,
    two for SDXL (the second tokenizer and its projecting encoder)."""

    tokenizers: list[Any]
    encoders: list[Any]

    @classmethod
    def of(cls, pipe: Any) -> TextSide:
        """The text side of a loaded pipeline."""
        if getattr(pipe, "text_encoder_2", None) is not None:
            return cls([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2])
        return cls([pipe.tokenizer], [pipe.text_encoder])

    def named(self) -> dict[str, Any]:
        """The text encoders by their pipeline component names (`text_encoder`, `text_encoder_2`)."""
        return dict(zip(TEXT_COMPONENTS, self.encoders, strict=False))

    @property
    def xl(self) -> bool:
        """Two encoders, as SDXL: penultimate hidden states, concatenated, and a pooled embedding."""
        return len(self.encoders) > 1

    @property
    def tokenizer(self) -> Any:
        return self.tokenizers[0]

    @property
    def encoder(self) -> Any:
        return self.encoders[0]

    @property
    def width(self) -> int:
        """The width of a text feature row: what the UNet's key/value projections read."""
        return sum(int(_config(e).hidden_size) for e in self.encoders)


@dataclass
class Encoded:
    """Prompts as the UNet receives them."""

    hidden: torch.Tensor  # [B, L, D]: encoder_hidden_states
    pooled: torch.Tensor | None = None  # [B, P]: SDXL's text_embeds


def tokenize(tokenizer: Any, prompts: Sequence[str], padding: str = "max_length") -> Any:
    """The pipelines' tokenisation: truncated to, and (by default) padded to, the tokenizer's length."""
    return tokenizer(
        list(prompts), padding=padding, max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )


def encode(text: TextSide, prompts: Sequence[str], device: torch.device | None = None) -> Encoded:
    """The prompts' conditioning, as the pipeline computes it (gradients flow: training calls this)."""
    return encode_tokens(text, [tokenize(t, prompts) for t in text.tokenizers], device)


def encode_tokens(text: TextSide, batches: Sequence[Any], device: torch.device | None = None) -> Encoded:
    """The conditioning of already tokenised prompts, one batch per tokenizer."""
    hidden, pooled = [], None
    for encoder, batch in zip(text.encoders, batches, strict=True):
        dev = device if device is not None else next(encoder.parameters()).device
        if not text.xl:
            use_mask = bool(getattr(_config(encoder), "use_attention_mask", False))
            mask = batch.attention_mask.to(dev) if use_mask else None
            return Encoded(encoder(batch.input_ids.to(dev), attention_mask=mask)[0])
        out = encoder(batch.input_ids.to(dev), output_hidden_states=True)
        if out[0].ndim == 2:  # the projecting encoder's pooled embedding, as the pipeline takes it
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    return Encoded(torch.cat(hidden, dim=-1), pooled)


def time_ids(original: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """SDXL's size and crop conditioning of one image, [6]: (height, width) of the original, the
    crop's top-left corner (top, left), and the target size, as `_get_add_time_ids` orders them."""
    return torch.tensor([*original, *crop, *target], dtype=torch.float32)


def unet_inputs(encoded: Encoded, ids: torch.Tensor | None, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The UNet's text arguments: encoder_hidden_states, and for SDXL added_cond_kwargs with the
    pooled embedding and the time ids ([B, 6])."""
    hidden = encoded.hidden if dtype is None else encoded.hidden.to(dtype)
    if encoded.pooled is None:
        return {"encoder_hidden_states": hidden}
    if ids is None:
        raise ValueError("an SDXL UNet needs the time ids")
    pooled = encoded.pooled if dtype is None else encoded.pooled.to(dtype)
    added = {"text_embeds": pooled, "time_ids": ids.to(pooled.device, pooled.dtype)}
    return {"encoder_hidden_states": hidden, "added_cond_kwargs": added}


@torch.no_grad()
def text_rows(
    text: TextSide, prompts: Sequence[str], starts: Sequence[int] | None = None, batch: int = 64
) -> list[torch.Tensor]:
    """Per prompt, the conditioning's rows from position `start` (default 1: after start-of-text) up
    to and including the first end-of-text; no padding (the closed form's target and regularisation
    rows).

    Prompts are batched with the tokenizers' padding to the longest: CLIP's text attention is
    causal, so whatever follows the first end-of-text cannot change the rows kept. For SDXL a row is
    both encoders' rows at one position, concatenated: the tokenizers share CLIP's vocabulary, so
    both put the text and its end-of-text at the same positions (the first then repeats end-of-text,
    the second pads with "!"); the rows end at that shared end-of-text."""
    out: list[torch.Tensor] = []
    for i in range(0, len(prompts), batch):
        chunk = list(prompts[i : i + batch])
        batches = [tokenize(t, chunk, padding="longest") for t in text.tokenizers]
        hidden = encode_tokens(text, batches).hidden.float().cpu()
        for j, prompt in enumerate(chunk):
            end = _end_of_text(text, batches, j, prompt)
            start = 1 if starts is None else starts[i + j]
            out.append(hidden[j, start : end + 1])
    return out


def _end_of_text(text: TextSide, batches: Sequence[Any], j: int, prompt: str) -> int:
    """The position of prompt j's first end-of-text, the same in every tokenizer."""
    ends = {int((b.input_ids[j] == t.eos_token_id).nonzero()[0]) for t, b in zip(text.tokenizers, batches, strict=True)}
    if len(ends) > 1:
        raise CdtoolError(f"the model's two tokenizers split {prompt!r} differently; their vocabularies differ")
    return ends.pop()


@torch.no_grad()
def padded_rows(text: TextSide, prompts: Sequence[str], batch: int = 64) -> torch.Tensor:
    """Every row the UNet's cross-attention reads for the prompts, as the pipeline encodes them:
    padded to the tokenizer's length with its own padding token, start-of-text and padding
    included. [len(prompts) * length, width]."""
    out = []
    for i in range(0, len(prompts), batch):
        hidden = encode(text, prompts[i : i + batch]).hidden.float().cpu()
        out.append(hidden.reshape(-1, hidden.shape[-1]))
    return torch.cat(out)


def _config(encoder: Any) -> Any:
    """The encoder's config, also through a wrapper (DDP) that holds the model as `module`."""
    return getattr(encoder, "module", encoder).config
