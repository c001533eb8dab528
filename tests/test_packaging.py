"""A non-editable install is complete: the wheel holds every module the console scripts import and the LICENSE, and
the installed `conformer-convert` writes a folder and its card from outside the repository."""

import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import HUB_FOLDER_FILES

REPO_DIR = Path(__file__).resolve().parents[1]
SCRIPTS = ("conformer-convert", "conformer-train", "conformer-visualize", "conformer-evaluate")


def local_imports(module_file: Path, local_modules: set[str]) -> set[str]:
    """The repository's modules (`name` or `conformer_vit.name`) that `module_file` imports (anywhere in it, also
    inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(module_file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from conformer_vit import data`
    return names & local_modules


def module_path(name: str) -> Path:
    return REPO_DIR.joinpath(*name.split(".")).with_suffix(".py")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, site): a wheel built from a copy of the repository's top-level files (so the checkout gets no build
    folders) and installed with `pip install --target`, as a user's non-editable install."""
    work = tmp_path_factory.mktemp("packaging")
    source = work / "source"
    source.mkdir()
    for path in REPO_DIR.iterdir():
        if path.is_file():
            shutil.copy2(path, source / path.name)
    shutil.copytree(REPO_DIR / "conformer_vit", source / "conformer_vit", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(source), "-w", str(work)], check=True)
    (wheel,) = work.glob("*.whl")
    site = work / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    return wheel, site


def run_installed(site: Path, script: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    """Run an installed console script with the installed modules only: `-S` keeps this environment's editable
    install of the repository (a `.pth` finder) out, so a module missing from the wheel fails to import."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]])}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-S", str(site / "bin" / script), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_wheel_holds_every_module_the_scripts_import_and_the_license(installed):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    local_modules = {path.stem for path in REPO_DIR.glob("*.py")}
    local_modules |= {f"conformer_vit.{path.stem}" for path in (REPO_DIR / "conformer_vit").glob("*.py")}
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    scripts = dict(
        line.split(" = ") for line in zipfile.ZipFile(wheel).read(entry_points).decode().splitlines() if " = " in line
    )
    assert set(SCRIPTS) <= set(scripts)
    needed, todo = set(), [value.split(":")[0] for value in scripts.values()]
    while todo:  # the scripts' modules and what they import, transitively
        module = todo.pop()
        if module not in needed:
            needed.add(module)
            todo += local_imports(module_path(module), local_modules)
    assert {"configuration_conformer", "token_merging", "modeling_conformer", "conformer_vit.sources"} <= needed
    in_wheel = {name.removesuffix(".py").replace("/", ".") for name in names if name.endswith(".py")}
    assert needed <= in_wheel, f"modules missing from the wheel: {needed - in_wheel}"
    assert any(name.endswith("licenses/LICENSE") or name.endswith(".dist-info/LICENSE") for name in names)


@pytest.mark.slow
def test_installed_convert_writes_a_folder_and_card_from_outside_the_repository(installed, tmp_path, google_npz):
    _, site = installed
    npz = google_npz(tmp_path / "ViT-tiny.npz")
    result = run_installed(site, "conformer-convert", "--npz_path", str(npz), "--output_dir", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == HUB_FOLDER_FILES
    # The remote code it ships is the installed module's.
    assert (out / "modeling_conformer.py").read_text() == (site / "modeling_conformer.py").read_text()
    assert json.loads((out / "config.json").read_text())["model_type"] == "conformer"
    card = (out / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n") and "license: apache-2.0" in card and "converted from `ViT-tiny.npz`" in card


@pytest.mark.slow
@pytest.mark.parametrize("script", ["conformer-train", "conformer-visualize", "conformer-evaluate"])
def test_installed_scripts_answer_help(installed, tmp_path, script):
    result = run_installed(installed[1], script, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()


def core_site(target: Path) -> set[str]:
    """A folder holding exactly the distributions `pip install conformer-vit` installs without extras: the wheel's
    core requirements and theirs, found from this environment's metadata and linked in. Returns their names."""
    from importlib import metadata

    from packaging.requirements import Requirement

    wanted = [Requirement(line) for line in metadata.requires("conformer-vit") if "extra ==" not in line]
    names, todo = set(), [requirement.name for requirement in wanted]
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in names:
            continue
        names.add(name)
        distribution = metadata.distribution(name)
        for line in distribution.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
        for top in {Path(str(file)).parts[0] for file in distribution.files or []} - {"..", "bin"}:
            link, source = target / top, Path(distribution.locate_file(top))
            if source.exists() and not link.exists():
                link.symlink_to(source)
    return names


@pytest.mark.slow
def test_the_bare_install_converts_and_loads_a_folder_with_only_the_core_requirements(installed, tmp_path, google_npz):
    """`pip install conformer-vit` without extras: the wheel (installed with --no-deps) beside exactly its core
    requirements converts a Google checkpoint and loads the folder with the Auto classes and remote code."""
    (tmp_path / "core").mkdir()
    names = core_site(tmp_path / "core")
    assert {"torch", "transformers", "safetensors", "numpy"} <= names
    assert not names & {"accelerate", "datasets", "evaluate", "timm", "torchvision", "scikit-learn", "matplotlib"}
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": os.pathsep.join([str(installed[1]), str(tmp_path / "core")])}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), HOME=str(tmp_path))
    convert = [str(installed[1] / "bin" / "conformer-convert"), "--npz_path", str(google_npz(tmp_path / "v.npz"))]
    convert += ["--output_dir", str(tmp_path / "out"), "--merge_mode", "ward", "--merge_r", "2"]
    script = """
import importlib.util, sys, torch
from transformers import AutoModel, AutoModelForImageClassification
for extra in ("accelerate", "datasets", "timm", "torchvision", "sklearn", "matplotlib", "scipy"):
    assert importlib.util.find_spec(extra) is None, extra
model = AutoModelForImageClassification.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
base = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
print(type(model).__name__, type(base).__name__, model(torch.zeros(1, 3, 32, 32)).logits.shape[-1])
"""
    for command in ([sys.executable, "-S", *convert], [sys.executable, "-S", "-c", script, str(tmp_path / "out")]):
        done = subprocess.run(command, cwd=tmp_path / "core", env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["ConformerForImageClassification", "ConformerModel", "5"]
