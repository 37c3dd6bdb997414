"""Train the miniature world's teacher (`builtin:shapes-sd`) and its judge (`builtin:shapes-judge`) from scratch.

    python benchmarks/miniature/train_teacher.py --output_dir diffusers_bksdm/miniature/assets

Everything is generated from `--seed` on the CPU (2 cores, about an hour with the defaults):

1. the training split of :mod:`diffusers_bksdm.miniature.shapes` (32 px coloured shapes with captions);
2. a VAE (`AutoencoderKL`, downsampling factor 4: 32 px images, 8x8x4 latents), trained on reconstruction;
3. a text encoder (`CLIPTextModel`, word-level tokenizer written by the package) and an SD v1-structured UNet
   (four stages, `layers_per_block: 2`, cross-attention in the first three, a mid block with attention), trained
   together on the diffusion loss (epsilon prediction, min-SNR weighting, 10% empty captions for classifier-free
   guidance, EMA weights);
4. the judge (:class:`diffusers_bksdm.miniature.judge.ShapesJudge`), trained on pictures of every combination (split "all",
   another seed): an evaluation tool must read the held-out combinations too; the teacher never sees them;
5. the teacher's judge accuracy on the held-out prompts at the pipeline's default settings.

It writes `OUTPUT_DIR/shapes-sd` (a `StableDiffusionPipeline` folder) and `OUTPUT_DIR/shapes-judge`, and prints a
JSON summary (also saved as `OUTPUT_DIR/shapes-sd/training.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from diffusers_bksdm.miniature import shapes
from diffusers_bksdm.outputs import atomic_directory, save_pipeline
from diffusers_bksdm.miniature.tiny import tiny_tokenizer

TEXT_HIDDEN = 64


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="diffusers_bksdm/miniature/assets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_images", type=int, default=20000, help="Training images rendered.")
    parser.add_argument("--vae_steps", type=int, default=1500)
    parser.add_argument("--unet_steps", type=int, default=5000)
    parser.add_argument("--judge_steps", type=int, default=1500)
    parser.add_argument("--train_batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--ema_decay", type=float, default=0.999)
    parser.add_argument("--snr_gamma", type=float, default=5.0)
    parser.add_argument("--attribute_dropout", type=float, default=0.25, help="P(an attribute is left unsaid).")
    parser.add_argument("--skip_judge", action="store_true", help="Keep the judge already in --output_dir.")
    parser.add_argument("--eval_images_per_prompt", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--judge_only", action="store_true", help="Train and save only the judge.")
    parser.add_argument("--log_every", type=int, default=100)
    parser.add_argument("--eval_every", type=int, default=1000, help="Quick held-out accuracy every N UNet steps.")
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def render_all(samples) -> torch.Tensor:
    """uint8 `(N, 3, S, S)`."""
    arrays = [np.asarray(shapes.render(s)) for s in samples]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------------------- models


def build_models(seed: int, tokenizer_dir: str):
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer(tokenizer_dir, words=shapes.vocabulary())
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
            hidden_size=TEXT_HIDDEN,
            intermediate_size=4 * TEXT_HIDDEN,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=max(tokenizer.get_vocab().values()) + 1,
            max_position_embeddings=tokenizer.model_max_length,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[32, 64, 64],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=shapes.IMAGE_SIZE,
    )
    unet = UNet2DConditionModel(
        sample_size=shapes.IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=[32, 64, 64, 64],
        layers_per_block=2,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=4,
        norm_num_groups=16,
    )
    # the scheduler SD v1 ships
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return tokenizer, text_encoder, vae, unet, scheduler


# -------------------------------------------------------------------------------------------------------------- VAE


def train_vae(vae, images: torch.Tensor, args) -> dict:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed + 1)
    vae.train()
    losses = []
    for step in range(args.vae_steps):
        batch = to_float(images[torch.randint(len(images), (args.train_batch_size,), generator=generator)])
        posterior = vae.encode(batch).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        rec = F.mse_loss(recon, batch) + 0.5 * F.l1_loss(recon, batch)
        loss = rec + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(rec.item())
        if (step + 1) % args.log_every == 0:
            log(f"vae step {step + 1}/{args.vae_steps} reconstruction {np.mean(losses[-args.log_every:]):.4f}")
    vae.eval()
    return {"vae_final_reconstruction": float(np.mean(losses[-50:]))}


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(images), batch):
        posterior = vae.encode(to_float(images[i : i + batch])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


# ------------------------------------------------------------------------------------------------------------- UNet


def partial_captions(samples, generator: torch.Generator, p: float) -> list[str]:
    """Captions with each attribute left unsaid with probability `p`: the model learns what each word means on its
    own, which lets it compose combinations it never saw (the held-out prompts)."""
    keep = torch.rand(len(samples), 4, generator=generator) >= p
    return [
        shapes.caption(*(v if k else None for v, k in zip((s.color, s.shape, s.position, s.size), row, strict=True)))
        for s, row in zip(samples, keep.tolist(), strict=True)
    ]


def train_unet(unet, text_encoder, tokenizer, means, stds, samples, scaling_factor, args, evaluate=None) -> dict:
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel, compute_snr

    from diffusers_bksdm.distill import training_target

    noise_scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    from diffusers_bksdm.conditioning import tokenize_captions

    def tokenize(texts):
        return tokenize_captions(tokenizer, texts)

    empty_ids = tokenize([""])[0]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=1e-2)
    lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=200, num_training_steps=args.unet_steps)
    ema_unet = EMAModel(unet.parameters(), decay=args.ema_decay, use_ema_warmup=True)
    ema_text = EMAModel(text_encoder.parameters(), decay=args.ema_decay, use_ema_warmup=True)
    generator = torch.Generator().manual_seed(args.seed + 2)
    unet.train()
    text_encoder.train()
    losses = []
    for step in range(args.unet_steps):
        index = torch.randint(len(means), (args.train_batch_size,), generator=generator)
        latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)) * scaling_factor
        batch_ids = tokenize(partial_captions([samples[i] for i in index.tolist()], generator, args.attribute_dropout))
        drop = torch.rand(len(index), generator=generator) < 0.1
        batch_ids[drop] = empty_ids
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (len(index),), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        hidden = text_encoder(batch_ids)[0]
        pred = unet(noisy, timesteps, hidden).sample
        target = training_target(noise_scheduler, latents, noise, timesteps)
        snr = compute_snr(noise_scheduler, timesteps)
        weights = torch.clamp(snr, max=args.snr_gamma) / snr
        loss = (F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        ema_unet.step(unet.parameters())
        ema_text.step(text_encoder.parameters())
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0:
            log(f"unet step {step + 1}/{args.unet_steps} loss {np.mean(losses[-args.log_every:]):.4f}")
        if evaluate is not None and (step + 1) % args.eval_every == 0 and step + 1 < args.unet_steps:
            unet.eval()
            text_encoder.eval()
            ema_unet.store(unet.parameters())
            ema_text.store(text_encoder.parameters())
            ema_unet.copy_to(unet.parameters())
            ema_text.copy_to(text_encoder.parameters())
            evaluate(step + 1)
            ema_unet.restore(unet.parameters())
            ema_text.restore(text_encoder.parameters())
            unet.train()
            text_encoder.train()
    ema_unet.copy_to(unet.parameters())
    ema_text.copy_to(text_encoder.parameters())
    unet.eval()
    text_encoder.eval()
    return {"unet_final_loss": float(np.mean(losses[-200:]))}


# ------------------------------------------------------------------------------------------------------------ judge


def train_judge(samples, images: torch.Tensor, args):
    from diffusers_bksdm.miniature.judge import ATTRIBUTES, ShapesJudge

    torch.manual_seed(args.seed + 3)
    judge = ShapesJudge()
    labels = {
        name: torch.tensor([values.index(getattr(s, name)) for s in samples]) for name, values in ATTRIBUTES.items()
    }
    optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(args.seed + 4)
    judge.train()
    for step in range(args.judge_steps):
        index = torch.randint(len(images), (128,), generator=generator)
        batch = to_float(images[index])
        # generated images are softer and noisier than rendered ones: train the judge on both
        blur = torch.rand(len(index), 1, 1, 1, generator=generator) < 0.3
        batch = torch.where(blur, F.avg_pool2d(batch, 3, 1, 1, count_include_pad=False), batch)
        batch = batch + torch.randn(batch.shape, generator=generator) * 0.1 * torch.rand(
            len(index), 1, 1, 1, generator=generator
        )
        logits = judge(batch)
        loss = sum(F.cross_entropy(logits[name], labels[name][index]) for name in ATTRIBUTES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % args.log_every == 0:
            log(f"judge step {step + 1}/{args.judge_steps} loss {loss.item():.4f}")
    return judge.eval()


@torch.no_grad()
def judge_accuracy(judge, samples, images: torch.Tensor) -> dict:
    predictions = judge.predict(to_float(images))
    result = {}
    for name in ("color", "shape", "position", "size"):
        result[name] = float(np.mean([p[name] == getattr(s, name) for p, s in zip(predictions, samples, strict=True)]))
    return result


@torch.no_grad()
def teacher_accuracy(pipe, judge, images_per_prompt: int, seed: int, **pipe_kwargs) -> dict:
    """The judge's reading of the teacher's images for the held-out prompts."""
    from diffusers_bksdm.miniature.shapes import parse_caption

    prompts = [p for p in shapes.eval_prompts() for _ in range(images_per_prompt)]
    generated = pipe(prompts, generator=torch.Generator().manual_seed(seed), output_type="pt", **pipe_kwargs).images
    predictions = judge.predict(generated * 2 - 1)
    wanted = [parse_caption(p) for p in prompts]
    return {
        key: float(np.mean([all(p[k] == w[k] for k in keys) for p, w in zip(predictions, wanted, strict=True)]))
        for key, keys in (
            ("color_and_shape", ("color", "shape")),
            ("position", ("position",)),
            ("color_shape_position", ("color", "shape", "position")),
        )
    }


# ------------------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers import StableDiffusionPipeline

    from diffusers_bksdm.miniature.judge import JUDGE_NAME

    started = time.time()
    summary: dict = {"args": vars(args)}
    samples = shapes.sample_shapes(args.num_images, "train", args.seed)
    images = render_all(samples)
    held_samples = shapes.sample_shapes(500, "heldout", args.seed)
    held_images = render_all(held_samples)
    log(f"rendered {len(images)} training and {len(held_images)} held-out images")

    if args.skip_judge:
        from diffusers_bksdm.miniature.judge import load_judge

        judge = load_judge(os.path.join(args.output_dir, JUDGE_NAME))
    else:
        judge_samples = shapes.sample_shapes(args.num_images, "all", args.seed + 100)
        judge = train_judge(judge_samples, render_all(judge_samples), args)
        with atomic_directory(os.path.join(args.output_dir, JUDGE_NAME), overwrite=True, argument="--output_dir") as out:
            judge.save_pretrained(out, safe_serialization=True)
    summary["judge_heldout_real"] = judge_accuracy(judge, held_samples, held_images)
    log(f"judge on held-out real images: {summary['judge_heldout_real']}")
    if args.judge_only:
        print(json.dumps(summary, indent=2))
        return 0

    teacher_dir = os.path.join(args.output_dir, "shapes-sd")
    with atomic_directory(teacher_dir, overwrite=True, argument="--output_dir") as out:
        tokenizer, text_encoder, vae, unet, scheduler = build_models(args.seed, os.path.join(out, "tokenizer"))
        summary.update(train_vae(vae, images, args))
        means, stds = encode_all(vae, images)
        scaling_factor = float(1.0 / (means + stds * torch.randn_like(means)).std())
        vae.register_to_config(scaling_factor=scaling_factor)
        summary["scaling_factor"] = scaling_factor
        log(f"vae done; latent scaling factor {scaling_factor:.4f}")
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

        def quick_eval(step: int) -> None:
            hits = teacher_accuracy(pipe, judge, 1, args.seed, num_inference_steps=20)
            summary.setdefault("progress", []).append({"step": step, **hits})
            log(f"unet step {step}: held-out accuracy (EMA weights, 20 steps) {hits}")

        summary.update(
            train_unet(
                unet, text_encoder, tokenizer, means, stds, samples, scaling_factor, args,
                quick_eval,
            )
        )
        save_pipeline(pipe, out, safe_serialization=True)
    log(f"saved the teacher to {teacher_dir}")

    # the teacher on the held-out prompts, at the pipeline's default settings
    summary["teacher_heldout_accuracy"] = teacher_accuracy(pipe, judge, args.eval_images_per_prompt, args.seed)
    log(f"teacher on held-out prompts (judge, default settings): {summary['teacher_heldout_accuracy']}")
    summary["minutes"] = (time.time() - started) / 60
    summary["torch"] = torch.__version__
    tmp = os.path.join(teacher_dir, ".training.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, os.path.join(teacher_dir, "training.json"))
    log(f"done in {summary['minutes']:.1f} min")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
