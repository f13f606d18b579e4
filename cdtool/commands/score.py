"""`cdtool score`: CLIP-T, CLIP-I, DINO and KID of sample folders against reference photos, and, for
the built-in toy model, the oracle's judgement of each sample against its prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cdtool import console
from cdtool.commands.common import ForceOpt, JsonOpt, QuietOpt, SeedOpt, cdtool_command, examples
from cdtool.errors import UsageError
from cdtool.scoring.score import (
    KID_FEATURES,
    METRICS,
    NEEDS_REF,
    ScoreSettings,
    image_files,
    load_scorers,
    read_sample_folder,
    score_document,
    score_folder,
)


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
            "--metrics",
            help="Comma-separated: clip-t, clip-i, dino, kid; oracle (toy-world samples: see docs/toy-world.md).",
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
    oracle: Annotated[
        Path | None,
        typer.Option(
            "--oracle",
            exists=True,
            dir_okay=False,
            help="The toy-world judge's weights (tools/train_oracle.py); default: the one shipped with cdtool.",
        ),
    ] = None,
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
    settings = ScoreSettings(
        metrics=_chosen_metrics(metrics, kid_features, ref),
        clip_model=clip_model,
        clip_pretrained=clip_pretrained,
        dino=dino,
        kid_features=kid_features,
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
        batch_size=batch_size,
        seed=seed,
        oracle=oracle,
    )
    claim = None
    if report is not None:
        from cdtool.atomic import claim_output
        from cdtool.scoring.report import check_report_path

        check_report_path(report)
        claim = claim_output(report, "score", force, inputs=list(samples))
    ref_files = image_files(ref) if ref is not None else []
    folders = [read_sample_folder(folder, prompts, settings.metrics) for folder in samples]
    scorers = load_scorers(settings, ref_files)
    scored = [score_folder(f, scorers, settings, per_image) for f in folders]
    doc = score_document(settings, ref, len(ref_files), scorers, [run for run, _ in scored])
    if claim is not None:
        from cdtool.scoring.report import write_report

        with claim.staged() as tmp:
            write_report(tmp, doc, [(f.folder, rows) for f, (_, rows) in zip(folders, scored, strict=True)])
        console.log(f"wrote {report}")
    if json_out:
        console.result_json(doc)
    else:
        _table(doc)
        _per_prompt_tables(doc)


def _chosen_metrics(metrics: str, kid_features: str, ref: Path | None) -> list[str]:
    """--metrics as a list, checked against the other options (usage errors, before any work)."""
    chosen = [m.strip() for m in metrics.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METRICS]
    if unknown or not chosen:
        raise UsageError(f"--metrics: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(METRICS)}")
    if kid_features not in KID_FEATURES:
        raise UsageError("--kid-features: inception, clip or dino")
    if ref is None and set(NEEDS_REF) & set(chosen):
        raise UsageError(f"--ref is needed for {', '.join(m for m in chosen if m in NEEDS_REF)}")
    return chosen


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

    from cdtool.scoring.report import METRIC_LABELS, ORACLE_SHARES

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
