from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyRecognizer

from fluxguard.errors import ConfigError
from fluxguard.losses.identity import IdentityLoss
from fluxguard.methods import METHODS, Mode
from fluxguard.recognition.augment import feature_dropout


def _crops(seed: int = 0, n: int = 2, s: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 8, 8, generator=g)
    return torch.nn.functional.interpolate(base, size=(s, s), mode="bilinear").clamp(0, 1)


@pytest.mark.parametrize("plain", [True, False])
def test_pgd_budget_and_dodging(tiny_recognizers, plain: bool) -> None:
    pgd_cls = METHODS["pgd"]
    kw = {"momentum": 0.0, "diversity_prob": 0.0} if plain else {}
    # the high budget: the random stand-in models need a visible change to move (the mechanism is the point)
    m = pgd_cls(tiny_recognizers, steps=20, crop_size=64, budget="high", colour="rgb", **kw)
    x = _crops()
    ones = torch.ones_like(x[:, :1])
    res = m.protect_faces(x, masks=ones, generator=torch.Generator().manual_seed(1))
    assert res.crops.shape == x.shape
    bound = m.change_bound(x, ones)
    assert ((res.crops - x).abs() <= bound + 1e-6).all()  # the per-pixel visibility bound holds everywhere
    assert res.crops.min() >= 0 and res.crops.max() <= 1
    loss = IdentityLoss(tiny_recognizers, x)
    assert float(loss(res.crops).mean()) < float(loss(x).mean()) - 0.005


def test_pgd_eps_caps_the_change_and_mask_confines_it(tiny_recognizers) -> None:
    x = _crops()
    mask = torch.zeros_like(x[:, :1])
    mask[..., 16:48, 16:48] = 1.0
    m = METHODS["pgd"](tiny_recognizers, steps=10, crop_size=64, eps=2 / 255, budget="high")
    assert float((m.protect_faces(x, masks=mask).crops - x).abs().max()) <= 2 / 255 + 1e-6
    res = m.protect(x, masks=mask)
    d = (res.crops - x).abs()
    assert float(d[..., :16, :].max()) == 0 and float(d[..., :, 48:].max()) == 0  # nothing outside the mask
    assert float(d.max()) > 0 and all(v["scale"] <= 1 for v in res.info["visibility"])


def test_pgd_impersonation_moves_towards_target(tiny_recognizers) -> None:
    x, tgt = _crops(0, 1), _crops(5, 1)
    m = METHODS["pgd"](tiny_recognizers, mode=Mode.IMPERSONATE, steps=10, crop_size=64, budget="high")
    res = m.protect_faces(x, target=tgt)
    loss = IdentityLoss(tiny_recognizers, x, tgt)
    assert float(loss(res.crops)) < float(loss(x))


def test_pgd_deterministic_with_seed(tiny_recognizers) -> None:
    m = METHODS["pgd"](tiny_recognizers, steps=4, crop_size=64, eot=("jpeg", "resize"))
    x = _crops()
    a = m.protect_faces(x, generator=torch.Generator().manual_seed(3)).crops
    b = m.protect_faces(x, generator=torch.Generator().manual_seed(3)).crops
    assert torch.equal(a, b)


def test_pgd_rejects_bad_parameters(tiny_recognizers) -> None:
    with pytest.raises(ConfigError, match="window must be true or false"):  # "--param window=yes" is not a bool
        METHODS["pgd"](tiny_recognizers, window="yes")
    with pytest.raises(ConfigError, match="no parameter"):
        METHODS["pgd"](tiny_recognizers, epsilon=0.1)
    with pytest.raises(ConfigError, match="eot"):
        METHODS["pgd"](tiny_recognizers, eot=("blur",))
    with pytest.raises(ConfigError, match="model_dropout"):
        METHODS["pgd"](tiny_recognizers, model_dropout=1.0)
    with pytest.raises(ConfigError, match="target"):
        METHODS["pgd"](tiny_recognizers, mode="impersonate").protect_faces(_crops())


def test_impersonation_centroid_and_away_from_source(tiny_recognizers) -> None:
    x, tgt = _crops(0, 1), _crops(5, 1)
    plain = IdentityLoss(tiny_recognizers, x, tgt)
    views = IdentityLoss(tiny_recognizers, x, tgt, target_views=6)
    for a, b in zip(plain.refs, views.refs, strict=True):
        assert torch.allclose(b.norm(dim=-1), torch.ones(1), atol=1e-5)  # a unit centroid
        assert float((a * b).sum()) > 0.5 and not torch.allclose(a, b)  # near the photo's embedding, not it
    away = IdentityLoss(tiny_recognizers, x, tgt, source_weight=0.5)
    cos_src = torch.stack([(e * s).sum(-1) for e, s in zip(away.embeddings(x), away.sources, strict=True)])
    assert torch.allclose(away.per_model(x), plain.per_model(x) + 0.5 * cos_src, atol=1e-6)
    res = METHODS["pgd"](tiny_recognizers, mode=Mode.IMPERSONATE, steps=10, crop_size=64, target_views=4,
                         source_weight=0.5).protect_faces(x, target=tgt)
    assert float(views(res.crops)) < float(views(x))


def test_pgd_transfer_augmentations_keep_the_budget_and_the_seed(tiny_recognizers) -> None:
    m = METHODS["pgd"](tiny_recognizers, steps=10, crop_size=64, budget="high", colour="rgb", spectrum_rho=0.5,
                       model_dropout=0.3)
    x = _crops()
    ones = torch.ones_like(x[:, :1])
    a = m.protect_faces(x, masks=ones, generator=torch.Generator().manual_seed(2)).crops
    b = m.protect_faces(x, masks=ones, generator=torch.Generator().manual_seed(2)).crops
    assert torch.equal(a, b)
    assert ((a - x).abs() <= m.change_bound(x, ones) + 1e-6).all()
    loss = IdentityLoss(tiny_recognizers, x)
    assert float(loss(a).mean()) < float(loss(x).mean())
    with pytest.raises(ConfigError, match="spectrum_rho"):
        METHODS["pgd"](tiny_recognizers, spectrum_rho=1.0)


def test_pgd_margin_weighting_favours_the_narrow_model(tiny_recognizers, monkeypatch) -> None:
    import fluxguard.methods.pgd as pgd_module

    narrow = tiny_recognizers[0]
    # the first model decides on a narrow margin (threshold 0.95), the others on a wide one (0.3)
    monkeypatch.setattr(pgd_module, "_threshold", lambda r: 0.95 if r is narrow else 0.3)
    x = _crops()
    ones = torch.ones_like(x[:, :1])
    kw = {"steps": 10, "crop_size": 64, "budget": "high", "diversity_prob": 0.0}
    mean = METHODS["pgd"](tiny_recognizers, **kw).protect_faces(x, masks=ones).crops
    margin_pgd = METHODS["pgd"](tiny_recognizers, model_weighting="margin", **kw)
    margin = margin_pgd.protect_faces(x, masks=ones).crops
    assert ((margin - x).abs() <= margin_pgd.change_bound(x, ones) + 1e-6).all()
    loss = IdentityLoss(tiny_recognizers, x)
    # the narrow model's cosine to the source falls further when each term is divided by its margin
    assert float(loss.per_model(margin)[0].mean()) < float(loss.per_model(mean)[0].mean())
    with pytest.raises(ConfigError, match="model_weighting"):
        METHODS["pgd"](tiny_recognizers, model_weighting="max")



class TappedTiny(TinyRecognizer):
    """The tiny recognizer with its convolutions reporting the feature maps they read, as the zoo's models do."""

    def embed_crop(self, crop: torch.Tensor) -> torch.Tensor:
        conv1, relu1, conv2, relu2, *head = self.net
        h = feature_dropout(relu1(conv1(crop * 2 - 1)))
        h = feature_dropout(relu2(conv2(h)))
        for layer in head:
            h = layer(h)
        return h


def test_pgd_feature_level_loss_moves_the_middle_layer() -> None:
    models = [TappedTiny(0), TappedTiny(1)]
    x = _crops()
    ones = torch.ones_like(x[:, :1])
    kw = {"steps": 10, "crop_size": 64, "budget": "high", "diversity_prob": 0.0}
    plain = METHODS["pgd"](models, **kw).protect_faces(x, masks=ones).crops
    feat_pgd = METHODS["pgd"](models, feature_weight=4.0, feature_depth=0.0, **kw)
    feat = feat_pgd.protect_faces(x, masks=ones).crops
    assert ((feat - x).abs() <= feat_pgd.change_bound(x, ones) + 1e-6).all()
    loss = IdentityLoss(models, x)
    with torch.no_grad():
        _, clean = loss.embeddings_and_features(x, None, 0.0)

    def layer_cos(y: torch.Tensor) -> float:
        with torch.no_grad():
            _, f = loss.embeddings_and_features(y, None, 0.0)
        pairs = zip(f, clean, strict=True)
        return sum(float(F.cosine_similarity(a.flatten(1), b.flatten(1)).mean()) for a, b in pairs)

    # the feature term pushes the first tapped layer further from the clean face's; the embedding still moves
    assert layer_cos(feat) < layer_cos(plain)
    assert float(loss(feat).mean()) < float(loss(x).mean())
    with pytest.raises(ConfigError, match="feature_weight"):
        METHODS["pgd"](models, feature_weight=-1.0)
    with pytest.raises(ConfigError, match="feature_depth"):
        METHODS["pgd"](models, feature_depth=1.5)
    with pytest.raises(ValueError, match="no feature maps"):  # a model the attack cannot read inside
        METHODS["pgd"]([TinyRecognizer(3)], feature_weight=1.0, **kw).protect_faces(x, masks=ones)


def test_pgd_variance_tuning_keeps_the_budget_and_the_seed(tiny_recognizers) -> None:
    m = METHODS["pgd"](tiny_recognizers, steps=4, crop_size=64, budget="high", variance_samples=3)
    x = _crops()
    ones = torch.ones_like(x[:, :1])
    a = m.protect_faces(x, masks=ones, generator=torch.Generator().manual_seed(2)).crops
    b = m.protect_faces(x, masks=ones, generator=torch.Generator().manual_seed(2)).crops
    plain = METHODS["pgd"](tiny_recognizers, steps=4, crop_size=64, budget="high").protect_faces(
        x, masks=ones, generator=torch.Generator().manual_seed(2)).crops
    assert torch.equal(a, b) and not torch.equal(a, plain)  # the neighbourhood changes the path, deterministically
    assert ((a - x).abs() <= m.change_bound(x, ones) + 1e-6).all()
    loss = IdentityLoss(tiny_recognizers, x)
    assert float(loss(a).mean()) < float(loss(x).mean())
    with pytest.raises(ConfigError, match="variance_samples"):
        METHODS["pgd"](tiny_recognizers, variance_samples=-1)
    with pytest.raises(ConfigError, match="variance_radius"):
        METHODS["pgd"](tiny_recognizers, variance_radius=0.0)
