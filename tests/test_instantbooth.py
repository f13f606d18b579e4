"""InstantBooth: the adapters' and encoders' mathematics, the frozen model left exactly as it was, the
encoder's training (only the encoders and adapters move; resuming equals not stopping; several
processes), and personalise -> sample -> info -> score through the CLI on the tiny model, with the
refusals a personalised concept meets."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import one_error, write_concept_folder

from cdtool.instant.adapters import (
    GatedAdapter,
    attach,
    gated_update,
    make_adapters,
    self_attention,
    transformer_blocks,
)
from cdtool.instant.data import NEUTRAL, encoder_view, insert_identifier, step_generator, subject_only
from cdtool.instant.encoders import combine_photos, identifier_rows

CLIP = ("--clip-model", "cdtool-tiny", "--clip-pretrained", "none")
TRAIN = ("--model", "tiny", "--backbone", "cdtool-tiny", "--batch-size", "2", "--device", "cpu")


# ---- the mathematics ----------------------------------------------------------------------------


def test_gated_update_is_zero_at_gate_zero_and_the_gated_selected_attention_otherwise():
    g = torch.Generator().manual_seed(0)
    y, visual = torch.randn(2, 5, 4, generator=g), torch.randn(1, 3, 4, generator=g)
    seen = {}

    def attend(joint: torch.Tensor) -> torch.Tensor:
        seen["joint"] = joint
        return joint.cumsum(dim=1)  # any token mixing: position i reads positions up to i

    zero = gated_update(y, visual, torch.tensor(0.0), 1.0, attend)
    assert torch.equal(zero, torch.zeros_like(y))
    out = gated_update(y, visual, torch.tensor(0.7), 0.5, attend)
    joint = torch.cat([y, visual.expand(2, -1, -1)], dim=1)
    assert torch.equal(seen["joint"], joint)  # the block's tokens first, then the visual tokens, per row
    assert torch.allclose(out, 0.5 * math.tanh(0.7) * joint.cumsum(dim=1)[:, :5])  # token selection: y's rows
    assert out.shape == y.shape


def test_self_attention_is_softmax_attention_per_head():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8)
    q, k, v = (torch.nn.Linear(8, 8, bias=False) for _ in range(3))
    out = self_attention(x, q, k, v, heads=2)
    expected = []
    for h in range(2):
        part = slice(4 * h, 4 * h + 4)
        qh, kh, vh = q(x)[..., part], k(x)[..., part], v(x)[..., part]
        weights = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(4), dim=-1)
        expected.append(weights @ vh)
    assert torch.allclose(out, torch.cat(expected, dim=-1), atol=1e-6)


def test_adapter_reads_the_visual_tokens_only_once_its_gate_opens():
    torch.manual_seed(0)
    adapter = GatedAdapter(width=8, visual_dim=6, heads=2)
    y = torch.randn(3, 5, 8)
    a, b = torch.randn(1, 4, 6), torch.randn(1, 4, 6)
    assert torch.equal(adapter(y, a), torch.zeros_like(y))
    with torch.no_grad():
        adapter.gate.fill_(0.3)
    assert not torch.allclose(adapter(y, a), adapter(y, b))
    assert torch.allclose(adapter(y, a, beta=0.5), 0.5 * adapter(y, a))  # beta scales the update


def test_identifier_rows_replace_only_the_identifier_positions():
    ids = torch.tensor([[1, 9, 2, 9], [9, 3, 4, 5]])
    embeds = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    rows = torch.tensor([[100.0, 101, 102], [200.0, 201, 202]])
    out = identifier_rows(ids, embeds, rows, token_id=9)
    assert torch.equal(out[0, 1], rows[0]) and torch.equal(out[0, 3], rows[0]) and torch.equal(out[1, 0], rows[1])
    keep = ids != 9
    assert torch.equal(out[keep], embeds[keep])


def test_combine_photos_averages_the_identifier_and_concatenates_the_visual_tokens():
    rows = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    tokens = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mean, joined = combine_photos(rows, tokens)
    assert torch.equal(mean, torch.tensor([[2.0, 4.0]]))
    assert torch.equal(joined, torch.cat([tokens[0], tokens[1]]))


@pytest.mark.parametrize(
    "caption,expected",
    [
        ("photo of a cat on a sofa", "photo of a <id> cat on a sofa"),
        ("Two Cats playing", "Two <id> Cats playing"),
        ("a small red star on a blue background", None),
        ("a <id> cat already", "a <id> cat already"),
        ("a cathedral and a cat", "a cathedral and a <id> cat"),
    ],
)
def test_insert_identifier_goes_before_the_first_mention_of_the_noun(caption, expected):
    assert insert_identifier(caption, "cat", "<id>") == expected


def test_encoder_view_is_seeded_and_keeps_a_uniform_image_uniform():
    image = torch.linspace(-1, 1, 3 * 40 * 40).reshape(3, 40, 40)
    a = encoder_view(image, 16, step_generator(0, 5, 0))
    assert torch.equal(a, encoder_view(image, 16, step_generator(0, 5, 0)))
    assert not torch.equal(a, encoder_view(image, 16, step_generator(0, 6, 0)))
    assert a.shape == (3, 16, 16)
    flat = torch.full((3, 40, 40), 0.25)
    assert torch.allclose(encoder_view(flat, 16, step_generator(1, 0, 0)), torch.full((3, 16, 16), 0.25), atol=1e-6)


def test_subject_only_shows_the_subject_and_neutral_elsewhere():
    image = torch.linspace(-1, 1, 3 * 4 * 4).reshape(3, 4, 4)
    assert subject_only(image, None) is image  # no alpha: the whole image
    alpha = torch.tensor([[1.0, 0.0, 0.5, 1.0]]).expand(1, 4, 4)
    seen = subject_only(image, alpha)
    assert torch.equal(seen[..., 0], image[..., 0]) and torch.equal(seen[..., 3], image[..., 3])
    assert torch.equal(seen[..., 1], torch.full((3, 4), NEUTRAL))
    assert torch.allclose(seen[..., 2], 0.5 * image[..., 2] + 0.5 * NEUTRAL)


def _cutout(path: Path, background: tuple[int, int, int], size: int = 64) -> Path:
    """An RGBA photo: a red square marked by the alpha, on `background` (transparent, its colour kept)."""
    from PIL import Image

    rgba = Image.new("RGBA", (size, size), (*background, 0))
    rgba.paste(Image.new("RGBA", (size // 2 + 3, size // 2 - 5), (200, 40, 40, 255)), (size // 4 - 1, size // 4 + 2))
    rgba.save(path)
    return path


# ---- the frozen UNet, with adapters attached ------------------------------------------------------


def _unet_out(unet, latents, t, text):
    with torch.no_grad():
        return unet(latents, t, encoder_hidden_states=text).sample


def test_adapters_at_gate_zero_leave_the_unet_bit_identical_and_detaching_restores_it(tiny_pipe):
    unet = tiny_pipe.unet
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 500])
    frozen = _unet_out(unet, latents, t, text)
    blocks = transformer_blocks(unet)
    torch.manual_seed(0)
    adapters = make_adapters(blocks, visual_dim=32)
    attached = attach(unet, adapters, blocks)
    try:
        attached.injection.tokens = torch.randn(1, 6, 32, generator=g)
        assert torch.equal(_unet_out(unet, latents, t, text), frozen)  # gates at 0
        with torch.no_grad():
            for a in adapters:
                a.gate.fill_(0.5)
        opened = _unet_out(unet, latents, t, text)
        assert not torch.allclose(opened, frozen)
        attached.injection.rows = torch.tensor([False, True])  # the unconditional row left alone
        chosen = _unet_out(unet, latents, t, text)
        assert torch.equal(chosen[0], frozen[0]) and torch.allclose(chosen[1], opened[1], atol=1e-5)
    finally:
        attached.detach()
    assert torch.equal(_unet_out(unet, latents, t, text), frozen)
    assert not unet._forward_pre_hooks and all(not b._forward_hooks for b in unet.modules() if hasattr(b, "attn1"))


# ---- training the encoder -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cats(tmp_path_factory) -> Path:
    """A category's captioned images (the tiny model's 64 px)."""
    return write_concept_folder(
        tmp_path_factory.mktemp("data") / "cats", n=6, size=64, captions="photo of a cat, view {i}"
    )


def test_training_moves_only_the_encoders_and_adapters(tmp_path, cats, fresh_tiny):
    from safetensors.torch import load_file

    from cdtool.instant.data import read_category
    from cdtool.instant.folder import WEIGHTS, EncoderSettings
    from cdtool.instant.trainer import train_encoder

    pipe = fresh_tiny
    before = {
        name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()}
        for name in ("unet", "vae", "text_encoder")
    }
    vocab = len(pipe.tokenizer)
    examples, skipped = read_category(cats, "cat", "<new1>", 64)
    assert skipped == 0 and examples[0].caption == "photo of a <new1> cat, view 0"
    s = EncoderSettings(model="tiny", class_noun="cat", identifier="<new1>", backbone="cdtool-tiny", data=str(cats),
                        init_token="ktn", resolution=64, batch_size=2, steps=3, device="cpu", lr=1e-3)  # fmt: skip
    progress = train_encoder(s, tmp_path / "enc", [(str(e.path), e.caption) for e in examples], pipe=pipe)
    assert progress.step == 3
    for name in ("unet", "vae", "text_encoder"):
        after = getattr(pipe, name).state_dict()
        for k, v in before[name].items():
            now = after[k][:vocab] if "token_embedding" in k else after[k]
            assert torch.equal(now, v), f"{name}.{k} moved"
    assert not pipe.unet._forward_pre_hooks  # the adapters' hooks are gone
    weights = load_file(str(tmp_path / "enc" / WEIGHTS))
    assert all(float(weights[k]) != 0 for k in weights if k.endswith(".gate"))  # every gate opened
    assert float(weights["concept_head.weight"].abs().max()) > 0  # the concept head left its start


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "encoder.safetensors"))


def test_resume_continues_bit_for_bit(cli, tmp_path, cats):
    cli("train-encoder", cats, "--class-noun", "cat", *TRAIN, "--steps", "4", "-o", tmp_path / "whole")
    cli("train-encoder", cats, "--class-noun", "cat", *TRAIN, "--steps", "2", "-o", tmp_path / "cut")
    with (tmp_path / "cut" / "log.jsonl").open("a") as f:  # a step logged after the checkpoint, then a kill
        f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n")
    r = cli("train-encoder", "--resume", tmp_path / "cut", "--steps", "4", "--json")
    assert json.loads(r.stdout)["step"] == 4
    whole, cut = _tensors(tmp_path / "whole"), _tensors(tmp_path / "cut")
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)
    losses = [
        [json.loads(x)["loss"] for x in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("whole", "cut")
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    r = cli("train-encoder", "--resume", tmp_path / "cut", "--lr", "1", "--steps", "5", code=1)
    assert "--lr" in one_error(r) and "keeps its own settings" in one_error(r)


def test_a_compact_copy_is_half_the_size_and_resumes(cli, tmp_path, cats):
    """What a repository keeps: float16 weights and bfloat16 moments; --resume reads it and goes on."""
    from cdtool.delta.importers import load_pickle
    from cdtool.instant.folder import OPTIMIZER, WEIGHTS

    cli("train-encoder", cats, "--class-noun", "cat", *TRAIN, "--steps", "2", "-o", tmp_path / "run")
    root = Path(__file__).resolve().parent.parent
    cmd = [
        sys.executable,
        str(root / "tools" / "resumable.py"),
        "compact",
        str(tmp_path / "run"),
        str(tmp_path / "kept"),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    full, kept = _tensors(tmp_path / "run"), _tensors(tmp_path / "kept")
    assert all(kept[k].dtype == torch.float16 and torch.equal(kept[k], full[k].half()) for k in full)
    moments = load_pickle(tmp_path / "kept" / OPTIMIZER)["optimizer"]["state"].values()
    assert moments and all(m["exp_avg_sq"].dtype == torch.bfloat16 for m in moments)
    size = sum((tmp_path / "kept" / f).stat().st_size for f in (WEIGHTS, OPTIMIZER))
    assert size < 0.6 * sum((tmp_path / "run" / f).stat().st_size for f in (WEIGHTS, OPTIMIZER))
    from cdtool.errors import CdtoolError
    from cdtool.instant.folder import compact

    with pytest.raises(CdtoolError, match="another folder"):
        compact(tmp_path / "kept", tmp_path / "kept")
    for folder in ("run", "kept"):
        r = cli("train-encoder", "--resume", tmp_path / folder, "--steps", "3", "--json")
        assert json.loads(r.stdout)["step"] == 3
    exact, rounded = _tensors(tmp_path / "run"), _tensors(tmp_path / "kept")
    assert rounded["concept_head.weight"].dtype == torch.float32  # training writes full precision again
    for k in ("concept_head.weight", "patch_head.weight"):
        # the step taken from the rounded moments is the exact one's (from no moments: cosine 0.86-0.94)
        step_exact, step_rounded = exact[k] - full[k], rounded[k] - kept[k].float()
        assert torch.cosine_similarity(step_exact.flatten(), step_rounded.flatten(), dim=0) > 0.99


def test_train_encoder_refusals(cli, tmp_path, cats):
    plain = write_concept_folder(tmp_path / "stars", n=2, size=64, captions="a red star, view {i}")
    r = cli("train-encoder", plain, "--class-noun", "cat", *TRAIN, "--steps", "1", "-o", tmp_path / "e1", code=1)
    assert "names the class noun 'cat'" in one_error(r)
    r = cli(
        "train-encoder",
        cats,
        "--class-noun",
        "cat",
        "--model",
        "tiny-xl",
        "--steps",
        "1",
        "-o",
        tmp_path / "e2",
        code=1,
    )
    assert "Stable Diffusion XL" in one_error(r)
    r = cli("train-encoder", cats, "--class-noun", "cat", *TRAIN, "-o", tmp_path / "e3", code=2)
    assert "--steps, --minutes" in r.stderr
    base = ("train-encoder", cats, "--class-noun", "cat", "--model", "tiny", "--steps", "1")
    r = cli(*base, "--backbone", "ViT-B-99:openai", "-o", tmp_path / "e4", code=2)
    assert "open_clip has no model 'ViT-B-99'" in r.stderr
    r = cli(*base, "--backbone", f"ViT-B-32:{tmp_path / 'absent.bin'}", "-o", tmp_path / "e5", code=1)
    assert one_error(r).endswith("pass --backbone ViT-B-32:/path/to/weights")  # how to point at a local copy
    assert not any((tmp_path / f"e{i}").exists() for i in range(1, 6))


def test_sigterm_saves_the_steps_since_the_last_checkpoint(tmp_path, cats):
    """A real SIGTERM to a real training process: it ends as Ctrl-C does (128 + 15), and the folder
    holds the step it reached, not the last periodic checkpoint; --resume goes on from there."""
    import signal
    import time

    out = tmp_path / "enc"
    cmd = [sys.executable, "-m", "cdtool", "train-encoder", str(cats), "--class-noun", "cat", *TRAIN,
           "--steps", "100000", "-o", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    log = out / "log.jsonl"
    deadline = time.monotonic() + 300
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    logged = len(log.read_text().splitlines())
    step = json.loads((out / "encoder.json").read_text())["progress"]["step"]
    assert logged >= 3 and step in (logged, logged + 1) and f"saved step {step} before stopping" in stderr
    r = subprocess.run([sys.executable, "-m", "cdtool", "train-encoder", "--resume", str(out), "--steps",
                        str(step + 1), "--json"], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert r.returncode == 0 and json.loads(r.stdout)["step"] == step + 1


def test_accelerate_two_processes(tmp_path, cats):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "cdtool",
           "train-encoder", str(cats), "--class-noun", "cat", *TRAIN, "--steps", "2", "-o", str(tmp_path / "enc")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == [str(tmp_path / "enc")]  # only the main process prints its result
    progress = json.loads((tmp_path / "enc" / "encoder.json").read_text())["progress"]
    assert progress["processes"] == 2 and progress["step"] == 2


# ---- personalise, sample, info, score ----------------------------------------------------------


@pytest.fixture(scope="module")
def encoder(tmp_path_factory, cats) -> Path:
    from helpers import Cli

    out = tmp_path_factory.mktemp("enc") / "cat-encoder"
    Cli()("train-encoder", cats, "--class-noun", "cat", *TRAIN, "--steps", "2", "-o", out)
    return out


def test_personalize_sample_info_score_chain(cli, tmp_path, encoder):
    photos = write_concept_folder(tmp_path / "mittens", n=3, size=64, colour=(30, 200, 60))
    concept = tmp_path / "mittens.safetensors"
    assert cli("personalize", photos, "--encoder", encoder, "-o", concept).stdout.split() == [str(concept)]
    doc = json.loads(cli("info", concept, "--json").stdout)
    assert doc["visual"] == {"<new1>": {"tokens": 3 * 16, "dim": 32}}  # 16 patch tokens per photo
    assert doc["encoder"]["path"] == str(encoder.resolve()) and len(doc["encoder"]["sha256"]) == 64
    assert doc["concepts"][0]["method"] == "instantbooth" and doc["tokens"]["<new1>"] == {"vectors": 1, "dim": 32}
    assert "visual:      <new1> (48x32" in cli("info", concept).stdout
    out = tmp_path / "out"
    cli("sample", "photo of a <new1> cat", "photo of a cat", "--delta", concept, "--n", "2", "--steps", "2", "-o", out)
    base = tmp_path / "base"
    cli("sample", "photo of a cat", "--model", "tiny", "--n", "2", "--steps", "2", "-o", base)
    for k in (0, 1):  # a prompt without the token gets nothing of the concept
        (plain,) = base.glob(f"000-*-s{k}.png")
        assert _pixels(out / plain.name.replace("000-", "001-", 1)) == _pixels(plain)
        (asked,) = out.glob(f"000-*-s{k}.png")
        assert _pixels(asked) != _pixels(plain)
    weaker = tmp_path / "weaker"
    cli("sample", "photo of a <new1> cat", "--delta", f"{concept}:0.5", "--n", "1", "--steps", "2", "-o", weaker)
    score = json.loads(cli("score", out, "--ref", photos, "--metrics", "clip-t,clip-i", *CLIP, "--json").stdout)
    assert score["runs"][0]["n_images"] == 4 and "clip_i" in score["runs"][0]["overall"]


def test_photos_with_alpha_are_personalised_from_their_subject_alone(tmp_path, encoder):
    from cdtool.instant.personal import personalize

    # at 100 px, resized to the encoder's 64: what the alpha hides does not bleed into the edges either
    on_blue = personalize([_cutout(tmp_path / "a.png", (40, 40, 220), 100)], encoder)
    on_green = personalize([_cutout(tmp_path / "b.png", (40, 200, 40), 100)], encoder)
    assert torch.equal(on_blue.tokens["<new1>"], on_green.tokens["<new1>"])  # what the alpha hides is not seen
    assert torch.equal(on_blue.visual["<new1>"], on_green.visual["<new1>"])
    opaque = tmp_path / "c.png"
    from PIL import Image

    Image.open(tmp_path / "a.png").convert("RGB").save(opaque)  # the same colours without the alpha
    assert not torch.equal(personalize([opaque], encoder).visual["<new1>"], on_blue.visual["<new1>"])


def test_the_encoders_train_on_the_subject_and_the_loss_on_the_whole_image(tmp_path, monkeypatch, fresh_tiny):
    """With RGBA images the encoders' views come from the subject alone; the VAE encodes the whole image."""
    import cdtool.instant.trainer as trainer
    from cdtool.instant.folder import EncoderSettings

    data = tmp_path / "cut"
    data.mkdir()
    for i, bg in enumerate([(40, 40, 220), (40, 200, 40)]):
        _cutout(data / f"{i}.png", bg)
    seen: list[torch.Tensor] = []
    view = trainer.encoder_view
    monkeypatch.setattr(trainer, "encoder_view", lambda im, size, g: seen.append(im) or view(im, size, g))
    s = EncoderSettings(model="tiny", class_noun="cat", identifier="<new1>", backbone="cdtool-tiny", data=str(data),
                        init_token="ktn", resolution=64, batch_size=2, steps=1, device="cpu")  # fmt: skip
    examples = [(str(p), "photo of a <new1> cat") for p in sorted(data.glob("*.png"))]
    trainer.train_encoder(s, tmp_path / "enc", examples, pipe=fresh_tiny)
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])  # the backgrounds differ only under alpha 0
    assert torch.equal(seen[0][:, 0, 0], torch.full((3,), NEUTRAL))


def _pixels(path: Path) -> bytes:
    from PIL import Image

    with Image.open(path) as im:
        return im.tobytes()


def test_wrong_encoder_or_base_is_one_clear_error(cli, tmp_path, encoder, cats, tiny_folder):
    import shutil

    from safetensors.torch import load_file, save_file

    photos = write_concept_folder(tmp_path / "p", n=1, size=64)
    concept = tmp_path / "c.safetensors"
    cli("personalize", photos, "--encoder", encoder, "-o", concept)
    other = tmp_path / "other-encoder"
    cli("train-encoder", cats, "--class-noun", "cat", *TRAIN, "--steps", "1", "--seed", "3", "-o", other)
    sample = ("sample", "a <new1> cat", "--delta", concept, "--n", "1", "--steps", "1")
    r = cli(*sample, "--encoder", other, "-o", tmp_path / "s1", code=1)
    assert "made with the encoder of fingerprint" in one_error(r) and "pass --encoder" in one_error(r)
    r = cli(*sample, "--encoder", tmp_path / "nowhere", "-o", tmp_path / "s2", code=1)
    assert "not an InstantBooth encoder folder" in one_error(r)
    base = tmp_path / "tiny-changed"
    shutil.copytree(tiny_folder, base)
    weights = base / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    key = next(k for k in state if "transformer_blocks.0.attn1.to_q" in k)
    state[key] = state[key] + 0.01
    save_file(state, str(weights))
    r = cli(*sample, "--model", base, "-o", tmp_path / "s3", code=1)
    assert "was trained for the base model tiny" in one_error(r) and "pass --model tiny" in one_error(r)
    assert not any((tmp_path / f"s{i}").exists() for i in (1, 2, 3))


def test_merge_compress_export_refuse_a_personalised_concept(cli, tmp_path, encoder, make_delta):
    from cdtool.delta.file import write_cdtool

    photos = write_concept_folder(tmp_path / "p", n=1, size=64)
    concept = tmp_path / "c.safetensors"
    cli("personalize", photos, "--encoder", encoder, "--token", "<mine>", "-o", concept)
    other = tmp_path / "other.safetensors"
    write_cdtool(make_delta(token="<new2>"), other)
    r = cli("merge", f"{concept}+{other}", "-o", tmp_path / "m.safetensors", "--method", "sum", code=1)
    assert "InstantBooth concept" in one_error(r) and "one concept in an image" in one_error(r)
    r = cli("compress", concept, "-o", tmp_path / "r.safetensors", code=1)
    assert "InstantBooth concept" in one_error(r)
    r = cli("export", concept, "--to", "textual-inversion", "-o", tmp_path / "x", code=1)
    assert "other tools have no InstantBooth adapters" in one_error(r)
    r = cli("get-deltas", concept, "-o", tmp_path / "c.bin", code=1)
    assert "official .bin layout cannot hold it" in one_error(r)
    r = cli("sample", "a <mine> cat", "--delta", concept, "--delta", concept, "-o", tmp_path / "two", code=1)
    assert "one concept in an image" in one_error(r)
    assert not any(p.name.startswith(("m.", "r.", "x", "c.bin", "two")) for p in tmp_path.iterdir())


# ---- the benchmark, at a minimal size ------------------------------------------------------------


def test_benchmark_runs_at_a_minimal_size(tmp_path):
    """benchmarks/instantbooth.py end to end on the shipped toy model and oracle (the suite's world; <new1>
    is its split star, <new2> its checker circle, a pair): an encoder trained for each shape, the
    concepts personalised and trained by each fine-tuning method, judged; every cell filled, times
    from photos to the first sample; the pair merged by Custom Diffusion and DreamBooth."""
    import dataclasses

    from benchmarks.instantbooth import BASELINES, DREAMBOOTH, INSTANTBOOTH, InstantSettings, run, write_category
    from benchmarks.quality import Settings

    quality = dataclasses.replace(Settings(), n=8, sample_steps=2, reg_images=4)
    s = InstantSettings(quality=quality, concepts=("<new1>", "<new2>"), train_images=8, encoder_steps=2, encoder_minutes=None,
                        encoder_batch=2, recipes={m: (2, None) for m in (*BASELINES, DREAMBOOTH)})  # fmt: skip
    res = run(tmp_path / "bench", s, quiet=True)
    assert set(res["methods"]) == {INSTANTBOOTH, *BASELINES, DREAMBOOTH}
    for method, r in res["methods"].items():
        cell = r["concepts"]["<new1>"]
        assert cell["n"] == 8 and 0 <= cell["concept_fidelity"] <= 1 and 0 <= cell["prior_drift"] <= 1, method
        assert cell["seconds_to_first_sample"] >= cell["seconds"]["make"] >= 0  # times are reported, never judged
        assert r["suite"]["concept_fidelity"]["n"] == 16 and set(r["concepts"]) == {"<new1>", "<new2>"}
    assert res["goals"]["speedup"] > 0 and set(res["goals"]["targets"]) == {"fidelity_ratio", "speedup"}
    ib = res["methods"][INSTANTBOOTH]["concepts"]["<new1>"]
    assert ib["seconds"]["regset"] == 0 and res["encoders"]["star"]["trained_here"] and "circle" in res["encoders"]
    # the prior prompts never hold the token: with the concept loaded they are sampled as by the base
    assert ib["prior_drift"] == res["base"]["prior star"]["prior_drift"]
    # DreamBooth's model is asked with its identifier word and judged as the token's concept
    asked = (tmp_path / "bench" / "prompts-new1-star-dreambooth.txt").read_text()
    assert "<new1>" not in asked and "a small sks star on" in asked
    judged_as = json.loads((tmp_path / "bench" / "prompts-new1-star-dreambooth-as-token.json").read_text())
    assert all("sks" not in p for p in judged_as.values()) and any("<new1>" in p for p in judged_as.values())
    # composition after a merge: each method's pair merged in closed form (DreamBooth's key/value change)
    assert set(res["merged"]) == {"custom-diffusion", DREAMBOOTH}
    for cell in (r["new1+new2"] for r in res["merged"].values()):
        assert cell["n"] == 8 and all(0 <= cell[k] <= 1 for k in ("<new1>", "<new2>", "both"))
    asked = (tmp_path / "bench" / "prompts-merged-dreambooth-new1+new2.txt").read_text()
    assert "a sks star and a ohwx circle on" in asked and "<new" not in asked  # each model its own identifier
    captions = (tmp_path / "bench" / "categories" / "star" / "metadata.jsonl").read_text()
    assert "checkered" not in captions and "star" in captions
    assert (
        write_category(tmp_path / "again", "star", 8, quality.seed).joinpath("metadata.jsonl").read_text() == captions
    )


def test_stable_diffusion_2_base(cli, tmp_path, cats):
    """SD 2.x (v-prediction, the "!"-padding tokenizer, linear projections in its transformer blocks):
    the same encoder trains, personalises and samples."""
    enc = tmp_path / "enc"
    cli("train-encoder", cats, "--class-noun", "cat", "--model", "tiny-sd2", "--backbone", "cdtool-tiny",
        "--batch-size", "2", "--steps", "2", "-o", enc)  # fmt: skip
    settings = json.loads((enc / "encoder.json").read_text())["settings"]
    assert settings["base_kind"] == "sd2" and settings["model"] == "tiny-sd2"
    concept = tmp_path / "c.safetensors"
    cli("personalize", cats, "--encoder", enc, "-o", concept)
    cli("sample", "photo of a <new1> cat", "--delta", concept, "--n", "1", "--steps", "2", "-o", tmp_path / "out")
    assert len(list((tmp_path / "out").glob("*.png"))) == 1
    r = cli("sample", "photo of a <new1> cat", "--delta", concept, "--model", "tiny", "-o", tmp_path / "x", code=1)
    assert "a delta for Stable Diffusion 2.x, but the base model tiny is Stable Diffusion 1.x" in one_error(r)
