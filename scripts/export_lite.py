"""Copy trained lite models into the package as fp16 safetensors, checking that fp16 storage keeps their outputs.

The folder is laid out so that both backends load it as it is: ``FluxBackend.from_pretrained`` (``vae/``,
``transformer/``, ``null_prompt.safetensors``) and ``SDBackend.from_pretrained`` (``vae/``, ``unet/``,
``scheduler/``, ``null_embedding.safetensors``).

Each model is saved with its weights rounded to fp16 (diffusers ``save_pretrained`` after ``.half()``); the loader
upcasts to fp32. Parity is measured against the fp32 training output: VAE reconstruction PSNR on held-out crops,
and the relative error of transformer / UNet outputs. A model whose check fails is reported and not written.

    python scripts/export_lite.py --vae /work/cache/lite/vae_main/vae \
        --flow /work/cache/lite/flow_main/export --unet /work/cache/lite/unet_main/export \
        --heldout /work/cache/lite/pack256_eval.npy
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from _lite_common import load_pack, psnr_ssim, to_tensor
from safetensors.torch import load_file, save_file

from fluxguard.generators.flux import NULL_PROMPT_FILE
from fluxguard.generators.sd import NULL_EMBEDDING_FILE, NULL_EMBEDDING_KEY

OUT = Path(__file__).resolve().parents[1] / "src" / "fluxguard" / "weights" / "lite"


def fp16_roundtrip(model: torch.nn.Module) -> torch.nn.Module:
    """The same model with every floating-point weight rounded through fp16 (what the package stores)."""
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.state_dict().values():
            if p.dtype.is_floating_point:
                p.copy_(p.half().float())
    return m


def save_fp16(model, folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    model.half().save_pretrained(folder, safe_serialization=True)
    model.float()
    cfg = folder / "config.json"
    data = json.loads(cfg.read_text())
    data.pop("_name_or_path", None)  # a path on the training machine
    cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    for f in folder.iterdir():
        f.chmod(0o644)


def export_vae(src: Path, heldout: np.ndarray, report: dict) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(src).eval()
    half = fp16_roundtrip(vae)
    x = to_tensor(heldout[:64])
    with torch.no_grad():
        outs = [((m.decode(m.encode(x).latent_dist.mode()).sample.clamp(-1, 1) + 1) / 2) for m in (vae, half)]
    p32, s32 = psnr_ssim((x + 1) / 2, outs[0])
    p16, s16 = psnr_ssim((x + 1) / 2, outs[1])
    d = float((p32 - p16).abs().max())
    report["vae"] = {"psnr_fp32": float(p32.mean()), "psnr_fp16": float(p16.mean()), "max_abs_psnr_delta": d,
                     "ssim_fp32": float(s32.mean()), "ssim_fp16": float(s16.mean()), "n": len(x)}
    if d > 0.05:
        raise SystemExit(f"VAE fp16 parity failed: {report['vae']}")
    save_fp16(vae, OUT / "vae")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def export_flow(src: Path, report: dict) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tr = FluxTransformer2DModel.from_pretrained(src / "transformer").eval()
    emb = load_file(str(src / "transformer" / "null_prompt.safetensors"))
    emb16 = {k: v.half().float() for k, v in emb.items()}
    half = fp16_roundtrip(tr)
    g = torch.Generator().manual_seed(0)
    n = 32
    tok = torch.randn(2, n * n, tr.config.in_channels, generator=g)
    ids = FluxPipeline._prepare_latent_image_ids(2, n, n, "cpu", torch.float32)
    outs = []
    with torch.no_grad():
        for m, e in ((tr, emb), (half, emb16)):
            outs.append(m(hidden_states=tok, encoder_hidden_states=e["prompt_embeds"].expand(2, -1, -1),
                          pooled_projections=e["pooled_prompt_embeds"].expand(2, -1),
                          timestep=torch.tensor([0.3, 0.8]),
                          img_ids=ids, txt_ids=torch.zeros(e["prompt_embeds"].shape[1], 3)).sample)
    report["transformer"] = {"rel_err_fp16": _rel(outs[1], outs[0])}
    if report["transformer"]["rel_err_fp16"] > 5e-3:
        raise SystemExit(f"transformer fp16 parity failed: {report['transformer']}")
    save_fp16(tr, OUT / "transformer")
    # at the folder's root, where FluxBackend.from_pretrained looks for a text-encoder-free model's null prompt
    save_file({k: v.half().contiguous() for k, v in emb.items()}, str(OUT / NULL_PROMPT_FILE))
    FlowMatchEulerDiscreteScheduler.from_pretrained(src / "scheduler").save_pretrained(OUT / "flow_scheduler")


def export_unet(src: Path, report: dict) -> None:
    from diffusers import DDIMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(src / "unet").eval()
    emb = load_file(str(src / "unet" / "null_text.safetensors"))["null_embeds"]
    half = fp16_roundtrip(unet)
    s = unet.config.sample_size
    x = torch.randn(2, unet.config.in_channels, s, s, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = unet(x, torch.tensor([100, 800]), encoder_hidden_states=emb.expand(2, -1, -1)).sample
        b = half(x, torch.tensor([100, 800]), encoder_hidden_states=emb.half().float().expand(2, -1, -1)).sample
    report["unet"] = {"rel_err_fp16": _rel(b, a)}
    if report["unet"]["rel_err_fp16"] > 5e-3:
        raise SystemExit(f"UNet fp16 parity failed: {report['unet']}")
    save_fp16(unet, OUT / "unet")
    # the SD backend's text-encoder-free layout: null_embedding.safetensors and scheduler/ at the folder's root
    save_file({NULL_EMBEDDING_KEY: emb.half().contiguous()}, str(OUT / NULL_EMBEDDING_FILE))
    DDIMScheduler.from_pretrained(src / "scheduler").save_pretrained(OUT / "scheduler")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", type=Path)
    ap.add_argument("--flow", type=Path)
    ap.add_argument("--unet", type=Path)
    ap.add_argument("--heldout", default="/work/cache/lite/pack256_eval.npy")
    args = ap.parse_args()
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    report_path = OUT / "export_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    if args.vae:
        export_vae(args.vae, load_pack(args.heldout), report)
    if args.flow:
        export_flow(args.flow, report)
    if args.unet:
        export_unet(args.unet, report)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
