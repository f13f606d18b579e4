"""`cdtool prep` on real image files of every kind a user might have."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import one_error
from PIL import Image


def _halves(w=120, h=80):
    """Left half red, right half blue."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (255, 0, 0)
    a[:, w // 2 :] = (0, 0, 255)
    return a


@pytest.fixture
def photos(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    rng = np.random.default_rng(0)

    def noise(seed, size=96):
        """A structured 'photo': a gradient and a few random rectangles (what perceptual hashes see)."""
        g = np.random.default_rng(seed)
        y, x = np.mgrid[0:size, 0:size]
        a = np.stack(
            [(x * g.uniform(0.5, 2.5)) % 256, (y * g.uniform(0.5, 2.5)) % 256, ((x + y) * g.uniform(0.2, 1)) % 256], -1
        )
        for _ in range(4):
            x0, y0 = g.integers(0, size - 20, 2)
            a[y0 : y0 + g.integers(10, 40), x0 : x0 + g.integers(10, 40)] = g.integers(0, 255, 3)
        return Image.fromarray(a.astype(np.uint8))

    noise(1).save(d / "a.png")
    noise(2).save(d / "b.webp")
    noise(3).save(d / "c.tiff")
    noise(4).save(d / "d.bmp")
    # EXIF orientation 6: stored landscape, shown rotated 90° clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_halves()).save(d / "rotated.jpg", exif=exif, quality=100)
    # transparent PNG: left half opaque green, right half fully transparent
    rgba = np.zeros((96, 96, 4), np.uint8)
    rgba[:, :48] = (0, 255, 0, 255)
    Image.fromarray(rgba, "RGBA").save(d / "transparent.png")
    # 16-bit grayscale PNG
    Image.fromarray((np.linspace(0, 65535, 96 * 96).reshape(96, 96)).astype(np.uint16)).save(d / "deep.png")
    # animated GIF: first frame white, second black
    frames = [Image.new("P", (96, 96), 0), Image.new("P", (96, 96), 1)]
    for f in frames:
        f.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).convert("CMYK").save(d / "cmyk.jpg")
    noise(5).convert("L").save(d / "gray.png")
    # broken files
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    good = d / "trunc-src.png"
    noise(6).save(good)
    (d / "truncated.png").write_bytes(good.read_bytes()[:400])
    good.unlink()
    # a wide image for the crop check, and a small one
    Image.fromarray(_halves(192, 64)).save(d / "wide.png")
    noise(7, 32).save(d / "small.png")
    # duplicates: an exact copy (another format) and a near copy (re-encoded, resized)
    noise(1).save(d / "a-copy.bmp")
    noise(2).resize((90, 90)).save(d / "b-near.jpg", quality=80)
    return d


def _rows(out):
    return [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]


def _by_source(out):
    concept = json.loads((out / "concept.json").read_text())
    return {__import__("pathlib").Path(s["path"]).name: out / s["file_name"] for s in concept["sources"]}


def test_every_kind_of_image(cli, tmp_path, photos):
    out = tmp_path / "data"
    r = cli("prep", photos, "-o", out, "--class-noun", "cat", "--size", "64", "--json")
    report = json.loads(r.stdout)
    bad = {__import__("pathlib").Path(b["path"]).name for b in report["unreadable"]}
    assert bad == {"corrupt.jpg", "truncated.png"}
    assert "skipped" in r.stderr and "corrupt.jpg" in r.stderr
    assert [__import__("pathlib").Path(s["path"]).name for s in report["small"]] == ["small.png"]
    dups = {__import__("pathlib").Path(d["path"]).name: d["kind"] for d in report["duplicates"]}
    assert dups == {"a.png": "exact", "b.webp": "near"}  # later in sorted order than a-copy.bmp, b-near.jpg
    files = _by_source(out)
    assert len(files) == 14 and len(_rows(out)) == 14
    assert all(row["text"] == "photo of a <new1> cat" for row in _rows(out))
    for f in files.values():
        with Image.open(f) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
    # EXIF applied: the red half was on the left, after a 90° clockwise turn it is on top
    rot = np.asarray(Image.open(files["rotated.jpg"])).astype(int)
    assert rot[5, 32, 0] > 200 and rot[5, 32, 2] < 60
    assert rot[58, 32, 2] > 200 and rot[58, 32, 0] < 60
    # transparency flattened onto white
    tr = np.asarray(Image.open(files["transparent.png"])).astype(int)
    assert tuple(tr[32, 5]) == (0, 255, 0) and tuple(tr[32, 60]) == (255, 255, 255)
    # 16-bit: a full ramp survives as 8-bit
    deep = np.asarray(Image.open(files["deep.png"]))
    assert deep.min() < 10 and deep.max() > 245
    # first GIF frame (white)
    assert np.asarray(Image.open(files["anim.gif"])).min() > 250
    # centre crop of a 3:1 image keeps the middle: left third red... no, the middle straddles the halves
    wide = np.asarray(Image.open(files["wide.png"])).astype(int)
    assert wide[32, 5, 0] > 200 and wide[32, 58, 2] > 200
    concept = json.loads((out / "concept.json").read_text())
    assert (
        concept["token"] == "<new1>" and concept["class_noun"] == "cat" and len(concept["sources"][0]["sha256"]) == 64
    )


def test_idempotent_and_force(cli, tmp_path, photos):
    out = tmp_path / "data"
    cli("prep", photos, "-o", out, "--class-noun", "cat", "--size", "32")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = cli("prep", photos, "-o", out, "--class-noun", "cat", "--size", "32")
    assert "already up to date" in r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    r = cli("prep", photos, "-o", out, "--class-noun", "dog", "--size", "32", code=1)
    assert "--force" in r.stderr
    cli("prep", photos, "-o", out, "--class-noun", "dog", "--size", "32", "--force")
    assert _rows(out)[0]["text"] == "photo of a <new1> dog"


def test_dedupe_pad_captions_and_dry_run(cli, tmp_path, photos):
    (photos / "wide.txt").write_text("a <new1> cat, wide shot")
    out = tmp_path / "d"
    r = cli(
        "prep",
        photos,
        "-o",
        out,
        "--class-noun",
        "cat",
        "--size",
        "32",
        "--dedupe",
        "--crop",
        "pad",
        "--background",
        "black",
        "--captions-from-files",
        "--json",
    )
    assert json.loads(r.stdout)["used"] == 12
    wide = _by_source(out)["wide.png"]
    px = np.asarray(Image.open(wide)).astype(int)
    assert tuple(px[1, 16]) == (0, 0, 0)  # letterbox padding
    assert {row["text"] for row in _rows(out)} == {"a <new1> cat, wide shot", "photo of a <new1> cat"}
    r = cli("prep", photos / "a.png", "-o", tmp_path / "dry", "--class-noun", "cat", "--dry-run")
    assert "dry run" in r.stdout and not (tmp_path / "dry").exists()


# (the inputs and options, given the tmp folder and the photos; the exact error line, given the tmp
# folder, where the line is the contract, else a phrase of it)
BAD_PREP_INPUT = {
    "nothing-usable": (lambda t, p: [p / "corrupt.jpg", p / "truncated.png"], "none of the 2 input files"),
    "no-such-input": (lambda t, p: [t / "nope"], lambda t: f"Error: {t / 'nope'}: no such file or folder"),
    "token-in-the-vocabulary": (lambda t, p: [p / "a.png", "--token", "cat"], "already exists in the vocabulary"),
}


@pytest.mark.parametrize("case", list(BAD_PREP_INPUT))
def test_nothing_usable_is_an_error(cli, tmp_path, photos, case):
    setup, expected = BAD_PREP_INPUT[case]
    r = cli("prep", *setup(tmp_path, photos), "-o", tmp_path / "x", "--class-noun", "cat", code=1)
    if callable(expected):
        assert one_error(r) == expected(tmp_path)
    else:
        assert expected in one_error(r)
    assert not (tmp_path / "x").exists()


def test_train_reads_prep_output(cli, tmp_path, photos):
    out = tmp_path / "data"
    cli("prep", photos, "-o", out, "--class-noun", "cat", "--size", "64", "--dedupe")
    cli("train", out, "-o", tmp_path / "c.safetensors", "--model", "tiny", "--steps", "1", "--batch-size", "1", "-q")
    from cdtool.delta.file import read_cdtool

    assert read_cdtool(tmp_path / "c.safetensors").concepts[0]["class_noun"] == "cat"


def test_imagefolder_loads(cli, tmp_path, photos):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "data"
    cli("prep", photos / "a.png", photos / "b.webp", "-o", out, "--class-noun", "cat", "--size", "32")
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert len(ds) == 2 and ds[0]["text"] == "photo of a <new1> cat"


def test_an_images_alpha_is_read_beside_its_colours_which_stay_as_the_file_holds_them(tmp_path):
    import torch

    from cdtool.dataset.folders import load_image, load_image_and_alpha

    a = np.zeros((80, 120, 4), np.uint8)
    a[..., :3] = (40, 80, 220)  # blue where the subject is not (alpha 0)
    a[10:40, 30:60] = (200, 40, 40, 255)  # off the centre, so that a turned crop would show it elsewhere
    Image.fromarray(a, "RGBA").save(tmp_path / "cut.png")
    rgb, alpha = load_image_and_alpha(tmp_path / "cut.png", 40)  # centre crop 80 x 80, then halved
    assert alpha is not None and alpha.shape == (1, 40, 40)
    assert float(alpha[0, 12, 10]) == 1.0 and float(alpha[0, 30, 30]) == 0.0
    blue = torch.tensor([40, 80, 220]) / 127.5 - 1
    assert torch.allclose(rgb[:, 30, 30], blue, atol=0.02)  # not blackened by a premultiplied resize
    assert torch.equal(load_image(tmp_path / "cut.png", 40), rgb)
    rotated = Image.fromarray(a, "RGBA").transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(tmp_path / "turned.png", exif=exif)
    rgb_t, alpha_t = load_image_and_alpha(tmp_path / "turned.png", 40)  # the alpha turns with the colours
    assert torch.allclose(alpha_t, alpha, atol=0.01) and torch.allclose(rgb_t, rgb, atol=0.02)
    Image.fromarray(a[..., :3]).save(tmp_path / "opaque.jpg")
    assert load_image_and_alpha(tmp_path / "opaque.jpg", 40)[1] is None
    p = Image.fromarray(a[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    p.save(tmp_path / "palette.png", transparency=p.getpixel((0, 0)))
    _, alpha_p = load_image_and_alpha(tmp_path / "palette.png", 40)
    assert alpha_p is not None and float(alpha_p[0, 30, 30]) == 0.0 and float(alpha_p[0, 12, 10]) == 1.0


def test_weighted_by_the_alpha_nothing_transparent_reaches_the_subjects_edge(tmp_path):
    import torch

    from cdtool.dataset.folders import load_image_and_alpha

    def cutout(name: str, hidden: tuple[int, int, int]):
        a = np.zeros((96, 96, 4), np.uint8)
        a[..., :3] = hidden
        a[20:70, 31:77] = (200, 40, 40, 255)
        Image.fromarray(a, "RGBA").save(tmp_path / name)
        return tmp_path / name

    blue, green = cutout("blue.png", (40, 80, 220)), cutout("green.png", (40, 200, 40))
    straight = [load_image_and_alpha(f, 32) for f in (blue, green)]
    weighted = [load_image_and_alpha(f, 32, weighted=True) for f in (blue, green)]
    assert torch.equal(straight[0][1], straight[1][1]) and torch.equal(weighted[0][1], weighted[1][1])
    seen = [rgb * alpha for rgb, alpha in straight]
    assert (seen[0] - seen[1]).abs().max() > 0.05  # apart, the hidden colour bleeds into the edge
    shown = [rgb * alpha for rgb, alpha in weighted]
    assert (shown[0] - shown[1]).abs().max() < 0.02  # weighted by the alpha, it does not


def test_a_16_bit_grey_images_transparent_level_is_scaled_with_its_pixels(tmp_path):
    from cdtool.dataset.images import open_rgb

    a = np.full((8, 8), 20000, np.uint16)
    a[:4] = 10240  # the transparent level; 10240 / 256 = 40 after scaling
    Image.fromarray(a).save(tmp_path / "g16.png", transparency=10240)
    loaded = open_rgb(tmp_path / "g16.png", (255, 0, 0))
    pixels = np.asarray(loaded.image)
    assert (pixels[:4] == (255, 0, 0)).all() and (pixels[4:] == 78).all()  # 20000 / 256, opaque
    assert "transparency flattened" in loaded.notes
