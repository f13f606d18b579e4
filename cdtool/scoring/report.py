"""`cdtool score --report`: the samples beside their scores, as one self-contained HTML page (the
images inlined as small base64 PNGs or JPEGs) or one PNG picture."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cdtool.errors import UsageError

REPORT_SUFFIXES = (".html", ".png")
THUMB = 192  # the longest side of an inlined image (small ones are enlarged to at least MIN_TILE)
METRIC_LABELS = (("clip_t", "CLIP-T"), ("clip_i", "CLIP-I"), ("dino", "DINO"))
ORACLE_LABELS = (("concept", "concept"), ("concept_shape", "in shape"), ("prompt", "prompt"))
ORACLE_SHARES = (
    ("concept_fidelity", "concept"),
    ("concept_shape_fidelity", "in shape"),
    ("prompt_fidelity", "prompt"),
    ("prior_drift", "drift"),
)


def check_report_path(path: Path) -> None:
    if path.suffix.lower() not in REPORT_SUFFIXES:
        raise UsageError(f"--report {path}: give a .html or .png file")


def image_caption(row: Mapping[str, Any]) -> list[str]:
    """One image's scores, a short line each."""
    lines = []
    values = [f"{label} {row[k]:.3f}" for k, label in METRIC_LABELS if k in row]
    for start in range(0, len(values), 2):
        lines.append("  ".join(values[start : start + 2]))
    verdicts = row.get("oracle") or {}
    said = [f"{label} {'yes' if verdicts[k] else 'no'}" for k, label in ORACLE_LABELS if k in verdicts]
    if said:
        lines.append(", ".join(said))
    return lines


def prompt_summary(entry: Mapping[str, Any]) -> str:
    """A prompt's means (and the oracle's shares) on one line."""
    parts = [f"{label} {entry[k]['mean']:.3f}" for k, label in METRIC_LABELS if k in entry]
    oracle = entry.get("oracle") or {}
    parts += [f"{label} {oracle[k]:.2f}" for k, label in ORACLE_SHARES if k in oracle]
    return ", ".join(parts)


def _thumbnail(path: Path) -> tuple[bytes, str]:
    """(bytes, mime type): small images enlarged pixel for pixel as PNG, large ones shrunk as JPEG."""
    from PIL import Image

    from cdtool.preview import tile_side

    with Image.open(path) as im:
        im = im.convert("RGB")
    buf = io.BytesIO()
    if max(im.size) <= THUMB:
        side = tile_side(im.width)
        im = im.resize((side, side * im.height // im.width), Image.Resampling.NEAREST)
        im.save(buf, format="PNG")
        return buf.getvalue(), "image/png"
    im.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue(), "image/jpeg"


def _data_uri(path: Path) -> str:
    data, mime = _thumbnail(path)
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:right}
td:first-child,th:first-child{text-align:left}.images{display:flex;flex-wrap:wrap;gap:.6em}
figure{margin:0;font-size:.8em}figcaption{white-space:pre-line}img{image-rendering:pixelated;display:block}"""


def _overall_table(doc: Mapping[str, Any]) -> str:
    head = "<tr><th>samples</th><th>n</th>" + "".join(f"<th>{label}</th>" for _, label in METRIC_LABELS)
    head += "<th>KID x1e3</th>" + "".join(f"<th>{label}</th>" for _, label in ORACLE_SHARES) + "</tr>"
    body = []
    for run in doc["runs"]:
        o = run["overall"]
        cells = [html.escape(run["samples"]), str(run["n_images"])]
        cells += [f"{o[k]['mean']:.4f} ± {o[k]['std']:.4f}" if k in o else "-" for k, _ in METRIC_LABELS]
        cells.append(f"{o['kid']['mean']:.2f} ± {o['kid']['std']:.2f}" if "kid" in o else "-")
        shares = o.get("oracle") or {}
        cells += [f"{shares[k]:.3f}" if k in shares else "-" for k, _ in ORACLE_SHARES]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def html_report(doc: Mapping[str, Any], runs: Sequence[tuple[Path, Sequence[Mapping[str, Any]]]]) -> str:
    """The page: the overall table, then per run and prompt its summary and each image with its scores."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>cdtool score</title>",
        f"<style>{_STYLE}</style></head><body><h1>cdtool score</h1>",
    ]
    if doc.get("ref"):
        parts.append(f"<p>Reference: {html.escape(doc['ref']['path'])} ({doc['ref']['n_images']} images)</p>")
    parts.append(_overall_table(doc))
    for run, (folder, rows) in zip(doc["runs"], runs, strict=True):
        parts.append(f"<h2>{html.escape(run['samples'])}</h2>")
        for entry in run["per_prompt"]:
            parts.append(f"<h3>{html.escape(entry['prompt'])}</h3><p>{html.escape(prompt_summary(entry))}</p>")
            figures = [
                f"<figure><img src='{_data_uri(folder / r['file'])}' alt='{html.escape(r['file'])}'>"
                f"<figcaption>{html.escape(chr(10).join([r['file'], *image_caption(r)]))}</figcaption></figure>"
                for r in rows
                if r["prompt"] == entry["prompt"]
            ]
            parts.append(f"<div class='images'>{''.join(figures)}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def png_report(doc: Mapping[str, Any], runs: Sequence[tuple[Path, Sequence[Mapping[str, Any]]]]) -> Any:
    """One picture: per run and prompt a line with its summary, then its images with their scores."""
    from PIL import Image

    from cdtool.preview import captioned_rows

    blocks = []
    for run, (folder, rows) in zip(doc["runs"], runs, strict=True):
        for entry in run["per_prompt"]:
            items = []
            for r in (r for r in rows if r["prompt"] == entry["prompt"]):
                with Image.open(folder / r["file"]) as im:
                    items.append((im.convert("RGB"), image_caption(r)))
            label = f"{run['samples']}: {entry['prompt']}  ({prompt_summary(entry)})"
            blocks.append((label, items))
    return captioned_rows(blocks)


def write_report(path: Path, doc: Mapping[str, Any], runs: Sequence[tuple[Path, Sequence[Mapping[str, Any]]]]) -> None:
    """Write the report to `path` (a claimed output's staging path): HTML or PNG by its suffix."""
    if path.suffix.lower() == ".html":
        path.write_text(html_report(doc, runs), encoding="utf-8")
    else:
        png_report(doc, runs).save(path, format="PNG")
