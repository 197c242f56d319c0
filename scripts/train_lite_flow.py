"""Train the lite rectified-flow FluxTransformer2DModel (diffusers) on cached lite-VAE latents of the face pack (CPU).

Unconditional with a learned null prompt: ``prompt_embeds`` (1, L, joint_attention_dim) and
``pooled_prompt_embeds`` (1, pooled_projection_dim) are trained with the model and shipped beside it. Objective in
the FLUX / diffusers convention: latents ``x0 = (mode - shift_factor) * scaling_factor`` packed 2x2 into tokens,
``x_t = (1 - t) x0 + t noise``, the model predicts the velocity ``noise - x0`` at ``timestep = t`` (diffusers
multiplies by 1000 inside), t logit-normal then moved by FLUX's resolution shift (mu from the token count, as
``FluxPipeline`` does at sampling), MSE loss. The weights saved are an EMA. The run resumes from
``<run>/ckpt.pt`` and stops after ``--cpu-minutes`` of process CPU time.

Command used for the shipped model (see src/fluxguard/weights/lite/README.md):

    python scripts/train_lite_flow.py --run flow_main --vae /work/cache/lite/vae_main/vae \
        --pack /work/cache/lite/pack256_train.npy --cpu-minutes 60
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from _lite_common import CACHE, cached_latents, train_with_ema
from torch import nn

BASE_SEQ, MAX_SEQ, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15  # FLUX.1-dev scheduler values


def flux_mu(seq_len: int) -> float:
    """FLUX's resolution shift mu (``diffusers.pipelines.flux.pipeline_flux.calculate_shift``)."""
    m = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ - BASE_SEQ)
    return seq_len * m + BASE_SHIFT - m * BASE_SEQ


class FlowModel(nn.Module):
    """The transformer and its learned null prompt, trained (and averaged) together."""

    def __init__(self, transformer: nn.Module, text_len: int) -> None:
        super().__init__()
        cfg = transformer.config
        self.transformer = transformer
        self.prompt_embeds = nn.Parameter(torch.randn(1, text_len, cfg.joint_attention_dim) * 0.5)
        self.pooled_prompt_embeds = nn.Parameter(torch.randn(1, cfg.pooled_projection_dim) * 0.5)

    def forward(self, tokens: torch.Tensor, t: torch.Tensor, img_ids: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        txt_ids = torch.zeros(self.prompt_embeds.shape[1], 3)
        return self.transformer(
            hidden_states=tokens,
            encoder_hidden_states=self.prompt_embeds.expand(b, -1, -1),
            pooled_projections=self.pooled_prompt_embeds.expand(b, -1),
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]


def make_transformer(args) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * args.latent_channels,
        num_layers=args.layers,
        num_single_layers=args.single_layers,
        attention_head_dim=args.head_dim,
        num_attention_heads=args.heads,
        joint_attention_dim=args.joint_dim,
        pooled_projection_dim=args.pooled_dim,
        guidance_embeds=False,
        axes_dims_rope=tuple(int(a) for a in args.rope.split(",")),
    )


@torch.no_grad()
def sample(model: FlowModel, shape: tuple[int, int, int, int], steps: int, gen: torch.Generator) -> torch.Tensor:
    """Euler sampling with the saved scheduler's sigmas (FluxPipeline's schedule); returns (B, C, h, w) latents."""
    from diffusers import FluxPipeline

    b, c, h, w = shape
    sched = scheduler()
    n = (h // 2) * (w // 2)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=flux_mu(n))
    x = torch.randn(shape, generator=gen)
    tok = FluxPipeline._pack_latents(x, b, c, h, w)
    ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    for t in sched.timesteps:
        v = model(tok, (t / 1000).expand(b), ids)
        tok = sched.step(v, t, tok, return_dict=False)[0]
    return FluxPipeline._unpack_latents(tok, h * 8, w * 8, 8)  # (pixel size, scale factor) only fix h, w here


def scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=BASE_SHIFT, max_shift=MAX_SHIFT,
        base_image_seq_len=BASE_SEQ, max_image_seq_len=MAX_SEQ,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--vae", required=True, help="diffusers VAE folder (its shift/scaling normalise the latents)")
    ap.add_argument("--pack", default=str(CACHE / "pack256_train.npy"))
    ap.add_argument("--latents", default=None, help="latent cache file (default: <vae>/../latents_<pack>.pt)")
    ap.add_argument("--latent-channels", type=int, default=16)
    ap.add_argument("--layers", type=int, default=2, help="double-stream (MM-DiT) blocks")
    ap.add_argument("--single-layers", type=int, default=4, help="single-stream blocks")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--rope", default="8,12,12", help="axes_dims_rope (sums to --head-dim)")
    ap.add_argument("--joint-dim", type=int, default=64)
    ap.add_argument("--pooled-dim", type=int, default=64)
    ap.add_argument("--text-len", type=int, default=8, help="tokens of the learned null prompt")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--crop-tokens", type=int, default=0,
                    help="train on random square windows of this many tokens a side (0: whole latents); the RoPE "
                         "positions keep the window's place, so the model samples whole latents afterwards")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--cpu-minutes", type=float, default=60.0)
    ap.add_argument("--ckpt-every", type=float, default=120.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import FluxPipeline

    run = CACHE / args.run
    lat_path = Path(args.latents) if args.latents else Path(args.vae).parent / f"latents_{Path(args.pack).stem}.pt"
    lat = cached_latents(args.vae, args.pack, lat_path).float()
    n, c, h, w = lat.shape
    seq = (h // 2) * (w // 2)
    mu = flux_mu(seq)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)

    torch.manual_seed(args.seed)
    model = FlowModel(make_transformer(args), args.text_len)
    gen = torch.Generator().manual_seed(args.seed)

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(0, n, (args.batch,), generator=gen)
        ids = img_ids
        if 0 < args.crop_tokens < h // 2:
            k = args.crop_tokens
            oy, ox = (int(torch.randint(0, h // 2 - k + 1, (1,), generator=gen)) for _ in range(2))
            x0 = FluxPipeline._pack_latents(lat[idx, :, 2 * oy : 2 * (oy + k), 2 * ox : 2 * (ox + k)],
                                            args.batch, c, 2 * k, 2 * k)
            ids = FluxPipeline._prepare_latent_image_ids(1, k, k, "cpu", torch.float32)
            ids[:, 1] += oy
            ids[:, 2] += ox
        else:
            x0 = FluxPipeline._pack_latents(lat[idx], args.batch, c, h, w)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.sigmoid(torch.randn(args.batch, generator=gen))  # logit-normal(0, 1)
        t = math.exp(mu) / (math.exp(mu) + (1 / t - 1))  # FLUX time shift
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        return (model(xt, t, ids) - (noise - x0)).square().mean()

    log, step = train_with_ema(model, args, run, gen, batch_loss, latents=list(lat.shape),
                               latent_std=float(lat.std()), mu=mu)
    out = run / "export"
    model.transformer.save_pretrained(out / "transformer")
    scheduler().save_pretrained(out / "scheduler")
    from safetensors.torch import save_file

    save_file({"prompt_embeds": model.prompt_embeds.detach().contiguous(),
               "pooled_prompt_embeds": model.pooled_prompt_embeds.detach().contiguous()},
              str(out / "transformer" / "null_prompt.safetensors"))
    z = sample(model, (4, c, h, w), 25, torch.Generator().manual_seed(1))
    log(event="done", step=step, sample_mean=float(z.mean()), sample_std=float(z.std()), data_std=float(lat.std()))
    torch.save(z, out / "samples.pt")


if __name__ == "__main__":
    main()
