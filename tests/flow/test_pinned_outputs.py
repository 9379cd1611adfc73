"""Every solver's output pinned bit for bit (sha256 of the states, times and NFE).

The hashes were computed with the implementation before the solver registry / explicit-grid
redesign; a refactor of the solvers, the SDE sampler or ``generate`` must leave them unchanged.
``dpm2m`` is pinned at the values of its order fix (its outputs changed on purpose then).

The velocities use only + - * / (no transcendental functions, no matmul), so the bytes do not
depend on a vector-math library's choices; the calls use the long-standing keyword styles
(``solve_ode(..., steps=)``, ``generate(model, x0, method=, steps=, grid=)``), which must keep
working.
"""

import hashlib

import pytest
import torch

from flowmatch.flow.paths import build_path, gaussian_marginal_velocity
from flowmatch.flow.sampling import (
    SampleSettings,
    generate,
    generate_with_settings,
    seeded_noise,
)
from flowmatch.flow.sde import solve_sde
from flowmatch.flow.solvers import solve_ode
from flowmatch.flow.time_samplers import time_grid

LINEAR = build_path("linear")
FIXED = ("euler", "midpoint", "heun", "rk4", "ab2", "dpm2m")
ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
DTYPES = {"f64": torch.float64, "f32": torch.float32}


def _gauss(x, t):
    return gaussian_marginal_velocity(LINEAR, 0.75, 0.5)(x, t)


def _forced(x, t):
    # non-autonomous and nonlinear: a stage at the wrong time or state changes the bytes
    tt = t[:, None]
    return -1.3 * x + 2.0 * tt + 0.5 * x * tt - 0.1 * x * x


class _Model(torch.nn.Module):
    """A velocity module ``forward(x, t, y)`` with a class term, elementwise only."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.7, -0.4, 1.1]))
        self.emb = torch.nn.Parameter(torch.tensor([[0.1, 0.2, -0.3], [-0.2, 0.05, 0.4]]))

    def forward(self, x, t, y=None):
        v = self.w.to(x.dtype) * x * (1 - t[:, None]) + _forced(x, t)
        return v if y is None else v + self.emb.to(x.dtype)[y]


def _x(dtype, n=4, d=3, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _digest(result) -> str:
    h = hashlib.sha256()
    states = result.trajectory if result.trajectory is not None else [result.x]
    for s in [*states, result.times]:
        h.update(s.detach().contiguous().numpy().tobytes())
    h.update(str(result.nfe).encode())
    return h.hexdigest()[:16]


def _run(thunk) -> str:
    torch.manual_seed(0)  # generate's SDE draws its default noise from the global generator
    return _digest(thunk())


def _cases():
    """{name: thunk -> ODEResult}."""
    cases = {}
    for dn, dt in DTYPES.items():
        for m in FIXED:
            p = {"path": LINEAR}
            cases[f"{m}-steps-{dn}"] = lambda m=m, dt=dt, p=p: solve_ode(
                _gauss, _x(dt), method=m, steps=7, return_trajectory=True, **p)
            cases[f"{m}-shifted-{dn}"] = lambda m=m, dt=dt, p=p: solve_ode(
                _forced, _x(dt), method=m, grid=time_grid(9, "shifted", 3.0, dtype=dt), **p)
            cases[f"{m}-edm-{dn}"] = lambda m=m, dt=dt, p=p: solve_ode(
                _gauss, _x(dt), method=m, grid=time_grid(6, "edm", dtype=dt), **p)
            if m != "dpm2m":  # forwards only
                cases[f"{m}-back-{dn}"] = lambda m=m, dt=dt: solve_ode(
                    _forced, _x(dt), method=m, steps=5, t0=1.0, t1=0.0, return_trajectory=True)
                cases[f"{m}-backgrid-{dn}"] = lambda m=m, dt=dt: solve_ode(
                    _forced, _x(dt), method=m, grid=torch.tensor([1.0, 0.7, 0.2, 0.0], dtype=dt))
        for m in ADAPTIVE:
            cases[f"{m}-{dn}"] = lambda m=m, dt=dt: solve_ode(_forced, _x(dt), method=m, atol=1e-6, rtol=1e-6)
            cases[f"{m}-back-{dn}"] = lambda m=m, dt=dt: solve_ode(
                _forced, _x(dt), method=m, t0=1.0, t1=0.0, atol=1e-5, rtol=1e-4)
            cases[f"{m}-grid-{dn}"] = lambda m=m, dt=dt: solve_ode(
                _gauss, _x(dt), method=m, grid=torch.tensor([0.0, 0.3, 1.0]), return_trajectory=True)
        for diff, fin in (("sigma", False), ("constant", True), ("linear", False)):
            cases[f"sde-{diff}-{fin}-{dn}"] = lambda diff=diff, fin=fin, dt=dt: solve_sde(
                _gauss, _x(dt), path=LINEAR, grid=time_grid(8, dtype=dt),
                noise=lambda n, dt=dt: _x(dt, seed=100 + n), diffusion=diff, norm=0.7, final_noise=fin,
                return_trajectory=True)
    for m in (*FIXED, *ADAPTIVE, "euler_maruyama"):
        for y in (None, torch.tensor([0, 1, 1, 0])):
            tag = "y" if y is not None else "uncond"
            cases[f"generate-{m}-{tag}"] = lambda m=m, y=y: generate(
                _Model(), _x(torch.float32), y=y, method=m, steps=6, grid="shifted", grid_shift=2.0,
                path=LINEAR, atol=1e-4, rtol=1e-4)
        settings = SampleSettings(m, 5, "edm", 1.0, "constant", 0.5)
        cases[f"settings-{m}"] = lambda s=settings: generate_with_settings(
            _Model(), seeded_noise(range(3, 7), (3,), seed=5), s, path=LINEAR, indices=range(3, 7), seed=5)
    return cases


PINNED = {  # name: sha256[:16]; all but dpm2m's from the pre-change implementation
    "ab2-back-f32": "b23a0285e6cf3d86",
    "ab2-back-f64": "c7e059053288a375",
    "ab2-backgrid-f32": "e198408b3eafb2ab",
    "ab2-backgrid-f64": "3eeb7b70ad4796cc",
    "ab2-edm-f32": "9a57beb12033eb6f",
    "ab2-edm-f64": "443c30403116b98e",
    "ab2-shifted-f32": "34913c827d90d470",
    "ab2-shifted-f64": "c45e96adaf629d38",
    "ab2-steps-f32": "4b7c4bb822cee97b",
    "ab2-steps-f64": "5ff9c057f3bcf2c0",
    "adaptive_heun-back-f32": "0dce7ce4c2ea3e5f",
    "adaptive_heun-back-f64": "18bd90c500dc52dc",
    "adaptive_heun-f32": "2697785e2ca52bc3",
    "adaptive_heun-f64": "ebf78e46a4bf4783",
    "adaptive_heun-grid-f32": "a30d6a47368ff7ae",
    "adaptive_heun-grid-f64": "89fd379c01eb0664",
    "bosh3-back-f32": "fda5d2721e49fa4e",
    "bosh3-back-f64": "13b9e346406d7554",
    "bosh3-f32": "66094b0a0f281a86",
    "bosh3-f64": "5ff3962982ae24d7",
    "bosh3-grid-f32": "d92d63a68adabb50",
    "bosh3-grid-f64": "21ddd2c2724bc3af",
    "dopri5-back-f32": "6f3371b001ecfaa7",
    "dopri5-back-f64": "8da78f88a9da1934",
    "dopri5-f32": "5a511f251e0730e1",
    "dopri5-f64": "4efba60f6c7e4ba5",
    "dopri5-grid-f32": "bc0b5b832008e962",
    "dopri5-grid-f64": "e2acc92c05d68c44",
    "dopri8-back-f32": "51f95bf9171b2785",
    "dopri8-back-f64": "8e8c8af66753a750",
    "dopri8-f32": "41a55adfda162c6f",
    "dopri8-f64": "fd768f5bd64f3324",
    "dopri8-grid-f32": "86badfa5053fdb67",
    "dopri8-grid-f64": "c82b4adf88c955c1",
    "dpm2m-edm-f32": "28d60d59c1f65d89",
    "dpm2m-edm-f64": "d9d5499d66721763",
    "dpm2m-shifted-f32": "c68cf3906d5c12e0",
    "dpm2m-shifted-f64": "809706ebd0bd2a34",
    "dpm2m-steps-f32": "e66191c03f78dda4",
    "dpm2m-steps-f64": "eb1b53d692babdd8",
    "euler-back-f32": "cdd4899d1c55e1de",
    "euler-back-f64": "3b0f5751842aec92",
    "euler-backgrid-f32": "62028161524fbc6c",
    "euler-backgrid-f64": "8f57b75fe1995407",
    "euler-edm-f32": "71a59477b5369db4",
    "euler-edm-f64": "901f3206decce9ce",
    "euler-shifted-f32": "a0c978e32545b413",
    "euler-shifted-f64": "b336b3c7886e0c5e",
    "euler-steps-f32": "a09221fbf9f9a469",
    "euler-steps-f64": "2118b6d5b74190bd",
    "fehlberg2-back-f32": "76cc9fb8b8060a30",
    "fehlberg2-back-f64": "c2d3843cd66c31e5",
    "fehlberg2-f32": "fe060b1c121a306e",
    "fehlberg2-f64": "872c83470c670aaf",
    "fehlberg2-grid-f32": "2d557520f4516c58",
    "fehlberg2-grid-f64": "4a1e76ce0509dac1",
    "generate-ab2-uncond": "2a65744539792d7a",
    "generate-ab2-y": "61b7fc708344a6f8",
    "generate-adaptive_heun-uncond": "073685166b72ab0c",
    "generate-adaptive_heun-y": "997e141209312c6c",
    "generate-bosh3-uncond": "2758de9ced70dea2",
    "generate-bosh3-y": "d312003cb2eb0462",
    "generate-dopri5-uncond": "5f626d59046e23aa",
    "generate-dopri5-y": "16928652351b7620",
    "generate-dopri8-uncond": "5b2f3614e5f26403",
    "generate-dopri8-y": "12f53014992c44a8",
    "generate-dpm2m-uncond": "3ab30625ec9ca7f9",
    "generate-dpm2m-y": "4bd24f9a2dfebc52",
    "generate-euler-uncond": "59971d05cfe869d2",
    "generate-euler-y": "eea91899780ff901",
    "generate-euler_maruyama-uncond": "80ceec9ba1f18a16",
    "generate-euler_maruyama-y": "31744a75f2aee699",
    "generate-fehlberg2-uncond": "dda0688406dfac26",
    "generate-fehlberg2-y": "26dac5fa70bff294",
    "generate-heun-uncond": "bb11addb25d91120",
    "generate-heun-y": "61014b7837b3e619",
    "generate-midpoint-uncond": "6c24053fde00eb3b",
    "generate-midpoint-y": "f27543d2213e45d5",
    "generate-rk4-uncond": "c0a596a0e929ddff",
    "generate-rk4-y": "9584e831d003a7f3",
    "heun-back-f32": "9ca40452b5049b56",
    "heun-back-f64": "7b42677f4a855f79",
    "heun-backgrid-f32": "57f614013b1b37a6",
    "heun-backgrid-f64": "7fd38900bf33503f",
    "heun-edm-f32": "1ad6274a18b5ba3a",
    "heun-edm-f64": "d6df1972e9ece209",
    "heun-shifted-f32": "d727003f14133334",
    "heun-shifted-f64": "9b00caf129c52268",
    "heun-steps-f32": "bb8e5d82d12230df",
    "heun-steps-f64": "e8b330e8b1b883a3",
    "midpoint-back-f32": "e2c03993ef092965",
    "midpoint-back-f64": "0c2a38a3476dcb3f",
    "midpoint-backgrid-f32": "807e1f705fc40ca6",
    "midpoint-backgrid-f64": "76d57fc5e4f079c8",
    "midpoint-edm-f32": "a4e0ece4a45b1366",
    "midpoint-edm-f64": "dcb72c10f42e3328",
    "midpoint-shifted-f32": "7b60093f70f095f4",
    "midpoint-shifted-f64": "d72fdf411e50aed1",
    "midpoint-steps-f32": "2bc6cd8da0925267",
    "midpoint-steps-f64": "ddd0b4b6e66dbb2f",
    "rk4-back-f32": "43414bc09321b10d",
    "rk4-back-f64": "d5560d476e2d6122",
    "rk4-backgrid-f32": "62c3cff563ff1eea",
    "rk4-backgrid-f64": "5414d5bd4b41206d",
    "rk4-edm-f32": "df76a37885f16f6a",
    "rk4-edm-f64": "e8b0c3342bbf96c1",
    "rk4-shifted-f32": "2f3161ab60fe6b05",
    "rk4-shifted-f64": "03bc43660be2e40c",
    "rk4-steps-f32": "68ab0a0239905b6f",
    "rk4-steps-f64": "85967b5aeb1cd53a",
    "sde-constant-True-f32": "0ece49d1ddb18776",
    "sde-constant-True-f64": "b1783e0b0cb0aace",
    "sde-linear-False-f32": "f2d0637c23131c0f",
    "sde-linear-False-f64": "a8ca59bf58399f36",
    "sde-sigma-False-f32": "f2d0637c23131c0f",
    "sde-sigma-False-f64": "a8ca59bf58399f36",
    "settings-ab2": "c05c793ebb62f500",
    "settings-adaptive_heun": "64232f6c87157d32",
    "settings-bosh3": "4dccafedb4878745",
    "settings-dopri5": "ba3699cc614d8bfd",
    "settings-dopri8": "bb23a93f5dabc66f",
    "settings-dpm2m": "4e33d8282f921be1",
    "settings-euler": "aa94f27b840668dc",
    "settings-euler_maruyama": "f9976d95dd83a60a",
    "settings-fehlberg2": "bd38a4cc85828c2e",
    "settings-heun": "26f6a20a6bef1ae4",
    "settings-midpoint": "9f51bdae0ca8a722",
    "settings-rk4": "fc78d7ffdd9854cd",
}


@pytest.fixture(scope="module")
def digests():
    return {name: _run(thunk) for name, thunk in _cases().items()}


def test_every_case_is_pinned(digests):
    assert set(digests) == set(PINNED)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_output_bit_identical(name, digests):
    assert digests[name] == PINNED[name], name
