"""`cdtool train` on the tiny model: what trains, what stays, resume, early stopping, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import one_error, train_config, write_concept_folder

from cdtool.delta.base import pipeline_params
from cdtool.delta.file import read_cdtool
from cdtool.models.apply import check_base
from cdtool.models.tiny import build_tiny_pipeline
from cdtool.train.trainer import train

FAST = ("--model", "tiny", "--batch-size", "2", "-q")


def test_only_allowed_parameters_change_and_every_token_trains(tmp_path):
    raw = [
        {"data": str(write_concept_folder(tmp_path / f"c{i}", colour=(60 * i, 200, 30))), "class": noun}
        for i, noun in enumerate(["cat", "dog", "car"])
    ]
    cfg = train_config(tmp_path, raw, steps=4, lr=1e-3, scale_lr=False)
    result = train(cfg, log=lambda m: None, keep_pipeline=True)
    trained, base = result.pipeline, build_tiny_pipeline()
    base_p = dict(base.unet.named_parameters())
    changed = {n for n, p in trained.unet.named_parameters() if not torch.equal(p.cpu(), base_p[n])}
    assert changed and all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in changed)
    assert len(changed) == 14
    assert all(torch.equal(p.cpu(), dict(base.vae.named_parameters())[n]) for n, p in trained.vae.named_parameters())
    te_base = dict(base.text_encoder.named_parameters())
    for n, p in trained.text_encoder.named_parameters():
        if n == "cdtool_token_rows.weight":
            continue
        if n.endswith("token_embedding.weight"):
            assert torch.equal(p[:49408].cpu(), te_base[n])  # every original row bit-identical
        else:
            assert torch.equal(p.cpu(), te_base[n]), n
    delta = read_cdtool(tmp_path / "out.safetensors")
    table = base.text_encoder.get_input_embeddings().weight
    inits = {"<new1>": 42170, "<new2>": 47629, "<new3>": 43514}  # ktn, pll, ucd</w>
    for token, idx in inits.items():
        # all three tokens moved from their initialisers (the reference's off-by-one froze the last)
        assert not torch.allclose(delta.tokens[token][0], table[idx], atol=1e-6), token
    assert [c["class_noun"] for c in delta.concepts] == ["cat", "dog", "car"]
    assert delta.concepts[0]["prompts"] == ["photo of a <new1> cat"]
    assert delta.provenance["train"]["steps_run"] == 4
    assert (tmp_path / "run" / "loss.png").exists()
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 4


def test_attn2_mode_trains_all_cross_attention_projections(tmp_path, concept_dirs):
    cat, _ = concept_dirs
    cfg = train_config(tmp_path, [{"data": str(cat), "class": "cat"}], steps=2, lr=1e-3, scale_lr=False, train="attn2")
    train(cfg, log=lambda m: None)
    delta = read_cdtool(tmp_path / "out.safetensors")
    kinds = {n.rsplit("attn2.", 1)[1] for n in delta.layers}
    assert kinds == {"to_q", "to_k", "to_v", "to_out.0"}
    assert all((layer.bias is not None) == n.endswith("to_out.0") for n, layer in delta.layers.items())
    # the fingerprint covers the biases the delta carries: it applies to its own base without complaint
    base = build_tiny_pipeline()
    check_base(delta, pipeline_params(base), len(base.tokenizer), ignore=False, warn=print)


def test_loss_goes_down_and_delta_samples(cli, tmp_path, concept_dirs):
    cat, reg = concept_dirs
    out = tmp_path / "cat.safetensors"
    r = cli(
        "train",
        cat,
        "--class-noun",
        "cat",
        "--reg",
        reg,
        "-o",
        out,
        *FAST,
        "--steps",
        "30",
        "--lr",
        "2e-3",
        "--no-scale-lr",
        "--no-aug",
        "--early-stop",
        "dvar",
        "--dvar-window",
        "1000",
        "--json",
    )
    doc = json.loads(r.stdout)
    assert doc["steps"] == 30 and not doc["stopped_early"]
    log = [json.loads(x) for x in (tmp_path / "cat.run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["eval_loss"] < 0.97 * log[0]["eval_loss"]
    # the run's sample grid: the concept's prompt, images 0 and 1 as `cdtool sample` makes them
    grid = tmp_path / "cat.run" / "samples.png"
    assert doc["samples"] == str(grid)
    cli(
        "sample",
        "photo of a <new1> cat",
        "-d",
        out,
        "-o",
        tmp_path / "s",
        "--n",
        "2",
        "--steps",
        "25",
        "--batch-size",
        "2",
    )
    from PIL import Image

    with Image.open(grid) as im:
        assert json.loads(im.text["parameters"])["prompts"] == ["photo of a <new1> cat"]
        assert im.size == (320, 14 + 128)  # a label line over two 64 px samples shown at 128 px
        for k in range(2):
            with Image.open(tmp_path / "s" / f"000-photo-of-a-new1-cat-3e26aa20-s{k}.png") as own:
                tile = own.convert("RGB").resize((128, 128), Image.Resampling.NEAREST)
            assert im.convert("RGB").crop((128 * k, 14, 128 * (k + 1), 142)).tobytes() == tile.tobytes()


def test_no_samples(cli, tmp_path, concept_dirs):
    cat, _ = concept_dirs
    out = tmp_path / "cat.safetensors"
    doc = json.loads(
        cli("train", cat, "--class-noun", "cat", "-o", out, *FAST, "--steps", "1", "--no-samples", "--json").stdout
    )
    assert doc["samples"] is None
    assert sorted(p.name for p in (tmp_path / "cat.run").iterdir()) == [
        "config.json", "delta.safetensors", "log.jsonl", "loss.png"
    ]  # fmt: skip


def test_dvar_stops_early(cli, tmp_path, concept_dirs):
    cat, _ = concept_dirs
    r = cli(
        "train",
        cat,
        "--class-noun",
        "cat",
        "-o",
        tmp_path / "c.safetensors",
        *FAST[:-1],
        "--steps",
        "50",
        "--early-stop",
        "dvar",
        "--dvar-window",
        "4",
        "--dvar-eps",
        "0.99",
        "--json",
    )
    doc = json.loads(r.stdout)
    assert doc["stopped_early"] and doc["steps"] < 50 and "DVAR" in doc["reason"]
    assert "without prior preservation" in r.stderr


def test_resume_gives_the_same_delta(cli, tmp_path, concept_dirs):
    cat, reg = concept_dirs
    common = (
        cat,
        "--class-noun",
        "cat",
        "--reg",
        reg,
        *FAST,
        "--lr",
        "1e-3",
        "--early-stop",
        "dvar",
        "--dvar-window",
        "3",
        "--device",
        "cpu",  # bit-exact resume is a CPU property: CUDA's backward kernels are not deterministic
    )
    cli("train", *common, "-o", tmp_path / "straight.safetensors", "--steps", "6")
    cli("train", *common, "-o", tmp_path / "half.safetensors", "--steps", "3", "--checkpoint-every", "3")
    cli("train", *common, "-o", tmp_path / "half.safetensors", "--steps", "6", "--resume", tmp_path / "half.run")
    a, b = read_cdtool(tmp_path / "straight.safetensors"), read_cdtool(tmp_path / "half.safetensors")
    for name in a.layers:
        assert torch.equal(a.layers[name].full, b.layers[name].full), name
    assert torch.equal(a.tokens["<new1>"], b.tokens["<new1>"])
    log = [json.loads(x) for x in (tmp_path / "half.run" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3, 4, 5, 6]


def test_joint_training_from_concepts_file(cli, tmp_path, concept_dirs):
    cat, reg = concept_dirs
    dog = write_concept_folder(tmp_path / "dog", colour=(20, 200, 20))
    (tmp_path / "concepts.json").write_text(
        json.dumps(
            [
                {
                    "instance_prompt": "photo of a <new1> cat",
                    "class_prompt": "cat",
                    "instance_data_dir": str(cat),
                    "class_data_dir": str(reg),
                },
                {
                    "instance_prompt": "photo of a <new2> dog",
                    "class_prompt": "dog",
                    "instance_data_dir": str(dog),
                    "class_data_dir": str(reg),
                },
            ]
        )
    )
    out = tmp_path / "joint.safetensors"
    cli("train", "--concepts", tmp_path / "concepts.json", "-o", out, *FAST, "--steps", "2")
    d = read_cdtool(out)
    assert sorted(d.tokens) == ["<new1>", "<new2>"] and [c["class_noun"] for c in d.concepts] == ["cat", "dog"]


def _empty(tmp_path, cat, reg):
    (tmp_path / "empty").mkdir()
    return [tmp_path / "empty", "--class-noun", "cat"]


def _unreadable(tmp_path, cat, reg):
    (cat / "99.png").write_bytes(b"not a png")
    return [cat, "--class-noun", "cat"]


def _empty_reg(tmp_path, cat, reg):
    (tmp_path / "empty-reg").mkdir()  # what a failed `cdtool regset` could leave
    return [cat, "--class-noun", "cat", "--reg", tmp_path / "empty-reg"]


def _reg_of_another_model(tmp_path, cat, reg):
    (reg / "regset.json").write_text(json.dumps({"class": "cat", "from": "generate", "model": "tiny"}))
    big = write_concept_folder(tmp_path / "big", size=128)
    return [big, "--class-noun", "cat", "--reg", reg, "--resolution", "128"]


def _bad_concepts_file(tmp_path, cat, reg):
    (tmp_path / "c.json").write_text("[{oops")
    return ["--concepts", tmp_path / "c.json"]


OFFLINE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# (the arguments before -o, given the tmp folder, a concept folder and a regularisation folder; the
# exit code; the exact `Error:` line where the line is the contract, else a phrase it holds)
BAD_TRAIN_INPUT = {
    "empty": (_empty, 1, "has no images"),
    "unreadable": (_unreadable, 1, "not a readable image"),
    "existing-token": (lambda t, cat, reg: [cat, "--class-noun", "cat", "--token", "cat"], 1, "already exists"),
    "shared-token": (
        lambda t, cat, reg: [cat, "--class-noun", "cat", "--concept", f"{cat},class=dog", "--token", "<new2>"],
        2,
        "share the token",
    ),
    "no-reg": (
        lambda t, cat, reg: [cat, "--class-noun", "cat", "--reg", t / "missing"],
        1,
        lambda t, reg: (
            f"Error: regularisation folder {t / 'missing'} does not exist; "
            f"make it with `cdtool regset CLASS -o {t / 'missing'}`"
        ),
    ),
    "empty-reg": (
        _empty_reg,
        1,
        lambda t, reg: (
            f"Error: regularisation folder {t / 'empty-reg'} has no images; "
            f"make it with `cdtool regset CLASS -o {t / 'empty-reg'}`"
        ),
    ),
    "small": (
        lambda t, cat, reg: [cat, "--class-noun", "cat", "--resolution", "128"],
        1,
        "smaller than --resolution 128",
    ),
    "reg-of-another-model": (
        _reg_of_another_model,
        1,
        lambda t, reg: (
            f"Error: {reg / '00.png'} is 64x64, smaller than --resolution 128: {reg} was generated by the model tiny; "
            f"generate it with the model you train (`cdtool regset cat -o {reg} --model MODEL --force`)"
        ),
    ),
    # no --model and no $CDTOOL_MODEL: the model is named first, before the data is looked at
    "offline-default-model": (
        lambda t, cat, reg: [t / "missing", "--reg", t / "missing-reg"],
        1,
        lambda t, reg: (
            f"Error: the model {OFFLINE} (the default: no --model given) is not on this machine and could not be "
            f"downloaded (HF_HUB_OFFLINE is set); download it where there is network (`hf download {OFFLINE} "
            "--local-dir DIR`) and pass --model DIR, or pass a local diffusers folder or a .safetensors/.ckpt "
            "checkpoint (`--model toy` is built in)"
        ),
    ),
    "bad-concepts": (_bad_concepts_file, 1, "not valid JSON"),
    "no-class": (lambda t, cat, reg: [cat], 2, "class noun"),
}


@pytest.mark.parametrize("case", list(BAD_TRAIN_INPUT))
def test_bad_input(cli, tmp_path, concept_dirs, case, monkeypatch):
    setup, code, expected = BAD_TRAIN_INPUT[case]
    cat, reg = concept_dirs
    out = tmp_path / "x.safetensors"
    args = setup(tmp_path, cat, reg)
    model = ["--model", "tiny"]
    if case == "offline-default-model":
        monkeypatch.delenv("CDTOOL_MODEL", raising=False)
        model = []
    r = cli("train", *args, "-o", out, *model, code=code)
    if callable(expected):
        assert one_error(r) == expected(tmp_path, reg)
    else:
        assert expected in (one_error(r) if code == 1 else r.stderr)
    assert not out.exists()


def test_accelerate_two_processes(tmp_path, concept_dirs):
    import os
    import subprocess
    import sys

    cat, reg = concept_dirs
    out = tmp_path / "mp.safetensors"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "cdtool",
        "train",
        str(cat),
        "--class-noun",
        "cat",
        "--reg",
        str(reg),
        "-o",
        str(out),
        "--model",
        "tiny",
        "--steps",
        "3",
        "--batch-size",
        "1",
    ]
    # two CPU processes, also where a GPU is present (two ranks on one GPU is not a NCCL setup)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == [str(out)]  # only the main process prints its result
    assert "process 1: the sample grid is left to the main process\n" in r.stderr
    assert (tmp_path / "mp.run" / "samples.png").is_file()
    d = read_cdtool(out)
    train_info = d.provenance["train"]
    assert train_info["processes"] == 2 and train_info["steps_run"] == 3
    assert abs(train_info["learning_rate"] - 1e-5 * 1 * 2 * 2) < 1e-12  # x batch x processes x prior
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["mp.safetensors"]


def test_get_deltas_from_run_and_checkpoint(cli, tmp_path, concept_dirs):
    cat, _ = concept_dirs
    out = tmp_path / "c.safetensors"
    cli(
        "train",
        cat,
        "--class-noun",
        "cat",
        "-o",
        out,
        *FAST,
        "--steps",
        "4",
        "--checkpoint-every",
        "2",
        "--keep-checkpoints",
        "5",
    )
    final = read_cdtool(out)
    cli("get-deltas", tmp_path / "c.run", "-o", tmp_path / "from-run.safetensors")
    assert torch.equal(read_cdtool(tmp_path / "from-run.safetensors").tokens["<new1>"], final.tokens["<new1>"])
    ckpt = tmp_path / "c.run" / "checkpoints" / "step-000004"
    cli("get-deltas", ckpt, "-o", tmp_path / "from-ckpt.safetensors")
    got = read_cdtool(tmp_path / "from-ckpt.safetensors")
    assert got.base_fingerprint == final.base_fingerprint
    for name, layer in final.layers.items():
        assert torch.allclose(got.layers[name].full, layer.full, atol=1e-7)
    cli("get-deltas", tmp_path / "c.run" / "checkpoints" / "step-000002", "-o", tmp_path / "early.safetensors")
    assert not torch.equal(read_cdtool(tmp_path / "early.safetensors").tokens["<new1>"], final.tokens["<new1>"])


def test_trained_layers_compute_in_fp32_inside_a_half_model():
    """Under mixed precision on CUDA the frozen UNet runs in the half type and the trained
    projections stay fp32: their input is cast up, their output down, and gradients reach them."""
    from cdtool.train.trainer import compute_in_fp32

    torch.manual_seed(0)
    frozen = torch.nn.Linear(8, 8).to(torch.bfloat16).requires_grad_(False)
    trained = torch.nn.Linear(8, 4)
    handles = compute_in_fp32([trained], torch.bfloat16)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    out = trained(frozen(x))
    assert out.dtype == torch.bfloat16 and trained.weight.dtype == torch.float32
    expected = torch.nn.functional.linear(frozen(x).float(), trained.weight, trained.bias).to(torch.bfloat16)
    assert torch.equal(out, expected)
    out.float().sum().backward()
    assert trained.weight.grad is not None and trained.weight.grad.dtype == torch.float32
    for h in handles:
        h.remove()
    assert trained(torch.randn(2, 8)).dtype == torch.float32  # hooks gone: back to plain fp32


def test_concepts_from_options_in_command_line_order(tmp_path):
    from cdtool.errors import UsageError
    from cdtool.train.concepts import concepts_from_options

    (tmp_path / "c.json").write_text(json.dumps([{"instance_data_dir": "d3", "instance_prompt": "a <new3> cup"}]))
    described = {"token": "<new1>", "class": "cat", "reg": tmp_path / "reg", "init": None, "prompt": None}
    raw = concepts_from_options(tmp_path / "d1", described, ["d2,token=<new2>,class=dog"], tmp_path / "c.json")
    assert raw == [
        {"data": str(tmp_path / "d1"), "token": "<new1>", "class": "cat", "reg": str(tmp_path / "reg")},
        {"data": "d2", "token": "<new2>", "class": "dog"},
        {"data": "d3", "prompt": "a <new3> cup", "token": "<new3>"},
    ]
    assert concepts_from_options(None, dict.fromkeys(described), [], None) == []
    with pytest.raises(UsageError, match="describe the DATA argument"):
        concepts_from_options(None, {**dict.fromkeys(described), "class": "cat"}, ["d2"], None)


@pytest.mark.parametrize(
    ("method", "concepts", "given", "expected"),
    [
        ("custom-diffusion", 1, {}, dict(steps=250, lr=1e-5, scale_lr=True, aug=True, dvar_window=180, dvar_eps=0.15)),
        ("custom-diffusion", 2, {}, dict(steps=500)),  # the default steps are per concept
        ("textual-inversion", 2, {}, dict(steps=3000, lr=1.25e-3, aug=False, dvar_window=310)),
        ("dreambooth-lora", 1, {}, dict(steps=500, lr=1e-4, scale_lr=False, dvar_window=440, dvar_eps=0.4)),
        (
            "custom-diffusion",
            2,
            dict(steps=7, lr=0.0, scale_lr=False, aug=False, dvar_eps=0.0),
            dict(steps=7, lr=0.0, scale_lr=False, aug=False, dvar_eps=0.0),
        ),
    ],
)
def test_training_config_fills_in_the_methods_defaults(tmp_path, method, concepts, given, expected):
    from cdtool.train.concepts import ConceptSpec
    from cdtool.train.config import training_config

    specs = [ConceptSpec(f"<new{i}>", "cat", "ktn", []) for i in range(concepts)]
    cfg = training_config(method, specs, model="tiny", output="o.safetensors", run_dir="o.run", seed=3, **given)
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert (cfg.method, cfg.concepts, cfg.model, cfg.seed) == (method, specs, "tiny", 3)
