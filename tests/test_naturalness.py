"""Natural by construction, on real faces: only the face changes, no colour cast, nothing changes without an attack,
and the presets are ordered by how visible they are."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import fluxguard
from fluxguard.api import Protector

# Fast settings per method: enough for the invariants, which hold whatever the number of steps.
FAST = {
    "pgd": {"steps": 3},
    "fluxguard": {"adam_steps": 2},
    "wdp": {"prot_steps": 2, "null_optimization_steps": 2},
}
MODELS = ["mobilefacenet", "mobileface"]


def _png_roundtrip(rgb: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


@pytest.fixture(scope="module")
def pgd_astronaut(astronaut: np.ndarray):
    return fluxguard.protect(astronaut, method="pgd", fr_models=MODELS, judges=MODELS, **FAST["pgd"])


def test_only_the_face_changes_bit_exact_in_png(astronaut: np.ndarray, pgd_astronaut) -> None:
    res = pgd_astronaut
    out = _png_roundtrip(res.image)
    changed = np.any(out != astronaut, axis=2)
    q = res.faces[0].quality
    assert q["changed_outside"] == 0 and q["psnr_outside"] == float("inf")
    assert changed.any()
    ys, xs = np.nonzero(changed)
    x0, y0, x1, y1 = res.faces[0].face.box
    # every changed pixel lies inside the face box, hair and the square crop's corners included nowhere
    assert xs.min() >= x0 - 2 and xs.max() <= x1 + 2 and ys.min() >= y0 - 0.3 * (y1 - y0) and ys.max() <= y1 + 2
    assert changed.mean() < 0.1


@pytest.mark.parametrize("method", ["pgd", "fluxguard", "wdp"])
def test_no_colour_cast_and_budget_caps(astronaut: np.ndarray, method: str, pgd_astronaut) -> None:
    res = pgd_astronaut if method == "pgd" else fluxguard.protect(
        astronaut, method=method, fr_models=MODELS, judges=[], **FAST[method])
    q = res.faces[0].quality
    assert max(abs(q["dL"]), abs(q["da"]), abs(q["db"])) <= 0.5, q
    from fluxguard.losses.visibility import BUDGETS

    medium = BUDGETS["medium"]
    assert q["delta_e_mean"] <= medium.max_delta_e + 0.1, q  # measured on the photo, not the crop
    assert q["changed_outside"] == 0


@pytest.mark.parametrize(("method", "off"), [("fluxguard", {"adam_steps": 0}),
                                             ("fluxguard", {"adam_steps": 0, "change_gain": 3.0}),
                                             ("wdp", {"prot_steps": 0, "null_optimization_steps": 1})])
def test_without_the_adversarial_stage_the_output_is_the_input(astronaut: np.ndarray, method: str, off: dict) -> None:
    res = fluxguard.protect(astronaut, method=method, fr_models=MODELS, judges=[], **off)
    assert np.array_equal(res.image, astronaut)


def test_presets_are_ordered_by_visibility(astronaut: np.ndarray) -> None:
    de, vis = [], []
    for strength in ("low", "medium", "high"):
        res = fluxguard.protect(astronaut, method="pgd", strength=strength, fr_models=MODELS, judges=[], steps=5)
        de.append(res.faces[0].quality["delta_e_mean"])
        vis.append(res.faces[0].quality["visible"])
    assert de[0] < de[1] < de[2], de
    assert vis[0] <= vis[1] <= vis[2], vis
    assert vis[0] < 0.05  # low: under the JND nearly everywhere


@pytest.mark.data
def test_multi_face_photo_has_no_seam(faces_dir) -> None:
    from fluxguard.faces.align import align_faces, photo_mask
    from fluxguard.faces.mask import face_mask
    from fluxguard.io import load_image

    photo = load_image(faces_dir / "portraits" / "vladmandic_human" / "group-4.jpg")
    prot = Protector("pgd", fr_models=MODELS, judges=[], **FAST["pgd"])
    res = prot.protect(photo)
    assert len(res.faces) >= 4
    out = _png_roundtrip(res.image)
    # the union of the face masks, rebuilt independently of the run
    tensor = fluxguard.api.to_tensor(photo.rgb)
    aligned, masks = [], []
    for f in res.faces:
        from fluxguard.faces.align import native_crop_size

        af = align_faces(tensor, [f.face.landmarks], native_crop_size(f.face.landmarks))[0]
        aligned.append(af)
        masks.append(face_mask(af.crop)[0])
    union = photo_mask(photo.rgb.shape[:2], aligned, masks).numpy()
    changed = np.any(out != photo.rgb, axis=2)
    assert not changed[union == 0].any()  # nothing outside the faces: no square, no seam
    assert all(f.quality["changed_outside"] == 0 for f in res.faces)
    assert all(max(abs(f.quality[k]) for k in ("dL", "da", "db")) <= 0.5 for f in res.faces)
