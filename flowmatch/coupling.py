"""Deprecated location: this module moved to :mod:`flowmatch.flow.coupling`."""

from flowmatch.deprecation import alias_module

alias_module(__name__, "flowmatch.flow.coupling")
