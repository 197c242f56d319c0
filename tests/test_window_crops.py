"""Window crops: a method that takes them (pgd with ``window=True``) attacks a plain window of the photo, so what it
optimised is what lands in the photo, with no resampling on the way in or back."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fluxguard.faces.align import (
    ARCFACE_112,
    align_faces,
    move_to,
    paste_back,
    photo_mask,
    portrait_side,
    window_face,
    window_size,
)
from fluxguard.methods.base import ProtectionMethod

MODELS = ["mobilefacenet", "mobileface"]


def _tilted_landmarks(centre: tuple[float, float], iod: float, degrees: float) -> np.ndarray:
    """ArcFace's 5 points scaled to an inter-ocular distance of ``iod`` px, turned by ``degrees``, at ``centre``."""
    tpl = ARCFACE_112 - ARCFACE_112.mean(0)
    a = math.radians(degrees)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    scale = iod / float(np.linalg.norm(ARCFACE_112[1] - ARCFACE_112[0]))
    return tpl @ (rot * scale).T + np.asarray(centre)


def test_window_is_the_photo_and_pastes_back_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    photo = torch.rand(3, 300, 340, generator=g)
    lm = _tilted_landmarks((170.3, 151.7), 30.0, 12.0)
    size = window_size(lm)
    assert size is not None and size % 16 == 0 and size >= portrait_side(lm)
    win = window_face(photo, lm, size)
    x0, y0 = (-int(v) for v in win.matrix[:, 2])
    assert torch.allclose(win.crop, photo[:, y0 : y0 + size, x0 : x0 + size], atol=1e-6)
    np.testing.assert_allclose(win.crop_landmarks, lm - [x0, y0], atol=1e-9)
    # a change made on the window is the change in the photo, pixel for pixel
    mask = torch.zeros(1, size, size)
    mask[:, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    delta = (torch.rand(3, size, size, generator=g) - 0.5) * 0.02 * mask
    out = paste_back(photo, [win], [(win.crop + delta).clamp(0, 1)], [mask])
    moved = out - photo
    expected = torch.zeros_like(photo)
    expected[:, y0 : y0 + size, x0 : x0 + size] = (win.crop + delta).clamp(0, 1) - win.crop
    assert float((moved - expected).abs().max()) < 1e-5
    # the aligned crop of the same tilted face resamples the change twice: it does not arrive intact
    af = align_faces(photo, [lm], size)[0]
    back = paste_back(photo, [af], [(af.crop + delta).clamp(0, 1)], [mask]) - photo
    assert float(back.abs().sum()) < 0.9 * float(delta.abs().sum())


def test_window_size_rounds_up_and_refuses_a_face_too_big() -> None:
    lm = _tilted_landmarks((500, 500), 30.0, 0.0)
    assert window_size(lm) == 16 * math.ceil(portrait_side(lm) / 16)
    assert window_size(_tilted_landmarks((500, 500), 4.0, 0.0)) == 128  # small faces get the smallest window
    assert window_size(_tilted_landmarks((900, 900), 200.0, 0.0)) is None


def test_a_mask_moved_into_the_window_is_the_same_mask_in_the_photo() -> None:
    photo = torch.rand(3, 280, 300, generator=torch.Generator().manual_seed(1))
    lm = _tilted_landmarks((150.4, 140.2), 28.0, -15.0)
    size = window_size(lm)
    af = align_faces(photo, [lm], size)[0]
    mask = torch.zeros(1, size, size)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    mask[0] = (((xx - size / 2) ** 2 + (yy - size / 2) ** 2) < (size / 4) ** 2).float()
    win = window_face(photo, lm, size)
    moved = move_to(mask, af, win).clamp(0, 1)
    a = photo_mask(photo.shape[-2:], [af], [mask])
    b = photo_mask(photo.shape[-2:], [win], [moved])
    assert float((a - b).abs().max()) < 1e-4


def test_pgd_in_a_window_lands_in_the_photo_unresampled(astronaut: np.ndarray, monkeypatch) -> None:
    """What the attack saw is what the FR models see in the saved photo: the attacked models' similarity on the
    photo equals the one on the protected window, and the natural-by-construction invariants hold."""
    from fluxguard.api import Protector, recognizers, to_tensor

    seen: dict = {}
    protect = ProtectionMethod.protect

    def spy(self, crops, **kw):  # noqa: ANN001, ANN202
        res = protect(self, crops, **kw)
        seen.update(crops=crops.clone(), out=res.crops.detach().clone(), landmarks=kw.get("landmarks"))
        return res

    monkeypatch.setattr(ProtectionMethod, "protect", spy)
    res = Protector("pgd", fr_models=MODELS, judges=[], steps=3, window=True).protect(astronaut, seed=0)
    lm = res.faces[0].face.landmarks
    assert seen["landmarks"] is not None  # the method got a window and the face's points in it
    assert seen["crops"].shape[-1] == window_size(lm)
    q = res.faces[0].quality
    assert q["changed_outside"] == 0 and max(abs(q[k]) for k in ("dL", "da", "db")) <= 0.5
    assert q["delta_e_mean"] > 0
    for model in recognizers(MODELS):
        with torch.no_grad():
            clean = model(to_tensor(astronaut)[None], lm[None])[0]
            on_window = float(model(seen["out"], seen["landmarks"])[0] @ clean)
            on_photo = float(model(to_tensor(res.image)[None], lm[None])[0] @ clean)
        assert on_window < 0.999
        assert on_photo == pytest.approx(on_window, abs=2e-3)
