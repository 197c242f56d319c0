"""The FR zoo's contract: registry, loading, crops from photos, gradients, shipped weights and their budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluxguard.data import package_faces
from fluxguard.errors import UnknownNameError
from fluxguard.recognition import FR_MODELS, available_models, load_recognizer, shipped_models
from fluxguard.recognition.sources import WEIGHTS_DIR

SHIPPED = ["dlib-resnet", "mobilefacenet", "mobileface", "faceres"]


@pytest.fixture(scope="module", autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: one thread is as fast, and robust on a shared, busy CPU
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models() -> dict:
    return {n: load_recognizer(n) for n in SHIPPED}


def test_registry_lists_shipped_models_within_budget() -> None:
    assert shipped_models() == SHIPPED
    assert set(SHIPPED) <= set(available_models())
    total = sum((WEIGHTS_DIR / FR_MODELS[n].spec.weights_file).stat().st_size for n in SHIPPED)
    assert total <= 25_000_000
    for n in FR_MODELS:
        spec = FR_MODELS[n].spec
        assert spec.name == n and len(spec.source_sha256) == 64 and spec.license
        assert len(spec.crop.template) == 5


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError, match="valid names: .*dlib-resnet.*mobilefacenet"):
        load_recognizer("arcface-r100")


def test_models_are_frozen_and_embed_unit_vectors(models: dict) -> None:
    faces = package_faces()
    for name, m in models.items():
        assert not m.training and not any(p.requires_grad for p in m.parameters())
        with torch.no_grad():
            e = torch.cat([m(f.image, f.landmarks) for f in faces])
        assert e.shape == (2, m.spec.embedding_size), name
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(2))


def test_same_person_scores_higher_than_different_person(models: dict) -> None:
    """Each face against its own mirror image (same person) and against the other person."""
    faces = package_faces(mirrored=True)  # astronaut, hopper, astronaut mirrored, hopper mirrored
    for name, m in models.items():
        with torch.no_grad():
            e = torch.cat([m(f.image, f.landmarks) for f in faces])
        sim = (e @ e.T).numpy()
        same = min(sim[0, 2], sim[1, 3])
        other = max(sim[0, 1], sim[2, 3], sim[0, 3], sim[1, 2])
        # dlib's cosines all sit high (different people ~0.9), the ArcFace-style models' near 0
        assert same > other + (0.05 if name == "dlib-resnet" else 0.3), (name, same, other)


def test_gradients_flow_from_embedding_to_photo_pixels(models: dict) -> None:
    face = package_faces()[0]
    for name, m in models.items():
        x = face.image.clone().requires_grad_(True)
        m(x, face.landmarks).sum().backward()
        g = x.grad[0].abs().sum(0)
        assert torch.isfinite(g).all() and float(g.sum()) > 0, name
        # only the face region matters: the photo's corners get no gradient
        assert float(g[:20, :20].sum()) == 0.0 and float(g[-20:, -20:].sum()) == 0.0, name


def test_crop_follows_landmarks(models: dict) -> None:
    """A shifted photo with shifted landmarks gives the same crop (the template, not the photo frame, decides).

    Not bit-identical: when the crop shrinks the face, the anti-aliasing resize sees the shift as a new phase.
    """
    face = package_faces()[1]
    shifted = torch.roll(face.image, shifts=(7, -5), dims=(2, 3))
    lm = face.landmarks + np.array([-5.0, 7.0])
    for name, m in models.items():
        a, b = m.crop(face.image, face.landmarks), m.crop(shifted, lm)
        assert float((a - b).abs().mean()) < 0.02, name


def test_batch_of_photos_with_one_landmark_set(models: dict) -> None:
    face = package_faces()[0]
    m = models["mobilefacenet"]
    with torch.no_grad():
        one = m(face.image, face.landmarks)
        two = m(torch.cat([face.image, face.image]), face.landmarks)
    torch.testing.assert_close(two, torch.cat([one, one]), atol=1e-5, rtol=0)


def test_dlib_dat_parser_matches_shipped_weights() -> None:
    frm = pytest.importorskip("face_recognition_models")
    from fluxguard.recognition.dlib_resnet import DlibResNet
    from fluxguard.recognition.sources import sha256_file

    path = frm.face_recognition_model_location()
    assert sha256_file(path) == DlibResNet.spec.source_sha256
    exact = DlibResNet.from_dat(path).freeze()
    shipped = load_recognizer("dlib-resnet")
    face = package_faces()[1]
    with torch.no_grad():
        cos = (exact(face.image, face.landmarks) * shipped(face.image, face.landmarks)).sum()
    assert float(cos) > 0.99999


def test_feature_maps_of_every_model_are_recorded_only_inside_the_block(models: dict) -> None:
    from fluxguard.losses.identity import IdentityLoss
    from fluxguard.recognition.augment import record_feature_maps

    face = package_faces()[0]
    lm = torch.as_tensor(face.landmarks, dtype=torch.float64)
    for name, m in models.items():
        with torch.no_grad(), record_feature_maps() as maps:
            emb = m(face.image, face.landmarks)
        count = len(maps)
        assert count >= 10, (name, count)  # every convolution's input, not just the last one
        assert all(t.dim() == 4 and t.shape[0] == 1 for t in maps), name
        with torch.no_grad():
            m(face.image, face.landmarks)
        assert len(maps) == count, name  # nothing recorded after the block
        loss = IdentityLoss([m], face.image, landmarks=lm)
        with torch.no_grad():
            embs, feats = loss.embeddings_and_features(face.image, lm, depth=0.5)
        torch.testing.assert_close(embs[0], emb, rtol=0, atol=0)  # recording changes nothing
        assert torch.equal(feats[0], maps[round(0.5 * (count - 1))]), name


def test_model_augmentation_thins_each_model_by_its_calibrated_rate_only_inside_the_block(models: dict) -> None:
    from fluxguard.recognition.augment import calibrate_dropout, model_augmentation

    face = package_faces()[0]
    rates = {}
    for name, m in models.items():
        with torch.no_grad():
            plain = m(face.image, face.landmarks)
            rates[name] = p = calibrate_dropout(m, face.image, face.landmarks, similarity=0.9)
            cos = []
            for seed in range(4):
                with model_augmentation(p, torch.Generator().manual_seed(seed)):
                    cos.append(float((m(face.image, face.landmarks) * plain).sum()))
            with model_augmentation(p, torch.Generator().manual_seed(0)):
                again = float((m(face.image, face.landmarks) * plain).sum())
            after = m(face.image, face.landmarks)
        torch.testing.assert_close(after, plain, rtol=0, atol=0)  # no state leaks out of the block
        assert again == cos[0], name  # same seed, same masks
        assert 0.8 < sum(cos) / len(cos) < 0.97, (name, p, cos)  # a thinned copy, still near its model
    # the point of calibrating: one rate does not fit every architecture
    assert max(rates.values()) > 3 * min(rates.values()), rates
    with pytest.raises(ValueError, match="dropout"):
        with model_augmentation(1.0, torch.Generator()):
            pass
