"""Deprecated location: this module moved to :mod:`flowmatch.checkpoint`."""

from flowmatch.deprecation import alias_module

alias_module(__name__, "flowmatch.checkpoint")
