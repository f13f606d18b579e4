"""Model loading, the built-in tokenizer, device/dtype resolution."""

from __future__ import annotations

import pytest
import torch

from cdtool.errors import CdtoolError, UsageError
from cdtool.models.clip_vocab import load_clip_tokenizer
from cdtool.models.loading import load_pipeline, resolve_device, resolve_dtype


def test_tokenizer_is_real_clip():
    tok = load_clip_tokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok.convert_ids_to_tokens(tok("a photo of a cat").input_ids) == [
        "<|startoftext|>",
        "a</w>",
        "photo</w>",
        "of</w>",
        "a</w>",
        "cat</w>",
        "<|endoftext|>",
    ]
    long = tok("word " * 200, truncation=True, padding="max_length", max_length=77).input_ids
    assert len(long) == 77


def test_tiny_is_deterministic(tiny_pipe):
    from cdtool.models.tiny import build_tiny_pipeline

    other = build_tiny_pipeline()
    for (n, a), (_, b) in zip(tiny_pipe.unet.named_parameters(), other.unet.named_parameters(), strict=True):
        assert torch.equal(a, b), n


def test_load_folder_equals_tiny(tiny_folder, tiny_pipe):
    pipe = load_pipeline(str(tiny_folder))
    assert pipe.unet.dtype == torch.float32
    a = dict(pipe.unet.named_parameters())
    for n, p in tiny_pipe.unet.named_parameters():
        assert torch.equal(a[n], p)


def test_missing_models_give_clear_errors(tmp_path):
    with pytest.raises(CdtoolError, match="no such file"):
        load_pipeline(str(tmp_path / "nope.safetensors"))
    with pytest.raises(CdtoolError, match="hf download"):
        load_pipeline("no-such-org/no-such-model")  # tests run with HF_HUB_OFFLINE=1
    (tmp_path / "empty").mkdir()
    with pytest.raises(CdtoolError, match="diffusers folder"):
        load_pipeline(str(tmp_path / "empty"))


def test_device_and_dtype():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(UsageError):
        resolve_dtype("fp8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(CdtoolError, match="CUDA"):
            resolve_device("cuda")


def test_single_file_that_is_not_a_checkpoint(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(2)}, path)
    with pytest.raises(CdtoolError, match="could not load the checkpoint"):
        load_pipeline(str(path))


def test_initialiser_tokens_resolve_as_the_reference_and_as_words():
    from cdtool.models.tokens import DEFAULT_INIT, resolve_init_token

    tok = load_clip_tokenizer()
    vocab = tok.get_vocab()
    # the first three defaults are the official code's hard-coded vocabulary entries
    assert [resolve_init_token(tok, t) for t in DEFAULT_INIT[:3]] == [42170, 47629, 43514]
    # a word is the piece a prompt uses ("white" in "a white dog" is white</w>, not the word-start piece)
    assert resolve_init_token(tok, "white") == vocab["white</w>"] != vocab["white"]
    assert resolve_init_token(tok, "dog</w>") == vocab["dog</w>"]
    # an entry that is two pieces as text is still found as an entry
    assert resolve_init_token(tok, "gigan") == vocab["gigan"]
    with pytest.raises(CdtoolError, match="one piece"):
        resolve_init_token(tok, "sunflower field")


def test_built_in_kinds_and_pipeline_classes(tiny_pipe, tiny_sd2_pipe, tiny_xl_pipe):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from cdtool.models.loading import base_kind, pipeline_kind

    assert [base_kind(m) for m in ("tiny", "tiny-sd2", "tiny-xl", "toy")] == ["sd1", "sd2", "sdxl", "sd1"]
    assert [pipeline_kind(p) for p in (tiny_pipe, tiny_sd2_pipe, tiny_xl_pipe)] == ["sd1", "sd2", "sdxl"]
    assert type(tiny_xl_pipe) is StableDiffusionXLPipeline and type(tiny_sd2_pipe) is StableDiffusionPipeline
    assert tiny_sd2_pipe.scheduler.config.prediction_type == "v_prediction"
    assert tiny_xl_pipe.unet.config.addition_embed_type == "text_time"
    widths = [e.config.hidden_size for e in (tiny_xl_pipe.text_encoder, tiny_xl_pipe.text_encoder_2)]
    assert widths == [32, 48] and tiny_xl_pipe.unet.config.cross_attention_dim == 80
    assert type(tiny_xl_pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert len(tiny_xl_pipe.tokenizer) == len(tiny_xl_pipe.tokenizer_2) == 49408
    assert tiny_xl_pipe.tokenizer_2.pad_token == "!" and tiny_xl_pipe.tokenizer_2.pad_token_id == 0


def test_the_kind_is_read_from_a_folder(tiny_xl_folder, tiny_folder, tiny_xl_pipe):
    from diffusers import StableDiffusionXLPipeline

    from cdtool.models.loading import base_kind, default_resolution, load_text_side

    assert base_kind(str(tiny_xl_folder)) == "sdxl" and base_kind(str(tiny_folder)) == "sd1"
    pipe = load_pipeline(str(tiny_xl_folder))
    assert type(pipe) is StableDiffusionXLPipeline
    theirs = dict(tiny_xl_pipe.text_encoder_2.named_parameters())
    assert all(torch.equal(p, theirs[n]) for n, p in pipe.text_encoder_2.named_parameters())
    text = load_text_side(str(tiny_xl_folder))
    assert text.xl and text.width == 80 and text.tokenizers[1].pad_token == "!"
    assert default_resolution(str(tiny_xl_folder)) == 64


def test_the_kind_of_a_checkpoint_is_read_from_its_keys(tmp_path):
    from safetensors.torch import save_file

    from cdtool.models.loading import base_kind

    keys = {
        "sdxl": "conditioner.embedders.1.model.token_embedding.weight",
        "sd2": "cond_stage_model.model.token_embedding.weight",
        "sd1": "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    }
    for kind, key in keys.items():
        path = tmp_path / f"{kind}.safetensors"
        save_file({key: torch.zeros(2, 2), "model.diffusion_model.out.0.weight": torch.zeros(2)}, str(path))
        assert base_kind(str(path)) == kind
    ckpt = tmp_path / "xl.ckpt"
    torch.save({"state_dict": {keys["sdxl"]: torch.zeros(1)}}, str(ckpt))
    assert base_kind(str(ckpt)) == "sdxl"


def test_other_pipelines_are_refused_by_name(tmp_path):
    import json

    from cdtool.models.loading import base_kind

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(CdtoolError) as e:
        base_kind(str(tmp_path / "m"))
    assert str(e.value) == (
        f"{tmp_path / 'm'} is a KandinskyPipeline; cdtool works with StableDiffusionPipeline "
        "(Stable Diffusion 1.x, 2.x) and StableDiffusionXLPipeline models"
    )
