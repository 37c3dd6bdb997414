"""`bksdm bench`: parameters, MACs and latency of a teacher and its BK-SDM students, measured side by side."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    from ._flags import (
        add_argument,
        add_command_parser,
        add_model_argument,
        add_output_dir_argument,
        add_overwrite_argument,
    )

    parser = add_command_parser(
        subparsers,
        "bench",
        help="Parameters, MACs and latency: teacher vs students, on this machine.",
        description="Count parameters and MACs (on the meta device) and time UNet forwards of the teacher and its "
        "students side by side (warm-up, rotated order, medians). Works from a UNet config alone (random weights, "
        "no download): `bksdm bench --teacher_config sd-v1-4`.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    add_model_argument(
        source, required=False,
        help="The teacher: pipeline or UNet folder / hub repo id, or a built-in teacher (builtin:tiny-sd, "
        "builtin:shapes-sd).",
    )  # fmt: skip
    source.add_argument(
        "--teacher_config",
        help="A UNet config.json (or folder) or a shipped name: sd-v1-4, sd-v2-1-base, sd-v2-1, sdxl-base-1.0.",
    )
    parser.add_argument("--variants", default=None,
                        help="Comma-separated variants; default: those of the teacher's family (base,small,tiny for "
                        "SD v1/v2).")
    parser.add_argument("--plan", action="append", default=None,
                        help="A removal plan JSON file (from `bksdm plan` or RemovalPlan.to_json) to measure; with "
                        "it, the family's default variants are measured only when --variants names them. "
                        "Repeatable.")
    add_argument(parser, "--student", action="append", default=None,
                 help="A saved student (UNet or pipeline folder) measured instead of --variants; repeatable.")
    parser.add_argument("--vae_config", default=None,
                        help="VAE config for --teacher_config; default: the VAE of the teacher's family.")
    parser.add_argument("--text_encoder_config", default=None,
                        help="CLIPTextConfig kwargs for --teacher_config; default: the text encoder of the family.")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N.")
    parser.add_argument(
        "--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="Default: fp16 on GPU, fp32 on CPU."
    )
    parser.add_argument("--resolution", type=int, default=None,
                        help="Image height and width; default: the teacher's native size (UNet sample_size x the VAE "
                        "scale factor: 512 for SD v1, 16 for builtin:tiny-sd).")
    parser.add_argument("--batch_size", type=int, default=1, help="Images per call (the UNet sees 2x with CFG).")
    parser.add_argument("--no_cfg", action="store_true", help="Do not double the UNet batch for guidance.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed UNet forwards per model (median reported).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed forwards per model first.")
    parser.add_argument("--steps", type=int, default=0, help="Also time whole pipeline calls of N steps (0: no).")
    parser.add_argument("--pipeline_repeats", type=int, default=1, help="Timed pipeline calls per model.")
    parser.add_argument("--student_steps", type=int, default=None,
                        help="Steps of the students' pipeline calls (default: --steps), e.g. 4 for a `bksdm lcm` "
                        "student against the teacher's --steps 50; a student pipeline runs with its own scheduler.")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch; default: torch's choice.")
    parser.add_argument(
        "--counts_only", action="store_true", help="Only parameters and MACs (meta device, no timing)."
    )
    add_output_dir_argument(parser, required=False,
                            help="Folder for bench.md, bench.json and bench.png; default: print the table only.")
    parser.add_argument("--no_chart", action="store_true", help="Do not draw bench.png.")
    add_overwrite_argument(parser, deprecated=(), help="Replace --output_dir if it holds an earlier report (only "
                           "bench.json, bench.md, bench.png).")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    import torch

    from ..evaluation.bench import BenchmarkSettings, benchmark, is_bench_folder, report_markdown, save_report
    from ..outputs import check_output_dir
    from ..pipelines import parse_device, parse_dtype
    from ._flags import flag_name

    parse_device(args.device, "--device")  # an unknown device or one this machine lacks fails with one line
    policy = {"overwrite": args.overwrite_output_dir, "argument": flag_name(args, "output_dir"),
              "overwrite_flag": "--overwrite_output_dir"}
    if args.output_dir:  # before anything is measured
        check_output_dir(args.output_dir, ours=is_bench_folder, **policy,
                         inputs=[("the teacher (--teacher)", args.pretrained_model_name_or_path),
                                 *(("a student (--student)", path) for path in args.student or ())])
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"`--threads` must be a positive integer, got {args.threads}.")
        torch.set_num_threads(args.threads)
    settings = BenchmarkSettings(
        resolution=args.resolution, batch_size=args.batch_size, cfg=not args.no_cfg, repeats=args.repeats,
        warmup=args.warmup, steps=args.steps, pipeline_repeats=args.pipeline_repeats,
        student_steps=args.student_steps, device=args.device,
        dtype=parse_dtype(args.dtype, "--dtype"),
    )  # fmt: skip
    students = None
    if args.student:
        students = {}
        for path in args.student:
            if not os.path.isdir(path):
                raise FileNotFoundError(f"`--student` {path!r} is not a folder; pass a saved student (a UNet folder "
                                        "with config.json or a pipeline folder with model_index.json).")
            students[os.path.basename(os.path.normpath(path))] = path
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    if variants:
        from ..plan import get_variant

        for variant in variants:
            get_variant(variant)
    if args.plan:
        from ..plan import load_plan_file

        variants = [*(variants or []), *(load_plan_file(path, argument="--plan") for path in args.plan)]
    report = benchmark(
        teacher=args.pretrained_model_name_or_path, teacher_config=args.teacher_config, variants=variants,
        students=students, settings=settings, vae_config=args.vae_config, text_encoder_config=args.text_encoder_config,
        measure=not args.counts_only, progress=True,
        argument_names={
            "teacher": flag_name(args, "pretrained_model_name_or_path"), "teacher_config": "--teacher_config",
            "variants": "--variants", "students": "--student", "vae_config": "--vae_config",
            "text_encoder_config": "--text_encoder_config", "resolution": "--resolution",
        },
    )  # fmt: skip
    print(report_markdown(report))
    if args.output_dir:
        written = save_report(report, args.output_dir, chart=not args.no_chart, **policy)
        print("wrote " + ", ".join(written.values()))
    return 0
