"""`cdtool prep`: a training folder from a user's photos."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from cdtool import __version__, console
from cdtool.atomic import claim_output
from cdtool.commands.common import FolderOutputOpt, ForceOpt, JsonOpt, QuietOpt, cdtool_command, examples
from cdtool.errors import CdtoolError


class Crop(str, Enum):
    center = "center"
    none = "none"
    pad = "pad"


def prep(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Image files, folders (searched recursively) or globs.", show_default=False, metavar="INPUT"
        ),
    ],
    output: FolderOutputOpt,
    token: Annotated[str, typer.Option("--token", help="Modifier token of the concept.")] = "<new1>",
    class_noun: Annotated[str, typer.Option("--class-noun", help="Class noun, e.g. cat.")] = ...,  # type: ignore[assignment]
    caption: Annotated[
        str, typer.Option("--caption", help="Caption template; {token} and {class} are filled in.")
    ] = "photo of a {token} {class}",
    captions_from_files: Annotated[
        bool,
        typer.Option(
            "--captions-from-files", help="Use the .txt/.caption file beside each image (template where missing)."
        ),
    ] = False,
    init_token: Annotated[
        str | None, typer.Option("--init-token", help="Initialiser token recorded for `train` (default: train's).")
    ] = None,
    size: Annotated[int, typer.Option("--size", min=8, help="Output size in pixels.")] = 512,
    crop: Annotated[
        Crop,
        typer.Option("--crop", help="center: square centre crop; pad: letterbox to a square; none: keep the aspect."),
    ] = Crop.center,
    background: Annotated[
        str, typer.Option("--background", help="Colour transparent images are flattened onto (and padding).")
    ] = "white",
    dedupe: Annotated[bool, typer.Option("--dedupe", help="Drop exact and near duplicates (perceptual hash).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report only; write nothing.")] = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Prepare a concept's photos for training: EXIF orientation, transparency, colour modes and
    animation handled; resized and cropped; captioned; duplicates reported.

    Writes DIR/NNNN-<sha>.png, DIR/metadata.jsonl (Hugging Face imagefolder: file_name, text) and
    DIR/concept.json (token, class noun, caption template, sources and their sha256). Re-running with
    the same inputs changes nothing.
    """
    from cdtool.dataset.images import parse_colour
    from cdtool.dataset.prep import expand_inputs, prepare, write_folder

    bg = parse_colour(background)
    files = expand_inputs(inputs)
    if not files:
        raise CdtoolError(f"no image files found in {', '.join(inputs)}")
    out = None
    if not dry_run:
        from cdtool.models.clip_vocab import load_clip_tokenizer
        from cdtool.models.tokens import check_new_token

        check_new_token(load_clip_tokenizer(), token)
        given = [Path(i) for i in inputs if Path(i).exists()]
        out = claim_output(output, "prep", force, folder=True, inputs=[*given, *files], defer=True)
    kept, report = prepare(
        files,
        token=token,
        class_noun=class_noun,
        caption=caption,
        captions_from_files=captions_from_files,
        size=size,
        crop=crop.value,
        background=bg,
        dedupe=dedupe,
    )
    _warn(report, size, dedupe)
    if not kept:
        raise CdtoolError(f"none of the {len(files)} input files is a usable image")
    report.update(output=str(output), size=size, crop=crop.value, written=not dry_run, changed=False)
    if out is not None:
        concept = {
            "token": token,
            "class_noun": class_noun,
            "init_token": init_token,
            "caption_template": caption,
            "captions_from_files": captions_from_files,
            "size": size,
            "crop": crop.value,
            "created_by": f"cdtool {__version__} prep",
        }
        with out.staged() as stage:
            write_folder(stage, kept, concept)
        report["changed"] = out.changed
        if not out.changed:
            console.log(f"{output} is already up to date")
        console.log(f"{len(kept)} of {len(files)} images written to {output}")
    if json_out:
        console.result_json(report)
    elif dry_run:
        console.result(
            f"{len(kept)} of {len(files)} images usable; {len(report['unreadable'])} unreadable, "
            f"{len(report['small'])} small, {len(report['duplicates'])} duplicates (dry run: nothing written)"
        )
    else:
        console.result(str(output))


def _warn(report: dict[str, Any], size: int, dedupe: bool) -> None:
    """A warning for each photo that was skipped, upscaled, a duplicate, or captioned by the template."""
    for bad in report["unreadable"]:
        console.warn(f"skipped {bad['path']}: {bad['error']}")
    for small in report["small"]:
        console.warn(f"{small['path']} is {small['size'][0]}x{small['size'][1]}, smaller than --size {size}; upscaled")
    for dup in report["duplicates"]:
        action = "dropped" if dedupe else "kept (--dedupe drops it)"
        console.warn(
            f"{dup['path']} is a{'n exact' if dup['kind'] == 'exact' else ' near'} duplicate of {dup['duplicate_of']}; {action}"
        )
    for path in report["caption_files_missing"]:
        console.warn(f"{path} has no .txt/.caption file; used the template")


EXAMPLES = examples(
    "cdtool prep photos/ --class-noun cat -o data/cat",
    'cdtool prep "shots/*.jpg" --class-noun dog --token "<new2>" --dedupe -o data/dog',
)


def register(app: typer.Typer) -> None:
    app.command("prep", epilog=EXAMPLES)(cdtool_command(prep))
