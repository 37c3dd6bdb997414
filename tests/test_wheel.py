"""What a user installs is what we test (issue 21).

- No leftover of an interrupted atomic write (`outputs._temporary_name`: `.name.tmp-XXXXXXXX`, `.name.old-XXXXXXXX`;
  `outputs.STAGING_PREFIX`), no bytecode, is tracked by git or shipped in the wheel, even when one lies in the tree
  the wheel is built from.
- The wheel, built from the files git would commit and installed into a fresh venv in which the clone is not
  importable, runs the README's command, `bksdm compress` and loads every shipped asset.
- The core install (the wheel and its requirements without any extra: no scipy, matplotlib, datasets, onnx, peft)
  runs `bksdm demo`; only the loss curve is skipped, with the pip line that brings it.
- A saved student pipeline keeps each tokenizer in both forms: the fast `tokenizer.json` (transformers 5 writes only
  that) and `vocab.json` + `merges.txt` (transformers 4's slow `CLIPTokenizer`, e.g. in optimum's ONNX exporter).
"""

from __future__ import annotations

import ast
import json
import os
import shlex
import shutil
import site
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from diffusers_bksdm.outputs import SLOW_TOKENIZER_FILES, STAGING_PREFIX, _temporary_name

pytestmark = pytest.mark.slow  # builds the wheel and a fresh venv

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "diffusers_bksdm"
PROMPTS = ("a red circle at the left", "a small blue square at the top", "A purple hexagon, top-left!", "")
# the README's command with the smallest settings it accepts (its defaults train for minutes)
DEMO_FLAGS = ["--max_train_steps", "1", "--num_images", "8", "--train_batch_size", "8", "--images_per_prompt", "1",
              "--num_inference_steps", "2"]


def is_temporary(path: str) -> bool:
    """A name an interrupted write leaves behind, or bytecode: never tracked, never shipped."""
    for part in path.replace(os.sep, "/").split("/"):
        if (".tmp-" in part or part.startswith(STAGING_PREFIX) or (part.startswith(".") and ".old-" in part)
                or part.endswith(".tmp") or part == "__pycache__" or part.endswith((".pyc", ".pyo"))):
            return True
    return False


def leftover_folders(folder: str) -> list[str]:
    """Names the package's atomic writers give their temporary folders in `folder`."""
    return [
        _temporary_name(os.path.join(folder, "shapes-sd")),  # atomic_directory
        _temporary_name(os.path.join(folder, "tokenizer"), "old"),  # replace_path, the folder it replaces
        os.path.join(folder, f"{STAGING_PREFIX}{uuid.uuid4().hex[:8]}"),  # update_folder
    ]


def leftover_files(folder: str) -> list[str]:
    """Names the package's atomic writers give their temporary files in `folder`."""
    return [
        _temporary_name(os.path.join(folder, "model_index.json"), keep_extension=True),  # atomic_write
        os.path.join(folder, ".training.json.tmp"),  # benchmarks/miniature/train_teacher.py
    ]


def checkout_files() -> list[str] | None:
    """The files of this checkout git would commit (tracked or untracked and not ignored), or `None` outside one."""
    if shutil.which("git") is None:
        return None
    top = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != REPO_ROOT:
        return None
    listed = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True, check=True).stdout.split("\0")
    return sorted({name for name in listed if name and (REPO_ROOT / name).is_file()})  # not files deleted meanwhile


def both_tokenizer_forms(folder: Path, tmp_path: Path) -> None:
    """`folder` holds the fast and the slow form of one tokenizer, and both encode every prompt to the same ids."""
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    names = set(os.listdir(folder))
    assert {"tokenizer.json", *SLOW_TOKENIZER_FILES} <= names, sorted(names)
    # the slow form alone, as transformers 4's CLIPTokenizer reads it (it never opens tokenizer.json)
    slow_only = tmp_path / f"slow-only-{folder.parent.name}-{folder.name}"
    slow_only.mkdir()
    for name in (*SLOW_TOKENIZER_FILES, "tokenizer_config.json"):
        shutil.copy(folder / name, slow_only / name)
    slow, fast = CLIPTokenizer.from_pretrained(slow_only), CLIPTokenizerFast.from_pretrained(folder)
    for prompt in PROMPTS:
        assert slow(prompt).input_ids == fast(prompt).input_ids, prompt


# ---------------------------------------------------------------------------------------------------- temporary names


def test_the_checkout_holds_no_temporary_names():
    files = checkout_files()
    if files is None:
        pytest.skip("not a git checkout")
    assert files and "setup.cfg" in files
    assert [name for name in files if is_temporary(name)] == []


def test_git_ignores_what_an_interrupted_write_leaves():
    if checkout_files() is None:
        pytest.skip("not a git checkout")
    assets = os.path.join(PACKAGE, "miniature", "assets")
    folders = [*leftover_folders(assets), *leftover_folders(os.path.join(assets, "shapes-sd")),
               os.path.join(PACKAGE, "__pycache__")]
    # what git commits is files: those inside a leftover folder, and the leftover files
    names = [*(os.path.join(f, "model_index.json") for f in folders), *leftover_files(assets),
             *leftover_files(os.path.join(assets, "shapes-sd")), os.path.join(PACKAGE, "cli.cpython-311.pyc")]
    assert all(is_temporary(name) for name in names)
    result = subprocess.run(["git", "-C", str(REPO_ROOT), "check-ignore", "--no-index", "--verbose", "--non-matching",
                             *names], capture_output=True, text=True)
    not_ignored = [line.split("\t")[-1] for line in result.stdout.splitlines() if line.startswith("::")]
    assert not_ignored == [], result.stdout


# -------------------------------------------------------------------------------------------------------------- wheel


def _can_build_here() -> bool:
    """setuptools >= 64 (pyproject.toml) with a `bdist_wheel` (its own from 70.1, else the `wheel` package)."""
    import importlib.util
    from importlib.metadata import version

    from packaging.version import Version

    if importlib.util.find_spec("setuptools") is None:
        return False
    installed = Version(version("setuptools"))
    return installed >= Version("64") and (installed >= Version("70.1") or importlib.util.find_spec("wheel") is not None)


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory) -> SimpleNamespace:
    """The wheel built from a copy of what git would commit (the whole tree outside a checkout), with leftovers of
    interrupted writes planted in the copy: the package's glob patterns would match the non-hidden ones."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    files = checkout_files()
    if files is None:
        skip = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", ".pytest_cache", "__pycache__", "*.pyc",
                                      ".*.tmp-*", ".*.old-*", "*.tmp")
        shutil.copytree(REPO_ROOT, source, ignore=skip)
        files = sorted(str(p.relative_to(source)).replace(os.sep, "/") for p in source.rglob("*") if p.is_file())
    else:
        for name in files:
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, source / name)
    package_files = {name for name in files if name.startswith(f"{PACKAGE}/") and not is_temporary(name)}
    assets = source / PACKAGE / "miniature" / "assets"
    folders = [
        *leftover_folders(str(assets)), *leftover_folders(str(assets / "shapes-sd")),
        str(assets / "shapes-sd.tmp-cafe0001"),  # not hidden: `assets/*/*.json` matches what it holds
        str(source / PACKAGE / "configs" / "__pycache__"),
    ]
    leftovers = [
        *leftover_files(str(assets)), *leftover_files(str(assets / "shapes-sd")),
        str(assets / "shapes-sd" / "model_index.json.tmp-cafe0002.json"),  # the globs match these three
        str(assets / "shapes-sd" / "unet" / "config.json.old-cafe0003.json"),
        str(source / PACKAGE / "configs" / "sd-v1-4.json.tmp-cafe0004.json"),
        *(os.path.join(folder, inner) for folder in folders  # what the globs look for, inside the folders
          for inner in ("model_index.json", "unet/config.json", "tokenizer/merges.txt", "x.cpython-311.pyc")),
    ]
    for path in leftovers:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("{}\n")
    dist = tmp / "dist"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    # with the installed build backend when it can build a wheel (no download); else pip fetches it (pyproject.toml)
    offline = ["--no-build-isolation", "--no-index"] if _can_build_here() else []
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *offline, "-q", str(source), "-w",
                             str(dist)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = dist.glob("*.whl")
    return SimpleNamespace(path=wheel, package_files=package_files, tmp=tmp)


def test_the_wheel_ships_the_package_and_nothing_else(built_wheel):
    with zipfile.ZipFile(built_wheel.path) as archive:
        names = archive.namelist()
        entry_points = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert [name for name in names if is_temporary(name)] == []
    assert not [name for name in names if "cafe000" in name]  # none of the planted leftovers
    # every file of the package git would commit, and no other: modules, configs, assets, py.typed
    shipped = {name for name in names if name.startswith(f"{PACKAGE}/")}
    assert sorted(built_wheel.package_files - shipped) == [], "in the checkout, not in the wheel (setup.cfg globs?)"
    assert sorted(shipped - built_wheel.package_files) == []
    assert {f"{PACKAGE}/py.typed", f"{PACKAGE}/configs/sd-v1-4.json", f"{PACKAGE}/miniature/assets/shapes-sd/"
            "model_index.json", f"{PACKAGE}/miniature/assets/shapes-judge/config.json"} <= shipped
    assert [n for n in names if not n.startswith(f"{PACKAGE}/")] == [n for n in names if ".dist-info/" in n]
    assert "bksdm = diffusers_bksdm.cli:main" in entry_points


# the installed package, checked from inside the venv
INSTALLED_CHECK = r"""
import importlib, json, os, pkgutil, shutil, sys, tempfile

import diffusers_bksdm

package = os.path.realpath(os.path.dirname(diffusers_bksdm.__file__))
site_packages, repo = os.path.realpath(sys.argv[1]), os.path.realpath(sys.argv[2])
assert package == os.path.join(site_packages, "diffusers_bksdm"), (package, site_packages)
for info in pkgutil.walk_packages(diffusers_bksdm.__path__, "diffusers_bksdm."):
    if not info.name.endswith("__main__"):
        importlib.import_module(info.name)
origin = {name: os.path.realpath(getattr(module, "__file__", None) or repo) for name, module in list(sys.modules.items())
          if name.split(".")[0] == "diffusers_bksdm"}
assert not [n for n, f in origin.items() if not f.startswith(package + os.sep)], origin  # none from the clone

from importlib.metadata import distribution, version
assert os.path.realpath(str(distribution("diffusers-bksdm").locate_file(""))) == site_packages
report = {"version": version("diffusers-bksdm"), "modules": sum(1 for n in sys.modules if n.startswith("diffusers_bksdm"))}

import torch
from diffusers import DiffusionPipeline
from diffusers_bksdm.configs import SHIPPED_CONFIGS, load_config
from diffusers_bksdm.miniature import shapes
from diffusers_bksdm.miniature.judge import JUDGE_NAME, load_judge
from diffusers_bksdm.miniature.tiny import BUILTIN_TEACHERS, TRAINED_TEACHERS, asset_path, builtin_teacher

configs = os.path.join(package, "configs")
names = sorted({*SHIPPED_CONFIGS, *(n[:-5] for n in os.listdir(configs) if n.endswith(".json"))})
report["configs"] = {name: len(load_config(name)) for name in names}
assert all(report["configs"].values())

assets = os.path.join(package, "miniature", "assets")
assert sorted(os.listdir(assets)) == sorted([*TRAINED_TEACHERS, JUDGE_NAME]), os.listdir(assets)
report["teachers"] = {}
for name in [*TRAINED_TEACHERS, *BUILTIN_TEACHERS]:
    pipe = builtin_teacher("builtin:" + name)
    image = pipe("a red circle at the left", num_inference_steps=1, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape[-1] == 3 and bool((image == image).all()), name
    report["teachers"][name] = [type(pipe).__name__, sum(p.numel() for p in pipe.unet.parameters())]
for name in TRAINED_TEACHERS:  # stock diffusers, from the installed folder
    assert os.path.dirname(asset_path(name)) == assets
    stock = DiffusionPipeline.from_pretrained(asset_path(name), use_safetensors=True)
    assert type(stock).__name__ == "StableDiffusionPipeline"
judge = load_judge("builtin:" + JUDGE_NAME)
samples = shapes.sample_shapes(12, "heldout", seed=0)
images = torch.stack([torch.from_numpy(__import__("numpy").asarray(shapes.render(s))).permute(2, 0, 1) for s in samples])
read = judge.predict(images)
report["judge_hits"] = sum(r["color"] == s.color and r["shape"] == s.shape for r, s in zip(read, samples))
assert report["judge_hits"] >= 10, report["judge_hits"]
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def installed(built_wheel) -> SimpleNamespace:
    """A fresh venv (system site packages, so torch and diffusers are not downloaded) with the wheel installed, in
    which the clone is not importable; the README's command starts in it at once, beside the other tests."""
    tmp = built_wheel.tmp
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / ("python.exe" if os.name == "nt" else "python")
    site_packages, venv_path = json.loads(subprocess.run(
        [str(python), "-c", "import json, sys, sysconfig; print(json.dumps([sysconfig.get_paths()['purelib'], sys.path]))"],
        capture_output=True, text=True, check=True).stdout)
    # the packages of the interpreter running the tests, where --system-site-packages does not show them (it may
    # itself be a venv) ...
    outer = [p for p in [*site.getsitepackages(), site.getusersitepackages()] if os.path.isdir(p)]
    missing = [p for p in outer if p not in venv_path]
    if missing:
        Path(site_packages, "_outer_site.pth").write_text(
            "import site; " + "; ".join(f"site.addsitedir({p!r})" for p in missing) + "\n")
    # ... but not this clone's editable install: its import finder would quietly serve any module the wheel lacks
    for folder in outer:
        for finder in Path(folder).glob("__editable__*_finder.py"):
            if PACKAGE in finder.read_text(encoding="utf-8", errors="replace"):
                Path(site_packages, finder.name).write_text("def install():  # this venv sees the wheel only\n"
                                                            "    pass\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv), HF_HUB_OFFLINE="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PYTHONSAFEPATH="1", PYTHONWARNINGS="ignore")
    result = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q",
                             str(built_wheel.path)], capture_output=True, text=True, env=env, cwd=tmp, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    work = tmp / "work"
    work.mkdir()
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    commands = [part.strip() for line in readme.splitlines() if "bksdm demo" in line and "pip install" in line
                for part in line.split("&&") if part.strip().startswith("bksdm ")]
    assert len(commands) == 1, commands  # the README's one-command quick start
    demo_argv = [str(bin_dir / "bksdm"), *shlex.split(commands[0])[1:], *DEMO_FLAGS]
    demo_log = open(tmp / "demo.log", "w")  # noqa: SIM115 (closed after the demo)
    demo = subprocess.Popen(demo_argv, cwd=work, env=env, stdout=demo_log, stderr=subprocess.STDOUT)
    ns = SimpleNamespace(python=python, bin=bin_dir, site_packages=site_packages, env=env, work=work, demo=demo,
                         demo_argv=demo_argv, demo_log=tmp / "demo.log")
    yield ns
    if demo.poll() is None:
        demo.kill()
        demo.wait()
    demo_log.close()


def run_in_venv(installed, argv: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, env=installed.env, cwd=installed.work,
                            timeout=timeout)
    shown = " ".join("<script>" if "\n" in arg else arg for arg in argv)
    assert result.returncode == 0, f"{shown}\n{result.stdout}\n{result.stderr}"
    return result


def test_the_venv_runs_the_wheel_not_the_clone_and_every_shipped_asset_loads(installed):
    result = run_in_venv(installed, [str(installed.python), "-c", INSTALLED_CHECK, installed.site_packages,
                                     str(REPO_ROOT)])
    report = json.loads(result.stdout.strip().splitlines()[-1])
    import diffusers_bksdm

    assert report["version"] == diffusers_bksdm.__version__
    assert set(report["teachers"]) == {"shapes-sd", "tiny-sd", "tiny-sd2", "tiny-sd2-v", "tiny-sdxl"}
    assert report["teachers"]["tiny-sdxl"][0] == "StableDiffusionXLPipeline"
    assert {"sd-v1-4", "sdxl-base-1.0", "clip-vit-large-patch14-text", "sd-v1-4-vae"} <= set(report["configs"])


def test_bksdm_compress_from_the_wheel(installed, tmp_path):
    out = installed.work / "tiny-small"
    result = run_in_venv(installed, [str(installed.bin / "bksdm"), "compress", "--teacher", "builtin:tiny-sd",
                                     "--output_dir", str(out)])
    assert "saved pipeline to" in result.stdout
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["tokenizer"][1] == "CLIPTokenizer"
    both_tokenizer_forms(out / "tokenizer", tmp_path)


# ---------------------------------------------------------------------------------------------- both tokenizer forms


@pytest.mark.parametrize("teacher", ["builtin:tiny-sd", "builtin:shapes-sd"])
def test_a_compressed_student_holds_both_tokenizer_forms(teacher, tmp_path, capsys):
    from diffusers_bksdm.cli import main

    out = tmp_path / "student"
    assert main(["compress", "--teacher", teacher, "--output_dir", str(out)]) == 0
    both_tokenizer_forms(out / "tokenizer", tmp_path)
    if teacher == "builtin:shapes-sd":  # a vocabulary with merges: the slow form must carry them
        assert len((out / "tokenizer" / "merges.txt").read_text().splitlines()) > 50


def test_the_mixin_saves_and_pushes_both_tokenizer_forms(tmp_path, monkeypatch):
    import diffusers.utils.hub_utils as hub_utils
    from diffusers import StableDiffusionPipeline

    from diffusers_bksdm import BKDistillationMixin
    from diffusers_bksdm.miniature.tiny import tiny_pipeline

    class Pipe(BKDistillationMixin, StableDiffusionPipeline):
        pass

    pipe = Pipe(**tiny_pipeline("sd-v1", seed=0).components, requires_safety_checker=False).compress("small")
    pipe.save_pretrained(tmp_path / "saved")
    both_tokenizer_forms(tmp_path / "saved" / "tokenizer", tmp_path)

    uploaded = tmp_path / "uploaded"

    class Repo:
        repo_id = "someone/student"

    class Card:
        def save(self, path):
            Path(path).write_text("card")

    def fake_upload(self, folder, repo_id, **kwargs):
        shutil.copytree(folder, uploaded)
        return "https://example.invalid/commit"

    monkeypatch.setattr(hub_utils, "create_repo", lambda *a, **k: Repo())
    monkeypatch.setattr(hub_utils, "load_or_create_model_card", lambda *a, **k: Card())
    monkeypatch.setattr(hub_utils, "populate_model_card", lambda card, *a, **k: card)
    monkeypatch.setattr(hub_utils.PushToHubMixin, "_upload_folder", fake_upload)
    pipe.push_to_hub("someone/student")
    assert json.loads((uploaded / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    both_tokenizer_forms(uploaded / "tokenizer", tmp_path)


def test_every_pipeline_the_package_saves_goes_through_save_pipeline():
    """`outputs.save_pipeline` is the one place that saves a pipeline: any other `.save_pretrained(` call in the
    package saves a model (a UNet, its EMA, the LCM target, the judge)."""
    models = {"student", "self.ema", "self.target", "unwrap_model(model)"}
    package = REPO_ROOT / PACKAGE
    calls = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "outputs.py" and path.parent == package:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "save_pretrained":
                calls.append((str(path.relative_to(REPO_ROOT)), node.lineno, ast.unparse(node.func.value)))
    assert calls, "the scan finds the model saves"
    assert [call for call in calls if call[2] not in models] == [], "save pipelines with outputs.save_pipeline"


def test_the_shipped_tokenizers_hold_both_forms(tmp_path):
    """Each shipped tokenizer's slow files are the ones `write_slow_tokenizer_files` writes from its fast form."""
    from transformers import CLIPTokenizerFast

    from diffusers_bksdm.outputs import write_slow_tokenizer_files

    folders = sorted((REPO_ROOT / PACKAGE / "miniature" / "assets").glob("*/tokenizer*"))
    assert folders
    for folder in folders:
        both_tokenizer_forms(folder, tmp_path)
        again = tmp_path / f"again-{folder.parent.name}"
        assert len(write_slow_tokenizer_files(CLIPTokenizerFast.from_pretrained(folder), again)) == 2
        assert json.loads((folder / "vocab.json").read_text()) == json.loads((again / "vocab.json").read_text())
        assert (folder / "merges.txt").read_text().split("\n") == (again / "merges.txt").read_text().split("\n")


# the README's command started with the venv; last, so that the tests above run beside it
def test_the_readme_command_from_the_wheel(installed, tmp_path):
    try:
        returncode = installed.demo.wait(timeout=600)
    except subprocess.TimeoutExpired:
        installed.demo.kill()
        raise
    log = installed.demo_log.read_text(errors="replace")
    assert returncode == 0, f"{installed.demo_argv}\n{log[-4000:]}"
    out = installed.work / "bksdm-demo"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == {"teacher", "student before", "student after"} and summary["steps"] == 1
    assert (out / "grid.png").is_file() and (out / "loss_curve.png").is_file()
    both_tokenizer_forms(out / "student" / "tokenizer", tmp_path)  # the trainer's final save


# ------------------------------------------------------------------------------------- the core install, no extras


def _core_requirements(wheel: Path) -> list[str]:
    """The wheel's own `Requires-Dist` lines without an extra: what `pip install diffusers-bksdm` pulls in."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    lines = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    return [line for line in lines if "extra ==" not in line]


def _distribution_closure(requirements: list[str]) -> dict:
    """The installed distributions those requirements need, transitively (markers evaluated, no extras)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found, todo = {}, [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in found or (requirement.marker is not None and not requirement.marker.evaluate({"extra": ""})):
            continue
        try:
            found[name] = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            continue  # an optional platform dependency this interpreter does not have
        todo.extend(Requirement(r) for r in found[name].requires or [])
    return found


@pytest.fixture(scope="module")
def core_installed(built_wheel) -> SimpleNamespace:
    """A venv that sees the core install only: the wheel and the closure of its requirements without extras, linked
    from this interpreter's packages (no download), and nothing else (no scipy, matplotlib, datasets, onnx, peft)."""
    tmp = built_wheel.tmp / "core"
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site_packages = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        capture_output=True, text=True, check=True).stdout.strip())
    closure = _distribution_closure(_core_requirements(built_wheel.path))
    for dist in closure.values():
        base = Path(str(dist.locate_file("")))
        tops = {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] not in ("..", "__pycache__")
                and (len(f.parts) > 1 or f.parts[0].endswith((".py", ".so", ".pth")))}
        for top in tops:
            if (base / top).exists() and not (site_packages / top).exists():
                (site_packages / top).symlink_to(base / top)
    with zipfile.ZipFile(built_wheel.path) as archive:  # the wheel unpacked as pip would (pure Python, no scripts)
        archive.extractall(site_packages)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(VIRTUAL_ENV=str(venv), HF_HUB_OFFLINE="1", PYTHONSAFEPATH="1", PYTHONWARNINGS="ignore")
    work = tmp / "work"
    work.mkdir(parents=True)
    return SimpleNamespace(python=python, env=env, work=work, closure=set(closure), site_packages=site_packages)


def test_the_core_install_runs_the_demo_without_any_extra(core_installed):
    assert {"torch", "diffusers", "transformers", "accelerate", "torchmetrics"} <= core_installed.closure
    probe = subprocess.run([str(core_installed.python), "-c", (
        "import importlib.util, json, diffusers_bksdm\n"
        "print(diffusers_bksdm.__file__)\n"
        "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in "
        "('scipy', 'matplotlib', 'datasets', 'webdataset', 'onnxruntime', 'peft', 'torch_fidelity')}))")],
        capture_output=True, text=True, env=core_installed.env, cwd=core_installed.work, timeout=300)
    assert probe.returncode == 0, probe.stderr
    package_file, blocked = probe.stdout.strip().splitlines()[-2:]
    assert Path(package_file).resolve().is_relative_to(core_installed.site_packages.resolve())  # the wheel's copy
    assert not any(json.loads(blocked).values()), probe.stdout  # truly without extras
    demo = subprocess.run([str(core_installed.python), "-m", "diffusers_bksdm", "demo", "--output_dir", "demo",
                           *DEMO_FLAGS], capture_output=True, text=True, env=core_installed.env,
                          cwd=core_installed.work, timeout=600)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    out = core_installed.work / "demo"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == {"teacher", "student before", "student after"} and summary["steps"] == 1
    assert all(isinstance(row["fd"], float) for row in summary["results"].values())  # the judge's FD: torchmetrics
    assert (out / "grid.png").is_file() and (out / "student" / "model_index.json").is_file()
    assert not (out / "loss_curve.png").exists() and summary["loss_curve"] is None
    assert "pip install matplotlib" in demo.stdout + demo.stderr  # the skipped curve says how to get it
