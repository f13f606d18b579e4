"""Merge speed: `cdtool merge` against the official Custom Diffusion merge on an SD1.5-shaped model,
and on an SDXL-shaped one.

    python benchmarks/merge_speed.py [--workdir /tmp/cdtool-bench] [--model sd15|sdxl|tiny-xl]

Builds the SD1.5-shaped pipeline (real configs, random weights) once, two concept deltas on it,
then measures in one run, each in a fresh process:
- cdtool merge, cold (no feature cache) and warm (cache filled), with the default 1200 captions,
  for the paper's closed form and for `--method least-squares`;
- the official approach, reimplemented here from the paper's code path (src/diffusers_composenW.py):
  the full pipeline loaded (VAE included), captions encoded one by one, a float32 LU and one solve
  per target row for every layer, with its 200 captions;
- cdtool merge on the official's captions, whose result is compared with the official's.

`--model sdxl` builds the SDXL-shaped pipeline instead (benchmarks/sdxl.py: the real UNet and both
text-encoder configs, random float16 weights, about 7 GB on disk) with two concepts on all 140
key/value layers, and measures cdtool's two merges, cold and warm; the official merge has no SDXL
(its code reads one tokenizer and 768-wide features). The merge reads only the key/value weights
and the token tables of the UNet's and the text encoders' files. `--model tiny-xl` runs the same
on the built-in tiny SDXL model, in seconds, to check the benchmark itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import measure

CONCEPTS = [("<new1>", "cat"), ("<new2>", "dog")]


def make_deltas(folder: Path, out: Path, xl: bool = False) -> list[Path]:
    """Two concepts on every key/value layer, with their token's rows (in both text encoders for
    SDXL), fingerprinted against the base; the official .bin beside each (SD1.5 only)."""
    from cdtool.choices import SDXL
    from cdtool.delta.base import (
        TOKEN_EMBEDDING,
        TOKEN_EMBEDDING_2,
        fingerprint,
        fingerprint_names,
        load_base_params,
        unet_param_names,
    )
    from cdtool.delta.file import Delta, LayerDelta, write_cdtool
    from cdtool.delta.importers import write_official
    from cdtool.models.clip_vocab import CLIP_VOCAB_SIZE

    kv = [
        n[: -len(".weight")]
        for n in unet_param_names(str(folder))
        if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))
    ]
    tables = [TOKEN_EMBEDDING, TOKEN_EMBEDDING_2] if xl else [TOKEN_EMBEDDING]
    base = load_base_params(str(folder), [f"{n}.weight" for n in kv] + tables)
    paths = []
    for i, (token, noun) in enumerate(CONCEPTS):
        g = torch.Generator().manual_seed(i)
        d = Delta(
            base_model=str(folder), concepts=[{"token": token, "class_noun": noun, "init_token": "ktn", "prompts": []}]
        )
        for n in kv:
            d.layers[n] = LayerDelta(full=2e-3 * torch.randn(base[f"{n}.weight"].shape, generator=g))
        for table, rows in zip(tables, (d.tokens, d.tokens_2), strict=False):
            init = base[table][42170 + i : 42171 + i].clone()
            rows[token] = init + 0.01 * torch.randn(init.shape, generator=g)
        d.base_kind = SDXL if xl else ""
        d.base_fingerprint = fingerprint(base, fingerprint_names(d), CLIP_VOCAB_SIZE)
        write_cdtool(d, out / f"{noun}.safetensors")
        if not xl:
            write_official(d, out / f"{noun}.bin", base)
        paths.append(out / f"{noun}.safetensors")
    return paths


def official_worker(folder: str, bins: list[str], captions_file: str, out: str) -> None:
    """The official algorithm's compute pattern, on the CPU in float32."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    tok, enc = pipe.tokenizer, pipe.text_encoder
    layers = [n for n, _ in pipe.unet.named_parameters() if "attn2.to_k" in n or "attn2.to_v" in n]

    def embed(prompts):
        rows = []
        with torch.no_grad():
            for text in prompts:
                ids = tok(text, truncation=True, max_length=77, padding="do_not_pad").input_ids
                skip = 4 if "photo of a" in text[:15] else 1
                rows.append(enc(torch.tensor(ids).reshape(1, -1))[0][:, skip:].reshape(-1, 768))
        return torch.cat(rows).float()

    states = [torch.load(b, weights_only=True) for b in bins]
    for st in states:
        for t in st["modifier_token"]:
            tok.add_tokens(t)
    enc.resize_token_embeddings(len(tok))
    for st in states:
        for t, e in st["modifier_token"].items():
            enc.get_input_embeddings().weight.data[tok.convert_tokens_to_ids(t)] = e
    captions = [x.strip() for x in open(captions_file)][:200]
    uc = embed(captions)
    targets, values = [], {n: [] for n in layers}
    for st, (token, noun) in zip(states, CONCEPTS, strict=True):
        s = f"{token} {noun}"
        c = embed([s, f"photo of a {s}"])
        targets.append(c)
        for n in layers:
            values[n].append((st["unet"][n].float() @ c.T).T)
    c = torch.cat(targets)
    result = {}
    for n in layers:
        w = pipe.unet.state_dict()[n].float()
        gram = uc.T @ uc
        lu, piv = torch.linalg.lu_factor(gram)
        d = torch.cat([torch.linalg.lu_solve(lu, piv, c[i].reshape(-1, 1)) for i in range(c.shape[0])], 1).T
        v = torch.cat(values[n])
        delta = (v.T - w @ c.T) @ torch.linalg.inv(d @ c.T)
        result[n] = w + delta @ d
    torch.save({"unet": result}, out)


def compare(work: Path, folder: Path) -> dict[str, dict[str, float]]:
    """Constraint residual, drift (the objective) and |ΔW| of cdtool's and the official result."""
    from cdtool.delta.base import load_base_params
    from cdtool.delta.file import read_cdtool
    from cdtool.merge.text_features import feature_rows, gram
    from cdtool.models.loading import load_text_side

    text = load_text_side(str(folder))
    tok, enc = text.tokenizer, text.encoder
    caps = [line.strip() for line in (work / "captions200.txt").read_text().splitlines()]
    a_reg, _ = gram(feature_rows(tok, enc, caps))
    inputs = [read_cdtool(work / f"{noun}.safetensors") for _, noun in CONCEPTS]
    for d in inputs:
        for t, e in d.tokens.items():
            tok.add_tokens([t])
            enc.resize_token_embeddings(len(tok), mean_resizing=False)
            enc.get_input_embeddings().weight.data[-1] = e[0]
    rows = [feature_rows(tok, enc, [f"{t} {n}", f"photo of a {t} {n}"], [1, 4]) for t, n in CONCEPTS]
    cs = [torch.cat(r).double() for r in rows]
    ours = read_cdtool(work / "m200.safetensors")
    official = torch.load(work / "official.bin", weights_only=True)["unet"]
    base = load_base_params(str(folder), [f"{n}.weight" for n in ours.layers])
    out: dict[str, dict[str, float]] = {}
    for label in ("cdtool", "official"):
        res, drift, norm = [], [], []
        for n, layer in ours.layers.items():
            w0 = base[f"{n}.weight"].double()
            w = w0 + layer.full.double() if label == "cdtool" else official[n[5:] + ".weight"].double()
            v = torch.cat([((w0 + d.layers[n].full.double()) @ c.T).T for d, c in zip(inputs, cs, strict=True)])
            c = torch.cat(cs)
            res.append(float(torch.linalg.norm(w @ c.T - v.T) / torch.linalg.norm(v)))
            dw = w - w0
            drift.append(
                float((torch.einsum("oi,ij,oj->", dw, a_reg, dw) / torch.einsum("oi,ij,oj->", w0, a_reg, w0)).sqrt())
            )
            norm.append(float(torch.linalg.norm(dw)))
        out[label] = {
            "residual": sum(res) / len(res),
            "drift": sum(drift) / len(drift),
            "dw_norm": sum(norm) / len(norm),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cdtool-bench")
    ap.add_argument("--model", choices=("sd15", "sdxl", "tiny-xl"), default="sd15", help="the model's shape")
    ap.add_argument("--official-worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.official_worker:
        folder, bins, caps, out = args.official_worker
        official_worker(folder, bins.split(","), caps, out)
        return
    if args.model != "sd15":
        sdxl_main(args.workdir, args.model)
        return
    from benchmarks.sd15 import build_sd15
    from cdtool.merge.deltas import default_reg_captions

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    folder = build_sd15(work / "sd15")
    a, b = make_deltas(folder, work)
    official_caps = [c for c in default_reg_captions() if "photo of a" not in c[:15]][:200]
    (work / "captions200.txt").write_text("\n".join(official_caps) + "\n")
    cache = tempfile.mkdtemp(prefix="cdtool-bench-cache-")
    cd = [sys.executable, "-m", "cdtool", "merge", f"{a}+{b}", "--model", str(folder), "--force", "-q"]
    env = {"CDTOOL_CACHE": cache}
    lsq = [*cd, "--method", "least-squares"]
    runs = {
        "cdtool merge, cold cache (1200 captions)": measure([*cd, "-o", str(work / "m.safetensors")], env),
        "cdtool merge, warm cache (1200 captions)": measure([*cd, "-o", str(work / "m.safetensors")], env),
        "cdtool merge --method least-squares, cold cache (1200 captions)": measure(
            [*lsq, "-o", str(work / "l.safetensors")], env
        ),
        "cdtool merge --method least-squares, warm cache (1200 captions)": measure(
            [*lsq, "-o", str(work / "l.safetensors")], env
        ),
        "cdtool merge, 200 official captions, cold": measure(
            [*cd, "-o", str(work / "m200.safetensors"), "--reg-captions", str(work / "captions200.txt")], env
        ),
        "official approach (200 captions)": measure(
            [
                sys.executable,
                __file__,
                "--official-worker",
                str(folder),
                f"{work / 'cat.bin'},{work / 'dog.bin'}",
                str(work / "captions200.txt"),
                str(work / "official.bin"),
            ]
        ),
    }
    quality = compare(work, folder)
    ref = runs["official approach (200 captions)"]
    print("| run | wall s | peak RSS MB | speed-up vs official |")
    print("| --- | ---: | ---: | ---: |")
    for name, r in runs.items():
        print(f"| {name} | {r.seconds:.1f} | {r.peak_rss_mb:.0f} | {ref.seconds / r.seconds:.2f}x |")
    print("\nSame 200 captions, mean over layers (the objective is the drift; both must meet the constraints):")
    print("| merge | constraint residual | drift on reg features | norm of ΔW |")
    print("| --- | ---: | ---: | ---: |")
    for name, q in quality.items():
        print(f"| {name} | {q['residual']:.2e} | {q['drift']:.6f} | {q['dw_norm']:.3f} |")
    print(json.dumps({k: vars(v) | {"stderr": None} for k, v in runs.items()}, default=str))


def sdxl_main(work: Path, model: str) -> None:
    """cdtool's closed form and least-squares merge of two concepts on an SDXL-shaped model (all 140
    key/value layers of the real UNet; tiny-xl's 16), cold and warm cache, 1200 captions."""
    from benchmarks.sdxl import build_sdxl, build_tiny_xl

    work = work / model
    work.mkdir(parents=True, exist_ok=True)
    folder = build_sdxl(work / "model") if model == "sdxl" else build_tiny_xl(work / "model")
    a, b = make_deltas(folder, work, xl=True)
    cache = tempfile.mkdtemp(prefix="cdtool-bench-cache-")
    cd = [sys.executable, "-m", "cdtool", "merge", f"{a}+{b}", "--model", str(folder), "--force", "-q"]
    env = {"CDTOOL_CACHE": cache}
    runs = {}
    for method in ("closed-form", "least-squares"):
        for state in ("cold", "warm"):
            out = work / f"{method}.safetensors"
            runs[f"cdtool merge --method {method}, {state} cache (1200 captions)"] = measure(
                [*cd, "--method", method, "-o", str(out)], env
            )
    print(f"{model}: two concepts, {len(read_layers(a))} key/value layers")
    print("| run | wall s | peak RSS MB |")
    print("| --- | ---: | ---: |")
    for name, r in runs.items():
        print(f"| {name} | {r.seconds:.1f} | {r.peak_rss_mb:.0f} |")
    print(json.dumps({k: vars(v) | {"stderr": None} for k, v in runs.items()}, default=str))


def read_layers(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return [k for k in f.keys() if k.endswith(".delta")]


if __name__ == "__main__":
    main()
