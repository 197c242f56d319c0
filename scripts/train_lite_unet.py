"""Train the lite UNet2DConditionModel + DDIMScheduler (SD-style, for WDP) on cached lite-VAE latents, on CPU.

SD's noise schedule (scaled_linear betas 0.00085..0.012 over 1000 steps), epsilon prediction, uniform integer
timesteps, MSE loss, a learned null text embedding (1, L, cross_attention_dim) trained with the model and shipped
beside it. Latents are the lite VAE's ``(mode - shift_factor) * scaling_factor`` (the same as the flow model's;
note that SD pipelines multiply by ``scaling_factor`` only, so callers must also subtract ``shift_factor``).
The weights saved are an EMA. The run resumes from ``<run>/ckpt.pt`` and stops after ``--cpu-minutes``.

Command used for the shipped model (see src/fluxguard/weights/lite/README.md):

    python scripts/train_lite_unet.py --run unet_main --vae /work/cache/lite/vae_main/vae \
        --pack /work/cache/lite/pack256_train.npy --cpu-minutes 60
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _lite_common import CACHE, cached_latents, train_with_ema
from torch import nn


class NullUNet(nn.Module):
    """The UNet and its learned null text embedding, trained (and averaged) together."""

    def __init__(self, unet: nn.Module, text_len: int) -> None:
        super().__init__()
        self.unet = unet
        self.null_embeds = nn.Parameter(torch.randn(1, text_len, unet.config.cross_attention_dim) * 0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=self.null_embeds.expand(x.shape[0], -1, -1)).sample


def make_unet(args, sample_size: int) -> nn.Module:
    from diffusers import UNet2DConditionModel

    ch = tuple(int(c) for c in args.channels.split(","))
    heads = tuple(int(c) for c in args.heads.split(","))
    n = len(ch)
    # attention only at the coarse levels: self-attention over 64x64 or 32x32 latents costs more than the convs
    down = ["DownBlock2D"] * (n - args.attn_levels) + ["CrossAttnDownBlock2D"] * args.attn_levels
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=args.latent_channels,
        out_channels=args.latent_channels,
        block_out_channels=ch,
        layers_per_block=args.layers,
        down_block_types=tuple(down),
        up_block_types=tuple("CrossAttnUpBlock2D" if b.startswith("CrossAttn") else "UpBlock2D"
                             for b in reversed(down)),
        cross_attention_dim=args.cross_dim,
        attention_head_dim=heads,  # legacy name: the number of heads per block
        use_linear_projection=True,
        norm_num_groups=args.groups,
    )


def scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )


@torch.no_grad()
def sample(model: NullUNet, shape: tuple[int, int, int, int], steps: int, gen: torch.Generator) -> torch.Tensor:
    sched = scheduler()
    sched.set_timesteps(steps)
    x = torch.randn(shape, generator=gen)
    for t in sched.timesteps:
        x = sched.step(model(x, t.expand(shape[0])), t, x).prev_sample
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--vae", required=True)
    ap.add_argument("--pack", default=str(CACHE / "pack256_train.npy"))
    ap.add_argument("--latents", default=None, help="latent cache file (default: <vae>/../latents_<pack>.pt)")
    ap.add_argument("--latent-channels", type=int, default=16)
    ap.add_argument("--channels", default="64,96,128")
    ap.add_argument("--heads", default="2,3,4")
    ap.add_argument("--attn-levels", type=int, default=2, help="coarsest levels with (self+cross) attention")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--cross-dim", type=int, default=64)
    ap.add_argument("--text-len", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--crop", type=int, default=0,
                    help="train on random square latent windows of this side (0: whole latents)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--cpu-minutes", type=float, default=60.0)
    ap.add_argument("--ckpt-every", type=float, default=120.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    run = CACHE / args.run
    lat_path = Path(args.latents) if args.latents else Path(args.vae).parent / f"latents_{Path(args.pack).stem}.pt"
    lat = cached_latents(args.vae, args.pack, lat_path).float()
    n, c, h, w = lat.shape
    sched = scheduler()
    abar = sched.alphas_cumprod.float()

    torch.manual_seed(args.seed)
    model = NullUNet(make_unet(args, h), args.text_len)
    gen = torch.Generator().manual_seed(args.seed)

    def batch_loss() -> torch.Tensor:
        x0 = lat[torch.randint(0, n, (args.batch,), generator=gen)]
        if 0 < args.crop < h:
            oy, ox = (int(torch.randint(0, (h - args.crop) // 8 + 1, (1,), generator=gen)) * 8 for _ in range(2))
            x0 = x0[:, :, oy : oy + args.crop, ox : ox + args.crop]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        a = abar[t][:, None, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        return (model(xt, t) - noise).square().mean()

    log, step = train_with_ema(model, args, run, gen, batch_loss, latents=list(lat.shape))
    out = run / "export"
    model.unet.save_pretrained(out / "unet")
    scheduler().save_pretrained(out / "scheduler")
    from safetensors.torch import save_file

    save_file({"null_embeds": model.null_embeds.detach().contiguous()}, str(out / "unet" / "null_text.safetensors"))
    z = sample(model, (4, c, h, w), 20, torch.Generator().manual_seed(1))
    log(event="done", step=step, sample_mean=float(z.mean()), sample_std=float(z.std()), data_std=float(lat.std()))
    torch.save(z, out / "samples.pt")


if __name__ == "__main__":
    main()
