"""Scoring sample folders the way the customisation papers do, one folder at a time: CLIP-T against
each image's prompt, CLIP-I and DINO against reference photos, KID between the two sets, and, for
toy-world prompts, the oracle's verdicts. The metrics themselves are `cdtool.scoring.metrics`; this module
loads the models a choice of metrics needs, scores each image and summarises (overall, per prompt)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdtool import console
from cdtool.dataset.images import IMAGE_SUFFIXES
from cdtool.errors import CdtoolError

SCHEMA = "cdtool.score/1"
METRICS = ("clip-t", "clip-i", "dino", "kid", "oracle")
NEEDS_REF = ("clip-i", "dino", "kid")
KID_FEATURES = ("inception", "clip", "dino")
PER_IMAGE_SCORES = ("clip_t", "clip_t_clipscore", "clip_i", "dino")


@dataclass
class ScoreSettings:
    """What `cdtool score` was asked: the metrics and the models and estimator settings behind them."""

    metrics: list[str]
    clip_model: str = "ViT-B-32"
    clip_pretrained: str = "openai"
    dino: str = "facebook/dino-vits16"
    kid_features: str = "inception"
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    batch_size: int = 32
    seed: int = 0
    oracle: Path | None = None  # the toy-world judge's weights (None: the one shipped with cdtool)


@dataclass
class SampleFolder:
    """A folder of samples, its image files and their prompts (file name -> prompt)."""

    folder: Path
    files: list[Path]
    prompts: dict[str, str] = field(default_factory=dict)


@dataclass
class Scorers:
    """The feature extractors the chosen metrics need (None where not needed), and the reference
    photos' features under each."""

    clip: Any = None
    dino: Any = None
    kid: Any = None
    ref_clip: Any = None
    ref_dino: Any = None
    ref_kid: Any = None


def image_files(folder: Path) -> list[Path]:
    """The images of a sample folder (its `grid.png` left out), sorted; an error when there are none."""
    if not folder.is_dir():
        raise CdtoolError(f"{folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.name != "grid.png")
    if not files:
        raise CdtoolError(f"{folder} holds no images")
    return files


def read_sample_folder(folder: Path, prompts: Path | None, metrics: list[str]) -> SampleFolder:
    """`folder`'s images and prompts (from `prompts`, else its own prompts.json), checked before any
    model loads: CLIP-T and the oracle need the prompts."""
    files = image_files(folder)
    mapping: dict[str, str] = {}
    source = prompts or folder / "prompts.json"
    if source.exists():
        from cdtool.sampling.generate import read_prompt_map

        mapping = read_prompt_map(source)
    elif {"clip-t", "oracle"} & set(metrics):
        raise CdtoolError(
            f"{folder} has no prompts.json for {'CLIP-T' if 'clip-t' in metrics else 'the oracle'}; pass "
            "--prompts or leave that metric out of --metrics"
        )
    return SampleFolder(folder, files, mapping)


def load_scorers(settings: ScoreSettings, ref_files: list[Path]) -> Scorers:
    """Loads only the models `settings.metrics` need and embeds the reference photos once."""
    from cdtool.scoring.features import ClipImages, Dino, Inception, embed_files

    chosen, kf, batch = set(settings.metrics), settings.kid_features, settings.batch_size
    s = Scorers()
    if {"clip-t", "clip-i"} & chosen or ("kid" in chosen and kf == "clip"):
        from cdtool.scoring.clip_models import load_clip

        s.clip = load_clip(settings.clip_model, settings.clip_pretrained)
    if "dino" in chosen or ("kid" in chosen and kf == "dino"):
        s.dino = Dino(settings.dino)
    if "kid" in chosen:
        s.kid = {"clip": lambda: ClipImages(s.clip), "dino": lambda: s.dino, "inception": Inception}[kf]()
        s.ref_kid = embed_files(s.kid, ref_files, batch, cache=True)
    if s.clip is not None and "clip-i" in chosen:
        s.ref_clip = embed_files(ClipImages(s.clip), ref_files, batch, cache=True)
    if s.dino is not None and "dino" in chosen:
        s.ref_dino = embed_files(s.dino, ref_files, batch, cache=True)
    return s


def score_images(samples: SampleFolder, scorers: Scorers, settings: ScoreSettings) -> list[dict[str, Any]]:
    """A row per image: its file, prompt and each per-image score the metrics ask for."""
    rows: list[dict[str, Any]] = [{"file": f.name, "prompt": samples.prompts.get(f.name)} for f in samples.files]
    if "clip-t" in settings.metrics:
        _clip_t(rows, samples, scorers.clip, settings.batch_size)
    _against_reference(rows, samples.files, scorers, settings.batch_size)
    if "oracle" in settings.metrics:
        judge_images(rows, samples.files, settings.batch_size, settings.oracle)
    return rows


def _clip_t(rows: list[dict[str, Any]], samples: SampleFolder, clip: Any, batch_size: int) -> None:
    from cdtool.scoring.features import ClipImages, embed_files
    from cdtool.scoring.metrics import clip_score, cosine_rows, strip_tokens

    with_prompt = [i for i, r in enumerate(rows) if r["prompt"]]
    if len(with_prompt) < len(rows):
        console.warn(f"{len(rows) - len(with_prompt)} images in {samples.folder} have no prompt; CLIP-T skips them")
    if not with_prompt:
        return
    img = embed_files(ClipImages(clip), [samples.files[i] for i in with_prompt], batch_size)
    txt = clip.texts([strip_tokens(rows[i]["prompt"]) for i in with_prompt])
    cos = cosine_rows(img, txt)
    for i, c, s in zip(with_prompt, cos.tolist(), clip_score(cos).tolist(), strict=True):
        rows[i]["clip_t"], rows[i]["clip_t_clipscore"] = c, s


def _against_reference(rows: list[dict[str, Any]], files: list[Path], scorers: Scorers, batch_size: int) -> None:
    """CLIP-I and DINO: each image's mean cosine to the reference photos."""
    from cdtool.scoring.features import ClipImages, embed_files
    from cdtool.scoring.metrics import mean_cosine_per_row

    for name, extractor, reference in (
        ("clip_i", ClipImages(scorers.clip) if scorers.ref_clip is not None else None, scorers.ref_clip),
        ("dino", scorers.dino if scorers.ref_dino is not None else None, scorers.ref_dino),
    ):
        if extractor is None or reference is None:
            continue
        feats = embed_files(extractor, files, batch_size)
        for r, v in zip(rows, mean_cosine_per_row(feats, reference).tolist(), strict=True):
            r[name] = v


def judge_images(rows: list[dict[str, Any]], files: list[Path], batch_size: int, weights: Path | None = None) -> None:
    """Adds the oracle's verdicts (`oracle`: aspect -> bool) to each row whose prompt is a toy-world one."""
    from cdtool.dataset.images import open_image
    from cdtool.toy.judge import judge, parse_prompt
    from cdtool.toy.oracle import load_oracle, read

    oracle = load_oracle(str(weights) if weights else None)
    asked = [(i, parse_prompt(r["prompt"], oracle.tokens)) for i, r in enumerate(rows) if r["prompt"]]
    asked = [(i, a) for i, a in asked if a is not None]
    if len(asked) < len(rows):
        console.warn(f"{len(rows) - len(asked)} images have no toy-world prompt; the oracle skips them")
    for start in range(0, len(asked), batch_size):
        chunk = asked[start : start + batch_size]
        images = []
        for i, _ in chunk:
            with open_image(files[i]) as im:
                images.append(im.convert("RGB"))
        seen = read(oracle, images)
        for (i, a), s in zip(chunk, seen, strict=True):
            rows[i]["oracle"] = judge(a, s, oracle.patterns)
            rows[i]["oracle_read"] = s


def summarise_rows(rows: list[dict[str, Any]], oracle: bool) -> dict[str, Any]:
    """Mean, std and n of each per-image score present in `rows` (and the oracle's shares)."""
    from cdtool.scoring.metrics import summary

    out: dict[str, Any] = {}
    for key in PER_IMAGE_SCORES:
        vals = [r[key] for r in rows if key in r]
        if vals:
            out[key] = summary(vals)
    if oracle:
        out["oracle"] = oracle_summary(rows)
    return out


def oracle_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    from cdtool.toy.judge import summarise

    judged = [r for r in rows if "oracle" in r]
    return summarise([r["oracle"] for r in judged], ["concept" in r["oracle"] for r in judged])


def kid_entry(files: list[Path], scorers: Scorers, settings: ScoreSettings) -> dict[str, Any] | None:
    """KID x10³ between the samples and the reference photos (None, with a warning, below 2 a side)."""
    from cdtool.scoring.features import embed_files
    from cdtool.scoring.metrics import kid

    feats = embed_files(scorers.kid, files, settings.batch_size)
    ref = scorers.ref_kid
    if min(len(feats), len(ref)) < 2:
        console.warn("KID needs at least 2 images on each side; skipped")
        return None
    m, s = kid(feats, ref, settings.kid_subsets, settings.kid_subset_size, settings.seed)
    return {
        "mean": m * 1e3,
        "std": s * 1e3,
        "subsets": settings.kid_subsets,
        "subset_size": min(settings.kid_subset_size, len(feats), len(ref)),
        "features": settings.kid_features,
        "scale": 1000,
    }


def per_prompt(rows: list[dict[str, Any]], oracle: bool) -> list[dict[str, Any]]:
    """A summary per distinct prompt, in prompt order."""
    out = []
    for p in sorted({r["prompt"] for r in rows if r["prompt"]}):
        group = [r for r in rows if r["prompt"] == p]
        out.append({"prompt": p, "n": len(group), **summarise_rows(group, oracle)})
    return out


def score_folder(
    samples: SampleFolder, scorers: Scorers, settings: ScoreSettings, per_image: bool = False
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One run of the score document (overall and per-prompt summaries), and its per-image rows."""
    console.log(f"scoring {len(samples.files)} images in {samples.folder}")
    rows = score_images(samples, scorers, settings)
    oracle = "oracle" in settings.metrics
    overall = summarise_rows(rows, oracle=False)
    if scorers.kid is not None:
        entry = kid_entry(samples.files, scorers, settings)
        if entry is not None:
            overall["kid"] = entry
    if oracle:
        overall["oracle"] = oracle_summary(rows)
    run: dict[str, Any] = {
        "samples": str(samples.folder),
        "n_images": len(samples.files),
        "overall": overall,
        "per_prompt": per_prompt(rows, oracle),
    }
    if per_image:
        run["images"] = rows
    return run, rows


def score_document(
    settings: ScoreSettings, ref: Path | None, n_ref: int, scorers: Scorers, runs: list[dict[str, Any]]
) -> dict[str, Any]:
    """The whole result: what was measured, with which models, against which reference, and each run."""
    chosen = settings.metrics
    return {
        "schema": SCHEMA,
        "ref": {"path": str(ref), "n_images": n_ref} if ref is not None else None,
        "metrics": chosen,
        "models": {
            "clip": f"{settings.clip_model}:{settings.clip_pretrained}" if scorers.clip is not None else None,
            "dino": settings.dino if scorers.dino is not None else None,
            "kid_features": settings.kid_features if "kid" in chosen else None,
            "oracle": "cdtool toy-world oracle" if "oracle" in chosen else None,
        },
        "runs": runs,
    }
