"""The original Stable Diffusion single-file layout: diffusers' own reader takes back what cdtool
writes, on the built-in models (weights) and on Stable Diffusion 1.5's shapes (names, on the meta device)."""

from __future__ import annotations

import pytest
import torch

from cdtool.delta.naming import compvis_to_diffusers
from cdtool.errors import CdtoolError
from cdtool.export.single_file import rename, sd1_state, unet_to_original, vae_to_original

# Stable Diffusion 1.5's UNet and VAE configs (stable-diffusion-v1-5/stable-diffusion-v1-5).
SD15_UNET = dict(
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SD15_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=2,
    sample_size=512,
)


@pytest.fixture(scope="module")
def sd15_shapes():
    """SD1.5's UNet and VAE without weights (meta tensors: names and shapes only)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD15_VAE)


def test_sd15_unet_names(sd15_shapes):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = sd15_shapes[0]
    state = unet.state_dict()
    original = unet_to_original(state, unet.config)
    assert len(original) == 686  # the tensors under model.diffusion_model. of v1-5-pruned.safetensors
    for key in (
        "input_blocks.3.0.op.weight",  # the first downsampler
        "output_blocks.2.1.conv.weight",  # the upsampler of the up block without attention
        "output_blocks.5.2.conv.weight",  # one after an attention
        "middle_block.2.out_layers.3.weight",
        "input_blocks.4.0.skip_connection.weight",  # a resnet that changes width
        "time_embed.2.bias",
        "out.2.weight",
    ):
        assert key in original, key
    back = convert_ldm_unet_checkpoint({f"model.diffusion_model.{k}": v for k, v in original.items()}, unet.config)
    assert set(back) == set(state)
    assert all(back[k].shape == state[k].shape for k in state)
    # the key/value layers a delta trains, under the names cdtool's CompVis importer reads
    kv = [k for k in original if ".attn2.to_k." in k or ".attn2.to_v." in k]
    assert len(kv) == 32  # 16 transformer blocks, no biases
    for key in kv:
        if key.endswith(".weight"):
            diffusers_name = compvis_to_diffusers(f"model.diffusion_model.{key}")
            assert diffusers_name is not None and f"{diffusers_name[len('unet.') :]}.weight" in state


def test_sd15_vae_names(sd15_shapes):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae = sd15_shapes[1]
    state = vae.state_dict()
    original = vae_to_original(state, vae.config)
    assert len(original) == 248
    assert original["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert "decoder.up.3.upsample.conv.weight" in original and "decoder.up.0.block.2.conv2.weight" in original
    back = convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in original.items()}, vae.config)
    assert set(back) == set(state)
    assert all(back[k].shape == state[k].shape for k in state)


@pytest.mark.parametrize("model", ["tiny", "toy"])
def test_from_single_file_reads_it_back(model, tmp_path, tiny_folder):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from cdtool.models.loading import load_pipeline, toy_model_folder

    pipe = load_pipeline(model)
    state = sd1_state(pipe)
    assert {k.split(".")[0] for k in state} == {"model", "first_stage_model", "cond_stage_model"}
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in state
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "m.safetensors"))
    config = tiny_folder if model == "tiny" else toy_model_folder()
    back = StableDiffusionPipeline.from_single_file(
        str(tmp_path / "m.safetensors"), config=str(config), local_files_only=True, safety_checker=None
    )
    for component in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, component).state_dict(), getattr(back, component).state_dict()
        assert set(ours) == set(theirs)
        assert all(torch.equal(ours[k], theirs[k].to(ours[k].dtype)) for k in ours), component


def test_vocab_size_keeps_the_base_rows(tiny_pipe):
    state = sd1_state(tiny_pipe, vocab_size=100)
    table = state["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
    assert table.shape == (100, 32)


def test_a_key_without_a_place_is_an_error():
    with pytest.raises(CdtoolError) as e:
        rename({"conv_in.weight": torch.zeros(1), "lora_magic.weight": torch.zeros(1)}, [("conv_in.", "x.")], "UNet")
    assert str(e.value) == "the UNet parameter lora_magic.weight has no place in the original Stable Diffusion layout"
