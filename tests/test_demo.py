"""`bksdm demo`: the offline end-to-end flow the README's first command runs."""

from __future__ import annotations

import csv

from diffusers import StableDiffusionPipeline
from PIL import Image

from diffusers_bksdm.cli import main
from diffusers_bksdm.tiny import write_shapes_dataset


def test_shapes_dataset_is_an_image_folder_with_metadata(tmp_path):
    write_shapes_dataset(str(tmp_path), num_images=6, size=16, seed=1)
    with open(tmp_path / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and set(rows[0]) == {"file_name", "text"}
    for row in rows:
        image = Image.open(tmp_path / row["file_name"])
        assert image.size == (16, 16) and image.mode == "RGB"
        color, shape = row["text"].split()[1:3]
        assert color in ("red", "green", "blue", "yellow") and shape in ("circle", "square", "triangle")
    # deterministic for a seed
    write_shapes_dataset(str(tmp_path / "again"), num_images=6, size=16, seed=1)
    assert (tmp_path / "again" / "metadata.csv").read_text() == (tmp_path / "metadata.csv").read_text()


def test_demo_runs_offline_and_writes_a_stock_student(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output_dir", str(out), "--max_train_steps", "4", "--num_images", "8"]) == 0
    printed = capsys.readouterr().out
    assert "feature_kd_loss" in printed and "for 4 steps" in printed
    with open(out / "student" / "train_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    pipe = StableDiffusionPipeline.from_pretrained(out / "student")
    assert pipe.unet.config.mid_block_type is None  # the default variant is small
    assert (out / "student" / "README.md").exists()
