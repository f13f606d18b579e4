"""`cdtool get-deltas`: a cdtool delta from a fine-tuned model or from any importable delta file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cdtool import __version__, console
from cdtool.atomic import claim_output
from cdtool.commands.common import (
    BaseAliasOpt,
    DeltaOutputOpt,
    ForceOpt,
    JsonOpt,
    Layers,
    LayersOpt,
    ModelOpt,
    QuietOpt,
    cdtool_command,
    examples,
    pick_alias,
    pick_model,
)
from cdtool.errors import CdtoolError
from cdtool.hashing import file_sha256
from cdtool.train.runs import is_run_folder

EXAMPLES = examples(
    "cdtool get-deltas finetuned-sd15/ --model stable-diffusion-v1-5/stable-diffusion-v1-5 -o cat.safetensors",
    "cdtool get-deltas delta.bin -o cat.safetensors",
    "cdtool get-deltas cat.run/checkpoints/step-000100 -o cat-100.safetensors",
)
MODEL_KEY = "model.diffusion_model.input_blocks.0.0.weight"


def _is_model(source: Path) -> bool:
    """A diffusers folder, or a checkpoint file holding a whole model rather than a delta."""
    if source.is_dir():
        return (source / "model_index.json").exists()
    if source.suffix != ".safetensors":
        return False  # pickled CompVis checkpoints import as deltas (their attn2 layers)
    from safetensors import safe_open

    try:
        with safe_open(str(source), framework="pt") as f:
            return MODEL_KEY in set(f.keys())
    except Exception:
        return False


def get_deltas(
    source: Annotated[
        Path,
        typer.Argument(
            help="A fine-tuned model (diffusers folder or checkpoint), or a delta file in any supported format.",
            show_default=False,
        ),
    ],
    output: DeltaOutputOpt,
    model: ModelOpt = None,
    base: BaseAliasOpt = None,
    layers: LayersOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Extract a delta from a fully fine-tuned model, or convert any importable delta to cdtool's format.

    Importable: cdtool files, the official Custom Diffusion delta.bin / CompVis .ckpt (also
    compressed), and diffusers' pytorch_custom_diffusion_weights + <token> files.
    """
    # the library loads here, not at the top, so that `cdtool get-deltas --help` starts without torch
    from cdtool.delta.base import (
        check_fits,
        check_token_width,
        fingerprint,
        fingerprint_names,
        load_base_params,
        pipeline_params,
    )
    from cdtool.delta.importers import check_delta_output, read_delta, save_delta

    model = pick_alias(model, base, "--model", "--base")
    layer_set = (layers or Layers.kv).value
    if not source.exists():
        raise CdtoolError(f"{source}: no such file or folder")
    check_delta_output(output)
    claim = claim_output(output, "get-deltas", force, inputs=[source])
    if _is_model(source):
        from cdtool.delta.base import check_kind
        from cdtool.delta.extract import extract_delta
        from cdtool.delta.file import Delta
        from cdtool.models.finetuned import adopt_record, read_model_record
        from cdtool.models.loading import load_pipeline, pipeline_kind

        record = read_model_record(source) if source.is_dir() else None  # a whole model cdtool trained
        base_model = pick_model(model, [record.base_model] if record is not None else None)

        console.log(f"loading {source} and its base {base_model}")
        tuned, base_pipe = load_pipeline(str(source)), load_pipeline(base_model)
        check_kind(Delta(base_kind=pipeline_kind(tuned), origin=str(source)), pipeline_kind(base_pipe), base_model)
        delta, matched = extract_delta(tuned, base_pipe, layer_set)
        if record is not None:
            adopt_record(delta, record, base_pipe, base_model, console.warn)
        if matched == 0:
            raise CdtoolError(f"no {layer_set} layers of {source} match the base {base_model}; is it the right base?")
        console.log(f"{matched} layers matched, {len(delta.layers)} changed, {len(delta.tokens)} new tokens")
        if not delta.layers and not delta.tokens:
            raise CdtoolError(f"{source} does not differ from {base_model} in any {layer_set} layer or token")
        params = pipeline_params(base_pipe)
        vocab = len(base_pipe.tokenizer)
        source_format = "fine-tuned-model"
    else:
        if is_run_folder(source):
            from cdtool.delta.file import check_numbers
            from cdtool.train.runs import delta_from_run

            delta = delta_from_run(source)
            check_numbers(delta, str(source))
        else:
            delta = read_delta(source)
        source_format = delta.source_format
        base_model = pick_model(model, [delta.base_model])
        params = None
        vocab = None
        if delta.needs_base or output.suffix == ".bin" or not delta.base_fingerprint:
            from cdtool.delta.base import check_kind
            from cdtool.models.loading import base_kind

            kind = base_kind(base_model)
            check_kind(delta, kind, base_model)
            delta.base_kind = kind
            params = load_base_params(base_model, fingerprint_names(delta))
            if delta.tokens:
                from cdtool.models.loading import load_text_side

                check_token_width(delta, params, base_model)
                vocab = len(load_text_side(base_model).tokenizer)
        if delta.needs_base:
            assert params is not None
            delta = delta.relative_to(params)
        if params is not None:
            check_fits(delta, params, base_model)
        if not delta.layers and not delta.tokens:
            raise CdtoolError(f"{source}: no layers and no tokens found")
        matched = len(delta.layers)
    if params is not None and (not delta.base_fingerprint or source_format != "cdtool.delta"):
        delta.base_model = base_model
        delta.base_fingerprint = fingerprint(params, fingerprint_names(delta), vocab)
    delta.created_by = f"cdtool {__version__} get-deltas"
    delta.provenance = dict(
        delta.provenance,
        get_deltas={
            "source": str(source),
            "source_format": source_format,
            "source_sha256": file_sha256(source) if source.is_file() else None,
        },
    )
    if not delta.concepts:
        delta.concepts = [{"token": t, "class_noun": None, "init_token": None, "prompts": []} for t in delta.tokens]
    with claim.staged() as tmp:
        save_delta(delta, tmp, {k: v for k, v in (params or {}).items()} if output.suffix == ".bin" else None)
    if json_out:
        console.result_json(
            {
                "output": str(output),
                "source_format": source_format,
                "layers_matched": matched,
                "layers": len(delta.layers),
                "tokens": list(delta.tokens),
                "base_model": delta.base_model,
            }
        )
    else:
        console.result(str(output))


def register(app: typer.Typer) -> None:
    app.command("get-deltas", epilog=EXAMPLES)(cdtool_command(get_deltas))
