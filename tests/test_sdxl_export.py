"""SDXL exports, each loaded by the real loader: the diffusers LoRA and the kohya LoRA by
StableDiffusionXLPipeline.load_lora_weights (UNet outputs equal to cdtool's own application), the
two-encoder embedding (clip_l, clip_g) by load_textual_inversion into each encoder."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from cdtool.delta.file import Delta, LayerDelta, write_cdtool
from cdtool.models.apply import apply_deltas
from cdtool.models.tiny import build_tiny_xl_pipeline
from cdtool.train.recipes import TEXT_LORA_TARGETS

PROMPT = "a photo of a <new1> cat"


def _unet_out(pipe, prompt: str = PROMPT) -> torch.Tensor:
    """The UNet's prediction on the pipeline's own conditioning of `prompt` (one fixed noisy latent)."""
    hidden, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    ids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), torch.float32, text_encoder_projection_dim=48)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return pipe.unet(
            x,
            torch.tensor([400]),
            encoder_hidden_states=hidden,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": ids},
        ).sample


def _ours(delta: Delta) -> torch.Tensor:
    pipe = build_tiny_xl_pipeline()
    apply_deltas(pipe, [(delta, 1.0)])
    return _unet_out(pipe)


def _load_embedding(pipe, path, token="<new1>") -> None:
    """An SDXL embedding as diffusers' documentation loads one: each part into its encoder."""
    state = load_file(str(path))
    pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(
        state["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )


def test_diffusers_lora_and_embedding_load_into_the_sdxl_pipeline(cli, tmp_path, make_xl_delta):
    d = make_xl_delta(scale=0.05)
    write_cdtool(d, tmp_path / "xl.safetensors")
    files = cli("export", tmp_path / "xl.safetensors", "--to", "diffusers-lora", "-o", tmp_path / "out").stdout.split()
    assert files == [
        str(tmp_path / "out" / "pytorch_lora_weights.safetensors"),
        str(tmp_path / "out" / "new1.safetensors"),
        str(tmp_path / "out" / "README.md"),
    ]
    emb = load_file(str(tmp_path / "out" / "new1.safetensors"))
    assert {k: v.shape for k, v in emb.items()} == {"clip_l": (1, 32), "clip_g": (1, 48)}
    pipe = build_tiny_xl_pipeline()
    pipe.load_lora_weights(str(tmp_path / "out"))
    _load_embedding(pipe, tmp_path / "out" / "new1.safetensors")
    theirs, ours = _unet_out(pipe), _ours(d)
    assert torch.allclose(theirs, ours, atol=1e-5), (theirs - ours).abs().max()
    assert not torch.allclose(ours, _unet_out(build_tiny_xl_pipeline()), atol=1e-3)  # the delta does something


def test_kohya_sdxl_lora_loads_with_the_original_unets_names(cli, tmp_path, make_xl_delta):
    d = make_xl_delta(scale=0.05)
    write_cdtool(d, tmp_path / "xl.safetensors")
    cli("export", tmp_path / "xl.safetensors", "--to", "kohya", "-o", tmp_path / "k")
    state = load_file(str(tmp_path / "k" / "lora.safetensors"))
    # tiny-xl: one layer per block, so down_blocks.1.attentions.0 is input block 1 + 1 * 2 + 0
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k.lora_down.weight" in state
    assert "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_v.alpha" in state
    assert not any("down_blocks" in k or "up_blocks" in k for k in state)
    emb = load_file(str(tmp_path / "k" / "embeddings" / "new1.safetensors"))
    assert sorted(emb) == ["clip_g", "clip_l"]
    pipe = build_tiny_xl_pipeline()
    pipe.load_lora_weights(str(tmp_path / "k"), weight_name="lora.safetensors")
    _load_embedding(pipe, tmp_path / "k" / "embeddings" / "new1.safetensors")
    assert torch.allclose(_unet_out(pipe), _ours(d), atol=1e-5)


def test_the_sdxl_embedding_loads_into_both_encoders(cli, tmp_path, make_xl_delta):
    d = make_xl_delta()
    tokens_only = Delta(tokens=d.tokens, tokens_2=d.tokens_2, base_kind="sdxl", base_model="tiny-xl",
                        base_fingerprint="", concepts=d.concepts)  # fmt: skip
    write_cdtool(tokens_only, tmp_path / "ti.safetensors")
    cli("export", tmp_path / "ti.safetensors", "--to", "textual-inversion", "-o", tmp_path / "ti")
    for f in ("learned_embeds.safetensors", "new1.safetensors", "embeddings/new1.safetensors"):
        assert sorted(load_file(str(tmp_path / "ti" / f))) == ["clip_g", "clip_l"], f
    pipe = build_tiny_xl_pipeline()
    _load_embedding(pipe, tmp_path / "ti" / "learned_embeds.safetensors")
    ours = build_tiny_xl_pipeline()
    apply_deltas(ours, [(tokens_only, 1.0)])
    a = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    b = ours.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])


def test_text_encoder_loras_of_both_encoders_load_in_diffusers(cli, tmp_path, tiny_xl_pipe):
    """A DreamBooth-LoRA delta on both text encoders: diffusers' loader applies it as cdtool does."""
    g = torch.Generator().manual_seed(3)
    d = Delta(base_kind="sdxl", base_model="tiny-xl")
    for component, enc in (
        ("text_encoder", tiny_xl_pipe.text_encoder),
        ("text_encoder_2", tiny_xl_pipe.text_encoder_2),
    ):
        for name, module in enc.named_modules():
            if name.endswith(TEXT_LORA_TARGETS):  # what train --method dreambooth-lora --train-text-encoder adapts
                out, inp = module.weight.shape
                d.layers[f"{component}.{name}"] = LayerDelta(up=0.1 * torch.randn(out, 2, generator=g),
                                                             down=torch.randn(2, inp, generator=g))  # fmt: skip
    write_cdtool(d, tmp_path / "te.safetensors")
    ours = build_tiny_xl_pipeline()
    apply_deltas(ours, [(d, 1.0)])
    b = ours.encode_prompt("a cat", device="cpu", do_classifier_free_guidance=False)
    for target, weight_name in (("diffusers-lora", None), ("kohya", "lora.safetensors")):
        cli("export", tmp_path / "te.safetensors", "--to", target, "-o", tmp_path / target)
        pipe = build_tiny_xl_pipeline()
        pipe.load_lora_weights(str(tmp_path / target), weight_name=weight_name)
        a = pipe.encode_prompt("a cat", device="cpu", do_classifier_free_guidance=False)
        assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[2], b[2], atol=1e-5), target
    kohya = load_file(str(tmp_path / "kohya" / "lora.safetensors"))
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in kohya
    assert "lora_te2_text_model_encoder_layers_1_self_attn_v_proj.alpha" in kohya
    assert not torch.allclose(b[0], build_tiny_xl_pipeline().encode_prompt("a cat", device="cpu")[0], atol=1e-3)


def test_diffusers_custom_diffusion_and_official_exports_of_sdxl(cli, tmp_path, make_xl_delta, tiny_xl_pipe):
    from cdtool.delta.base import pipeline_params
    from cdtool.delta.importers import read_delta

    d = make_xl_delta(scale=0.05)
    write_cdtool(d, tmp_path / "xl.safetensors")
    out = tmp_path / "cd"
    cli("export", tmp_path / "xl.safetensors", "--to", "diffusers-custom-diffusion", "-o", out)
    pipe = build_tiny_xl_pipeline()
    pipe.unet.load_attn_procs(str(out), weight_name="pytorch_custom_diffusion_weights.bin", _pipeline=pipe)
    _load_embedding(pipe, out / "new1.safetensors")
    assert torch.allclose(_unet_out(pipe), _ours(d), atol=1e-5)
    base = {k: v.detach() for k, v in pipeline_params(tiny_xl_pipe).items()}
    back = read_delta(out).relative_to(base)  # and cdtool reads both back, token pair included
    assert back.kind == "sdxl" and torch.equal(back.tokens_2["<new1>"], d.tokens_2["<new1>"])
    for name, layer in d.layers.items():
        assert torch.allclose(back.layers[name].full, layer.full, atol=1e-6)
    cli("export", tmp_path / "xl.safetensors", "--to", "official", "-o", tmp_path / "delta.bin")
    official = torch.load(tmp_path / "delta.bin", weights_only=True)
    assert [r.shape for r in official["modifier_token"]["<new1>"]] == [(32,), (48,)]
    embedding = read_delta(out / "new1.safetensors")  # the two-encoder embedding alone
    assert embedding.kind == "sdxl" and torch.equal(embedding.tokens["<new1>"], d.tokens["<new1>"])


def test_kohya_counts_the_layers_per_block_of_an_sdxl_base(make_xl_delta, make_delta):
    from cdtool.export.folder import kohya_layers_per_block

    asked = []

    def choose() -> str:
        asked.append("tiny-xl")
        return "tiny-xl"

    assert kohya_layers_per_block(make_xl_delta(), None, choose) == 1 and asked == ["tiny-xl"]  # tiny-xl's UNet: 1
    imported = make_delta()
    imported.base_kind = ""  # an import records no kind: the base it was read against says
    assert kohya_layers_per_block(imported, "tiny-xl", choose) == 1 and len(asked) == 1
    assert kohya_layers_per_block(imported, "tiny", choose) == 2
    assert kohya_layers_per_block(imported, None, choose) == 2 and len(asked) == 1  # no base read: not asked
