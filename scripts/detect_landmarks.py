#!/usr/bin/env python
"""Run the project's face detector over the labelled photos of some splits and save every face found.

Output: ``{key: [{"box", "landmarks", "score"}, ...]}`` keyed by path relative to the data folder, the format
``fluxguard calibrate --landmarks``, ``benchmarks/recognition.py --landmarks`` and ``scripts/calibrate_templates.py
--landmarks`` read. Resumable: photos already in the output file are skipped.

usage: python scripts/detect_landmarks.py --out FILE [--data DIR] [--splits calib,eval]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fluxguard.data import find_faces_dir, list_photos, photos_in_split  # noqa: E402
from fluxguard.faces.detect import detect_faces  # noqa: E402
from fluxguard.recognition.calibration import read_rgb  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default=None)
    ap.add_argument("--splits", default="calib,eval")
    args = ap.parse_args()
    root = Path(args.data) if args.data else find_faces_dir()
    out = Path(args.out)
    table = json.loads(out.read_text()) if out.is_file() else {}
    photos = [p for s in args.splits.split(",") for p in photos_in_split(list_photos(root), s) if p.identity]
    for i, ph in enumerate(photos):
        key = ph.path.relative_to(root).as_posix()
        if key in table:
            continue
        table[key] = [{k: v for k, v in f.to_dict().items() if k in ("box", "landmarks", "score")}
                      for f in detect_faces(read_rgb(ph.path))]
        if i % 50 == 0:
            out.write_text(json.dumps(table))
            print(i, len(photos), key, len(table[key]), flush=True)
    out.write_text(json.dumps(table))


if __name__ == "__main__":
    main()
