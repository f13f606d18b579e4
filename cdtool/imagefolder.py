"""The data folders' format, Hugging Face's imagefolder: images beside a metadata file with one JSON
object per line, `file_name` and `text` (its caption). `prep` and `regset` write it, `train` reads it."""

from __future__ import annotations

METADATA = "metadata.jsonl"
