"""The model card every export folder gets: read as the Hugging Face Hub reads it (huggingface_hub's
ModelCard), with the tokens' files, trigger prompts, method, settings and sample picture."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard
from PIL import Image

from cdtool.delta.file import write_cdtool
from cdtool.filenames import safe_stem, token_stems

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def _delta_file(make_delta, tmp_path, base="tiny", run_dir=None):
    d = make_delta()
    d.base_model = base
    d.provenance = {
        "train": {
            "config": {
                "steps": 250,
                "lr": 1e-5,
                "batch_size": 4,
                "resolution": 512,
                "train": "kv",
                "aug": True,
                "seed": 0,
                "mixed_precision": "fp16",
                "run_dir": str(run_dir or tmp_path / "gone.run"),
            },
            "steps_run": 180,
            "stopped_early": True,
            "stop_reason": "DVAR below 0.15",
            "learning_rate": 8e-5,
            "method": "custom-diffusion",
        }
    }
    d.concepts[0] |= {"reg": "reg/cat", "method": "custom-diffusion"}
    path = tmp_path / "cat.safetensors"
    write_cdtool(d, path)
    return path


def test_card_in_the_hubs_layout(cli, tmp_path, make_delta):
    run = tmp_path / "cat.run"
    run.mkdir()
    Image.new("RGB", (64, 32), "red").save(run / "samples.png")
    source = _delta_file(make_delta, tmp_path, base=SD15, run_dir=run)
    out = tmp_path / "cat-lora"
    files = cli("export", source, "--to", "diffusers-lora", "-o", out).stdout.split()
    assert files[-2:] == [str(out / "samples.png"), str(out / "README.md")]
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == SD15 and data["license"] == "creativeml-openrail-m"
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "text-to-image"
    assert data["tags"] == ["text-to-image", "stable-diffusion", "diffusers", "lora", "custom-diffusion", "cdtool"]
    assert data["instance_prompt"] == "photo of a <new1> cat"
    assert data["widget"] == [{"text": "photo of a <new1> cat", "output": {"url": "samples.png"}}]
    text = card.text
    assert "| `<new1>` | cat | `new1` | `embedding:new1` | `new1.safetensors` |" in text
    assert "- `photo of a <new1> cat`" in text
    assert 'pipe.load_lora_weights("cat-lora", weight_name="pytorch_lora_weights.safetensors")' in text
    assert 'pipe.load_textual_inversion("cat-lora", weight_name="new1.safetensors")' in text
    assert (
        "- Training: 180 steps (stopped early: DVAR below 0.15), learning rate 8e-05, batch 4, resolution 512, "
        "layers kv, size augmentation, seed 0, mixed precision fp16." in text
    )
    assert "- `<new1>` (cat): prior preservation with `reg/cat`, initialised from `ktn`." in text
    assert "![samples](samples.png)" in text
    assert Image.open(out / "samples.png").size == (64, 32)


def test_card_of_a_local_base_and_given_license(cli, tmp_path, make_delta):
    source = _delta_file(make_delta, tmp_path)  # base `tiny`, no run folder left
    out = tmp_path / "cat-ck"
    cli("export", source, "--to", "checkpoint", "-o", out, "--license", "mit")
    data = ModelCard.load(out / "README.md").data.to_dict()
    assert "base_model" not in data and data["license"] == "mit" and "widget" not in data
    text = (out / "README.md").read_text()
    assert 'StableDiffusionPipeline.from_single_file("cat-ck/cat-ck.safetensors", config="BASE_MODEL")' in text
    assert "`cat-ck.safetensors` into `models/Stable-diffusion/`" in text
    assert "| `<new1>` | cat | `new1` | `embedding:new1` | `embeddings/new1.safetensors` |" in text
    r = cli("export", source, "--to", "official", "-o", tmp_path / "d.bin", "--license", "mit", code=2)
    assert "Error: --samples and --license are for the model card of a folder export, not --to official" in r.stderr


@pytest.mark.parametrize(
    ("token", "stem"),
    [
        ("<new1>", "new1"),
        ("<my cat>", "my_cat"),
        ('a:b"c|d?e*f', "a_b_c_d_e_f"),
        ("<con>", "con_"),
        ("<LPT1.x>", "LPT1.x_"),
        ("<...>", "token"),
        ("../x", "x"),
        ("sks", "sks"),
    ],
)
def test_windows_safe_stems(token, stem):
    assert safe_stem(token) == stem


def test_stems_are_distinct_and_deterministic():
    tokens = ["<new1>", "new1", "<NEW1>", "<lora>"]
    stems = token_stems(tokens, taken=["lora"])
    assert stems == {"<NEW1>": "NEW1", "<lora>": "lora-2", "<new1>": "new1-2", "new1": "new1-3"}
    assert token_stems(reversed(tokens), taken=["lora"]) == stems


def test_run_samples_found_beside_the_delta(tmp_path, make_delta, monkeypatch):
    from cdtool.delta.importers import read_delta
    from cdtool.export.model_card import run_samples

    (tmp_path / "cat.run").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cat.run" / "samples.png")
    source = _delta_file(make_delta, tmp_path, run_dir="cat.run")  # recorded relative to where train ran
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    delta = read_delta(source)
    assert run_samples(delta, source) == tmp_path / "cat.run" / "samples.png"
    assert run_samples(delta) is None


@pytest.mark.parametrize("target", ["diffusers-lora", "textual-inversion"])
def test_the_cards_loading_lines_run_on_sdxl(cli, tmp_path, make_xl_delta, monkeypatch, target):
    """The card's own diffusers lines load each SDXL token file into both text encoders."""
    from cdtool.models.tiny import build_tiny_xl_pipeline

    write_cdtool(make_xl_delta(), tmp_path / "xl.safetensors")
    cli("export", tmp_path / "xl.safetensors", "--to", target, "-o", tmp_path / "xl-out")
    text = (tmp_path / "xl-out" / "README.md").read_text()
    assert "from diffusers import StableDiffusionXLPipeline" in text
    lines = [ln for ln in text.splitlines() if ln.startswith(("emb = ", "pipe.load_textual_inversion"))]
    assert len(lines) == 3, text
    pipe = build_tiny_xl_pipeline()
    monkeypatch.chdir(tmp_path)  # the card names the folder as it was written, relative
    exec("from safetensors.torch import load_file\n" + "\n".join(lines), {"pipe": pipe})
    assert pipe.tokenizer.convert_tokens_to_ids("<new1>") == pipe.tokenizer_2.convert_tokens_to_ids("<new1>") == 49408


def test_the_textual_inversion_card_loads_its_embedding(cli, tmp_path, make_delta):
    write_cdtool(make_delta(), tmp_path / "d.safetensors")
    cli("export", tmp_path / "d.safetensors", "--to", "textual-inversion", "-o", tmp_path / "ti")
    assert (
        'pipe.load_textual_inversion("ti", weight_name="new1.safetensors")'
        in (tmp_path / "ti" / "README.md").read_text()
    )
