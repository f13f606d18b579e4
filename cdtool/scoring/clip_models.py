"""CLIP models through open_clip: loading (hub tag, local weights, or the built-in tiny test
architecture) and normalised text/image embeddings."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from cdtool.errors import CdtoolError, first_line

TINY = "cdtool-tiny"  # a 2-layer random CLIP of the real architecture, for tests and smoke runs


@dataclass
class Clip:
    model: Any
    preprocess: Any
    tokenizer: Any
    name: str
    pretrained: str

    @torch.no_grad()
    def texts(self, texts: Sequence[str], batch: int = 256) -> torch.Tensor:
        """L2-normalised text embeddings [n, d] (float32, CPU)."""
        out = []
        for i in range(0, len(texts), batch):
            tokens = self.tokenizer(list(texts[i : i + batch]))
            out.append(torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1))
        return torch.cat(out) if out else torch.empty(0, 0)

    @torch.no_grad()
    def images(self, images: Sequence[Any], batch: int = 64) -> torch.Tensor:
        """L2-normalised image embeddings [n, d] of PIL images."""
        out = []
        for i in range(0, len(images), batch):
            pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images[i : i + batch]])
            out.append(torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1))
        return torch.cat(out) if out else torch.empty(0, 0)


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """open_clip and huggingface_hub log each retry and the random init on the root logger."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous)


def load_clip(
    name: str = "ViT-B-32", pretrained: str = "openai", weights_option: str = "--clip-pretrained /path/to/weights"
) -> Clip:
    """An open_clip model: `pretrained` is a tag (downloaded once) or a local weights file; the
    `cdtool-tiny` architecture loads with random weights (pretrained "" or "none"). An offline error
    says to pass `weights_option`: how the command line names a local weights file."""
    import open_clip

    if name == TINY:
        cfg_dir = resources.files("cdtool").joinpath("data/open_clip")
        open_clip.add_model_config(Path(str(cfg_dir)))
    weights = None if pretrained in ("", "none") else pretrained
    if weights and Path(weights).expanduser().exists():
        weights = str(Path(weights).expanduser())
    try:
        with torch.random.fork_rng(devices=[]), _quiet_logs():
            torch.manual_seed(0)  # random-weight models are the same on every run
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights)
    except RuntimeError as e:
        raise CdtoolError(
            f"could not load open_clip {name} with weights {pretrained!r} ({first_line(e)}); offline, "
            f"download the weights where there is network and pass {weights_option}"
        ) from e
    except Exception as e:
        raise CdtoolError(f"could not load open_clip {name} ({pretrained}): {first_line(e)}") from e
    model.eval()
    return Clip(model, preprocess, open_clip.get_tokenizer(name), name, pretrained)
