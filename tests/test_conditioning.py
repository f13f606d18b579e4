"""The conditioning the UNet receives: cdtool's encoding equals each real diffusers pipeline's own."""

from __future__ import annotations

import pytest
import torch

from cdtool.models.conditioning import TextSide, encode, padded_rows, text_rows, time_ids, unet_inputs

PROMPTS = ["a photo of a cat", "dog", "a watercolour painting of a red barn in the snow at dusk"]


def test_sd1_and_sd2_encoding_is_the_pipelines(tiny_pipe, tiny_sd2_pipe):
    for pipe in (tiny_pipe, tiny_sd2_pipe):
        ours = encode(TextSide.of(pipe), PROMPTS)
        theirs, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
        assert ours.pooled is None
        assert torch.equal(ours.hidden, theirs)
    # SD 2.x's OpenCLIP tokenizer pads with "!" (id 0), SD 1.x's with end-of-text
    assert tiny_sd2_pipe.tokenizer("a", padding="max_length").input_ids[:4] == [49406, 320, 49407, 0]
    assert tiny_pipe.tokenizer("a", padding="max_length").input_ids[:4] == [49406, 320, 49407, 49407]


def test_sdxl_encoding_is_the_pipelines(tiny_xl_pipe):
    ours = encode(TextSide.of(tiny_xl_pipe), PROMPTS)
    hidden, _, pooled, _ = tiny_xl_pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    assert ours.hidden.shape == (3, 77, 32 + 48) and ours.pooled.shape == (3, 48)
    assert torch.equal(ours.hidden, hidden)
    assert torch.equal(ours.pooled, pooled)
    assert TextSide.of(tiny_xl_pipe).width == 80 and TextSide.of(tiny_xl_pipe).xl


def test_sdxl_time_ids_are_the_pipelines(tiny_xl_pipe):
    theirs = tiny_xl_pipe._get_add_time_ids((96, 80), (8, 4), (64, 64), torch.float32, text_encoder_projection_dim=48)
    assert torch.equal(time_ids((96, 80), (8, 4), (64, 64))[None], theirs)


def test_unet_inputs_drive_the_sdxl_unet_as_the_pipeline(tiny_xl_pipe):
    """The UNet's prediction from unet_inputs (the pipeline's defaults: original and target size the
    image's, crop at 0, 0) equals its prediction inside the pipeline."""
    pipe = tiny_xl_pipe
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = {}

    def grab(module, args, kwargs, out):
        seen.setdefault("x", args[0].clone())
        seen.setdefault("t", args[1])
        seen.setdefault("pred", out[0].clone())

    handle = pipe.unet.register_forward_hook(grab, with_kwargs=True)
    try:
        pipe("a cat", num_inference_steps=1, guidance_scale=1.0, height=64, width=64, latents=latents.clone())
    finally:
        handle.remove()
    enc = encode(TextSide.of(pipe), ["a cat"])
    with torch.no_grad():
        pred = pipe.unet(seen["x"], seen["t"], **unet_inputs(enc, time_ids((64, 64), (0, 0), (64, 64))[None])).sample
    assert torch.allclose(pred, seen["pred"], atol=1e-6)


@pytest.mark.parametrize("which", ["tiny_pipe", "tiny_sd2_pipe", "tiny_xl_pipe"])
def test_merge_rows_are_the_pipelines_features(request, which):
    """The closed form's rows (subject to end-of-text) and the least-squares rows (every padded row)
    are rows of the conditioning the pipeline gives the UNet."""
    pipe = request.getfixturevalue(which)
    text = TextSide.of(pipe)
    if text.xl:
        full = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)[0]
    else:
        full = pipe.encode_prompt(PROMPTS, "cpu", 1, False)[0]
    rows = text_rows(text, PROMPTS, starts=[1, 1, 4])
    for prompt, r, start, f in zip(PROMPTS, rows, [1, 1, 4], full, strict=True):
        n = len(pipe.tokenizer(prompt).input_ids)  # start-of-text, the text, end-of-text
        assert r.shape == (n - start, text.width)
        assert torch.allclose(r, f[start:n], atol=1e-6)
    assert torch.equal(padded_rows(text, PROMPTS), full.reshape(-1, text.width))


def test_sdxl_rows_end_at_the_shared_end_of_text(tiny_xl_pipe):
    """The second tokenizer pads with "!" where the first repeats end-of-text: both put the text's
    end-of-text at the same position, where the closed form's rows end."""
    a = tiny_xl_pipe.tokenizer("a cat", padding="max_length").input_ids
    b = tiny_xl_pipe.tokenizer_2("a cat", padding="max_length").input_ids
    assert a[:4] == b[:4] == [49406, 320, 2368, 49407]
    assert set(a[4:]) == {49407} and set(b[4:]) == {0}
    assert text_rows(TextSide.of(tiny_xl_pipe), ["a cat"])[0].shape == (3, 80)
