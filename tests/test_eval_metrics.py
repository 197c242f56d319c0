"""PSR arithmetic, leave-one-out exclusion, threshold use, verification statistics, quality and robustness."""

from __future__ import annotations

import numpy as np
import pytest

from fluxguard.eval.psr import (
    RateInterval,
    leave_one_out,
    psr,
    psr_row,
    rate_interval,
    success,
    threshold_at_far,
    verification_stats,
    wilson_interval,
)
from fluxguard.eval.quality import quality_report
from fluxguard.eval.robustness import TRANSFORMS


def test_psr_dodging_and_impersonation_by_hand() -> None:
    sims = [0.10, 0.25, 0.30, 0.31, 0.90]
    # dodging succeeds strictly below the threshold, impersonation strictly above
    assert psr(sims, 0.30, "dodge") == pytest.approx(2 / 5)
    assert psr(sims, 0.30, "impersonate") == pytest.approx(2 / 5)
    assert psr(sims, 0.0, "dodge") == 0.0
    assert psr(sims, 1.0, "dodge") == 1.0
    assert np.isnan(psr([], 0.3, "dodge"))
    assert success(0.3, 0.3, "dodge") == False  # noqa: E712 (numpy bool)
    with pytest.raises(ValueError):
        psr(sims, 0.3, "hide")


def test_psr_row_uses_each_far_threshold() -> None:
    th = {"1e-1": 0.2, "1e-2": 0.4, "1e-3": 0.6}
    row = psr_row("m", "dodge", protected=[0.1, 0.3, 0.5, 0.7], clean=[0.8, 0.9, 0.7, 0.65], thresholds=th)
    assert row.protected == {"1e-1": 0.25, "1e-2": 0.5, "1e-3": 0.75}
    assert row.clean == {"1e-1": 0.0, "1e-2": 0.0, "1e-3": 0.0}
    imp = psr_row("m", "impersonate", protected=[0.1, 0.3, 0.5, 0.7], clean=[0.0] * 4, thresholds=th)
    assert imp.protected == {"1e-1": 0.75, "1e-2": 0.5, "1e-3": 0.25}


def test_leave_one_out_never_attacks_the_judge() -> None:
    zoo = ["a", "b", "c", "d"]
    for judge in zoo:
        ens = leave_one_out(zoo, judge)
        assert judge not in ens and sorted(ens + [judge]) == zoo
    fam = {"a": "x", "b": "x", "c": "y", "d": "z"}
    assert leave_one_out(zoo, "a", fam) == ["c", "d"]
    with pytest.raises(KeyError):
        leave_one_out(zoo, "e")
    with pytest.raises(ValueError):
        leave_one_out(["a"], "a")


def test_threshold_at_far() -> None:
    imp = np.linspace(0, 1, 1001)
    assert threshold_at_far(imp, 1e-1) == pytest.approx(0.9, abs=1e-3)
    assert threshold_at_far(imp, 1e-2) == pytest.approx(0.99, abs=1e-3)
    # accepted share never exceeds the FAR
    for far in (1e-1, 1e-2, 1e-3):
        assert (imp > threshold_at_far(imp, far)).mean() <= far
    with pytest.raises(ValueError, match="cannot resolve"):
        threshold_at_far(imp[:50], 1e-3)


def test_verification_stats() -> None:
    rng = np.random.default_rng(0)
    gen, imp = rng.normal(0.7, 0.1, 500), rng.normal(0.1, 0.1, 5000)
    th = {"1e-2": threshold_at_far(imp, 1e-2)}
    st = verification_stats(gen, imp, th)
    assert st["auc"] > 0.99 and 5.0 < st["d_prime"] < 7.0 and st["tar@1e-2"] > 0.95
    perfect = verification_stats([1.0, 0.9], [0.0, 0.1], {"x": 0.5})
    assert perfect["auc"] == 1.0 and perfect["tar@x"] == 1.0
    chance = verification_stats([0.5] * 10, [0.5] * 10, {"x": 0.5})
    assert chance["auc"] == pytest.approx(0.5)


def test_quality_identical_and_noisy(astronaut: np.ndarray) -> None:
    q = quality_report(astronaut, astronaut.copy(), box=np.array([130, 60, 280, 240]))
    assert q["psnr"] == float("inf") and q["ssim"] == pytest.approx(1.0) and q["face_ssim"] == pytest.approx(1.0)
    noisy = np.clip(astronaut.astype(int) + np.random.default_rng(0).integers(-8, 9, astronaut.shape), 0, 255)
    q2 = quality_report(astronaut, noisy.astype(np.uint8))
    assert 30 < q2["psnr"] < 40 and 0.5 < q2["ssim"] < 0.99 and 0.8 < q2["ms_ssim"] < 1.0


def test_robustness_transforms_shapes(astronaut: np.ndarray) -> None:
    for name, t in TRANSFORMS.items():
        out = t(astronaut)
        assert out.dtype == np.uint8 and out.ndim == 3, name
        if name != "crop0.9":
            assert out.shape == astronaut.shape, name
    assert TRANSFORMS["crop0.9"](astronaut).shape[:2] == (461, 461)
    big = np.zeros((2000, 3000, 3), np.uint8)
    assert TRANSFORMS["social"](big).shape[:2] == (720, 1080)


def test_wilson_interval_known_values() -> None:
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=5e-5)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=5e-5)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=5e-5)
    assert wilson_interval(1, 2) == pytest.approx((0.0945, 0.9055), abs=5e-5)
    lo, hi = wilson_interval(3.875, 6)  # a fractional count: the mean of 6 units in [0, 1]
    assert 0 < lo < 3.875 / 6 < hi < 1
    for bad in ((1, 0), (-1, 5), (6, 5)):
        with pytest.raises(ValueError):
            wilson_interval(*bad)


def test_wilson_interval_covers_at_least_nominal_rate() -> None:
    # exact coverage over every outcome of Binomial(n, p): the Wilson interval stays near 95 % even at n = 6
    from math import comb

    for n in (6, 12, 50):
        for p in (0.1, 0.3, 0.5, 0.8):
            cover = sum(comb(n, k) * p**k * (1 - p) ** (n - k)
                        for k in range(n + 1) if wilson_interval(k, n)[0] <= p <= wilson_interval(k, n)[1])
            assert cover > 0.88, (n, p, cover)


def test_rate_interval_and_win_rule() -> None:
    a = rate_interval(0.8, 10)
    assert isinstance(a, RateInterval) and a.n == 10 and a.value == 0.8
    assert (a.low, a.high) == pytest.approx(wilson_interval(8, 10))
    b = rate_interval(0.1, 10)
    assert a.low > b.high and a.beats(b) and not b.beats(a) and not a.overlaps(b)
    c = rate_interval(0.5, 10)  # overlaps both: neither is a win
    assert c.overlaps(a) and c.overlaps(b) and not a.beats(c) and not c.beats(b)
    assert rate_interval(1.0, 6).high == 1.0 and rate_interval(0.0, 6).low == 0.0
    with pytest.raises(ValueError):
        rate_interval(float("nan"), 6)
    with pytest.raises(ValueError):
        rate_interval(1.5, 6)
