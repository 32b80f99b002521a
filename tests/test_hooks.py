"""hooks/: the pre-commit hook run the way pre-commit runs it, and the GitHub Action's audit step run locally."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, write_images

ACTION = REPO / "hooks" / "github-action" / "action.yml"
RUN_SH = REPO / "hooks" / "github-action" / "run.sh"


def _env(**extra) -> dict:
    """The environment of a CI job: the installed `memdetect` script on PATH, one torch thread (see test_journal)."""
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GITHUB_", "MEMDETECT_")) or k == "MEMDETECT_STATE_DIR"}  # the test's own state
    return {**env, "PATH": path, "OMP_NUM_THREADS": "1", **extra}


def _hook() -> dict:
    hooks = yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())
    return {h["id"]: h for h in hooks}["memdetect-audit"]


def test_pre_commit_hook_definition():
    hook = _hook()
    # its own state dir: safe to resume; the config named (memdetect never picks up ./memdetect.toml by itself);
    # every staged file reaches memdetect (no `files:` filter): images are found by content too (--any-file)
    assert shlex.split(hook["entry"]) == ["memdetect", "audit", "--resume", "--any-file", "--config",
                                          "memdetect.toml"]
    assert hook["language"] == "python" and hook["require_serial"] is True
    assert "files" not in hook and "exclude" not in hook and hook["types"] == ["file"]


def _staged(repo: Path) -> list[str]:
    """What pre-commit passes: the staged files (no `files:` filter), relative to the repo root."""
    out = subprocess.run(["git", "-C", str(repo), "diff", "--cached", "--name-only", "-z"], check=True,
                         capture_output=True, text=True).stdout
    return [f for f in out.split("\0") if f]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_pre_commit_hook_audits_staged_images(tiny_ddpm, tmp_path):
    """What pre-commit does: pass the staged files, run `entry args... files` at the repo root. An image committed
    without an image suffix is found by its bytes; text files (the config itself included) are skipped."""
    hook = _hook()
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "memdetect.toml").write_text(f'model = "ddpm"\nmodel_path = "{tiny_ddpm}"\nthreshold = -1\n')
    write_images(repo / "assets", 3)
    write_images(repo / "unstaged", 2)
    (repo / "assets" / "img_002.png").rename(repo / "assets" / "blob.bin")  # a PNG by content, not by name
    (repo / "README.md").write_text("hello\n")
    (repo / "data.csv").write_text("path\nunstaged/img_000.png\n")  # a committed csv is not read as a manifest
    subprocess.run([*git, "add", "memdetect.toml", "assets", "README.md", "data.csv"], check=True)
    files = _staged(repo)
    assert files == ["README.md", "assets/blob.bin", "assets/img_000.png", "assets/img_001.png", "data.csv",
                     "memdetect.toml"]

    proc = subprocess.run([*shlex.split(hook["entry"]), *hook.get("args", []), *files], cwd=repo, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr  # threshold -1: every staged image is flagged; the commit is blocked
    assert "3 images: 3 scored, 0 errored, 3 flagged" in proc.stdout and "config memdetect.toml" in proc.stdout
    for f in ("assets/blob.bin", "assets/img_000.png", "assets/img_001.png"):
        assert f"flagged: {f}" in proc.stdout
    assert "unstaged" not in proc.stdout and "README" not in proc.stdout
    status = subprocess.run([*git, "status", "--porcelain", "--untracked-files=all"], capture_output=True,
                            text=True, check=True).stdout
    assert ".memdetect" not in status  # the report and its journal ignore themselves


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_pre_commit_hook_passes_a_commit_without_images_unloaded(tmp_path):
    """A commit of text files exits 0 without loading the model (its weights do not even exist here), but the config
    is still checked: a config without a threshold blocks the commit."""
    hook = _hook()
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "-C", str(repo), "init", "-q"], check=True)
    (repo / "memdetect.toml").write_text(f'model = "ddpm"\nmodel_path = "{tmp_path / "no-weights"}"\nthreshold = 1\n')
    (repo / "main.py").write_text("print('hi')\n")
    subprocess.run(["git", "-C", str(repo), "add", "."], check=True)
    cmd = [*shlex.split(hook["entry"]), *hook.get("args", []), *_staged(repo)]
    proc = subprocess.run(cmd, cwd=repo, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "no image among the 2 files: nothing to audit" in proc.stdout
    assert not (repo / ".memdetect").exists()
    (repo / "memdetect.toml").write_text('model = "ddpm"\n')
    proc = subprocess.run(cmd, cwd=repo, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "threshold" in proc.stderr, proc.stderr


def _action() -> dict:
    return yaml.safe_load(ACTION.read_text())


def test_action_definition_is_consistent_with_run_sh():
    action = _action()
    steps = action["runs"]["steps"]
    assert action["runs"]["using"] == "composite"
    assert any(s.get("uses", "").startswith("actions/setup-python@") for s in steps)
    install = next(s for s in steps if s.get("name") == "Install memdetect")
    assert "--index-url" in install["run"] and '"$GITHUB_ACTION_PATH/../.."' in install["run"]
    assert action["inputs"]["torch-index-url"]["default"] == "https://download.pytorch.org/whl/cpu"
    audit = next(s for s in steps if s.get("id") == "audit")
    assert audit["run"] == 'bash "$GITHUB_ACTION_PATH/run.sh"'
    text = ACTION.read_text()
    assert set(re.findall(r"\$\{\{\s*inputs\.([\w-]+)\s*\}\}", text)) == set(action["inputs"])  # all used, none unknown
    for s in steps:  # inputs reach shell code through env only (no script injection)
        assert "${{" not in s.get("run", "")
    assert set(re.findall(r"MEMDETECT_[A-Z0-9_]+", RUN_SH.read_text())) - {"MEMDETECT_BIN"} == set(audit["env"])
    for key, out in action["outputs"].items():
        assert out["value"] == "${{ steps.audit.outputs.%s }}" % key


def _step_env(**inputs) -> dict:
    """The audit step's env as GitHub would set it: each MEMDETECT_* from its input, default unless given."""
    action = _action()
    values = {k: v.get("default", "") for k, v in action["inputs"].items()}
    values.update(inputs)
    audit = next(s for s in action["runs"]["steps"] if s.get("id") == "audit")
    return {var: str(values[re.search(r"inputs\.([\w-]+)", expr).group(1)]) for var, expr in audit["env"].items()}


def _outputs(path: Path) -> dict:
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


def test_action_run_sh_locally(tiny_ddpm, tmp_path):
    ws = tmp_path / "workspace"
    write_images(ws / "generated", 4)
    (ws / "generated" / "corrupt.png").write_bytes(b"\x89PNG truncated")
    (ws / "memdetect.toml").write_text(f'model = "ddpm"\nmodel_path = "{tiny_ddpm}"\nthreshold = -1\n')
    gh = {"GITHUB_ACTIONS": "true", "GITHUB_WORKSPACE": str(ws), "GITHUB_OUTPUT": str(tmp_path / "out1"),
          "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md")}
    step = _step_env(paths="generated\n", html="report.html", **{"extra-args": "--workers 0 --batch-size 2"})
    proc = subprocess.run(["bash", str(RUN_SH)], cwd=ws, env=_env(**gh, **step), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stderr  # flagged, and fail-on-flagged defaults to true
    outputs = _outputs(tmp_path / "out1")
    assert set(outputs) == set(_action()["outputs"])
    assert outputs == {"exit-code": "1", "report": "memdetect-report.csv", "junit": "memdetect-junit.xml",
                       "summary-json": "memdetect-summary.json", "images": "5", "scored": "4", "errored": "1",
                       "flagged": "4"}
    for name in ("memdetect-report.csv", "memdetect-junit.xml", "memdetect-summary.json", "report.html"):
        assert (ws / name).is_file(), name
    assert sorted(p.name for p in ws.iterdir()) == ["generated", "memdetect-junit.xml", "memdetect-report.csv",
                                                    "memdetect-summary.json", "memdetect.toml", "report.html"]
    assert "::error file=generated/img_000.png,title=memdetect%3A memorized image::" in proc.stdout
    assert "::error file=generated/corrupt.png,title=memdetect%3A not checked::" in proc.stdout
    assert "| 5 | 4 | 1 | 4 | 1 |" in (tmp_path / "summary.md").read_text()



def test_action_run_sh_exit_codes(tmp_path):
    """run.sh's own logic, with a stand-in for memdetect (MEMDETECT_BIN) that exits with a given code."""
    fake = tmp_path / "fake-memdetect"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > args.txt\n'
                    'while [ $# -gt 0 ]; do [ "$1" = --summary-json ] && out=$2; shift; done\n'
                    '[ "$FAKE_RC" = 2 ] || echo "{\\"images\\": 3, \\"scored\\": 3, \\"errored\\": 0, '
                    '\\"flagged\\": 1, '
                    '\\"not_checked\\": ${FAKE_NOT_CHECKED:-[]}}" > "$out"\n'
                    'exit "$FAKE_RC"\n')
    fake.chmod(0o755)
    (tmp_path / "memdetect-summary.json").write_text('{"images": 99, "scored": 99, "errored": 0, "flagged": 99}')
    cases = [("1", "true", 1, "[]"), ("1", "false", 0, "[]"), ("0", "true", 0, "[]"), ("2", "false", 2, "[]"),
             ("1", "false", 1, '[{"path": "x.png", "error": "unreadable"}]')]  # not checked: never excused
    for rc, fail_on_flagged, expected, not_checked in cases:
        out = tmp_path / f"out-{rc}-{fail_on_flagged}-{len(not_checked)}"
        step = _step_env(paths="a b\n c d/e f.png \n", **{"fail-on-flagged": fail_on_flagged, "extra-args": "-b 8"})
        env = _env(**step, MEMDETECT_BIN=str(fake), FAKE_RC=rc, GITHUB_OUTPUT=str(out), FAKE_NOT_CHECKED=not_checked)
        proc = subprocess.run(["bash", str(RUN_SH)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == expected, (rc, fail_on_flagged, proc.stderr)
        outputs = _outputs(out)
        assert outputs["exit-code"] == rc
        assert ("flagged" in outputs) == (rc != "2")  # an earlier run's summary is never reported
    args = (tmp_path / "args.txt").read_text().splitlines()
    assert args[:3] == ["audit", "a b", "c d/e f.png"]  # one path per line, spaces kept
    assert args[-2:] == ["-b", "8"] and "--config" in args and "--junit" in args


def test_action_run_sh_rejects_empty_paths(tmp_path):
    proc = subprocess.run(["bash", str(RUN_SH)], cwd=tmp_path, env=_env(**_step_env(paths="  ")),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "the 'paths' input is empty" in proc.stderr


# -- the action's inputs, the snippets' tags and references, actionlint ------------------------------------------------

#: Inputs that set up the job rather than pass a flag of `memdetect audit`.
JOB_INPUTS = {"paths", "fail-on-flagged", "extra-args", "python-version", "torch", "torch-index-url", "install"}


def test_action_inputs_mirror_the_audit_flags():
    import typer.main

    from memdetect.cli import app

    audit = typer.main.get_command(app).commands["audit"]
    flags = {o for p in audit.params for o in getattr(p, "opts", []) if o.startswith("--")}
    inputs = set(_action()["inputs"])
    assert {"model", "allow-empty", "config", "threshold"} <= inputs
    missing = sorted(f"--{i}" for i in inputs - JOB_INPUTS if f"--{i}" not in flags)
    assert not missing, f"action inputs that are no `memdetect audit` flag: {missing}"
    script = RUN_SH.read_text()
    for name in inputs - JOB_INPUTS:  # each reaches the command line as its own flag
        assert f"--{name}" in script, name


def test_action_allow_empty(tmp_path):
    fake = tmp_path / "fake-memdetect"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > args.txt\nexit 0\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = _env(**_step_env(paths="  ", **{"allow-empty": "true"}), MEMDETECT_BIN=str(fake), GITHUB_OUTPUT=str(out))
    proc = subprocess.run(["bash", str(RUN_SH)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "nothing to audit" in proc.stderr, proc.stderr
    assert _outputs(out)["exit-code"] == "0" and _outputs(out)["images"] == "0"
    assert not (tmp_path / "args.txt").exists()  # no paths: memdetect is not run at all
    env = _env(**_step_env(paths="generated/", model="demo", **{"allow-empty": "true"}), MEMDETECT_BIN=str(fake))
    proc = subprocess.run(["bash", str(RUN_SH)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    args = (tmp_path / "args.txt").read_text().splitlines()
    assert "--allow-empty" in args and args[args.index("--model") + 1] == "demo"


def _readme() -> str:
    return (REPO / "README.md").read_text()


def test_snippets_name_the_tag_of_this_version():
    """The tag scheme: releases are tagged v<version>; the README's snippets name this version's tag."""
    from memdetect import __version__

    readme = _readme()
    revs = re.findall(r"^\s*rev:\s*(\S+)", readme, re.M)
    refs = re.findall(r"uses:\s*\S*memdetect/hooks/github-action@(\S+)", readme)
    assert revs and refs
    assert set(revs) | set(refs) == {f"v{__version__}"}
    assert "`v` + the package version" in readme  # the scheme is written down


def _headings(markdown: str) -> set[str]:
    return {m.strip() for m in re.findall(r"^#+\s+(.*)$", markdown, re.M)}


def test_references_to_readme_sections_exist():
    headings = _headings(_readme())
    anchors = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
    files = [REPO / ".pre-commit-hooks.yaml", ACTION, RUN_SH, REPO / "hooks" / "pre-commit" / "README.md",
             REPO / "Dockerfile"]
    seen = 0
    for f in files:
        text = f.read_text()
        for section in re.findall(r'README(?:\.md)?(?:\'s)?,? \W?"([^"]+)"', text):
            assert section in headings, f"{f.name} points to README section {section!r}, which does not exist"
            seen += 1
        for anchor in re.findall(r"README\.md#([\w\-]+)", text):
            assert anchor in anchors, f"{f.name} links to #{anchor}, which does not exist"
            seen += 1
    assert seen >= 3


def _actionlint() -> str | None:
    found = shutil.which("actionlint")
    beside = Path(sys.executable).with_name("actionlint")
    return found or (str(beside) if beside.is_file() else None)


@pytest.mark.skipif(_actionlint() is None, reason="actionlint not installed (the test extra installs it on x86-64 "
                                                  "Linux)")
def test_actionlint_on_the_readme_workflow_with_this_action(tmp_path):
    """The README's workflow, with the action used from this checkout: actionlint checks the workflow and the
    inputs it passes against action.yml."""
    block = re.search(r"```yaml\n# \.github/workflows/memdetect\.yml\n(.*?)```", _readme(), re.S).group(1)
    workflow = re.sub(r"uses: \S*memdetect/hooks/github-action@\S+", "uses: ./hooks/github-action", block)
    assert "uses: ./hooks/github-action" in workflow
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    (tmp_path / ".github" / "workflows" / "memdetect.yml").write_text(workflow)
    shutil.copytree(REPO / "hooks" / "github-action", tmp_path / "hooks" / "github-action")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    proc = subprocess.run([_actionlint(), "-no-color", "-shellcheck=", "-pyflakes="], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # and it does check the inputs: an unknown one is reported
    (tmp_path / ".github" / "workflows" / "memdetect.yml").write_text(
        workflow.replace("allow-empty: true", "allow-emptyy: true"))
    proc = subprocess.run([_actionlint(), "-no-color", "-shellcheck=", "-pyflakes="], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "allow-emptyy" in proc.stdout, proc.stdout + proc.stderr
