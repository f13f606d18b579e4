"""`cdtool regset`: a regularisation set of class images with captions."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from cdtool import __version__, console
from cdtool.atomic import claim_output
from cdtool.commands.common import (
    DeviceOpt,
    DtypeOpt,
    FolderOutputOpt,
    ForceOpt,
    JsonOpt,
    ModelOpt,
    QuietOpt,
    Scheduler,
    SeedOpt,
    cdtool_command,
    examples,
    pick_available_model,
)
from cdtool.dataset.images import ImageError, open_image
from cdtool.errors import CdtoolError, UsageError


def regset(
    class_noun: Annotated[str, typer.Argument(help="The class, e.g. cat.", show_default=False, metavar="CLASS")],
    output: FolderOutputOpt,
    n: Annotated[int, typer.Option("--n", min=1, help="Number of images.")] = 200,
    source: Annotated[
        str,
        typer.Option(
            "--from",
            help="generate (the base model), a local image-caption collection folder, or knn:URL (a clip-retrieval service).",
        ),
    ] = "generate",
    prompt: Annotated[
        str, typer.Option("--prompt", help="Prompt ({class} is filled in): generated from, or retrieved by.")
    ] = "photo of a {class}",
    prompts: Annotated[
        Path | None,
        typer.Option(
            "--prompts",
            help="generate: a file of prompts, one per line ({class} filled in), cycled over the images (varied captions, like a retrieved set's).",
        ),
    ] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Denoising steps (generate).")] = 50,
    guidance: Annotated[float, typer.Option("--guidance", min=0.0, help="Guidance scale (generate).")] = 6.0,
    resolution: Annotated[
        int | None, typer.Option("--resolution", help="Image size (generate; default: the model's).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass (generate).")] = 4,
    scheduler: Annotated[Scheduler, typer.Option("--scheduler", help="Sampler (generate).")] = Scheduler("ddim"),  # type: ignore[assignment]
    seed: SeedOpt = 0,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    min_sim: Annotated[
        float,
        typer.Option(
            "--min-sim", help="Retrieval: least CLIP similarity of a caption to the prompt (the paper: 0.85)."
        ),
    ] = 0.85,
    clip_model: Annotated[str, typer.Option("--clip-model", help="Retrieval: open_clip model.")] = "ViT-B-32",
    clip_pretrained: Annotated[
        str, typer.Option("--clip-pretrained", help="Retrieval: open_clip weights tag or local file.")
    ] = "openai",
    knn_index: Annotated[str, typer.Option("--knn-index", help="kNN: index name of the service.")] = "laion5B-L-14",
    timeout: Annotated[float, typer.Option("--timeout", help="kNN: seconds per request.")] = 10.0,
    retries: Annotated[int, typer.Option("--retries", min=0, help="kNN: retries per request.")] = 3,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Build a regularisation set: class images with captions (images + metadata.jsonl + regset.json).

    The paper found real retrieved images better than generated ones (less overfitting): prefer
    --from PATH (a local collection: metadata.jsonl or .txt captions, img2dataset folders or
    webdataset tars) or --from knn:URL (a self-hosted clip-retrieval service; the public LAION one
    is gone). --from generate (default) samples the base model, one seed per image, and resumes:
    valid images already there are kept.
    """
    # the library loads here, not at the top, so that `cdtool regset --help` starts without torch
    from cdtool.dataset.regset import write_metadata

    text = prompt.replace("{class}", class_noun)
    texts = [text]
    if prompts is not None:
        if source != "generate":
            raise UsageError("--prompts is for --from generate; retrieval ranks by --prompt")
        texts = _read_prompts(prompts, class_noun)
    inputs = [prompts] if prompts is not None else []
    model_id = pick_available_model(model) if source == "generate" else ""  # before any output exists
    if source == "generate":
        from cdtool.models.loading import resolve_device
        from cdtool.sampling.generate import check_size

        resolve_device(device)
        check_size(resolution, "--resolution")
    elif not source.startswith("knn:"):
        if not Path(source).is_dir():
            raise UsageError(f"--from {source!r}: give generate, knn:URL, or an existing collection folder")
        inputs.append(Path(source))
    config = {"class": class_noun, "from": source, "prompt": texts[0] if len(texts) == 1 else texts, "n": n}
    old = _provenance(output)
    same_set = old is not None and all(old.get(k) == config[k] for k in ("class", "from", "prompt"))
    out = claim_output(output, "regset", force or same_set, folder=True, inputs=inputs, defer=True)
    if out.existed and not (force or same_set):
        what = f"{old.get('class')!r} from {old.get('from')}" if old else "another kind"
        raise CdtoolError(f"{output} holds another regularisation set ({what}); pass --force to replace it")
    with out.staged() as stage:
        if source == "generate":
            doc = _generate(
                class_noun,
                texts,
                stage,
                output if same_set and not force else None,
                n,
                steps,
                guidance,
                resolution,
                batch_size,
                scheduler.value,
                seed,
                model_id,
                device,
                dtype,
            )
        elif source.startswith("knn:"):
            doc = _knn(source[len("knn:") :], text, stage, n, min_sim, knn_index, timeout, retries)
        else:
            doc = _retrieve(Path(source), text, stage, n, min_sim, clip_model, clip_pretrained)
        doc.update(config, created_by=f"cdtool {__version__} regset", output=str(output))
        write_metadata(stage, doc.pop("rows"), doc)
    if json_out:
        console.result_json(doc)
    else:
        console.result(str(output))


def _provenance(folder: Path) -> dict[str, Any] | None:
    """The regset.json of an earlier set in `folder`, if there is a readable one."""
    from cdtool.dataset.regset import PROVENANCE

    try:
        doc = json.loads((folder / PROVENANCE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _read_prompts(path: Path, noun: str) -> list[str]:
    if not path.is_file():
        raise CdtoolError(f"{path}: no such prompts file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CdtoolError(f"{path}: cannot read it as UTF-8 text ({e}); give one prompt per line") from e
    texts = [line.strip().replace("{class}", noun) for line in lines if line.strip()]
    if not texts:
        raise CdtoolError(f"{path} holds no prompts; give one prompt per line")
    return texts


def _generate(
    noun: str,
    texts: list[str],
    out: Path,
    earlier: Path | None,
    n: int,
    steps: int,
    guidance: float,
    resolution: int | None,
    batch_size: int,
    scheduler: str,
    seed: int,
    model: str,
    device: str,
    dtype: str,
) -> dict[str, Any]:
    from cdtool.dataset.regset import keep_image
    from cdtool.sampling.generate import Job, generate, save_png, set_scheduler

    jobs = [Job(texts[i % len(texts)], 0, seed + i, f"{i:05d}.png") for i in range(n)]
    todo = [j for j in jobs if earlier is None or not keep_image(earlier / j.file_name, out / j.file_name)]
    if len(todo) < n:
        console.log(f"{n - len(todo)} of {n} images already there; generating {len(todo)}")
    if todo:
        from cdtool.models.pipeline import load_with_deltas

        pipe = load_with_deltas(model, [], device=device, dtype=dtype)
        set_scheduler(pipe, scheduler)
        size = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        start = time.perf_counter()
        with console.progress("generating", len(todo), plain=True) as bar:
            for k, (job, image) in enumerate(
                generate(
                    pipe,
                    todo,
                    steps=steps,
                    guidance=guidance,
                    height=size,
                    width=size,
                    batch_size=batch_size,
                    negative_prompt=None,
                ),
                1,
            ):
                save_png(image, out / job.file_name)
                eta = (time.perf_counter() - start) / k * (len(todo) - k)
                bar.advance(1, f"ETA {eta:.0f}s")
    return {
        "rows": [{"file_name": j.file_name, "text": j.prompt} for j in jobs],
        "generated": len(todo),
        "kept": n - len(todo),
        "model": model,
        "seed": seed,
        "steps": steps,
        "guidance": guidance,
        "scheduler": scheduler,
    }


def _save(image: Any, path: Path) -> None:
    from cdtool.sampling.generate import save_png

    save_png(image.convert("RGB"), path)


def _retrieve(
    collection: Path, text: str, out: Path, n: int, min_sim: float, clip_model: str, clip_pretrained: str
) -> dict[str, Any]:
    from cdtool.dataset.regset import rank, scan_collection
    from cdtool.scoring.clip_models import load_clip

    items = scan_collection(collection)
    if not items:
        raise CdtoolError(
            f"{collection} holds no captioned images (metadata.jsonl, .txt beside images, or .tar shards)"
        )
    console.log(f"{len(items)} captioned images in {collection}")
    clip = load_clip(clip_model, clip_pretrained)
    ranked = rank(clip, items, text, console.log)
    qualified = [(s, it) for s, it in ranked if s >= min_sim]
    console.log(f"{len(qualified)} of {len(items)} captions have similarity >= {min_sim} to {text!r}")
    if not qualified:
        raise CdtoolError(
            f"no caption in {collection} reaches --min-sim {min_sim} for {text!r} (best {ranked[0][0]:.3f}); lower --min-sim or use a larger collection"
        )
    rows, chosen, unreadable = [], [], 0
    for sim, item in qualified:
        if len(rows) == n:
            break
        try:
            image = item.open()
        except ImageError as e:
            console.warn(f"skipped {e}")
            unreadable += 1
            continue
        name = f"{len(rows):05d}.png"
        _save(image, out / name)
        rows.append({"file_name": name, "text": item.caption})
        chosen.append(
            {"file_name": name, "source": item.path + (f"::{item.member}" if item.member else ""), "similarity": sim}
        )
    if len(rows) < n:
        console.warn(f"only {len(rows)} of the {n} images asked for qualified (similarity >= {min_sim})")
    return {
        "rows": rows,
        "collection": str(collection),
        "collection_size": len(items),
        "qualified": len(qualified),
        "unreadable": unreadable,
        "min_sim": min_sim,
        "clip_model": clip_model,
        "clip_pretrained": clip_pretrained,
        "images": chosen,
    }


def _knn(
    url: str, text: str, out: Path, n: int, min_sim: float, index: str, timeout: float, retries: int
) -> dict[str, Any]:
    from cdtool.dataset.regset import download, knn_query

    results = knn_query(url, text, n * 2, index, timeout, retries)
    qualified = [r for r in results if float(r.get("similarity", 1.0)) >= min_sim]
    console.log(f"{len(results)} results, {len(qualified)} with similarity >= {min_sim}")
    rows, chosen, failed = [], [], 0
    for r in qualified:
        if len(rows) == n:
            break
        try:
            image = open_image(r["url"], download(r["url"], timeout, retries))
        except (CdtoolError, ImageError):
            failed += 1
            continue
        name = f"{len(rows):05d}.png"
        _save(image, out / name)
        rows.append({"file_name": name, "text": str(r.get("caption") or text)})
        chosen.append({"file_name": name, "url": r["url"], "similarity": r.get("similarity")})
    if not rows:
        raise CdtoolError(f"none of the {len(qualified)} results from {url} could be downloaded as an image")
    if len(rows) < n:
        console.warn(f"only {len(rows)} of the {n} images asked for were retrieved ({failed} downloads failed)")
    return {
        "rows": rows,
        "service": url,
        "index": index,
        "results": len(results),
        "qualified": len(qualified),
        "failed_downloads": failed,
        "min_sim": min_sim,
        "images": chosen,
    }


EXAMPLES = examples(
    "cdtool regset cat --n 200 -o reg/cat",
    "cdtool regset cat --from laion-subset/ --n 200 -o reg/cat",
)


def register(app: typer.Typer) -> None:
    app.command("regset", epilog=EXAMPLES)(cdtool_command(regset))
