"""`merge` and `compress` on the tiny model, through the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from cdtool.delta.file import LayerDelta, read_cdtool, write_cdtool
from cdtool.merge.deltas import target_prompts
from cdtool.merge.text_features import feature_rows
from cdtool.models.apply import apply_deltas
from cdtool.models.tiny import build_tiny_pipeline

NOUNS = ["cat", "dog", "car", "tree", "cup", "house", "chair", "bird", "lamp", "boat"]


def _write_concepts(tmp_path, make_delta, n, same_token=False, scale=0.05):
    paths = []
    for i in range(n):
        token = "<new1>" if same_token else f"<new{i + 1}>"
        d = make_delta(token=token, seed=10 + i, scale=scale)
        d.concepts[0]["class_noun"] = NOUNS[i]
        d.concepts[0]["prompts"] = [f"photo of a {token} {NOUNS[i]}"]
        p = tmp_path / f"c{i}.safetensors"
        write_cdtool(d, p)
        paths.append(p)
    return paths


def _kv_on_targets(pipe, token, noun):
    """attn2 key/value outputs of every layer on the concept's target rows."""
    out = []
    for prefix, subject in target_prompts(token, noun):
        n_prefix = len(pipe.tokenizer(prefix, add_special_tokens=False).input_ids) if prefix else 0
        rows = feature_rows(pipe.tokenizer, pipe.text_encoder, [prefix + subject], [1 + n_prefix])[0]
        for name, module in pipe.unet.named_modules():
            if name.endswith(("attn2.to_k", "attn2.to_v")):
                out.append(module(rows))
    return torch.cat([o.flatten() for o in out])


def test_merged_model_keeps_each_concepts_keys_and_values(cli, tmp_path, make_delta):
    paths = _write_concepts(tmp_path, make_delta, 2, same_token=True)
    out = tmp_path / "m.safetensors"
    r = cli("merge", f"{paths[0]}+{paths[1]}", "-o", out, "--json")
    doc = json.loads(r.stdout)
    assert doc["renamed"] == {str(paths[1]): {"<new1>": "<new2>"}}
    assert "renamed to <new2>" in r.stderr
    merged = read_cdtool(out)
    assert sorted(merged.tokens) == ["<new1>", "<new2>"]
    assert [c["token"] for c in merged.concepts] == ["<new1>", "<new2>"]
    assert merged.concepts[1]["prompts"] == ["photo of a <new2> dog"]
    assert merged.provenance["merge"]["renamed"] == {str(paths[1]): {"<new1>": "<new2>"}}
    assert doc["total"]["max_constraint_residual"] < 1e-5
    merged_pipe = build_tiny_pipeline()
    apply_deltas(merged_pipe, [(merged, 1.0)])
    base_pipe = build_tiny_pipeline()
    for i, (path, noun) in enumerate(zip(paths, NOUNS, strict=False)):
        own = build_tiny_pipeline()
        d = read_cdtool(path)
        d.tokens = {f"<new{i + 1}>": d.tokens["<new1>"]}  # the merged file's name for it
        apply_deltas(own, [(d, 1.0)])
        mine = _kv_on_targets(merged_pipe, f"<new{i + 1}>", noun)
        theirs = _kv_on_targets(own, f"<new{i + 1}>", noun)
        assert torch.allclose(mine, theirs, atol=1e-4), (mine - theirs).abs().max()
        # ... which is a real change: the base model's outputs differ
        apply_deltas(base_pipe, [(type(d)(tokens={f"<new{i + 1}>": d.tokens[f"<new{i + 1}>"]}), 1.0)])
        assert not torch.allclose(_kv_on_targets(base_pipe, f"<new{i + 1}>", noun), theirs, atol=1e-3)


@pytest.mark.parametrize("n", [3, 10])
def test_many_concepts(cli, tmp_path, make_delta, n):
    paths = _write_concepts(tmp_path, make_delta, n)
    out = tmp_path / "m.safetensors"
    r = cli("merge", *paths, "-o", out, "--json")
    doc = json.loads(r.stdout)
    assert len(read_cdtool(out).tokens) == n
    assert doc["target_rows"] == n * 6  # "<newK> noun" + EOT, "photo of a" form: 3 rows each
    if n * 6 <= 32:
        assert doc["total"]["max_constraint_residual"] < 1e-5
    else:
        # the tiny model's text features have 32 dimensions: 60 constraints cannot all hold, and
        # cdtool says so (on SD1.5's 768 dimensions they do: see test_closed_form)
        assert "exceed the text feature size 32" in r.stderr and doc["ridge"]["targets"] > 0


def test_sum_and_scales(cli, tmp_path, make_delta):
    a, b = _write_concepts(tmp_path, make_delta, 2)
    out = tmp_path / "s.safetensors"
    cli("merge", f"{a}:0.7+{b}:0.5", "--method", "sum", "-o", out)
    merged, da, db = read_cdtool(out), read_cdtool(a), read_cdtool(b)
    for name in da.layers:
        expect = 0.7 * da.layers[name].full + 0.5 * db.layers[name].full
        assert torch.allclose(merged.layers[name].full, expect, atol=1e-7)
    assert merged.base_fingerprint == da.base_fingerprint


def test_dry_run_writes_nothing(cli, tmp_path, make_delta):
    a, b = _write_concepts(tmp_path, make_delta, 2)
    r = cli("merge", a, b, "-o", tmp_path / "m.safetensors", "--dry-run")
    assert "concept:   <new1> (cat)" in r.stdout and "largest cross-concept cosine" in r.stdout
    assert not (tmp_path / "m.safetensors").exists()


def test_closed_form_refuses_other_layers_sum_accepts(cli, tmp_path, make_delta):
    a, b = _write_concepts(tmp_path, make_delta, 2)
    d = read_cdtool(b)
    d.layers["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"] = LayerDelta(full=torch.zeros(32, 32))
    d.base_fingerprint = ""
    write_cdtool(d, b)
    r = cli("merge", a, b, "-o", tmp_path / "m.safetensors", code=1)
    assert "attn2.to_q" in r.stderr and "--method sum" in r.stderr
    cli("merge", a, b, "-o", tmp_path / "m.safetensors", "--method", "sum")


# (what the second input records: its base model and fingerprint; the error line, given its path)
OTHER_BASES = {
    "another-model": (
        "some/other-model",
        None,
        lambda b: (
            "Error: the inputs were made for different base models (some/other-model, tiny); they cannot be merged"
        ),
    ),
    "another-fingerprint": (
        "tiny",
        "f" * 64,
        lambda b: (
            f"Error: {b} was made for another base model than tiny (fingerprint mismatch); inputs with different bases are refused"
        ),
    ),
}


@pytest.mark.parametrize("case", list(OTHER_BASES))
def test_different_bases_refused(cli, tmp_path, make_delta, case):
    from helpers import one_error

    base_model, fingerprint, error = OTHER_BASES[case]
    a, b = _write_concepts(tmp_path, make_delta, 2)
    d = read_cdtool(b)
    d.base_model, d.base_fingerprint = base_model, fingerprint or d.base_fingerprint
    write_cdtool(d, b)
    r = cli("merge", a, b, "-o", tmp_path / "m.safetensors", code=1)
    assert one_error(r) == error(b)
    assert not (tmp_path / "m.safetensors").exists()


def test_compress_then_merge_and_sample(cli, tmp_path, make_delta):
    a, b = _write_concepts(tmp_path, make_delta, 2)
    r = cli("compress", a, "-o", tmp_path / "a4.safetensors", "--rank", "4", "--json")
    doc = json.loads(r.stdout)
    assert all(v["rank"] == 4 and v["stored"] == "factors" for v in doc["layers"].values())
    assert doc["size_after"] < doc["size_before"]
    small = read_cdtool(tmp_path / "a4.safetensors")
    for name, v in doc["layers"].items():  # fp32 factors: 4 bytes per number of up [out, 4] and down [4, in]
        out_dim, in_dim = v["shape"]
        assert (
            v["bytes"]
            == 4 * 4 * (out_dim + in_dim)
            == small.layers[name].up.numel() * 4 + small.layers[name].down.numel() * 4
        )
    assert doc["capped"] == []
    assert torch.equal(small.tokens["<new1>"], read_cdtool(a).tokens["<new1>"])
    cli("merge", tmp_path / "a4.safetensors", b, "-o", tmp_path / "m.safetensors")
    cli("compress", tmp_path / "m.safetensors", "-o", tmp_path / "m8.safetensors", "--fro", "0.99", "--dtype", "fp16")
    cli("sample", "a <new1> cat", "-d", tmp_path / "m8.safetensors", "-o", tmp_path / "s", "--n", "1", "--steps", "2")
    assert (tmp_path / "s" / "000-a-new1-cat-257ab73f-s0.png").exists()


def test_compress_cap_and_exactness(cli, tmp_path, make_delta):
    (a,) = _write_concepts(tmp_path, make_delta, 1)
    r = cli("compress", a, "-o", tmp_path / "big.safetensors", "--rank", "500", "--json")
    doc = json.loads(r.stdout)
    size_in, size_out = doc["size_before"], doc["size_after"]
    assert r.stderr == (
        "--rank 500 exceeds the size of 14 layers; they keep their full rank\n"
        "14 layers: rank 32, energy kept 1.000, frobenius kept 1.000, 14 stored dense (factors would not be "
        f"smaller); {size_in:,} -> {size_out:,} bytes ({size_out / size_in:.1%})\n"
    )
    assert {v["stored"] for v in doc["layers"].values()} == {"dense"}
    assert len(doc["capped"]) == 14
    full = read_cdtool(tmp_path / "big.safetensors")
    orig = read_cdtool(a)
    for name, layer in orig.layers.items():
        # nothing was cut: the very ΔW, stored as it came (factors of full rank would be larger)
        assert full.layers[name].rank is None and torch.equal(full.layers[name].full, layer.full)
    cli("compress", a, "-o", tmp_path / "e1.safetensors", "--energy", "1.0")
    again = tmp_path / "again.safetensors"
    cli("compress", tmp_path / "e1.safetensors", "-o", again, "--rank", "2")
    direct = tmp_path / "direct.safetensors"
    cli("compress", a, "-o", direct, "--rank", "2")
    for name in orig.layers:
        assert torch.allclose(
            read_cdtool(again).layers[name].dense(), read_cdtool(direct).layers[name].dense(), atol=1e-5
        )
    cli("compress", a, "-o", tmp_path / "x.safetensors", "--rank", "2", "--fro", "0.5", code=2)


def test_hub_base_offline_is_one_clear_error(cli, tmp_path, make_delta):
    a, b = _write_concepts(tmp_path, make_delta, 2)
    r = cli("merge", a, b, "-o", tmp_path / "m.safetensors", "--model", "no-such-org/no-such-model", code=1)
    assert "Hugging Face hub" in r.stderr and "hf download" in r.stderr
    assert not (tmp_path / "m.safetensors").exists()


def test_least_squares_merge_is_the_fit_over_every_row_the_unet_reads(cli, tmp_path, make_delta):
    from cdtool.merge.deltas import concept_prompts
    from cdtool.merge.least_squares import least_squares_merge
    from cdtool.models.conditioning import TextSide, padded_rows

    a, b = _write_concepts(tmp_path, make_delta, 2)
    captions = tmp_path / "captions.txt"
    captions.write_text("a photo of a tree\na red car on a road\nan old house\n")
    out = tmp_path / "m.safetensors"
    r = cli("merge", f"{a}+{b}:2", "--method", "least-squares", "--base-weight", "0.3", "--reg-captions", captions,
            "-o", out, "--json")  # fmt: skip
    doc = json.loads(r.stdout)
    assert doc["weights"] == [1.0, 2.0] and doc["base_weight"] == 0.3
    assert doc["concept_rows"] == [2 * 77, 2 * 77]  # recorded caption and "<newK> noun"; "photo of a" is the caption
    merged = read_cdtool(out)
    assert [i["weight"] for i in merged.provenance["merge"]["inputs"]] == [1.0, 2.0]
    assert merged.provenance["merge"]["base_weight"] == 0.3
    # the same fit, computed directly from the pipeline's padded text features, layer by layer
    pipe = build_tiny_pipeline()
    reg_rows = padded_rows(TextSide.of(pipe), captions.read_text().splitlines())
    inputs = [read_cdtool(a), read_cdtool(b)]
    apply_deltas(pipe, [(type(d)(tokens=d.tokens), 1.0) for d in inputs])  # the tokens alone
    rows = [padded_rows(TextSide.of(pipe), concept_prompts(d)) for d in inputs]
    for name, layer in merged.layers.items():
        w0 = pipe.unet.get_submodule(name[len("unet.") :]).weight.detach().double()
        ws = [w0 + d.layers[name].full.double() for d in inputs]
        direct = least_squares_merge(w0, ws, rows, reg_rows, (1.0, 2.0), 0.3) - w0
        assert torch.allclose(layer.full.double(), direct, atol=1e-6), name
    own = doc["total"]["max_own_error"]
    assert len(own) == 2 and all(0 < e < 1 for e in own) and doc["total"]["mean_reg_drift"] > 0


def test_base_weight_belongs_to_least_squares(cli, tmp_path, make_delta):
    a, b = _write_concepts(tmp_path, make_delta, 2)
    r = cli("merge", a, b, "-o", tmp_path / "m.safetensors", "--base-weight", "1", code=2)
    assert r.stderr.strip() == "Error: --base-weight belongs to --method least-squares"


def test_merge_warns_when_two_concepts_cannot_be_told_apart(cli, tmp_path, make_delta):
    # the same initialiser, barely trained: identical token rows and class, so identical target rows
    paths = []
    for token in ("<new1>", "<new2>"):
        p = tmp_path / f"{token[1:-1]}.safetensors"
        write_cdtool(make_delta(token=token, seed=3), p)
        paths.append(p)
    r = cli("merge", *paths, "-o", tmp_path / "m.safetensors")
    assert f"Warning: {paths[0]} and {paths[1]} have nearly parallel target rows (cosine 1.000000)" in r.stderr
    assert "retrain one with another --init-token" in r.stderr
    r = cli("merge", *_write_concepts(tmp_path, make_delta, 2), "-o", tmp_path / "ok.safetensors")
    assert "nearly parallel" not in r.stderr and "fight each other" not in r.stderr


def test_merge_warns_when_the_merged_delta_blows_up(cli, tmp_path, make_delta):
    # nearly (not exactly) parallel targets asking for very different outputs: d Cᵀ is
    # ill-conditioned and the closed form's ΔW changes ordinary captions far more than its inputs
    a = make_delta(token="<new1>", seed=3)
    b = make_delta(token="<new2>", seed=4)
    b.tokens["<new2>"] = a.tokens["<new1>"] + 1e-4 * b.tokens["<new2>"]
    b.base_fingerprint = a.base_fingerprint
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_cdtool(a, pa)
    write_cdtool(b, pb)
    r = cli("merge", pa, pb, "-o", tmp_path / "m.safetensors", "--json")
    growth = json.loads(r.stdout)["largest_growth"]
    assert growth["ratio"] > 10
    assert (
        f"Warning: in {growth['layer']} the merged delta changes the keys/values of ordinary captions "
        f"{growth['ratio']:.0f}x as much as its largest input does" in r.stderr
    )


def test_compress_table_on_a_terminal_summary_line_elsewhere(cli, tmp_path, make_delta, monkeypatch):
    from rich.console import Console

    from cdtool import console

    (a,) = _write_concepts(tmp_path, make_delta, 1)
    plain = cli("compress", a, "-o", tmp_path / "p.safetensors", "--rank", "2")
    assert plain.stderr.count("\n") == 1 and plain.stderr.startswith("14 layers: rank 2, energy kept ")
    monkeypatch.setattr(
        console, "_err", Console(stderr=True, force_terminal=True, color_system=None, width=250, highlight=False)
    )
    shown = cli("compress", a, "-o", tmp_path / "t.safetensors", "--rank", "2").stderr
    lines = shown.splitlines()
    assert lines[0].strip() == "cdtool compress" and lines[-1] == plain.stderr.strip()
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in lines if "attn2.to_" in line]
    assert len(rows) == 14
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    row = next(r for r in rows if r[0] == name)
    assert row[1:3] == ["32x32", "2"] and row[5:] == ["factors", f"{4 * 2 * (32 + 32):,}"]
    quiet = cli("compress", a, "-o", tmp_path / "q.safetensors", "--rank", "2", "-q", "--force").stderr
    assert quiet == ""


def test_a_half_precision_base_folder_is_read_as_stored_and_merges(cli, tmp_path, make_delta):
    from cdtool.delta.base import load_base_params

    folder = tmp_path / "tiny-fp16"
    half = build_tiny_pipeline().to(torch.float16)
    half.save_pretrained(folder)
    name = next(f"unet.{n}" for n, _ in half.unet.named_parameters() if n.endswith("attn2.to_k.weight"))
    stored, widened = (
        load_base_params(str(folder), [name], as_stored=True)[name],
        load_base_params(str(folder), [name])[name],
    )
    assert stored.dtype == torch.float16 and widened.dtype == torch.float32 and torch.equal(stored.float(), widened)
    paths = _write_concepts(tmp_path, make_delta, 2)  # fingerprints are taken in float16: they match this base
    for method in ("closed-form", "least-squares"):
        out = tmp_path / f"{method}.safetensors"
        doc = json.loads(
            cli("merge", *map(str, paths), "--model", folder, "--method", method, "-o", out, "--json").stdout
        )
        assert read_cdtool(out).layers and all(
            layer.full.dtype == torch.float32 for layer in read_cdtool(out).layers.values()
        )
        if method == "closed-form":
            assert doc["total"]["max_constraint_residual"] < 1e-5
