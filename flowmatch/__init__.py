"""flowmatch: flow-matching generative models in PyTorch.

Time convention, stated once for the whole package: ``t = 0`` is noise ``x0 ~ N(0, I)`` and
``t = 1`` is data ``x1``. Every path, solver, model and time sampler follows it; conversions to other
conventions happen only at the package's boundaries.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
