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

__all__ = ["MOVED", "alias_module"]

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


def alias_module(old: str, new: str) -> None:
    """Make the module named ``old`` an alias of ``new`` (imported now) and warn the importer."""
    warnings.warn(f"{old} moved to {new}; import it from there (the old path will be removed)",
                  DeprecationWarning, stacklevel=3)
    sys.modules[old] = importlib.import_module(new)
