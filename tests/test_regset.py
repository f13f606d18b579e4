"""`cdtool regset`: generation (resumable), local retrieval ranked by CLIP, a kNN service on loopback."""

from __future__ import annotations

import json
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from cdtool.delta.file import read_cdtool

CLIP = ("--clip-model", "cdtool-tiny", "--clip-pretrained", "none")


def test_generate_and_resume(cli, tmp_path):
    out = tmp_path / "reg"
    r = cli("regset", "cat", "-o", out, "--n", "3", "--steps", "2", "--batch-size", "2", "--model", "tiny", "--json")
    doc = json.loads(r.stdout)
    assert doc["generated"] == 3 and doc["prompt"] == "photo of a cat"
    rows = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == ["00000.png", "00001.png", "00002.png"]
    before = (out / "00001.png").read_bytes()
    (out / "00000.png").unlink()
    (out / "00002.png").write_bytes(b"broken")
    doc = json.loads(
        cli(
            "regset", "cat", "-o", out, "--n", "3", "--steps", "2", "--batch-size", "2", "--model", "tiny", "--json"
        ).stdout
    )
    assert doc["generated"] == 2 and doc["kept"] == 1
    assert (out / "00001.png").read_bytes() == before
    with Image.open(out / "00002.png") as im:
        assert im.size == (64, 64)
    r = cli("regset", "dog", "-o", out, "--n", "3", "--model", "tiny", code=1)
    assert "another regularisation set" in r.stderr


def test_generate_from_a_prompts_file(cli, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red {class}\n\na {class} on a blue background\n")
    out = tmp_path / "reg"
    doc = json.loads(
        cli(
            "regset", "star", "-o", out, "--n", "3", "--steps", "1", "--prompts", prompts, "--model", "tiny", "--json"
        ).stdout
    )
    rows = [json.loads(x)["text"] for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert rows == ["a red star", "a star on a blue background", "a red star"]
    assert doc["prompt"] == ["a red star", "a star on a blue background"]
    (tmp_path / "empty.txt").write_text("\n")
    r = cli("regset", "star", "-o", tmp_path / "r2", "--prompts", tmp_path / "empty.txt", "--model", "tiny", code=1)
    assert "holds no prompts" in r.stderr and not (tmp_path / "r2").exists()
    cli("regset", "star", "-o", tmp_path / "r3", "--prompts", prompts, "--from", str(tmp_path), code=2)


def _image(seed, path):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def collection(tmp_path):
    root = tmp_path / "laion-like"
    a = root / "captioned"
    a.mkdir(parents=True)
    captions = [
        "a photo of a cat",
        "a cat sleeping on a sofa",
        "a red car on the road",
        "a bowl of soup",
        "a tabby cat",
    ]
    for i in range(3):
        _image(i, a / f"{i}.png")
    (a / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{i}.png", "text": c}) + "\n" for i, c in enumerate(captions[:3]))
    )
    b = root / "00000"  # img2dataset `files` output
    b.mkdir()
    _image(10, b / "000000010.jpg")
    (b / "000000010.txt").write_text(captions[3])
    shard = root / "00001.tar"  # webdataset
    _image(11, tmp_path / "x.jpg")
    (tmp_path / "x.txt").write_text(captions[4])
    with tarfile.open(shard, "w") as tar:
        tar.add(tmp_path / "x.jpg", arcname="000000011.jpg")
        tar.add(tmp_path / "x.txt", arcname="000000011.txt")
    return root, captions


def test_retrieval_ranking_matches_independent_similarities(cli, tmp_path, collection):
    import open_clip

    from cdtool.scoring.clip_models import load_clip

    root, captions = collection
    clip = load_clip("cdtool-tiny", "none")
    tok = open_clip.get_tokenizer("cdtool-tiny")
    with torch.no_grad():
        emb = clip.model.encode_text(tok(captions)).float()
        q = clip.model.encode_text(tok(["photo of a cat"])).float()
    sims = (emb / emb.norm(dim=-1, keepdim=True)) @ (q / q.norm(dim=-1, keepdim=True))[0]
    order = [captions[i] for i in torch.argsort(sims, descending=True).tolist()]
    out = tmp_path / "reg"
    doc = json.loads(
        cli("regset", "cat", "-o", out, "--from", root, "--n", "3", "--min-sim", "-1", *CLIP, "--json").stdout
    )
    assert doc["collection_size"] == 5 and doc["qualified"] == 5
    got = [json.loads(x)["text"] for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert got == order[:3]
    for img, sim in zip(doc["images"], sorted(sims.tolist(), reverse=True), strict=False):
        assert abs(img["similarity"] - sim) < 1e-5
    # the threshold: exactly the captions at or above it qualify
    second = sorted(sims.tolist(), reverse=True)[1] - 1e-6
    out2 = tmp_path / "reg2"
    doc = json.loads(
        cli("regset", "cat", "-o", out2, "--from", root, "--n", "4", "--min-sim", str(second), *CLIP, "--json").stdout
    )
    assert doc["qualified"] == 2
    # the collection's caption embeddings come from the cache the second time
    r = cli("regset", "cat", "-o", tmp_path / "reg3", "--from", root, "--n", "1", "--min-sim", "-1", *CLIP)
    assert "from the cache" in r.stderr


def test_train_consumes_regset(cli, tmp_path, collection, concept_dirs):
    root, _ = collection
    out = tmp_path / "retrieved"
    cli("regset", "cat", "-o", out, "--from", root, "--n", "3", "--min-sim", "-1", *CLIP)
    cat, _ = concept_dirs
    delta = tmp_path / "c.safetensors"
    # the retrieved images are 40 px: train at 32
    r = cli(
        "train", cat, "--class-noun", "cat", "--reg", out, "-o", delta, "--model", "tiny",
        "--steps", "1", "--batch-size", "1", "--resolution", "32", "-q", "--json",
    )  # fmt: skip
    # the prior term doubles the scaled rate (1e-5 x batch 1 x 2): the class images were used
    assert json.loads(r.stdout)["learning_rate"] == 2e-5
    run = json.loads((tmp_path / "c.run" / "config.json").read_text())["config"]
    assert [(c["reg"], len(c["reg_examples"])) for c in run["concepts"]] == [(str(out), 3)]
    assert run["concepts"][0]["reg_examples"][0] == [str(out / "00000.png"), "a bowl of soup"]
    assert read_cdtool(delta).concepts[0]["reg"] == str(out)


class _Knn(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        length = int(self.headers["Content-Length"])
        query = json.loads(self.rfile.read(length))
        port = self.server.server_address[1]
        results = [
            {"url": f"http://127.0.0.1:{port}/img/1.png", "caption": f"{query['text']}, one", "similarity": 0.95},
            {"url": f"http://127.0.0.1:{port}/img/broken.png", "caption": "broken", "similarity": 0.93},
            {"url": f"http://127.0.0.1:{port}/img/2.png", "caption": f"{query['text']}, two", "similarity": 0.9},
            {"url": f"http://127.0.0.1:{port}/img/3.png", "caption": "far", "similarity": 0.5},
        ]
        self._send(json.dumps(results).encode(), "application/json")

    def do_GET(self):
        if self.path.endswith("broken.png"):
            self._send(b"not an image", "image/png")
            return
        import io

        buf = io.BytesIO()
        Image.new("RGB", (48, 48), "blue").save(buf, format="PNG")
        self._send(buf.getvalue(), "image/png")

    def _send(self, body, kind):
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_knn_service_on_loopback(cli, tmp_path):
    server = HTTPServer(("127.0.0.1", 0), _Knn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"knn:http://127.0.0.1:{server.server_address[1]}"
        out = tmp_path / "reg"
        doc = json.loads(cli("regset", "cat", "-o", out, "--from", url, "--n", "3", "--retries", "0", "--json").stdout)
    finally:
        server.shutdown()
    assert doc["qualified"] == 3 and doc["failed_downloads"] == 1
    rows = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["photo of a cat, one", "photo of a cat, two"]


def test_knn_service_down(cli, tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    r = cli(
        "regset",
        "cat",
        "-o",
        tmp_path / "reg",
        "--from",
        f"knn:http://127.0.0.1:{port}",
        "--retries",
        "1",
        "--timeout",
        "1",
        code=1,
    )
    assert "did not answer after 2 tries" in r.stderr


def test_offline_without_a_model_fails_before_making_the_output(cli, tmp_path, monkeypatch):
    from helpers import one_error

    monkeypatch.delenv("CDTOOL_MODEL", raising=False)
    out = tmp_path / "reg" / "cat"
    default = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    r = cli("regset", "cat", "-o", out, "--n", "2", code=1)
    assert one_error(r) == (
        f"Error: the model {default} (the default: no --model given) is not on this machine and could not be "
        f"downloaded (HF_HUB_OFFLINE is set); download it where there is network (`hf download {default} "
        "--local-dir DIR`) and pass --model DIR, or pass a local diffusers folder or a .safetensors/.ckpt "
        "checkpoint (`--model toy` is built in)"
    )
    assert not (tmp_path / "reg").exists()
    monkeypatch.setenv("CDTOOL_MODEL", str(tmp_path / "not-a-model"))
    (tmp_path / "not-a-model").mkdir()
    r = cli("regset", "cat", "-o", out, "--n", "2", code=1)
    assert one_error(r) == (
        f"Error: {tmp_path / 'not-a-model'} ($CDTOOL_MODEL) is not a diffusers model folder (no model_index.json); "
        "pass --model with a diffusers folder, a .safetensors/.ckpt checkpoint, or a hub id"
    )
    assert not (tmp_path / "reg").exists()


def test_select_images_takes_the_first_n_that_open(tmp_path):
    from cdtool.dataset.images import ImageError
    from cdtool.dataset.regset import Candidate, select_images

    def opens(colour):
        return lambda: Image.new("RGBA", (8, 8), colour)

    def fails():
        raise ImageError("b.png", "not an image")

    candidates = [
        Candidate("a red one", {"source": "a.png", "similarity": 0.9}, opens("red")),
        Candidate("a broken one", {"source": "b.png", "similarity": 0.8}, fails),
        Candidate("a blue one", {"source": "c.png", "similarity": 0.7}, opens("blue")),
        Candidate("never opened", {"source": "d.png", "similarity": 0.6}, fails),
    ]
    skipped = []
    rows, chosen, failed = select_images(iter(candidates), 2, tmp_path, (ImageError,), skipped.append)
    assert rows == [{"file_name": "00000.png", "text": "a red one"}, {"file_name": "00001.png", "text": "a blue one"}]
    assert chosen == [
        {"file_name": "00000.png", "source": "a.png", "similarity": 0.9},
        {"file_name": "00001.png", "source": "c.png", "similarity": 0.7},
    ]
    assert failed == 1 and [str(e) for e in skipped] == [
        "b.png: not a readable image (not an image); remove or replace it"
    ]
    with Image.open(tmp_path / "00001.png") as im:
        assert im.mode == "RGB" and im.getpixel((0, 0)) == (0, 0, 255)
    with pytest.raises(ImageError):  # an exception outside `skip` is not swallowed
        select_images(candidates[1:], 2, tmp_path, (KeyError,))


def test_generate_set_carries_an_earlier_sets_images(tmp_path):
    from cdtool.dataset.regset import generate_set, read_provenance, write_set

    settings = dict(steps=1, guidance=6.0, resolution=None, batch_size=2, scheduler="ddim", seed=3, model="tiny")
    first = tmp_path / "first"
    first.mkdir()
    doc = generate_set(["a {class}", "b"], first, None, 3, device="cpu", dtype="fp32", **settings)
    assert doc["rows"] == [
        {"file_name": "00000.png", "text": "a {class}"},
        {"file_name": "00001.png", "text": "b"},
        {"file_name": "00002.png", "text": "a {class}"},
    ]
    assert (doc["generated"], doc["kept"], doc["seed"]) == (3, 0, 3)
    write_set(first, doc, {"class": "cat", "from": "generate"}, tmp_path / "reg")
    assert "rows" not in doc and read_provenance(first) == json.loads((first / "regset.json").read_text())
    assert read_provenance(first)["created_by"].endswith(" regset") and read_provenance(tmp_path) is None
    (first / "00001.png").write_bytes(b"broken")
    second = tmp_path / "second"
    second.mkdir()
    doc = generate_set(["a {class}", "b"], second, first, 3, device="cpu", dtype="fp32", **settings)
    assert (doc["generated"], doc["kept"]) == (1, 2)
    assert (second / "00000.png").read_bytes() == (first / "00000.png").read_bytes()
    with Image.open(second / "00001.png") as im:
        assert im.size == (64, 64)


def test_retrieve_set_takes_the_best_captions_at_or_above_min_sim(tmp_path, collection):
    from cdtool.dataset.regset import retrieve_set
    from cdtool.errors import CdtoolError

    root, captions = collection
    out = tmp_path / "out"
    out.mkdir()
    doc = retrieve_set(root, "photo of a cat", out, 2, -1.0, "cdtool-tiny", "none")
    assert (doc["collection_size"], doc["qualified"], doc["unreadable"]) == (5, 5, 0)
    sims = [img["similarity"] for img in doc["images"]]
    assert sims == sorted(sims, reverse=True) and [r["file_name"] for r in doc["rows"]] == ["00000.png", "00001.png"]
    assert {r["text"] for r in doc["rows"]} <= set(captions)
    with pytest.raises(CdtoolError, match=r"reaches --min-sim 1\.1"):
        retrieve_set(root, "photo of a cat", out, 2, 1.1, "cdtool-tiny", "none")


def test_knn_set_skips_what_does_not_download_as_an_image(tmp_path):
    from cdtool.dataset.regset import knn_set

    server = HTTPServer(("127.0.0.1", 0), _Knn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        doc = knn_set(url, "photo of a cat", tmp_path, 3, 0.85, "laion5B-L-14", 5.0, 0)
    finally:
        server.shutdown()
    assert (doc["results"], doc["qualified"], doc["failed_downloads"]) == (4, 3, 1)
    assert [r["text"] for r in doc["rows"]] == ["photo of a cat, one", "photo of a cat, two"]
    assert [(i["url"].rsplit("/", 1)[1], i["similarity"]) for i in doc["images"]] == [("1.png", 0.95), ("2.png", 0.9)]
