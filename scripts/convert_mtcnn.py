"""Convert the MTCNN weights (P-Net, R-Net, O-Net) of the facenet-pytorch wheel to one safetensors file.

The wheel (PyPI ``facenet-pytorch==2.6.0``, MIT, Copyright (c) 2019 Timothy Esler) ships ``data/{p,r,o}net.pt``
state dicts. Nothing from it is installed or imported: the three files are read from the wheel's zip and loaded
with ``weights_only=True``. Keys become ``pnet.conv1.weight`` etc., which is what ``fluxguard.faces.mtcnn`` loads.

    pip download --no-deps facenet-pytorch==2.6.0 -d /tmp/wheels
    python scripts/convert_mtcnn.py /tmp/wheels/facenet_pytorch-2.6.0-py3-none-any.whl [--fp16]

fp32 is the default: the file is only 2 MB and fp16 changes detections (see ``--check`` output and the report in
LICENSES.md); ``--fp16`` is kept to reproduce that measurement.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[1] / "src" / "fluxguard" / "weights" / "mtcnn.safetensors"


def convert(wheel: Path, out: Path, fp16: bool = False) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    with zipfile.ZipFile(wheel) as zf:
        for net in ("pnet", "rnet", "onet"):
            raw = zf.read(f"facenet_pytorch/data/{net}.pt")
            state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
            for key, value in state.items():
                t = value.detach().contiguous()
                tensors[f"{net}.{key}"] = t.half() if fp16 else t.float()
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    meta = {
        "source": "PyPI facenet-pytorch==2.6.0 (facenet_pytorch/data/{pnet,rnet,onet}.pt)",
        "source_sha256": sha,
        "license": "MIT (Copyright (c) 2019 Timothy Esler)",
        "dtype": "float16" if fp16 else "float32",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=meta)
    return tensors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("wheel", type=Path, help="facenet_pytorch-2.6.0-py3-none-any.whl")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--fp16", action="store_true", help="store float16 (default float32)")
    args = ap.parse_args()
    tensors = convert(args.wheel, args.out, args.fp16)
    n = sum(t.numel() for t in tensors.values())
    print(f"wrote {args.out} ({len(tensors)} tensors, {n} parameters, {args.out.stat().st_size / 1e6:.2f} MB)")
    print(f"sha256 {hashlib.sha256(args.out.read_bytes()).hexdigest()}")


if __name__ == "__main__":
    main()
