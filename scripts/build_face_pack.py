"""Build the face packs the lite models train and are measured on: aligned portrait crops as uint8 .npy.

Every photo of a split (``fluxguard.data.photos_in_split``; unlabeled portraits belong to ``train``) goes through
the MTCNN detector (``fluxguard.faces.detect.detect_cached``, cached under the pack folder), and every face
that passes the filters below is aligned to the generator crop (``portrait_template(size)``, the ArcFace box
widened 2x) with ``fluxguard.faces.align.align_faces``, exactly as ``protect`` cuts it. Crops are written as
``<out>/pack<size>_<split>.npy`` ((N, S, S, 3) uint8 RGB) and a list ``<out>/pack<size>_<split>.tsv``: photo path
relative to the faces folder, SHA-1 of the file, face index, score, eye distance (px in the photo), coverage (the
share of the crop that lies inside the photo; the rest repeats the border, as ``align_faces`` does).

Filters: score >= 0.95, eye distance >= 20 px in the photo (at most ~2x upsampling into a 256 px crop), coverage
>= 0.2 (pre-aligned 112 px ArcFace crops, e.g. the Glint360K ones, cover only ~25 %).

The training list is also committed (``--list-out``) so the pack can be rebuilt and checked:

    python scripts/build_face_pack.py --split train --size 256 \
        --list-out src/fluxguard/weights/lite/training_faces.tsv
    python scripts/build_face_pack.py --split eval --size 256
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import torch

from fluxguard.data import find_faces_dir, list_photos, photos_in_split
from fluxguard.faces.align import align_faces, estimate_similarity, portrait_template, warp_affine
from fluxguard.faces.detect import detect_cached, load_rgb

MIN_SCORE = 0.95
MIN_EYE_DISTANCE = 20.0
MIN_COVERAGE = 0.2


def sha1_of(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def coverage(shape: tuple[int, int], landmarks: np.ndarray, size: int) -> float:
    """Share of the ``size`` px portrait crop whose source pixels lie inside a photo of ``shape`` (H, W)."""
    h, w = shape
    m = estimate_similarity(landmarks, portrait_template(size))
    ones = torch.ones(1, 1, h, w)
    inside = warp_affine(ones, m[None], (size, size), padding_mode="zeros", antialias=False)
    return float((inside > 0.5).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=("train", "eval", "calib"), required=True)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--out", default="/work/cache/lite")
    ap.add_argument("--faces", default=None, help="faces folder (default: fluxguard.data.find_faces_dir())")
    ap.add_argument("--list-out", default=None, help="also copy the TSV list here (to commit it)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    root = Path(args.faces) if args.faces else find_faces_dir()
    if root is None:
        sys.exit("faces folder not found: set FLUXGUARD_DATA")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    photos = sorted(photos_in_split(list_photos(root), args.split), key=lambda p: str(p.path))
    crops: list[np.ndarray] = []
    rows: list[str] = []
    skipped = {"no face": 0, "score": 0, "small": 0, "coverage": 0, "unreadable": 0}
    for k, ph in enumerate(photos):
        try:
            rgb = load_rgb(ph.path)
        except Exception:  # noqa: BLE001 - a bad file is counted and skipped, the pack is still useful
            skipped["unreadable"] += 1
            continue
        faces = detect_cached(ph.path, image=rgb, cache_dir=out / "detections")
        if not faces:
            skipped["no face"] += 1
        photo_t = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
        rel = ph.path.relative_to(root).as_posix()
        digest = sha1_of(ph.path)
        for i, f in enumerate(faces):
            if f.score < MIN_SCORE:
                skipped["score"] += 1
                continue
            if f.eye_distance < MIN_EYE_DISTANCE:
                skipped["small"] += 1
                continue
            cov = coverage(rgb.shape[:2], f.landmarks, args.size)
            if cov < MIN_COVERAGE:
                skipped["coverage"] += 1
                continue
            crop = align_faces(photo_t, f.landmarks, args.size)[0].crop
            crops.append((crop.permute(1, 2, 0).numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8))
            rows.append(f"{rel}\t{digest}\t{i}\t{f.score:.4f}\t{f.eye_distance:.1f}\t{cov:.3f}")
        if (k + 1) % 50 == 0:
            print(f"{k + 1}/{len(photos)} photos, {len(crops)} crops, skipped {skipped}", flush=True)
    name = f"pack{args.size}_{args.split}"
    np.save(out / f"{name}.npy", np.stack(crops))
    header = "path\tsha1\tface\tscore\teye_distance\tcoverage"
    text = header + "\n" + "\n".join(rows) + "\n"
    (out / f"{name}.tsv").write_text(text)
    if args.list_out:
        Path(args.list_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.list_out).write_text(text)
    print(f"{name}: {len(crops)} crops from {len(photos)} photos; skipped {skipped}")


if __name__ == "__main__":
    main()
