"""Modules that moved keep their old import path (with a DeprecationWarning), as the same object."""

import importlib
import subprocess
import sys

import pytest

from flowmatch.deprecation import MOVED


@pytest.mark.parametrize("old,new", sorted(MOVED.items()))
def test_old_path_is_the_new_module_and_warns(old, new):
    code = (
        "import importlib, warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        f"    old = importlib.import_module({old!r})\n"
        f"new = importlib.import_module({new!r})\n"
        "assert old is new, (old, new)\n"
        f"assert any({new!r} in str(x.message) and x.category is DeprecationWarning for x in w), w\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_new_paths_export_what_the_old_ones_did():
    for new in MOVED.values():
        module = importlib.import_module(new)
        assert module.__all__ and all(hasattr(module, name) for name in module.__all__)


@pytest.mark.parametrize("module, name, new", [
    ("flowmatch.training.trainer", "model_from_checkpoint", "flowmatch.run"),
    ("flowmatch.training.trainer", "load_autoencoder_for", "flowmatch.components"),
    ("flowmatch.imageio", "save_scatter", "flowmatch.plots"),
    ("flowmatch.evaluation.likelihood", "evaluate_nll", "flowmatch.evaluation.nll"),
])
def test_names_that_moved_out_of_a_module_still_resolve_with_a_warning(module, name, new):
    old = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=f"{new}.{name}"):
        obj = getattr(old, name)
    assert obj is getattr(importlib.import_module(new), name)
    with pytest.raises(AttributeError, match="no_such_name"):
        old.no_such_name
