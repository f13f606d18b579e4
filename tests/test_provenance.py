"""What made a delta (cdtool/delta/provenance.py): `created_by`, and each command's provenance entry,
added to the source's entries or replacing them; and what a file records through a real write."""

from __future__ import annotations

import hashlib

import torch

from cdtool import __version__
from cdtool.delta.file import Delta, LayerDelta, read_cdtool, write_cdtool
from cdtool.delta.provenance import (
    checkpoint_entry,
    compress_entry,
    created_by,
    get_deltas_entry,
    input_sha256,
    merge_entry,
    stamp,
    train_entry,
)


def _delta() -> Delta:
    d = Delta(layers={"unet.a.attn2.to_k": LayerDelta(full=torch.ones(2, 2))}, tokens={"<new1>": torch.zeros(1, 2)})
    stamp(d, "train", train_entry({"steps": 5}, {"steps_run": 5}, "custom-diffusion"), command="train (x)", new=True)
    return d


def test_created_by_names_the_version_and_the_command():
    assert created_by("compress") == f"cdtool {__version__} compress"


def test_a_change_adds_its_entry_a_new_delta_replaces_them(tmp_path):
    d = _delta()
    assert d.created_by == f"cdtool {__version__} train (x)"
    assert d.provenance == {"train": {"config": {"steps": 5}, "steps_run": 5, "method": "custom-diffusion"}}
    src = tmp_path / "src.safetensors"
    src.write_bytes(b"delta bytes")
    stamp(d, "compress", compress_entry(src, 4, None, None, "fp16", "exact"))
    assert list(d.provenance) == ["train", "compress"] and d.created_by.endswith(" compress")
    assert d.provenance["compress"] == {
        "source": str(src),
        "source_sha256": hashlib.sha256(b"delta bytes").hexdigest(),
        "rank": 4,
        "energy": None,
        "fro": None,
        "dtype": "fp16",
        "svd": "exact",
    }
    stamp(d, "compress", compress_entry(src, 2, None, None, "fp32", "exact"))  # a second compress: its own entry
    assert list(d.provenance) == ["train", "compress"] and d.provenance["compress"]["rank"] == 2
    stamp(d, "merge", merge_entry("sum", [(src, 0.5)], {}, None), new=True)
    assert list(d.provenance) == ["merge"]


def test_merge_entry_names_weights_for_least_squares_scales_otherwise(tmp_path):
    a = tmp_path / "a.safetensors"
    a.write_bytes(b"a")
    solved = {"reg_captions": "cdtool default", "reg_rows": 7}
    entry = merge_entry("least-squares", [(a, 2.0)], {str(a): {"<new1>": "<new2>"}}, solved)
    assert entry == {
        "method": "least-squares",
        "inputs": [{"path": str(a), "sha256": hashlib.sha256(b"a").hexdigest(), "weight": 2.0}],
        "renamed": {str(a): {"<new1>": "<new2>"}},
        "reg_captions": "cdtool default",
        "reg_rows": 7,
    }
    assert merge_entry("closed-form", [(a, 0.5)], {}, solved)["inputs"][0]["scale"] == 0.5


def test_a_folder_source_has_no_sha256(tmp_path):
    assert input_sha256(tmp_path) is None
    assert get_deltas_entry(tmp_path, "diffusers") == {
        "source": str(tmp_path),
        "source_format": "diffusers",
        "source_sha256": None,
    }
    assert checkpoint_entry(tmp_path / "step-000003", 3) == {"checkpoint": str(tmp_path / "step-000003"), "step": 3}


def test_the_file_records_them(tmp_path):
    d = _delta()
    stamp(d, "get_deltas", get_deltas_entry(tmp_path, "diffusers"), command="get-deltas")
    write_cdtool(d, tmp_path / "d.safetensors")
    got = read_cdtool(tmp_path / "d.safetensors")
    assert got.created_by == f"cdtool {__version__} get-deltas"
    assert got.provenance == d.provenance and list(got.provenance) == ["train", "get_deltas"]
