"""FID / IS / CLIP score through the real metric path, with small feature extractors built here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_bksdm.cli import main
from diffusers_bksdm.evaluation.metrics import (
    CLIPEmbedder,
    RealStatistics,
    compute_real_statistics,
    evaluate_images,
    results_markdown,
    update_model_card,
)

SIZE = 16


class SmallFeatures(torch.nn.Module):
    """A fixed random conv net: uint8 (N, 3, H, W) -> (N, dim) features (or logits), like the Inception extractors."""

    def __init__(self, dim: int = 8, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 16, 3, stride=2)
        self.head = torch.nn.Linear(16, dim)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1
        x = torch.tanh(self.conv(x)).mean(dim=(2, 3))
        return self.head(x)


def _random_images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # smooth-ish structured images: a random colour gradient plus noise
    base = rng.uniform(0, 255, size=(n, 1, 1, 3))
    ramp = np.linspace(-60, 60, SIZE)[None, :, None, None] * rng.uniform(-1, 1, size=(n, 1, 1, 3))
    noise = rng.normal(0, 20, size=(n, SIZE, SIZE, 3))
    return np.clip(base + ramp + noise, 0, 255).astype(np.uint8)


def _write(folder, arrays) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(folder / f"{i:06d}.png")


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    real = _random_images(40, seed=0)
    rng = np.random.default_rng(1)
    _write(root / "real", real)
    _write(root / "same", real)
    for name, sigma in (("slightly", 10.0), ("strongly", 60.0)):
        noisy = np.clip(real.astype(float) + rng.normal(0, sigma, size=real.shape), 0, 255).astype(np.uint8)
        _write(root / name, noisy)
    return root


def _fid(images, real, extractor, **kwargs) -> float:
    return evaluate_images(images, metrics=["fid"], real_images=real, fid_extractor=extractor, **kwargs)["fid"]


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_perturbation(image_sets):
    extractor = SmallFeatures(dim=8)
    same = _fid(image_sets / "same", image_sets / "real", extractor)
    slightly = _fid(image_sets / "slightly", image_sets / "real", extractor)
    strongly = _fid(image_sets / "strongly", image_sets / "real", extractor)
    assert abs(same) < 1e-8
    assert slightly > 1e-4  # noise of sigma 10 (of 255) moves the feature statistics a little ...
    assert strongly > 10 * slightly  # ... and noise of sigma 60 much more


def test_real_statistics_roundtrip_gives_the_same_fid(image_sets, tmp_path):
    extractor = SmallFeatures(dim=8)
    stats = compute_real_statistics(image_sets / "real", feature_extractor=extractor, batch_size=7)
    assert stats.num_samples == 40 and stats.mu.shape == (8,) and stats.sigma.shape == (8, 8)
    # the statistics are the features' mean and (unbiased) covariance
    arrays = np.stack([np.asarray(Image.open(p)) for p in sorted((image_sets / "real").iterdir())])
    with torch.no_grad():
        features = extractor(torch.from_numpy(arrays).permute(0, 3, 1, 2)).double().numpy()
    np.testing.assert_allclose(stats.mu, features.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.sigma, np.cov(features, rowvar=False), rtol=1e-5, atol=1e-6)

    path = tmp_path / "stats.npz"
    stats.save(path)
    direct = _fid(image_sets / "slightly", image_sets / "real", extractor)
    from_file = evaluate_images(image_sets / "slightly", metrics=["fid"], real_stats=path, fid_extractor=extractor)
    assert from_file["fid"] == pytest.approx(direct, rel=1e-6)
    # a pytorch-fid file has only mu and sigma
    bare = tmp_path / "pytorch_fid.npz"
    np.savez(bare, mu=stats.mu, sigma=stats.sigma)
    from_bare = evaluate_images(image_sets / "slightly", metrics=["fid"], real_stats=bare, fid_extractor=extractor)
    assert from_bare["fid"] == pytest.approx(direct, rel=1e-6)


def test_inception_score_matches_a_reference_from_the_logits(image_sets):
    extractor = SmallFeatures(dim=10, seed=3)
    result = evaluate_images(image_sets / "strongly", metrics=["is"], is_extractor=extractor, is_splits=1)
    paths = sorted((image_sets / "strongly").iterdir())
    batch = torch.from_numpy(np.stack([np.asarray(Image.open(p)) for p in paths])).permute(0, 3, 1, 2)
    with torch.no_grad():
        probs = extractor(batch).double().softmax(dim=1)
    marginal = probs.mean(dim=0, keepdim=True)
    expected = torch.exp((probs * (probs.log() - marginal.log())).sum(dim=1).mean())
    assert result["num_images"] == 40
    assert result["is"] == pytest.approx(float(expected), rel=1e-5)
    assert 1.0 < result["is"] <= 10.0


def _tiny_clip():
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from diffusers_bksdm.miniature.tiny import tiny_tokenizer

    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=1000,
                max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
                  patch_size=8)  # fmt: skip
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, processor, tiny_tokenizer()


def test_clip_score_is_the_mean_raw_cosine_of_each_image_and_its_prompt(image_sets):
    model, processor, tokenizer = _tiny_clip()
    # random letters: the tiny tokenizer is character-level, and these texts differ from their first character on
    rng = np.random.default_rng(0)
    prompts = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz "), size=12)) for _ in range(40)]
    embedder = CLIPEmbedder(model, processor, tokenizer)
    result = evaluate_images(image_sets / "real", prompts, metrics=["clip"], clip_embedder=embedder, batch_size=16)

    # reference: CLIPModel's own forward, cosine = logits_per_image / logit_scale, diagonal = matching pairs
    paths = sorted((image_sets / "real").iterdir())
    pixels = processor(images=[np.asarray(Image.open(p)) for p in paths], return_tensors="pt")["pixel_values"]
    tokens = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
    cosine = (out.logits_per_image / model.logit_scale.exp()).detach()  # [image i, text j]
    assert result["clip"] == pytest.approx(float(cosine.diagonal().mean()), abs=1e-5)

    # image i is paired with prompt i: with the prompts reversed, image i meets text 39 - i
    reversed_pairs = cosine.flip(1).diagonal()
    assert (reversed_pairs - cosine.diagonal()).abs().max() > 1e-3  # the pairing does change the cosines
    shuffled = evaluate_images(image_sets / "real", prompts[::-1], metrics=["clip"], clip_embedder=embedder)
    assert shuffled["clip"] == pytest.approx(float(reversed_pairs.mean()), abs=1e-5)


def test_all_metrics_in_one_pass_and_markdown(image_sets):
    model, processor, tokenizer = _tiny_clip()
    result = evaluate_images(
        image_sets / "slightly",
        [f"prompt {i}" for i in range(40)],
        real_images=image_sets / "real",
        fid_extractor=SmallFeatures(8),
        is_extractor=SmallFeatures(10, seed=3),
        clip_embedder=CLIPEmbedder(model, processor, tokenizer),
        batch_size=9,
    )
    assert set(result) >= {"fid", "is", "is_std", "clip", "num_images"}
    table = results_markdown(result, name="bk-small", family="sd-v1")
    assert f"| bk-small | {result['fid']:.2f} | {result['is']:.2f} | {result['clip']:.4f} | 40 |" in table
    assert "| BK-SDM-Small (paper, UNet 0.49B) | 16.98 | 31.68 | 0.2677 | 30000 |" in table
    assert "SD v2.1-base" not in table


def test_bad_image_folders(tmp_path, image_sets):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"`images` '.*empty' holds no image; expected files ending in"):
        evaluate_images(empty, metrics=["is"], is_extractor=SmallFeatures(10))
    with pytest.raises(FileNotFoundError, match=r"`images` '.*nowhere' is not a folder"):
        evaluate_images(tmp_path / "nowhere", metrics=["is"], is_extractor=SmallFeatures(10))
    with pytest.raises(FileNotFoundError, match=r"`--images` '.*nowhere' is not a folder"):
        evaluate_images(tmp_path / "nowhere", metrics=["is"], argument_names={"images": "--images"})

    mixed = tmp_path / "mixed"
    _write(mixed, _random_images(3, seed=5))
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(mixed / "000003.png")
    with pytest.raises(ValueError, match=r"000003\.png' is 24x20 but '.*000000\.png' is 16x16; all images must have"):
        evaluate_images(mixed, metrics=["is"], is_extractor=SmallFeatures(10), is_splits=1)

    with pytest.raises(ValueError, match=r"cannot pair '.*000003\.png' with a prompt"):
        evaluate_images(image_sets / "real", ["only", "three", "prompts"], metrics=["clip"], clip_embedder=object())
    with pytest.raises(ValueError, match=r"`metrics` must be a non-empty subset of \['fid', 'is', 'clip'\]"):
        evaluate_images(image_sets / "real", metrics=["fid", "lpips"])
    with pytest.raises(ValueError, match="FID needs the real images"):
        evaluate_images(image_sets / "real", metrics=["fid"], fid_extractor=SmallFeatures(8))


def test_bad_real_statistics(tmp_path, image_sets):
    missing = tmp_path / "val2014.npz"
    with pytest.raises(FileNotFoundError, match=r"`path` '.*val2014\.npz' does not exist; compute it once"):
        RealStatistics.load(missing)
    no_mu = tmp_path / "no_mu.npz"
    np.savez(no_mu, sigma=np.eye(8))
    with pytest.raises(ValueError, match=r"no_mu\.npz' has no \['mu'\] array; expected an \.npz with `mu`"):
        RealStatistics.load(no_mu)
    wrong_dim = tmp_path / "dim4.npz"
    np.savez(wrong_dim, mu=np.zeros(4), sigma=np.eye(4))
    with pytest.raises(ValueError, match="holds 4-dimensional features but the FID feature extractor gives 8"):
        evaluate_images(image_sets / "real", metrics=["fid"], real_stats=wrong_dim, fid_extractor=SmallFeatures(8))
    other = tmp_path / "other.npz"
    RealStatistics(np.zeros(8), np.eye(8), 10, "inception-v3-compat-2048").save(other)
    with pytest.raises(ValueError, match="computed with the feature extractor 'inception-v3-compat-2048'"):
        evaluate_images(image_sets / "real", metrics=["fid"], real_stats=other, fid_extractor=SmallFeatures(8))


def test_eval_cli_reports_a_missing_real_stats_file(tmp_path, image_sets, capsys):
    missing = tmp_path / "coco.npz"
    code = main(["eval", "--images", str(image_sets / "real"), "--metrics", "fid", "--real_stats", str(missing)])
    assert code == 2
    assert f"`--real_stats` '{missing}' does not exist" in capsys.readouterr().err


def test_standard_extractor_needs_torch_fidelity(image_sets, capsys):
    pytest.importorskip("torchmetrics")
    try:
        import torch_fidelity  # noqa: F401
    except Exception:
        pass
    else:
        pytest.skip("torch-fidelity is installed: the standard extractor loads (and would download weights)")
    code = main(["eval", "--images", str(image_sets / "real"), "--metrics", "is"])
    assert code == 2
    err = capsys.readouterr().err
    assert "need torch-fidelity, which needs the torchvision built for your torch" in err
    # the advice keeps the installed torch: torchvision of the matching release from torch's own index, then
    # torch-fidelity without dependencies
    import torch

    minor = int(torch.__version__.split(".")[1])
    assert f'pip install "torchvision==0.{minor + 15}.*" --index-url https://download.pytorch.org/whl/' in err
    assert "pip install --no-deps torch-fidelity" in err


def test_model_card_section_is_replaced_not_appended(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("---\nlicense: apache-2.0\n---\n# my student\n\nSome text.\n", encoding="utf-8")
    update_model_card(tmp_path, results_markdown({"fid": 20.0, "num_images": 10}, "v1"), {"seed": 1234})
    update_model_card(tmp_path, results_markdown({"fid": 18.5, "num_images": 10}, "v2"), {"seed": 1234})
    text = card.read_text(encoding="utf-8")
    assert text.startswith("---\nlicense: apache-2.0\n---\n# my student\n\nSome text.\n")
    assert text.count("## Evaluation") == 1
    assert "| v2 | 18.50 |" in text and "| v1 |" not in text and "seed=1234" in text


def test_clip_model_that_cannot_be_loaded(tmp_path):
    with pytest.raises(OSError, match=r"`name_or_path` '.*no-clip' could not be loaded: expected a transformers CLIP"):
        CLIPEmbedder.from_pretrained(str(tmp_path / "no-clip"))
