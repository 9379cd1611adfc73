"""Deprecated location: this module moved to :mod:`flowmatch.flow.paths`."""

from flowmatch.deprecation import alias_module

alias_module(__name__, "flowmatch.flow.paths")
