"""Applying deltas: equal to diffusers' Custom Diffusion processors; checks before changes."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor

from cdtool.delta.base import pipeline_params
from cdtool.errors import CdtoolError
from cdtool.models.apply import apply_deltas


def _unet_out(pipe, ids: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    with torch.no_grad():
        cond = pipe.text_encoder(ids)[0]
        return pipe.unet(x, torch.tensor([500]), encoder_hidden_states=cond).sample


def test_apply_matches_diffusers_custom_diffusion_processors(fresh_tiny, make_delta):
    d = make_delta(scale=0.05)
    pipe = fresh_tiny
    # Reference: diffusers' own Custom Diffusion processors, loaded by hand with W0 + ΔW.
    params = {k: v.detach().clone() for k, v in pipeline_params(pipe).items()}
    procs = {}
    for name, proc in pipe.unet.attn_processors.items():
        path = name[: -len(".processor")]
        if path.endswith("attn2"):
            attn = pipe.unet.get_submodule(path)
            p = CustomDiffusionAttnProcessor(
                train_kv=True,
                train_q_out=False,
                hidden_size=attn.to_k.out_features,
                cross_attention_dim=attn.to_k.in_features,
            )
            p.to_k_custom_diffusion.weight.data = (
                params[f"unet.{path}.to_k.weight"] + d.layers[f"unet.{path}.to_k"].full
            )
            p.to_v_custom_diffusion.weight.data = (
                params[f"unet.{path}.to_v.weight"] + d.layers[f"unet.{path}.to_v"].full
            )
            procs[name] = p
        else:
            procs[name] = proc
    tok = pipe.tokenizer
    tok.add_tokens(["<new1>"])
    pipe.text_encoder.resize_token_embeddings(len(tok))
    pipe.text_encoder.get_input_embeddings().weight.data[-1] = d.tokens["<new1>"][0]
    ids = tok("photo of a <new1> cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    original = pipe.unet.attn_processors
    pipe.unet.set_attn_processor(procs)
    reference = _unet_out(pipe, ids)
    pipe.unet.set_attn_processor(original)
    # cdtool: direct weight update on a fresh copy of the model
    from cdtool.models.tiny import build_tiny_pipeline

    ours = build_tiny_pipeline()
    apply_deltas(ours, [(d, 1.0)])
    ids2 = ours.tokenizer("photo of a <new1> cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, ids2)
    out = _unet_out(ours, ids2)
    assert torch.allclose(out, reference, atol=1e-5), (out - reference).abs().max()
    assert not torch.allclose(out, _unet_out(build_tiny_pipeline(), ids2[:, :1].expand(1, 77)), atol=1e-3)


def test_scale_and_two_deltas(fresh_tiny, make_delta):
    a, b = make_delta(token="<new1>", seed=1), make_delta(token="<new2>", seed=2)
    name = next(iter(a.layers))
    w0 = fresh_tiny.unet.get_submodule(name[5:]).weight.detach().clone()
    apply_deltas(fresh_tiny, [(a, 0.5), (b, 2.0)])
    w = fresh_tiny.unet.get_submodule(name[5:]).weight
    assert torch.allclose(w, w0 + 0.5 * a.layers[name].full + 2.0 * b.layers[name].full, atol=1e-6)
    assert len(fresh_tiny.tokenizer) == 49410


def test_existing_word_is_refused_and_nothing_changes(fresh_tiny, make_delta):
    d = make_delta(token="cat")
    before = {k: v.detach().clone() for k, v in pipeline_params(fresh_tiny).items()}
    with pytest.raises(CdtoolError, match="already exists"):
        apply_deltas(fresh_tiny, [(d, 1.0)])
    after = pipeline_params(fresh_tiny)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(fresh_tiny.tokenizer) == 49408


def test_conflicting_token_definitions(fresh_tiny, make_delta):
    with pytest.raises(CdtoolError, match="defined differently"):
        apply_deltas(fresh_tiny, [(make_delta(seed=1), 1.0), (make_delta(seed=2), 1.0)])


def test_base_mismatch_is_caught(fresh_tiny, make_delta):
    d = make_delta()
    with torch.no_grad():
        fresh_tiny.unet.get_submodule(next(iter(d.layers))[5:]).weight.add_(0.1)
    with pytest.raises(CdtoolError, match="was made for the base model tiny"):
        apply_deltas(fresh_tiny, [(d, 1.0)])
    warnings = []
    apply_deltas(fresh_tiny, [(d, 1.0)], ignore_base_mismatch=True, warn=warnings.append)
    assert warnings and "applying anyway" in warnings[0]


def test_multi_vector_token_expands_in_prompts(fresh_tiny, make_delta):
    d = make_delta()
    d.tokens["<new1>"] = torch.randn(3, 32)
    apply_deltas(fresh_tiny, [(d, 1.0)])
    assert fresh_tiny.maybe_convert_prompt("a <new1> cat", fresh_tiny.tokenizer) == "a <new1> <new1>_1 <new1>_2 cat"
