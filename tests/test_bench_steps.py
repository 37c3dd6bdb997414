"""`bksdm bench --student_steps`: a few-step student (e.g. the output of `bksdm lcm`) is timed as a whole pipeline at
its own step count and with its own scheduler, next to the teacher at `--steps`."""

from __future__ import annotations

import pytest

from diffusers_bksdm.cli import main
from diffusers_bksdm.evaluation.bench import BenchmarkSettings


@pytest.fixture(scope="module")
def lcm_like_student(tmp_path_factory):
    """A tiny student pipeline saved with an LCMScheduler (what `bksdm lcm` saves, without the training)."""
    from diffusers import LCMScheduler

    from diffusers_bksdm import compress_pipeline
    from diffusers_bksdm.miniature.tiny import builtin_teacher

    teacher = builtin_teacher("builtin:tiny-sd")
    student = compress_pipeline(teacher, "small")
    student.scheduler = LCMScheduler.from_config(teacher.scheduler.config)
    folder = tmp_path_factory.mktemp("bench") / "lcm-student"
    student.save_pretrained(folder)
    return folder


def test_students_run_at_their_own_steps_with_their_own_scheduler(lcm_like_student, tmp_path, monkeypatch):
    import json

    from diffusers import StableDiffusionPipeline

    seen = []
    call = StableDiffusionPipeline.__call__

    def recording(self, *args, **kwargs):
        seen.append(("student" if "_bksdm" in self.unet.config else "teacher", type(self.scheduler).__name__,
                     kwargs["num_inference_steps"]))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", recording)
    out = tmp_path / "report"
    assert main(["bench", "--pretrained_model_name_or_path", "builtin:tiny-sd", "--student", str(lcm_like_student),
                 "--steps", "3", "--student_steps", "2", "--repeats", "1", "--warmup", "0", "--pipeline_repeats",
                 "2", "--no_chart", "--output_dir", str(out)]) == 0
    # every pipeline call: the teacher with its PNDM at 3 steps, the student with its own LCMScheduler at 2
    assert set(seen) == {("teacher", "PNDMScheduler", 3), ("student", "LCMScheduler", 2)}
    assert seen.count(("student", "LCMScheduler", 2)) >= 2
    settings = json.loads((out / "bench.json").read_text())["settings"]
    assert settings["steps"] == 3 and settings["student_steps"] == 2
    assert settings["schedulers"] == {"lcm-student": "LCMScheduler"}
    table = (out / "bench.md").read_text()
    assert "(3 steps)" in table and "(2 steps, LCMScheduler)" in table


@pytest.mark.parametrize(("steps", "student_steps"), [(0, 4), (50, 0), (50, -1)])
def test_student_steps_need_teacher_steps_and_a_positive_count(steps, student_steps):
    with pytest.raises(ValueError, match=r"`student_steps` must be a positive integer and needs `steps` > 0"):
        BenchmarkSettings(steps=steps, student_steps=student_steps)
