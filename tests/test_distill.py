"""BKDistiller: the BK-SDM loss against an independent reference, gradients, hooks, wrappers and bad inputs."""

from __future__ import annotations

import contextlib
import copy
import gc
import inspect
import logging
import pickle
import weakref
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, PNDMScheduler, UNet2DConditionModel

from diffusers_bksdm import BKDistiller, DistillationOutput, RemovalPlan, compress_unet, training_target
from diffusers_bksdm.miniature.tiny import tiny_scheduler, tiny_unet, tiny_unet_config

# The feature pairs of BK-SDM's feature-level KD (arXiv:2305.15798): the output of each block stage (for the tiny
# student, whose innermost down stage lost its downsampler, its last attention's projection), written out literally:
# (teacher module, student module).
OFFICIAL_PAIRS = {
    "base": [
        ("down_blocks.0", "down_blocks.0"),
        ("down_blocks.1", "down_blocks.1"),
        ("down_blocks.2", "down_blocks.2"),
        ("down_blocks.3", "down_blocks.3"),
        ("up_blocks.0", "up_blocks.0"),
        ("up_blocks.1", "up_blocks.1"),
        ("up_blocks.2", "up_blocks.2"),
        ("up_blocks.3", "up_blocks.3"),
    ],
    "tiny": [
        ("down_blocks.0", "down_blocks.0"),
        ("down_blocks.1", "down_blocks.1"),
        ("down_blocks.2.attentions.1.proj_out", "down_blocks.2.attentions.0.proj_out"),
        ("up_blocks.1", "up_blocks.0"),
        ("up_blocks.2", "up_blocks.1"),
        ("up_blocks.3", "up_blocks.2"),
    ],
}
OFFICIAL_PAIRS["small"] = list(OFFICIAL_PAIRS["base"])
VARIANTS = ["base", "small", "tiny"]


def make_batch(unet, batch: int = 2, seed: int = 0, tokens: int = 5):
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    latents = torch.randn(batch, unet.config.in_channels, size, size, generator=g)
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, 1000, (batch,), generator=g)
    text = torch.randn(batch, tokens, unet.config.cross_attention_dim, generator=g)
    return latents, noise, timesteps, text


def noisy_inputs(unet, batch: int = 2, seed: int = 0):
    latents, noise, timesteps, text = make_batch(unet, batch, seed)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    return noisy, timesteps, text, noise


def reference_losses(teacher, student, pairs, noisy, timesteps, text, target, normalize=False):
    """The BK-SDM loss (task + output-level + feature-level KD) computed independently: hooks on the named modules,
    float64 mean squared errors."""
    recorded = {"teacher": {}, "student": {}}
    handles = []

    def hook(side, name):
        def fn(module, args, output):
            recorded[side][name] = output[0] if isinstance(output, tuple) else output

        return fn

    for t_name, s_name in pairs:
        handles.append(teacher.get_submodule(t_name).register_forward_hook(hook("teacher", t_name)))
        handles.append(student.get_submodule(s_name).register_forward_hook(hook("student", s_name)))
    try:
        with torch.no_grad():
            teacher_pred = teacher(noisy, timesteps, text).sample
            student_pred = student(noisy, timesteps, text).sample
    finally:
        for h in handles:
            h.remove()

    def mse(a, b):
        return ((a.double() - b.double()) ** 2).mean().item()

    features = 0.0
    for t_name, s_name in pairs:
        t, s = recorded["teacher"][t_name], recorded["student"][s_name]
        term = mse(s, t)
        if normalize:
            term /= (t.double() ** 2).mean().item()
        features += term
    return mse(student_pred, target), mse(student_pred, teacher_pred), features


def assert_rel(actual: torch.Tensor, expected: float, rel: float = 1e-6):
    assert actual.dtype == torch.float32
    assert actual.item() == pytest.approx(expected, rel=rel, abs=0), (actual.item(), expected)


@pytest.fixture(scope="module")
def teacher():
    return tiny_unet("sd-v1", seed=1)


@pytest.fixture(scope="module")
def students(teacher):
    return {v: compress_unet(teacher, v) for v in VARIANTS}


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.02):
    """Make a student differ from its teacher (a freshly copied student would give near-zero KD terms)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


# --------------------------------------------------------------------------------------------------------------------
# The loss


@pytest.mark.parametrize("variant", VARIANTS)
def test_pairs_are_the_official_ones(teacher, students, variant):
    with BKDistiller(teacher, students[variant]) as kd:
        assert kd.feature_pairs == OFFICIAL_PAIRS[variant]
        assert kd.block_map.variant == variant


@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_matches_independent_reference(teacher, students, variant):
    student = perturb(copy.deepcopy(students[variant]))
    noisy, timesteps, text, target = noisy_inputs(teacher, batch=3)
    expected = reference_losses(teacher, student, OFFICIAL_PAIRS[variant], noisy, timesteps, text, target)

    with BKDistiller(teacher, student) as kd:
        out = kd(noisy, timesteps, text, target)
    assert isinstance(out, DistillationOutput)
    assert_rel(out.task_loss, expected[0])
    assert_rel(out.output_kd_loss, expected[1])
    assert_rel(out.feature_kd_loss, expected[2])
    assert_rel(out.loss, sum(expected))
    assert len(out.feature_losses) == len(OFFICIAL_PAIRS[variant])
    assert out.teacher_pred.grad_fn is None and not out.teacher_pred.requires_grad
    assert out.student_pred.requires_grad and out.loss.requires_grad
    assert not out.skipped


def test_lambdas_weight_the_terms(teacher, students):
    student = perturb(copy.deepcopy(students["small"]), seed=3)
    noisy, timesteps, text, target = noisy_inputs(teacher)
    task, out_kd, feat = reference_losses(teacher, student, OFFICIAL_PAIRS["small"], noisy, timesteps, text, target)
    with BKDistiller(teacher, student, lambda_task=0.5, lambda_out=2.0, lambda_feat=0.25) as kd:
        out = kd(noisy, timesteps, text, target)
    assert_rel(out.loss, 0.5 * task + 2.0 * out_kd + 0.25 * feat)
    with BKDistiller(teacher, student, lambda_out=0.0, lambda_feat=0.0) as kd:
        out = kd(noisy, timesteps, text, target)
    assert_rel(out.loss, task)


def test_normalized_feature_loss(teacher, students):
    student = perturb(copy.deepcopy(students["tiny"]), seed=4)
    noisy, timesteps, text, target = noisy_inputs(teacher)
    expected = reference_losses(
        teacher, student, OFFICIAL_PAIRS["tiny"], noisy, timesteps, text, target, normalize=True
    )
    with BKDistiller(teacher, student, normalize_features=True) as kd:
        out = kd(noisy, timesteps, text, target)
    assert_rel(out.feature_kd_loss, expected[2])
    assert_rel(out.task_loss, expected[0])


def test_all_pairs_add_the_mid_block_where_both_have_one(teacher, students):
    with BKDistiller(teacher, students["base"], feature_pairs="all") as kd:
        assert ("mid_block", "mid_block") in kd.feature_pairs
        assert len(kd.feature_pairs) == 9
    with BKDistiller(teacher, students["small"], feature_pairs="all") as kd:
        assert kd.feature_pairs == OFFICIAL_PAIRS["small"]


def test_explicit_pairs_equal_the_reference(teacher, students):
    student = perturb(copy.deepcopy(students["tiny"]), seed=5)
    pairs = [("down_blocks.1", "down_blocks.1"), ("up_blocks.1.attentions.2", "up_blocks.0.attentions.1")]
    noisy, timesteps, text, target = noisy_inputs(teacher)
    expected = reference_losses(teacher, student, pairs, noisy, timesteps, text, target)
    with BKDistiller(teacher, student, feature_pairs=pairs) as kd:
        out = kd(noisy, timesteps, text, target)
    assert_rel(out.feature_kd_loss, expected[2])


def test_sd_v2_family(students):
    teacher = tiny_unet("sd-v2", seed=2)
    for variant in VARIANTS:
        student = perturb(compress_unet(teacher, variant), seed=6)
        noisy, timesteps, text, target = noisy_inputs(teacher)
        expected = reference_losses(teacher, student, OFFICIAL_PAIRS[variant], noisy, timesteps, text, target)
        with BKDistiller(teacher, student) as kd:
            out = kd(noisy, timesteps, text, target)
        assert_rel(out.feature_kd_loss, expected[2])
        assert_rel(out.loss, sum(expected))


def test_sdxl_added_cond_kwargs():
    teacher = tiny_unet("sdxl", seed=0)
    plan = RemovalPlan(
        down_layers=(0,), up_layers=(0, -1), remove_mid_block=True, transformer_layers_per_block=(1, 1, 2)
    )
    student = perturb(compress_unet(teacher, plan))
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 5, 64, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    with BKDistiller(teacher, student) as kd:
        assert kd.block_map.plan == plan  # read from the student's metadata
        out = kd(noisy, torch.tensor([1, 900]), text, torch.randn(2, 4, 8, 8), added_cond_kwargs=added)
    assert torch.isfinite(out.loss)
    out.loss.backward()


# --------------------------------------------------------------------------------------------------------------------
# Gradients and training


def test_gradients_reach_the_student_only(teacher, students):
    student = perturb(copy.deepcopy(students["tiny"]), seed=7)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    noisy, timesteps, text, target = noisy_inputs(teacher)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    with BKDistiller(teacher, student) as kd:
        out = kd(noisy, timesteps, text, target)
        out.loss.backward()
        no_grad = [n for n, p in student.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
        assert no_grad == []
        assert all(p.grad is None for p in teacher.parameters())
        assert all(not p.requires_grad for p in teacher.parameters())
        assert not teacher.training
        optimizer.step()
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key


@pytest.mark.parametrize("variant", ["small", "tiny"])
def test_a_few_steps_lower_the_loss(teacher, students, variant):
    student = perturb(copy.deepcopy(students[variant]), seed=8, scale=0.05)
    student.train()
    noisy, timesteps, text, target = noisy_inputs(teacher, batch=4, seed=1)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    losses = []
    with BKDistiller(teacher, student) as kd:
        for _ in range(5):
            out = kd(noisy, timesteps, text, target)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            losses.append(out.loss.item())
        final = kd(noisy, timesteps, text, target).loss.item()
    assert final < losses[0] * 0.9, losses + [final]


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(teacher, students):
    plain = perturb(copy.deepcopy(students["small"]), seed=9)
    checkpointed = copy.deepcopy(plain)
    checkpointed.enable_gradient_checkpointing()
    plain.train()
    checkpointed.train()
    noisy, timesteps, text, target = noisy_inputs(teacher)
    grads, losses = [], []
    for student in (plain, checkpointed):
        with BKDistiller(teacher, student) as kd:
            out = kd(noisy, timesteps, text, target)
            out.loss.backward()
        losses.append(out.loss.item())
        grads.append({n: p.grad.clone() for n, p in student.named_parameters()})
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# v-prediction


def test_training_target_by_prediction_type():
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([3, 700])
    assert training_target(tiny_scheduler("sd-v1"), latents, noise, timesteps) is noise
    v_scheduler = tiny_scheduler("sd-v2-v")
    velocity = training_target(v_scheduler, latents, noise, timesteps)
    alphas = v_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    torch.testing.assert_close(velocity, alphas.sqrt() * noise - (1 - alphas).sqrt() * latents)
    sample_scheduler = DDPMScheduler(prediction_type="sample")
    assert training_target(sample_scheduler, latents, noise, timesteps) is latents
    with pytest.raises(ValueError, match="prediction_type.*'flow'.*accepted"):
        training_target(DDPMScheduler(prediction_type="flow"), latents, noise, timesteps)
    with pytest.raises(ValueError, match="get_velocity"):
        training_target(PNDMScheduler(prediction_type="v_prediction"), latents, noise, timesteps)


def test_v_prediction_distillation():
    teacher = tiny_unet("sd-v2-v", seed=3)
    student = perturb(compress_unet(teacher, "small"), seed=10)
    scheduler = tiny_scheduler("sd-v2-v")
    assert scheduler.config.prediction_type == "v_prediction"
    latents, noise, timesteps, text = make_batch(teacher, batch=2, seed=2)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = training_target(scheduler, latents, noise, timesteps)
    assert not torch.allclose(target, noise)
    expected = reference_losses(teacher, student, OFFICIAL_PAIRS["small"], noisy, timesteps, text, target)
    with BKDistiller(teacher, student) as kd:
        out = kd(noisy, timesteps, text, target)
    assert_rel(out.task_loss, expected[0])
    assert_rel(out.loss, sum(expected))


# --------------------------------------------------------------------------------------------------------------------
# Hooks and wrappers


def picklable(module: torch.nn.Module) -> bool:
    """Whether `module` pickles (`torch.save(model)`): a forward hook a distiller left behind does not."""
    try:
        pickle.dumps(module)
    except (AttributeError, TypeError, pickle.PicklingError):
        return False
    return True


@contextlib.contextmanager
def watched_features(kd: BKDistiller):
    """Weak references to every output of the modules `kd` pairs, teacher and student side, taken by hooks of our own
    while they are registered."""
    refs, handles = [], []

    def hook(module, args, output):
        first = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(first, torch.Tensor):
            refs.append(weakref.ref(first))

    for teacher_name, student_name in kd.feature_pairs:
        handles.append(kd.teacher.get_submodule(teacher_name).register_forward_hook(hook))
        handles.append(kd.student_module.get_submodule(student_name).register_forward_hook(hook))
    try:
        yield refs
    finally:
        for handle in handles:
            handle.remove()


def assert_released(refs: list) -> None:
    """No feature is still alive: the distiller holds none between calls (the caller dropped the outputs)."""
    gc.collect()
    alive = sum(ref() is not None for ref in refs)
    assert refs and alive == 0, f"{alive} of {len(refs)} recorded features are still held"


def test_hooks_register_once_and_are_removed(teacher, students):
    student = students["tiny"]
    assert picklable(teacher) and picklable(student)
    kd = BKDistiller(teacher, student)
    assert kd.hooks_registered and not picklable(teacher) and not picklable(student)
    kd.register_hooks()  # again: nothing changes
    noisy, timesteps, text, target = noisy_inputs(teacher)
    with watched_features(kd) as features:
        first = kd(noisy, timesteps, text, target).loss.item()
        assert kd(noisy, timesteps, text, target).loss.item() == first
    assert_released(features)
    kd.remove_hooks()
    assert not kd.hooks_registered and picklable(teacher) and picklable(student)  # every hook is gone
    with pytest.raises(RuntimeError, match="register_hooks"):
        kd(noisy, timesteps, text, target)
    with kd:
        assert kd.hooks_registered and not picklable(student)
        assert kd(noisy, timesteps, text, target).loss.item() == first
    assert not kd.hooks_registered and picklable(teacher) and picklable(student)


def test_hooks_go_away_with_the_distiller(teacher, students):
    kd = BKDistiller(teacher, students["base"])
    ref = weakref.ref(kd)
    del kd
    gc.collect()
    assert ref() is None
    assert picklable(teacher) and picklable(students["base"])


def test_features_released_when_the_forward_fails(teacher, students):
    student = students["small"]
    noisy, timesteps, text, target = noisy_inputs(teacher)
    with BKDistiller(teacher, student) as kd, watched_features(kd) as features:
        with pytest.raises(ValueError, match="target"):
            kd(noisy, timesteps, text, target[:, :2])  # channel mismatch is found after the forward
        assert_released(features)
        # nor is it left recording: forwards outside its calls keep nothing
        student(noisy, timesteps, text)
        teacher(noisy, timesteps, text)
        assert_released(features)


def test_other_forwards_are_not_recorded(teacher, students):
    student = students["small"]
    with BKDistiller(teacher, student) as kd, watched_features(kd) as features:
        noisy, timesteps, text, target = noisy_inputs(teacher)
        student(noisy, timesteps, text)
        teacher(noisy, timesteps, text)
        assert_released(features)
        kd(noisy, timesteps, text, target)  # before and after one of its own calls
        student(noisy, timesteps, text)
        teacher(noisy, timesteps, text)
        assert_released(features)


class Wrapper(torch.nn.Module):
    """Stands in for `DistributedDataParallel`: holds the model under `.module` and forwards to it."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


def test_wrapped_students(teacher, students, monkeypatch):
    from diffusers_bksdm import distill

    student = perturb(copy.deepcopy(students["tiny"]), seed=11)
    noisy, timesteps, text, target = noisy_inputs(teacher)
    with BKDistiller(teacher, student) as kd:
        expected = kd(noisy, timesteps, text, target).loss.item()

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", Wrapper)
    wrapped = Wrapper(student)
    with BKDistiller(teacher, wrapped) as kd:
        assert kd.student is wrapped and kd.student_module is student
        out = kd(noisy, timesteps, text, target)  # the features of the inner modules are recorded: same loss
        assert wrapped.calls == 1  # the forward goes through the wrapper (DDP's gradient sync)
        assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert picklable(student)
    assert distill.unwrap_model(Wrapper(Wrapper(student))) is student
    # accelerate's extract_model_from_parallel, repeated: compiled and parallel wrappers nest in any order
    assert distill.unwrap_model(torch.compile(Wrapper(student))) is student
    assert distill.unwrap_model(Wrapper(torch.compile(student))) is student

    # wrapping after the distiller was built: assign the wrapper
    with BKDistiller(teacher, student) as kd:
        other = Wrapper(student)
        kd.student = other  # the same inner model: the hooks stay where they are
        assert kd(noisy, timesteps, text, target).loss.item() == pytest.approx(expected, rel=1e-6)
        assert other.calls == 1
    assert picklable(student)  # and go away with the distiller's


@pytest.mark.slow
def test_torch_compiled_student(teacher, students):
    student = perturb(copy.deepcopy(students["tiny"]), seed=12)
    noisy, timesteps, text, target = noisy_inputs(teacher)
    with BKDistiller(teacher, student) as kd:
        expected = kd(noisy, timesteps, text, target)
    compiled = torch.compile(student, backend="eager")
    with BKDistiller(teacher, compiled) as kd:
        assert kd.student_module is student
        out = kd(noisy, timesteps, text, target)
        out.loss.backward()
    assert out.feature_kd_loss.item() == pytest.approx(expected.feature_kd_loss.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(expected.loss.item(), rel=1e-5)


def test_teacher_forced_to_eval_and_frozen(students):
    teacher = tiny_unet("sd-v1", seed=1)
    teacher.train()
    with BKDistiller(teacher, students["base"]) as kd:
        assert not teacher.training
        assert not any(p.requires_grad for p in teacher.parameters())
        teacher.train()
        kd(*noisy_inputs(teacher))
        assert not teacher.training


def test_teacher_in_half_precision(students):
    teacher = tiny_unet("sd-v1", seed=1).to(torch.bfloat16)
    student = students["base"]
    noisy, timesteps, text, target = noisy_inputs(student)
    with BKDistiller(teacher, student) as kd:
        out = kd(noisy, timesteps, text, target)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


# --------------------------------------------------------------------------------------------------------------------
# Finding the block map


def test_student_without_metadata_is_matched_to_a_registered_variant(teacher, students):
    config = dict(students["tiny"].config)
    config.pop("_bksdm")
    plain = UNet2DConditionModel.from_config(config)
    assert "_bksdm" not in plain.config
    with BKDistiller(teacher, plain) as kd:
        assert kd.block_map.variant == "tiny"
        assert kd.feature_pairs == OFFICIAL_PAIRS["tiny"]


def test_explicit_variant_must_fit(teacher, students):
    with BKDistiller(teacher, students["small"], variant="small") as kd:
        assert kd.feature_pairs == OFFICIAL_PAIRS["small"]
    with pytest.raises(ValueError, match="(?s)not derived from this teacher.*mid_block_type"):
        BKDistiller(teacher, students["small"], variant="base")
    with pytest.raises(ValueError, match="Unknown variant 'huge'"):
        BKDistiller(teacher, students["small"], variant="huge")


def test_mismatched_teacher_and_student_raise(teacher, students):
    config = tiny_unet_config("sd-v1")
    config["block_out_channels"] = [16, 32, 32, 32]
    unrelated = UNet2DConditionModel.from_config(config)
    with pytest.raises(ValueError, match="(?s)not derived from this teacher.*block_out_channels"):
        BKDistiller(teacher, unrelated)
    # metadata that records a plan, but the config was made for another teacher
    other_teacher = UNet2DConditionModel.from_config(config)
    with pytest.raises(ValueError, match="(?s)not derived from this teacher.*recorded plan"):
        BKDistiller(other_teacher, students["small"])
    with pytest.raises(ValueError, match="same module"):
        BKDistiller(teacher, teacher)
    assert picklable(teacher)  # a refused distiller leaves no hook


def test_explicit_pairs_are_validated(teacher, students):
    student = students["tiny"]
    with pytest.raises(ValueError, match="teacher has no module 'down_blocks.9'"):
        BKDistiller(teacher, student, feature_pairs=[("down_blocks.9", "down_blocks.0")])
    with pytest.raises(ValueError, match="student has no module 'up_blocks.3'"):
        BKDistiller(teacher, student, feature_pairs=[("up_blocks.3", "up_blocks.3")])
    with pytest.raises(ValueError, match="feature_pairs"):
        BKDistiller(teacher, student, feature_pairs="some")
    with pytest.raises(ValueError, match="feature_pairs"):
        BKDistiller(teacher, student, feature_pairs=[])
    with pytest.raises(ValueError, match="entries"):
        BKDistiller(teacher, student, feature_pairs=[("down_blocks.0",)])
    # shapes are checked on the first batch and the message names both modules and shapes
    with BKDistiller(teacher, student, feature_pairs=[("down_blocks.2", "down_blocks.2")]) as kd:
        with pytest.raises(
            ValueError, match=r"teacher 'down_blocks.2' \(2, 64, 1, 1\) vs student 'down_blocks.2' \(2, 64, 2, 2\)"
        ):
            kd(*noisy_inputs(teacher))
    # explicit pairs work between models that are not related by a block map
    config = tiny_unet_config("sd-v1")
    config["layers_per_block"] = 3
    unrelated = UNet2DConditionModel.from_config(config)
    with BKDistiller(teacher, unrelated, feature_pairs=[("up_blocks.3", "up_blocks.3")]) as kd:
        assert torch.isfinite(kd(*noisy_inputs(teacher)).loss)


def test_bad_arguments(teacher, students):
    student = students["base"]
    for kwargs, pattern in [
        ({"lambda_task": -1}, "lambda_task"),
        ({"lambda_feat": float("nan")}, "lambda_feat"),
        ({"on_nonfinite": "ignore"}, "on_nonfinite.*'raise', 'skip'"),
        ({"normalize_features": "yes"}, "normalize_features"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            BKDistiller(teacher, student, **kwargs)
    with pytest.raises(TypeError, match="student_unet"):
        BKDistiller(teacher, "unet")
    assert picklable(teacher) and picklable(student)  # a refused distiller leaves no hook


def test_batch_shape_mismatches_name_the_tensors(teacher, students):
    noisy, timesteps, text, target = noisy_inputs(teacher, batch=2)
    with BKDistiller(teacher, students["small"]) as kd, watched_features(kd) as features:
        with pytest.raises(ValueError, match="`target` has shape \\(3, 4, 8, 8\\).*`noisy_latents`"):
            kd(noisy, timesteps, text, torch.randn(3, 4, 8, 8))
        with pytest.raises(ValueError, match="`target`.*\\(2, 4, 4, 4\\)"):
            kd(noisy, timesteps, text, torch.randn(2, 4, 4, 4))
        with pytest.raises(ValueError, match="`timesteps` has shape \\(3,\\).*batch size 2"):
            kd(noisy, torch.tensor([1, 2, 3]), text, target)
        with pytest.raises(
            ValueError, match="`encoder_hidden_states` has batch size 1.*`noisy_latents` has batch size 2"
        ):
            kd(noisy, timesteps, text[:1], target)
        with pytest.raises(ValueError, match="`encoder_hidden_states` must be"):
            kd(noisy, timesteps, text[0], target)
        with pytest.raises(ValueError, match="`noisy_latents` must be"):
            kd(noisy[0], timesteps, text, target)
        with pytest.raises(ValueError, match="added_cond_kwargs\\['time_ids'\\]"):
            kd(noisy, timesteps, text, target, added_cond_kwargs={"time_ids": torch.zeros(3, 6)})
        # a scalar timestep and a single one broadcast
        kd(noisy, torch.tensor(10), text, target)
        kd(noisy, torch.tensor([10]), text, target)
        assert_released(features)


def test_nonfinite_raises_naming_the_term(teacher, students):
    noisy, timesteps, text, target = noisy_inputs(teacher)
    with BKDistiller(teacher, students["small"]) as kd, watched_features(kd) as features:
        bad_target = target.clone()
        bad_target[0, 0, 0, 0] = float("nan")
        with pytest.raises(FloatingPointError, match="\\['task_loss'\\].*on_nonfinite='skip'"):
            kd(noisy, timesteps, text, bad_target)
        bad_noisy = noisy.clone()
        bad_noisy[1] = float("inf")
        with pytest.raises(FloatingPointError, match="task_loss.*output_kd_loss.*feature_kd_loss.*student prediction"):
            kd(bad_noisy, timesteps, text, target)
        assert_released(features)


def test_nonfinite_skip_returns_a_zero_loss_with_zero_gradients(teacher, students, caplog):
    student = copy.deepcopy(students["small"])
    noisy, timesteps, text, target = noisy_inputs(teacher)
    bad_target = target.clone()
    bad_target[0] = float("inf")
    with BKDistiller(teacher, student, on_nonfinite="skip") as kd:
        with caplog.at_level(logging.WARNING, logger="diffusers_bksdm.distill"):
            out = kd(noisy, timesteps, text, bad_target)
        assert "Skipping the step" in caplog.text
        assert out.skipped
        assert out.loss.item() == 0.0 and out.loss.requires_grad
        assert not torch.isfinite(out.task_loss)
        out.loss.backward()
        assert all(p.grad is not None and not p.grad.any() for p in student.parameters())
        assert not kd(noisy, timesteps, text, target).skipped


# --------------------------------------------------------------------------------------------------------------------
# The drop-in for diffusers' examples/text_to_image/train_text_to_image.py (docs/use-in-diffusers-scripts.md)

GUIDE = Path(__file__).parent.parent / "docs" / "use-in-diffusers-scripts.md"


def guide_added_lines() -> list[str]:
    """The `+` lines of the guide's diff blocks, without indentation."""
    lines, in_diff = [], False
    for line in GUIDE.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_diff = line.strip() == "```diff"
            continue
        if in_diff and line.startswith("+") and line[1:].strip():
            lines.append(line[1:].strip())
    return lines


def guide_blocks() -> list[tuple[str, str]]:
    """Each diff block of the guide as (the text it searches for, the text that replaces it)."""
    blocks, current = [], None
    for line in GUIDE.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            if current is not None:
                blocks.append(current)
            current = [] if line.strip() == "```diff" else None
        elif current is not None:
            current.append(line)
    pairs = []
    for block in blocks:
        old = [line[1:] for line in block if line[:1] in (" ", "-", "")]
        new = [line[1:] for line in block if line[:1] in (" ", "+", "")]
        assert all(line[:1] in (" ", "-", "+", "") for line in block), block
        pairs.append(("\n".join(old) + "\n", "\n".join(new) + "\n"))
    return pairs


def test_the_guide_applies_block_by_block_to_the_real_script():
    # the lines of diffusers' train_text_to_image.py that the guide changes, copied exactly from the script
    script = (Path(__file__).parent / "fixtures" / "train_text_to_image_excerpt.txt").read_text(encoding="utf-8")
    blocks = guide_blocks()
    assert len(blocks) == 6
    for old, new in blocks:  # a search-and-replace each, in the order of the script
        assert script.count(old) == 1, f"not found exactly once in the script:\n{old}"
        position = script.index(old)
        script = script.replace(old, new)
        assert script.index(new) == position
    for needed in ("from diffusers_bksdm import BKDistiller, compress_unet\n",
                   "    unet = compress_unet(teacher_unet, \"small\")\n",
                   "            unet.parameters(),\n            model_cls=UNet2DConditionModel,\n"
                   "            model_config=unet.config,\n            foreach=args.foreach_ema,\n",
                   "    kd = BKDistiller(teacher_unet, unet)\n",
                   "                out = kd(noisy_latents, timesteps, encoder_hidden_states, target)\n"):
        assert needed in script
    for gone in ("ema_unet.parameters()", "unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)",
                 'F.mse_loss(model_pred.float(), target.float(), reduction="mean")'):
        assert gone not in script
    # the DREAM block and the Min-SNR weights stay
    assert "if args.dream_training:" in script and "mse_loss_weights = mse_loss_weights / snr" in script


def test_the_guide_points_only_at_what_users_have():
    text = GUIDE.read_text(encoding="utf-8")
    for private in ("SPEC.md", "STYLE.md", "/work/", "shared/"):
        assert private not in text


def test_every_line_of_the_guide_is_in_the_script_style_test():
    source = {line.strip() for line in inspect.getsource(test_train_text_to_image_style_loop).splitlines()}
    added = guide_added_lines()
    assert len(added) >= 12
    missing = [line for line in added if line not in source]
    assert missing == []


@pytest.mark.parametrize(
    "mixed_precision, dream_training, snr_gamma", [("no", True, None), ("bf16", False, 5.0)], ids=["dream", "snr-bf16"]
)
def test_train_text_to_image_style_loop(tiny_pipeline_dir, tmp_path, mixed_precision, dream_training, snr_gamma):
    """A short run written the way train_text_to_image.py is written, with the guide's lines."""
    import json
    import math

    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel, compute_dream_and_update_latents, compute_snr
    from transformers import CLIPTextModel, CLIPTokenizer

    from diffusers_bksdm import BKDistiller, compress_unet

    path = str(tiny_pipeline_dir)
    gradient_accumulation_steps, train_batch_size, max_train_steps = 2, 2, 2
    accelerator = Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps, mixed_precision=mixed_precision, cpu=True
    )
    try:
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
        teacher_unet = unet
        unet = compress_unet(teacher_unet, "small")
        teacher_unet.requires_grad_(False)

        vae.requires_grad_(False)
        text_encoder.requires_grad_(False)
        unet.train()
        ema_unet = EMAModel(
            unet.parameters(),
            model_cls=UNet2DConditionModel,
            model_config=unet.config,
            foreach=False,
        )
        unet.enable_gradient_checkpointing()

        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(0)
        captions = ["a golden vase with different flowers", "a cat", "a red car", "a house"] * 2
        dataset = [
            {
                "pixel_values": torch.rand(3, 16, 16, generator=g) * 2 - 1,
                "input_ids": tokenizer(
                    caption,
                    max_length=tokenizer.model_max_length,
                    padding="max_length",
                    truncation=True,
                    return_tensors="pt",
                ).input_ids[0],
            }
            for caption in captions
        ]

        def collate_fn(examples):
            pixel_values = torch.stack([example["pixel_values"] for example in examples]).float()
            input_ids = torch.stack([example["input_ids"] for example in examples])
            return {"pixel_values": pixel_values, "input_ids": input_ids}

        train_dataloader = torch.utils.data.DataLoader(
            dataset, shuffle=False, collate_fn=collate_fn, batch_size=train_batch_size
        )
        num_update_steps_per_epoch = math.ceil(len(train_dataloader) / gradient_accumulation_steps)
        num_train_epochs = math.ceil(max_train_steps / num_update_steps_per_epoch)
        lr_scheduler = get_scheduler("constant", optimizer=optimizer)
        unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            unet, optimizer, train_dataloader, lr_scheduler
        )

        weight_dtype = torch.float32
        if accelerator.mixed_precision == "bf16":
            weight_dtype = torch.bfloat16
        text_encoder.to(accelerator.device, dtype=weight_dtype)
        vae.to(accelerator.device, dtype=weight_dtype)
        teacher_unet.to(accelerator.device, dtype=weight_dtype)
        kd = BKDistiller(teacher_unet, unet)

        student = accelerator.unwrap_model(unet)
        initial = {k: v.clone() for k, v in student.state_dict().items()}
        teacher_before = {k: v.clone() for k, v in teacher_unet.state_dict().items()}
        global_step, losses = 0, []
        for epoch in range(num_train_epochs):
            for step, batch in enumerate(train_dataloader):
                with accelerator.accumulate(unet):
                    latents = vae.encode(batch["pixel_values"].to(weight_dtype)).latent_dist.sample()
                    latents = latents * vae.config.scaling_factor
                    noise = torch.randn_like(latents)
                    bsz = latents.shape[0]
                    timesteps = torch.randint(
                        0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device
                    )
                    timesteps = timesteps.long()
                    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                    encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
                    if noise_scheduler.config.prediction_type == "epsilon":
                        target = noise
                    else:
                        target = noise_scheduler.get_velocity(latents, noise, timesteps)
                    if dream_training:
                        noisy_latents, target = compute_dream_and_update_latents(
                            unet, noise_scheduler, timesteps, noise, noisy_latents, target, encoder_hidden_states, 1.0
                        )

                    out = kd(noisy_latents, timesteps, encoder_hidden_states, target)
                    model_pred = out.student_pred

                    if snr_gamma is None:
                        loss = out.loss
                    else:
                        snr = compute_snr(noise_scheduler, timesteps)
                        mse_loss_weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(
                            dim=1
                        )[0]
                        mse_loss_weights = mse_loss_weights / snr
                        loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
                        loss = loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights
                        loss = loss.mean()
                        loss = kd.lambda_task * loss + kd.lambda_out * out.output_kd_loss
                        loss = loss + kd.lambda_feat * out.feature_kd_loss

                    avg_loss = accelerator.gather(loss.repeat(train_batch_size)).mean()
                    losses.append(avg_loss.item())
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(unet.parameters(), 1.0)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad()
                if accelerator.sync_gradients:
                    ema_unet.step(unet.parameters())
                    global_step += 1
                if global_step >= max_train_steps:
                    break

        assert global_step == max_train_steps and len(losses) == max_train_steps * gradient_accumulation_steps
        assert all(math.isfinite(v) for v in losses)
        assert any(not torch.equal(v, initial[k]) for k, v in student.state_dict().items())
        assert all(torch.equal(v, teacher_before[k]) for k, v in teacher_unet.state_dict().items())
        assert all(p.grad is None for p in teacher_unet.parameters())

        # the end of the script: the stock pipeline with the trained student
        accelerator.wait_for_everyone()
        unet = accelerator.unwrap_model(unet)
        ema_unet.copy_to(unet.parameters())
        pipeline = StableDiffusionPipeline.from_pretrained(path, text_encoder=text_encoder, vae=vae, unet=unet)
        pipeline.save_pretrained(tmp_path / "output")
        kd.remove_hooks()
        config = json.loads((tmp_path / "output" / "unet" / "config.json").read_text())
        assert config["mid_block_type"] is None and config["layers_per_block"] == 1
        assert (
            json.loads((tmp_path / "output" / "model_index.json").read_text())["_class_name"]
            == "StableDiffusionPipeline"
        )
        reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "output", subfolder="unet")
        assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in unet.parameters())
    finally:
        accelerator.end_training()
        AcceleratorState._reset_state(True)
