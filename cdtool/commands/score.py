"""`cdtool score`: CLIP-T, CLIP-I, DINO and KID of sample folders against reference photos, and, for
the built-in toy model, the oracle's judgement of each sample against its prompt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from cdtool import console
from cdtool.commands.common import ForceOpt, JsonOpt, QuietOpt, SeedOpt, cdtool_command, examples
from cdtool.errors import CdtoolError, UsageError
from cdtool.images import IMAGE_SUFFIXES

SCHEMA = "cdtool.score/1"
METRICS = ("clip-t", "clip-i", "dino", "kid", "oracle")
NEEDS_REF = ("clip-i", "dino", "kid")


def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise CdtoolError(f"{folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.name != "grid.png")
    if not files:
        raise CdtoolError(f"{folder} holds no images")
    return files


def score(
    samples: Annotated[
        list[Path],
        typer.Argument(
            help="Sample folders (from `cdtool sample`); several give one comparable table.",
            show_default=False,
            metavar="SAMPLES",
        ),
    ],
    ref: Annotated[
        Path | None,
        typer.Option("--ref", help="Reference photos of the subject (e.g. the prep folder); for clip-i, dino, kid."),
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option("--prompts", help="prompts.json (file name -> prompt); default: each folder's own.")
    ] = None,
    metrics: Annotated[
        str,
        typer.Option(
            "--metrics", help="Comma-separated: clip-t, clip-i, dino, kid; oracle (toy-world samples: see the README)."
        ),
    ] = "clip-t,clip-i,dino,kid",
    per_image: Annotated[bool, typer.Option("--per-image", help="Include a row per image in --json.")] = False,
    clip_model: Annotated[
        str, typer.Option("--clip-model", help="open_clip model (the papers: ViT-B-32).")
    ] = "ViT-B-32",
    clip_pretrained: Annotated[
        str, typer.Option("--clip-pretrained", help="open_clip weights tag or local file (the papers: openai).")
    ] = "openai",
    dino: Annotated[str, typer.Option("--dino", help="DINO model: hub id or local folder.")] = "facebook/dino-vits16",
    kid_features: Annotated[str, typer.Option("--kid-features", help="inception, clip or dino.")] = "inception",
    kid_subsets: Annotated[int, typer.Option("--kid-subsets", min=1, help="KID subsets.")] = 100,
    kid_subset_size: Annotated[
        int, typer.Option("--kid-subset-size", min=2, help="KID subset size (capped at the set sizes).")
    ] = 1000,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 32,
    seed: SeedOpt = 0,
    report: Annotated[
        Path | None,
        typer.Option(
            "--report",
            help="Also write the samples beside their scores: FILE.html (one self-contained page) or FILE.png.",
        ),
    ] = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Score samples the way the customisation papers do.

    CLIP-T: image-prompt cosine with modifier tokens removed from the prompt (also on the CLIPScore
    scale 2.5·max(cos, 0)); CLIP-I and DINO: mean cosine over all (sample, reference) pairs; KID:
    unbiased MMD² with the cubic polynomial kernel over random subsets, mean and std, x10³.
    """
    chosen = [m.strip() for m in metrics.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METRICS]
    if unknown or not chosen:
        raise UsageError(f"--metrics: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(METRICS)}")
    if kid_features not in ("inception", "clip", "dino"):
        raise UsageError("--kid-features: inception, clip or dino")
    if ref is None and set(NEEDS_REF) & set(chosen):
        raise UsageError(f"--ref is needed for {', '.join(m for m in chosen if m in NEEDS_REF)}")
    claim = None
    if report is not None:
        from cdtool.atomic import claim_output
        from cdtool.report import check_report_path

        check_report_path(report)
        claim = claim_output(report, "score", force, inputs=list(samples))
    ref_files = image_files(ref) if ref is not None else []
    runs_in = []
    for folder in samples:
        files = image_files(folder)
        mapping: dict[str, str] = {}
        source = prompts or folder / "prompts.json"
        if source.exists():
            try:
                mapping = json.loads(source.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise CdtoolError(f"{source}: not valid JSON ({e})") from e
        elif {"clip-t", "oracle"} & set(chosen):
            raise CdtoolError(
                f"{folder} has no prompts.json for {'CLIP-T' if 'clip-t' in chosen else 'the oracle'}; pass "
                "--prompts or leave that metric out of --metrics"
            )
        runs_in.append((folder, files, mapping))

    from cdtool.features import ClipImages, Dino, Inception, embed_files
    from cdtool.metrics import clip_score, cosine_rows, kid, mean_cosine_per_row, strip_tokens, summary

    clip = None
    if {"clip-t", "clip-i"} & set(chosen) or ("kid" in chosen and kid_features == "clip"):
        from cdtool.clip_models import load_clip

        clip = load_clip(clip_model, clip_pretrained)
    dino_model = Dino(dino) if "dino" in chosen or ("kid" in chosen and kid_features == "dino") else None
    kid_extractor = None
    if "kid" in chosen:
        kid_extractor = {"clip": lambda: ClipImages(clip), "dino": lambda: dino_model, "inception": Inception}[
            kid_features
        ]()
    ref_clip = (
        embed_files(ClipImages(clip), ref_files, batch_size, cache=True)
        if clip is not None and "clip-i" in chosen
        else None
    )
    ref_dino = (
        embed_files(dino_model, ref_files, batch_size, cache=True)
        if dino_model is not None and "dino" in chosen
        else None
    )
    ref_kid = embed_files(kid_extractor, ref_files, batch_size, cache=True) if kid_extractor is not None else None

    runs, scored = [], []
    for folder, files, mapping in runs_in:
        console.log(f"scoring {len(files)} images in {folder}")
        rows: list[dict[str, Any]] = [{"file": f.name, "prompt": mapping.get(f.name)} for f in files]
        if "clip-t" in chosen:
            with_prompt = [i for i, r in enumerate(rows) if r["prompt"]]
            if len(with_prompt) < len(rows):
                console.warn(f"{len(rows) - len(with_prompt)} images in {folder} have no prompt; CLIP-T skips them")
            if with_prompt:
                img = embed_files(ClipImages(clip), [files[i] for i in with_prompt], batch_size)
                txt = clip.texts([strip_tokens(rows[i]["prompt"]) for i in with_prompt])  # type: ignore[union-attr]
                cos = cosine_rows(img, txt)
                for i, c, s in zip(with_prompt, cos.tolist(), clip_score(cos).tolist(), strict=True):
                    rows[i]["clip_t"], rows[i]["clip_t_clipscore"] = c, s
        for name, extractor, reference in (
            ("clip_i", ClipImages(clip) if ref_clip is not None else None, ref_clip),
            ("dino", dino_model if ref_dino is not None else None, ref_dino),
        ):
            if extractor is None or reference is None:
                continue
            feats = embed_files(extractor, files, batch_size)
            for r, v in zip(rows, mean_cosine_per_row(feats, reference).tolist(), strict=True):
                r[name] = v
        if "oracle" in chosen:
            _judge(rows, files, batch_size)
        overall: dict[str, Any] = {}
        for key in ("clip_t", "clip_t_clipscore", "clip_i", "dino"):
            vals = [r[key] for r in rows if key in r]
            if vals:
                overall[key] = summary(vals)
        if kid_extractor is not None and ref_kid is not None:
            feats = embed_files(kid_extractor, files, batch_size)
            if min(len(feats), len(ref_kid)) < 2:
                console.warn("KID needs at least 2 images on each side; skipped")
            else:
                m, s = kid(feats, ref_kid, kid_subsets, kid_subset_size, seed)
                overall["kid"] = {
                    "mean": m * 1e3,
                    "std": s * 1e3,
                    "subsets": kid_subsets,
                    "subset_size": min(kid_subset_size, len(feats), len(ref_kid)),
                    "features": kid_features,
                    "scale": 1000,
                }
        if "oracle" in chosen:
            overall["oracle"] = _oracle_summary(rows)
        per_prompt = []
        for p in sorted({r["prompt"] for r in rows if r["prompt"]}):
            group = [r for r in rows if r["prompt"] == p]
            entry: dict[str, Any] = {"prompt": p, "n": len(group)}
            for key in ("clip_t", "clip_t_clipscore", "clip_i", "dino"):
                vals = [r[key] for r in group if key in r]
                if vals:
                    entry[key] = summary(vals)
            if "oracle" in chosen:
                entry["oracle"] = _oracle_summary(group)
            per_prompt.append(entry)
        run = {"samples": str(folder), "n_images": len(files), "overall": overall, "per_prompt": per_prompt}
        if per_image:
            run["images"] = rows
        runs.append(run)
        scored.append((folder, rows))
    doc = {
        "schema": SCHEMA,
        "ref": {"path": str(ref), "n_images": len(ref_files)} if ref is not None else None,
        "metrics": chosen,
        "models": {
            "clip": f"{clip_model}:{clip_pretrained}" if clip is not None else None,
            "dino": dino if dino_model is not None else None,
            "kid_features": kid_features if "kid" in chosen else None,
            "oracle": "cdtool toy-world oracle" if "oracle" in chosen else None,
        },
        "runs": runs,
    }
    if report is not None:
        from cdtool.report import write_report

        assert claim is not None
        with claim.staged() as tmp:
            write_report(tmp, doc, scored)
        console.log(f"wrote {report}")
    if json_out:
        console.result_json(doc)
    else:
        _table(doc)
        _per_prompt_tables(doc)


def _judge(rows: list[dict[str, Any]], files: list[Path], batch_size: int) -> None:
    """Adds the oracle's verdicts (`oracle`: aspect -> bool) to each row whose prompt is a toy-world one."""
    from cdtool.images import open_image
    from cdtool.toy.judge import judge, parse_prompt
    from cdtool.toy.oracle import load_oracle, read

    oracle = load_oracle()
    asked = [(i, parse_prompt(r["prompt"])) for i, r in enumerate(rows) if r["prompt"]]
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
            rows[i]["oracle"] = judge(a, s)
            rows[i]["oracle_read"] = s


def _oracle_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    from cdtool.toy.judge import summarise

    judged = [r for r in rows if "oracle" in r]
    return summarise([r["oracle"] for r in judged], ["concept" in r["oracle"] for r in judged])


def _table(doc: dict[str, Any]) -> None:
    from rich.table import Table

    ref = doc["ref"]
    table = Table(
        title=f"cdtool score vs {ref['path']} ({ref['n_images']} reference images)" if ref else "cdtool score"
    )
    table.add_column("samples", no_wrap=True)
    table.add_column("n", justify="right")
    cols = [
        ("clip_t", "CLIP-T"),
        ("clip_t_clipscore", "CLIPScore"),
        ("clip_i", "CLIP-I"),
        ("dino", "DINO"),
        ("kid", "KID x1e3"),
    ]
    oracle_cols = [
        ("concept_fidelity", "concept"),
        ("concept_shape_fidelity", "in shape"),
        ("prompt_fidelity", "prompt"),
        ("prior_drift", "drift"),
    ]
    oracle_present = [
        (k, label) for k, label in oracle_cols if any(k in r["overall"].get("oracle", {}) for r in doc["runs"])
    ]
    present = [(k, label) for k, label in cols if any(k in r["overall"] for r in doc["runs"])]
    for _, label in present + oracle_present:
        table.add_column(label, justify="right")
    for r in doc["runs"]:
        cells = [r["samples"], str(r["n_images"])]
        for k, _ in present:
            v = r["overall"].get(k)
            cells.append("-" if v is None else f"{v['mean']:.4f} ± {v['std']:.4f}")
        for k, _ in oracle_present:
            v = r["overall"].get("oracle", {}).get(k)
            cells.append("-" if v is None else f"{v:.3f}")
        table.add_row(*cells)
    _print(table)


def _per_prompt_tables(doc: dict[str, Any]) -> None:
    """Per run, a row per prompt: its image count and means (and the oracle's shares)."""
    from rich.table import Table

    from cdtool.report import METRIC_LABELS, ORACLE_SHARES

    for run in doc["runs"]:
        entries = run["per_prompt"]
        if not entries:
            continue
        table = Table()
        table.add_column("prompt")
        table.add_column("n", justify="right")
        metrics = [(k, label) for k, label in METRIC_LABELS if any(k in e for e in entries)]
        shares = [(k, label) for k, label in ORACLE_SHARES if any(k in e.get("oracle", {}) for e in entries)]
        for _, label in metrics + shares:
            table.add_column(label, justify="right")
        for e in entries:
            cells = [e["prompt"], str(e["n"])]
            cells += [f"{e[k]['mean']:.4f}" if k in e else "-" for k, _ in metrics]
            cells += [f"{e['oracle'][k]:.3f}" if k in e.get("oracle", {}) else "-" for k, _ in shares]
            table.add_row(*cells)
        _print(f"per prompt: {run['samples']}")
        _print(table)


def _print(item: Any) -> None:
    import sys

    from rich.console import Console

    Console(width=None if sys.stdout.isatty() else 240, highlight=False).print(item, markup=False)


EXAMPLES = examples(
    "cdtool score out/ --ref data/cat",
    "cdtool score out/ --ref data/cat --report out.html",
    "cdtool score before/ after/ --ref data/cat --metrics clip-t,clip-i --json",
)


def register(app: typer.Typer) -> None:
    app.command("score", epilog=EXAMPLES)(cdtool_command(score))
