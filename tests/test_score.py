"""`cdtool score` on tiny random instances of the real architectures; DreamBench prompts."""

from __future__ import annotations

import json

import pytest
import torch

from cdtool.scoring.metrics import pairwise_mean_cosine

MODELS = ("--clip-model", "cdtool-tiny", "--clip-pretrained", "none")


@pytest.fixture(scope="session")
def tiny_dino(tmp_path_factory):
    """A random ViT with DINO ViT-S/16's architecture, scaled down, saved as a folder."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dino") / "tiny-dino"
    ViTModel(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
        ),
        add_pooling_layer=False,
    ).save_pretrained(path)
    return path


@pytest.fixture
def folders(cli, tmp_path):
    from helpers import write_concept_folder

    ref = write_concept_folder(tmp_path / "ref", n=4)
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    for out, seed in ((s1, "0"), (s2, "5")):
        cli(
            "sample",
            "a <new1> cat on the beach",
            "a photo of a dog",
            "-o",
            out,
            "--model",
            "tiny",
            "--n",
            "2",
            "--steps",
            "2",
            "--seed",
            seed,
        )
    return ref, s1, s2


def test_score_json(cli, folders, tiny_dino):
    ref, s1, s2 = folders
    r = cli(
        "score",
        s1,
        s2,
        "--ref",
        ref,
        *MODELS,
        "--dino",
        tiny_dino,
        "--kid-features",
        "clip",
        "--kid-subsets",
        "5",
        "--json",
        "--per-image",
    )
    doc = json.loads(r.stdout)
    assert doc["schema"] == "cdtool.score/1" and doc["ref"]["n_images"] == 4 and len(doc["runs"]) == 2
    run = doc["runs"][0]
    assert run["n_images"] == 4
    assert set(run["overall"]) == {"clip_t", "clip_t_clipscore", "clip_i", "dino", "kid"}
    assert run["overall"]["clip_t"]["n"] == 4 and run["overall"]["kid"]["subset_size"] == 4
    assert [p["prompt"] for p in run["per_prompt"]] == ["a <new1> cat on the beach", "a photo of a dog"]
    assert all(p["n"] == 2 for p in run["per_prompt"])
    # CLIP-I equals the all-pairs mean computed independently
    from PIL import Image

    from cdtool.scoring.clip_models import load_clip

    clip = load_clip("cdtool-tiny", "none")
    samples = clip.images([Image.open(s1 / row["file"]) for row in run["images"]])
    refs = clip.images([Image.open(p) for p in sorted(ref.glob("*.png"))])
    assert abs(run["overall"]["clip_i"]["mean"] - pairwise_mean_cosine(samples, refs)) < 1e-5
    # CLIP-T used the prompt without its token
    beach = next(row for row in run["images"] if row["prompt"] == "a <new1> cat on the beach")
    text = clip.texts(["a cat on the beach"])[0]
    img = clip.images([Image.open(s1 / beach["file"])])[0]
    assert abs(beach["clip_t"] - float(img.double() @ text.double())) < 1e-5
    assert abs(beach["clip_t_clipscore"] - 2.5 * max(beach["clip_t"], 0)) < 1e-9


def test_self_similarity_and_table(cli, folders, tiny_dino):
    ref, s1, _ = folders
    doc = json.loads(
        cli("score", ref, "--ref", ref, *MODELS, "--dino", tiny_dino, "--metrics", "clip-i,dino", "--json").stdout
    )
    from PIL import Image

    from cdtool.scoring.clip_models import load_clip

    emb = load_clip("cdtool-tiny", "none").images([Image.open(p) for p in sorted(ref.glob("*.png"))])
    assert abs(doc["runs"][0]["overall"]["clip_i"]["mean"] - pairwise_mean_cosine(emb, emb)) < 1e-5
    r = cli("score", s1, "--ref", ref, *MODELS, "--dino", tiny_dino, "--metrics", "clip-t,clip-i")
    assert "CLIP-T" in r.stdout and str(s1) in r.stdout


def _empty(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


# (the arguments, given the tmp folder and a folder of reference photos; the exit code; a phrase of the error)
BAD_SCORE_INPUT = {
    "unknown-metric": (
        lambda t, ref: [ref, "--ref", ref, "--metrics", "fid"],
        2,
        "--metrics: unknown fid; choose from",
    ),
    "no-prompts": (lambda t, ref: [ref, "--ref", ref, *MODELS, "--metrics", "clip-t"], 1, "no prompts.json"),
    "no-images": (lambda t, ref: [_empty(t), "--ref", ref, *MODELS, "--metrics", "clip-i"], 1, "holds no images"),
}


@pytest.mark.parametrize("case", list(BAD_SCORE_INPUT))
def test_score_errors(cli, tmp_path, case):
    from helpers import one_error, write_concept_folder

    setup, code, phrase = BAD_SCORE_INPUT[case]
    r = cli("score", *setup(tmp_path, write_concept_folder(tmp_path / "ref", n=2)), code=code)
    assert phrase in one_error(r)


BENCH = """Classes

subject_name,class
teddy,stuffed animal
rex,dog

Prompts

Object Prompts

prompt_list = [
'a {0} {1} on a table'.format(unique_token, class_token),
'a {0} {1} in the rain'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} running'.format(unique_token, class_token),
'a {0} {1} asleep'.format(unique_token, class_token),
'a {0} {1} in a hat'.format(unique_token, class_token)
]
"""


def test_dreambench(cli, tmp_path):
    from cdtool.sampling.dreambench import parse

    path = tmp_path / "prompts_and_classes.txt"
    path.write_text(BENCH)
    bench = parse(path)
    assert bench.prompts("teddy", "<new1>") == (
        "stuffed animal",
        ["a <new1> stuffed animal on a table", "a <new1> stuffed animal in the rain"],
    )
    assert len(bench.prompts("rex", "sks")[1]) == 3  # a live subject gets the live prompts
    out = tmp_path / "s"
    cli("sample", "--dreambench", path, "--subject", "rex", "-o", out, "--model", "tiny", "--n", "1", "--steps", "1")
    assert sorted(json.loads((out / "prompts.json").read_text()).values()) == [
        "a <new1> dog asleep",
        "a <new1> dog in a hat",
        "a <new1> dog running",
    ]
    r = cli("sample", "--dreambench", path, "--subject", "nobody", "-o", out, "--model", "tiny", code=1)
    assert "no subject" in r.stderr


def test_oracle_metric_judges_toy_samples_against_their_prompts(cli, tmp_path):
    import random

    from cdtool.toy.world import Sampler, render

    sampler = Sampler(random.Random(3))
    folder = tmp_path / "toy"
    folder.mkdir()
    prompts = {}
    for i in range(4):  # the concept asked and shown
        scene = sampler.scene(count=1, concept="<new1>")
        render(scene).save(folder / f"c{i}.png")
        prompts[f"c{i}.png"] = scene.caption()
    for i in range(4):  # plain stars asked; half of them show the pattern (drift)
        scene = sampler.scene(count=1, concept="<new1>" if i % 2 else None)
        render(scene).save(folder / f"p{i}.png")
        prompts[f"p{i}.png"] = f"a star on a {scene.background} background"
    (folder / "prompts.json").write_text(json.dumps(prompts))
    doc = json.loads(cli("score", folder, "--metrics", "oracle", "--json", "--per-image").stdout)
    overall = doc["runs"][0]["overall"]["oracle"]
    assert overall["concept_fidelity"] == 1.0 and overall["prior_drift"] == 0.5 and overall["n"] == 8
    assert doc["ref"] is None and len(doc["runs"][0]["per_prompt"]) >= 2
    table = cli("score", folder, "--metrics", "oracle").stdout
    assert "concept" in table and "drift" in table
    cli("score", folder, "--metrics", "oracle,clip-i", code=2)


def test_per_prompt_table_and_reports(cli, folders, tiny_dino, tmp_path):
    import base64
    import io
    from html.parser import HTMLParser

    from helpers import one_error
    from PIL import Image

    ref, s1, _ = folders
    args = ("score", s1, "--ref", ref, *MODELS, "--dino", tiny_dino, "--metrics", "clip-t,clip-i,dino")
    doc = json.loads(cli(*args, "--json", "--per-image").stdout)
    table = cli(*args).stdout
    assert f"\nper prompt: {s1}\n" in table
    for entry in doc["runs"][0]["per_prompt"]:
        row = next(line for line in table.splitlines() if entry["prompt"] in line)
        cells = [c.strip() for c in row.split("│")[1:-1]]
        want = [str(entry["n"])] + [f"{entry[k]['mean']:.4f}" for k in ("clip_t", "clip_i", "dino")]
        assert cells[1:] == want

    page = tmp_path / "report.html"
    r = cli(*args, "--report", page)
    assert r.stdout == table and "wrote " + str(page) in r.stderr

    class Images(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.found: list[tuple[str, str]] = []
            self.captions: list[str] = []
            self._in_caption = False

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "img":
                self.found.append((a["src"], a["alt"]))
            self._in_caption = tag == "figcaption"

        def handle_data(self, data):
            if self._in_caption:
                self.captions.append(data)
                self._in_caption = False

    parser = Images()
    parser.feed(page.read_text(encoding="utf-8"))
    images = doc["runs"][0]["images"]
    assert sorted(alt for _, alt in parser.found) == sorted(r["file"] for r in images)
    for (src, alt), caption in zip(parser.found, parser.captions, strict=True):
        head, _, data = src.partition(",")
        assert head == "data:image/png;base64"  # 64 px samples: enlarged pixel for pixel, kept PNG
        thumb = Image.open(io.BytesIO(base64.b64decode(data)))
        assert thumb.size == (128, 128)
        row = next(r for r in images if r["file"] == alt)
        assert caption == f"{alt}\nCLIP-T {row['clip_t']:.3f}  CLIP-I {row['clip_i']:.3f}\nDINO {row['dino']:.3f}"
    assert (
        one_error(cli(*args, "--report", page, code=1)) == f"Error: {page} already exists; pass --force to overwrite it"
    )
    picture = tmp_path / "report.png"
    cli(*args, "--report", picture)
    with Image.open(picture) as im:  # per prompt a label line, then its two 128 px images with two caption lines
        assert im.size == (320, 2 * (14 + 128 + 2 * 14 + 4))
    bad = cli(*args, "--report", tmp_path / "report.pdf", code=2)
    assert one_error(bad) == f"Error: --report {tmp_path / 'report.pdf'}: give a .html or .png file"
