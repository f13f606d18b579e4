"""The model card beside every export folder: a README.md in the Hugging Face Hub's layout (YAML
front matter, then Markdown), so that `hf upload USER/NAME FOLDER` publishes a repository whose
page says what the concepts are, how to prompt them and how each tool loads the files."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdtool.choices import SDXL
from cdtool.delta.file import Delta

CARD = "README.md"
# Licences of the bases whose licence is known; any other base's card says `other`.
BASE_LICENSES = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "CompVis/stable-diffusion-v1-4": "creativeml-openrail-m",
    "CompVis/stable-diffusion-v1-3": "creativeml-openrail-m",
    "CompVis/stable-diffusion-v1-2": "creativeml-openrail-m",
    "CompVis/stable-diffusion-v1-1": "creativeml-openrail-m",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
METHOD_NAMES = {
    "custom-diffusion": "Custom Diffusion (Kumari et al., CVPR 2023)",
    "textual-inversion": "textual inversion (Gal et al., 2022)",
    "dreambooth-lora": "DreamBooth (Ruiz et al., 2023) with LoRA",
    "dreambooth": "DreamBooth (Ruiz et al., CVPR 2023), every UNet weight fine-tuned",
}


@dataclass
class TokenFile:
    """One token's embedding file in the export, and how each tool's prompts name it."""

    token: str
    path: str  # relative to the export folder
    a1111: str  # the word AUTOMATIC1111 matches: the file's name without its extension


@dataclass
class CardInputs:
    """What the card describes: the delta, the export (target, files), and its extras."""

    delta: Delta
    target: str
    folder_name: str
    files: list[str]  # relative to the export folder
    token_files: list[TokenFile] = field(default_factory=list)
    samples: str | None = None  # a sample grid inside the folder
    license: str | None = None


def hub_base(base_model: str) -> str | None:
    """The base as a Hub id, or None when it is a local path or a built-in model."""
    if _HUB_ID.match(base_model) and not Path(base_model).expanduser().exists():
        return base_model
    return None


def run_samples(delta: Delta, source: Path | None = None) -> Path | None:
    """The sample grid of the training run that made `delta` (train's samples.png), if it is still
    there: where the run recorded its folder, or beside `source` (the delta's file) under that name."""
    from cdtool.train.runs import SAMPLES

    run_dir = ((delta.provenance.get("train") or {}).get("config") or {}).get("run_dir")
    if not run_dir:
        return None
    places = [Path(run_dir)] + ([source.parent / Path(run_dir).name] if source is not None else [])
    return next((p / SAMPLES for p in places if (p / SAMPLES).is_file()), None)


def card_license(base_model: str, given: str | None) -> str:
    return given or BASE_LICENSES.get(base_model, "other")


def trigger_prompts(delta: Delta) -> list[str]:
    """The prompts the concepts were trained on, a few per concept (the first is the instance prompt)."""
    prompts: list[str] = []
    for concept in delta.concepts:
        for p in (concept.get("prompts") or [])[:3]:
            if p not in prompts:
                prompts.append(p)
    return prompts or [f"photo of a {t}" for t in delta.tokens]


def _yaml(value: Any, indent: str = "") -> str:
    """YAML for the front matter: strings as JSON strings (valid YAML double-quoted scalars)."""
    if isinstance(value, dict):
        return "".join(f"\n{indent}{k}:{_yaml(v, indent + '  ')}" for k, v in value.items())
    if isinstance(value, list):
        lines = []
        for item in value:
            body = _yaml(item, indent + "  ")
            lines.append(f"\n{indent}- {body.lstrip()}" if isinstance(item, dict) else f"\n{indent}-{body}")
        return "".join(lines)
    return f" {json.dumps(value, ensure_ascii=False)}"


def front_matter(inp: CardInputs) -> dict[str, Any]:
    delta = inp.delta
    methods = sorted({c.get("method") or "custom-diffusion" for c in delta.concepts} or {"custom-diffusion"})
    tags = ["text-to-image", "stable-diffusion", "diffusers", *methods, "cdtool"]
    if inp.target in ("diffusers-lora", "kohya"):
        tags.insert(3, "lora")
    prompts = trigger_prompts(delta)
    meta: dict[str, Any] = {}
    base = hub_base(delta.base_model)
    if base:
        meta["base_model"] = base
    meta["license"] = card_license(delta.base_model, inp.license)
    meta["library_name"] = "diffusers"
    meta["pipeline_tag"] = "text-to-image"
    meta["tags"] = tags
    if prompts:
        meta["instance_prompt"] = prompts[0]
    if inp.samples and prompts:
        meta["widget"] = [{"text": prompts[0], "output": {"url": inp.samples}}]
    return meta


def _tokens_section(inp: CardInputs) -> list[str]:
    by_token = {t.token: t for t in inp.token_files}
    named = [c.get("token") for c in inp.delta.concepts if c.get("token")]
    tokens = list(dict.fromkeys([*named, *inp.delta.tokens]))
    lines = [
        "## Tokens",
        "",
        "| token (diffusers, cdtool) | class | AUTOMATIC1111 | ComfyUI | embedding file |",
        "| --- | --- | --- | --- | --- |",
    ]
    for token in tokens:
        noun = (inp.delta.concept_for(token) or {}).get("class_noun") or "-"
        tf = by_token.get(token)
        if tf is None:  # an existing word (DreamBooth's identifier): written as it is everywhere
            lines.append(f"| `{token}` | {noun} | `{token}` | `{token}` | - |")
        else:
            lines.append(f"| `{token}` | {noun} | `{tf.a1111}` | `embedding:{tf.a1111}` | `{tf.path}` |")
    if inp.token_files:
        lines += [
            "",
            "Each embedding file holds its token; its name leaves out `<` and `>`, which Windows file names "
            "cannot hold. AUTOMATIC1111 takes the file's name as the word to write in a prompt; ComfyUI "
            "writes `embedding:` and the name.",
        ]
    return [*lines, ""]


def _load_embedding(folder: str, token: str, name: str, xl: bool) -> str:
    """The diffusers lines that load one token file: SDXL's holds a row per text encoder."""
    if not xl:
        return f'pipe.load_textual_inversion("{folder}", weight_name="{name}")\n'
    return (
        f'emb = load_file("{folder}/{name}")  # a local folder (huggingface_hub.snapshot_download for the Hub)\n'
        f'pipe.load_textual_inversion(emb["clip_l"], token="{token}", text_encoder=pipe.text_encoder, '
        "tokenizer=pipe.tokenizer)\n"
        f'pipe.load_textual_inversion(emb["clip_g"], token="{token}", text_encoder=pipe.text_encoder_2, '
        "tokenizer=pipe.tokenizer_2)\n"
    )


def _usage(inp: CardInputs) -> list[str]:
    base = hub_base(inp.delta.base_model) or "BASE_MODEL"
    folder = inp.folder_name
    xl = inp.delta.kind == SDXL
    pipeline = "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline"
    # the diffusers token files lie at the top of the folder (textual-inversion also has embeddings/)
    names = [(t.token, t.path.rsplit("/", 1)[-1]) for t in inp.token_files]
    ti = "".join(_load_embedding(folder, token, name, xl) for token, name in names)
    head = (
        f"```python\nimport torch\nfrom diffusers import {pipeline}\n"
        + ("from safetensors.torch import load_file\n" if xl and names else "")
        + f'\npipe = {pipeline}.from_pretrained("{base}", torch_dtype=torch.float16).to("cuda")\n'
    )
    prompt = (trigger_prompts(inp.delta) or ["photo of a cat"])[0]
    tail = f"image = pipe({json.dumps(prompt)}).images[0]\n```"
    lines = ["## Use", "", f'`"{folder}"` is this folder, or the Hub repository it was uploaded to.', ""]
    if inp.target == "model":  # a whole fine-tuned model: it loads as any diffusers model does
        lines += [
            f"```python\nimport torch\nfrom diffusers import {pipeline}\n\n"
            f'pipe = {pipeline}.from_pretrained("{folder}", torch_dtype=torch.float16).to("cuda")\n' + tail,
            "",
            "cdtool: `cdtool sample PROMPT --model FOLDER`; one checkpoint file for AUTOMATIC1111 and ComfyUI "
            "(Stable Diffusion 1.x): `cdtool export FOLDER --to checkpoint -o DIR`; the cross-attention "
            "key/value delta, for merging: `cdtool get-deltas FOLDER --model BASE -o DELTA.safetensors`.",
        ]
    elif inp.target == "diffusers-lora":
        lines += [
            head + f'pipe.load_lora_weights("{folder}", weight_name="pytorch_lora_weights.safetensors")\n' + ti + tail
        ]
    elif inp.target == "diffusers-custom-diffusion":
        lines += [
            head
            + f'pipe.unet.load_attn_procs("{folder}", weight_name="pytorch_custom_diffusion_weights.bin", _pipeline=pipe)\n'
            + ti
            + tail
        ]
    elif inp.target == "textual-inversion":
        lines += [head + ti + tail]
    elif inp.target == "checkpoint":
        ckpt = next(f for f in inp.files if "/" not in f and f.endswith(".safetensors"))
        lines += [
            "```python\nfrom diffusers import StableDiffusionPipeline\n\n"
            f'pipe = StableDiffusionPipeline.from_single_file("{folder}/{ckpt}", config="{base}")\n'
            + "".join(f'pipe.load_textual_inversion("{folder}/{t.path}", token="{t.token}")\n' for t in inp.token_files)
            + tail,
            "",
            f"AUTOMATIC1111: `{ckpt}` into `models/Stable-diffusion/`, the files of `embeddings/` into "
            f"`embeddings/`. ComfyUI: `{ckpt}` into `models/checkpoints/`, `embeddings/` into `models/embeddings/`."
            + (
                " The checkpoint's token table is the base's: the new tokens come from the embedding files."
                if inp.token_files
                else ""
            ),
        ]
    if inp.target == "kohya":
        lines += [
            "AUTOMATIC1111: `lora.safetensors` into `models/Lora/` (prompt with `<lora:lora:1>`), the files of "
            "`embeddings/` into `embeddings/`. ComfyUI: `lora.safetensors` into `models/loras/` (a LoraLoader "
            "node), `embeddings/` into `models/embeddings/`."
        ]
    elif inp.target in ("textual-inversion",):
        lines += [
            "",
            "AUTOMATIC1111: the files of `embeddings/` into `embeddings/`; ComfyUI: into `models/embeddings/`.",
        ]
    return [*lines, ""]


def _training(delta: Delta) -> list[str]:
    lines = ["## How it was made", ""]
    methods = sorted({c.get("method") or "custom-diffusion" for c in delta.concepts})
    lines.append(f"- Method: {', '.join(METHOD_NAMES.get(m, m) for m in methods) or 'Custom Diffusion'}, with cdtool.")
    lines.append(f"- Base model: `{delta.base_model or 'unknown'}`.")
    train = delta.provenance.get("train") or {}
    cfg = train.get("config") or {}
    if cfg:
        settings = [
            f"{train.get('steps_run', cfg.get('steps'))} steps"
            + (f" (stopped early: {train['stop_reason']})" if train.get("stopped_early") else ""),
            f"learning rate {train.get('learning_rate', cfg.get('lr'))}",
            f"batch {cfg.get('batch_size')}",
            f"resolution {cfg.get('resolution')}",
            _trained(cfg),
            "size augmentation" if cfg.get("aug") else "no size augmentation",
            f"seed {cfg.get('seed')}",
        ]
        if cfg.get("mixed_precision") not in (None, "no"):
            settings.append(f"mixed precision {cfg['mixed_precision']}")
        lines.append(f"- Training: {', '.join(settings)}.")
    for concept in delta.concepts:
        prior = f"prior preservation with `{concept['reg']}`" if concept.get("reg") else "no prior preservation"
        init = f", initialised from `{concept['init_token']}`" if concept.get("init_token") else ""
        lines.append(f"- `{concept.get('token')}` ({concept.get('class_noun') or '-'}): {prior}{init}.")
    merge = delta.provenance.get("merge")
    if merge:
        inputs = ", ".join(f"`{Path(i['path']).name}`" for i in merge.get("inputs", []))
        lines.append(f"- Merged ({merge.get('method')}) from {inputs}.")
    comp = delta.provenance.get("compress")
    if comp:
        rule = next(f"{k} {comp[k]}" for k in ("rank", "energy", "fro") if comp.get(k) is not None)
        lines.append(f"- Compressed by truncated SVD ({rule}, {comp.get('dtype')}).")
    lines.append(f"- Written by {delta.created_by or 'cdtool'}.")
    return [*lines, ""]


def _trained(cfg: dict[str, Any]) -> str:
    """What a run trained, in words."""
    if cfg.get("method") == "dreambooth":
        return "every UNet weight" + (" and the text encoder" if cfg.get("train_text_encoder") else "")
    return f"layers {cfg.get('train')}"


def model_card(inp: CardInputs) -> str:
    """The README.md text."""
    delta = inp.delta
    names = ", ".join(
        f"{t} ({(delta.concept_for(t) or {}).get('class_noun') or 'concept'})" for t in delta.tokens
    ) or ", ".join(c.get("token", "?") for c in delta.concepts)
    lines = ["---" + _yaml(front_matter(inp)), "---", "", f"# {names or inp.folder_name}", ""]
    base = delta.base_model or "a Stable Diffusion model"
    if inp.target == "model":
        intro = f"`{base}` fine-tuned whole with cdtool to know the concepts below: a diffusers model folder."
    else:
        intro = f"Concepts taught to `{base}` with cdtool, exported as `{inp.target}`."
    lines += [intro, ""]
    if delta.tokens or delta.concepts:
        lines += _tokens_section(inp)
    prompts = trigger_prompts(delta)
    if prompts:
        lines += ["## Trigger prompts", "", *[f"- `{p}`" for p in prompts], ""]
    lines += _usage(inp)
    lines += _training(delta)
    if inp.samples:
        lines += ["## Samples", "", f"![samples]({inp.samples})", ""]
    lines += ["## Files", "", *[f"- `{f}`" for f in inp.files], ""]
    return "\n".join(lines)
