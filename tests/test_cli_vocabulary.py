"""One flag vocabulary across `bksdm` commands: the same names for the same things, no abbreviations, every default
in `--help`, old spellings accepted with a warning, and `--help` without torch or diffusers."""

from __future__ import annotations

import argparse
import json
import sys

import pytest
from conftest import run_python

from diffusers_bksdm.cli import build_parser, main
from diffusers_bksdm.commands import command_modules
from diffusers_bksdm.commands._flags import MODEL_FLAG

COMMANDS = {"bench", "cache", "compress", "demo", "distill", "eval", "export", "generate", "lcm", "lora", "plan",
            "push"}
#: commands that read a teacher / model, and those that write a folder (`--output_dir`)
READ_A_MODEL = {"bench", "cache", "compress", "demo", "distill", "export", "generate", "lcm", "lora"}
WRITE_A_FOLDER = {"bench", "cache", "compress", "demo", "distill", "export", "generate", "lcm", "lora"}
#: spellings of the previous release: only ever hidden, deprecated aliases
OLD_SPELLINGS = {"--output", "--repo_id", "--private", "--overwrite"}
HUB_FLAGS = {"--hub_model_id", "--hub_private", "--hub_token"}


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    (subparsers,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(subparsers.choices)


def _current(action: argparse.Action) -> list[str]:
    deprecated = set(getattr(action, "deprecated_options", ()))
    return [o for o in action.option_strings if o not in deprecated]


def test_every_subcommand_is_walked():
    assert set(_subcommands()) == set(command_modules()) == COMMANDS


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_the_shared_vocabulary(name):
    parser = _subcommands()[name]
    assert parser.allow_abbrev is False
    flags = {o: a for a in parser._actions for o in _current(a)}
    for action in parser._actions:
        current = _current(action)
        assert not set(current) & OLD_SPELLINGS, (name, current)
        if MODEL_FLAG in current or {"--teacher", "--model"} & set(current):
            # one destination whatever the spelling; the canonical spelling first
            assert action.dest == "pretrained_model_name_or_path" and current[0] == MODEL_FLAG, (name, current)
        if "--output_dir" in current:
            assert action.dest == "output_dir" and action.metavar == "DIR", name
        if "--output_file" in current:
            assert action.dest == "output_file" and action.metavar == "FILE", name
        hub = {o for o in current if o.startswith("--hub_")}
        assert hub <= HUB_FLAGS, (name, hub)
        for old in getattr(action, "deprecated_options", ()):
            assert old in OLD_SPELLINGS, (name, old)
    if name in READ_A_MODEL:
        assert MODEL_FLAG in flags, name
    if name in WRITE_A_FOLDER:
        assert "--output_dir" in flags, name
    if name == "push":
        assert {"--hub_model_id", "--hub_private", "--hub_token"} <= set(flags)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_shows_every_default(name):
    parser = _subcommands()[name]
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if not action.option_strings or action.required or isinstance(action, argparse._HelpAction):
            continue
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            continue  # no default, or an off switch
        assert f"(default: {action.default})" in text, (name, action.option_strings, action.default)


def test_an_abbreviation_never_becomes_another_flag(capsys):
    parser = build_parser()
    # `--teacher` is an alias on every command that reads a teacher (before, argparse read it as --teacher_dtype)
    args = parser.parse_args(["distill", "--teacher", "builtin:tiny-sd", "--train_data_dir", "data"])
    assert args.pretrained_model_name_or_path == "builtin:tiny-sd" and args.teacher_dtype is None
    for argv, typed in (
        (["distill", "--teacher_d", "fp16", "--teacher", "x"], "--teacher_d"),
        (["generate", "--model", "x", "--prompts", "p", "--output_dir", "out", "--num_inf", "3"], "--num_inf"),
        (["compress", "--teacher", "x", "--output_dir", "out", "--overwr"], "--overwr"),
        (["push", "folder", "--hub_model_id", "me/x", "--hub_priv"], "--hub_priv"),
        (["bench", "--teacher", "x", "--counts"], "--counts"),
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        err = capsys.readouterr().err
        assert f"unrecognized arguments: {typed}" in err, err


def test_old_spellings_still_parse_with_a_warning():
    parser = build_parser()
    with pytest.warns(FutureWarning, match=r"`--repo_id` is deprecated .* use `--hub_model_id`"):
        args = parser.parse_args(["push", "folder", "--repo_id", "me/x"])
    assert args.hub_model_id == "me/x"
    with pytest.warns(FutureWarning, match=r"`--private` is deprecated .* use `--hub_private`"):
        assert parser.parse_args(["push", "folder", "--hub_model_id", "me/x", "--private"]).hub_private is True
    with pytest.warns(FutureWarning, match="use `--output_dir`"):
        assert parser.parse_args(["generate", "--model", "m", "--prompts", "p", "--output", "o"]).output_dir == "o"
    with pytest.warns(FutureWarning, match="use `--output_file`"):
        assert parser.parse_args(["eval", "--output", "scores.json"]).output_file == "scores.json"
    # aliases that read better are not deprecated
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parser.parse_args(["generate", "--model", "m", "--prompts", "p", "--output_dir", "o"]).output_dir == "o"
        assert parser.parse_args(["cache", "--teacher", "t", "--latent_cache_dir", "c"]).output_dir == "c"


def test_help_is_hidden_from_old_spellings_and_names_them():
    help_text = " ".join(_subcommands()["push"].format_help().split())
    assert "--repo_id REPO_ID" not in help_text and "Deprecated spelling: --repo_id." in help_text


HELP_IMPORTS = r"""
import contextlib, io, json, sys
before = set(sys.modules)
from diffusers_bksdm.cli import main
for argv in ([], *[[c] for c in sys.argv[1:]]):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main([*argv, "--help"])
        except SystemExit:
            pass
loaded = set(sys.modules) - before
print(json.dumps({"heavy": sorted(m for m in ("torch", "diffusers", "transformers", "accelerate", "numpy", "PIL")
                                  if m in sys.modules), "count": len(loaded)}))
"""


def test_help_of_every_subcommand_leaves_torch_and_diffusers_unimported():
    report = json.loads(run_python(HELP_IMPORTS, *sorted(COMMANDS)).stdout.strip().splitlines()[-1])
    assert report["heavy"] == []
    # torch alone loads over a thousand modules; the parsers need a few dozen beyond the standard library's
    assert report["count"] < 150, report


def test_the_package_import_is_cheap_too():
    code = "import sys, diffusers_bksdm; print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    assert run_python(code).stdout.strip() == "[]"


def test_lora_writes_a_folder_or_a_file(tmp_path, capsys):
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from diffusers_bksdm import compress_pipeline
    from diffusers_bksdm.miniature.tiny import tiny_pipeline

    teacher = tiny_pipeline("sd-v1", seed=0)
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"])
    inject_adapter_in_model(config, teacher.unet)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "teacher-lora",
                                              unet_lora_layers=get_peft_model_state_dict(teacher.unet))
    args = ["lora", "--teacher", "builtin:tiny-sd", "--lora", str(tmp_path / "teacher-lora")]
    assert main([*args, "--output_dir", str(tmp_path / "student-lora")]) == 0
    student = compress_pipeline(tiny_pipeline("sd-v1", seed=0), "small")
    student.load_lora_weights(tmp_path / "student-lora")  # diffusers finds pytorch_lora_weights.safetensors
    assert main([*args, "--output_file", str(tmp_path / "one.safetensors")]) == 0
    assert (tmp_path / "one.safetensors").is_file()
    assert main([*args, "--output", str(tmp_path / "old.safetensors")]) == 0
    assert "warning: `--output` is deprecated" in capsys.readouterr().err and (tmp_path / "old.safetensors").is_file()
    assert main([*args, "--output_file", str(tmp_path / "one.safetensors")]) == 2
    assert f"`--output_file` {str(tmp_path / 'one.safetensors')!r} exists" in capsys.readouterr().err
    assert main([*args, "--output_file", str(tmp_path / "one.safetensors"), "--overwrite_output_file"]) == 0
    with pytest.raises(SystemExit):  # one or the other
        main([*args, "--output_dir", str(tmp_path / "a"), "--output_file", str(tmp_path / "b.safetensors")])


def test_log_lines_go_above_progress_bars_and_accelerate_info_is_hidden(capsys):
    import logging

    from tqdm import tqdm

    from diffusers_bksdm.cli import command_logging

    with command_logging():
        bar = tqdm(total=2, desc="Steps")
        bar.update(1)
        logging.getLogger("diffusers_bksdm.example").info("saved a checkpoint")
        logging.getLogger("accelerate.checkpointing").info("Model weights saved in a temporary folder")
        bar.update(1)
        bar.close()
    err = capsys.readouterr().err
    (line,) = [line for line in err.split("\n") if "saved a checkpoint" in line]
    assert line.split("\r")[-1] == "INFO diffusers_bksdm.example: saved a checkpoint"  # not glued to the bar
    assert "Model weights saved" not in err


def test_a_program_that_prints_its_own_logs_gets_each_line_once_above_the_bars(capsys):
    import logging

    from tqdm import tqdm

    from diffusers_bksdm.cli import command_logging

    own = logging.StreamHandler(sys.stderr)  # as `logging.basicConfig` sets up
    own.setFormatter(logging.Formatter("mine %(name)s: %(message)s"))
    logging.getLogger().addHandler(own)
    try:
        with command_logging():
            bar = tqdm(total=1, desc="Steps")
            logging.getLogger("diffusers_bksdm.example").info("saved a checkpoint")
            bar.update(1)
            bar.close()
    finally:
        logging.getLogger().removeHandler(own)
    lines = [line.split("\r")[-1] for line in capsys.readouterr().err.split("\n") if "saved a checkpoint" in line]
    assert lines == ["mine diffusers_bksdm.example: saved a checkpoint"]


def test_a_command_leaves_the_logging_configuration_as_it_found_it(tmp_path):
    import logging

    root = logging.getLogger()

    def state():
        return list(root.handlers), root.level, logging.getLogger("accelerate").level

    before = state()
    assert main(["compress", "--teacher", "builtin:tiny-sd", "--output_dir", str(tmp_path / "student")]) == 0
    assert state() == before
