"""The commands stay thin (docs/design.md, "Layers"): a command parses its options, claims its
output, calls the library and prints. Checked on the source: no command function's body is longer
than 60 lines, and no command loops over a delta's layers or a model's modules and parameters."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdtool.cli import COMMANDS as CLI_COMMANDS

COMMANDS = Path(__file__).resolve().parent.parent / "cdtool" / "commands"
MAX_BODY = 60
# what a loop over layers iterates: a delta's (or a merge result's) layers, a model's modules or
# parameters, the merge's per-layer inputs
LAYER_ITERABLES = {"layers", "named_modules", "modules", "named_parameters", "parameters", "state_dict", "layer_inputs"}


def command_functions() -> Iterator[tuple[str, ast.FunctionDef]]:
    """(module file name, function) of every function a command module registers as a command
    (`register` passes it through `cdtool_command`)."""
    for path in sorted(COMMANDS.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
        if "register" not in functions:
            continue
        for node in ast.walk(functions["register"]):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "cdtool_command":
                (arg,) = node.args
                assert isinstance(arg, ast.Name)
                yield path.name, functions[arg.id]


def body_lines(function: ast.FunctionDef) -> int:
    """The lines of a function's body after its docstring (the docstring is the command's --help)."""
    body = function.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    assert function.end_lineno is not None
    return function.end_lineno - body[0].lineno + 1


def layer_loops(source: str) -> list[int]:
    """The lines of loops and comprehensions in `source` whose iterable names one of LAYER_ITERABLES."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.For | ast.AsyncFor | ast.comprehension):
            names = {n.attr for n in ast.walk(node.iter) if isinstance(n, ast.Attribute)}
            names |= {n.id for n in ast.walk(node.iter) if isinstance(n, ast.Name)}
            if names & LAYER_ITERABLES:
                found.append(node.iter.lineno)
    return found


def test_every_command_is_found():
    assert sorted(module for module, _ in command_functions()) == sorted(f"{m}.py" for m, _ in CLI_COMMANDS.values())


def test_no_command_body_is_longer_than_60_lines():
    long = {f"{module}:{f.name}": body_lines(f) for module, f in command_functions() if body_lines(f) > MAX_BODY}
    assert long == {}, f"command bodies over {MAX_BODY} lines: move the work into the library"


def test_no_command_loops_over_layers():
    loops = [
        f"{path.name}:{line}"
        for path in sorted(COMMANDS.glob("*.py"))
        for line in layer_loops(path.read_text(encoding="utf-8"))
    ]
    assert loops == [], "loops over layers in cdtool/commands: they belong in the library"


@pytest.mark.parametrize(
    ("source", "loops"),
    [
        ("for name, layer in delta.layers.items():\n    pass", [1]),
        ("rows = {n: l.rank for n, l in sorted(delta.layers.items())}", [1]),
        ("for name, module in pipe.unet.named_modules():\n    pass", [1]),
        ("for name, inputs in layer_inputs(deltas):\n    pass", [1]),
        ("x = 1\ntotal = sum(p.numel() for p in model.parameters())", [2]),
        ("for path in paths:\n    pass", []),
        ("for name, row in doc['rows'].items():\n    pass", []),
    ],
)
def test_the_layer_loop_check_sees_loops_over_layers(source, loops):
    assert layer_loops(source) == loops


def test_the_body_count_leaves_out_the_docstring():
    source = 'def f():\n    """Help\n\n    text."""\n    a = 1\n    return a\n'
    (function,) = ast.parse(source).body
    assert isinstance(function, ast.FunctionDef) and body_lines(function) == 2
