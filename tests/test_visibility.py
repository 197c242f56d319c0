"""The visibility model: JND map, visible share, budgets and the projections every method's output goes through."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fluxguard.errors import ConfigError
from fluxguard.losses.visibility import (
    BUDGETS,
    VisibilityBudget,
    budget_usage,
    calibrated_bound,
    delta_e_2000,
    delta_e_cost,
    get_budget,
    jnd_map,
    project_sparse,
    project_to_budget,
    remove_colour_cast,
    shape_residual,
    visible_fraction,
)


def _face_crop(astronaut: np.ndarray, size: int = 128) -> torch.Tensor:
    img = torch.from_numpy(astronaut[20:276, 130:386].copy()).permute(2, 0, 1)[None].float() / 255
    return torch.nn.functional.interpolate(img, size=size, mode="area")


def test_jnd_luminance_adaptation_and_texture_masking() -> None:
    grey = torch.full((1, 3, 32, 32), 0.5)
    assert float(jnd_map(grey)[0, 0, 16, 16]) * 255 == pytest.approx(3.0, abs=0.02)  # Chou & Li at bg 127.5
    dark = torch.full((1, 3, 32, 32), 0.05)
    assert float(jnd_map(dark)[0, 0, 16, 16]) > 3 * float(jnd_map(grey)[0, 0, 16, 16])  # the eye is blind in the dark
    g = torch.Generator().manual_seed(0)
    texture = (0.5 + 0.2 * (torch.rand(1, 1, 32, 32, generator=g) - 0.5)).expand(1, 3, 32, 32)
    assert float(jnd_map(texture)[0, 0, 8:24, 8:24].mean()) > 1.3 * float(jnd_map(grey)[0, 0, 8:24, 8:24].mean())
    ramp = torch.linspace(0.3, 0.7, 32).view(1, 1, 1, 32).expand(1, 3, 32, 32)  # smooth shading is not texture
    assert float(jnd_map(ramp)[0, 0, 8:24, 8:24].mean()) < 1.2 * float(jnd_map(grey)[0, 0, 8:24, 8:24].mean())


def test_visible_fraction_counts_changes_above_the_jnd() -> None:
    x = torch.full((1, 3, 16, 16), 0.5)
    j = jnd_map(x)
    assert float(visible_fraction(x, x)[0]) == 0.0
    assert float(visible_fraction(x, x + 0.8 * j)[0]) == 0.0
    half = x.clone()
    half[..., :8, :] += 3 * j[..., :8, :]
    assert float(visible_fraction(x, half)[0]) == pytest.approx(0.5)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 8:, :] = 1
    assert float(visible_fraction(x, half, mask)[0]) == 0.0  # only the masked half counts


def test_shape_residual_masks_bounds_and_removes_colour_cast() -> None:
    g = torch.Generator().manual_seed(1)
    r = 0.02 + 0.05 * torch.randn(2, 3, 24, 24, generator=g)  # a change with a strong cast
    mask = torch.zeros(2, 1, 24, 24)
    mask[..., 4:20, 4:20] = torch.linspace(0.2, 1, 16).view(1, 1, 1, 16)
    bound = torch.full((2, 1, 24, 24), 0.03)
    out = shape_residual(r, mask, bound)
    assert float(out[..., :4, :].abs().max()) == 0 and float(out[..., :, 20:].abs().max()) == 0
    assert bool(((out.abs() <= bound * mask + 1e-7)).all())
    cast = (out * mask).flatten(2).sum(2) / mask.flatten(2).sum(2)
    assert float(cast.abs().max()) < 2e-3  # from +0.02 per channel
    soft = shape_residual(r, mask, bound, soft=True)
    assert bool((soft.abs() <= bound * mask + 1e-7).all())
    assert torch.allclose(remove_colour_cast(torch.zeros_like(r), mask), torch.zeros_like(r))


def test_budgets_are_ordered_and_checked() -> None:
    assert get_budget(None) is BUDGETS["medium"]
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    low, med, high = (BUDGETS[n].bound(x) for n in ("low", "medium", "high"))
    assert bool((low <= med + 1e-7).all() and (med <= high + 1e-7).all()) and float((high - low).mean()) > 0
    caps = [BUDGETS[n].max_delta_e for n in ("low", "medium", "high")]
    assert caps == sorted(caps)
    with pytest.raises(ConfigError, match="unknown visibility budget"):
        get_budget("huge")
    with pytest.raises(ConfigError, match="invalid"):
        VisibilityBudget("bad", 0, 1, 1, 0.5)
    # a budget from its fields, as a method's params() records it: the same budget back, and a clear error otherwise
    assert get_budget(dataclasses.asdict(BUDGETS["high"])) == BUDGETS["high"]
    with pytest.raises(ConfigError, match="needs the fields"):
        get_budget({"name": "mine", "smooth_scale": 1.0})


def test_projection_keeps_the_colour_difference_and_visible_caps(astronaut: np.ndarray) -> None:
    x = _face_crop(astronaut)
    mask = torch.ones(1, 1, 128, 128)
    noisy = (x + 0.08 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    for name in ("low", "medium"):
        b = BUDGETS[name]
        out, stats = project_to_budget(x, noisy, mask, b)
        assert stats[0]["delta_e"] <= b.max_delta_e + 1e-6 and stats[0]["visible"] <= b.max_visible + 1e-6
        assert 0 < stats[0]["scale"] < 1
        de = delta_e_2000(x[0].permute(1, 2, 0).numpy(), out[0].permute(1, 2, 0).numpy()).mean()
        assert de == pytest.approx(stats[0]["delta_e"], rel=1e-6)
    same, stats = project_to_budget(x, x, mask, BUDGETS["low"])
    assert torch.equal(same, x) and stats[0]["scale"] == 1.0


def test_calibrated_bound_meets_the_colour_difference_cap(astronaut: np.ndarray) -> None:
    x = _face_crop(astronaut)
    mask = torch.ones(1, 1, 128, 128)
    b = BUDGETS["medium"]
    bound = calibrated_bound(x, mask, b, luma_only=True)
    assert bool((bound <= b.bound(x) + 1e-7).all())
    signs = torch.where(torch.rand(1, 1, 128, 128, generator=torch.Generator().manual_seed(9)) > 0.5, 1.0, -1.0)
    y = (x + bound * signs).clamp(0, 1)
    assert delta_e_2000(x[0].permute(1, 2, 0).numpy(), y[0].permute(1, 2, 0).numpy()).mean() <= b.max_delta_e


def test_sparse_projection_spends_the_colour_budget_where_it_pays(astronaut: np.ndarray) -> None:
    x = _face_crop(astronaut, 64)
    cost = delta_e_cost(x)
    assert float(cost.min()) > 0
    v = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(4)) * 0.05
    bound = torch.full_like(v, 0.03)
    total = torch.tensor([0.5 * 64 * 64])  # mean CIEDE2000 0.5 per pixel
    out = project_sparse(v, cost, bound, total)
    assert float((cost * out.abs()).sum()) <= float(total) * 1.001
    assert bool((out.abs() <= bound + 1e-7).all()) and bool((out * v >= 0).all())
    assert float((out == 0).float().mean()) > 0.2  # sparse: many pixels untouched


def test_budget_usage_is_zero_unchanged_and_one_at_the_bound() -> None:
    bound = torch.full((1, 1, 8, 8), 0.02)
    mask = torch.ones(1, 1, 8, 8)
    assert float(budget_usage(torch.zeros(1, 3, 8, 8), bound, mask)[0]) == 0
    assert float(budget_usage(bound.expand(1, 3, 8, 8), bound, mask)[0]) == pytest.approx(1.0)
