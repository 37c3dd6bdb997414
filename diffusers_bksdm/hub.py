"""Model cards and hub uploads for distilled students.

The card is built locally (no hub lookup, no template) and records what a reader needs to trust the student: teacher,
variant, parameter counts, the training recipe, the validation grid and evaluation scores when there are any; it links
the teacher only when it is a hub repo id and never shows a local absolute path. Uploads go through `huggingface_hub.HfApi`; the token is passed to the API only, never
written to a file or a log.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from typing import Any
from collections.abc import Sequence

from .families import FAMILIES

__all__ = [
    "MODEL_CARD_TAGS",
    "build_model_card",
    "describe_data",
    "is_hub_id",
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

#: the card: huggingface_hub renders `card_data` (the YAML front matter of a `ModelCardData`); the body is ours
_CARD_TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ body }}"


class PushError(RuntimeError):
    """An upload to the hub failed; the local folder is intact and the message says how to retry (never the token)."""


#: where the package lives; `None` while it has no public home (cards then name it without a link)
PACKAGE_URL: str | None = None
#: what the built-in teachers are, for the cards of their students
BUILTIN_TEACHERS = {
    "builtin:shapes-sd": "the trained miniature teacher shipped with diffusers-bksdm (32 px pictures of coloured "
    "shapes)",
    "builtin:tiny-sd": "a tiny random-weight teacher built locally by diffusers-bksdm (for tests and demos)",
}


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as a hub repo id (`user/name`, by `huggingface_hub.utils.validate_repo_id`) rather than a
    local folder or a built-in teacher."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(name, str) or name.count("/") != 1 or os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _teacher_name(teacher: str) -> str:
    """The teacher as a card names it: a hub id or built-in name as is, a local folder by its last component."""
    if teacher.startswith("builtin:") or is_hub_id(teacher):
        return teacher
    return os.path.basename(os.path.normpath(teacher)) or teacher


def _teacher_text(teacher: str) -> str:
    if teacher.startswith("builtin:"):
        what = BUILTIN_TEACHERS.get(teacher, "a tiny teacher built locally by diffusers-bksdm")
        return f"`{teacher}`, {what}"
    if is_hub_id(teacher):
        return f"[`{teacher}`](https://huggingface.co/{teacher})"
    return f"a local teacher folder (`{_teacher_name(teacher)}`)"


def _local(value: Any) -> Any:
    """`value` with every absolute path reduced to its last component (a card never shows the local file system)."""
    if isinstance(value, str) and os.path.isabs(value):
        return os.path.basename(os.path.normpath(value)) or value
    if isinstance(value, dict):
        return {k: _local(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_local(v) for v in value]
    return value


def describe_data(description: Any) -> str:
    """A training-data description (the `description` of a data source, see :mod:`diffusers_bksdm.training.data`) in words,
    without local absolute paths."""
    if not isinstance(description, dict) or not description:
        shown = _local(description)
        return json.dumps(shown) if isinstance(shown, (list, dict)) else str(shown)
    kind = description.get("type")
    d = _local(description)
    if kind == "imagefolder":
        return f"image folder `{d.get('train_data_dir')}` (captions: column `{d.get('caption_column')}`)"
    if kind == "datasets" and d.get("dataset_name"):
        config = f", config `{d['dataset_config_name']}`" if d.get("dataset_config_name") else ""
        return (f"`datasets` dataset `{d['dataset_name']}`{config} (images: column `{d.get('image_column')}`, "
                f"captions: column `{d.get('caption_column')}`)")
    if kind == "webdataset":
        return f"webdataset shards `{d.get('train_shards')}` ({d.get('num_shards')} shards)"
    if kind == "latent_cache":
        source = describe_data(description.get("source")) if description.get("source") else "unknown data"
        return f"latent cache `{d.get('path')}` of {source}"
    return json.dumps(d)


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

    The card says only what is known: the teacher is linked only when it is a hub repo id (a local folder is named by
    its last component, a built-in teacher by its name), local absolute paths in the recipe are reduced to their last
    component, and no template placeholder is left.

    Args:
        teacher (`str`): the teacher's hub id, path or built-in name; a hub id becomes `base_model`.
        variant (`str`): the BK-SDM variant.
        teacher_parameters, student_parameters (`int`, *optional*): UNet parameter counts.
        recipe (`dict`, *optional*): training facts (data, steps, batch, lambdas, ...), shown as a table; a `data`
            entry that is a data-source description is written in words (:func:`describe_data`).
        validation_image (`str`, *optional*): path of the teacher | student grid, relative to the card's folder.
        validation_prompts (list of `str`, *optional*): the grid's prompts, top to bottom.
        evaluation (`dict`, *optional*): evaluation scores (FID, CLIP score, ...).
        repo_id (`str`, *optional*): the hub repo the card is for (shown in the usage snippet; without one the
            snippet loads the folder that holds the card). The card is always built locally, without a hub lookup.
        license (`str`, *optional*): the license; defaults to the one of the teacher's family
            (:mod:`diffusers_bksdm.families`), SD v1's `creativeml-openrail-m` for an unknown family.
        extra_tags (list of `str`, *optional*): tags besides :data:`MODEL_CARD_TAGS`.
    """
    from huggingface_hub import ModelCard, ModelCardData

    package = f"[diffusers-bksdm]({PACKAGE_URL})" if PACKAGE_URL else "diffusers-bksdm"
    lines = [
        f"# BK-SDM-{variant} student of `{_teacher_name(teacher)}`",
        "",
        f"A [BK-SDM](https://arxiv.org/abs/2305.15798) student distilled from {_teacher_text(teacher)}, with "
        f"{package}: whole blocks removed from the UNet, the student initialised from the teacher's weights and "
        "trained with the task loss plus output- and feature-level knowledge distillation. The UNet is a standard "
        "`UNet2DConditionModel` inside the stock pipeline class: plain diffusers loads it.",
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
            if key == "data" and isinstance(value, dict):
                shown = describe_data(value)
            else:
                value = _local(value)
                shown = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
            lines.append(f"| {key} | {shown.replace('|', '/')} |")
    if validation_image:
        lines += ["", "## Validation", "", "Same prompts and seeds; left: teacher, right: student.", ""]
        if validation_prompts:
            lines += [f"{i + 1}. {p}" for i, p in enumerate(validation_prompts)] + [""]
        lines.append(f"![teacher | student]({_local(validation_image)})")
    # between the markers of `diffusers_bksdm.evaluation.metrics.update_model_card`, so `bksdm eval --model_card` replaces it
    lines += ["", EVAL_SECTION_START, "## Evaluation", ""]
    if evaluation:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in evaluation.items()]
    else:
        lines.append("No evaluation scores were recorded for this checkpoint (add them with `bksdm generate` and "
                     "`bksdm eval --model_card`).")
    lines.append(EVAL_SECTION_END)
    lines += ["", "## Usage", "", "```python", "from diffusers import DiffusionPipeline", ""]
    if repo_id:
        lines.append(f'pipe = DiffusionPipeline.from_pretrained("{repo_id}")')
    else:
        lines.append('pipe = DiffusionPipeline.from_pretrained(".")  # run in the folder that holds this card')
    lines += [
        'image = pipe("a golden vase with different flowers").images[0]',
        "```",
        "",
        "## Limitations",
        "",
        "The student inherits the teacher's limitations and biases, and with fewer blocks its images are in general "
        "somewhat below the teacher's; compare them in the validation grid and the evaluation above.",
    ]
    base_model = teacher if is_hub_id(teacher) else None
    data = ModelCardData(
        license=license or FAMILIES["sd-v1"].license, library_name="diffusers", inference=True, base_model=base_model,
        pipeline_tag="text-to-image", tags=list(dict.fromkeys([*MODEL_CARD_TAGS, f"bk-sdm-{variant}", *extra_tags])),
    )  # fmt: skip
    return ModelCard.from_template(data, template_str=_CARD_TEMPLATE, body="\n".join(lines) + "\n")


def write_model_card(folder: str, card) -> str:
    """Write `card` to `folder/README.md` (temporary file + rename). Returns the path."""
    from .outputs import atomic_write

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
    model_card=None,
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
        model_card (`ModelCard`, *optional*): uploaded as the repo's `README.md` (for a folder without one); the
            local folder is not written to.

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
        if model_card is not None:
            api.upload_file(path_or_fileobj=str(model_card).encode("utf-8"), path_in_repo="README.md",
                            repo_id=repo_id, repo_type="model", commit_message=f"{commit_message}: model card")
    except Exception as error:  # noqa: BLE001 - any hub failure gets the retry instructions
        message = str(error)
        if token:
            message = message.replace(token, "***")
        raise PushError(
            f"Upload of {folder!r} to {repo_id!r} failed ({type(error).__name__}: {message}). The local folder is "
            f"intact; retry with: bksdm push {shlex.quote(folder)} --hub_model_id {shlex.quote(repo_id)}"
        ) from None
    logger.info("pushed %s to %s", folder, repo_id)
    return str(getattr(url, "url", url) or f"https://huggingface.co/{repo_id}")
