"""Deprecated location: this module moved to :mod:`flowmatch.flow.solvers`."""

from flowmatch.deprecation import alias_module

alias_module(__name__, "flowmatch.flow.solvers")
