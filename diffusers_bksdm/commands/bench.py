"""`bksdm bench`: parameters, MACs and latency of a teacher and its BK-SDM students, measured side by side."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="Parameters, MACs and latency: teacher vs students, on this machine.",
        description="Count parameters and MACs (on the meta device) and time UNet forwards of the teacher and its "
        "students side by side (warm-up, rotated order, medians). Works from a UNet config alone (random weights, "
        "no download): `bksdm bench --teacher_config sd-v1-4`.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--teacher",
        "--pretrained_model_name_or_path",
        dest="teacher",
        help="Pipeline or UNet folder / hub repo id, or builtin:tiny-sd.",
    )
    source.add_argument(
        "--teacher_config",
        help="A UNet config.json (or folder) or a shipped name: sd-v1-4, sd-v2-1-base, sd-v2-1, sdxl-base-1.0.",
    )
    parser.add_argument("--variants", default=None, help="Comma-separated variants (default: base,small,tiny).")
    parser.add_argument(
        "--student", action="append", default=None, help="A saved student (UNet or pipeline folder); repeatable."
    )
    parser.add_argument("--vae_config", default=None, help="VAE config for --teacher_config (default: SD's VAE).")
    parser.add_argument("--text_encoder_config", default=None, help="CLIPTextConfig kwargs for --teacher_config.")
    parser.add_argument("--device", default="cpu", help="cpu or cuda.")
    parser.add_argument(
        "--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="Default: fp16 on GPU, fp32 on CPU."
    )
    parser.add_argument("--resolution", type=int, default=512, help="Image height and width.")
    parser.add_argument("--batch_size", type=int, default=1, help="Images per call (the UNet sees 2x with CFG).")
    parser.add_argument("--no_cfg", action="store_true", help="Do not double the UNet batch for guidance.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed UNet forwards per model (median reported).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed forwards per model first.")
    parser.add_argument("--steps", type=int, default=0, help="Also time whole pipeline calls of N steps (0: no).")
    parser.add_argument("--pipeline_repeats", type=int, default=1, help="Timed pipeline calls per model.")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice).")
    parser.add_argument(
        "--counts_only", action="store_true", help="Only parameters and MACs (meta device, no timing)."
    )
    parser.add_argument(
        "--output", "--output_dir", dest="output", default=None, help="Folder for bench.{md,json,png}."
    )
    parser.add_argument("--no_chart", action="store_true", help="Do not draw bench.png.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    import torch

    from ..bench import BenchmarkSettings, benchmark, report_markdown, save_report
    from ..io import parse_device, parse_dtype

    parse_device(args.device)  # an unknown device or one this machine lacks fails with one line
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"`--threads` must be a positive integer, got {args.threads}.")
        torch.set_num_threads(args.threads)
    settings = BenchmarkSettings(
        resolution=args.resolution, batch_size=args.batch_size, cfg=not args.no_cfg, repeats=args.repeats,
        warmup=args.warmup, steps=args.steps, pipeline_repeats=args.pipeline_repeats, device=args.device,
        dtype=parse_dtype(args.dtype),
    )  # fmt: skip
    students = None
    if args.student:
        students = {}
        for path in args.student:
            if not os.path.isdir(path):
                raise FileNotFoundError(f"`--student` {path!r} is not a folder.")
            students[os.path.basename(os.path.normpath(path))] = path
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    if variants:
        from ..plan import get_variant

        for variant in variants:
            get_variant(variant)
    report = benchmark(
        teacher=args.teacher, teacher_config=args.teacher_config, variants=variants, students=students,
        settings=settings, vae_config=args.vae_config, text_encoder_config=args.text_encoder_config,
        measure=not args.counts_only,
    )  # fmt: skip
    print(report_markdown(report))
    if args.output:
        written = save_report(report, args.output, chart=not args.no_chart)
        print("wrote " + ", ".join(written.values()))
    return 0
