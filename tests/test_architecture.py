"""The package's layers (docs/architecture.md): every import points down, nothing imports a private
name of another module, and evaluation never imports the training loop.

Imports inside functions count too: a lazy import is still a dependency.
"""

import ast
from pathlib import Path

import pytest

from flowmatch.deprecation import MOVED

PACKAGE = Path(__file__).resolve().parents[1] / "flowmatch"

# lower number = lower layer; a module may import its own top-level unit or any lower layer
LAYERS = {
    "flowmatch.config": 0, "flowmatch.atomic": 0, "flowmatch.distributed": 0, "flowmatch.deprecation": 0,
    "flowmatch.progress": 0,
    "flowmatch.checkpoint": 1, "flowmatch.registry": 1, "flowmatch.rundir": 1,
    "flowmatch.imageio": 2, "flowmatch.autoencoder": 2, "flowmatch.flow": 2, "flowmatch.models": 2,
    "flowmatch.export": 2,  # writes exported folders (checkpoint.py reads them)
    "flowmatch.plots": 3, "flowmatch.data": 3,
    "flowmatch.components": 4,
    "flowmatch.run": 5,
    "flowmatch.training": 6,
    "flowmatch.evaluation": 7,
    "flowmatch.cli": 8, "flowmatch.__main__": 9,
}


def _module_name(file: Path) -> str:
    parts = list(file.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _unit(module: str) -> str:
    """The layer unit of a module: the longest key of LAYERS that is a prefix of it."""
    best = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len, default=None)
    if best is None:
        raise AssertionError(f"{module}: not placed in a layer; add it to LAYERS and docs/architecture.md")
    return best


def _imports(file: Path):
    """(imported module, imported names) for every flowmatch import in ``file``, except those in a
    module-level ``__getattr__``: that is where a module forwards its deprecated names to their new
    home (PEP 562), the one import allowed to point anywhere."""
    tree = ast.parse(file.read_text())
    forwarding = {id(n) for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "__getattr__"
                  for n in ast.walk(f)}
    for node in ast.walk(tree):
        if id(node) in forwarding:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "flowmatch":
            if node.module == "flowmatch":  # from flowmatch import distributed
                for alias in node.names:
                    yield f"flowmatch.{alias.name}", []
            else:
                yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "flowmatch":
                    yield alias.name, []


def _sources():
    # the deprecated aliases at old paths only forward to their new modules; the package's
    # __init__ holds the version only
    return [f for f in sorted(PACKAGE.rglob("*.py")) if _module_name(f) not in {*MOVED, "flowmatch"}]


@pytest.mark.parametrize("file", _sources(), ids=lambda f: str(f.relative_to(PACKAGE)))
def test_imports_point_down_and_name_no_private_member(file):
    me = _module_name(file)
    mine = _unit(me)
    for target, names in _imports(file):
        if target == "flowmatch":
            continue
        theirs = _unit(target)
        assert theirs == mine or LAYERS[theirs] < LAYERS[mine], \
            f"{me} imports {target}: layer {LAYERS[theirs]} is not below {LAYERS[mine]} ({mine})"
        assert target not in MOVED, f"{me} imports the deprecated path {target} (use {MOVED[target]})"
        private = [n for n in names if n.startswith("_")]
        assert target == me or not private, f"{me} imports private names {private} from {target}"


def test_evaluation_does_not_import_the_training_loop():
    for file in (PACKAGE / "evaluation").rglob("*.py"):
        for target, _ in _imports(file):
            assert not target.startswith("flowmatch.training.trainer"), f"{file.name} imports {target}"
            assert target != "flowmatch.training", f"{file.name} imports the training package"
