"""The built-in toy model (`--model toy`), `cdtool demo` and the CI-sized quality benchmark.

These are the tests that fail when a change breaks learning, prior preservation or merging: the toy
model can see, and the oracle judges what it draws."""

from __future__ import annotations

import json
import random

import pytest
import torch

from cdtool.models import default_resolution, load_pipeline, model_kind


@pytest.fixture(scope="module")
def toy_pipe():
    pipe = load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_toy_model_is_packaged_and_small(toy_pipe):
    from cdtool.models import toy_model_folder

    folder = toy_model_folder()
    size = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    assert model_kind("toy") == "folder" and size <= 15 * 2**20
    assert default_resolution("toy") == 32 and toy_pipe.unet.dtype == torch.float32
    assert json.loads((folder / "pretraining.json").read_text())["unet_steps"] > 0


def test_toy_model_follows_captions(toy_pipe):
    """Single-object captions: the oracle must read the asked background and colour far above chance
    (1/8 each); RESULTS.md has the full measurement."""
    from cdtool.sampling import Job, generate
    from cdtool.toy.judge import judge, parse_prompt
    from cdtool.toy.oracle import load_oracle, read
    from cdtool.toy.world import Sampler

    sampler = Sampler(random.Random(77))
    prompts = [sampler.scene(count=1).caption() for _ in range(24)]
    jobs = [Job(p, i, 1000 + i, f"{i}.png") for i, p in enumerate(prompts)]
    with torch.no_grad():
        images = [im for _, im in generate(toy_pipe, jobs, steps=15, guidance=4.0, height=32, width=32,
                                           batch_size=24, negative_prompt=None)]  # fmt: skip
    verdicts = [judge(parse_prompt(p), s) for p, s in zip(prompts, read(load_oracle(), images), strict=True)]
    background = sum(v["background"] for v in verdicts) / len(verdicts)
    colours = sum(v["colours"] for v in verdicts) / len(verdicts)
    assert background >= 0.5 and colours >= 0.4, (background, colours)


def test_demo_end_to_end(cli, tmp_path):
    out = tmp_path / "demo"
    r = cli("demo", "-o", out, "--steps", "20", "--reg-images", "4", "--n", "1", "--sample-steps", "4", "--json")
    doc = json.loads(r.stdout)
    assert json.loads((out / "scores.json").read_text())["after"] == doc["after"]
    for key in ("concept_fidelity", "prompt_fidelity", "prior_drift"):
        assert 0.0 <= doc["after"][key] <= 1.0 and key in doc["before"]
    assert set(doc["per_prompt"]["after"]) == {
        "a small <new1> star on a blue background",
        "a large <new2> circle on a yellow background",
        "a <new1> star and a <new2> circle on a green background",
        "a small white star on a red background",
        "a large orange circle on a purple background",
    }
    from PIL import Image

    with Image.open(out / "before-after.png") as im:
        assert im.width > 2 * 3 * 32 and im.height >= 5 * 3 * 32
    assert "$ cdtool train" in r.stderr and "--captions-from-files" in r.stderr
    concept = json.loads((out / "data" / "new1-star" / "concept.json").read_text())
    assert concept["token"] == "<new1>" and concept["class_noun"] == "star"
    assert {"prep", "regset", "train", "merge", "compress", "sample", "score"} <= {k.split()[0] for k in doc["seconds"]}
    # an existing folder is not overwritten without --force
    r = cli("demo", "-o", out, code=1)
    assert "--force" in r.stderr and (out / "scores.json").exists()


def test_quality_ci(tmp_path):
    """The CI-sized quality benchmark, end to end through the commands. It asserts what the toy
    model robustly shows today (benchmarks/RESULTS.md): the base model never draws the personal
    concepts, and a 250-step Custom Diffusion run teaches it the split star (measured 0.375 here,
    so a change that breaks learning fails). Merge retention and the checkered circle are not
    asserted: on the toy model they are not achieved yet (see RESULTS.md and issue 8's note)."""
    from benchmarks.quality import CI, run

    res = run(tmp_path / "q", CI, quiet=True)
    s = res["summary"]
    assert s["<new1>"]["base"] <= 0.05 and s["<new2>"]["base"] <= 0.05, s
    assert s["<new1>"]["single"] >= 0.15, s
    assert s["<new1>"]["drift_base"] <= 0.05, s
    assert set(res["variants"]) >= {"base", "new1-star", "new1-star-noreg", "merged", "merged-r4"}
