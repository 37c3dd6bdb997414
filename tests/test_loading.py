"""The one home of each loading step: pipelines and UNets (`pipelines.load_pipeline` / `load_unet` / `load_teacher`),
token ids (`conditioning.tokenize_captions`) and training images (`training.data.image_source`)."""

from __future__ import annotations

import shutil

import pytest
import torch

from _train_utils import write_image_folder
from diffusers_bksdm.conditioning import TextConditioning, tokenize_captions
from diffusers_bksdm.pipelines import is_pipeline, load_pipeline, load_teacher, load_unet


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_load_unet_reads_the_unet_of_a_pipeline_a_unet_folder_and_a_subfolder_alike(tiny_pipeline_dir, tmp_path):
    pipe, teacher_unet = load_teacher(str(tiny_pipeline_dir))
    assert pipe is not None and pipe.unet is teacher_unet
    bare = tmp_path / "bare-unet"
    shutil.copytree(tiny_pipeline_dir / "unet", bare)
    from_pipeline = load_unet(str(tiny_pipeline_dir))
    from_folder = load_unet(str(bare))
    from_subfolder = load_unet(str(tiny_pipeline_dir), subfolder="unet")
    for unet in (from_pipeline, from_folder, from_subfolder):
        _same_state(unet, teacher_unet)
    none, from_teacher = load_teacher(str(bare))
    assert none is None
    _same_state(from_teacher, teacher_unet)
    assert is_pipeline(str(tiny_pipeline_dir)) and not is_pipeline(str(bare))
    assert not is_pipeline(str(tiny_pipeline_dir), "unet")


def test_a_folder_that_is_neither_is_one_error_naming_the_argument(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    for load in (load_unet, load_teacher):
        with pytest.raises(ValueError, match=r"`--unet` .* neither model_index.json \(a pipeline\) nor config.json"):
            load(str(tmp_path), argument="--unet")
    with pytest.raises(ValueError, match=r"`--subfolder` 'unet' is not a folder of `--unet`"):
        load_unet(str(tmp_path), subfolder="unet", argument="--unet")


def test_load_pipeline_takes_a_replacement_unet_without_checking_it_under_the_pipelines_name(tiny_pipeline_dir):
    from diffusers_bksdm import compress_unet

    student = compress_unet(load_unet(str(tiny_pipeline_dir)), "small")
    pipe = load_pipeline(str(tiny_pipeline_dir), unet=student, safety_checker=None)
    assert pipe.unet is student
    assert pipe.text_encoder is not None and pipe.vae is not None
    builtin = load_pipeline("builtin:tiny-sd", unet=student)
    assert builtin.unet is student
    with pytest.raises(ValueError, match="does not apply to the built-in teacher"):
        load_pipeline("builtin:tiny-sd", variant="fp16")


def test_generate_takes_the_unet_of_a_student_pipeline(tiny_pipeline_dir, tmp_path):
    from diffusers_bksdm import compress_pipeline
    from diffusers_bksdm.evaluation.generate import load_pipeline as load_for_generation
    from diffusers_bksdm.outputs import save_pipeline

    teacher, _ = load_teacher(str(tiny_pipeline_dir))
    student_dir = tmp_path / "student"
    save_pipeline(compress_pipeline(teacher, "tiny"), student_dir)
    pipe = load_for_generation(str(tiny_pipeline_dir), unet=str(student_dir))
    _same_state(pipe.unet, load_unet(str(student_dir / "unet")))
    assert sum(p.numel() for p in pipe.unet.parameters()) < sum(p.numel() for p in teacher.unet.parameters())
    with pytest.raises(ValueError, match=r"`--unet` .* neither model_index.json"):
        load_for_generation(str(tiny_pipeline_dir), unet=str(tmp_path), unet_argument="--unet")


def test_tokenize_captions_is_what_the_conditioning_and_the_collator_feed(tiny_pipeline_dir, tmp_path):
    from diffusers_bksdm.training.data import CaptionCollator, ImageFolderSource, ImageTransform

    pipe, _ = load_teacher(str(tiny_pipeline_dir))
    captions = ["a red circle", "a blue square on the left", "word " * 200]
    ids = tokenize_captions(pipe.tokenizer, captions)
    expected = pipe.tokenizer(captions, max_length=pipe.tokenizer.model_max_length, padding="max_length",
                              truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (3, pipe.tokenizer.model_max_length) and torch.equal(ids, expected)
    assert not torch.equal(ids[0], ids[1])
    (conditioned,) = TextConditioning.from_pipeline(pipe).tokenize(captions)
    assert torch.equal(conditioned, ids)
    assert tokenize_captions(pipe.tokenizer, []).shape == (0, pipe.tokenizer.model_max_length)
    folder = write_image_folder(tmp_path / "images", n=3)
    source = ImageFolderSource(str(folder), ImageTransform(16), "text")
    batch = CaptionCollator(pipe.tokenizer)([source[i] for i in range(3)])
    assert torch.equal(batch["input_ids"], tokenize_captions(pipe.tokenizer, batch["captions"]))


def test_image_source_reads_a_folder_and_names_the_flags(tmp_path):
    from diffusers_bksdm.training.data import DATA_FLAGS, ImageFolderSource, ImageTransform, image_source

    folder = write_image_folder(tmp_path / "images", n=5)
    transform = ImageTransform(16)
    source = image_source(transform, train_data_dir=str(folder), max_train_samples=4, seed=3)
    direct = ImageFolderSource(str(folder), transform, "text", 3, 4)
    assert len(source) == 4 and source.records == direct.records
    assert torch.equal(source[2]["pixel_values"], direct[2]["pixel_values"])
    with pytest.raises(ValueError, match="exactly one of `--train_data_dir` and `--dataset_name`"):
        image_source(transform, argument_names=DATA_FLAGS)
    with pytest.raises(ValueError, match="exactly one of `train_data_dir` and `dataset_name`"):
        image_source(transform, train_data_dir=str(folder), dataset_name="user/data")
    with pytest.raises(ValueError, match="--caption_column"):
        image_source(transform, train_data_dir=str(folder), caption_column="caption", argument_names=DATA_FLAGS)
