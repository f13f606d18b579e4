"""A whole merge without the command line (cdtool/merge/job.py): the inputs checked as given and read
against the base they record, the sum's mathematics, the dry run's analysis, the least-squares fit's
provenance."""

from __future__ import annotations

import hashlib

import pytest
import torch

from cdtool.delta.file import write_cdtool
from cdtool.errors import UsageError
from cdtool.merge.job import MergeRequest, check_inputs, merge_files


@pytest.fixture
def inputs(tmp_path, make_delta):
    paths = []
    for i, noun in enumerate(("cat", "dog")):
        d = make_delta(token="<new1>", seed=20 + i, scale=0.05)  # both <new1>: the second is renamed
        d.concepts[0]["class_noun"] = noun
        write_cdtool(d, tmp_path / f"{noun}.safetensors")
        paths.append(tmp_path / f"{noun}.safetensors")
    return paths


def _merge(request: MergeRequest) -> tuple:
    asked, warned, logged = [], [], []

    def choose(recorded: list[str]) -> str:
        asked.append(recorded)
        return "tiny"

    return merge_files(request, choose, warn=warned.append, log=logged.append), asked, warned, logged


def test_sum_is_the_scaled_sum_and_records_its_inputs(inputs, make_delta):
    a, b = inputs
    outcome, asked, warned, _ = _merge(MergeRequest("sum", [(a, 0.7), (b, 0.5)]))
    assert asked == [["tiny"]]  # the bases the inputs record
    assert warned == [f"{b}: token <new1> is taken by an earlier input; renamed to <new2>"]
    da, db = make_delta(token="<new1>", seed=20, scale=0.05), make_delta(token="<new1>", seed=21, scale=0.05)
    merged = outcome.delta
    for name in da.layers:
        expect = 0.7 * da.layers[name].full + 0.5 * db.layers[name].full
        assert torch.allclose(merged.layers[name].full, expect, atol=1e-7)
    assert torch.equal(merged.tokens["<new2>"], db.tokens["<new1>"])
    assert merged.base_model == "tiny" and merged.base_fingerprint == da.base_fingerprint
    assert merged.provenance == {
        "merge": {
            "method": "sum",
            "inputs": [
                {"path": str(a), "sha256": hashlib.sha256(a.read_bytes()).hexdigest(), "scale": 0.7},
                {"path": str(b), "sha256": hashlib.sha256(b.read_bytes()).hexdigest(), "scale": 0.5},
            ],
            "renamed": {str(b): {"<new1>": "<new2>"}},
        }
    }
    assert outcome.doc["tokens"] == ["<new1>", "<new2>"] and len(outcome.doc["layers"]) == 14


def test_a_dry_run_analyses_and_merges_nothing(inputs):
    captions = ["a photo of a house", "a red car on a road", "two birds in a tree"]
    outcome, _, warned, logged = _merge(
        MergeRequest("closed-form", [(p, 1.0) for p in inputs], captions=captions, dry_run=True)
    )
    doc = outcome.doc
    assert outcome.delta is None and doc["dry_run"] is True
    assert doc["reg_captions"] == 3 and doc["target_rows"] == 12  # 2 concepts x 2 prompts x (noun, token, EOT)
    assert 0 <= doc["target_overlap"] <= 1
    # three captions' rows cannot span the 32 text dimensions: the system is singular, a ridge is added and said
    assert doc["ridge"]["gram"] > 0 and warned[-1].startswith("the system was ill-conditioned; a relative ridge")
    assert all(v == {"ranks": [None, None]} for v in doc["layers"].values())  # no layer solved
    assert logged[-1].startswith("target prompts: 12 text rows")


def test_least_squares_records_weights_and_what_it_solved_with(inputs):
    captions = ["a photo of a house", "a red car on a road"]
    request = MergeRequest("least-squares", [(inputs[0], 2.0), (inputs[1], 1.0)], captions=captions, base_weight=0.5)
    outcome, *_ = _merge(request)
    merge = outcome.delta.provenance["merge"]
    assert [i["weight"] for i in merge["inputs"]] == [2.0, 1.0]
    assert merge["reg_captions"] == "cdtool default" and merge["base_weight"] == 0.5
    assert merge["reg_rows"] == outcome.doc["reg_rows"] == 2 * 77  # every row of each caption
    assert set(merge["total"]) == {"max_own_error", "mean_reg_drift"} and len(merge["total"]["max_own_error"]) == 2
    assert outcome.doc["weights"] == [2.0, 1.0] and "largest_growth" in outcome.doc


def test_inputs_are_checked_as_given(inputs, tmp_path):
    a, b = inputs
    check_inputs("least-squares", [(a, 2.0), (b, 1.0)])
    (tmp_path / "link.safetensors").hardlink_to(a)
    with pytest.raises(UsageError, match=r"link.safetensors is given twice \(as .*cat.safetensors and "):
        check_inputs("sum", [(a, 1.0), (tmp_path / "link.safetensors", 1.0)])
    (tmp_path / "copy.safetensors").write_bytes(a.read_bytes())
    with pytest.raises(UsageError, match="copies of one delta"):
        check_inputs("sum", [(a, 1.0), (tmp_path / "copy.safetensors", 1.0)])
    with pytest.raises(UsageError, match=r"dog.safetensors:0: a least-squares weight must be above zero"):
        check_inputs("least-squares", [(a, 1.0), (b, 0.0)])
    check_inputs("sum", [(a, 1.0), (b, 0.0)])  # a scale of 0 is a scale
