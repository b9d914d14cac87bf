"""`pip install .` gives the library, its package data and the `unipixel` command."""
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_pins_what_a_space_installs():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if line and line[0] != "#"]
    assert sorted(project["dependencies"] + project["optional-dependencies"]["demo"]) == sorted(requirements)


@pytest.mark.slow
def test_a_built_wheel_installs_into_a_fresh_venv_and_runs_the_command(tmp_path):
    """Offline: the wheel is built from a copy of the sources with the setuptools at hand, the venv
    sees this interpreter's packages for the dependencies, and pip installs only the wheel."""
    source = tmp_path / "source"  # building in the checkout would leave build/ and egg-info there
    shutil.copytree(ROOT / "unipixel", source / "unipixel", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", source], env=env,
                   check=True)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("unipixel-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    venv_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    # After the venv's own site-packages: the wheel's copy of unipixel comes first.
    (Path(venv_site) / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([*pip, "--python", python, "install", "--no-deps", wheel], env=env, check=True)

    run = {"cwd": tmp_path, "env": env, "capture_output": True, "text": True, "timeout": 300}
    where = subprocess.run([python, "-c", "import unipixel; print(unipixel.__file__)"], **run)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(venv_site)
    helped = subprocess.run([venv / "bin" / "unipixel", "--help"], **run)
    assert helped.returncode == 0 and "infer" in helped.stdout, helped.stderr
    # The tiny checkpoint's SAM 2 comes from a yaml shipped as package data.
    built = subprocess.run([venv / "bin" / "unipixel", "tiny", tmp_path / "tiny"], **run)
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "tiny" / "config.json").exists()
