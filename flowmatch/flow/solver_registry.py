"""Every sampling method in one table, and what derives from it.

``SOLVERS`` maps each name a sampling method may have (``sample.method``, ``--method``) to its
:class:`~flowmatch.flow.solvers.SolverSpec`: the ODE methods' and the average-velocity sampler's (``meanflow``, for two-time models)
records live next to their code in :mod:`flowmatch.flow.solvers`, the SDE sampler's in :mod:`flowmatch.flow.sde` (which imports the
solvers module, so the two tables are joined here, above both, rather than in either). Validation
(:func:`get_solver`), NFE budgets (:func:`steps_for_nfe`), the CLI's help text
(:func:`methods_help`) and the README's solver table (:func:`solver_table_markdown`) are all read
off the records, so adding a method touches its own module and its tests only.
"""

from __future__ import annotations

from flowmatch.flow.sde import SDE_SOLVERS
from flowmatch.flow.solvers import AVERAGE_SOLVERS, ODE_SOLVERS, SolverSpec, find_solver

__all__ = [
    "FIXED_STEP_NFE",
    "METHODS",
    "SDE_METHODS",
    "SOLVERS",
    "get_solver",
    "methods_help",
    "solver_table_markdown",
    "steps_for_nfe",
]

#: name -> record, the ODE methods first, then the SDE samplers, then the average-velocity ones.
SOLVERS: dict[str, SolverSpec] = {**ODE_SOLVERS, **SDE_SOLVERS, **AVERAGE_SOLVERS}

# The old tables, derived (other modules and benchmarks import them).
#: The stochastic samplers; they walk a time grid like the fixed-step ODE methods.
SDE_METHODS: tuple[str, ...] = tuple(n for n, s in SOLVERS.items() if s.kind == "sde")
#: Every name a sampling method may have: the ODE solvers, the SDE samplers, the average-velocity ones.
METHODS: tuple[str, ...] = tuple(SOLVERS)
#: Network evaluations per step of each grid-walking method (the solvers count exactly).
FIXED_STEP_NFE: dict[str, int] = {n: s.nfe_per_step for n, s in SOLVERS.items() if s.nfe_per_step is not None}


def get_solver(name: str) -> SolverSpec:
    """The record of the sampling method ``name``; ValueError listing every valid name otherwise."""
    return find_solver(name, SOLVERS)


def steps_for_nfe(method: str, nfe: int) -> int:
    """The number of steps of ``method`` that costs exactly ``nfe`` network evaluations.

    Raises ValueError for an adaptive method (it picks its own steps), an NFE below the method's
    minimum (e.g. 1 for ``midpoint``, which needs 2 per step) or not a multiple of its cost per step.
    """
    if method not in SOLVERS:
        raise ValueError(f"method: unknown solver {method!r} (valid: {', '.join(METHODS)})")
    spec = SOLVERS[method]
    if spec.nfe_per_step is None:
        raise ValueError(f"nfe: {method!r} is adaptive and chooses its own steps (use atol / rtol)")
    per_step = spec.nfe_per_step
    least = per_step * spec.min_steps
    if nfe < least:
        raise ValueError(f"nfe: {method!r} needs at least {least} network evaluations ({per_step} per "
                         f"step), got {nfe}")
    if nfe % per_step:
        raise ValueError(f"nfe: {method!r} costs {per_step} evaluations per step; {nfe} is not a multiple")
    return nfe // per_step


def methods_help() -> str:
    """One line listing every method with its NFE per step, for ``--method``'s help text."""
    def names(kind: str, with_nfe: bool) -> str:
        specs = [s for s in SOLVERS.values() if s.kind == kind]
        return ", ".join(f"{s.name} ({s.nfe_per_step})" if with_nfe else s.name for s in specs)

    return (f"ODE, fixed step (NFE per step): {names('fixed', True)}; "
            f"ODE, adaptive (torchdiffeq, atol / rtol): {names('adaptive', False)}; "
            f"SDE (NFE per step): {names('sde', True)}; "
            f"average-velocity jumps, two-time models only (NFE per step): {names('average', True)}")


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _row(group: list[SolverSpec]) -> str:
    kind = group[0].kind
    names = ", ".join(f"`{s.name}`" for s in group)
    if kind == "adaptive":
        order, nfe = "adaptive", "-"
    elif kind == "average":  # exact for the exact average velocity: the note says what it is
        order, nfe = "n/a", ", ".join(str(s.nfe_per_step) for s in group)
    else:
        order = "SDE" if kind == "sde" else ", ".join(_number(s.order) for s in group)
        nfe = ", ".join(str(s.nfe_per_step) for s in group)
    note = f" {group[0].summary} " if group[0].summary else " "
    return f"| {names} | {order} | {nfe} |{note}|"


def solver_table_markdown() -> str:
    """The README's table of sampling methods (``--method`` | order | NFE / step | note): one row per
    run of consecutive records of one kind with the same note."""
    groups: list[list[SolverSpec]] = []
    for spec in SOLVERS.values():
        if groups and (groups[-1][0].kind, groups[-1][0].summary) == (spec.kind, spec.summary):
            groups[-1].append(spec)
        else:
            groups.append([spec])
    lines = ["| `--method` | order | NFE / step | note |", "|---|---|---|---|"]
    return "\n".join(lines + [_row(g) for g in groups]) + "\n"
