"""`cdtool regset`: a regularisation set of class images with captions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cdtool import console
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
    from cdtool.dataset.regset import generate_set, knn_set, read_provenance, retrieve_set, write_set

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
    old = read_provenance(output)
    same_set = old is not None and all(old.get(k) == config[k] for k in ("class", "from", "prompt"))
    out = claim_output(output, "regset", force or same_set, folder=True, inputs=inputs, defer=True)
    if out.existed and not (force or same_set):
        what = f"{old.get('class')!r} from {old.get('from')}" if old else "another kind"
        raise CdtoolError(f"{output} holds another regularisation set ({what}); pass --force to replace it")
    with out.staged() as stage:
        if source == "generate":
            earlier = output if same_set and not force else None
            doc = generate_set(
                texts, stage, earlier, n, steps=steps, guidance=guidance, resolution=resolution, batch_size=batch_size,
                scheduler=scheduler.value, seed=seed, model=model_id, device=device, dtype=dtype,
            )  # fmt: skip
        elif source.startswith("knn:"):
            doc = knn_set(source[len("knn:") :], text, stage, n, min_sim, knn_index, timeout, retries)
        else:
            doc = retrieve_set(Path(source), text, stage, n, min_sim, clip_model, clip_pretrained)
        write_set(stage, doc, config, output)
    if json_out:
        console.result_json(doc)
    else:
        console.result(str(output))


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


EXAMPLES = examples(
    "cdtool regset cat --n 200 -o reg/cat",
    "cdtool regset cat --from laion-subset/ --n 200 -o reg/cat",
)


def register(app: typer.Typer) -> None:
    app.command("regset", epilog=EXAMPLES)(cdtool_command(regset))
