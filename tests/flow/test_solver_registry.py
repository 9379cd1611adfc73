"""The solver registry (flowmatch.flow.solver_registry): one record per method, and everything derived
from it -- the old tables, validation, NFE budgets, --help text and the README table."""

from pathlib import Path

import pytest
import torch

from flowmatch.flow import sampling, solvers
from flowmatch.flow.paths import build_path
from flowmatch.flow.sampling import generate
from flowmatch.flow.solver_registry import (
    FIXED_STEP_NFE,
    METHODS,
    SDE_METHODS,
    SOLVERS,
    get_solver,
    methods_help,
    solver_table_markdown,
    steps_for_nfe,
)
from flowmatch.flow.solvers import SolverSpec, euler

README = Path(__file__).resolve().parents[2] / "README.md"
LINEAR = build_path("linear")


def test_old_tables_keep_their_values():
    # other modules and the benchmarks import these names; their values must not move
    assert list(solvers.FIXED_STEP_METHODS) == ["euler", "midpoint", "heun", "rk4", "ab2", "dpm2m"]
    assert solvers.FIXED_STEP_METHODS["rk4"] is solvers.rk4
    assert solvers.PATH_METHODS == frozenset({"dpm2m"})
    assert solvers.MIN_STEPS == dict.fromkeys(solvers.FIXED_STEP_METHODS, 1)
    assert solvers.ADAPTIVE_METHODS == ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
    assert solvers.SOLVER_NAMES == tuple(solvers.FIXED_STEP_METHODS) + solvers.ADAPTIVE_METHODS
    assert SDE_METHODS == ("euler_maruyama",)
    assert METHODS == solvers.SOLVER_NAMES + SDE_METHODS + ("meanflow",)
    assert FIXED_STEP_NFE == {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4, "ab2": 1, "dpm2m": 1,
                              "euler_maruyama": 1, "meanflow": 1}
    # and the sampling module re-exports the same objects
    assert sampling.METHODS is METHODS and sampling.FIXED_STEP_NFE is FIXED_STEP_NFE
    assert sampling.SDE_METHODS is SDE_METHODS and sampling.steps_for_nfe is steps_for_nfe


@pytest.mark.parametrize("name", [n for n, s in SOLVERS.items() if s.kind not in ("adaptive", "average")])
def test_nfe_per_step_is_what_a_solve_costs(name):
    # the record's NFE per step is measured, not trusted; 3 steps of any grid walker
    x0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    res = generate(lambda x, t: -x, x0, method=name, steps=3, path=LINEAR)
    assert res.nfe == 3 * SOLVERS[name].nfe_per_step == 3 * FIXED_STEP_NFE[name]


def test_records_are_consistent():
    for name, spec in SOLVERS.items():
        assert spec.name == name and spec.kind in solvers.KINDS and callable(spec.fn)
        assert (spec.min_steps is None) == (spec.kind == "adaptive")
    with pytest.raises(ValueError, match="kind must be one of fixed, adaptive, sde"):
        SolverSpec("leapfrog", euler, 2, 1, "symplectic")
    with pytest.raises(ValueError, match="exactly the adaptive methods"):
        SolverSpec("leapfrog", euler, 2, None, "fixed")


def test_get_solver_validates_with_every_name():
    assert get_solver("dpm2m").needs_path and get_solver("euler_maruyama").kind == "sde"
    with pytest.raises(ValueError, match=r"unknown solver 'rk45' \(valid: euler, midpoint, .*dopri5.*euler_maruyama, meanflow\)"):
        get_solver("rk45")


def test_steps_for_nfe():
    assert steps_for_nfe("rk4", 8) == 2 and steps_for_nfe("euler_maruyama", 5) == 5
    with pytest.raises(ValueError, match="at least 2 network evaluations"):
        steps_for_nfe("heun", 1)
    with pytest.raises(ValueError, match="not a multiple"):
        steps_for_nfe("rk4", 6)
    with pytest.raises(ValueError, match="adaptive"):
        steps_for_nfe("dopri5", 20)
    with pytest.raises(ValueError, match="unknown solver 'leapfrog'"):
        steps_for_nfe("leapfrog", 4)


def test_methods_help_lists_every_method_with_its_cost():
    text = methods_help()
    assert "\n" not in text
    for name, spec in SOLVERS.items():
        assert (f"{name} ({spec.nfe_per_step})" if spec.nfe_per_step else name) in text
    assert "midpoint (2)" in text and "rk4 (4)" in text


def test_solver_table_rows():
    table = solver_table_markdown()
    rows = table.splitlines()
    assert rows[0] == "| `--method` | order | NFE / step | note |"
    assert "| `euler`, `midpoint`, `heun`, `rk4` | 1, 2, 2, 4 | 1, 2, 2, 4 | |" in rows
    assert any(r.startswith("| `dopri5`, `dopri8`, `bosh3`, `fehlberg2`, `adaptive_heun` | adaptive | - |")
               for r in rows)
    assert any(r.startswith("| `euler_maruyama` | SDE | 1 |") for r in rows)
    assert all(f"`{name}`" in table for name in SOLVERS)


def test_readme_table_is_generated():
    # README.md shows exactly the registry's table; regenerate it with solver_table_markdown()
    assert solver_table_markdown() in README.read_text()
