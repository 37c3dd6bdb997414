"""`bksdm eval`: FID, IS and CLIP score of generated images, as in the BK-SDM paper."""

from __future__ import annotations

import argparse
import json
import os
import sys


def add_parser(subparsers) -> None:
    from ._flags import add_command_parser, add_output_file_argument, add_overwrite_argument

    parser = add_command_parser(
        subparsers,
        "eval",
        help="FID / IS / CLIP score of a folder of generated images.",
        description="Compute FID (against real-image statistics), IS and CLIP score (mean raw cosine similarity "
        "under ViT-g-14 laion2b_s34b_b88k) of images written by `bksdm generate`, and print them next to the "
        "paper's numbers. Compute the real statistics once with `--real_images DIR --save_real_stats FILE.npz`.",
    )
    parser.add_argument("--images", default=None, help="Folder of generated images (e.g. OUTPUT_DIR/im256).")
    parser.add_argument("--prompts", default=None, help="The prompt file given to `bksdm generate` (for CLIP).")
    parser.add_argument(
        "--caption_column", default=None, help="CSV column of the prompts; default: caption, text or prompt."
    )
    parser.add_argument("--real_stats", default=None, help="An .npz of real-image statistics (mu, sigma).")
    parser.add_argument("--real_images", default=None, help="Folder of real images, all of one size (e.g. 256x256).")
    parser.add_argument("--save_real_stats", default=None, help="Save the statistics of --real_images to this .npz.")
    parser.add_argument("--metrics", default="fid,is,clip", help="Comma-separated subset of fid,is,clip.")
    parser.add_argument("--clip_model", default=None,
                        help="CLIP weights for the CLIP score; default: laion/CLIP-ViT-g-14-laion2B-s34B-b88K.")
    parser.add_argument("--batch_size", type=int, default=50, help="Images per batch.")
    parser.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")
    add_output_file_argument(
        parser, help="JSON file for the scores (a .md table is written beside it); default: "
        "eval_<images folder>.json beside the images folder.",
    )  # fmt: skip
    add_overwrite_argument(parser, output="output_file", deprecated=(),
                           help="Replace --output_file (and the .md beside it) or --save_real_stats if it exists: "
                           "only scores or statistics `bksdm eval` wrote, never an input or another file.")
    parser.add_argument("--name", default=None, help="Name of the evaluated model in the table; default: the model.")
    parser.add_argument(
        "--paper_family",
        default="auto",
        choices=["auto", "sd-v1", "sd-v2", "none"],
        help="Show the paper's rows of this teacher family (auto: from the generation settings).",
    )
    parser.add_argument("--model_card", default=None,
                        help="The model folder whose README.md gets the scores. Only for images that `bksdm "
                        "generate` made from that model (its generation.json says so); the section states the "
                        "prompts, sizes and settings. Default: no card is written.")
    parser.add_argument(
        "--judge",
        default=None,
        help="Score the miniature world instead (e.g. builtin:shapes-judge): the judge's accuracy (colour and shape, "
        "position) against --prompts and its FD against --real_images, in place of CLIP score and FID. Default: "
        "FID / IS / CLIP score.",
    )
    parser.set_defaults(func=run)


def _generation_settings(images: str) -> dict:
    for folder in (images, os.path.dirname(images)):
        path = os.path.join(folder, "generation.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
    return {}


def _model_name(args: argparse.Namespace, settings: dict, images: str) -> str:
    """The evaluated model as tables name it: `--name`, else what the images were made from (a local folder by its
    last component)."""
    if args.name:
        return args.name
    made_from = settings.get("unet") or settings.get("model")
    if not made_from:
        return os.path.basename(images)
    return os.path.basename(os.path.normpath(made_from)) if os.path.isdir(made_from) else made_from


def _check_card_source(model_card: str, images: str, settings: dict) -> None:
    """Refuse to write scores into the card of a model the images were not generated from."""
    if not os.path.isdir(model_card):
        raise FileNotFoundError(f"`--model_card` {model_card!r} is not a folder.")
    if not settings.get("generated_by"):
        raise ValueError(
            f"`--model_card` {model_card!r}: the images in {images!r} have no record of the model they were made from "
            "(the generation.json that `bksdm generate` writes); only scores of images that `bksdm generate` made "
            "from this model go into its card."
        )
    made_from = [settings.get("model_dir"), settings.get("unet_dir")]
    if settings.get("unet_dir"):  # a student UNet inside its pipeline folder: the pipeline's card
        made_from.append(os.path.dirname(settings["unet_dir"]))
    if os.path.realpath(model_card) not in made_from:
        unet = f" with the UNet {settings['unet']!r}" if settings.get("unet") else ""
        raise ValueError(
            f"`--model_card` {model_card!r}: the images in {images!r} were generated from {settings.get('model')!r}"
            f"{unet}, not from this folder; only scores of images generated from a model go into its card."
        )


def _output_file(args: argparse.Namespace, images: str) -> str:
    """Where the scores go: `--output_file`, else `eval_<images folder>.json` beside the images folder."""
    return args.output_file or os.path.join(os.path.dirname(images) or ".", f"eval_{os.path.basename(images)}.json")


def _check_outputs(args: argparse.Namespace) -> None:
    """The output policy for the scores (JSON + .md) and `--save_real_stats`, before anything is computed: never an
    input, an existing file only with --overwrite_output_file and only one `bksdm eval` wrote."""
    from ..evaluation.metrics import is_eval_results, is_real_statistics
    from ..outputs import check_output_file

    inputs = [("the images (--images)", args.images), ("the prompts (--prompts)", args.prompts),
              ("the real images (--real_images)", args.real_images), ("the real statistics (--real_stats)",
                                                                     args.real_stats)]
    common = {"overwrite": args.overwrite_output_file, "inputs": inputs, "overwrite_flag": "--overwrite_output_file"}
    if args.save_real_stats:
        check_output_file(args.save_real_stats, ours=is_real_statistics, argument="--save_real_stats", **common)
    if args.images is not None:
        output = _output_file(args, os.path.normpath(args.images))
        argument = "--output_file" if args.output_file else "the scores file (default of --output_file)"
        check_output_file(output, ours=is_eval_results, argument=argument, **common)
        check_output_file(os.path.splitext(output)[0] + ".md", ours=lambda _: is_eval_results(output),
                          argument=argument.replace("--output_file", "the .md beside --output_file"), **common)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..pipelines import parse_device
    from ..evaluation.metrics import (
        DEFAULT_CLIP_MODEL,
        compute_real_statistics,
        evaluate_images,
        evaluation_protocol,
        results_markdown,
        update_model_card,
        write_results,
    )

    parse_device(args.device, "--device")  # before anything is loaded
    if args.model_card and args.images is not None:  # before anything is computed or written
        images = os.path.normpath(args.images)
        _check_card_source(args.model_card, images, _generation_settings(images))
    _check_outputs(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    names = {k: f"--{k}" for k in ("images", "prompts", "metrics", "real_stats", "real_images", "clip_model")}
    if args.save_real_stats and not args.real_images:
        raise ValueError("`--save_real_stats` needs `--real_images DIR` (the images to compute statistics from).")
    if args.real_stats and args.real_images:
        raise ValueError("Pass either `--real_stats` or `--real_images`, not both.")
    if args.model_card and args.judge:
        raise ValueError("`--model_card` takes FID / IS / CLIP scores; the judge's scores (`--judge`) are not "
                         "written into model cards.")
    try:
        real_stats = args.real_stats
        if args.save_real_stats:
            stats = compute_real_statistics(args.real_images, batch_size=args.batch_size, device=device,
                                            argument="--real_images")
            stats.save(args.save_real_stats, argument="--save_real_stats")
            print(f"saved statistics of {stats.num_samples} real images to {args.save_real_stats}")
            real_stats = stats
        if args.images is None:
            if args.save_real_stats:
                return 0
            raise ValueError("`--images` is required (or use --real_images with --save_real_stats only).")

        images = os.path.normpath(args.images)
        settings = _generation_settings(images)
        prompts = None
        if args.prompts:
            from ..evaluation.generate import read_prompts

            prompts = read_prompts(args.prompts, args.caption_column, argument="--prompts",
                                   caption_argument="--caption_column")
        if args.judge:
            if prompts is None:
                raise ValueError("`--judge` needs the prompts the images were generated from: pass --prompts FILE.")
            return _run_judge(args, images, prompts)
        results = evaluate_images(
            images,
            prompts,
            metrics=metrics,
            real_stats=real_stats,
            real_images=None if args.save_real_stats else args.real_images,
            clip_model=args.clip_model or DEFAULT_CLIP_MODEL,
            batch_size=args.batch_size,
            device=device,
            argument_names=names,
        )
    except (ImportError, OSError) as error:
        print(f"bksdm eval: error: {error}", file=sys.stderr)
        return 2

    family = settings.get("family") if args.paper_family == "auto" else args.paper_family
    name = _model_name(args, settings, images)
    table = results_markdown(results, name=name, family=None if family == "none" else family)
    record = {**results, "name": name, "images": images, "generation": settings or None}
    output = _output_file(args, images)
    json_path, md_path = write_results(record, output, table)
    print(table)
    print(f"wrote {json_path} and {md_path}")
    if args.model_card:
        # the card gets this model's row only: the paper's rows were measured on MS-COCO 30K, whatever these were
        protocol = evaluation_protocol(settings, results, real_source=args.real_stats or args.real_images,
                                       clip_model=args.clip_model or DEFAULT_CLIP_MODEL)
        card = update_model_card(args.model_card, results_markdown(results, name=name), protocol=protocol,
                                 argument="--model_card")
        print(f"updated {card}")
    return 0


def _run_judge(args: argparse.Namespace, images: str, prompts: list[str]) -> int:
    from ..miniature.judge import judge_markdown, score_images
    from ..evaluation.metrics import write_results

    results = score_images(images, prompts, real_images=args.real_images, judge=args.judge, batch_size=args.batch_size,
                           argument_names={k: f"--{k}" for k in ("images", "prompts", "real_images")})
    settings = _generation_settings(images)
    name = _model_name(args, settings, images)
    table = judge_markdown(results, name)
    record = {**results, "name": name, "images": images, "judge": args.judge, "generation": settings or None}
    output = _output_file(args, images)
    json_path, md_path = write_results(record, output, table)
    print(table)
    print(f"wrote {json_path} and {md_path}")
    return 0
