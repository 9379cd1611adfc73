"""The flow-matching math, independent of networks, data and training.

* :mod:`~flowmatch.flow.paths` -- probability paths ``x_t = alpha_t x1 + sigma_t x0`` and schedulers
* :mod:`~flowmatch.flow.time_samplers` -- training-time distributions and sampling time grids
* :mod:`~flowmatch.flow.coupling` -- minibatch optimal-transport pairing of noise and data
* :mod:`~flowmatch.flow.solvers` -- ODE solvers, one record (:class:`SolverSpec`) each
* :mod:`~flowmatch.flow.solver_registry` -- every sampling method (ODE and SDE) by name: validation,
  NFE budgets, ``--help`` and the README table derive from it
* :mod:`~flowmatch.flow.sde` -- the Euler-Maruyama sampler with the same marginals
* :mod:`~flowmatch.flow.guidance` -- classifier-free guidance as a model wrapper
* :mod:`~flowmatch.flow.sampling` -- seeded noise, sampling settings, ``generate``

Time convention: ``t = 0`` is noise, ``t = 1`` is data.
"""

__all__ = ["coupling", "guidance", "paths", "sampling", "sde", "solver_registry", "solvers", "time_samplers"]
