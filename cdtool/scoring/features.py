"""Image feature extractors for scoring: CLIP (open_clip), DINO ViT-S/16 (transformers) and
Inception-v3 pool features (torchvision), with reference embeddings cached by file hash."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cdtool.errors import CdtoolError, first_line
from cdtool.hashing import file_sha256
from cdtool.paths import cache_dir

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Dino:
    """DINO ViT CLS embeddings: resize 256 bicubic, centre crop 224, ImageNet normalisation
    (scaled to the model's image size for small test models)."""

    def __init__(self, spec: str) -> None:
        from transformers import ViTModel

        try:
            self.model = ViTModel.from_pretrained(spec, add_pooling_layer=False).eval()
        except (OSError, ValueError) as e:
            raise CdtoolError(
                f"could not load the DINO model {spec!r} ({first_line(e)}); offline, download "
                "facebook/dino-vits16 where there is network and pass --dino /path/to/folder"
            ) from e
        self.key = f"dino:{spec}"
        crop = int(self.model.config.image_size)
        from torchvision import transforms

        self.transform = transforms.Compose(
            [
                transforms.Resize(round(crop * 256 / 224), interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.CenterCrop(crop),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    @torch.no_grad()
    def __call__(self, images: Sequence[Any]) -> torch.Tensor:
        pixels = torch.stack([self.transform(im.convert("RGB")) for im in images])
        return self.model(pixel_values=pixels).last_hidden_state[:, 0].float()


class ClipImages:
    def __init__(self, clip: Any) -> None:
        self.clip = clip
        self.key = f"clip:{clip.name}:{clip.pretrained}"

    def __call__(self, images: Sequence[Any]) -> torch.Tensor:
        return self.clip.images(images)


class Inception:
    """Inception-v3 2048-d pool features (torchvision's ImageNet weights)."""

    def __init__(self) -> None:
        from torchvision import models, transforms

        try:
            net = models.inception_v3(weights=models.Inception_V3_Weights.IMAGENET1K_V1)
        except Exception as e:
            raise CdtoolError(
                f"Inception-v3 weights are not available ({first_line(e)}); offline, use --kid-features clip or dino"
            ) from e
        net.fc = torch.nn.Identity()
        self.model = net.eval()
        self.key = "inception_v3:imagenet1k_v1"
        self.transform = transforms.Compose(
            [
                transforms.Resize((299, 299), interpolation=transforms.InterpolationMode.BILINEAR),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    @torch.no_grad()
    def __call__(self, images: Sequence[Any]) -> torch.Tensor:
        return self.model(torch.stack([self.transform(im.convert("RGB")) for im in images])).float()


def embed_files(extractor: Any, files: Sequence[Path], batch: int = 32, cache: bool = False) -> torch.Tensor:
    """Features of image files, in order; with `cache`, each file's features are stored on disk
    under (extractor, file sha256) so scoring many runs against one reference set is fast."""
    from safetensors.torch import load_file, save_file

    from cdtool.atomic import atomic_path
    from cdtool.console import progress
    from cdtool.dataset.images import open_image

    folder = cache_dir() / "features" / hashlib.sha256(extractor.key.encode()).hexdigest()[:16]
    out: list[torch.Tensor | None] = [None] * len(files)
    keys = [file_sha256(f) if cache else "" for f in files]
    todo = []
    for i, k in enumerate(keys):
        path = folder / f"{k}.safetensors"
        if cache and path.exists():
            out[i] = load_file(str(path))["features"]
        else:
            todo.append(i)
    with progress(extractor.key, len(todo)) as bar:
        for start in range(0, len(todo), batch):
            idx = todo[start : start + batch]
            images = []
            for i in idx:
                with open_image(files[i]) as im:
                    images.append(im.convert("RGB"))
            for i, f in zip(idx, extractor(images), strict=True):
                out[i] = f.contiguous()
                if cache:
                    folder.mkdir(parents=True, exist_ok=True)
                    with atomic_path(folder / f"{keys[i]}.safetensors") as tmp:
                        save_file({"features": f.contiguous()}, str(tmp))
            bar.advance(len(idx))
    return torch.stack([t for t in out if t is not None])
