"""The demo of the miniature world (`bksdm demo`): the whole BK-SDM flow, offline on a CPU in a few minutes.

The trained teacher shipped with the package (`builtin:shapes-sd`, 32 px pictures of coloured shapes) is compressed
to a BK-SDM student, distilled with the real trainer (:func:`diffusers_bksdm.training.train.train`), saved as a
pipeline that stock diffusers loads, and judged before and after distillation on prompts the teacher never saw in
training. See docs/miniature.md.

```python
from diffusers_bksdm.miniature.demo import run_demo

summary = run_demo("bksdm-demo", max_train_steps=3, num_images=32, train_batch_size=8, images_per_prompt=1,
                   num_inference_steps=4, log=print)
```
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Any

from .._naming import argument_namer

__all__ = ["GRID_PROMPTS", "run_demo", "is_demo_folder", "reload_in_stock_diffusers", "results_table"]

logger = logging.getLogger(__name__)

#: held-out prompts shown in `grid.png` (one column each)
GRID_PROMPTS = 8


def is_demo_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder` is a demo folder written before the output marker existed: its summary.json names its
    student and holds its results (what `overwrite_output_dir=True` may replace besides a marked folder)."""
    try:
        with open(os.path.join(os.fspath(folder), "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and "student_dir" in summary and "results" in summary


def reload_in_stock_diffusers(student_dir: str | os.PathLike, prompt: str) -> str:
    """Load the student pipeline and make an image (5 steps, seed 0) in a fresh interpreter that never imports this
    package. Returns what that interpreter printed: the pipeline's and the UNet's class names and the image size.

    Raises:
        RuntimeError: the pipeline did not load or make an image there (the message ends with its stderr).
    """
    student_dir = os.fspath(student_dir)
    code = (
        "import sys, torch\n"
        "from diffusers import StableDiffusionPipeline\n"
        f"pipe = StableDiffusionPipeline.from_pretrained({student_dir!r}, use_safetensors=True)\n"
        f"image = pipe({prompt!r}, num_inference_steps=5, generator=torch.Generator().manual_seed(0)).images[0]\n"
        "assert not any(m.startswith('diffusers_bksdm') for m in sys.modules), 'diffusers_bksdm was imported'\n"
        "print(type(pipe).__name__, type(pipe.unet).__name__, image.size)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"The student pipeline did not reload in stock diffusers:\n{done.stderr[-2000:]}")
    return done.stdout.strip()


def results_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """The demo's results (`summary["results"]`) as a text table: one line per model."""
    lines = [
        f"{'model':<24} {'UNet params':>12} {'latency ms':>11} {'accuracy':>9} {'position':>9} {'FD':>8} "
        f"{'seen acc.':>9}",
    ]
    for name, row in rows.items():
        lines.append(
            f"{name:<24} {row['unet_params']:>12,} {1000 * row['unet_latency_s']:>11.2f} {row['accuracy']:>9.3f} "
            f"{row['position_accuracy']:>9.3f} {row['fd']:>8.2f} {row['seen_accuracy']:>9.3f}"
        )
    return "\n".join(lines)


def _check(names: Callable[[str], str], student_variant: str, counts: Mapping[str, Any], learning_rate: Any,
           seed: Any) -> None:
    from ..plan import get_variant, list_variants
    from ..training.args import MAX_SEED

    try:
        get_variant(student_variant)
    except ValueError:
        raise ValueError(f"`{names('student_variant')}` {student_variant!r} is not a BK-SDM variant; known variants: "
                         f"{list_variants()}.") from None
    for name, value in counts.items():
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"`{names(name)}` must be an integer >= 1, got {value!r}.")
    number = isinstance(learning_rate, (int, float)) and not isinstance(learning_rate, bool)
    if not (number and math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"`{names('learning_rate')}` must be a finite number > 0, got {learning_rate!r}.")
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= MAX_SEED):
        raise ValueError(f"`{names('seed')}` must be an integer in [0, {MAX_SEED}] (numpy's seed range), got "
                         f"{seed!r}.")


def run_demo(
    output_dir: str | os.PathLike = "bksdm-demo",
    *,
    teacher: str = "builtin:shapes-sd",
    student_variant: str = "small",
    max_train_steps: int = 300,
    train_batch_size: int = 64,
    num_images: int = 4000,
    learning_rate: float = 5e-4,
    images_per_prompt: int = 4,
    num_inference_steps: int = 50,
    judge: str = "builtin:shapes-judge",
    seed: int = 0,
    overwrite_output_dir: bool = False,
    argument_names: Mapping[str, str] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Compress the teacher to a BK-SDM student, distill it on the generated shapes dataset and judge teacher,
    student before and student after distillation on the held-out prompts.

    Writes into `output_dir`: `data/{train,heldout}` (the shapes dataset), `images/<model>/im32` (the judged
    pictures), `student/` (the distilled pipeline, with its `train_log.csv`), `grid.png`, `loss_curve.png` and
    `summary.json`.

    Args:
        output_dir (`str` or `os.PathLike`, *optional*, defaults to `"bksdm-demo"`): a new or empty folder, or an
            earlier demo's folder with `overwrite_output_dir=True`; never the teacher's folder or the current
            directory.
        teacher (`str`, *optional*, defaults to `"builtin:shapes-sd"`): the teacher pipeline (32 px shapes); images
            are made and judged at its native size.
        student_variant (`str`, *optional*, defaults to `"small"`): BK-SDM variant: `base`, `small` or `tiny`.
        max_train_steps (`int`, *optional*, defaults to 300): distillation steps.
        train_batch_size (`int`, *optional*, defaults to 64): distillation batch size.
        num_images (`int`, *optional*, defaults to 4000): images in the generated training set.
        learning_rate (`float`, *optional*, defaults to 5e-4): higher than the paper's 5e-5: a few hundred steps.
        images_per_prompt (`int`, *optional*, defaults to 4): judged images per held-out prompt.
        num_inference_steps (`int`, *optional*, defaults to 50): denoising steps of the judged images.
        judge (`str`, *optional*, defaults to `"builtin:shapes-judge"`): the judge (a `ShapesJudge` folder).
        seed (`int`, *optional*, defaults to 0): seeds the dataset, the student's training and `torch`.
        overwrite_output_dir (`bool`, *optional*, defaults to `False`): replace an earlier demo in `output_dir`
            (only a folder the demo wrote).
        argument_names (`Mapping[str, str]`, *optional*): how errors name each keyword (e.g. a command passes
            `{"max_train_steps": "--max_train_steps", "teacher": "--pretrained_model_name_or_path"}`); a keyword
            not in it is named as itself.
        log (`Callable[[str], None]`, *optional*): receives the progress lines (`[1/5] ...`); defaults to this
            module's logger (`logging.INFO`). Pass `print` to see them on stdout.

    Returns:
        `dict`: the summary written to `output_dir/summary.json`: the settings, `results` (per model: UNet
        parameters and latency, the judge's accuracy, position accuracy, FD and accuracy on seen combinations),
        `stock_diffusers_reload`, `student_dir`, `grid` and `loss_curve`.

    Raises:
        ValueError: a setting out of range or an output folder that is refused, before anything is written; the
            message names the argument (as `argument_names` says), the value and what is accepted.
    """
    names = argument_namer(argument_names)
    log = log if log is not None else logger.info
    counts = {"max_train_steps": max_train_steps, "train_batch_size": train_batch_size, "num_images": num_images,
              "images_per_prompt": images_per_prompt, "num_inference_steps": num_inference_steps}
    _check(names, student_variant, counts, learning_rate, seed)

    import torch

    from ..outputs import atomic_write_text, check_output_dir, write_marker
    from ..pipelines import count_parameters, load_teacher, with_components
    from ..student import compress_pipeline
    from ..training.args import parse_train_args
    from ..training.train import LOG_FILE, train
    from . import world as miniature
    from .judge import load_judge

    # the output policy, before anything is written: never the teacher's folder or the cwd; an earlier demo only
    # with overwrite_output_dir
    check_output_dir(output_dir, overwrite=overwrite_output_dir, ours=is_demo_folder,
                     inputs=[(f"the teacher ({names('teacher')})", teacher)],
                     argument=names("output_dir"), overwrite_flag=names("overwrite_output_dir"))
    torch.manual_seed(seed)
    out = os.path.abspath(output_dir)
    os.makedirs(out, exist_ok=True)
    write_marker(out, "bksdm demo")
    student_dir = os.path.join(out, "student")
    log(f"[1/5] writing the shapes dataset ({num_images} training images, held-out real images) to {out}/data")
    world = miniature.write_world(os.path.join(out, "data"), num_images, seed=seed)
    teacher_pipe, _ = load_teacher(teacher, argument=names("teacher"))
    if teacher_pipe is None:
        raise ValueError(f"`{names('teacher')}` {teacher!r} is a bare UNet.")
    judge_model = load_judge(judge)
    before = compress_pipeline(teacher_pipe, student_variant)
    judged = dict(
        real_images=world["heldout"],
        judge=judge_model,
        images_per_prompt=images_per_prompt,
        num_inference_steps=num_inference_steps,
    )
    images = {name: os.path.join(out, "images", name) for name in ("teacher", "student_before", "student_after")}

    log("[2/5] judging the teacher and the student before distillation on the held-out prompts")
    scores = {
        "teacher": miniature.evaluate_pipeline(teacher_pipe, images["teacher"], **judged),
        "student_before": miniature.evaluate_pipeline(before, images["student_before"], **judged),
    }
    del before

    log(f"[3/5] distilling BK-SDM-{student_variant} for {max_train_steps} steps (task + output KD + feature KD)")
    train_args = parse_train_args(
        [
            "--pretrained_model_name_or_path", teacher,
            "--student_variant", student_variant,
            "--train_data_dir", world["train"],
            "--no-random_flip",  # captions say left and right
            "--train_batch_size", str(train_batch_size),
            "--max_train_steps", str(max_train_steps),
            "--learning_rate", str(learning_rate),
            "--checkpointing_steps", str(max_train_steps),
            "--checkpoints_total_limit", "1",
            "--report_to", "none",
            "--seed", str(seed),
            "--output_dir", student_dir,
            *(["--overwrite_output_dir"] if overwrite_output_dir else []),
        ]
    )  # fmt: skip
    result = train(train_args, teacher_pipeline=teacher_pipe)
    after = with_components(teacher_pipe, unet=result["student"].to(torch.float32).eval())

    log("[4/5] judging the distilled student; reloading it in stock diffusers")
    scores["student_after"] = miniature.evaluate_pipeline(after, images["student_after"], **judged)
    prompts = miniature.eval_prompt_list(images_per_prompt)
    reload = reload_in_stock_diffusers(student_dir, prompts[0])

    log("[5/5] timing the UNets side by side and writing the pictures")
    latency = miniature.unet_latency({"teacher": teacher_pipe.unet, "student": after.unet})
    rows = {}
    for name, label in (("teacher", "teacher"), ("student_before", "student before"), ("student_after", "student after")):
        unet = teacher_pipe.unet if name == "teacher" else after.unet
        rows[label] = {
            **scores[name],
            "unet_params": count_parameters(unet),
            "unet_latency_s": latency["teacher" if name == "teacher" else "student"],
        }
    stride = images_per_prompt * max(1, len(prompts) // images_per_prompt // GRID_PROMPTS)
    grid = miniature.comparison_grid(
        {
            "teacher": os.path.join(images["teacher"], "im32"),
            "student before KD": os.path.join(images["student_before"], "im32"),
            "student after KD": os.path.join(images["student_after"], "im32"),
        },
        prompts,
        list(range(0, len(prompts), stride))[:GRID_PROMPTS],
        os.path.join(out, "grid.png"),
    )
    curve = miniature.loss_curve(os.path.join(student_dir, LOG_FILE), os.path.join(out, "loss_curve.png"))
    summary = {
        "teacher": teacher,
        "variant": student_variant,
        "steps": result["global_step"],
        "train_batch_size": train_batch_size,
        "learning_rate": learning_rate,
        "images_per_prompt": images_per_prompt,
        "num_inference_steps": num_inference_steps,
        "seed": seed,
        "results": rows,
        "stock_diffusers_reload": reload,
        "student_dir": student_dir,
        "grid": grid,
        "loss_curve": curve,
    }
    atomic_write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=2))
    return summary
