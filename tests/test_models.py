"""Model loading, the built-in tokenizer, device/dtype resolution."""

from __future__ import annotations

import pytest
import torch

from cdtool.clip_vocab import load_clip_tokenizer
from cdtool.errors import CdtoolError, UsageError
from cdtool.models import load_pipeline, resolve_device, resolve_dtype


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
    from cdtool.tiny import build_tiny_pipeline

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
    from cdtool.tokens import DEFAULT_INIT, resolve_init_token

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
