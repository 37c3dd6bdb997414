"""Model cards and hub uploads, against a fake `HfApi` (the hub is unreachable from the tests)."""

from __future__ import annotations

import logging
import os

import pytest
from _counts import UNET_PARAMS
from _train_utils import base_args, run_train, write_image_folder

from diffusers_bksdm.cli import main
from diffusers_bksdm.hub import build_model_card

TOKEN = "hf_SECRETtoken0123456789abcdef"


class FakeHfApi:
    """Records what would reach the hub; `upload_folder` lists files the way huggingface_hub filters them."""

    instances: list[FakeHfApi] = []
    fail_with: Exception | None = None

    def __init__(self, token=None, **kwargs):
        self.token = token
        self.created: list[dict] = []
        self.uploaded: list[str] = []
        self.files: dict[str, bytes] = {}
        FakeHfApi.instances.append(self)

    def create_repo(self, repo_id, **kwargs):
        self.created.append({"repo_id": repo_id, **kwargs})
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        if FakeHfApi.fail_with is not None:
            raise FakeHfApi.fail_with
        files = [os.path.relpath(os.path.join(root, name), folder_path).replace(os.sep, "/")
                 for root, _, names in os.walk(folder_path) for name in names]
        self.uploaded = sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns))
        return f"https://huggingface.co/{repo_id}/commit/0"

    def upload_file(self, *, path_or_fileobj, path_in_repo, repo_id, **kwargs):
        self.files[path_in_repo] = path_or_fileobj
        return f"https://huggingface.co/{repo_id}/blob/main/{path_in_repo}"


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeHfApi.instances = []
    FakeHfApi.fail_with = None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    return FakeHfApi


@pytest.fixture
def student_dir(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "student"
    assert main(["compress", "--teacher", str(tiny_pipeline_dir), "--student_variant", "small", "--output_dir",
                 str(out)]) == 0
    return out


def _files(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(r, n), folder).replace(os.sep, "/")
                  for r, _, names in os.walk(folder) for n in names)


def test_push_creates_repo_and_uploads_exactly_the_folder(fake_hub, student_dir):
    (student_dir / "checkpoint-2").mkdir()
    (student_dir / "checkpoint-2" / "optimizer.bin").write_bytes(b"x")
    (student_dir / ".half-written.tmp").write_bytes(b"x")
    assert main(["push", str(student_dir), "--hub_model_id", "me/bk-sdm-small", "--hub_token", TOKEN,
                 "--hub_private"]) == 0
    (api,) = fake_hub.instances
    assert api.token == TOKEN
    assert api.created == [{"repo_id": "me/bk-sdm-small", "private": True, "exist_ok": True, "repo_type": "model"}]
    expected = [f for f in _files(student_dir) if not f.startswith(("checkpoint-", "."))]
    assert api.uploaded == expected
    assert "model_index.json" in expected and "unet/config.json" in expected
    # compress writes no card: push uploads one beside the folder, without writing it there
    assert not (student_dir / "README.md").exists()
    card = api.files["README.md"].decode("utf-8")
    assert "bk-sdm-small" in card and TOKEN not in card


def test_failed_upload_keeps_the_folder_and_says_how_to_retry(fake_hub, student_dir, capsys):
    before = {f: (student_dir / f).read_bytes() for f in _files(student_dir)}
    fake_hub.fail_with = ConnectionError(f"503 from hub (token {TOKEN})")
    assert main(["push", str(student_dir), "--hub_model_id", "me/x", "--hub_token", TOKEN]) == 1
    err = capsys.readouterr().err
    assert f"retry with: bksdm push {student_dir} --hub_model_id me/x" in err and "local folder is intact" in err
    assert TOKEN not in err
    after = {f: (student_dir / f).read_bytes() for f in _files(student_dir)}
    assert after == before


def test_a_folder_without_a_card_gets_one_on_the_hub_not_on_disk(fake_hub, student_dir, capsys):
    assert not (student_dir / "README.md").exists()
    before = {f: (student_dir / f).read_bytes() for f in _files(student_dir)}
    fake_hub.fail_with = ConnectionError("offline")
    assert main(["push", str(student_dir), "--hub_model_id", "me/x"]) == 1
    assert {f: (student_dir / f).read_bytes() for f in _files(student_dir)} == before  # no README.md added
    fake_hub.fail_with = None
    assert main(["push", str(student_dir), "--hub_model_id", "me/x"]) == 0
    api = fake_hub.instances[-1]
    assert "README.md" not in api.uploaded and b"bk-sdm-small" in api.files["README.md"]
    assert {f: (student_dir / f).read_bytes() for f in _files(student_dir)} == before


def test_model_card_has_the_required_fields():
    card = build_model_card(
        teacher="CompVis/stable-diffusion-v1-4", variant="small", teacher_parameters=UNET_PARAMS["sd-v1-4"]["teacher"],
        student_parameters=UNET_PARAMS["sd-v1-4"]["small"],
        recipe={"data": "laion_aes_212k", "optimizer steps": 50000, "batch": 256,
                "lambdas (task, out, feat)": "1.0, 1.0, 1.0"},
        validation_image="validation/step-050000.png", validation_prompts=["a golden vase with different flowers"],
        evaluation={"FID": 16.98, "CLIP score": 0.2677}, repo_id="me/bk-sdm-small")
    data = card.data.to_dict()
    assert data["base_model"] == "CompVis/stable-diffusion-v1-4" and data["library_name"] == "diffusers"
    assert {"bk-sdm", "knowledge-distillation", "diffusers", "text-to-image"} <= set(data["tags"])
    text = str(card)
    assert text.count("<!-- bksdm-eval:start -->") == text.count("<!-- bksdm-eval:end -->") == 1
    for needed in ("859,520,964", "482,346,884", "43.9%", "laion_aes_212k", "50000", "| batch | 256 |",
                   "1.0, 1.0, 1.0", "![teacher | student](validation/step-050000.png)", "| FID | 16.98 |",
                   'from_pretrained("me/bk-sdm-small")'):
        assert needed in text, needed


def test_bksdm_eval_replaces_the_cards_evaluation_section(tmp_path):
    from diffusers_bksdm.hub import write_model_card
    from diffusers_bksdm.evaluation.metrics import update_model_card

    write_model_card(str(tmp_path), build_model_card(teacher="CompVis/stable-diffusion-v1-4", variant="tiny"))
    assert "No evaluation scores were recorded" in (tmp_path / "README.md").read_text()
    update_model_card(tmp_path, "| model | FID |\n|---|---|\n| student | 17.1 |\n")
    text = (tmp_path / "README.md").read_text()
    assert "No evaluation scores were recorded" not in text and "| student | 17.1 |" in text
    assert text.count("## Evaluation") == 1 and "## Usage" in text


def test_distill_push_uploads_the_student_and_never_writes_or_logs_the_token(fake_hub, tiny_pipeline_dir, tmp_path,
                                                                              caplog, capsys):
    caplog.set_level(logging.DEBUG)
    images = write_image_folder(tmp_path / "images", n=2)
    out = tmp_path / "out"
    result = run_train(base_args(tiny_pipeline_dir, out, "--push_to_hub", "--hub_model_id", "me/student",
                                 "--hub_token", TOKEN, "--report_to", "tensorboard", "--checkpointing_steps", "1",
                                 data=images, steps=1))
    (api,) = fake_hub.instances
    assert api.token == TOKEN and api.created[0]["repo_id"] == "me/student"
    assert result["hub_url"] == "https://huggingface.co/me/student"
    assert "model_index.json" in api.uploaded and "unet/diffusion_pytorch_model.safetensors" in api.uploaded
    assert not [f for f in api.uploaded if f.startswith(("checkpoint-", "logs/"))]
    # the token is in no file written (checkpoint state, tracker events, CSV, card) and in no log line
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "trainer_state.json" for p in written) and any("tfevents" in p.name for p in written)
    assert not [p for p in written if TOKEN.encode() in p.read_bytes()]
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err
    assert not [r for r in caplog.records if TOKEN in r.getMessage()]
