"""The built wheel, installed (not editable), finds its task recipes, its web page and its shipped
data: package data travels inside the package, nothing is looked up beside the source tree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds and installs the wheel

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
from pathlib import Path
import softprompt
from softprompt import recipes
pkg = Path(softprompt.__file__).resolve().parent
tasks = sorted(p.stem for p in recipes.TASKS_DIR.glob("*.json"))
print(json.dumps({"pkg": str(pkg), "tasks_dir": str(recipes.TASKS_DIR), "tasks": tasks,
                  "sst2_template": recipes.load_task("sst2")["template"],
                  "web": sorted(p.name for p in (pkg / "web").iterdir())}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src-copy"  # build from a copy: the build writes build/ and *.egg-info beside it
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((tmp / "dist").glob("softprompt-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(tmp / "site"), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return tmp / "site"


def test_installed_wheel_finds_recipes_and_web_assets(installed, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(installed)}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert Path(got["pkg"]).is_relative_to(installed)  # the wheel's copy, not the source tree
    assert Path(got["tasks_dir"]).is_relative_to(installed)
    shipped = sorted(p.stem for p in (REPO / "src" / "softprompt" / "tasks").glob("*.json"))
    assert got["tasks"] == shipped and "sst2" in shipped
    assert got["sst2_template"] == json.loads((REPO / "src/softprompt/tasks/sst2.json").read_text())["template"]
    assert {"index.html", "app.js", "style.css"} <= set(got["web"])
