"""`diffusers_bksdm.miniature.demo`, the library side of `bksdm demo`: settings and output folders are refused by the
name the caller uses, before anything is written. The full flow runs in tests/test_miniature.py (through the CLI)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from diffusers_bksdm.cli import main
from diffusers_bksdm.miniature.demo import is_demo_folder, results_table, run_demo

COUNTS = ["max_train_steps", "train_batch_size", "num_images", "images_per_prompt", "num_inference_steps"]
FLAGS = {"output_dir": "--output_dir", "overwrite_output_dir": "--overwrite_output_dir",
         "teacher": "--pretrained_model_name_or_path", "student_variant": "--student_variant",
         **{name: f"--{name}" for name in (*COUNTS, "learning_rate", "seed")}}


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder`: a file's bytes, None for a folder."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.fixture
def teacher(tiny_pipeline_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_pipeline_dir, tmp_path / "teacher"))


@pytest.mark.parametrize("keyword", COUNTS)
@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_a_count_that_is_not_a_whole_number_from_one_is_refused_by_its_name(keyword, value, tmp_path):
    out = tmp_path / "demo"
    with pytest.raises(ValueError, match=rf"^`{keyword}` must be an integer >= 1, got {value!r}\.$"):
        run_demo(out, **{keyword: value})
    with pytest.raises(ValueError, match=rf"^`--{keyword}` must be an integer >= 1, got {value!r}\.$"):
        run_demo(out, **{keyword: value}, argument_names=FLAGS)
    assert not out.exists()


@pytest.mark.parametrize(
    "settings, name",
    [
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
        ({"student_variant": "huge"}, "student_variant"),
    ],
)
def test_other_bad_settings_are_refused_by_their_name(settings, name, tmp_path):
    out = tmp_path / "demo"
    with pytest.raises(ValueError, match=rf"^`{name}` "):
        run_demo(out, **settings)
    with pytest.raises(ValueError, match=rf"^`{FLAGS[name]}` "):
        run_demo(out, **settings, argument_names=FLAGS)
    assert not out.exists()


def test_an_unknown_variant_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"'huge' is not a BK-SDM variant; known variants: .*'small'.*'tiny'"):
        run_demo(tmp_path / "demo", student_variant="huge")


def test_a_users_folder_is_never_written_even_with_overwrite(tmp_path):
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    (folder / "sub" / "summary.json").write_text('{"fid": 1}')
    before = snapshot(folder)
    with pytest.raises(ValueError, match=r"^`output_dir` .* exists and is not empty; .* pass overwrite_output_dir "):
        run_demo(folder)
    with pytest.raises(ValueError, match=r"^`--output_dir` .* was not written by diffusers-bksdm .*; "
                                         r"--overwrite_output_dir replaces only"):
        run_demo(folder, overwrite_output_dir=True, argument_names=FLAGS)
    assert snapshot(folder) == before


def test_the_teachers_folder_and_the_current_directory_are_never_written(teacher, tmp_path, monkeypatch):
    before = snapshot(teacher)
    for out in (teacher, teacher / "unet", teacher / "new"):
        with pytest.raises(ValueError, match=r"^`output_dir` .* lies inside the teacher \(teacher\) "):
            run_demo(out, teacher=str(teacher), overwrite_output_dir=True)
        with pytest.raises(ValueError, match=r"^`--output_dir` .* the teacher \(--pretrained_model_name_or_path\) "):
            run_demo(out, teacher=str(teacher), overwrite_output_dir=True, argument_names=FLAGS)
    assert snapshot(teacher) == before
    monkeypatch.chdir(tmp_path)
    around = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"^`--output_dir` '\.' "):
        run_demo(".", overwrite_output_dir=True, argument_names=FLAGS)
    assert snapshot(tmp_path) == around


def test_is_demo_folder_recognises_an_earlier_demos_summary_only(tmp_path):
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "summary.json").write_text(json.dumps({"student_dir": str(demo / "student"), "results": {}}))
    assert is_demo_folder(demo) and is_demo_folder(str(demo))
    for name, text in (("scores", '{"fid": 1.0, "results": {}}'), ("broken", "{not json"), ("listed", "[1, 2]"),
                       ("notes", None)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / ("notes.txt" if text is None else "summary.json")).write_text(text or "mine")
        assert not is_demo_folder(folder), name
    assert not is_demo_folder(tmp_path / "missing")


def test_an_earlier_demo_without_the_marker_is_replaced_only_with_overwrite(tmp_path):
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "summary.json").write_text(json.dumps({"student_dir": str(demo / "student"), "results": {}}))
    with pytest.raises(ValueError, match=r"^`output_dir` .* exists and is not empty"):
        run_demo(demo)
    assert sorted(p.name for p in demo.iterdir()) == ["summary.json"]
    # with the permission the output policy lets it through: the run stops at the next step, the unknown teacher
    with pytest.raises(ValueError, match=r"^Unknown builtin teacher 'builtin:nope'"):
        run_demo(demo, teacher="builtin:nope", overwrite_output_dir=True, num_images=1)
    assert (demo / "data" / "train" / "metadata.csv").is_file()


def test_results_table_lays_out_one_line_per_model():
    row = {"unet_params": 3277988, "unet_latency_s": 0.0460123, "accuracy": 0.71875, "position_accuracy": 0.125,
           "fd": 2366.404, "seen_accuracy": 0.708333, "num_images": 96}
    assert results_table({"teacher": row}).splitlines() == [
        "model                     UNet params  latency ms  accuracy  position       FD seen acc.",
        "teacher                     3,277,988       46.01     0.719     0.125  2366.40     0.708",
    ]


def test_the_command_names_its_flags_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output_dir", str(out), "--max_train_steps", "0"]) == 2
    assert "`--max_train_steps` must be an integer >= 1, got 0." in capsys.readouterr().err
    assert main(["demo", "--output_dir", str(out), "--student_variant", "huge"]) == 2
    assert "`--student_variant` 'huge' is not a BK-SDM variant" in capsys.readouterr().err
    assert not out.exists()
