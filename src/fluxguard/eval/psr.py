"""Protection success rate (PSR) as the face-privacy literature defines it (AMT-GAN protocol, methods.md §1.2).

Impersonation: a protected face succeeds when its cosine to a *different* photo of the target is above the judged
model's threshold. Dodging: it succeeds when its cosine to a *different* photo of its own person is below it.
Thresholds are calibrated at a false-accept rate (FAR) on identities disjoint from the evaluated ones.

Black-box by default: for each judged model the method attacks with the zoo minus that model (leave-one-out).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

FARS = ("1e-1", "1e-2", "1e-3")


def leave_one_out(models: Sequence[str], judge: str, exclude_family: Mapping[str, str] | None = None) -> list[str]:
    """The attack ensemble for a black-box judge: every model but the judge (and, when ``exclude_family`` maps
    names to families, every model of the judge's family)."""
    if judge not in models and (exclude_family is None or judge not in exclude_family):
        raise KeyError(f"judge {judge!r} is not among the models {list(models)}")
    fam = exclude_family.get(judge) if exclude_family else None
    out = [m for m in models if m != judge and (fam is None or exclude_family.get(m) != fam)]
    if not out:
        raise ValueError(f"no model left to attack once {judge!r} is held out")
    return out


def success(similarity: float | np.ndarray, threshold: float, mode: str) -> np.ndarray:
    """Per-face success: above the threshold when impersonating, below it when dodging."""
    s = np.asarray(similarity, dtype=np.float64)
    if mode == "impersonate":
        return s > threshold
    if mode == "dodge":
        return s < threshold
    raise ValueError(f"mode must be 'dodge' or 'impersonate', got {mode!r}")


def psr(similarities: Iterable[float], threshold: float, mode: str) -> float:
    """Share of faces that succeed (0..1); NaN for an empty set."""
    s = np.asarray(list(similarities), dtype=np.float64)
    if s.size == 0:
        return float("nan")
    return float(success(s, threshold, mode).mean())


@dataclass(frozen=True)
class PSRRow:
    """PSR of one judged model at every FAR, protected and clean (unprotected) side by side."""

    judge: str
    mode: str
    n: int
    protected: dict[str, float]  # FAR -> PSR
    clean: dict[str, float]  # FAR -> PSR of the unprotected faces (the floor to beat)
    white_box: bool = False

    def to_dict(self) -> dict:
        return {"judge": self.judge, "mode": self.mode, "n": self.n, "white_box": self.white_box,
                "psr": self.protected, "clean_psr": self.clean}


def psr_row(judge: str, mode: str, protected: Sequence[float], clean: Sequence[float],
            thresholds: Mapping[str, float], white_box: bool = False) -> PSRRow:
    """One table row: PSR at each FAR for protected and clean similarities to the judged reference photos."""
    fars = [f for f in FARS if f in thresholds]
    return PSRRow(
        judge=judge,
        mode=mode,
        n=len(protected),
        protected={f: psr(protected, thresholds[f], mode) for f in fars},
        clean={f: psr(clean, thresholds[f], mode) for f in fars},
        white_box=white_box,
    )


# ------------------------------------------------------------------------------------------- uncertainty
Z95 = 1.959963984540054  # two-sided 95 % normal quantile


def wilson_interval(successes: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (95 % by default).

    ``successes`` may be fractional: for a mean of ``n`` independent units that each lie in [0, 1] (an identity's
    share of judges fooled), the variance is at most ``p (1 - p) / n``, so the same interval is conservative.

    Example:
        >>> [round(v, 3) for v in wilson_interval(8, 10)]
        [0.49, 0.943]

    Reference: E. B. Wilson, "Probable inference, the law of succession, and statistical inference", JASA 1927.
    """
    if n <= 0:
        raise ValueError(f"need n > 0, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # at p = 0 or 1 the bound is exact; clip the rounding error that would put it a hair outside [0, 1]
    return max(0.0, centre - half) if p > 0 else 0.0, min(1.0, centre + half) if p < 1 else 1.0


@dataclass(frozen=True)
class RateInterval:
    """A rate (0..1) with its 95 % interval and the number of independent units it was measured on."""

    value: float
    low: float
    high: float
    n: int

    def beats(self, other: RateInterval) -> bool:
        """True only when this rate is higher and the two intervals do not overlap."""
        return self.low > other.high

    def overlaps(self, other: RateInterval) -> bool:
        return not (self.beats(other) or other.beats(self))


def rate_interval(rate: float, n_units: int, z: float = Z95) -> RateInterval:
    """The Wilson interval of a rate measured on ``n_units`` independent units (see :func:`wilson_interval`).

    For the benchmark's mean-over-judges PSR the unit is the *identity*: every judge scores the same identities, so
    the judges' verdicts on one identity are correlated and the 6 judges x 6 identities of a table row are not 36
    independent trials. The mean PSR equals the mean over identities of each identity's share of (judge, photo)
    verdicts that succeed, a number in [0, 1]; with ``n_units`` = identities the Wilson interval is valid whatever
    the correlation between judges (it assumes the worst case, judges that always agree), hence conservative.

    Why not a bootstrap over identities: at the 3-12 identities these CPU benchmarks afford, a percentile bootstrap
    under-covers (it cannot show variation the few identities lack, and collapses to a zero-width interval when
    every identity succeeds), while the score interval keeps its small-sample behaviour and needs only the rate and
    the count, which every results file stores. Per-identity rates (``per_identity`` in the benchmark summaries
    written since) allow a tighter, design-effect interval later.
    """
    if not math.isfinite(rate):
        raise ValueError(f"rate must be finite, got {rate}")
    if not -1e-9 <= rate <= 1 + 1e-9:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    low, high = wilson_interval(min(max(rate, 0.0), 1.0) * n_units, n_units, z)
    return RateInterval(rate, low, high, int(n_units))


def threshold_at_far(impostor_scores: Sequence[float], far: float) -> float:
    """The cosine threshold whose false-accept rate on ``impostor_scores`` is ``far`` (scores above it accept)."""
    s = np.sort(np.asarray(impostor_scores, dtype=np.float64))
    if s.size == 0:
        raise ValueError("no impostor scores")
    if far * s.size < 1:
        raise ValueError(f"{s.size} impostor pairs cannot resolve FAR {far:g}; need at least {int(np.ceil(1 / far))}")
    return float(np.quantile(s, 1.0 - far, method="higher"))


def verification_stats(genuine: Sequence[float], impostor: Sequence[float],
                       thresholds: Mapping[str, float]) -> dict[str, float]:
    """TAR at each FAR threshold, ROC AUC and d' of genuine vs impostor cosine scores."""
    g = np.asarray(genuine, dtype=np.float64)
    i = np.asarray(impostor, dtype=np.float64)
    out: dict[str, float] = {f"tar@{far}": float((g > th).mean()) for far, th in thresholds.items()}
    # AUC = P(genuine > impostor) (+ half the ties), by ranks
    allv = np.concatenate([g, i])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty_like(order, dtype=np.float64)
    ranks[order] = np.arange(1, allv.size + 1)
    # average ranks over ties
    _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = sums[inv] / counts[inv]
    out["auc"] = float((ranks[: g.size].sum() - g.size * (g.size + 1) / 2) / (g.size * i.size))
    out["d_prime"] = float((g.mean() - i.mean()) / np.sqrt(0.5 * (g.var() + i.var()) + 1e-12))
    return out
