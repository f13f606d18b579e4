"""Turning whatever images a user has into clean RGB squares, and telling duplicates apart."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdtool.errors import CdtoolError, UsageError, first_line

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def parse_colour(text: str) -> tuple[int, int, int]:
    """`white`, `black`, `gray`, `#rrggbb` or `r,g,b`."""
    from PIL import ImageColor

    try:
        if "," in text:
            r, g, b = (int(x) for x in text.split(","))
            return (r, g, b)
        return ImageColor.getrgb(text)[:3]
    except ValueError as e:
        raise UsageError(f"--background {text!r}: use a colour name, #rrggbb or r,g,b") from e


class ImageError(CdtoolError):
    """An image file that cannot be read; the message names it, `reason` says why."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: not a readable image ({reason}); remove or replace it")
        self.reason = reason


def open_image(path: Path | str, data: bytes | None = None) -> Any:
    """The decoded image (its first frame) at `path`, or from `data` named `path`. Every reader of
    images goes through here, so a corrupt or truncated file, or one whose size makes it a
    decompression bomb, is one ImageError naming the file."""
    from PIL import Image

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data) if data is not None else path)
        _warn_large(path, im, caught)
    except Image.DecompressionBombError as e:
        raise ImageError(str(path), f"refused as a possible decompression bomb: {e}") from e
    except Exception as e:  # PIL raises many types for bad files
        raise ImageError(str(path), first_line(e)) from e
    try:
        im.load()  # truncated files fail here, not later
    except Exception as e:
        im.close()
        raise ImageError(str(path), first_line(e)) from e
    return im


def _warn_large(path: Path | str, im: Any, caught: list[warnings.WarningMessage]) -> None:
    """PIL's warning about a very large image, as one cdtool warning naming the file."""
    from PIL import Image

    if any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught):
        from cdtool import console

        console.warn(
            f"{path}: a very large image ({im.width}x{im.height}, {im.width * im.height / 1e6:.0f} megapixels); "
            "reading it takes much memory and time"
        )
    for w in caught:
        if not issubclass(w.category, Image.DecompressionBombWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


@dataclass
class Loaded:
    image: Any  # PIL RGB image
    original_size: tuple[int, int]
    notes: list[str]  # what was done: exif rotation, flattening, conversion, first frame


def has_transparency(im: Any) -> bool:
    """Whether a PIL image has an alpha channel or a transparent colour (a palette's or a tRNS key)."""
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def open_rgb(path: Path, background: tuple[int, int, int]) -> Loaded:
    """Open any image as RGB: first frame, EXIF orientation applied, transparency flattened onto
    `background`, grayscale/CMYK/16-bit converted. Raises ImageError when unreadable."""
    from PIL import Image, ImageOps

    notes: list[str] = []
    with open_image(path) as im:
        if getattr(im, "n_frames", 1) > 1:
            notes.append(f"first of {im.n_frames} frames")
        orientation = im.getexif().get(0x0112, 1)
        if orientation not in (1, None):
            notes.append(f"EXIF orientation {orientation} applied")
        im = ImageOps.exif_transpose(im)
        mode = im.mode
        if mode in ("I;16", "I;16B", "I;16L", "I"):
            notes.append(f"{mode} scaled to 8 bits")
            key = im.info.get("transparency")
            im = im.point(lambda v: v / 256).convert("L")
            if isinstance(key, int):  # a transparent grey level, scaled as the pixels are
                im.info["transparency"] = key >> 8
        if mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        if has_transparency(im):
            notes.append("transparency flattened")
            rgba = im.convert("RGBA")
            flat = Image.new("RGB", rgba.size, background)
            flat.paste(rgba, mask=rgba.getchannel("A"))
            im = flat
        elif im.mode != "RGB":
            if im.mode not in ("L",):
                notes.append(f"{im.mode} converted to RGB")
            im = im.convert("RGB")
        return Loaded(im.copy(), (im.width, im.height), notes)


def fit(image: Any, size: int, crop: str, background: tuple[int, int, int]) -> Any:
    """center: shorter side to `size`, centre crop to a square; pad: longer side to `size`, padded
    with `background`; none: shorter side to `size`, aspect kept."""
    from PIL import Image

    w, h = image.size
    if crop == "pad":
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = Image.new("RGB", (size, size), background)
        canvas.paste(image.resize((nw, nh), Image.Resampling.LANCZOS), ((size - nw) // 2, (size - nh) // 2))
        return canvas
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    resized = image.resize((nw, nh), Image.Resampling.LANCZOS) if (nw, nh) != (w, h) else image
    if crop == "none":
        return resized
    left, top = (nw - size) // 2, (nh - size) // 2
    return resized.crop((left, top, left + size, top + size))


def dhash(image: Any, bits: int = 8) -> int:
    """128-bit difference hash (horizontal and vertical gradients of an 8x8 grey thumbnail):
    robust to resizing and re-encoding."""
    from PIL import Image

    h = list(image.convert("L").resize((bits + 1, bits), Image.Resampling.LANCZOS).tobytes())
    v = list(image.convert("L").resize((bits, bits + 1), Image.Resampling.LANCZOS).tobytes())
    value = 0
    for row in range(bits):
        for col in range(bits):
            value = (value << 1) | int(h[row * (bits + 1) + col] > h[row * (bits + 1) + col + 1])
    for row in range(bits):
        for col in range(bits):
            value = (value << 1) | int(v[row * bits + col] > v[(row + 1) * bits + col])
    return value


def thumbnail(image: Any, side: int = 16) -> bytes:
    """A small RGB thumbnail: the hash alone cannot tell smooth images apart (a flat image and a
    left-to-right gradient both hash to zeros)."""
    from PIL import Image

    return image.convert("RGB").resize((side, side), Image.Resampling.BOX).tobytes()


def near_duplicate(
    hash_a: int, thumb_a: bytes, hash_b: int, thumb_b: bytes, max_bits: int = 12, max_diff: float = 10.0
) -> bool:
    """Same picture up to resizing and re-encoding: close hashes and close thumbnails."""
    if hamming(hash_a, hash_b) > max_bits:
        return False
    diff = sum(abs(x - y) for x, y in zip(thumb_a, thumb_b, strict=True)) / len(thumb_a)
    return diff <= max_diff


def pixel_sha256(image: Any) -> str:
    """sha256 of decoded RGB pixels (exact duplicates whatever the file format)."""
    h = hashlib.sha256()
    h.update(f"{image.width}x{image.height}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()
