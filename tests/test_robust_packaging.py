"""pyproject.toml: the package data is declared (no setuptools "package would be ignored" warning), the license is
an SPDX string, and the dependency floors are the versions the code needs (and what is installed meets them)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# The lowest versions the code works with (see the comments in pyproject.toml for what each one brings).
FLOORS = {"transformers": "4.56", "bitsandbytes": "0.47", "onnxruntime": "1.27", "onnxruntime-gpu": "1.27"}


def requirements() -> list[Requirement]:
    project = PYPROJECT["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return [Requirement(r) for r in reqs]


def test_every_package_directory_is_declared():
    """A directory under qosora/ that holds files would otherwise be skipped with a warning (qosora.data.models)."""
    declared = set(PYPROJECT["tool"]["setuptools"]["packages"])
    package_dir = PYPROJECT["tool"]["setuptools"]["package-dir"]
    for package, src in package_dir.items():
        for d in [ROOT / src, *(ROOT / src).rglob("*")]:
            if d.is_dir() and d.name != "__pycache__" and any(f.is_file() for f in d.iterdir()):
                name = ".".join([package, *d.relative_to(ROOT / src).parts])
                assert name in declared, f"{d} holds files but {name} is not in [tool.setuptools] packages"
    data = PYPROJECT["tool"]["setuptools"]["package-data"]
    assert "qosora.data.models" in declared and data["qosora.data.models"] == ["*.json"]


def test_license_is_an_spdx_string_with_a_setuptools_that_reads_it():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    (setuptools,) = [Requirement(r) for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    assert setuptools.specifier.contains("77") and not setuptools.specifier.contains("76.9")
    assert Version(version("setuptools")) >= Version("77")


@pytest.mark.parametrize("name, floor", FLOORS.items())
def test_dependency_floors(name, floor):
    found = [r for r in requirements() if r.name == name]
    assert found, name
    *head, last = Version(floor).release
    below = ".".join(map(str, (*head, last - 1)))  # 4.56 -> 4.55: must be excluded
    for r in found:
        assert r.specifier.contains(floor) and not r.specifier.contains(below), (r, below)


@pytest.mark.parametrize("name", ["transformers", "bitsandbytes", "onnxruntime"])
def test_installed_versions_meet_the_floors(name):
    assert Version(version(name)) >= Version(FLOORS[name])


def test_building_the_wheel_prints_no_packaging_warning(tmp_path):
    """The real check: build a wheel from a copy of the sources and read setuptools' output."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tmp_path / name)
    for name in ("qosora", "export"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-q",
                           str(tmp_path), "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-2000:]
    assert "is absent from the `packages` configuration" not in text
    assert "project.license` as a TOML table is deprecated" not in text
    import zipfile

    (wheel,) = (tmp_path / "dist").glob("qosora-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "qosora/data/models/llama-2-7b.json" in names and "qosora/data/demo.jsonl" in names
    assert "qosora/export/api.py" in names
