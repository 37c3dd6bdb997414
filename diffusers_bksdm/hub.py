"""Model cards and hub uploads for distilled students.

The card is built with diffusers' `load_or_create_model_card` / `populate_model_card` and records what a reader needs
to trust the student: teacher, variant, parameter counts, the training recipe, the validation grid and evaluation
scores when there are any. Uploads go through `huggingface_hub.HfApi`; the token is passed to the API only, never
written to a file or a log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
from typing import Any
from collections.abc import Iterator, Sequence
from unittest import mock

from .families import FAMILIES

__all__ = [
    "MODEL_CARD_TAGS",
    "build_model_card",
    "write_model_card",
    "push_folder",
    "PushError",
    "UPLOAD_IGNORE_PATTERNS",
]

logger = logging.getLogger(__name__)

MODEL_CARD_TAGS = ["bk-sdm", "knowledge-distillation", "diffusers", "text-to-image", "stable-diffusion"]
EVAL_SECTION_START, EVAL_SECTION_END = "<!-- bksdm-eval:start -->", "<!-- bksdm-eval:end -->"
#: what a training output folder holds that does not belong in the model repo
UPLOAD_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", ".*", ".*/**", "logs/**", "**/.ipynb_checkpoints/**"]


class PushError(RuntimeError):
    """An upload to the hub failed; the local folder is intact and the message says how to retry (never the token)."""


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Build a card locally: `load_or_create_model_card` otherwise looks for an existing card on the hub first."""
    import huggingface_hub.constants as constants

    with mock.patch.object(constants, "HF_HUB_OFFLINE", True):
        yield


def _format_count(value: int | None) -> str:
    return f"{value:,}" if isinstance(value, int) else "unknown"


def build_model_card(
    *,
    teacher: str,
    variant: str,
    teacher_parameters: int | None = None,
    student_parameters: int | None = None,
    recipe: dict[str, Any] | None = None,
    validation_image: str | None = None,
    validation_prompts: Sequence[str] | None = None,
    evaluation: dict[str, Any] | None = None,
    repo_id: str | None = None,
    license: str | None = None,
    extra_tags: Sequence[str] = (),
):
    """A `huggingface_hub.ModelCard` for a distilled BK-SDM student.

    Args:
        teacher (`str`): the teacher's hub id or path; it becomes `base_model`.
        variant (`str`): the BK-SDM variant.
        teacher_parameters, student_parameters (`int`, *optional*): UNet parameter counts.
        recipe (`dict`, *optional*): training facts (data, steps, batch, lambdas, ...), shown as a table.
        validation_image (`str`, *optional*): path of the teacher | student grid, relative to the card's folder.
        validation_prompts (list of `str`, *optional*): the grid's prompts, top to bottom.
        evaluation (`dict`, *optional*): evaluation scores (FID, CLIP score, ...).
        repo_id (`str`, *optional*): the hub repo the card is for (shown in the usage snippet). The card is always
            built locally, without a hub lookup.
        license (`str`, *optional*): the license; defaults to the one of the teacher's family
            (:mod:`diffusers_bksdm.families`), SD v1's `creativeml-openrail-m` for an unknown family.
        extra_tags (list of `str`, *optional*): tags besides :data:`MODEL_CARD_TAGS`.
    """
    from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card

    lines = [
        f"# BK-SDM-{variant} student of `{teacher}`",
        "",
        f"A [BK-SDM](https://arxiv.org/abs/2305.15798) student distilled from [`{teacher}`]"
        f"({teacher if os.path.isabs(teacher) else 'https://huggingface.co/' + teacher}) with "
        "[diffusers-bksdm](https://github.com/): whole blocks removed from the UNet, the student initialised from the "
        "teacher's weights and trained with the task loss plus output- and feature-level knowledge distillation. The "
        "UNet is a standard `UNet2DConditionModel` inside the stock pipeline class: plain diffusers loads it.",
        "",
        "| | UNet parameters |",
        "|---|---|",
        f"| teacher | {_format_count(teacher_parameters)} |",
        f"| student (`{variant}`) | {_format_count(student_parameters)} |",
    ]
    if isinstance(teacher_parameters, int) and isinstance(student_parameters, int) and teacher_parameters:
        lines.append(f"| reduction | {1 - student_parameters / teacher_parameters:.1%} |")
    if recipe:
        lines += ["", "## Training recipe", "", "| setting | value |", "|---|---|"]
        for key, value in recipe.items():
            shown = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
            lines.append(f"| {key} | {shown.replace('|', '/')} |")
    if validation_image:
        lines += ["", "## Validation", "", "Same prompts and seeds; left: teacher, right: student.", ""]
        if validation_prompts:
            lines += [f"{i + 1}. {p}" for i, p in enumerate(validation_prompts)] + [""]
        lines.append(f"![teacher | student]({validation_image})")
    # between the markers of `diffusers_bksdm.metrics.update_model_card`, so `bksdm eval --model_card` replaces it
    lines += ["", EVAL_SECTION_START, "## Evaluation", ""]
    if evaluation:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in evaluation.items()]
    else:
        lines.append("No evaluation scores were recorded for this checkpoint (add them with `bksdm eval "
                     "--model_card`).")
    lines.append(EVAL_SECTION_END)
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{repo_id or "<this folder or repo>"}")',
        'image = pipe("a golden vase with different flowers").images[0]',
        "```",
    ]
    description = "\n".join(lines)
    base_model = None if os.path.isabs(teacher) or teacher.startswith("builtin:") else teacher
    kwargs = dict(from_training=True, base_model=base_model, model_description=description, inference=True,
                  license=license or FAMILIES["sd-v1"].license)
    with _offline():  # always built from what we know locally; no hub round-trip during training
        card = load_or_create_model_card(repo_id or "bksdm-local/student", **kwargs)
    return populate_model_card(card, tags=[*MODEL_CARD_TAGS, f"bk-sdm-{variant}", *extra_tags])


def write_model_card(folder: str, card) -> str:
    """Write `card` to `folder/README.md` (temporary file + rename). Returns the path."""
    from .io import atomic_write

    path = os.path.join(folder, "README.md")
    with atomic_write(path) as tmp:
        card.save(tmp)
    return path


def push_folder(
    folder: str,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload BK-SDM student",
    ignore_patterns: Sequence[str] | None = None,
    api=None,
    argument: str = "repo_id",
) -> str:
    """Create `repo_id` (if needed) and upload `folder` to it.

    Args:
        folder (`str`): the local folder (a student pipeline written by `bksdm distill` or `bksdm compress`).
        repo_id (`str`): `user/name` on the hub.
        token (`str`, *optional*): a hub token; defaults to the logged-in one. It is passed to `HfApi` and nowhere
            else.
        private (`bool`, *optional*, defaults to `False`): create the repo as private.
        ignore_patterns (list of `str`, *optional*): files not to upload (defaults to checkpoints, hidden files and
            tracker logs, :data:`UPLOAD_IGNORE_PATTERNS`).
        api (`HfApi`, *optional*): an API object to use instead of `HfApi(token=token)`.
        argument (`str`, *optional*, defaults to `"repo_id"`): how errors name `repo_id` (a command passes its flag).

    Returns:
        `str`: the repo URL.

    Raises:
        FileNotFoundError: `folder` is missing. PushError (a `RuntimeError`): the upload failed; the message says
            how to retry, and the local folder is left as it was.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"`folder` {folder!r} is not a folder.")
    if not isinstance(repo_id, str) or repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise ValueError(f"`{argument}` must look like 'user/name', got {repo_id!r}.")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    patterns = list(UPLOAD_IGNORE_PATTERNS if ignore_patterns is None else ignore_patterns)
    try:
        url = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                          ignore_patterns=patterns, repo_type="model")
    except Exception as error:  # noqa: BLE001 - any hub failure gets the retry instructions
        message = str(error)
        if token:
            message = message.replace(token, "***")
        raise PushError(
            f"Upload of {folder!r} to {repo_id!r} failed ({type(error).__name__}: {message}). The local folder is "
            f"intact; retry with: bksdm push {shlex.quote(folder)} --repo_id {shlex.quote(repo_id)}"
        ) from None
    logger.info("pushed %s to %s", folder, repo_id)
    return str(getattr(url, "url", url) or f"https://huggingface.co/{repo_id}")
