"""The tables of ``results.json``: per-item cosines aggregated into PSR per judge and FAR (black-box rotations,
held-out judges, white-box extra), PSR after each transform and after purification (with the share kept), quality
and timing."""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fluxguard.eval.files import relative
from fluxguard.eval.protocol import FARS, MAIN_FAR, SCHEMA, EvalConfig, Subject, Target
from fluxguard.eval.psr import psr
from fluxguard.eval.purification import Purifier
from fluxguard.eval.zoo import JudgePlan, ModelSet


def _mean(values: Iterable[float | None]) -> float:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


def _rates(values: Sequence[float], thresholds: Mapping[str, float], mode: str) -> dict[str, float]:
    return {f: psr(values, thresholds[f], mode) for f in FARS if f in thresholds}


def _block(per_judge: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean PSR over judges at every FAR."""
    return {f: _mean(r.get(f) for r in per_judge.values()) for f in FARS}


class _ModeSummary:
    """The tables of one mode (dodge or impersonate) from the per-item cosines."""

    def __init__(self, plans: Mapping[str, JudgePlan], mode: str, subjects: Sequence[Subject],
                 clean: Mapping[str, Any], items: Sequence[Mapping[str, Any]],
                 th: Mapping[str, Mapping[str, float]]) -> None:
        self.plans, self.mode, self.subjects, self.clean, self.th = plans, mode, subjects, clean, th
        self.items = [it for it in items if it["mode"] == mode]

    def scored(self, j: str, white: bool) -> list[Mapping[str, Any]]:
        return [it for it in self.items if j in it["judges"] and it["judges"][j]["white_box"] == white]

    def clean_of(self, j: str, kind: str = "plain", sub: str | None = None) -> list[float]:
        out = []
        for s in self.subjects:
            r = self.clean[s.identity][self.mode]
            v = r[kind] if sub is None else r[kind][sub]
            if v.get(j) is not None:
                out.append(v[j])
        return out

    def psr(self) -> dict[str, Any]:
        black, white = {}, {}
        for j, plan in self.plans.items():
            its = self.scored(j, False)
            prot = [it["scores"]["protected"][j] for it in its]
            row = {
                "judge": j, "extra": plan.extra, "zoos": [z.tag for z in plan.zoos], "n": len(prot),
                "psr": _rates(prot, self.th[j], self.mode),
                "clean_psr": _rates(self.clean_of(j), self.th[j], self.mode),
                "mean_cos": _mean(prot), "clean_mean_cos": _mean(self.clean_of(j)), "thresholds": self.th[j],
                "redetect_lost": sum(not it["scores"]["protected"]["redetected"] for it in its),
            }
            black[j] = row
            if plan.white_box is not None:
                wits = self.scored(j, True)
                wprot = [it["scores"]["protected"][j] for it in wits]
                white[j] = {**row, "zoos": [plan.white_box.tag], "n": len(wprot),
                            "psr": _rates(wprot, self.th[j], self.mode), "mean_cos": _mean(wprot), "extra": False,
                            "redetect_lost": sum(not it["scores"]["protected"]["redetected"] for it in wits)}
        zoo_judges = [j for j in black if not black[j]["extra"]]
        return {
            "black_box": black,
            "mean": {"psr": _block({j: r["psr"] for j, r in black.items()}),
                     "clean_psr": _block({j: r["clean_psr"] for j, r in black.items()}), "judges": list(black)},
            "mean_zoo_rotation": {"psr": _block({j: black[j]["psr"] for j in zoo_judges}),
                                  "clean_psr": _block({j: black[j]["clean_psr"] for j in zoo_judges}),
                                  "judges": zoo_judges},
            "white_box": white,
        }

    def derived(self, kind: str, sub: str | None, before: Mapping[str, float]) -> dict[str, Any]:
        """PSR after a transform (``kind="transforms"``, ``sub`` its name) or purification, and the share kept."""
        judges, cleans = {}, {}
        for j in self.plans:
            its = self.scored(j, False)
            vals = [(it["scores"][kind] if sub is None else it["scores"][kind][sub])[j] for it in its]
            judges[j] = _rates(vals, self.th[j], self.mode)
            cleans[j] = _rates(self.clean_of(j, kind, sub), self.th[j], self.mode)
        mean = _block(judges)
        kept = {f: (mean[f] / before[f]) if before.get(f) else float("nan") for f in FARS}
        return {"judges": judges, "mean": mean, "kept": kept, "clean_judges": cleans, "clean_mean": _block(cleans)}

    def quality(self) -> dict[str, Any]:
        bb = [it for it in self.items if any(not v["white_box"] for v in it["judges"].values())]
        seen = ("delta_e_mean", "delta_e_p95", "visible", "psnr_mask", "ssim_mask", "psnr_outside")
        return {
            "face": {k: _mean(it["quality"].get(f"face_{k}") for it in bb) for k in ("psnr", "ssim", "ms_ssim")},
            "photo": {k: _mean(it["quality"].get(k) for it in bb) for k in ("psnr", "ssim", "ms_ssim")},
            # as people see it, over the face mask (fluxguard.eval.quality.face_quality); colour shift as the
            # largest absolute mean shift of any face
            "mask": {k: _mean(it["quality"].get(k) for it in bb) for k in seen},
            "colour_shift_max": {k: max((abs(it["quality"][k]) for it in bb if it["quality"].get(k) is not None),
                                        default=float("nan")) for k in ("dL", "da", "db")},
            "changed_outside": sum(int(it["quality"].get("changed_outside") or 0) for it in bb),
            "n": len(bb),
        }


def summarise(cfg: EvalConfig, models: ModelSet, plans: Mapping[str, JudgePlan], subjects: Sequence[Subject],
              targets: Sequence[Target], clean: Mapping[str, Any], items: Sequence[Mapping[str, Any]],
              purifier: Purifier | None, notes: list[str]) -> dict:
    """Aggregate per-item cosines into the tables of results.json."""
    data = Path(cfg.data_dir)
    th = {j: models.thresholds(j) for j in models.judges}
    psr_out: dict[str, Any] = {}
    rob_out: dict[str, Any] = {}
    pur_out: dict[str, Any] = {}
    quality: dict[str, Any] = {}
    for mode in cfg.modes:
        ms = _ModeSummary(plans, mode, subjects, clean, items, th)
        psr_out[mode] = ms.psr()
        before = psr_out[mode]["mean"]["psr"]
        if cfg.robustness:
            from fluxguard.eval.robustness import TRANSFORMS

            rob_out[mode] = {t: ms.derived("transforms", t, before) for t in TRANSFORMS}
        if purifier is not None:
            pur_out[mode] = ms.derived("purified", None, before)
        quality[mode] = ms.quality()
    secs = [it["seconds"]["total"] for it in items]
    method_secs = [it["seconds"]["method"] for it in items]
    params = items[0]["method_params"] if items else {**cfg.params}
    return {
        "schema": SCHEMA,
        "method": cfg.method,
        "params": {k: v for k, v in params.items() if k not in ("fr_models", "mode")},
        "strength": cfg.strength,
        "seed": cfg.seed,
        "modes": list(cfg.modes),
        "data_dir": str(data),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": cfg.device,
                        "machine": platform.machine(), "cpus": os.cpu_count()},
        "protocol": {
            "split": "eval",
            "n_identities": len(subjects),
            "identities": [{"identity": s.identity, "source": relative(s.source, data),
                            "reference": relative(s.reference, data)} for s in subjects],
            "targets": [{"index": t.index, "photo": relative(t.photo, data), "test": relative(t.test, data)}
                        for t in targets],
            "attack_models": models.attack_models,
            "judges": {j: {"zoos": [list(z.models) for z in p.zoos], "extra": p.extra,
                           "family": models.family(j), "thresholds": th[j]} for j, p in plans.items()},
            "fars": list(FARS),
            "main_far": MAIN_FAR,
            "scoring": "saved 8-bit PNG, face re-detected (best IoU with the original box; original landmarks when "
                       "lost), cosine to the reference photo's embedding",
        },
        "psr": psr_out,
        "robustness": rob_out or None,
        "purification": ({"config": purifier.describe(), **pur_out} if purifier is not None else None),
        "quality": quality,
        "timing": {"seconds_per_face": _mean(secs), "method_seconds_per_face": _mean(method_secs),
                   "median_seconds_per_face": float(np.median(secs)) if secs else float("nan"), "n": len(secs),
                   "total_protect_seconds": float(np.sum(secs)) if secs else 0.0},
        "items": [{k: it[k] for k in ("identity", "mode", "zoo_tag", "source", "reference", "target", "quality",
                                      "seconds", "judges", "scores", "face")} for it in items],
        "clean": clean,
        "notes": notes,
    }
