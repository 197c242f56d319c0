"""The protection step of an evaluation: every (mode, attack zoo, identity) protected once, saved as an 8-bit PNG
beside a JSON record (quality, timing, the method's parameters) under ``items/``; done items are skipped."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from fluxguard.eval.cache import face_json
from fluxguard.eval.files import item_path, png_bytes, relative, sha1_bytes, write_atomic, write_json
from fluxguard.eval.protocol import EvalConfig, ProgressFn, Subject, Target
from fluxguard.eval.zoo import ModelSet, Zoo

log = logging.getLogger(__name__)


def protect_all(cfg: EvalConfig, models: ModelSet, zoos: Sequence[Zoo], subjects: Sequence[Subject],
                targets: Sequence[Target], progress: ProgressFn) -> None:
    """Protect every (mode, zoo, subject) not done yet; one method instance alive at a time."""
    from fluxguard.api import Protector
    from fluxguard.eval.quality import quality_report
    from fluxguard.io import load_image

    out, data = Path(cfg.out_dir), Path(cfg.data_dir)
    work = [(m, z) for m in cfg.modes for z in zoos]
    total = len(work) * len(subjects)
    done = 0
    for mode, zoo in work:
        protector = None
        for s in subjects:
            done += 1
            meta_p = item_path(out, mode, zoo.tag, s.identity, ".json")
            png_p = item_path(out, mode, zoo.tag, s.identity, ".png")
            if meta_p.is_file() and png_p.is_file():
                continue
            if protector is None:
                protector = Protector(
                    cfg.method, mode=mode, fr_models=[models.model(n) for n in zoo.models], judges=[],
                    strength=cfg.strength, device=cfg.device, **cfg.params,
                )
            progress(f"protect {mode} {zoo.tag}: {s.identity}", done, total)
            source = load_image(s.source)
            tgt = targets[s.index % len(targets)] if mode == "impersonate" else None
            t0 = time.perf_counter()
            res = protector.protect(
                source, target=None if tgt is None else load_image(tgt.photo), seed=cfg.seed,
                faces=[s.source_face], target_face=None if tgt is None else tgt.face,
            )
            seconds = time.perf_counter() - t0
            png = png_bytes(res.image)
            write_atomic(png_p, png)
            q = {**quality_report(source.rgb, res.image, box=s.source_face.box), **res.faces[0].quality}
            meta = {
                "identity": s.identity, "mode": mode, "zoo": list(zoo.models), "zoo_tag": zoo.tag,
                "source": relative(s.source, data), "reference": relative(s.reference, data),
                "target": None if tgt is None else {"index": tgt.index, "photo": relative(tgt.photo, data),
                                                    "test": relative(tgt.test, data)},
                "face": face_json(s.source_face), "png_sha1": sha1_bytes(png), "quality": q,
                "seconds": {"method": res.timings.get("method", seconds), "total": seconds},
                "method_params": protector.params(), "final_loss": (res.faces[0].history or [{}])[-1].get("loss"),
            }
            write_json(meta_p, meta)
            log.info("protected %s (%s, %s) in %.1fs", s.identity, mode, zoo.tag, seconds)
        del protector
