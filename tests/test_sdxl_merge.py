"""`merge` on SDXL (tiny-xl): the closed form's constraints hold on the features the UNet receives
(StableDiffusionXLPipeline.encode_prompt's), the least-squares fit is the one over the pipeline's
padded features, and the regularisation Gram matrices are cached per (both encoders, captions)."""

from __future__ import annotations

import copy
import json

import torch

from cdtool.delta.file import Delta, read_cdtool, write_cdtool
from cdtool.merge.deltas import concept_prompts, target_prompts
from cdtool.models.apply import apply_deltas
from cdtool.models.conditioning import TextSide
from cdtool.models.tiny import build_tiny_xl_pipeline

NOUNS = ["cat", "dog"]


def _write_concepts(tmp_path, make_xl_delta, scale=0.05):
    paths = []
    for i, noun in enumerate(NOUNS):
        token = f"<new{i + 1}>"
        d = make_xl_delta(token=token, seed=10 + i, scale=scale)
        d.concepts[0]["class_noun"] = noun
        d.concepts[0]["prompts"] = [f"photo of a {token} {noun}"]
        write_cdtool(d, tmp_path / f"c{i}.safetensors")
        paths.append(tmp_path / f"c{i}.safetensors")
    return paths


def _features(pipe, prompts):
    """What the pipeline gives the UNet's cross-attention: [B, 77, 80]."""
    return pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)[0]


def _kv_on_targets(pipe, token, noun):
    """attn2 key/value outputs of every layer on the concept's target rows (subject to end-of-text)."""
    out = []
    for prefix, subject in target_prompts(token, noun):
        n_prefix = len(pipe.tokenizer(prefix, add_special_tokens=False).input_ids) if prefix else 0
        n = len(pipe.tokenizer(prefix + subject).input_ids)
        rows = _features(pipe, [prefix + subject])[0, 1 + n_prefix : n]
        for name, module in pipe.unet.named_modules():
            if name.endswith(("attn2.to_k", "attn2.to_v")):
                out.append(module(rows))
    return torch.cat([o.flatten() for o in out])


def test_closed_form_keeps_each_concept_on_the_features_the_unet_receives(cli, tmp_path, make_xl_delta):
    paths = _write_concepts(tmp_path, make_xl_delta)
    out = tmp_path / "m.safetensors"
    doc = json.loads(cli("merge", *paths, "-o", out, "--json").stdout)
    assert doc["total"]["max_constraint_residual"] < 1e-5
    assert doc["target_rows"] == 2 * 6  # "<newK> noun" + end-of-text, and the "photo of a" form: 3 rows each
    merged = read_cdtool(out)
    assert merged.base_kind == "sdxl" and sorted(merged.tokens_2) == ["<new1>", "<new2>"]
    merged_pipe = build_tiny_xl_pipeline()
    apply_deltas(merged_pipe, [(merged, 1.0)])
    base_pipe = build_tiny_xl_pipeline()
    with torch.no_grad():
        for i, (path, noun) in enumerate(zip(paths, NOUNS, strict=True)):
            own = build_tiny_xl_pipeline()
            d = read_cdtool(path)
            apply_deltas(own, [(d, 1.0)])
            token = f"<new{i + 1}>"
            mine, theirs = _kv_on_targets(merged_pipe, token, noun), _kv_on_targets(own, token, noun)
            assert torch.allclose(mine, theirs, atol=1e-4), (mine - theirs).abs().max()
            tokens_only = Delta(tokens=d.tokens, tokens_2=d.tokens_2)  # ... a real change: the base's differ
            apply_deltas(base_pipe, [(tokens_only, 1.0)])
            assert not torch.allclose(_kv_on_targets(base_pipe, token, noun), theirs, atol=1e-3)


def test_least_squares_is_the_fit_over_the_pipelines_padded_features(cli, tmp_path, make_xl_delta):
    from cdtool.merge.least_squares import least_squares_merge

    a, b = _write_concepts(tmp_path, make_xl_delta)
    captions = tmp_path / "captions.txt"
    captions.write_text("a photo of a tree\na red car on a road\nan old house\n")
    out = tmp_path / "m.safetensors"
    r = cli("merge", f"{a}+{b}:2", "--method", "least-squares", "--reg-captions", captions, "-o", out, "--json")
    assert json.loads(r.stdout)["concept_rows"] == [2 * 77, 2 * 77]
    merged = read_cdtool(out)
    pipe = build_tiny_xl_pipeline()
    with torch.no_grad():
        reg_rows = _features(pipe, captions.read_text().splitlines()).reshape(-1, 80)
        inputs = [read_cdtool(a), read_cdtool(b)]
        apply_deltas(pipe, [(Delta(tokens=d.tokens, tokens_2=d.tokens_2), 1.0) for d in inputs])
        rows = [_features(pipe, concept_prompts(d)).reshape(-1, 80) for d in inputs]
    for name, layer in merged.layers.items():
        w0 = pipe.unet.get_submodule(name[len("unet.") :]).weight.detach().double()
        ws = [w0 + d.layers[name].full.double() for d in inputs]
        direct = least_squares_merge(w0, ws, rows, reg_rows, (1.0, 2.0), 0.3) - w0
        assert torch.allclose(layer.full.double(), direct, atol=1e-6), name


def test_the_gram_cache_is_keyed_by_both_encoders(tiny_xl_pipe):
    from cdtool.merge.text_features import cached_reg_gram, gram
    from cdtool.models.conditioning import text_rows

    captions = ["a cat on a mat", "two dogs in the snow", "a house by the sea"]
    text = TextSide.of(tiny_xl_pipe)
    a, n, cached = cached_reg_gram(text, captions)
    assert not cached and a.shape == (80, 80)
    assert torch.equal(a, gram(text_rows(text, captions))[0]) and n == sum(
        len(tiny_xl_pipe.tokenizer(c).input_ids) - 1 for c in captions
    )
    assert cached_reg_gram(text, captions)[2]
    other = copy.deepcopy(tiny_xl_pipe.text_encoder_2)  # the first encoder the same, the second not
    with torch.no_grad():
        other.text_model.encoder.layers[0].mlp.fc1.weight.mul_(1.5)
    a2, _, cached2 = cached_reg_gram(TextSide(text.tokenizers, [text.encoders[0], other]), captions)
    assert not cached2 and not torch.allclose(a2, a)
