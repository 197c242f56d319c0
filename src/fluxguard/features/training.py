"""Training of the AdvFace decoders (template -> aligned face): the shipped shadow decoders and the evaluation
attackers, which are trained where the evaluation runs (``fluxguard features evaluate`` when one is missing).

Data: the ``train`` split of a folder laid out like ``../shared/faces`` (identities hashed by
:func:`fluxguard.data.split_of`, plus the unlabeled portraits), cut into a *shadow* half and an *attacker* half with
disjoint identities (:func:`fluxguard.features.faceset.half_of`). The ``eval`` split is never used here.

Steps (each writes into ``--cache``, default ``$FLUXGUARD_CACHE/advface`` or ``~/.cache/fluxguard/advface``)::

    python scripts/train_advface.py prepare --data ../shared/faces       # detect, portrait crops (train split)
    python scripts/train_advface.py embed --models dlib-resnet,mobileface  # augmented templates + 64 px targets
    python scripts/train_advface.py train --role shadow --model mobileface --steps 300     # about 3 min on 1 core
    python scripts/train_advface.py train --role attacker --model mobileface --steps 300   # about 3 min on 1 core
    python scripts/train_advface.py export --role shadow --model mobileface  # fp16 -> src/fluxguard/weights/advface
    python scripts/train_advface.py export --role attacker --model mobileface  # -> <cache>/advface/attackers

:func:`train_attacker` runs the attacker's steps in one call. The decoders are CPU-sized (0.5 M / 1.3 M parameters,
64 px output, a few hundred steps of batch 64): they show the effect, not the strength of a GPU-trained attacker.

Training runs in the foreground and logs to stderr; for long runs use ``nohup ... > train.log 2>&1 &``.
Checkpoints (``last.pt``, every ``--ckpt-every`` steps) let an interrupted run resume with ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fluxguard.errors import FluxguardError

log = logging.getLogger(__name__)

AUGMENTATIONS = 8  # per photo: [clean, 3 jittered] x [as is, mirrored]


def default_cache() -> Path:
    from fluxguard.recognition.sources import cache_dir

    return cache_dir() / "advface"


# --- prepare ----------------------------------------------------------------------------------------------------


def cmd_prepare(args: argparse.Namespace) -> None:
    from fluxguard.data import find_faces_dir
    from fluxguard.faces.detect import load_rgb
    from fluxguard.features.faceset import collect, detector_landmarks, half_of, portrait_crop

    root = Path(args.data) if args.data else find_faces_dir()
    if root is None:
        raise FluxguardError("no data folder: pass --data or set FLUXGUARD_DATA")
    find = detector_landmarks(Path(args.detections) if args.detections else None)
    for split in args.splits.split(","):
        t0 = time.perf_counter()
        items = collect(root, split, find)
        crops, lms = [], []
        for it in items:
            c, lm = portrait_crop(load_rgb(it.path), it.landmarks)
            crops.append(c)
            lms.append(lm)
        out = args.cache / f"faces_{split}.npz"
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out.with_suffix(".tmp.npz"), crops=np.stack(crops), landmarks=np.stack(lms).astype(np.float32),
                 keys=np.array([it.key for it in items]), identities=np.array([it.identity or "" for it in items]),
                 sources=np.array([it.source for it in items]),
                 halves=np.array([half_of(it.group) if split == "train" else "" for it in items]))
        out.with_suffix(".tmp.npz").replace(out)
        log.info("%s: %d faces -> %s (%.0f s)", split, len(items), out, time.perf_counter() - t0)


# --- embed ------------------------------------------------------------------------------------------------------


def augmented_views(crops: np.ndarray, lms: np.ndarray, k: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """View ``k`` of every face: (crops, landmarks the FR model is given, true landmarks for the target)."""
    from fluxguard.features.faceset import flip, jitter_landmarks, photometric

    half = AUGMENTATIONS // 2
    x, lm = (flip(crops, lms) if k >= half else (crops, lms))
    if k % half == 0:
        return x, lm, lm
    rng = np.random.default_rng([seed, k])
    return photometric(x, rng), jitter_landmarks(lm, rng), lm


def cmd_embed(args: argparse.Namespace) -> None:
    from fluxguard.features.faceset import embed, recon_target, to_tensor
    from fluxguard.recognition import load_recognizer

    torch.set_num_threads(args.threads)
    data = np.load(args.cache / "faces_train.npz")
    crops, lms = data["crops"], data["landmarks"].astype(np.float64)
    targets_path = args.cache / "targets_train.npy"
    if not targets_path.is_file():
        targets = np.empty((len(crops), AUGMENTATIONS, 64, 64, 3), np.uint8)
        for k in range(AUGMENTATIONS):
            x, _, lm_true = augmented_views(crops, lms, k, args.seed)
            for i in range(0, len(x), 64):
                t = recon_target(to_tensor(x[i:i + 64]), lm_true[i:i + 64])
                targets[i:i + 64, k] = (t.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)
        np.save(args.cache / "targets_train.tmp.npy", targets)
        (args.cache / "targets_train.tmp.npy").replace(targets_path)
        log.info("targets: %s", targets.shape)
    for name in args.models.split(","):
        out = args.cache / f"templates_train_{name}.npy"
        if out.is_file() and not args.force:
            log.info("%s: exists", out)
            continue
        model = load_recognizer(name)
        t0 = time.perf_counter()
        tpl = np.empty((len(crops), AUGMENTATIONS, model.spec.embedding_size), np.float32)
        for k in range(AUGMENTATIONS):
            x, lm_in, _ = augmented_views(crops, lms, k, args.seed)
            tpl[:, k] = embed(model, x, lm_in)
            log.info("%s view %d/%d (%.0f s)", name, k + 1, AUGMENTATIONS, time.perf_counter() - t0)
        np.save(out.with_suffix(".tmp.npy"), tpl)
        out.with_suffix(".tmp.npy").replace(out)


# --- train ------------------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> None:
    from fluxguard.features.decoders import build_decoder, reconstruction_loss

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = np.load(args.cache / "faces_train.npz")
    halves = data["halves"]
    tpl_all = np.load(args.cache / f"templates_train_{args.model}.npy")
    tgt_all = np.load(args.cache / "targets_train.npy", mmap_mode="r")
    sel = np.flatnonzero(halves == args.role)
    # a few identities of the half are held out to watch over-fitting (never used for the shipped numbers)
    groups = np.array([i or f"portrait:{k}" for i, k in zip(data["identities"], data["keys"], strict=True)])[sel]
    ug = np.unique(groups)
    rng = np.random.default_rng(args.seed)
    val_groups = set(rng.choice(ug, size=max(1, int(0.08 * len(ug))), replace=False))
    is_val = np.array([g in val_groups for g in groups])
    tr, va = sel[~is_val], sel[is_val]
    x_tr = torch.from_numpy(tpl_all[tr].reshape(-1, tpl_all.shape[-1]))
    y_tr = torch.from_numpy(np.ascontiguousarray(tgt_all[tr]).reshape(-1, 64, 64, 3)).permute(0, 3, 1, 2).contiguous()
    views = [0, AUGMENTATIONS // 2]  # clean and mirrored
    x_va = torch.from_numpy(tpl_all[va][:, views].reshape(-1, tpl_all.shape[-1]))
    y_va = torch.from_numpy(np.ascontiguousarray(tgt_all[va][:, views]).reshape(-1, 64, 64, 3)).permute(0, 3, 1, 2)
    y_va = y_va.float() / 255.0
    log.info("%s/%s: %d train samples (%d faces), %d validation faces", args.role, args.model, len(x_tr), len(tr),
             len(va))

    arch = "shadow" if args.role == "shadow" else "attacker"
    net = build_decoder(arch, tpl_all.shape[-1])
    log.info("%s decoder: %d parameters", arch, sum(p.numel() for p in net.parameters()))
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.wd)
    run = args.cache / "runs" / f"{args.role}-{args.model}{args.tag}"
    run.mkdir(parents=True, exist_ok=True)
    step, spent = 0, 0.0
    if args.resume and (run / "last.pt").is_file():
        ck = torch.load(run / "last.pt", weights_only=False)
        net.load_state_dict(ck["net"])
        opt.load_state_dict(ck["opt"])
        step, spent = ck["step"], ck["spent"]
        torch.set_rng_state(ck["rng"])
        log.info("resumed at step %d (%.0f s)", step, spent)
    budget = args.minutes * 60.0
    gen = torch.Generator().manual_seed(args.seed + step)
    best = float("inf")
    t_start = time.perf_counter() - spent
    # cosine learning-rate decay over --steps; --minutes only caps the run. With a few hundred faces per half the
    # decoders over-fit after about 6 epochs, so the shipped weights are the best validation checkpoint (best.pt).
    while step < args.steps:
        if time.perf_counter() - t_start >= budget:
            log.info("time budget reached")
            break
        lr = args.lr * (0.02 + 0.98 * 0.5 * (1 + np.cos(np.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(len(x_tr), (args.batch,), generator=gen)
        z = x_tr[idx]
        if args.template_noise > 0:
            # small isotropic noise on the unit templates: a smoother inverse, and robustness to template noise
            z = torch.nn.functional.normalize(z + args.template_noise * torch.randn(z.shape, generator=gen)
                                              / z.shape[-1] ** 0.5, dim=-1)
        y = y_tr[idx].float() / 255.0
        net.train()
        loss, parts = reconstruction_loss(net(z), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % args.log_every == 0:
            net.eval()
            with torch.no_grad():
                vl, vparts = reconstruction_loss(net(x_va), y_va)
            log.info("step %d  %.0fs  lr %.2e  train %.4f %s  val %.4f %s", step, time.perf_counter() - t_start, lr,
                     loss.item(), _fmt(parts), vl.item(), _fmt(vparts))
            if vl.item() < best:
                best = vl.item()
                torch.save({"net": net.state_dict(), "arch": arch, "dim": tpl_all.shape[-1], "step": step,
                            "val": best, "model": args.model}, run / "best.pt")
        if step % args.ckpt_every == 0:
            _save_last(run, net, opt, step, time.perf_counter() - t_start)
    _save_last(run, net, opt, step, time.perf_counter() - t_start)
    torch.save({"net": net.state_dict(), "arch": arch, "dim": tpl_all.shape[-1], "step": step, "model": args.model},
               run / "final.pt")
    (run / "summary.json").write_text(json.dumps({"role": args.role, "model": args.model, "steps": step,
                                                  "seconds": round(time.perf_counter() - t_start, 1),
                                                  "best_val": best, "batch": args.batch, "lr": args.lr,
                                                  "train_samples": len(x_tr), "threads": args.threads}, indent=1))
    log.info("done: %d steps, best val %.4f", step, best)


def _fmt(parts: dict[str, torch.Tensor]) -> str:
    return " ".join(f"{k} {v.item():.4f}" for k, v in parts.items())


def _save_last(run: Path, net: torch.nn.Module, opt: torch.optim.Optimizer, step: int, spent: float) -> None:
    tmp = run / "last.tmp"
    torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "step": step, "spent": spent,
                "rng": torch.get_rng_state()}, tmp)
    tmp.replace(run / "last.pt")


# --- export -----------------------------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> None:
    from fluxguard.features.decoders import attackers_dir, build_decoder, save_decoder
    from fluxguard.recognition import FR_MODELS

    run = args.cache / "runs" / f"{args.role}-{args.model}{args.tag}"
    ck = torch.load(run / args.checkpoint, weights_only=False)
    net = build_decoder(ck["arch"], ck["dim"])
    net.load_state_dict(ck["net"])
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    # shadows ship with the package; attackers are for evaluation only and go to the cache
    # (fluxguard.features.decoders.attackers_dir), unless --out says otherwise
    if args.out is not None:
        dest = Path(args.out)
    elif args.role == "attacker":
        dest = attackers_dir() / f"attacker-{args.model}.safetensors"
    else:
        dest = None
    out = save_decoder(net, FR_MODELS[args.model], role=args.role, path=dest,
                       extra={"steps": str(ck["step"]), "train_seconds": str(summary.get("seconds", "")),
                              "data": "train split of ../shared/faces, " + args.role + " half"})
    log.info("wrote %s (%.2f MB)", out, out.stat().st_size / 1e6)
    _fp16_parity(net, out, args)


def _fp16_parity(net: torch.nn.Module, path: Path, args: argparse.Namespace) -> None:
    """The fp16 file against the fp32 checkpoint on the clean templates of the role's own half (pixels in [0, 1])."""
    from fluxguard.features.decoders import load_decoder, ssim

    halves = np.load(args.cache / "faces_train.npz")["halves"]
    tpl = np.load(args.cache / f"templates_train_{args.model}.npy", mmap_mode="r")
    z = torch.from_numpy(np.ascontiguousarray(tpl[np.flatnonzero(halves == args.role)[:256], 0]))
    half, _ = load_decoder(path)
    net.eval()
    with torch.no_grad():
        a, b = net(z), half(z)
    diff = (a - b).abs()
    log.info("fp16 parity on %d templates: max |diff| %.2e (%.2f/255), mean %.2e, SSIM(fp32, fp16) min %.5f",
             len(z), diff.max(), diff.max() * 255, diff.mean(), ssim(a, b).min())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=default_cache())
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("prepare")
    s.add_argument("--data")
    s.add_argument("--detections", help="detection cache folder (default: the detector's)")
    s.add_argument("--splits", default="train")
    s = sub.add_parser("embed")
    s.add_argument("--models", default="dlib-resnet,mobilefacenet,mobileface,faceres")
    s.add_argument("--force", action="store_true")
    s = sub.add_parser("train")
    s.add_argument("--role", choices=["shadow", "attacker"], required=True)
    s.add_argument("--model", required=True)
    s.add_argument("--steps", type=int, default=500)
    s.add_argument("--minutes", type=float, default=30.0, help="time cap")
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--lr", type=float, default=2e-3)
    s.add_argument("--wd", type=float, default=0.05)
    s.add_argument("--template-noise", type=float, default=0.4)
    s.add_argument("--log-every", type=int, default=50)
    s.add_argument("--ckpt-every", type=int, default=500)
    s.add_argument("--resume", action="store_true")
    s.add_argument("--tag", default="", help="suffix of the run folder (experiments)")
    s = sub.add_parser("export")
    s.add_argument("--role", choices=["shadow", "attacker"], required=True)
    s.add_argument("--model", required=True)
    s.add_argument("--checkpoint", default="best.pt")
    s.add_argument("--out", help="file to write (default: the package for shadows, the cache for attackers)")
    s.add_argument("--tag", default="")
    return p


COMMANDS = {"prepare": cmd_prepare, "embed": cmd_embed, "train": cmd_train, "export": cmd_export}


def run(argv: list[str]) -> None:
    """One command of the command line above, e.g. ``run(["train", "--role", "shadow", "--model", "mobileface"])``."""
    args = build_parser().parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    COMMANDS[args.cmd](args)


def train_attacker(model: str, data: str | Path, *, steps: int = 300, cache: Path | None = None,
                   detections: Path | None = None, out: Path | None = None, log_every: int = 50) -> Path:
    """Prepare the training faces of ``data`` (once per data folder), embed them with ``model`` (once), train its
    evaluation attacker on the attacker half and export it (default: into ``<cache>/advface/attackers``).

    About 5-15 min per model on one CPU core (``prepare`` 2 min, ``embed`` 2-10 min, 300 steps 2 min)."""
    import hashlib

    root = Path(data).resolve()
    # one cache per data folder, so a cache never mixes the faces of two folders
    work = (cache or default_cache()) / f"train-{hashlib.sha1(str(root).encode()).hexdigest()[:10]}"
    common = ["--cache", str(work), "--threads", str(torch.get_num_threads())]
    if not (work / "faces_train.npz").is_file():
        run([*common, "prepare", "--data", str(root),
             *(["--detections", str(detections)] if detections is not None else [])])
    run([*common, "embed", "--models", model])
    run([*common, "train", "--role", "attacker", "--model", model, "--steps", str(steps),
         "--log-every", str(min(log_every, max(1, steps // 2)))])
    from fluxguard.features.decoders import attackers_dir

    dest = out or attackers_dir() / f"attacker-{model}.safetensors"
    run([*common, "export", "--role", "attacker", "--model", model, "--out", str(dest)])
    return dest


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    run(sys.argv[1:])
