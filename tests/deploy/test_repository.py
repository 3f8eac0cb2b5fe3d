"""The repository as a whole: it stands on its own, and says its version once."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry
from support import FAKE_KEY

import watcher
from watcher.config import load_settings
from watcher.daemon import Watcher

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
VERSION = PYPROJECT["project"]["version"]


def git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.process
def test_a_clone_alone_passes_the_checks(tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    listed = git("ls-files", "-z")
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.strip()}")
    # The tracked files as they are now (what the next commit holds, not the last one), in a
    # folder with nothing beside it: a test that reads outside the repository fails here.
    clone = tmp_path / "loops-watcher"
    for name in filter(None, listed.stdout.split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is simply gone
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / name)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "not process", "-q", "-p", "no:cacheprovider"],
        cwd=clone,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    # Nothing skipped for want of a file either. (`python -m` put the clone first on sys.path,
    # so its own `watcher` package was the one tested.)
    summary = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ passed, \d+ deselected in .*", summary), summary


def test_the_package_reports_the_version_of_pyproject(capsys: pytest.CaptureFixture[str]) -> None:
    # The installed metadata is what __version__ reads: stale after a version change until the
    # environment is synced again (`make check` does).
    assert watcher.__version__ == VERSION
    with pytest.raises(SystemExit) as exited:
        load_settings(["--version"], {}, stdout_is_tty=False)
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"loops-watcher {VERSION}"
    registry = CollectorRegistry()
    settings = load_settings(
        ["--run-id", "k4q95w5"], {"BASETEN_API_KEY": FAKE_KEY}, stdout_is_tty=False
    )
    Watcher(settings, registry=registry)
    assert registry.get_sample_value("loops_watcher_build_info", {"version": VERSION}) == 1


def test_image_label_kubernetes_tag_and_changelog_carry_the_same_version() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert re.findall(r'org\.opencontainers\.image\.version="([^"]*)"', dockerfile) == [VERSION]
    tags = [
        image.get("newTag")
        for path in sorted((ROOT / "deploy" / "kubernetes").rglob("kustomization.yaml"))
        for image in yaml.safe_load(path.read_text(encoding="utf-8")).get("images", [])
    ]
    assert tags == [VERSION], "one kustomize `images:` entry sets the tag"
    manifests = (ROOT / "deploy" / "kubernetes").rglob("*.yaml")
    tagged = [path for path in manifests if re.search(r"image: loops-watcher:", path.read_text())]
    assert tagged == [], "manifests name the image untagged; kustomize adds the tag"
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    released = re.findall(r"^## \[(\d[^\]]*)\]", changelog, re.M)
    assert released[0] == VERSION, "the newest release in CHANGELOG.md is the package's version"


def test_the_image_and_make_use_the_same_uv() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    (wanted,) = re.findall(r"^UV_VERSION\s*:=\s*(\S+)", makefile, re.M)
    assert re.findall(r"\buv==(\S+)", dockerfile) == [wanted]


def test_the_project_is_licensed_apache_2() -> None:
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text
    assert "Version 2.0, January 2004" in text


def test_the_readme_layout_names_every_module() -> None:
    """The README's layout paragraph gives each module of `watcher/` (and of the simulator)
    its own line or clause, so the file list and its description cannot drift apart."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("The code is laid out one module per concern")
    layout = readme[start : readme.index("\n\n", readme.index("\n- ", start))]
    modules = {
        path.stem if path.stem != "__init__" else path.parent.name
        for folder in ("watcher", "watcher/simulator")
        for path in (ROOT / folder).glob("*.py")
    } - {"__init__", "watcher"}
    assert "simulator" in modules
    assert [name for name in sorted(modules) if f"`{name}" not in layout] == []
