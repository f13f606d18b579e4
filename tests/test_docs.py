"""The project's own documents: links that resolve, a design doc that lists every key of the delta
file, and text that speaks of the product, not of how it was developed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from cdtool.delta.file import Delta, LayerDelta, delta_metadata, delta_tensors

ROOT = Path(__file__).resolve().parent.parent
DOCS = [
    ROOT / "README.md",
    *sorted(ROOT.glob("docs/*.md")),
    *sorted(ROOT.glob("benchmarks/*.md")),
    *sorted(ROOT.glob("tools/*.md")),
    *sorted(ROOT.glob("research/*.md")),
]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# Development narration: numbered work periods and tickets, borrowed machines and their limits.
NARRATION = re.compile(
    r"\bsessions? \d+|\bissues? #?\d+|\blent\b|\bborrowed\b|\bdevice time\b|\btime budget\b|shared/DESIGN",
    re.IGNORECASE,
)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings; a repeated one gets -1, -2, ... as on GitHub."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#+ (.+)$", text, flags=re.MULTILINE):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_anchors_follow_githubs_rules(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# SDXL and SD 2.x\n## `--force` replaces only what it wrote\n### Where a GPU step's time goes\n"
        "## Which merge\n```sh\n# not a heading\n```\n## Which merge\n"
    )
    assert anchors(page) == {
        "sdxl-and-sd-2x",
        "--force-replaces-only-what-it-wrote",
        "where-a-gpu-steps-time-goes",
        "which-merge",
        "which-merge-1",
    }


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(doc):
    broken = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.is_relative_to(ROOT) or not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(target)
    assert broken == [], f"{doc.name}: links that do not resolve in the repository"


def test_design_doc_lists_every_key_of_the_delta_file():
    delta = Delta(
        layers={
            "unet.blk.attn2.to_k": LayerDelta(full=torch.zeros(2, 2), bias=torch.zeros(2)),
            "unet.blk.attn2.to_v": LayerDelta(up=torch.zeros(2, 1), down=torch.zeros(1, 2)),
            "text_encoder.blk.q_proj": LayerDelta(up=torch.zeros(2, 1), down=torch.zeros(1, 2)),
            "text_encoder.blk.k_proj": LayerDelta(full=torch.zeros(2, 2)),
        },
        tokens={"<new1>": torch.zeros(1, 2)},
    )
    generic = {
        re.sub(r"^(unet|text_encoder)\.blk\.[\w.]+?\.(\w+)$", r"\1.<path>.\2", k).replace(
            "token.<new1>", "token.<token>"
        )
        for k in delta_tensors(delta)
    }
    assert generic == {
        "unet.<path>.delta",
        "unet.<path>.bias",
        "unet.<path>.up",
        "unet.<path>.down",
        "text_encoder.<path>.up",
        "text_encoder.<path>.down",
        "text_encoder.<path>.delta",
        "token.<token>",
    }
    personal = Delta(  # an InstantBooth concept: its visual tokens, its encoder named
        tokens={"<new1>": torch.zeros(1, 2)}, visual={"<new1>": torch.zeros(3, 2)}, encoder={"sha256": "0" * 64}
    )
    assert {k.replace("<new1>", "<token>") for k in delta_tensors(personal)} == {"token.<token>", "visual.<token>"}
    design = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    missing = [k for k in [*sorted(generic), "visual.<token>"] if f"`{k}`" not in design]
    missing += [k for k in delta_metadata(delta) | delta_metadata(personal) if f"| `{k}` |" not in design]
    assert missing == []


def test_design_doc_layers_match_the_package_tree():
    """docs/design.md's Layers section names every sub-package of the library and each of its
    modules; at most 15 modules sit directly in cdtool/, and the sub-packages' __init__.py files hold
    no code (so that importing one imports nothing else)."""
    import ast

    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    start = text.index("## Layers")
    layers = text[start : text.index("\n## ", start)]
    package = ROOT / "cdtool"
    top = sorted(p.name for p in package.glob("*.py"))
    assert len(top) <= 15, top
    unnamed = [m for m in top if m not in ("__init__.py", "__main__.py") and not re.search(rf"`(cdtool/)?{m}`", layers)]
    subpackages = sorted(p for p in package.iterdir() if (p / "__init__.py").is_file())
    for sub in subpackages:
        body = ast.parse((sub / "__init__.py").read_text(encoding="utf-8")).body
        assert all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body), sub
        if sub.name in ("commands", "toy"):  # named as folders: one module per command, the toy world
            assert f"`cdtool/{sub.name}/" in layers, sub.name
            continue
        head = f"- `cdtool/{sub.name}/`:"
        assert head in layers, f"{sub.name}/ is not in the Layers section"
        block = layers[layers.index(head) :].split("\n  - ", 1)[0]
        unnamed += [
            f"{sub.name}/{m.name}"
            for m in sorted(sub.glob("*.py"))
            if m.name != "__init__.py" and f"`{m.name}`" not in block
        ]
    assert unnamed == [], "modules the Layers section of docs/design.md does not name"


def product_files() -> list[Path]:
    files = [*DOCS, ROOT / "Makefile", ROOT / "pyproject.toml"]
    for folder in ("cdtool", "tests", "benchmarks", "scripts", "tools", "research", ".ci"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".sh", ".md", "") and p.is_file()]
    return [
        p for p in files if p.exists() and "data" not in p.relative_to(ROOT).parts and p != Path(__file__).resolve()
    ]


def test_product_text_does_not_narrate_its_development():
    found = []
    for path in product_files():
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if NARRATION.search(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert found == []
