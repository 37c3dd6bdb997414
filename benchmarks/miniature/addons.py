"""Add-ons on a distilled student, in miniature: does a teacher's LoRA do on the BK-SDM-Small student that `bksdm
demo` distils what it does on the teacher?

1. A LoRA is trained on the teacher (`builtin:shapes-sd`) with a change the judge reads: every caption that says
   "circle" is trained on the picture of a square (same colour, position and size); the other captions keep their
   own pictures. peft `LoraConfig` on the attention projections (`to_q`, `to_k`, `to_v`, `to_out.0`) added with
   diffusers' `unet.add_adapter`, saved with `StableDiffusionPipeline.save_lora_weights` (as diffusers'
   `train_text_to_image_lora.py` does). The text encoder is frozen.
2. The LoRA is carried over to the distilled student with the package's `transfer_lora` + `save_lora` (what
   `bksdm lora --teacher builtin:shapes-sd --student_variant small` does) and loaded with stock `load_lora_weights`.
3. Both pipelines are judged with and without the LoRA on the held-out "circle" prompts (combinations neither the
   teacher nor the LoRA saw): the share of images the judge reads as a square (the LoRA's effect), and on the
   other held-out prompts (squares and triangles) the judge's accuracy (what the LoRA should leave alone).
4. The LoRA's effect on the UNet output (with the LoRA minus without, same noisy latents of real held-out circle
   pictures, timesteps and captions) is compared between teacher and student: cosine and norm ratio. Also for the
   teacher with the LoRA on the student's kept layers only (what the dropped layers take away) and for the student
   before distillation (compressed, not distilled: the floor).

    bksdm demo --output_dir /tmp/addon-demo             # the distilled BK-SDM-Small student: /tmp/addon-demo/student
    python benchmarks/miniature/addons.py --student /tmp/addon-demo/student --work_dir /tmp/addon-bench

Writes `WORK/teacher_lora/` and `WORK/student_lora/` (pytorch_lora_weights.safetensors), `WORK/summary.json`,
`WORK/table.md` and, with `--grid`, a picture grid (teacher | teacher+LoRA | student | student+LoRA).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time

import torch

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
    (shape as asked), `color_kept` (colour as asked), `accuracy` (colour and shape as asked)."""
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
    }


def effect_similarity(teacher_effect: torch.Tensor, student_effect: torch.Tensor) -> dict[str, float]:
    """Per-sample cosine and norm ratio (student / teacher) of two `(N, ...)` output changes, averaged over N."""
    a, b = teacher_effect.flatten(1).double(), student_effect.flatten(1).double()
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=1)
    ratio = b.norm(dim=1) / a.norm(dim=1)
    return {"cosine": float(cosine.mean()), "cosine_min": float(cosine.min()), "norm_ratio": float(ratio.mean())}


# ------------------------------------------------------------------------------------------------------- the LoRA


def train_teacher_lora(pipe, output_dir: str, args) -> dict:
    """Train a LoRA on `pipe.unet` (frozen teacher, frozen text encoder) and save it into `output_dir`."""
    import numpy as np
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.training_utils import compute_snr
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from diffusers_bksdm.distill import training_target
    from diffusers_bksdm.miniature import shapes
    from diffusers_bksdm.training.data import tokenize

    torch.manual_seed(args.seed)
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
                        target_modules=list(TARGET_MODULES))
    unet.add_adapter(config)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=1e-2)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(args.seed + 1)
    half = args.train_batch_size // 2
    losses, start = [], time.perf_counter()
    unet.train()
    for step in range(args.lora_steps):
        # half the batch are "circle" captions on square pictures, half the other captions on their own pictures
        index = torch.cat([pool[torch.randint(len(pool), (n,), generator=generator)]
                           for pool, n in zip(pools, (half, args.train_batch_size - half), strict=True)])
        latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=generator))
        latents = latents * pipe.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        pred = unet(noisy, timesteps, states[index]).sample
        target = training_target(noise_scheduler, latents, noise, timesteps)
        snr = compute_snr(noise_scheduler, timesteps)
        weights = torch.clamp(snr, max=5.0) / snr  # min-SNR-5, as the teacher was trained
        loss = (F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            logger.info("lora step %d/%d loss %.4f", step + 1, args.lora_steps, np.mean(losses[-50:]))
    unet.eval()
    elapsed = time.perf_counter() - start
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(output_dir, unet_lora_layers=layers,
                                              unet_lora_adapter_metadata=config.to_dict())
    unet.delete_adapters("default")
    return {"train_s": elapsed, "final_loss": float(np.mean(losses[-50:])), "first_loss": float(np.mean(losses[:50])),
            "lora_parameters": sum(p.numel() for p in params)}


def lora_layers(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m for name, m in unet.named_modules() if isinstance(m, BaseTunerLayer) and m.r}


def set_active_layers(unet: torch.nn.Module, active) -> None:
    """Enable the LoRA of the layers named in `active` (all with `None`), disable the others."""
    for name, module in lora_layers(unet).items():
        module.enable_adapters(active is None or name in active)


@torch.no_grad()
def effect_inputs(pipe, num: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noisy latents of `num` real held-out pictures of SOURCE shapes, their timesteps and caption states."""
    import numpy as np
    from diffusers import DDPMScheduler

    from diffusers_bksdm.miniature import shapes
    from diffusers_bksdm.training.data import tokenize

    samples = [s for s in shapes.sample_shapes(8 * num, "heldout", seed) if s.shape == SOURCE][:num]
    pixels = torch.from_numpy(np.stack([np.asarray(shapes.render(s)) for s in samples])).permute(0, 3, 1, 2)
    latents = pipe.vae.encode(pixels.float() / 127.5 - 1.0).latent_dist.mean * pipe.vae.config.scaling_factor
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (len(samples),), generator=generator)
    noisy = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(latents, noise, timesteps)
    states = pipe.text_encoder(tokenize(pipe.tokenizer, [s.caption for s in samples]))[0]
    return noisy, timesteps, states


@torch.no_grad()
def lora_effect(unet, inputs, active=None) -> torch.Tensor:
    """UNet output with the LoRA (on the layers in `active`; all with `None`) minus the output without it."""
    set_active_layers(unet, active)
    with_lora = unet(*inputs).sample
    set_active_layers(unet, ())
    without = unet(*inputs).sample
    set_active_layers(unet, None)
    return with_lora - without


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
    parser.add_argument("--num_train", type=int, default=4000, help="Pictures the LoRA is trained on.")
    parser.add_argument("--lora_steps", type=int, default=400)
    parser.add_argument("--train_batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=4.0)
    parser.add_argument("--images_per_prompt", type=int, default=12, help="Images per held-out circle prompt.")
    parser.add_argument("--control_images_per_prompt", type=int, default=4,
                        help="Images per other held-out prompt (what the LoRA should leave alone); 0: skip.")
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--batch_size", type=int, default=48, help="Images generated per pipeline call.")
    parser.add_argument("--effect_samples", type=int, default=64, help="Noisy latents the output change is taken on.")
    parser.add_argument("--retrain", action="store_true", help="Train the LoRA again even if WORK/teacher_lora exists.")
    parser.add_argument("--train_only", action="store_true", help="Stop after training the teacher's LoRA.")
    parser.add_argument("--grid", default=None, help="Write a picture grid PNG here.")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    from diffusers import StableDiffusionPipeline

    from diffusers_bksdm import build_block_map, compress_unet
    from diffusers_bksdm.ecosystem.lora import save_lora, transfer_lora
    from diffusers_bksdm.miniature.judge import load_judge
    from diffusers_bksdm.miniature.tiny import builtin_teacher
    from diffusers_bksdm.miniature.world import comparison_grid

    torch.manual_seed(args.seed)
    os.makedirs(args.work_dir, exist_ok=True)
    started = time.perf_counter()
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

    # the student before distillation (compressed from the teacher, not trained): the floor of the comparison
    undistilled = StableDiffusionPipeline(**{**teacher.components, "unet": compress_unet(teacher.unet,
                                                                                         args.student_variant)})

    # 1. the LoRA, trained on the teacher
    teacher_lora = os.path.join(args.work_dir, "teacher_lora")
    lora_file = os.path.join(teacher_lora, "pytorch_lora_weights.safetensors")
    training = None
    if args.retrain or not os.path.isfile(lora_file):
        training = train_teacher_lora(teacher, teacher_lora, args)
        logger.info("LoRA trained: %s", training)
        with open(os.path.join(args.work_dir, "lora_training.json"), "w", encoding="utf-8") as f:
            json.dump(training, f, indent=1)
    elif os.path.isfile(os.path.join(args.work_dir, "lora_training.json")):
        with open(os.path.join(args.work_dir, "lora_training.json"), encoding="utf-8") as f:
            training = json.load(f)
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

    # 3. judged with and without the LoRA
    source_prompts, other_prompts = split_prompts()
    prompt_sets = {"circle": repeat(source_prompts, args.images_per_prompt)}
    if args.control_images_per_prompt:
        prompt_sets["other"] = repeat(other_prompts, args.control_images_per_prompt)
    judge = load_judge()
    rows, folders = {}, {}
    for name, pipe, lora in (("teacher", teacher, None), ("student", student, None),
                             ("teacher + LoRA", teacher, lora_file), ("student + LoRA", student, student_lora)):
        if lora is not None:
            pipe.load_lora_weights(lora)
        rows[name], folders[name] = judge_row(pipe, judge, prompt_sets, os.path.join(args.work_dir, "eval", name), args)
        logger.info("%s: %s", name, rows[name])

    # the LoRA's per-layer deltas on the student are the teacher's (the package's tests check this bit for bit)
    t_layers, s_layers = lora_layers(teacher.unet), lora_layers(student.unet)
    equal = sum(torch.equal(t_layers[t].get_delta_weight(next(iter(t_layers[t].r))),
                            s_layers[s].get_delta_weight(next(iter(s_layers[s].r)))) for t, s in report.kept.items())

    # 4. the LoRA's effect on the UNet output, teacher vs students
    inputs = effect_inputs(teacher, args.effect_samples, args.seed)
    teacher_effect = lora_effect(teacher.unet, inputs)
    with torch.no_grad():
        set_active_layers(teacher.unet, ())
        teacher_out = teacher.unet(*inputs).sample
        set_active_layers(student.unet, ())
        student_out = student.unet(*inputs).sample
        set_active_layers(teacher.unet, None)
        set_active_layers(student.unet, None)
    effects = {
        "teacher, LoRA on the student's kept layers only": lora_effect(teacher.unet, inputs, set(report.kept)),
        "distilled student + transferred LoRA": lora_effect(student.unet, inputs),
    }
    undistilled.load_lora_weights(student_lora)
    effects["student before distillation + transferred LoRA"] = lora_effect(undistilled.unet, inputs)
    similarity = {name: effect_similarity(teacher_effect, effect) for name, effect in effects.items()}
    similarity["distilled student vs teacher-kept-only"] = effect_similarity(
        effects["teacher, LoRA on the student's kept layers only"], effects["distilled student + transferred LoRA"])
    outputs = effect_similarity(teacher_out, student_out)  # how close the distilled student is without the LoRA

    summary = {
        "settings": {k: v for k, v in vars(args).items()},
        "training": training,
        "transfer": {"kept": len(report.kept), "dropped": len(report.dropped),
                     "kept_deltas_equal": f"{equal}/{len(report.kept)}"},
        "rows": rows,
        "effect_similarity": similarity,
        "plain_output_similarity": outputs,
        "images": {k: len(v) for k, v in prompt_sets.items()},
        "elapsed_s": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
    }
    lines = ["| model | \"circle\" prompts read as square | colour kept | other prompts: accuracy | other: read as square |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        other = r.get("other", {})
        lines.append(f"| {name} | {r['circle']['target_share']:.3f} | {r['circle']['color_kept']:.3f} | "
                     f"{other.get('accuracy', float('nan')):.3f} | {other.get('target_share', float('nan')):.3f} |")
    lines += ["", "| LoRA effect on the UNet output, vs the teacher's | cosine | min cosine | norm ratio |",
              "|---|---|---|---|"]
    for name, s in similarity.items():
        lines.append(f"| {name} | {s['cosine']:.3f} | {s['cosine_min']:.3f} | {s['norm_ratio']:.3f} |")
    lines.append(f"| (no LoRA) distilled student's output vs teacher's | {outputs['cosine']:.3f} | "
                 f"{outputs['cosine_min']:.3f} | {outputs['norm_ratio']:.3f} |")
    table = "\n".join(lines)
    with open(os.path.join(args.work_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(args.work_dir, "table.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    if args.grid:
        prompts = prompt_sets["circle"]
        comparison_grid({n: folders[n]["circle"] for n in rows}, prompts,
                        list(range(0, len(prompts), args.images_per_prompt)), args.grid)
    print(table)
    print(json.dumps({k: summary[k] for k in ("training", "transfer", "images", "elapsed_s", "threads")}))


if __name__ == "__main__":
    main()
