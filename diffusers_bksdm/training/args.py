"""Command-line arguments of the trainer (`bksdm distill`, `python -m diffusers_bksdm.train`).

Flag names, meanings and error messages follow diffusers' `examples/text_to_image/train_text_to_image.py` and the
vocabulary shared by every `bksdm` command (`diffusers_bksdm.commands._flags`: `--teacher` is an alias of
`--pretrained_model_name_or_path`, no abbreviations); the defaults are the BK-SDM paper's recipe (AdamW, constant lr
5e-5, no warm-up, grad-norm clip 1, resize + center crop + random flip at the teacher's native size: 512 px for SD
v1). This module imports nothing heavy, so `bksdm --help` stays fast.
"""

from __future__ import annotations

import argparse
import math
import warnings

from ..commands._flags import HelpFormatter, add_hub_arguments, add_model_argument, add_output_dir_argument

__all__ = [
    "add_train_arguments",
    "add_variant_arguments",
    "resolve_variant_arguments",
    "build_train_parser",
    "parse_train_args",
    "check_train_args",
    "check_optimizer_arguments",
    "add_eval_arguments",
    "check_eval_arguments",
    "parse_eval_metrics",
    "SECRET_ARGS",
    "LR_SCHEDULERS",
    "EVAL_METRICS",
]

#: arguments never written to trackers, model cards, logs or checkpoints
SECRET_ARGS = ("hub_token",)

#: `--lr_scheduler` values (diffusers' `SchedulerType` without `piecewise_constant`, which needs step rules)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")

#: `--eval_metrics` values: the judge's scores on the miniature world (cheap, no download), and `bksdm eval`'s
#: FID / IS / CLIP score (FID and IS need the `eval` extras and Inception weights, CLIP score a CLIP model)
EVAL_METRICS = ("accuracy", "position_accuracy", "full_accuracy", "fd", "fid", "is", "clip")
#: the metrics `--eval_metrics` defaults to: the judge's with a `builtin:shapes-sd` teacher, else CLIP score
DEFAULT_JUDGE_METRICS = ("accuracy", "position_accuracy", "fd")
DEFAULT_PROMPT_METRICS = ("clip",)
#: numpy's seed range, which `accelerate.utils.set_seed` seeds too
MAX_SEED = 2**32 - 1


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value!r}")
    return number


def add_variant_arguments(group) -> None:
    """`--student_variant` (the BK-SDM variant) and `--variant` (the teacher's weight files, as in diffusers)."""
    group.add_argument("--student_variant", type=str, default=None,
                       help="BK-SDM variant of the student: base, small (default), tiny, koala-1b, koala-700m or a "
                            "registered name.")
    group.add_argument("--plan", type=str, default=None,
                       help="A removal plan JSON file (RemovalPlan.to_json; see docs/families.md) instead of "
                            "--student_variant; the student's metadata records it.")
    group.add_argument("--variant", type=str, default=None,
                       help="Variant of the teacher's weight files, e.g. fp16 (as in diffusers' scripts). A BK-SDM "
                            "variant name here still selects the student (deprecated: use --student_variant).")


def resolve_variant_arguments(args: argparse.Namespace, default: str = "small") -> None:
    """Read the old spelling `--variant small` as `--student_variant small` (with a `FutureWarning`); any other
    `--variant` value stays the teacher's weight file variant. Sets `args.student_variant` (default `default`).

    A command that shares the trainer's optimizer flags (`bksdm demo`) also gets their checks here, before anything
    is written (:func:`check_optimizer_arguments`; flags the namespace lacks are not checked)."""
    from ..plan import list_variants, load_plan_file

    if getattr(args, "plan", None) is not None:
        name = load_plan_file(args.plan, argument="--plan")
        if args.student_variant not in (None, name):  # (`name` when the arguments were resolved before)
            raise ValueError(f"Pass either `--plan` or `--student_variant`, not both; got --plan {args.plan!r} and "
                             f"--student_variant {args.student_variant!r}.")
        args.student_variant = name
    if args.variant is not None and args.variant in list_variants():
        if args.student_variant not in (None, args.variant):
            raise ValueError(f"`--variant` {args.variant!r} is a BK-SDM variant and `--student_variant` is "
                             f"{args.student_variant!r}; pass the student's variant once, as --student_variant.")
        warnings.warn(f"`--variant {args.variant}` for the student is deprecated and will be removed: use "
                      f"`--student_variant {args.variant}`. `--variant` selects the teacher's weight files (e.g. "
                      "fp16), as in diffusers' scripts.", FutureWarning, stacklevel=2)
        args.student_variant, args.variant = args.variant, None
    if args.student_variant is None:
        args.student_variant = default
    check_optimizer_arguments(args)


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    model = parser.add_argument_group("teacher and student")
    add_model_argument(model, help="The teacher pipeline: a local folder, a hub repo id, or a built-in teacher "
                       "(builtin:tiny-sd, builtin:shapes-sd).")
    model.add_argument("--revision", type=str, default=None,
                       help="Hub revision of the teacher; default: the main branch.")
    add_variant_arguments(model)
    model.add_argument("--lambda_task", type=float, default=1.0, help="Weight of the task (denoising) loss.")
    model.add_argument("--lambda_out", type=float, default=1.0, help="Weight of the output-level KD loss.")
    model.add_argument("--lambda_feat", type=float, default=1.0, help="Weight of the feature-level KD loss.")
    model.add_argument("--feature_pairs", type=str, default="bk", choices=["bk", "all", "self-attn"],
                       help="bk: BK-SDM's feature pairs; all: also the mid block where both UNets have one; "
                            "self-attn: KOALA's, the self-attention output of every kept transformer block.")
    model.add_argument("--student_init", type=str, default="teacher", choices=["teacher", "random"],
                       help="Initialise the student from the teacher's weights (BK-SDM) or at random (ablation).")
    model.add_argument("--normalize_features", action="store_true",
                       help="Divide each feature loss by the teacher feature's mean square (LAPTOP-Diff).")
    model.add_argument("--teacher_dtype", type=str, default=None, choices=["fp32", "fp16", "bf16"],
                       help="dtype of the frozen teacher UNet; default: the --mixed_precision dtype "
                            "(fp32 without).")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", type=str, default=None,
                      help="A `datasets` dataset: hub name, a folder saved with save_to_disk, or a folder "
                           "load_dataset reads.")
    data.add_argument("--dataset_config_name", type=str, default=None,
                      help="The config of the dataset; default: its default config.")
    data.add_argument("--train_data_dir", type=str, default=None,
                      help="An image folder with metadata.csv or metadata.jsonl (file_name + caption column).")
    data.add_argument("--train_shards", type=str, default=None,
                      help="webdataset tar shards, e.g. 'data/{00000..00099}.tar' (img2dataset layout); streamed "
                           "and split across processes. Needs --max_train_steps.")
    data.add_argument("--latent_cache_dir", type=str, default=None,
                      help="Train from a latent cache written by `bksdm cache` (no VAE encoder / text encoder).")
    data.add_argument("--image_column", type=str, default="image", help="Image column of --dataset_name.")
    data.add_argument("--caption_column", type=str, default="text",
                      help="Caption column (--dataset_name, --train_data_dir metadata, or the key in webdataset "
                           "samples: 'txt' is read when this one is missing).")
    data.add_argument("--max_train_samples", type=int, default=None,
                      help="Truncate the training set to this many samples; default: all.")
    data.add_argument("--cache_dir", type=str, default=None,
                      help="Where downloaded models and datasets are stored; default: the Hugging Face cache.")
    data.add_argument("--resolution", type=int, default=None,
                      help="Training resolution; default: the teacher's native size (UNet sample_size x the VAE "
                           "scale factor: 512 for SD v1, 32 for builtin:shapes-sd).")
    data.add_argument("--center_crop", action=argparse.BooleanOptionalAction, default=True,
                      help="Center crop (default, as in BK-SDM); --no-center_crop crops at random.")
    data.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=True,
                      help="Flip images horizontally at random (default, as in BK-SDM).")
    data.add_argument("--dataloader_num_workers", type=int, default=0,
                      help="Subprocesses for data loading (0: in the main process).")
    data.add_argument("--shuffle_buffer", type=int, default=1000, help="webdataset shuffle buffer (0: no shuffle).")

    train = parser.add_argument_group("training")
    add_output_dir_argument(train, required=False, default="bk-sdm-student", deprecated=(),
                            help="Where the checkpoints, logs and the final student pipeline are written. A folder "
                            "that holds anything else is refused unless --overwrite_output_dir is given or "
                            "--resume_from_checkpoint points into it.")
    train.add_argument("--overwrite_output_dir", action="store_true",
                       help="Train into a non-empty --output_dir: its old checkpoints, training log, validation "
                            "grids and model_index.json are removed first. The teacher's folder is never accepted.")
    train.add_argument("--seed", type=int, default=None,
                       help="A seed for reproducible training; default: a random one (recorded in checkpoints).")
    train.add_argument("--train_batch_size", type=_positive_int, default=16, help="Batch size per device.")
    train.add_argument("--num_train_epochs", type=int, default=100, help="Epochs, unless --max_train_steps is given.")
    train.add_argument("--max_train_steps", type=int, default=None,
                       help="Total optimizer steps; overrides --num_train_epochs. Default: from --num_train_epochs.")
    train.add_argument("--gradient_accumulation_steps", type=_positive_int, default=1,
                       help="Steps to accumulate before an update (BK-SDM: batch 64 x 4 accumulation = 256).")
    train.add_argument("--gradient_checkpointing", action="store_true",
                       help="Trade compute for memory in the student's backward pass.")
    train.add_argument("--learning_rate", type=float, default=5e-5, help="Learning rate (BK-SDM: 5e-5).")
    train.add_argument("--scale_lr", action="store_true",
                       help="Scale the learning rate by GPUs x accumulation steps x batch size.")
    train.add_argument("--lr_scheduler", type=str, default="constant",
                       help=f"One of {', '.join(LR_SCHEDULERS)}.")
    train.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up steps (BK-SDM: none).")
    train.add_argument("--use_8bit_adam", action="store_true", help="8-bit Adam from bitsandbytes.")
    train.add_argument("--allow_tf32", action="store_true", help="Allow TF32 on Ampere GPUs.")
    train.add_argument("--use_ema", action="store_true", help="Keep an EMA of the student; the output uses it.")
    train.add_argument("--ema_decay", type=float, default=0.9999, help="EMA decay.")
    train.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    train.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    train.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay.")
    train.add_argument("--adam_epsilon", type=float, default=1e-08, help="AdamW epsilon.")
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="Max gradient norm (BK-SDM: 1).")
    train.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                       help="Mixed precision; default: the accelerate config or `--mixed_precision` of `accelerate "
                            "launch`.")
    train.add_argument("--on_nonfinite", type=str, default="raise", choices=["raise", "skip"],
                       help="What a NaN/inf loss does: raise, or skip the optimizer step (no update of the weights, "
                            "the optimizer state, the learning-rate schedule or the EMA).")
    train.add_argument("--max_nonfinite_skips", type=int, default=10,
                       help="With --on_nonfinite skip: stop with an error after this many skipped optimizer steps in "
                            "a row.")

    logging = parser.add_argument_group("logging, checkpoints and validation")
    logging.add_argument("--logging_dir", type=str, default="logs",
                         help="TensorBoard log directory, relative to --output_dir.")
    logging.add_argument("--report_to", type=str, default="tensorboard",
                         help='"tensorboard", "wandb", "all" or "none". A CSV of every loss term is always written.')
    logging.add_argument("--tracker_project_name", type=str, default="bksdm-distill",
                         help="Project name of the trackers (TensorBoard, wandb).")
    logging.add_argument("--checkpointing_steps", type=int, default=500,
                         help="Save a checkpoint (accelerate state + unet/ folders) every X updates.")
    logging.add_argument("--checkpoints_total_limit", type=int, default=None,
                         help="Max checkpoints to keep; default: all.")
    logging.add_argument("--resume_from_checkpoint", type=str, default=None,
                         help='A checkpoint folder, or "latest" for the last complete one in --output_dir; default: '
                              "a new run.")
    logging.add_argument("--validation_prompts", type=str, default=None, nargs="+",
                         help="Prompts rendered by teacher and student every --validation_steps (a grid PNG); "
                              "default: no validation.")
    logging.add_argument("--validation_steps", type=int, default=500, help="Validate every X updates.")
    logging.add_argument("--validation_inference_steps", type=int, default=25,
                         help="Denoising steps of the validation images.")
    logging.add_argument("--validation_guidance_scale", type=float, default=7.5,
                         help="Guidance scale of the validation images.")

    add_eval_arguments(parser)

    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true", help="Push the final student pipeline to the hub.")
    add_hub_arguments(hub, model_id_help="Repo to push to; default: the --output_dir folder name under your account.")
    return parser


def build_train_parser(prog: str = "bksdm distill") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Distill a BK-SDM student from a Stable Diffusion teacher (accelerate: multi-GPU, mixed "
        "precision, checkpoints that resume exactly).",
        allow_abbrev=False,
        formatter_class=HelpFormatter,
    )
    return add_train_arguments(parser)


def parse_train_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_train_parser().parse_args(argv)
    check_train_args(args)
    return args


def check_train_args(args: argparse.Namespace) -> None:
    """Reject inconsistent arguments before anything is loaded (the messages name the flags)."""
    resolve_variant_arguments(args)
    sources = [name for name in ("dataset_name", "train_data_dir", "train_shards", "latent_cache_dir")
               if getattr(args, name)]
    if not sources:
        raise ValueError("Need either a dataset name or a training folder (--dataset_name, --train_data_dir, "
                         "--train_shards or --latent_cache_dir).")
    if len(sources) > 1:
        raise ValueError(f"Pass only one data source; got {', '.join('--' + s for s in sources)}.")
    if args.train_shards and args.max_train_steps is None:
        raise ValueError("--train_shards streams data of unknown length: pass --max_train_steps.")
    for name, minimum in (("num_train_epochs", 1), ("max_train_steps", 1), ("checkpointing_steps", 1),
                          ("validation_steps", 1), ("checkpoints_total_limit", 1), ("lr_warmup_steps", 0),
                          ("dataloader_num_workers", 0), ("max_train_samples", 1), ("shuffle_buffer", 0),
                          ("validation_inference_steps", 1), ("resolution", 8),
                          ("max_nonfinite_skips", 1)):
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ValueError(f"`--{name}` must be >= {minimum}, got {value!r}.")
    if args.resolution is not None and args.resolution % 8:
        raise ValueError(f"`--resolution` must be a multiple of 8, got {args.resolution}.")
    if not args.max_grad_norm > 0:
        raise ValueError(f"`--max_grad_norm` must be > 0, got {args.max_grad_norm!r}.")
    check_optimizer_arguments(args)
    lambdas = {name: getattr(args, name) for name in ("lambda_task", "lambda_out", "lambda_feat")}
    for name, value in lambdas.items():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"`--{name}` must be a finite number >= 0, got {value!r}.")
    if not any(lambdas.values()):
        raise ValueError("`--lambda_task`, `--lambda_out` and `--lambda_feat` are all 0: the loss would be 0 and the "
                         "student would never change; give at least one of them a weight > 0 (BK-SDM: 1, 1, 1).")
    check_eval_arguments(args)
    if not 0.0 <= args.ema_decay <= 1.0:
        raise ValueError(f"`--ema_decay` must be in [0, 1], got {args.ema_decay!r}.")
    if args.report_to not in ("tensorboard", "wandb", "all", "none"):
        raise ValueError(f"`--report_to` must be one of tensorboard, wandb, all, none; got {args.report_to!r}.")
    if args.report_to in ("wandb", "all") and args.hub_token is not None:
        raise ValueError(
            "You cannot use both --report_to=wandb and --hub_token due to a security risk of exposing your token."
            " Please use `hf auth login` to authenticate with the Hub."
        )
    if args.hub_model_id and not args.push_to_hub:
        raise ValueError("--hub_model_id needs --push_to_hub.")


def _finite(args: argparse.Namespace, name: str, low: float, high: float | None = None, *, low_open: bool = False,
            high_open: bool = True) -> None:
    value = getattr(args, name, None)
    if value is None:
        return
    above = value > low if low_open else value >= low
    below = high is None or (value < high if high_open else value <= high)
    if not (isinstance(value, (int, float)) and math.isfinite(value) and above and below):
        accepted = f"{'>' if low_open else '>='} {low:g}" if high is None else (
            f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")
        raise ValueError(f"`--{name}` must be a finite number {accepted}, got {value!r}.")


def check_optimizer_arguments(args: argparse.Namespace) -> None:
    """Check the optimizer, schedule and seed flags present on `args` (`--learning_rate`, `--adam_*`,
    `--lr_scheduler`, `--seed`): a `ValueError` names the flag, the value and what is accepted. Called by
    :func:`check_train_args` and, for commands that share these flags, by :func:`resolve_variant_arguments`."""
    _finite(args, "learning_rate", 0.0, low_open=True)
    _finite(args, "adam_beta1", 0.0, 1.0)
    _finite(args, "adam_beta2", 0.0, 1.0)
    _finite(args, "adam_epsilon", 0.0)
    _finite(args, "adam_weight_decay", 0.0)
    scheduler = getattr(args, "lr_scheduler", None)
    if scheduler is not None and scheduler not in LR_SCHEDULERS:
        raise ValueError(f"`--lr_scheduler` must be one of {', '.join(LR_SCHEDULERS)}; got {scheduler!r}.")
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ValueError(f"`--seed` must be an integer in [0, {MAX_SEED}] (numpy's seed range), got {seed!r}.")


#: how `bksdm lcm --eval_steps` renders its student by default: as it is used, a few steps of its LCMScheduler, with
#: the pipelines' default guidance scale
LCM_EVAL_STEPS = 4
LCM_EVAL_GUIDANCE = 7.5


def add_eval_arguments(parser: argparse.ArgumentParser, *, default_steps: str = "--validation_inference_steps",
                       default_guidance: str = "--validation_guidance_scale") -> argparse.ArgumentParser:
    """The `--eval_*` flags (evaluation during training) of `bksdm distill` and `bksdm lcm`; `default_steps` and
    `default_guidance` say in the help what the steps and guidance scale of the evaluation images default to."""
    evaluation = parser.add_argument_group("evaluation during training")
    evaluation.add_argument("--eval_steps", type=int, default=None,
                            help="Evaluate the student every X updates and at the end (scores in train_log.csv, the "
                                 "trackers, eval_curve.png and the model card); default: no evaluation.")
    evaluation.add_argument("--eval_prompts_file", type=str, default=None,
                            help="Prompts to evaluate, one per line (UTF-8); default with a builtin:shapes-sd "
                                 "teacher (or a student of it): the miniature world's held-out prompts, judged by "
                                 "builtin:shapes-judge.")
    evaluation.add_argument("--eval_metrics", type=str, default=None,
                            help=f"Comma-separated, from {', '.join(EVAL_METRICS)}. accuracy, position_accuracy, "
                                 "full_accuracy and fd are the judge's (builtin:shapes-sd or its students only); "
                                 "fid, is and clip are `bksdm eval`'s (fid needs --eval_real_images). Default: "
                                 f"{','.join(DEFAULT_JUDGE_METRICS)} on the miniature world, else "
                                 f"{','.join(DEFAULT_PROMPT_METRICS)}.")
    evaluation.add_argument("--eval_num_prompts", type=int, default=8,
                            help="Prompts evaluated (the first ones of the file or of the held-out list).")
    evaluation.add_argument("--eval_images_per_prompt", type=int, default=1, help="Images per evaluated prompt.")
    evaluation.add_argument("--eval_inference_steps", type=int, default=None,
                            help=f"Denoising steps of the evaluation images; default: {default_steps}.")
    evaluation.add_argument("--eval_guidance_scale", type=float, default=None,
                            help=f"Guidance scale of the evaluation images; default: {default_guidance}.")
    evaluation.add_argument("--eval_real_images", type=str, default=None,
                            help="A folder of real images for fd / fid; default on the miniature world: held-out "
                                 "pictures written to OUTPUT/eval/real.")
    evaluation.add_argument("--eval_clip_model", type=str, default=None,
                            help="CLIP model of the clip metric; default: bksdm eval's (ViT-g-14).")
    return parser


def parse_eval_metrics(value: str | None, judge: bool) -> list[str]:
    """The metrics of `--eval_metrics` (comma-separated), or the default for the world (`judge`: a
    `builtin:shapes-sd` teacher or a student of it, :func:`diffusers_bksdm.miniature.world.is_shapes_world`).
    Unknown names, repeats and judge metrics without the judge are refused."""
    if value is None:
        return list(DEFAULT_JUDGE_METRICS if judge else DEFAULT_PROMPT_METRICS)
    metrics = [m.strip().lower() for m in value.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in EVAL_METRICS]
    if not metrics or unknown or len(set(metrics)) != len(metrics):
        raise ValueError(f"`--eval_metrics` must be a comma-separated list of distinct names from "
                         f"{', '.join(EVAL_METRICS)}; got {value!r}.")
    judged = [m for m in metrics if m in ("accuracy", "position_accuracy", "full_accuracy", "fd")]
    if judged and not judge:
        raise ValueError(f"`--eval_metrics` {','.join(judged)}: the judge only reads the miniature world; these need "
                         "--pretrained_model_name_or_path builtin:shapes-sd or a student of it. Accepted for other "
                         "teachers: fid, is, clip.")
    return metrics


def check_eval_arguments(args: argparse.Namespace) -> None:
    """Check the `--eval_*` flags (before anything is loaded): each error names the flag, the value and what is
    accepted. Prompts come from `--eval_prompts_file`, or from the miniature world with a `builtin:shapes-sd`
    teacher."""
    import os

    steps = getattr(args, "eval_steps", None)
    given = [n for n in ("eval_prompts_file", "eval_metrics", "eval_real_images", "eval_clip_model")
             if getattr(args, n, None) is not None]
    if steps is None:
        if given:
            raise ValueError(f"`--{given[0]}` needs `--eval_steps` (evaluate every N updates, N >= 1).")
        return
    if steps < 1:
        raise ValueError(f"`--eval_steps` must be an integer >= 1, got {steps!r}.")
    for name in ("eval_num_prompts", "eval_images_per_prompt", "eval_inference_steps"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"`--{name}` must be an integer >= 1, got {value!r}.")
    if args.eval_guidance_scale is not None:
        _finite(args, "eval_guidance_scale", 0.0)
    from ..miniature.world import is_shapes_world

    judge = is_shapes_world(args.pretrained_model_name_or_path)
    if args.eval_prompts_file is None and not judge:
        raise ValueError("`--eval_steps` needs `--eval_prompts_file` (one prompt per line) with the teacher "
                         f"{args.pretrained_model_name_or_path!r}; only builtin:shapes-sd and its students (a "
                         "pipeline folder with its text encoder) have built-in evaluation prompts.")
    if args.eval_prompts_file is not None and not os.path.isfile(args.eval_prompts_file):
        raise FileNotFoundError(f"`--eval_prompts_file` {args.eval_prompts_file!r} is not a file; accepted: a UTF-8 "
                                "text file with one prompt per line.")
    metrics = parse_eval_metrics(args.eval_metrics, judge)
    if args.eval_real_images is not None and not os.path.isdir(args.eval_real_images):
        raise FileNotFoundError(f"`--eval_real_images` {args.eval_real_images!r} is not a folder of images.")
    if "fid" in metrics and args.eval_real_images is None:
        raise ValueError("`--eval_metrics` fid needs `--eval_real_images` (a folder of real images).")
    if "is" in metrics and args.eval_num_prompts * args.eval_images_per_prompt < 10:
        raise ValueError(f"`--eval_metrics` is needs at least 10 images (10 splits); --eval_num_prompts "
                         f"{args.eval_num_prompts} x --eval_images_per_prompt {args.eval_images_per_prompt} gives "
                         f"{args.eval_num_prompts * args.eval_images_per_prompt}.")
    if "fd" in metrics and args.eval_num_prompts * args.eval_images_per_prompt < 2:
        raise ValueError("`--eval_metrics` fd needs at least 2 images: raise --eval_num_prompts or "
                         "--eval_images_per_prompt.")
