"""The real CLIP BPE vocabulary, built from the file open_clip ships, as a Hugging Face tokenizer.

Under transformers 5, `CLIPTokenizer(vocab_file=..., merges_file=...)` silently yields a 2-token
vocabulary, so the tokenizer is always created with `from_pretrained` on a folder we write.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
import tempfile
from collections.abc import Iterable
from functools import lru_cache
from itertools import pairwise
from pathlib import Path

from cdtool.errors import CdtoolError
from cdtool.paths import cache_dir

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408
MODEL_MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's reversible byte -> printable-unicode table.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def open_clip_bpe_path() -> Path:
    """Path of open_clip's BPE merges file (found without importing open_clip)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise CdtoolError("open_clip_torch is not installed; run `pip install open_clip_torch`")
    path = Path(spec.origin).parent / BPE_FILE
    if not path.exists():
        raise CdtoolError(f"{path} is missing; reinstall open_clip_torch")
    return path


def vocab_and_merges(bpe_path: Path) -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary (token -> id, 49408 entries) and BPE merges, as CLIP builds them."""
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


@lru_cache(maxsize=1)
def clip_tokenizer_dir() -> Path:
    """A folder holding CLIP's tokenizer files, written once into the cdtool cache."""
    out = cache_dir() / "clip-tokenizer"
    if (out / "tokenizer_config.json").exists():
        return out
    vocab, merges = vocab_and_merges(open_clip_bpe_path())
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise CdtoolError(f"open_clip's BPE file gave {len(vocab)} tokens, expected {CLIP_VOCAB_SIZE}")
    # A private temp folder renamed into place, so concurrent processes never see a partial one.
    tmp = Path(tempfile.mkdtemp(prefix=".clip-tokenizer.", dir=out.parent))
    write_tokenizer(tmp, vocab, merges)
    try:
        tmp.rename(out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_clip_tokenizer(pad_token: str | None = None):  # -> transformers.CLIPTokenizer
    """The real CLIP tokenizer (49408 tokens, model_max_length 77), offline. It pads with
    end-of-text, as Stable Diffusion 1.x's; `pad_token="!"` pads as the OpenCLIP tokenizers of SD 2.x
    and SDXL's second text encoder do (id 0)."""
    from transformers import CLIPTokenizer

    extra = {} if pad_token is None else {"pad_token": pad_token}
    tok = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()), model_max_length=MODEL_MAX_LENGTH, **extra)
    if len(tok) != CLIP_VOCAB_SIZE:
        raise CdtoolError(f"CLIP tokenizer built with {len(tok)} tokens, expected {CLIP_VOCAB_SIZE}")
    return tok


def _bpe_steps(word: str, ranks: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """The merges CLIP's BPE applies to one word (its characters, the last with `</w>`), in order."""
    parts = [*word[:-1], word[-1] + "</w>"]
    fired = []
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(pairwise(parts))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        a, b = parts[i], parts[i + 1]
        fired.append((a, b))
        merged, j = [], 0
        while j < len(parts):  # every occurrence of the pair, left to right, as CLIP merges
            if j < len(parts) - 1 and parts[j] == a and parts[j + 1] == b:
                merged.append(a + b)
                j += 2
            else:
                merged.append(parts[j])
                j += 1
        parts = merged
    return fired


def compact_vocab_and_merges(
    words: Iterable[str], pieces: Iterable[str], bpe_path: Path | None = None
) -> tuple[dict[str, int], list[str]]:
    """A CLIP vocabulary cut down to what `words` need and the vocabulary entries `pieces`: every
    byte character (plain and with `</w>`, so any text still tokenizes), the merges CLIP applies to
    the words and those that build the pieces, in CLIP's own order, and the two special tokens. The
    words tokenize into exactly the pieces CLIP's full vocabulary gives them (BPE merges by rank, and
    every merge that fires on them is kept), at a fraction of the embedding table."""
    full_vocab, merges = vocab_and_merges(bpe_path or open_clip_bpe_path())
    ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
    made_by = {"".join(pair): pair for pair in ranks}
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    keep: set[tuple[str, str]] = set()

    def need(piece: str) -> None:  # the merge that makes `piece`, and those that make its halves
        pair = made_by.get(piece)
        if pair is not None and pair not in keep:
            keep.add(pair)
            need(pair[0])
            need(pair[1])

    for word in words:
        encoded = "".join(_bytes_to_unicode()[b] for b in word.lower().encode("utf-8"))
        keep.update(_bpe_steps(encoded, ranks))
    for piece in pieces:
        if piece not in full_vocab:
            raise CdtoolError(f"{piece!r} is not an entry of CLIP's vocabulary")
        need(piece)
    kept = sorted(keep, key=ranks.__getitem__)
    byte_chars = [c for c in _bytes_to_unicode().values() if c in byte_of]
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(p) for p in kept]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, [" ".join(p) for p in kept]


def write_tokenizer(folder: Path, vocab: dict[str, int], merges: list[str]) -> None:
    """A CLIPTokenizer folder (vocab.json, merges.txt and its config) that pads with end-of-text, as
    Stable Diffusion 1.x's tokenizer does."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")})
    )
