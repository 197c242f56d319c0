"""Random-weight FLUX checkpoints for tests and benchmarks (no hub access).

:func:`save_tiny_flux` writes a diffusers-layout folder (tiny transformer, VAE, CLIP + T5 with tokenizers built
offline) that loads through :meth:`fluxguard.generators.flux.FluxBackend.from_pretrained` exactly like
``black-forest-labs/FLUX.1-dev``. With ``text_encoders=False`` it writes a text-encoder-free folder with a random
``null_prompt.safetensors`` instead, the layout of the embedded lite model. ``FLUX_DEV_TRANSFORMER`` and
``FLUX_DEV_VAE`` are the full-size architectures (random weights, for GPU timing only).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

FLUX_DEV_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
FLUX_DEV_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4, "norm_num_groups": 32,
    "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False,
}
TINY_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32, "pooled_projection_dim": 32, "guidance_embeds": True, "axes_dims_rope": (4, 6, 6),
}
TINY_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": (8, 8, 8, 8),
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 1,
    "norm_num_groups": 4, "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False,
    "use_post_quant_conv": False,
}
SCHEDULER: dict[str, Any] = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                             "base_image_seq_len": 256, "max_image_seq_len": 4096}
_SENTENCES = [
    "A person", "A person wearing red lipstick and red-purple hair", "a photo of a face with blue eyes",
    "a man with a beard and glasses", "a woman smiling with green eyeshadow", "portrait of a person, studio light",
]


def _bytes_to_unicode() -> dict[int, str]:
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def write_clip_tokenizer(folder: Path) -> None:
    """A small byte-level BPE CLIP tokenizer (vocab.json + merges.txt + config), built from a few sentences."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in sorted({w for s in _SENTENCES for w in s.lower().replace(",", " ").split()}):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in merges:
                merges.append(pair)
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))


def write_t5_tokenizer(folder: Path) -> None:
    """A small Unigram T5 tokenizer.json (pad=0, eos=1, unk=2) with a fixed vocabulary (no training, so the
    file, and every embedding made with it, is the same on every run)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({v for s in _SENTENCES for w in s.replace(",", " ").split() for v in (w, w.lower())})
    chars = sorted({c for w in words for c in w})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{w}", -1.0 - 0.01 * i) for i, w in enumerate(words)]
    vocab += [(c, -5.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace("▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.save(str(folder / "tokenizer.json"))


def save_tiny_flux(folder: str | Path, *, text_encoders: bool = True, seed: int = 0,
                   transformer: dict[str, Any] | None = None, vae: dict[str, Any] | None = None) -> Path:
    """Write a random FLUX checkpoint folder in diffusers layout; returns the folder.

    Args:
        folder: output folder (created).
        text_encoders: include CLIP + T5 and their tokenizers; otherwise write ``null_prompt.safetensors``.
        seed: weights seed.
        transformer, vae: config overrides (default: the tiny configs of ``tiny-models.md``).
    """
    import diffusers

    from fluxguard.generators.flux import NULL_PROMPT_FILE, Conditioning, save_null_prompt

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tcfg = {**TINY_TRANSFORMER, **(transformer or {})}
    vcfg = {**TINY_VAE, **(vae or {})}
    torch.manual_seed(seed)
    diffusers.FluxTransformer2DModel(**tcfg).eval().save_pretrained(out / "transformer")
    diffusers.AutoencoderKL(**vcfg).eval().save_pretrained(out / "vae")
    diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_pretrained(out / "scheduler")
    if text_encoders:
        import transformers as tf

        write_clip_tokenizer(out / "tokenizer")
        write_t5_tokenizer(out / "tokenizer_2")
        tok = tf.CLIPTokenizer.from_pretrained(out / "tokenizer")
        tok2 = tf.T5TokenizerFast.from_pretrained(out / "tokenizer_2", extra_ids=0, model_max_length=512)
        tok.save_pretrained(out / "tokenizer")
        tok2.save_pretrained(out / "tokenizer_2")
        clip = tf.CLIPTextModel(tf.CLIPTextConfig(
            vocab_size=len(tok), hidden_size=tcfg["pooled_projection_dim"], intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu",
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        clip.eval().save_pretrained(out / "text_encoder")
        t5 = tf.T5EncoderModel(tf.T5Config(
            vocab_size=len(tok2), d_model=tcfg["joint_attention_dim"], d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
            dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
        t5.eval().save_pretrained(out / "text_encoder_2")
    else:
        g = torch.Generator().manual_seed(seed + 1)
        save_null_prompt(out / NULL_PROMPT_FILE, Conditioning(
            torch.randn(1, 16, tcfg["joint_attention_dim"], generator=g),
            torch.randn(1, tcfg["pooled_projection_dim"], generator=g)))
    return out
