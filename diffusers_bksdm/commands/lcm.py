"""`bksdm lcm`: latent consistency distillation of a (BK-SDM) Stable Diffusion pipeline into a few-step pipeline
with an `LCMScheduler` (see `docs/lcm.md`).

A command of its own, as diffusers ships LCM distillation as its own example script
(`examples/consistency_distillation/train_lcm_distill_sd_wds.py`) beside `train_text_to_image.py`: the objective,
the models it holds (teacher, online student, target network) and the output (a new scheduler, a UNet with a
guidance-scale embedding) all differ from `bksdm distill`'s; the flags that mean the same thing are spelled the same.
"""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "add_lcm_arguments", "run"]


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value!r}")
    return number


def add_lcm_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of `bksdm lcm`: the trainer's vocabulary (`bksdm distill`) for what is shared, diffusers' LCM script's
    names for the LCM recipe (`--num_ddim_timesteps`, `--w_min`, `--w_max`, `--loss_type`, `--huber_c`,
    `--timestep_scaling_factor`, `--ema_decay`, `--unet_time_cond_proj_dim`)."""
    from ..training.args import LCM_EVAL_GUIDANCE, LCM_EVAL_STEPS, add_eval_arguments
    from ._flags import add_hub_arguments, add_model_argument, add_output_dir_argument

    model = parser.add_argument_group("teacher and student")
    add_model_argument(model, help="The teacher pipeline (SD v1 / v2): a distilled BK-SDM student folder, a hub repo "
                       "id, or a built-in teacher (builtin:shapes-sd, builtin:tiny-sd). The student starts from its "
                       "UNet.")
    model.add_argument("--revision", type=str, default=None, help="Hub revision of the teacher; default: main.")
    model.add_argument("--variant", type=str, default=None,
                       help="Variant of the teacher's weight files, e.g. fp16; default: the full-precision files.")
    model.add_argument("--teacher_dtype", type=str, default=None, choices=["fp32", "fp16", "bf16"],
                       help="dtype of the frozen teacher UNet; default: the --mixed_precision dtype (fp32 without).")
    model.add_argument("--unet_time_cond_proj_dim", type=int, default=256,
                       help="Size of the student's guidance-scale embedding (UNet `time_cond_proj_dim`); a teacher "
                       "UNet without one gets it (new config, teacher weights copied, the new projection at zero).")

    lcm = parser.add_argument_group("latent consistency distillation")
    lcm.add_argument("--num_ddim_timesteps", type=int, default=50,
                     help="Timesteps of the teacher's DDIM solver schedule (1000 / N skipped per solver step); "
                     "becomes the LCMScheduler's original_inference_steps.")
    lcm.add_argument("--w_min", type=float, default=5.0,
                     help="Smallest guidance weight w drawn (guidance scale w + 1 at inference).")
    lcm.add_argument("--w_max", type=float, default=15.0, help="Largest guidance weight w drawn.")
    lcm.add_argument("--loss_type", type=str, default="huber", choices=["l2", "huber"],
                     help="Distance between the student's and the target network's consistency functions.")
    lcm.add_argument("--huber_c", type=float, default=0.001, help="The pseudo-Huber loss constant c.")
    lcm.add_argument("--timestep_scaling_factor", type=float, default=10.0,
                     help="Timestep scaling of the boundary conditions c_skip / c_out (LCMScheduler's "
                     "timestep_scaling).")
    lcm.add_argument("--ema_decay", type=float, default=0.95,
                     help="EMA decay of the target network (the output pipeline holds the target's weights).")

    data = parser.add_argument_group("data (as for bksdm distill)")
    data.add_argument("--dataset_name", type=str, default=None,
                      help="A `datasets` dataset: hub name, a save_to_disk folder, or a folder load_dataset reads.")
    data.add_argument("--dataset_config_name", type=str, default=None, help="Its config; default: the default one.")
    data.add_argument("--train_data_dir", type=str, default=None,
                      help="An image folder with metadata.csv or metadata.jsonl (file_name + caption column).")
    data.add_argument("--train_shards", type=str, default=None,
                      help="webdataset tar shards, e.g. 'data/{00000..00099}.tar'; streamed. Needs --max_train_steps.")
    data.add_argument("--latent_cache_dir", type=str, default=None,
                      help="A latent cache written by `bksdm cache` from the same teacher.")
    data.add_argument("--image_column", type=str, default="image", help="Image column of --dataset_name.")
    data.add_argument("--caption_column", type=str, default="text", help="Caption column of the data.")
    data.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N samples; default: "
                      "all.")
    data.add_argument("--cache_dir", type=str, default=None,
                      help="Where downloaded models and datasets are stored; default: the Hugging Face cache.")
    data.add_argument("--resolution", type=int, default=None,
                      help="Training resolution; default: the teacher's native size.")
    data.add_argument("--center_crop", action=argparse.BooleanOptionalAction, default=True,
                      help="Center crop (default); --no-center_crop crops at random.")
    data.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=True,
                      help="Flip images horizontally at random (pass --no-random_flip for builtin:shapes-sd).")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Data loading subprocesses.")
    data.add_argument("--shuffle_buffer", type=int, default=1000, help="webdataset shuffle buffer (0: none).")

    train = parser.add_argument_group("training")
    add_output_dir_argument(train, required=False, default="bk-sdm-lcm", deprecated=(),
                            help="Checkpoints, log and the final few-step pipeline. A folder that holds anything "
                            "else is refused unless --overwrite_output_dir is given or --resume_from_checkpoint "
                            "points into it; the teacher's folder is always refused.")
    train.add_argument("--overwrite_output_dir", action="store_true",
                       help="Train into a non-empty --output_dir (its old checkpoints, log and model_index.json are "
                       "removed first).")
    train.add_argument("--seed", type=int, default=None, help="Seed; default: a random one (recorded in checkpoints).")
    train.add_argument("--train_batch_size", type=_positive_int, default=16, help="Batch size per device.")
    train.add_argument("--num_train_epochs", type=int, default=100, help="Epochs, unless --max_train_steps is given.")
    train.add_argument("--max_train_steps", type=int, default=None,
                       help="Total optimizer steps; overrides --num_train_epochs.")
    train.add_argument("--gradient_accumulation_steps", type=_positive_int, default=1,
                       help="Steps to accumulate before an update.")
    train.add_argument("--gradient_checkpointing", action="store_true", help="Save memory in the student's backward.")
    train.add_argument("--learning_rate", type=float, default=1e-6,
                       help="AdamW learning rate (1e-6 in diffusers' LCM example for SD v1.5; a small student on a small "
                       "world takes far more, see docs/lcm.md).")
    train.add_argument("--lr_scheduler", type=str, default="constant",
                       help='"linear", "cosine", "cosine_with_restarts", "polynomial", "constant" or '
                       '"constant_with_warmup".')
    train.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up steps.")
    train.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    train.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    train.add_argument("--adam_weight_decay", type=float, default=0.0, help="AdamW weight decay (0, as in "
                       "diffusers' LCM example).")
    train.add_argument("--adam_epsilon", type=float, default=1e-08, help="AdamW epsilon.")
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="Max gradient norm.")
    train.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                       help="Mixed precision; default: the accelerate config.")

    logging = parser.add_argument_group("logging and checkpoints")
    logging.add_argument("--logging_dir", type=str, default="logs", help="TensorBoard folder inside --output_dir.")
    logging.add_argument("--report_to", type=str, default="tensorboard",
                         help='"tensorboard", "wandb", "all" or "none". A CSV of the loss is always written.')
    logging.add_argument("--tracker_project_name", type=str, default="bksdm-lcm", help="Project name of trackers.")
    logging.add_argument("--checkpointing_steps", type=int, default=500,
                         help="Save a checkpoint (accelerate state, unet/ and unet_target/) every X updates.")
    logging.add_argument("--checkpoints_total_limit", type=int, default=None, help="Max checkpoints to keep; "
                         "default: all.")
    logging.add_argument("--resume_from_checkpoint", type=str, default=None,
                         help='A checkpoint folder, or "latest" for the last complete one in --output_dir; default: '
                         "a new run.")
    # the LCM student is evaluated as it is used: the target network, LCMScheduler, a few steps, the guidance as an
    # embedding (no classifier-free guidance batch)
    add_eval_arguments(parser, default_steps=str(LCM_EVAL_STEPS), default_guidance=f"{LCM_EVAL_GUIDANCE} (train "
                       "--w_min / --w_max around it: guidance scale = w + 1)")

    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true", help="Push the final pipeline to the hub.")
    add_hub_arguments(hub, model_id_help="Repo to push to; default: the --output_dir folder name under your account.")
    return parser


def add_parser(subparsers) -> None:
    from ._flags import add_command_parser

    parser = add_command_parser(
        subparsers,
        "lcm",
        help="Latent consistency distillation: a few-step (2-8 steps) pipeline with an LCMScheduler from a teacher "
        "or a BK-SDM student.",
        description="Distill a Stable Diffusion pipeline (e.g. a BK-SDM student from `bksdm distill`) into a "
        "latent consistency model: the teacher's guided DDIM solver on skipped timesteps, a guidance-scale embedding, "
        "an EMA target network. Saves a stock StableDiffusionPipeline with an LCMScheduler (run it with "
        "num_inference_steps=4). Multi-GPU: `accelerate launch -m diffusers_bksdm.commands.lcm` with the same flags.",
    )
    add_lcm_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from ..hub import PushError
    from ..outputs import OutputFolderBusy
    from ..training.lcm import train_lcm

    try:
        result = train_lcm(args)
    except (OutputFolderBusy, FloatingPointError, PushError) as error:
        print(f"bksdm lcm: error: {error}", file=sys.stderr)
        return 1
    if result["interrupted"]:
        print(f"interrupted at step {result['global_step']}; resume with --resume_from_checkpoint latest")
        return 128 + int(result["interrupted"])
    print(f"trained {result['global_step']} LCM steps; few-step pipeline in {result['output_dir']} "
          "(LCMScheduler: num_inference_steps=4)")
    if result.get("hub_url"):
        print(f"pushed to {result['hub_url']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m diffusers_bksdm.commands.lcm` / `accelerate launch -m diffusers_bksdm.commands.lcm`."""
    from ..cli import setup_logging
    from ._flags import HelpFormatter

    setup_logging()
    parser = argparse.ArgumentParser(prog="bksdm lcm", allow_abbrev=False, formatter_class=HelpFormatter,
                                     description="Latent consistency distillation (see `bksdm lcm --help`).")
    args = add_lcm_arguments(parser).parse_args(argv)
    return run(args)


if __name__ == "__main__":
    import sys

    sys.exit(main())
