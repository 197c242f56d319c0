"""Train the lite AutoencoderKL (diffusers) on the aligned face pack, on CPU.

Losses: L1 + w_ssim * (1 - SSIM) + w_kl * KL (mean per latent element), on random square windows of the crops
(the VAE has no attention, so it is convolutional and windows train it for the whole crop faster), the last part
of the run on whole crops so GroupNorm sees full-size statistics. The run stops after ``--cpu-minutes`` of process
CPU time and resumes from ``<run>/ckpt.pt`` when restarted with the same ``--run``. At the end it measures the latent
statistics of the training pack (posterior mode) and sets ``shift_factor`` (mean) and ``scaling_factor``
(1 / std), as FLUX's VAE does, then saves a diffusers folder ``<run>/vae`` (fp32).

Commands used for the shipped model (2-core CPU, shared with other jobs; see src/fluxguard/weights/lite/README.md):

    python scripts/train_lite_vae.py --run vae_main --pack /work/cache/lite/pack256_train.npy \
        --heldout /work/cache/lite/pack256_eval.npy --channels 8,16,32 --cpu-minutes 60
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from _lite_common import CACHE, RunLog, load_pack, psnr_ssim, random_batch, save_checkpoint, to_tensor


def make_vae(channels: tuple[int, ...], latent: int, layers: int, groups: int, attention: bool):
    from diffusers import AutoencoderKL

    n = len(channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=channels,
        layers_per_block=layers,
        latent_channels=latent,
        norm_num_groups=groups,
        mid_block_add_attention=attention,
        use_quant_conv=False,
        use_post_quant_conv=False,
        sample_size=256,
    )


@torch.no_grad()
def evaluate(vae, heldout, n: int = 32, batch: int = 8) -> dict[str, float]:
    vae.eval()
    ps, ss = [], []
    for i in range(0, min(n, len(heldout)), batch):
        x = to_tensor(heldout[i : i + batch])
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample
        p, s = psnr_ssim(((x + 1) / 2), ((y + 1) / 2).clamp(0, 1))
        ps.append(p)
        ss.append(s)
    vae.train()
    return {"psnr": float(torch.cat(ps).mean()), "ssim": float(torch.cat(ss).mean())}


@torch.no_grad()
def latent_stats(vae, pack, batch: int = 8) -> tuple[float, float]:
    """Mean and std of the posterior modes over the (un-augmented) pack."""
    vae.eval()
    s = s2 = cnt = 0.0
    for i in range(0, len(pack), batch):
        z = vae.encode(to_tensor(pack[i : i + batch])).latent_dist.mode().double()
        s += float(z.sum())
        s2 += float(z.square().sum())
        cnt += z.numel()
    mean = s / cnt
    return mean, math.sqrt(s2 / cnt - mean * mean)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run name: folder under the cache (checkpoints, log, result)")
    ap.add_argument("--pack", default=str(CACHE / "pack256_train.npy"))
    ap.add_argument("--heldout", default=str(CACHE / "pack256_eval.npy"))
    ap.add_argument("--channels", default="8,16,32")
    ap.add_argument("--latent", type=int, default=16)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--attention", action="store_true", help="self-attention in the mid block")
    ap.add_argument("--crop", type=int, default=128, help="training window (px) before --full-frac")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--full-batch", type=int, default=4, help="batch of whole crops in the last --full-frac")
    ap.add_argument("--full-frac", type=float, default=0.2, help="last fraction of the time on whole crops")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--init-logvar", type=float, default=-8.0, help="initial posterior log-variance")
    ap.add_argument("--w-ssim", type=float, default=0.5)
    ap.add_argument("--w-kl", type=float, default=1e-6)
    ap.add_argument("--cpu-minutes", type=float, default=60.0,
                    help="budget of the whole run in process CPU minutes (robust to other jobs on the machine)")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--ckpt-every", type=float, default=120.0, help="seconds between checkpoints")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 is fastest when other jobs share the 2 cores (OpenMP spin-waits)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    from pytorch_msssim import ssim

    run = CACHE / args.run
    pack, heldout = load_pack(args.pack), load_pack(args.heldout)
    channels = tuple(int(c) for c in args.channels.split(","))
    torch.manual_seed(args.seed)
    vae = make_vae(channels, args.latent, args.layers, args.groups, args.attention)
    with torch.no_grad():
        # Start the posterior narrow: with the default log-variance 0 the decoder first learns from unit-variance
        # latent noise and the KL-free recon loss needs hundreds of steps to shrink it.
        vae.encoder.conv_out.bias[args.latent :] = args.init_logvar
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(args.seed)
    step, wall0, cpu0 = 0, 0.0, 0.0
    ckpt = run / "ckpt.pt"
    if ckpt.is_file():
        st = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        step, wall0, cpu0 = st["step"], st["wall"], st["cpu"]
    log = RunLog(run, wall0, cpu0)
    budget = args.cpu_minutes * 60
    log(event="start", step=step, args=vars(args), params=sum(p.numel() for p in vae.parameters()))
    vae.train()
    last_ckpt = time.time()
    while log.cpu < budget:
        frac = log.cpu / budget
        full = frac >= 1 - args.full_frac
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))  # cosine to 0 over the time budget
        lr *= min(1.0, (step + 1) / 200)  # warm-up
        for g in opt.param_groups:
            g["lr"] = lr
        if full:
            x = random_batch(pack, args.full_batch, pack.shape[1], gen)
        else:
            x = random_batch(pack, args.batch, args.crop, gen)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        y = vae.decode(z).sample
        l1 = (y - x).abs().mean()
        l_ssim = 1 - ssim((y.clamp(-1, 1) + 1) / 2, (x + 1) / 2, data_range=1.0)
        kl = (0.5 * (post.mean.square() + post.var - 1 - post.logvar)).mean()
        loss = l1 + args.w_ssim * l_ssim + args.w_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            log(step=step, lr=round(lr, 6), full=full, l1=round(float(l1), 5), ssim_loss=round(float(l_ssim), 5),
                kl=round(float(kl), 3), std=round(float(post.std.mean()), 4))
        if step % args.eval_every == 0:
            log(step=step, eval=evaluate(vae, heldout))
        if time.time() - last_ckpt > args.ckpt_every:
            save_checkpoint(ckpt, {"model": vae.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                                   "step": step, "wall": log.wall, "cpu": log.cpu})
            last_ckpt = time.time()
    save_checkpoint(ckpt, {"model": vae.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                           "step": step, "wall": log.wall, "cpu": log.cpu})
    final = evaluate(vae, heldout, n=len(heldout))
    mean, std = latent_stats(vae, pack)
    vae.register_to_config(shift_factor=round(mean, 4), scaling_factor=round(1 / std, 4))
    vae.eval()
    vae.save_pretrained(run / "vae")
    log(event="done", step=step, eval_all=final, shift_factor=mean, scaling_factor=1 / std)


if __name__ == "__main__":
    main()
