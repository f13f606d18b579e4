"""How the least-squares merge's base weight trades concept retention against plain prompts.

    python benchmarks/quality.py --v1 --out bench-v1
    python research/merge_weights.py bench-v1 [--weights 0.01,0.03,0.1,0.3,1] [--n 64]

On the v1 toy world (its model and oracle in tools/checkpoints/toy1), merges the folder's two
single-concept deltas (new1-star, new2-circle) with `merge --method
least-squares --base-weight W` for each W, and with the closed form and the sum for comparison,
samples the quality benchmark's prompt groups (each concept, plain prompts of its class, both
concepts in one prompt) and prints one line per concept alone and one table row per merge. The
captions are the folder's merge-captions.txt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> None:
    from benchmarks.quality import V1_MODEL, V1_ORACLE, Bench, Settings, standard_error
    from cdtool.toy.photos import V1_PERSONAL as PERSONAL

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="a `quality.py --v1` output folder")
    ap.add_argument("--weights", default="0.01,0.03,0.1,0.3,1")
    ap.add_argument("--n", type=int, default=64, help="samples per prompt group")
    ap.add_argument("--model", default=V1_MODEL)
    ap.add_argument("--oracle", default=V1_ORACLE)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    captions = args.folder / "merge-captions.txt"
    deltas = "+".join(str(args.folder / f"{name}.safetensors") for _, _, name in PERSONAL)
    bench = Bench(
        args.folder / "merge-weights",
        Settings(n=args.n, sample_steps=15, model=args.model, seed=args.seed, suite=False, oracle=args.oracle),
        True,
    )
    bench.out.mkdir(parents=True, exist_ok=True)
    groups = [f"concept {t}" for t, _, _ in PERSONAL] + [f"prior {n}" for _, n, _ in PERSONAL] + ["both"]
    runs = [("base", None), ("closed-form", ("--method", "closed-form")), ("sum", ("--method", "sum"))]
    runs += [(f"least-squares {w}", ("--method", "least-squares", "--base-weight", w)) for w in args.weights.split(",")]
    for token, noun, name in PERSONAL:  # each concept alone: what a merge should keep
        r = bench.evaluate(
            f"alone-{name}", [args.folder / f"{name}.safetensors"], [f"concept {token}", f"prior {noun}"]
        )
        print(
            f"{name} alone: concept {r[f'concept {token}']['concept_fidelity']:.2f}, plain prompts obeyed "
            f"{r[f'prior {noun}']['prompt_fidelity']:.2f}, prior drift {r[f'prior {noun}']['prior_drift']:.2f}",
            flush=True,
        )
    se = standard_error(0.5, args.n)
    print(f"n = {args.n} per cell (standard error at most {se:.3f})")
    print("| merge | `<new1>` split star | `<new2>` checker | plain stars / circles obeyed | prior drift | both |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, merge_args in runs:
        paths = []
        if merge_args is not None:
            path = bench.out / f"{name.replace(' ', '-')}.safetensors"
            bench.run("merge", deltas, "-o", path, "--reg-captions", captions, *merge_args, "--force")
            paths = [path]
        r = bench.evaluate(name.replace(" ", "-"), paths, groups)
        fid = [r[f"concept {t}"]["concept_fidelity"] for t, _, _ in PERSONAL]
        plain = " / ".join(f"{r[f'prior {n}']['prompt_fidelity']:.2f}" for _, n, _ in PERSONAL)
        drift = " / ".join(f"{r[f'prior {n}']['prior_drift']:.2f}" for _, n, _ in PERSONAL)
        print(
            f"| {name} | {fid[0]:.2f} | {fid[1]:.2f} | {plain} | {drift} | {r['both']['concept_fidelity']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
