"""A personalised concept: photos in, one forward pass of a trained encoder, a file out; and that file
attached to a pipeline for sampling.

The file is a cdtool delta (docs/design.md) holding the identifier's embedding row as a token
(`token.<token>`, what every delta command already reads) and the visual tokens of the photos
(`visual.<token>`), with the encoder named in its metadata (`encoder`: the folder's path, the sha256
of its weights, the base fingerprint it was trained for). Sampling loads the encoder's adapters
from that folder (or another one passed instead), checks both fingerprints, and injects the visual
tokens into the rows of the UNet's batch whose prompt holds the token; the unconditional half of
classifier-free guidance is left to the frozen model, as diffusers' image-prompt adapters leave it
to an empty image, so guidance pushes towards the concept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cdtool.delta.file import Delta
from cdtool.delta.provenance import personalize_entry, stamp
from cdtool.errors import CdtoolError
from cdtool.instant.adapters import Attached, BlockShape, attach, make_adapters
from cdtool.instant.backbones import resize
from cdtool.instant.data import load_subject
from cdtool.instant.encoders import combine_photos
from cdtool.instant.folder import EncoderFolder, encoder_sha256, read_encoder
from cdtool.models.tokens import check_token_name

METHOD = "instantbooth"


@torch.no_grad()
def personalize(photos: Sequence[Path], encoder_dir: Path, token: str | None = None, device: str = "cpu") -> Delta:
    """The personalised concept of `photos` (one subject of the encoder's category): their mean
    identifier embedding and their visual tokens, in one forward pass."""
    from cdtool.instant.trainer import build_encoder, load_weights

    enc = read_encoder(encoder_dir)
    s = enc.settings
    token = token or s.identifier
    check_token_name(token, "--token")
    encoder = build_encoder(s, pretrained=False)
    load_weights(enc.path, encoder)
    encoder.eval().to(device)
    views = torch.stack([resize(load_subject(p, s.resolution)[None], encoder.image_size)[0] for p in photos])
    rows, tokens = combine_photos(*encoder(views.to(device)))
    for name, t in (("identifier embedding", rows), ("visual tokens", tokens)):
        if not bool(torch.isfinite(t).all()):
            raise CdtoolError(f"{encoder_dir}: the encoder gave non-finite {name}; its weights are damaged")
    sha = encoder_sha256(enc.path)
    concept = Delta(
        tokens={token: rows.float().cpu()},
        visual={token: tokens.float().cpu()},
        base_kind=s.base_kind,
        base_model=s.model,
        base_fingerprint=s.token_fingerprint,
        concepts=[
            {
                "token": token,
                "class_noun": s.class_noun,
                "init_token": None,
                "prompts": [f"photo of a {token} {s.class_noun}"],
                "method": METHOD,
            }
        ],
        encoder=_encoder_record(enc, sha),
    )
    stamp(concept, "personalize", personalize_entry(photos, enc.path, sha, enc.progress.step), new=True)
    return concept


def _encoder_record(enc: EncoderFolder, sha: str) -> dict[str, Any]:
    s = enc.settings
    return {
        "path": str(enc.path.resolve()),
        "sha256": sha,
        "base_fingerprint": s.base_fingerprint,
        "class_noun": s.class_noun,
        "backbone": s.backbone,
        "identifier": s.identifier,
        "step": enc.progress.step,
    }


@dataclass
class Concept:
    """A personalised concept attached to a pipeline: its adapters' hooks and the token that asks
    for it. `choose` says which rows of the next UNet batches get the visual tokens."""

    attached: Attached
    tokenizer: Any
    token_id: int

    def choose(self, prompts: Sequence[str], guided: bool) -> None:
        """The rows of the UNet's batch (the unconditional rows first under guidance, as the
        pipelines order them) whose prompt holds the concept's token."""
        ids = self.tokenizer(list(prompts), add_special_tokens=False).input_ids
        asked = [self.token_id in row for row in ids]
        rows = [False] * len(prompts) + asked if guided else asked
        self.attached.injection.rows = torch.tensor(rows)

    def detach(self) -> None:
        self.attached.detach()


def encoder_for(delta: Delta, encoder_dir: Path | None) -> EncoderFolder:
    """The encoder folder a personalised concept names (or `encoder_dir` instead), checked to hold
    the weights the concept was made with."""
    record = delta.encoder or {}
    where = Path(encoder_dir) if encoder_dir is not None else Path(str(record.get("path", "")))
    if encoder_dir is None and not where.is_dir():
        raise CdtoolError(
            f"{delta.origin}: its encoder {where} is not there; pass --encoder with the encoder folder it was made with"
        )
    enc = read_encoder(where)
    sha = encoder_sha256(where)
    if sha != record.get("sha256"):
        raise CdtoolError(
            f"{delta.origin} was made with the encoder of fingerprint {str(record.get('sha256'))[:12]}, but {where} "
            f"holds another ({sha[:12]}); pass --encoder with the encoder folder it was made with"
        )
    return enc


def check_encoder_base(enc: EncoderFolder, pipe: Any, model: str) -> None:
    """The (unmodified) base pipeline is the one the encoder was trained for."""
    from cdtool.instant.trainer import base_fingerprints, refuse_sdxl
    from cdtool.models.loading import pipeline_kind

    refuse_sdxl(pipeline_kind(pipe), model)
    actual, _, _ = base_fingerprints(pipe)
    if actual != enc.settings.base_fingerprint:
        raise CdtoolError(
            f"the encoder {enc.path} was trained for the base model {enc.settings.model} (fingerprint "
            f"{enc.settings.base_fingerprint[:12]}), not for {model} ({actual[:12]}); pass --model {enc.settings.model}"
        )


def attach_concept(pipe: Any, delta: Delta, enc: EncoderFolder, beta: float) -> Concept:
    """The encoder's adapters hooked into the pipeline's UNet (on its device and dtype), with the
    concept's visual tokens and strength `beta`; the token must already be in the tokenizer."""
    from safetensors import safe_open

    s = enc.settings
    blocks = [BlockShape(p, int(w), int(h)) for p, w, h in s.blocks]
    adapters = make_adapters(blocks, s.visual_dim)
    with safe_open(str(enc.weights), framework="pt") as f:
        state = {k[len("adapters.") :]: f.get_tensor(k) for k in f.keys() if k.startswith("adapters.")}
    adapters.load_state_dict(state)
    adapters.eval().requires_grad_(False).to(pipe.unet.device, pipe.unet.dtype)
    (token,) = delta.visual
    attached = attach(pipe.unet, adapters, blocks)
    attached.injection.tokens = delta.visual[token][None].to(pipe.unet.device, pipe.unet.dtype)
    attached.injection.beta = beta
    return Concept(attached, pipe.tokenizer, int(pipe.tokenizer.convert_tokens_to_ids(token)))
