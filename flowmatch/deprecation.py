"""Old import paths kept working after a module moved (deprecated, not broken).

A module that moved leaves a two-line file at its old path::

    from flowmatch.deprecation import alias_module
    alias_module(__name__, "flowmatch.flow.paths")

``import flowmatch.paths`` then returns the very module object ``flowmatch.flow.paths`` (so
``monkeypatch`` and ``isinstance`` see one module, not a copy) and warns once with a
``DeprecationWarning`` naming the new path.
"""

from __future__ import annotations

import importlib
import sys
import warnings

__all__ = ["MOVED", "alias_module", "moved_names"]

#: old module name -> new module name, for every module that moved (documentation and tests)
MOVED: dict[str, str] = {
    "flowmatch.paths": "flowmatch.flow.paths",
    "flowmatch.time_samplers": "flowmatch.flow.time_samplers",
    "flowmatch.coupling": "flowmatch.flow.coupling",
    "flowmatch.solvers": "flowmatch.flow.solvers",
    "flowmatch.sde": "flowmatch.flow.sde",
    "flowmatch.guidance": "flowmatch.flow.guidance",
    "flowmatch.sampling": "flowmatch.flow.sampling",
    "flowmatch.training.checkpoint": "flowmatch.checkpoint",
}


def moved_names(module: str, moved: dict[str, str]):
    """A module ``__getattr__`` (PEP 562) for names that moved out of ``module``: ``moved`` maps each
    old name to its new module; reading it there imports that module (lazily, so no import cycle),
    warns with a ``DeprecationWarning`` naming the new place, and returns the very same object.

    Use: ``__getattr__ = moved_names(__name__, {"save_scatter": "flowmatch.plots"})``.
    """

    def __getattr__(name: str):
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warnings.warn(f"{module}.{name} moved to {moved[name]}.{name}; import it from there (the old "
                      "name will be removed)", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(moved[name]), name)

    return __getattr__


def alias_module(old: str, new: str) -> None:
    """Make the module named ``old`` an alias of ``new`` (imported now) and warn the importer."""
    warnings.warn(f"{old} moved to {new}; import it from there (the old path will be removed)",
                  DeprecationWarning, stacklevel=3)
    sys.modules[old] = importlib.import_module(new)
