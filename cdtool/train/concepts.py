"""The concepts a training run learns: each one's photos with captions, token, class noun, initialiser
and regularisation set, read from data folders, `--concept` specs or diffusers' concepts_list JSON."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from cdtool.dataset.folders import Example, check_images, read_folder
from cdtool.errors import CdtoolError, UsageError
from cdtool.models.clip_vocab import load_clip_tokenizer
from cdtool.models.tokens import check_new_token, default_init_tokens, identifier_problem, is_existing_word
from cdtool.train.recipes import (
    CUSTOM_DIFFUSION,
    DREAMBOOTH,
    DREAMBOOTH_IDENTIFIER,
    DREAMBOOTH_LORA,
    TEXTUAL_INVERSION,
)

DEFAULT_CAPTION = "photo of a {token} {class}"
DEFAULT_CLASS_CAPTION = "photo of a {class}"


@dataclass
class ConceptSpec:
    """One concept: its photos (with captions), token, class noun and regularisation set."""

    token: str
    class_noun: str
    init_token: str
    examples: list[Example]
    reg_examples: list[Example] = field(default_factory=list)
    data: str = ""
    reg: str | None = None


def concepts_from_options(
    data: Path | None, described: dict[str, str | Path | None], concepts: list[str], concepts_file: Path | None
) -> list[dict[str, str]]:
    """The concepts a command line names, as `--concept` fields: the DATA folder with the options
    that describe it (`described`: token, class, reg, init, prompt; None where not given), then
    each `--concept` spec, then the concepts of a concepts file."""
    raw: list[dict[str, str]] = []
    if data is not None:
        raw.append({"data": str(data), **{key: str(value) for key, value in described.items() if value is not None}})
    elif any(value is not None for value in described.values()):
        raise UsageError(
            "--token, --class-noun, --reg, --init-token and --prompt describe the DATA argument; give it, or use --concept"
        )
    raw += [parse_concept(c) for c in concepts]
    if concepts_file is not None:
        raw += read_concepts_file(concepts_file)
    return raw


def parse_concept(spec: str) -> dict[str, str]:
    """`DIR[,token=<new2>,class=dog,reg=DIR,init=pll,prompt=...]` -> fields."""
    out: dict[str, str] = {}
    for i, part in enumerate(p for p in spec.split(",") if p):
        key, sep, value = part.partition("=")
        if not sep:
            if i:
                raise UsageError(f"--concept {spec!r}: expected key=value after the data folder")
            out["data"] = part
            continue
        key = {"class_noun": "class", "init_token": "init"}.get(key.strip(), key.strip())
        if key not in ("data", "token", "class", "reg", "init", "prompt", "class_prompt"):
            raise UsageError(
                f"--concept {spec!r}: unknown field {key!r} (data, token, class, reg, init, prompt, class_prompt)"
            )
        out[key] = value.strip()
    if "data" not in out:
        raise UsageError(f"--concept {spec!r}: no data folder")
    return out


def read_concepts_file(path: Path) -> list[dict[str, str]]:
    """diffusers' concepts_list JSON (instance_prompt, class_prompt, instance_data_dir, class_data_dir)."""
    if not path.is_file():
        raise CdtoolError(f"{path}: no such concepts file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CdtoolError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); expected a list of concepts") from e
    if not isinstance(data, list) or not data or not all(isinstance(c, dict) for c in data):
        raise CdtoolError(f"{path}: expected a non-empty JSON list of concept objects")
    out = []
    for n, c in enumerate(data, 1):
        if "instance_data_dir" not in c:
            raise CdtoolError(f"{path}: concept {n} has no instance_data_dir")
        item = {"data": str(c["instance_data_dir"])}
        prompt = c.get("instance_prompt")
        if prompt:
            item["prompt"] = str(prompt)
            m = re.search(r"<[^>\s]+>", prompt)
            if m:
                item["token"] = m.group(0)
        if c.get("class_data_dir"):
            item["reg"] = str(c["class_data_dir"])
        if c.get("class_prompt"):
            item["class_prompt"] = str(c["class_prompt"])
            item["class"] = re.sub(r"^(a )?(photo|picture|image) of (a |an )?", "", str(c["class_prompt"]).strip())
        for key, ours in (("token", "token"), ("class_noun", "class"), ("initializer_token", "init")):
            if c.get(key):
                item[ours] = str(c[key])
        out.append(item)
    return out


def build_concepts(raw: list[dict[str, str]], resolution: int, method: str = CUSTOM_DIFFUSION) -> list[ConceptSpec]:
    """Resolve every concept's token, class, captions and regularisation set; check the images."""
    specs = []
    for i, c in enumerate(raw):
        data = Path(c["data"])
        info = read_folder(data, "", "data").info if data.is_dir() else {}
        token = c.get("token") or _folder_token(info.get("token"), method) or _default_token(method, i)
        noun = c.get("class") or info.get("class_noun") or ("" if method == TEXTUAL_INVERSION else None)
        if noun is None:
            raise UsageError(
                f"{data}: give the class noun (--class-noun, or class= in --concept); the folder has no concept.json"
            )
        template = c.get("prompt") or info.get("caption_template") or DEFAULT_CAPTION
        caption = template.replace("{token}", token).replace("{class}", noun)
        folder = read_folder(data, caption, "data")
        recorded = info.get("token")
        if recorded and recorded != token:  # prep wrote its token into the captions: the run's takes its place
            folder.examples = [replace(ex, caption=ex.caption.replace(recorded, token)) for ex in folder.examples]
        check_images(folder, resolution, "data")
        reg_examples = []
        if c.get("reg"):
            reg_caption = (c.get("class_prompt") or DEFAULT_CLASS_CAPTION).replace("{class}", noun)
            reg = read_folder(Path(c["reg"]), reg_caption, "regularisation")
            check_images(reg, resolution, "regularisation")
            reg_examples = reg.examples
        init = c.get("init") or info.get("init_token") or info.get("initializer_token") or ""
        specs.append(
            ConceptSpec(
                token=token,
                class_noun=noun,
                init_token=init,
                examples=folder.examples,
                reg_examples=reg_examples,
                data=str(data),
                reg=c.get("reg"),
            )
        )
    tokens = [s.token for s in specs]
    dup = {t for t in tokens if tokens.count(t) > 1}
    if dup:
        raise UsageError(
            f"two concepts share the token {sorted(dup)[0]}; give each its own (--concept ...,token=<new2>)"
        )
    for spec, default in zip(specs, default_init_tokens(tokens), strict=True):
        spec.init_token = spec.init_token or default
    tokenizer = load_clip_tokenizer()
    for s in specs:
        if method == DREAMBOOTH:
            problem = identifier_problem(tokenizer, s.token)
            if problem:
                raise CdtoolError(
                    f"--token {s.token} {problem}; DreamBooth binds the subject to one existing rare token of the "
                    f"vocabulary, which is not trained: use one such as {DREAMBOOTH_IDENTIFIER}"
                )
        elif not (method == DREAMBOOTH_LORA and is_existing_word(tokenizer, s.token)):
            check_new_token(tokenizer, s.token)
    return specs


def _default_token(method: str, index: int) -> str:
    """The token of a concept that names none: DreamBooth's rare identifier, else `<newK>`."""
    return DREAMBOOTH_IDENTIFIER if method in (DREAMBOOTH, DREAMBOOTH_LORA) else f"<new{index + 1}>"


def _folder_token(recorded: str | None, method: str) -> str | None:
    """The token a data folder records (`prep --token`), where the method can use it: DreamBooth's
    identifier is an existing word, and prep's modifier tokens (<new1>) are new ones, so a folder's
    <new1> gives way to the default identifier (its captions then say `sks` where they said <new1>)."""
    if recorded and method == DREAMBOOTH and identifier_problem(load_clip_tokenizer(), recorded):
        return None
    return recorded
