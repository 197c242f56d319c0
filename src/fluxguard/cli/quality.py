"""``fluxguard quality``: how much did protection change the photo, as people see it? Per face: CIEDE2000 (mean and
95th percentile over the face mask), colour shift (dL*, da*, db*), the share of the face whose change exceeds its
JND, SSIM/PSNR on the mask and PSNR outside the faces; for the whole photo PSNR, SSIM, MS-SSIM, and LPIPS / FID from
weights the user points to."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from fluxguard.cli._app import app
from fluxguard.cli._common import console, friendly_errors, print_json
from fluxguard.errors import ConfigError
from fluxguard.io import READ_EXTENSIONS


def pair_files(original: Path, protected: Path, suffix: str) -> list[tuple[Path, Path]]:
    """(original, protected) pairs: two files, or two folders matched by name (``me.jpg`` ~ ``me<suffix>.*``)."""
    if original.is_file() and protected.is_file():
        return [(original, protected)]
    if not (original.is_dir() and protected.is_dir()):
        raise ConfigError("give two image files or two folders", path=original if not original.exists() else protected)
    by_stem = {p.stem: p for p in sorted(original.iterdir()) if p.suffix.lower() in READ_EXTENSIONS}
    pairs = []
    for p in sorted(protected.iterdir()):
        stem = p.stem.removesuffix(suffix) if suffix else p.stem
        if p.suffix.lower() in READ_EXTENSIONS and stem in by_stem:
            pairs.append((by_stem[stem], p))
    if not pairs:
        raise ConfigError(f"no protected image in the folder matches an original by name (suffix {suffix!r})",
                          path=protected)
    return pairs


@app.command()
@friendly_errors
def quality(
    original: Path = typer.Argument(..., help="Original photo, or a folder of them."),
    protected: Path = typer.Argument(..., help="Protected photo, or a folder (names: original stem + --suffix)."),
    suffix: str = typer.Option("_protected", "--suffix", help="Suffix of protected names in folder mode."),
    lpips: str | None = typer.Option(None, "--lpips", metavar="VGG16,LINEAR",
                                     help="LPIPS (VGG): torchvision VGG16 state dict and the lpips package's "
                                          "weights/v0.1/vgg.pth, comma-separated."),
    fid: Path | None = typer.Option(None, "--fid", metavar="INCEPTION",
                                    help="FID over the two sets: TorchScript inception-2015-12-05.pt."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Image quality of protected photos against their originals (whole photo, same size).

    Example: fluxguard quality photos/ protected/ --lpips vgg16-397923af.pth,vgg.pth
    """
    import numpy as np
    import torch

    from fluxguard.eval.quality import faces_quality, quality_report
    from fluxguard.io import load_image

    pairs = pair_files(original, protected, suffix)
    lp = None
    if lpips is not None:
        from fluxguard.eval.learned_metrics import LPIPS

        parts = [p.strip() for p in lpips.split(",")]
        if len(parts) != 2:
            raise ConfigError("--lpips takes two files: VGG16 weights,LPIPS linear weights")
        lp = LPIPS(*parts)
    rows, originals, outputs = [], [], []
    for a, b in pairs:
        ia, ib = load_image(a).rgb, load_image(b).rgb
        if ia.shape != ib.shape:
            raise ConfigError(f"sizes differ: {ia.shape[:2]} vs {ib.shape[:2]}", path=b)
        row = {"original": str(a), "protected": str(b), **quality_report(ia, ib), "faces": faces_quality(ia, ib)}
        if lp is not None:
            ta, tb = (torch.tensor(np.asarray(x)).permute(2, 0, 1)[None].float() / 255 for x in (ia, ib))
            with torch.no_grad():
                row["lpips"] = float(lp(ta, tb)[0])
        rows.append(row)
        originals.append(ia)
        outputs.append(ib)
    result: dict = {"pairs": rows}
    if fid is not None:
        from fluxguard.eval.learned_metrics import InceptionFID

        result["fid"] = InceptionFID(fid)(originals, outputs)
    if json_out:
        print_json(result)
        return
    from rich.table import Table

    cols = ["psnr", "ssim", "ms_ssim"] + (["lpips"] if lp is not None else [])
    table = Table(title="whole photo")
    for col in ("original", "protected", *cols):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(escape(Path(r["original"]).name), escape(Path(r["protected"]).name),
                      *["–" if r.get(c) is None else f"{r[c]:.4f}" for c in cols])
    console.print(table)
    faces = Table(title="per face, over its mask (as people see it)")
    faces.add_column("protected", overflow="fold")
    for col in ("face", "dE2000 mean", "p95", "dL*/da*/db*", "visible", "mask SSIM", "outside faces"):
        faces.add_column(col, overflow="fold")
    for r in rows:
        for i, f in enumerate(r["faces"]):
            if f["delta_e_mean"] is None:
                continue
            outside = "bit-exact" if f["changed_outside"] == 0 else f"{f['changed_outside']} px changed"
            faces.add_row(Path(r["protected"]).name, str(i + 1), f"{f['delta_e_mean']:.2f}",
                          f"{f['delta_e_p95']:.2f}", f"{f['dL']:+.2f}/{f['da']:+.2f}/{f['db']:+.2f}",
                          f"{100 * f['visible']:.1f} %", f"{f['ssim_mask']:.4f}", outside)
    console.print(faces)
    if "fid" in result:
        console.print(f"FID over {len(rows)} pairs: {result['fid']:.3f}")
    if lp is None and fid is None:
        console.print("LPIPS / FID: pass --lpips VGG16,LINEAR and/or --fid INCEPTION (weights cannot be downloaded "
                      "by fluxguard).")
