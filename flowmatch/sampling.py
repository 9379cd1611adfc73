"""Deprecated location: this module moved to :mod:`flowmatch.flow.sampling`."""

from flowmatch.deprecation import alias_module

alias_module(__name__, "flowmatch.flow.sampling")
