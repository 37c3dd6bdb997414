"""Add-ons on a distilled student, in miniature: does a teacher's LoRA or ControlNet do on the BK-SDM-Small student
that `bksdm demo` distils what it does on the teacher? Results: docs/ecosystem.md, "Add-ons on a distilled student".

LoRA (`--addon lora`, the default):

1. A LoRA is trained on the teacher (`builtin:shapes-sd`) with a change the judge reads: every caption that says
   "circle" is trained on the picture of a square (same colour, position and size); the other captions keep their
   own pictures. peft `LoraConfig` on the attention projections (`to_q`, `to_k`, `to_v`, `to_out.0`) added with
   diffusers' `unet.add_adapter`, saved with `StableDiffusionPipeline.save_lora_weights` (as diffusers'
   `train_text_to_image_lora.py` does). The text encoder is frozen.
2. The LoRA is carried over to the distilled student with the package's `transfer_lora` + `save_lora` (what
   `bksdm lora --teacher builtin:shapes-sd --student_variant small` does) and loaded with stock `load_lora_weights`.
   References on the student side: the transferred LoRA fine-tuned on the student, and a new LoRA trained on the
   student, `--student_lora_steps` each.
3. Every row is judged on the held-out "circle" prompts (combinations neither the teacher nor the LoRA saw): the
   share of images the judge reads as a square (the LoRA's effect); and on the held-out square and triangle
   prompts: the judge's accuracy (what the LoRA should leave alone).
4. The LoRA's effect on the UNet output (with the LoRA minus without, same noisy latents of real held-out circle
   pictures, timesteps and captions) is compared with the teacher's: cosine and norm ratio, by timestep, and on the
   guided prediction. Also for the teacher with the LoRA on the student's kept layers only (what the dropped layers
   take away) and for the student before distillation (compressed, not distilled: the floor).

ControlNet (`--addon controlnet`): a ControlNet trained on the teacher on position masks (a white square where the
shape should be), cut for the student with `compress_controlnet`, fine-tuned on the student for `--finetune_steps`,
against a new ControlNet from `controlnet_from_student` trained as long; position accuracy on the held-out prompts
and the share of the teacher's ControlNet gain each student row keeps.

    bksdm demo --output_dir /tmp/addon-demo             # the distilled BK-SDM-Small student: /tmp/addon-demo/student
    python benchmarks/miniature/addons.py --student /tmp/addon-demo/student --work_dir /tmp/addon-bench --threads 1
    python benchmarks/miniature/addons.py --addon controlnet --student /tmp/addon-demo/student \
        --work_dir /tmp/addon-bench --threads 1

Writes (LoRA) `WORK/teacher_lora/`, `WORK/student_lora/`, `WORK/student_lora_*` (pytorch_lora_weights.safetensors
and training.json), `WORK/summary.json`, `WORK/table.md`; (ControlNet) `WORK/controlnet/{teacher,student-*}/`,
`WORK/controlnet/summary.json` and `table.md`; with `--grid`, a picture grid. Trained add-ons found in WORK are
reused (`--retrain` trains them again).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time

import torch

from diffusers_bksdm.outputs import atomic_write_text

logger = logging.getLogger("benchmarks.miniature.addons")

#: the LoRA's change: captions saying SOURCE are trained on pictures of TARGET
SOURCE, TARGET = "circle", "square"
#: the attention projections the LoRA adapts (diffusers' train_text_to_image_lora.py)
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


# ------------------------------------------------------------------------------------------------ data and prompts


def lora_training_samples(num: int, seed: int = 0, source: str = SOURCE, target: str = TARGET):
    """`(picture sample, caption)` pairs for the LoRA: `num` samples of the training split; the picture of every
    `source` sample is drawn as `target` (same colour, position, size and jitter) under its own `source` caption."""
    from diffusers_bksdm.miniature import shapes

    return [
        (dataclasses.replace(s, shape=target) if s.shape == source else s, s.caption)
        for s in shapes.sample_shapes(num, "train", seed)
    ]


def split_prompts(shape: str = SOURCE, split: str = "heldout") -> tuple[list[str], list[str]]:
    """The evaluation prompts of `split` that name `shape`, and the others."""
    from diffusers_bksdm.miniature import shapes

    prompts = shapes.eval_prompts(split)
    named = [p for p in prompts if shapes.parse_caption(p)["shape"] == shape]
    return named, [p for p in prompts if p not in named]


def repeat(prompts: list[str], times: int) -> list[str]:
    return [p for p in prompts for _ in range(times)]


def read_images(folder: str, count: int) -> torch.Tensor:
    """uint8 `(N, 3, S, S)` of the first `count` images `bksdm generate` wrote into `folder`."""
    import numpy as np
    from PIL import Image

    from diffusers_bksdm.evaluation.generate import image_name

    arrays = []
    for i in range(count):
        with Image.open(os.path.join(folder, image_name(i))) as image:
            arrays.append(np.asarray(image.convert("RGB")))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def judge_reads(predictions: list[dict[str, str]], prompts: list[str], target: str = TARGET) -> dict[str, float]:
    """What the judge read, against what each prompt asked: `target_share` (shape read as `target`), `shape_kept`
    (shape as asked), `color_kept` (colour as asked), `accuracy` (colour and shape as asked), `position_accuracy`
    (position as asked)."""
    from diffusers_bksdm.miniature import shapes

    if len(predictions) != len(prompts) or not prompts:
        raise ValueError(f"{len(predictions)} predictions for {len(prompts)} prompts.")
    asked = [shapes.parse_caption(p) for p in prompts]
    n = len(prompts)

    def share(test) -> float:
        return sum(bool(test(p, a)) for p, a in zip(predictions, asked, strict=True)) / n

    return {
        "target_share": share(lambda p, a: p["shape"] == target),
        "shape_kept": share(lambda p, a: p["shape"] == a["shape"]),
        "color_kept": share(lambda p, a: p["color"] == a["color"]),
        "accuracy": share(lambda p, a: p["shape"] == a["shape"] and p["color"] == a["color"]),
        "position_accuracy": share(lambda p, a: p["position"] == a["position"]),
    }


def effect_similarity(teacher_effect: torch.Tensor, student_effect: torch.Tensor) -> dict[str, float]:
    """Per-sample cosine and norm ratio (student / teacher) of two `(N, ...)` output changes, averaged over N."""
    a, b = teacher_effect.flatten(1).double(), student_effect.flatten(1).double()
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=1)
    ratio = b.norm(dim=1) / a.norm(dim=1)
    return {"cosine": float(cosine.mean()), "cosine_min": float(cosine.min()), "norm_ratio": float(ratio.mean()),
            "cosine_all": float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)),
            "norm_ratio_all": float(b.norm() / a.norm())}


def by_timestep(teacher_effect, student_effect, timesteps, edges=(0, 250, 500, 750, 1000)) -> dict[str, dict]:
    """:func:`effect_similarity` within each timestep range `[edges[i], edges[i + 1])` (empty ranges left out)."""
    out = {}
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        keep = (timesteps >= low) & (timesteps < high)
        if keep.any():
            out[f"{low}-{high - 1}"] = effect_similarity(teacher_effect[keep], student_effect[keep])
    return out


# ------------------------------------------------------------------------------------------------------- the LoRA


def min_snr_update(noise_scheduler, pred, latents, noise, timesteps, optimizer, params) -> float:
    """One optimizer step on the min-SNR-5 weighted denoising loss (as the teacher was trained); returns the loss."""
    import torch.nn.functional as F
    from diffusers.training_utils import compute_snr

    from diffusers_bksdm.distill import training_target

    target = training_target(noise_scheduler, latents, noise, timesteps)
    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.clamp(snr, max=5.0) / snr
    loss = (F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return loss.item()


def train_lora(pipe, output_dir: str, steps: int, args, seed: int, target_modules=TARGET_MODULES,
               init: dict[str, torch.Tensor] | None = None) -> dict:
    """Train a LoRA on `pipe.unet` (the UNet and the text encoder frozen) and save it into `output_dir`. `init`: a
    LoRA state dict (diffusers keys, `unet.` prefix) to start from instead of peft's initialisation (the transferred
    LoRA, fine-tuned on the student)."""
    import numpy as np
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    from diffusers_bksdm.miniature import shapes
    from diffusers_bksdm.conditioning import tokenize_captions as tokenize

    torch.manual_seed(seed)
    pairs = lora_training_samples(args.num_train, args.seed)
    pixels = torch.from_numpy(np.stack([np.asarray(shapes.render(s)) for s, _ in pairs])).permute(0, 3, 1, 2)
    with torch.no_grad():
        posterior = pipe.vae.encode(pixels.float() / 127.5 - 1.0).latent_dist
        means, stds = posterior.mean, posterior.std
        states = pipe.text_encoder(tokenize(pipe.tokenizer, [c for _, c in pairs]))[0]
    source = torch.tensor([shapes.parse_caption(c)["shape"] == SOURCE for _, c in pairs])
    pools = (torch.nonzero(source).flatten(), torch.nonzero(~source).flatten())

    unet = pipe.unet
    unet.requires_grad_(False)
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, init_lora_weights="gaussian",
                        target_modules=list(target_modules))
    unet.add_adapter(config)
    if init is not None:
        result = set_peft_model_state_dict(unet, {k.removeprefix("unet."): v for k, v in init.items()})
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"LoRA keys the UNet does not have: {result.unexpected_keys[:3]}")
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=1e-2)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(seed + 1)
    half = args.train_batch_size // 2
    losses, start = [], time.perf_counter()
    unet.train()
    for step in range(steps):
        # half the batch are "circle" captions on square pictures, half the other captions on their own pictures
        index = torch.cat([pool[torch.randint(len(pool), (n,), generator=generator)]
                           for pool, n in zip(pools, (half, args.train_batch_size - half), strict=True)])
        latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=generator))
        latents = latents * pipe.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        pred = unet(noisy, timesteps, states[index]).sample
        losses.append(min_snr_update(noise_scheduler, pred, latents, noise, timesteps, optimizer, params))
        if (step + 1) % 50 == 0:
            logger.info("lora step %d/%d loss %.4f", step + 1, steps, np.mean(losses[-50:]))
    unet.eval()
    elapsed = time.perf_counter() - start
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(output_dir, unet_lora_layers=layers,
                                              unet_lora_adapter_metadata=config.to_dict())
    unet.delete_adapters("default")
    window = min(50, len(losses))
    return {"train_s": elapsed, "steps": steps, "final_loss": float(np.mean(losses[-window:])),
            "first_loss": float(np.mean(losses[:window])), "lora_parameters": sum(p.numel() for p in params)}


def lora_layers(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m for name, m in unet.named_modules() if isinstance(m, BaseTunerLayer) and m.r}


def set_active_layers(unet: torch.nn.Module, active) -> None:
    """Enable the LoRA of the layers named in `active` (all with `None`), disable the others."""
    for name, module in lora_layers(unet).items():
        module.enable_adapters(active is None or name in active)


@torch.no_grad()
def effect_inputs(pipe, num: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Noisy latents of `num` real held-out pictures of SOURCE shapes, their timesteps, caption states and the
    empty caption's states (the unconditional half of classifier-free guidance)."""
    import numpy as np
    from diffusers import DDPMScheduler

    from diffusers_bksdm.miniature import shapes
    from diffusers_bksdm.conditioning import tokenize_captions as tokenize

    samples = [s for s in shapes.sample_shapes(8 * num, "heldout", seed) if s.shape == SOURCE][:num]
    pixels = torch.from_numpy(np.stack([np.asarray(shapes.render(s)) for s in samples])).permute(0, 3, 1, 2)
    latents = pipe.vae.encode(pixels.float() / 127.5 - 1.0).latent_dist.mean * pipe.vae.config.scaling_factor
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (len(samples),), generator=generator)
    noisy = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(latents, noise, timesteps)
    states = pipe.text_encoder(tokenize(pipe.tokenizer, [s.caption for s in samples]))[0]
    empty = pipe.text_encoder(tokenize(pipe.tokenizer, [""] * len(samples)))[0]
    return noisy, timesteps, states, empty


def prediction(unet, inputs, guidance: float | None = None) -> torch.Tensor:
    """The UNet's noise prediction for the captions, or with `guidance` the classifier-free guided prediction the
    pipeline steps with: `uncond + guidance * (cond - uncond)`."""
    noisy, timesteps, states, empty = inputs
    cond = unet(noisy, timesteps, states).sample
    if guidance is None:
        return cond
    uncond = unet(noisy, timesteps, empty).sample
    return uncond + guidance * (cond - uncond)


@torch.no_grad()
def lora_effect(unet, inputs, active=None, guidance: float | None = None) -> torch.Tensor:
    """UNet output with the LoRA (on the layers in `active`; all with `None`) minus the output without it."""
    set_active_layers(unet, active)
    with_lora = prediction(unet, inputs, guidance)
    set_active_layers(unet, ())
    without = prediction(unet, inputs, guidance)
    set_active_layers(unet, None)
    return with_lora - without


# --------------------------------------------------------------------------------------------------- the ControlNet


def position_mask(position: str, half: float, dx: float = 0.0, dy: float = 0.0, size: int | None = None):
    """The ControlNet's conditioning image: a white square on black where the shape should be (centre `position`
    moved by `(dx, dy)`, half side `half`, as fractions of the image side). It says where, not which shape."""
    from PIL import Image, ImageDraw

    from diffusers_bksdm.miniature import shapes

    size = size or shapes.IMAGE_SIZE
    big = 4 * size
    image = Image.new("RGB", (big, big), (0, 0, 0))
    fx, fy = shapes.POSITIONS[position]
    cx, cy, r = (fx + dx) * big, (fy + dy) * big, half * big
    ImageDraw.Draw(image).rectangle((cx - r, cy - r, cx + r, cy + r), fill=(255, 255, 255))
    return image.resize((size, size), Image.Resampling.BOX)


def sample_mask(sample):
    """The mask of a rendered sample (its own jitter and size)."""
    return position_mask(sample.position, sample.half, sample.dx, sample.dy)


def prompt_mask(prompt: str):
    """The mask for a prompt: its position and the middle of its size's range, no jitter."""
    from diffusers_bksdm.miniature import shapes

    asked = shapes.parse_caption(prompt)
    return position_mask(asked["position"], sum(shapes.SIZES[asked["size"]]) / 2)


def mask_tensor(images) -> torch.Tensor:
    """Conditioning images as the ControlNet pipeline feeds them: float `(N, 3, S, S)` in [0, 1]."""
    import numpy as np

    return torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i in images])).permute(0, 3, 1, 2)


def train_controlnet(pipe, controlnet, output_dir: str, steps: int, args, seed: int) -> dict:
    """Train `controlnet` with `pipe.unet` frozen (and the text encoder): pictures of the training split, their
    captions (the position left unsaid with probability `args.position_dropout`: the mask must carry it) and their
    masks. Saves it into `output_dir`."""
    import numpy as np
    from diffusers import DDPMScheduler

    from diffusers_bksdm.miniature import shapes
    from diffusers_bksdm.conditioning import tokenize_captions as tokenize

    samples = shapes.sample_shapes(args.num_train, "train", seed)
    means, stds, full, unsaid = [], [], [], []
    with torch.no_grad():
        for i in range(0, len(samples), 500):
            chunk = samples[i : i + 500]
            pixels = torch.from_numpy(np.stack([np.asarray(shapes.render(s)) for s in chunk])).permute(0, 3, 1, 2)
            posterior = pipe.vae.encode(pixels.float() / 127.5 - 1.0).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
            full.append(pipe.text_encoder(tokenize(pipe.tokenizer, [s.caption for s in chunk]))[0])
            unsaid.append(pipe.text_encoder(tokenize(
                pipe.tokenizer, [shapes.caption(s.color, s.shape, None, s.size) for s in chunk]))[0])
    means, stds, full, unsaid = (torch.cat(x) for x in (means, stds, full, unsaid))
    masks = mask_tensor([sample_mask(s) for s in samples])

    pipe.unet.requires_grad_(False)
    controlnet.requires_grad_(True)
    params = list(controlnet.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.controlnet_learning_rate, weight_decay=1e-2)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(seed + 1)
    losses, start = [], time.perf_counter()
    controlnet.train()
    for step in range(steps):
        index = torch.randint(len(samples), (args.train_batch_size,), generator=generator)
        latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=generator))
        latents = latents * pipe.vae.config.scaling_factor
        drop = (torch.rand(len(index), generator=generator) < args.position_dropout)[:, None, None]
        states = torch.where(drop, unsaid[index], full[index])
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        down, mid = controlnet(noisy, timesteps, states, controlnet_cond=masks[index], return_dict=False)
        pred = pipe.unet(noisy, timesteps, states, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample
        losses.append(min_snr_update(noise_scheduler, pred, latents, noise, timesteps, optimizer, params))
        if (step + 1) % 50 == 0:
            logger.info("controlnet step %d/%d loss %.4f", step + 1, steps, np.mean(losses[-50:]))
    controlnet.eval()
    controlnet.requires_grad_(False)
    controlnet.save_pretrained(output_dir)
    return {"train_s": time.perf_counter() - start, "steps": steps, "first_loss": float(np.mean(losses[:50])),
            "final_loss": float(np.mean(losses[-50:])), "parameters": sum(p.numel() for p in params)}


@torch.no_grad()
def sample_images(pipe, prompts: list[str], args, masks=None) -> torch.Tensor:
    """uint8 `(N, 3, S, S)` images of `prompts` (prompt `i` from its own generator, seeded as `bksdm generate`
    seeds it), with the conditioning images `masks` for a ControlNet pipeline."""
    from diffusers_bksdm.evaluation.generate import prompt_seed
    from diffusers_bksdm.miniature.world import EVAL_SEED

    out = []
    for i in range(0, len(prompts), args.batch_size):
        batch = list(range(i, min(i + args.batch_size, len(prompts))))
        kwargs = {"image": [masks[j] for j in batch]} if masks is not None else {}
        images = pipe([prompts[j] for j in batch], num_inference_steps=args.num_inference_steps,
                      guidance_scale=args.guidance_scale, output_type="np",
                      generator=[torch.Generator().manual_seed(prompt_seed(EVAL_SEED, j)) for j in batch],
                      **kwargs).images
        out.append(torch.from_numpy((images * 255).round().astype("uint8")).permute(0, 3, 1, 2))
    return torch.cat(out)


def save_images(images: torch.Tensor, folder: str) -> str:
    """Write uint8 `(N, 3, S, S)` images as `bksdm generate` names them; returns the folder."""
    from PIL import Image

    from diffusers_bksdm.evaluation.generate import image_name

    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(os.path.join(folder, image_name(i)))
    return folder


# --------------------------------------------------------------------------------------------------------- judging


def generate(pipe, prompts: list[str], folder: str, args) -> str:
    from diffusers_bksdm.evaluation.generate import GenerationConfig, generate_images, image_folder
    from diffusers_bksdm.miniature import shapes
    from diffusers_bksdm.miniature.world import EVAL_SEED

    config = GenerationConfig(num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                              scheduler=None, seed=EVAL_SEED, resolution=shapes.IMAGE_SIZE, eval_resolution=None,
                              batch_size=args.batch_size)
    with torch.no_grad():
        generate_images(pipe, prompts, folder, config, progress_bar=False)
    return image_folder(folder, shapes.IMAGE_SIZE)


def judge_row(pipe, judge, prompt_sets: dict[str, list[str]], folder: str, args) -> tuple[dict, dict]:
    """Generate every prompt set with `pipe` and judge it. Returns the scores by set and the image folders."""
    scores, folders = {}, {}
    for name, prompts in prompt_sets.items():
        start = time.perf_counter()
        images = generate(pipe, prompts, os.path.join(folder, name), args)
        scores[name] = judge_reads(judge.predict(read_images(images, len(prompts))), prompts)
        scores[name]["generate_s"] = time.perf_counter() - start
        folders[name] = images
    return scores, folders


# ------------------------------------------------------------------------------------------------------------ main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="/tmp/addon-demo/student",
                        help="The distilled BK-SDM student pipeline folder (`bksdm demo` writes OUTPUT/student).")
    parser.add_argument("--student_variant", default="small", help="The variant the student was compressed with.")
    parser.add_argument("--teacher", default="builtin:shapes-sd")
    parser.add_argument("--work_dir", default="/tmp/addon-bench")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_train", type=int, default=4000, help="Pictures the LoRA (or ControlNet) is trained on.")
    parser.add_argument("--lora_steps", type=int, default=400)
    parser.add_argument("--train_batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="The LoRA's.")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=4.0)
    parser.add_argument("--images_per_prompt", type=int, default=12, help="Images per held-out circle prompt.")
    parser.add_argument("--control_images_per_prompt", type=int, default=4,
                        help="Images per other held-out prompt (what the LoRA should leave alone); 0: skip.")
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--batch_size", type=int, default=48, help="Images generated per pipeline call.")
    parser.add_argument("--effect_samples", type=int, default=128,
                        help="Noisy latents the output change is taken on.")
    parser.add_argument("--student_lora_steps", type=int, default=100,
                        help="Steps of the student-side references: the transferred LoRA fine-tuned on the student, "
                             "and a new LoRA trained on the student; 0: none.")
    parser.add_argument("--retrain", action="store_true", help="Train the LoRA again even if WORK/teacher_lora exists.")
    parser.add_argument("--train_only", action="store_true",
                        help="Stop after training the teacher's LoRA (or ControlNet).")
    parser.add_argument("--grid", default=None, help="Write a picture grid PNG here.")
    cn = parser.add_argument_group("ControlNet (--addon controlnet)")
    cn.add_argument("--controlnet_steps", type=int, default=600, help="Training steps of the teacher's ControlNet.")
    cn.add_argument("--finetune_steps", type=int, default=150,
                    help="Steps of the student-side fine-tunes (the compressed ControlNet, and a new one from "
                         "controlnet_from_student as the baseline); 0: none.")
    cn.add_argument("--controlnet_learning_rate", type=float, default=5e-4)
    cn.add_argument("--position_dropout", type=float, default=0.5,
                    help="Probability that a training caption leaves the position unsaid.")
    cn.add_argument("--controlnet_images_per_prompt", type=int, default=4, help="Images per held-out prompt.")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's). On a machine shared with other jobs, 1 thread per "
                             "process took 20-40x less CPU time per training step than 2 (see RESULTS.md).")
    parser.add_argument("--addon", choices=("lora", "controlnet"), default="lora")
    return parser.parse_args(argv)


def load_pair(args):
    """The teacher and the distilled student (which shares the teacher's VAE and text encoder)."""
    from diffusers import StableDiffusionPipeline

    from diffusers_bksdm.miniature.tiny import builtin_teacher

    teacher = builtin_teacher(args.teacher) if args.teacher.startswith("builtin:") else (
        StableDiffusionPipeline.from_pretrained(args.teacher))
    student = StableDiffusionPipeline.from_pretrained(args.student)
    for pipe in (teacher, student):
        pipe.set_progress_bar_config(disable=True)
    for name in ("vae", "text_encoder"):
        same = all(torch.equal(a, b) for a, b in zip(getattr(teacher, name).state_dict().values(),
                                                     getattr(student, name).state_dict().values(), strict=True))
        if not same:
            raise SystemExit(f"The student's {name} differs from the teacher's: not a student of {args.teacher}.")
    return teacher, student


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.work_dir, exist_ok=True)
    (run_lora if args.addon == "lora" else run_controlnet)(args)


def run_lora(args) -> None:
    from diffusers import StableDiffusionPipeline

    from diffusers_bksdm import build_block_map, compress_unet
    from diffusers_bksdm.ecosystem.lora import save_lora, transfer_lora
    from diffusers_bksdm.miniature.judge import load_judge
    from diffusers_bksdm.miniature.world import comparison_grid

    started = time.perf_counter()
    teacher, student = load_pair(args)

    # the student before distillation (compressed from the teacher, not trained): the floor of the comparison
    undistilled = StableDiffusionPipeline(**{**teacher.components, "unet": compress_unet(teacher.unet,
                                                                                         args.student_variant)})

    def lora(name: str, pipe, steps: int, seed: int, **kwargs) -> tuple[str, dict | None]:
        """WORK/name/pytorch_lora_weights.safetensors, trained unless it is there (and no --retrain)."""
        folder = os.path.join(args.work_dir, name)
        path, record = os.path.join(folder, "pytorch_lora_weights.safetensors"), os.path.join(folder, "training.json")
        if os.path.isfile(path) and not args.retrain:
            if os.path.isfile(record):
                with open(record, encoding="utf-8") as f:
                    return path, json.load(f)
            return path, None
        result = train_lora(pipe, folder, steps, args, seed, **kwargs)
        with open(record, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        logger.info("%s trained: %s", name, result)
        return path, result

    # 1. the LoRA, trained on the teacher
    training = {}
    lora_file, training["teacher"] = lora("teacher_lora", teacher, args.lora_steps, args.seed)
    if args.train_only:
        print(json.dumps(training))
        return

    # 2. carried over to the student (what `bksdm lora` does)
    block_map = build_block_map(teacher.unet.config, args.student_variant)
    state_dict, report = transfer_lora(lora_file, block_map)
    student_lora = os.path.join(args.work_dir, "student_lora", "pytorch_lora_weights.safetensors")
    os.makedirs(os.path.dirname(student_lora), exist_ok=True)
    if os.path.exists(student_lora):
        os.remove(student_lora)
    save_lora(state_dict, student_lora, report)
    logger.info("transfer: %s", report.summary())
    extra = {}
    if args.student_lora_steps:
        # the student-side references: the transferred LoRA fine-tuned on the student, and a new LoRA trained on the
        # student for as many steps
        n = args.student_lora_steps
        extra[f"student + transferred LoRA, fine-tuned {n} steps"], training["student_finetuned"] = lora(
            f"student_lora_finetuned_{n}", student, n, args.seed + 10, target_modules=sorted(report.kept.values()),
            init=state_dict)
        extra[f"student + new LoRA, {n} steps"], training["student_new"] = lora(
            f"student_lora_new_{n}", student, n, args.seed + 10)

    # 3. judged with and without the LoRA
    prompt_sets = {"circle": repeat(split_prompts("circle")[0], args.images_per_prompt)}
    if args.control_images_per_prompt:
        for shape in ("square", "triangle"):
            prompt_sets[shape] = repeat(split_prompts(shape)[0], args.control_images_per_prompt)
    judge = load_judge()
    rows, folders = {}, {}

    def judge_as(name: str, pipe) -> None:
        rows[name], folders[name] = judge_row(pipe, judge, prompt_sets, os.path.join(args.work_dir, "eval", name), args)
        logger.info("%s: %s", name, rows[name])

    judge_as("teacher", teacher)
    judge_as("student", student)
    teacher.load_lora_weights(lora_file)
    judge_as("teacher + LoRA", teacher)
    set_active_layers(teacher.unet, set(report.kept))
    judge_as("teacher + LoRA on the student's kept layers only", teacher)
    set_active_layers(teacher.unet, None)
    student.load_lora_weights(student_lora)
    judge_as("student + transferred LoRA", student)
    other_students = {}
    for name, path in extra.items():
        other_students[name] = StableDiffusionPipeline.from_pretrained(args.student)
        other_students[name].set_progress_bar_config(disable=True)
        other_students[name].load_lora_weights(path)
        judge_as(name, other_students[name])

    # the LoRA's per-layer deltas on the student are the teacher's (the package's tests check this bit for bit)
    t_layers, s_layers = lora_layers(teacher.unet), lora_layers(student.unet)
    equal = sum(torch.equal(t_layers[t].get_delta_weight(next(iter(t_layers[t].r))),
                            s_layers[s].get_delta_weight(next(iter(s_layers[s].r)))) for t, s in report.kept.items())

    # 4. the LoRA's effect on the UNet output, teacher vs students
    inputs = effect_inputs(teacher, args.effect_samples, args.seed)
    teacher_effect = lora_effect(teacher.unet, inputs)
    with torch.no_grad():
        set_active_layers(teacher.unet, ())
        teacher_out = prediction(teacher.unet, inputs)
        set_active_layers(student.unet, ())
        student_out = prediction(student.unet, inputs)
        set_active_layers(teacher.unet, None)
        set_active_layers(student.unet, None)
    undistilled.load_lora_weights(student_lora)
    models = {"teacher, LoRA on the student's kept layers only": (teacher.unet, set(report.kept)),
              "distilled student + transferred LoRA": (student.unet, None),
              "student before distillation + transferred LoRA": (undistilled.unet, None)}
    models.update({name.replace("student", "distilled student", 1): (pipe.unet, None)
                   for name, pipe in other_students.items()})
    effects = {name: lora_effect(unet, inputs, active) for name, (unet, active) in models.items()}
    similarity = {name: effect_similarity(teacher_effect, effect) for name, effect in effects.items()}
    # the same on the guided prediction the sampler steps with (guidance --guidance_scale)
    teacher_guided = lora_effect(teacher.unet, inputs, guidance=args.guidance_scale)
    guided = {name: effect_similarity(teacher_guided, lora_effect(unet, inputs, active, guidance=args.guidance_scale))
              for name, (unet, active) in models.items()}
    timesteps = {name: by_timestep(teacher_effect, effect, inputs[1]) for name, effect in effects.items()}
    outputs = effect_similarity(teacher_out, student_out)  # how close the distilled student is without the LoRA
    # the size of the teacher's effect along the timesteps (per-sample RMS of the output change)
    rms = teacher_effect.flatten(1).pow(2).mean(1).sqrt()
    teacher_rms = {b: float(rms[(inputs[1] >= int(b.split("-")[0])) & (inputs[1] <= int(b.split("-")[1]))].mean())
                   for b in by_timestep(teacher_effect, teacher_effect, inputs[1])}

    summary = {
        "settings": vars(args),
        "training": training,
        "transfer": {"kept": len(report.kept), "dropped": len(report.dropped),
                     "kept_deltas_equal": f"{equal}/{len(report.kept)}"},
        "rows": rows,
        "effect_similarity": similarity,
        "effect_similarity_by_timestep": timesteps,
        "guided_effect_similarity": guided,
        "teacher_effect_rms_by_timestep": teacher_rms,
        "plain_output_similarity": outputs,
        "images": {k: len(v) for k, v in prompt_sets.items()},
        "elapsed_s": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
    }
    controls = [k for k in prompt_sets if k != "circle"]
    lines = ["| model | \"circle\" prompts read as square | colour kept (circle prompts) | "
             + " | ".join(f"{k} prompts: accuracy" for k in controls) + " |",
             "|---|---|---|" + "---|" * len(controls)]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['circle']['target_share']:.3f} | {r['circle']['color_kept']:.3f} | "
                     + " | ".join(f"{r[k]['accuracy']:.3f}" for k in controls) + " |")
    bins = list(next(iter(timesteps.values())))
    lines += ["", "| LoRA effect on the UNet output, vs the teacher's | cosine (mean, min) | norm ratio | "
              + " | ".join(f"cosine, t {b}" for b in bins) + f" | guided ({args.guidance_scale:g}): cosine | "
              "guided: norm ratio |", "|---|---|---|" + "---|" * (len(bins) + 2)]
    for name, s in similarity.items():
        lines.append(f"| {name} | {s['cosine']:.3f} ({s['cosine_min']:.2f}) | {s['norm_ratio_all']:.2f} | "
                     + " | ".join(f"{timesteps[name][b]['cosine']:.3f}" for b in bins)
                     + f" | {guided[name]['cosine']:.3f} | {guided[name]['norm_ratio_all']:.2f} |")
    lines.append("| (teacher's effect, RMS) | | | " + " | ".join(f"{teacher_rms[b]:.4f}" for b in bins) + " | | |")
    lines += ["", f"Without the LoRA, the distilled student's output vs the teacher's: cosine {outputs['cosine']:.3f} "
              f"(min {outputs['cosine_min']:.2f}), norm ratio {outputs['norm_ratio_all']:.2f}."]
    table = "\n".join(lines)
    atomic_write_text(os.path.join(args.work_dir, "summary.json"), json.dumps(summary, indent=1))
    atomic_write_text(os.path.join(args.work_dir, "table.md"), table + "\n")
    if args.grid:
        prompts = prompt_sets["circle"]
        names = ["teacher", "teacher + LoRA", "student", "student + transferred LoRA", *extra]
        titles = ["teacher", "teacher+LoRA", "student", "student+LoRA", "+fine-tuned", "new LoRA"][: len(names)]
        comparison_grid({t: folders[n]["circle"] for t, n in zip(titles, names, strict=True)}, prompts,
                        list(range(0, len(prompts), args.images_per_prompt)), args.grid)
    print(table)
    print(json.dumps({k: summary[k] for k in ("training", "transfer", "images", "elapsed_s", "threads")}))


def run_controlnet(args) -> None:
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from diffusers_bksdm import build_block_map
    from diffusers_bksdm.ecosystem.controlnet import compress_controlnet, controlnet_from_student
    from diffusers_bksdm.miniature import shapes
    from diffusers_bksdm.miniature.judge import load_judge
    from diffusers_bksdm.miniature.world import comparison_grid

    started = time.perf_counter()
    teacher, student = load_pair(args)
    block_map = build_block_map(teacher.unet.config, args.student_variant)
    judge = load_judge()
    prompts = repeat(shapes.eval_prompts("heldout"), args.controlnet_images_per_prompt)
    masks = [prompt_mask(p) for p in prompts]
    work = os.path.join(args.work_dir, "controlnet")
    os.makedirs(work, exist_ok=True)
    training: dict[str, dict] = {}
    embedding = (16, 32, 64)  # two stride-2 convolutions: 32 px masks -> 8x8 latents

    def trained(name: str, pipe, make, steps: int, seed: int):
        folder = os.path.join(work, name)
        record = os.path.join(folder, "training.json")
        if os.path.isfile(record) and not args.retrain:
            with open(record, encoding="utf-8") as f:
                training[name] = json.load(f)
            return ControlNetModel.from_pretrained(folder)
        torch.manual_seed(seed)  # the new ControlNet's random layers, whatever ran before in this process
        controlnet = make()
        training[name] = train_controlnet(pipe, controlnet, folder, steps, args, seed)
        with open(record, "w", encoding="utf-8") as f:
            json.dump(training[name], f, indent=1)
        logger.info("%s trained: %s", name, training[name])
        return controlnet

    def paired(pipe, controlnet):
        return StableDiffusionControlNetPipeline(
            vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
            controlnet=controlnet, scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)

    teacher_cn = trained("teacher", teacher, lambda: ControlNetModel.from_unet(
        teacher.unet, conditioning_embedding_out_channels=embedding), args.controlnet_steps, args.seed)
    if args.train_only:
        print(json.dumps(training))
        return
    compressed = compress_controlnet(teacher_cn, block_map)
    rows = {"teacher": (teacher, None), "teacher + ControlNet": (teacher, teacher_cn), "student": (student, None),
            "student + compressed ControlNet": (student, compressed)}
    if args.finetune_steps:
        def finetune():
            return compress_controlnet(ControlNetModel.from_pretrained(os.path.join(work, "teacher")), block_map)

        rows[f"student + compressed ControlNet, fine-tuned {args.finetune_steps} steps"] = (student, trained(
            f"student-finetuned-{args.finetune_steps}", student, finetune, args.finetune_steps, args.seed + 10))
        rows[f"student + new ControlNet (controlnet_from_student), {args.finetune_steps} steps"] = (student, trained(
            f"student-new-{args.finetune_steps}", student, lambda: controlnet_from_student(
                student.unet, conditioning_embedding_out_channels=embedding), args.finetune_steps, args.seed + 10))
    results, folders = {}, {}
    if args.grid:
        mask_images = mask_tensor(masks).mul(255).round().to(torch.uint8)
        folders["mask"] = save_images(mask_images, os.path.join(work, "eval", "mask"))
    for name, (pipe, controlnet) in rows.items():
        start = time.perf_counter()
        if controlnet is None:
            images = sample_images(pipe, prompts, args)
        else:
            cn_pipe = paired(pipe, controlnet)
            cn_pipe.set_progress_bar_config(disable=True)
            images = sample_images(cn_pipe, prompts, args, masks)
        results[name] = judge_reads(judge.predict(images), prompts)
        results[name]["generate_s"] = time.perf_counter() - start
        logger.info("%s: %s", name, results[name])
        if args.grid:
            folders[name] = save_images(images, os.path.join(work, "eval", name))
    gain_teacher = results["teacher + ControlNet"]["position_accuracy"] - results["teacher"]["position_accuracy"]
    for name, r in results.items():
        if name.startswith("student +"):
            gain = r["position_accuracy"] - results["student"]["position_accuracy"]
            r["gain_kept"] = gain / gain_teacher if gain_teacher else float("nan")
            r["vs_teacher_controlnet"] = r["position_accuracy"] / results["teacher + ControlNet"]["position_accuracy"]
    summary = {"settings": vars(args), "training": training, "rows": results, "images": len(prompts),
               "elapsed_s": time.perf_counter() - started, "threads": torch.get_num_threads(),
               "controlnet_parameters": {"teacher": sum(p.numel() for p in teacher_cn.parameters()),
                                         "compressed": sum(p.numel() for p in compressed.parameters())}}
    lines = ["| model | position accuracy | colour + shape accuracy | ControlNet gain kept | vs teacher + ControlNet |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        kept = f"{r['gain_kept']:.2f}" if "gain_kept" in r else "-"
        vs = f"{r['vs_teacher_controlnet']:.2f}" if "vs_teacher_controlnet" in r else "-"
        lines.append(f"| {name} | {r['position_accuracy']:.3f} | {r['accuracy']:.3f} | {kept} | {vs} |")
    table = "\n".join(lines)
    with open(os.path.join(work, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(work, "table.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    if args.grid:
        titles = ["mask", "teacher", "teacher+CN", "student", "student+CN", "+fine-tuned", "new CN"]
        comparison_grid({t: folders[n] for t, n in zip(titles, folders, strict=False)}, prompts,
                        list(range(0, len(prompts), 2 * args.controlnet_images_per_prompt)), args.grid)
    print(table)
    print(json.dumps({k: summary[k] for k in ("training", "images", "elapsed_s", "threads", "controlnet_parameters")}))


if __name__ == "__main__":
    main()
