"""The FR models of an evaluation and the leave-one-out rotations: which attack zoo each judge scores.

Each judged model ``j`` scores photos protected against the attack zoo minus ``j``'s family; a judge outside the
zoo scores every rotation that excludes its family; with ``white_box`` the attacked models also score photos
protected against the whole zoo (a labelled extra).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fluxguard.errors import ConfigError, FluxguardError
from fluxguard.eval.files import sha1_file


def model_tag(recognizer: Any) -> str:
    """``name-<hash>`` of what decides a model's embeddings: its crop (size, template), embedding size and weights
    file. Cached embeddings and protected photos are keyed by it, so a re-fitted template or new weights never
    reuse stale work."""
    spec = recognizer.spec
    h = hashlib.sha1(json.dumps([spec.name, spec.crop.size, np.asarray(spec.crop.template, float).round(4).tolist(),
                                 spec.embedding_size, type(recognizer).__qualname__]).encode())
    local = getattr(type(recognizer), "local_weights", None)
    weights = Path(local()) if local is not None else None
    if weights is not None and weights.is_file():
        h.update(sha1_file(weights).encode())
    return f"{spec.name}-{h.hexdigest()[:8]}"


def family_key(recognizer: Any) -> str:
    """A model's family for leave-one-out: the family name before any parenthesis (two weight sets of one
    architecture and training set are one family, so neither is black-box to the other)."""
    return str(recognizer.spec.family).split(" (")[0].strip() or recognizer.name


@dataclass(frozen=True)
class Zoo:
    """One attack ensemble; ``tag`` names its folder (``full`` or ``minus-<models>``)."""

    models: tuple[str, ...]
    excluded: tuple[str, ...]

    @property
    def tag(self) -> str:
        return "full" if not self.excluded else "minus-" + "+".join(self.excluded)


@dataclass
class JudgePlan:
    name: str
    zoos: list[Zoo]  # black-box rotations this judge scores
    extra: bool  # outside the attack zoo (held out entirely)
    white_box: Zoo | None = None


class ModelSet:
    """The FR models of a run by name, loaded once: the attack zoo (``attack_models``) and the judges that could be
    loaded (``judges``; a judge that fails to load is skipped with a note unless it was asked for by name).

    Args:
        device: torch device of the loaded models.
        notes: the run's notes (skipped judges are added).
        source: name -> FaceRecognizer to use instead of loading (tests, custom zoos).
        attack_models: default: every shipped model (or every model of ``source``).
        judges: default: the attack zoo and every other available model (or every model of ``source``).
    """

    def __init__(self, device: str, notes: list[str], *, source: Mapping[str, Any] | None = None,
                 attack_models: Sequence[str] | None = None, judges: Sequence[str] | None = None) -> None:
        self.device = device
        self.notes = notes
        self._source = source
        self._models: dict[str, Any] = {}
        self._tags: dict[str, str] = {}
        self.attack_models = list(attack_models) if attack_models is not None else self._default_attack_models()
        judge_names = list(judges) if judges is not None else self._default_judges()
        for name in dict.fromkeys([*self.attack_models, *judge_names]):
            self._load(name, required=name in self.attack_models or judges is not None)
        self.judges = [j for j in judge_names if j in self._models]

    def _default_attack_models(self) -> list[str]:
        if self._source is not None:
            return list(self._source)
        from fluxguard.recognition import shipped_models

        return shipped_models()

    def _default_judges(self) -> list[str]:
        if self._source is not None:
            return list(self._source)
        from fluxguard.recognition import available_models

        return list(dict.fromkeys([*self.attack_models, *available_models()]))

    def _load(self, name: str, required: bool) -> None:
        try:
            if self._source is not None:
                if name not in self._source:
                    raise ConfigError(f"FR model {name!r} is not among the given models {list(self._source)}")
                self._models[name] = self._source[name]
            else:
                from fluxguard.api import recognizers

                self._models[name] = recognizers([name], self.device)[0]
        except FluxguardError as e:
            if required:
                raise
            self.notes.append(f"judge {name} skipped: {e}")

    def names(self) -> list[str]:
        """Every loaded model (attack zoo first)."""
        return list(self._models)

    def model(self, name: str) -> Any:
        return self._models[name]

    def tag(self, name: str) -> str:
        """:func:`model_tag` of a model (computed once)."""
        if name not in self._tags:
            self._tags[name] = model_tag(self.model(name))
        return self._tags[name]

    def thresholds(self, name: str) -> dict[str, float]:
        return dict(self.model(name).calibrated_spec().thresholds)

    def family(self, name: str) -> str:
        return family_key(self.model(name))


def plan_judges(models: ModelSet, white_box: bool) -> dict[str, JudgePlan]:
    """Which attack zoo(s) each judge scores: the zoo minus the judge's family (black-box)."""
    attack = models.attack_models
    fam = {n: models.family(n) for n in models.names()}
    plans: dict[str, JudgePlan] = {}
    rotations: dict[str, Zoo] = {}
    for m in attack:  # one rotation per attack model's family
        excluded = tuple(a for a in attack if fam[a] == fam[m])
        kept = tuple(a for a in attack if a not in excluded)
        if not kept:
            raise ConfigError(f"no model left to attack once {m!r} (and its family) is held out")
        rotations.setdefault(fam[m], Zoo(kept, excluded))
    full = Zoo(tuple(attack), ())
    for j in models.judges:
        if fam[j] in rotations:
            zoos = [rotations[fam[j]]]
            extra = j not in attack
        else:
            zoos = list(rotations.values())
            extra = True
        wb = full if (white_box and j in attack) else None
        plans[j] = JudgePlan(j, zoos, extra, wb)
    return plans


def all_zoos(plans: Mapping[str, JudgePlan]) -> list[Zoo]:
    """Every attack zoo a protected photo is needed for (black-box rotations first, then the full zoo)."""
    out: dict[str, Zoo] = {}
    for p in plans.values():
        for z in p.zoos:
            out.setdefault(z.tag, z)
    for p in plans.values():
        if p.white_box is not None:
            out.setdefault(p.white_box.tag, p.white_box)
    return list(out.values())


def judges_of(plans: Mapping[str, JudgePlan], zoo: Zoo) -> list[tuple[str, bool]]:
    """(judge, white_box) pairs that score photos protected against ``zoo``."""
    out = [(j, False) for j, p in plans.items() if any(z.tag == zoo.tag for z in p.zoos)]
    out += [(j, True) for j, p in plans.items() if p.white_box is not None and p.white_box.tag == zoo.tag]
    return out
