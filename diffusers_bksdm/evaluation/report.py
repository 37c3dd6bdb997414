"""Evaluating a folder of generated images end to end, as `bksdm eval` does: FID / IS / CLIP score (or the miniature
world's judge), the scores written as JSON and markdown, and optionally the model's card updated.

:func:`evaluate_folder` runs the whole flow. Everything it will write is checked first (the device, that a
`model_card` belongs to the model the images were made from, the output policy of the scores and of
`save_real_stats`), so a refused call computes and writes nothing. The helpers it uses are public for callers that
need one step: :func:`generation_settings` (the `generation.json` that `bksdm generate` wrote), :func:`model_name`,
:func:`check_card_source`, :func:`default_output_file` and :func:`check_eval_outputs`.

Errors name the Python arguments; `argument_names` lets a caller (the command line) name its flags instead.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..outputs import check_output_file
from .._naming import argument_namer
from .metrics import (
    DEFAULT_CLIP_MODEL,
    METRICS,
    compute_real_statistics,
    evaluate_images,
    evaluation_protocol,
    is_eval_results,
    is_real_statistics,
    results_markdown,
    update_model_card,
    write_results,
)

__all__ = [
    "evaluate_folder",
    "generation_settings",
    "model_name",
    "check_card_source",
    "default_output_file",
    "check_eval_outputs",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


def generation_settings(images: PathLike) -> dict[str, Any]:
    """The settings `bksdm generate` recorded for `images` (its `generation.json`, in the folder or the one above,
    e.g. `OUTPUT_DIR/generation.json` for `OUTPUT_DIR/im256`); `{}` when there is none."""
    images = os.fspath(images)
    for folder in (images, os.path.dirname(images)):
        path = os.path.join(folder, "generation.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
    return {}


def model_name(name: str | None, settings: Mapping[str, Any], images: PathLike) -> str:
    """The evaluated model as tables name it: `name`, else what the images were made from (`settings`, see
    :func:`generation_settings`; a local folder by its last component), else the images folder's name."""
    if name:
        return name
    made_from = settings.get("unet") or settings.get("model")
    if not made_from:
        return os.path.basename(os.fspath(images))
    return os.path.basename(os.path.normpath(made_from)) if os.path.isdir(made_from) else made_from


def check_card_source(
    model_card: PathLike, images: PathLike, settings: Mapping[str, Any], *, argument: str = "model_card"
) -> None:
    """Refuse to write scores into the card of a model the images were not generated from: `model_card` must be
    the pipeline folder, the UNet folder or the pipeline folder holding that UNet that `settings` (the images'
    `generation.json`) names.

    Raises:
        FileNotFoundError: `model_card` is not a folder.
        ValueError: the images have no record of their model, or were made from another one.
    """
    model_card, images = os.fspath(model_card), os.fspath(images)
    if not os.path.isdir(model_card):
        raise FileNotFoundError(f"`{argument}` {model_card!r} is not a folder.")
    if not settings.get("generated_by"):
        raise ValueError(
            f"`{argument}` {model_card!r}: the images in {images!r} have no record of the model they were made from "
            "(the generation.json that `bksdm generate` writes); only scores of images that `bksdm generate` made "
            "from this model go into its card."
        )
    made_from = [settings.get("model_dir"), settings.get("unet_dir")]
    if settings.get("unet_dir"):  # a student UNet inside its pipeline folder: the pipeline's card
        made_from.append(os.path.dirname(settings["unet_dir"]))
    if os.path.realpath(model_card) not in made_from:
        unet = f" with the UNet {settings['unet']!r}" if settings.get("unet") else ""
        raise ValueError(
            f"`{argument}` {model_card!r}: the images in {images!r} were generated from {settings.get('model')!r}"
            f"{unet}, not from this folder; only scores of images generated from a model go into its card."
        )


def default_output_file(images: PathLike, output_file: PathLike | None = None) -> str:
    """Where the scores go: `output_file`, else `eval_<images folder>.json` beside the images folder."""
    if output_file:
        return os.fspath(output_file)
    images = os.fspath(images)
    return os.path.join(os.path.dirname(images) or ".", f"eval_{os.path.basename(images)}.json")


def check_eval_outputs(
    images: PathLike | None = None,
    prompts: PathLike | None = None,
    *,
    real_images: PathLike | None = None,
    real_stats: PathLike | None = None,
    save_real_stats: PathLike | None = None,
    output_file: PathLike | None = None,
    overwrite_output_file: bool = False,
    argument_names: Mapping[str, str] | None = None,
) -> None:
    """The output policy for the scores (JSON + .md, :func:`default_output_file`) and `save_real_stats`, before
    anything is computed: never an input, an existing file only with `overwrite_output_file` and only one that
    `bksdm eval` (:func:`evaluate_folder`) wrote.

    Raises:
        ValueError: the message names the argument, the value and what would be accepted.
    """
    names = argument_namer(argument_names)
    inputs = [(f"the images ({names('images')})", images), (f"the prompts ({names('prompts')})", prompts),
              (f"the real images ({names('real_images')})", real_images),
              (f"the real statistics ({names('real_stats')})", real_stats)]
    overwrite_flag = (argument_names or {}).get("overwrite_output_file", "overwrite_output_file=True")
    common = {"overwrite": overwrite_output_file, "inputs": inputs, "overwrite_flag": overwrite_flag}
    if save_real_stats:
        check_output_file(save_real_stats, ours=is_real_statistics, argument=names("save_real_stats"), **common)
    if images is not None:
        output = default_output_file(os.path.normpath(images), output_file)
        flag = names("output_file")
        argument = flag if output_file else f"the scores file (default of {flag})"
        check_output_file(output, ours=is_eval_results, argument=argument, **common)
        check_output_file(os.path.splitext(output)[0] + ".md", ours=lambda _: is_eval_results(output),
                          argument=argument.replace(flag, f"the .md beside {flag}"), **common)


def evaluate_folder(
    images: PathLike | None = None,
    prompts: PathLike | None = None,
    *,
    caption_column: str | None = None,
    metrics: Sequence[str] = METRICS,
    real_stats: PathLike | None = None,
    real_images: PathLike | None = None,
    save_real_stats: PathLike | None = None,
    clip_model: str | None = None,
    batch_size: int = 50,
    device: str | None = None,
    output_file: PathLike | None = None,
    overwrite_output_file: bool = False,
    name: str | None = None,
    paper_family: str = "auto",
    model_card: PathLike | None = None,
    judge: str | None = None,
    argument_names: Mapping[str, str] | None = None,
    log: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Score a folder of generated images and write the scores, as `bksdm eval` does.

    Args:
        images (`str` or `os.PathLike`, *optional*): folder of generated images (e.g. `OUTPUT_DIR/im256`). Only
            `None` with `save_real_stats` (compute real statistics and stop).
        prompts (`str` or `os.PathLike`, *optional*): the prompt file given to `bksdm generate` (for CLIP score and
            the judge).
        caption_column (`str`, *optional*): CSV column of the prompts; default: caption, text or prompt.
        metrics (`Sequence[str]`, *optional*, defaults to `("fid", "is", "clip")`): a subset of fid, is, clip.
        real_stats (`str` or `os.PathLike`, *optional*): an `.npz` of real-image statistics (mu, sigma).
        real_images (`str` or `os.PathLike`, *optional*): a folder of real images, all of one size.
        save_real_stats (`str` or `os.PathLike`, *optional*): save the statistics of `real_images` to this `.npz`.
        clip_model (`str`, *optional*): CLIP weights for the CLIP score; default: `DEFAULT_CLIP_MODEL`.
        batch_size (`int`, *optional*, defaults to 50): images per batch.
        device (`str`, *optional*): default: cuda if available, else cpu.
        output_file (`str` or `os.PathLike`, *optional*): JSON file for the scores (a `.md` table is written
            beside it); default: :func:`default_output_file`.
        overwrite_output_file (`bool`, *optional*, defaults to `False`): replace `output_file` (and its `.md`) or
            `save_real_stats` if it exists, only when this function wrote it.
        name (`str`, *optional*): the model's name in the table; default: :func:`model_name`.
        paper_family (`str`, *optional*, defaults to `"auto"`): show the paper's rows of this teacher family
            (`"sd-v1"`, `"sd-v2"`, `"none"`; `"auto"`: from the generation settings).
        model_card (`str` or `os.PathLike`, *optional*): the model folder whose `README.md` gets the scores; only for
            images `bksdm generate` made from that model (:func:`check_card_source`).
        judge (`str`, *optional*): score the miniature world instead (e.g. `"builtin:shapes-judge"`): the judge's
            accuracy against `prompts` and its FD against `real_images`, in place of CLIP score and FID.
        argument_names (`Mapping[str, str]`, *optional*): how errors name the arguments (a command passes its
            flags); by default the Python names.
        log (`Callable[[str], Any]`, *optional*): receives each line to show (the table, the files written); by
            default this module's logger at INFO level.

    Returns:
        `dict`: `record` (the scores and what they were computed on, as written to the JSON file), `table` (the
        markdown table), `json_path`, `md_path`, `card_path` (`None` without `model_card`) and `real_stats_path`
        (`save_real_stats` when statistics were saved, else `None`). With `images=None` only `real_stats_path` is
        set.

    Raises:
        ValueError: a bad argument or combination, or an output the policy refuses; nothing is computed or written.
        FileNotFoundError: a missing input.
    """
    from ..pipelines import parse_device

    names = argument_namer(argument_names)
    log = log or logger.info
    parse_device(device, names("device"))  # before anything is loaded
    if model_card and images is not None:  # before anything is computed or written
        folder = os.path.normpath(images)
        check_card_source(model_card, folder, generation_settings(folder), argument=names("model_card"))
    check_eval_outputs(images, prompts, real_images=real_images, real_stats=real_stats,
                       save_real_stats=save_real_stats, output_file=output_file,
                       overwrite_output_file=overwrite_output_file, argument_names=argument_names)
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    metric_names = {k: names(k) for k in ("images", "prompts", "metrics", "real_stats", "real_images", "clip_model")}
    if save_real_stats and not real_images:
        raise ValueError(f"`{names('save_real_stats')}` needs `{names('real_images')} DIR` (the images to compute "
                         "statistics from).")
    if real_stats and real_images:
        raise ValueError(f"Pass either `{names('real_stats')}` or `{names('real_images')}`, not both.")
    if model_card and judge:
        raise ValueError(f"`{names('model_card')}` takes FID / IS / CLIP scores; the judge's scores "
                         f"(`{names('judge')}`) are not written into model cards.")
    done: dict[str, Any] = {"record": None, "table": None, "json_path": None, "md_path": None, "card_path": None,
                            "real_stats_path": None}
    stats = real_stats
    if save_real_stats:
        stats = compute_real_statistics(real_images, batch_size=batch_size, device=device,
                                        argument=names("real_images"))
        stats.save(save_real_stats, argument=names("save_real_stats"))
        log(f"saved statistics of {stats.num_samples} real images to {os.fspath(save_real_stats)}")
        done["real_stats_path"] = os.fspath(save_real_stats)
    if images is None:
        if save_real_stats:
            return done
        raise ValueError(f"`{names('images')}` is required (or use {names('real_images')} with "
                         f"{names('save_real_stats')} only).")

    images = os.path.normpath(images)
    settings = generation_settings(images)
    prompt_list = None
    if prompts:
        from .generate import read_prompts

        prompt_list = read_prompts(prompts, caption_column, argument=names("prompts"),
                                   caption_argument=names("caption_column"))
    name = model_name(name, settings, images)
    if judge:
        if prompt_list is None:
            raise ValueError(f"`{names('judge')}` needs the prompts the images were generated from: pass "
                             f"{names('prompts')} FILE.")
        from ..miniature.judge import judge_markdown, score_images

        results = score_images(images, prompt_list, real_images=real_images, judge=judge, batch_size=batch_size,
                               argument_names={k: names(k) for k in ("images", "prompts", "real_images")})
        table = judge_markdown(results, name)
        record = {**results, "name": name, "images": images, "judge": judge, "generation": settings or None}
    else:
        clip_model = clip_model or DEFAULT_CLIP_MODEL
        results = evaluate_images(images, prompt_list, metrics=metrics, real_stats=stats,
                                  real_images=None if save_real_stats else real_images, clip_model=clip_model,
                                  batch_size=batch_size, device=device, argument_names=metric_names)
        family = settings.get("family") if paper_family == "auto" else paper_family
        table = results_markdown(results, name=name, family=None if family == "none" else family)
        record = {**results, "name": name, "images": images, "generation": settings or None}
    json_path, md_path = write_results(record, default_output_file(images, output_file), table)
    log(table)
    log(f"wrote {json_path} and {md_path}")
    done.update(record=record, table=table, json_path=json_path, md_path=md_path)
    if model_card:
        # the card gets this model's row only: the paper's rows were measured on MS-COCO 30K, whatever these were
        real_source = real_stats or real_images
        protocol = evaluation_protocol(settings, results, clip_model=clip_model,
                                       real_source=None if real_source is None else os.fspath(real_source))
        card = update_model_card(model_card, results_markdown(results, name=name), protocol=protocol,
                                 argument=names("model_card"))
        log(f"updated {card}")
        done["card_path"] = card
    return done
