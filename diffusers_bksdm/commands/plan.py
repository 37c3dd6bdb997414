"""`bksdm plan`: the removal plan whose student is the largest that fits a parameter budget."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    from ._flags import add_command_parser, add_output_file_argument, add_overwrite_argument

    parser = add_command_parser(
        subparsers,
        "plan",
        help="Find the removal plan whose student is the largest under a parameter budget.",
        description="Enumerate the BK-SDM / KOALA-style removal plans that apply to a teacher UNet config (layers per "
        "stage, mid block, innermost stage, transformer depth), count every student exactly from the block map (no "
        "weights, no download) and pick the largest one within the budget. Write it with --output_file and use it "
        "with `bksdm compress --plan` or `bksdm distill --plan`.",
    )
    parser.add_argument("--teacher_config", required=True,
                        help="The teacher UNet config: a shipped name (sd-v1-4, sd-v2-1-base, sd-v2-1, sdxl-base-1.0), "
                        "a config.json or a folder holding one (e.g. a pipeline's unet/ folder).")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--max_params", default=None,
                        help="Largest student UNet, in parameters: e.g. 500M, 1.2B or 482346884.")
    budget.add_argument("--max_param_ratio", type=float, default=None,
                        help="Largest student UNet as a fraction of the teacher's, e.g. 0.6.")
    parser.add_argument("--top", type=int, default=5, help="How many of the largest fitting plans to list.")
    add_output_file_argument(parser, deprecated=(), help="Write the chosen plan here as JSON (for --plan).")
    add_overwrite_argument(parser, output="output_file", deprecated=(),
                           help="Replace --output_file if it exists: only a plan file, never the teacher's files.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..configs import load_config
    from ..budget import parse_param_count, plan_for_budget, plans_within_budget
    from ..outputs import atomic_write_text, check_output_file
    from ..plan import is_plan_file

    if args.top < 1:
        raise ValueError(f"`--top` must be at least 1, got {args.top}.")
    if args.output_file:  # before the search: never the teacher's files, a folder, or a file that is not a plan
        check_output_file(args.output_file, overwrite=args.overwrite_output_file, ours=is_plan_file,
                          inputs=[("the teacher config (--teacher_config)", args.teacher_config)],
                          argument="--output_file", overwrite_flag="--overwrite_output_file")
    config = load_config(args.teacher_config, "--teacher_config")
    if "down_block_types" not in config:
        raise ValueError(f"`--teacher_config` {args.teacher_config!r} is not a UNet config (no down_block_types).")
    max_params = None if args.max_params is None else parse_param_count(args.max_params, "--max_params")
    try:
        fitting = plans_within_budget(config, max_params=max_params, max_ratio=args.max_param_ratio)
        best = fitting[0] if fitting else plan_for_budget(config, max_params=max_params, max_ratio=args.max_param_ratio)
    except ValueError as error:
        raise ValueError(str(error).replace("`max_params`", "`--max_params`").replace(
            "`max_ratio`", "`--max_param_ratio`")) from None
    listed = fitting[: args.top]
    print(f"teacher UNet {round(best.params / best.ratio):,} parameters; {len(listed)} largest plan(s) within the "
          "budget:")
    for candidate in listed:
        print(f"  {candidate.params:>15,}  {candidate.ratio:6.1%}  {candidate.plan.description}")
    if args.output_file:
        atomic_write_text(args.output_file, best.plan.to_json() + "\n")
        print(f"wrote the largest ({best.params:,} parameters) to {args.output_file}; use it with --plan")
    return 0
