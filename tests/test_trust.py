"""Issue 30, the trust routes: what a pull request controls must not decide the audit. The config (no silent
``./memdetect.toml``, the command line wins, ``--config-sha256``, stored calibrations checked against themselves),
``merge`` (flags recomputed, marks checked, shard MACs) and the state directory (not inside the scanned inputs, a
secret memdetect did not create is not trusted for ``audit --resume``).

Each test reproduces an attack that made ``audit`` (or ``merge``) exit 0 with memorized images in its inputs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from memdetect.cli import app
from memdetect.config import load_config
from memdetect.errors import InputError, UsageError

from .conftest import REPO, write_images

runner = CliRunner()
EXAMPLES = REPO / "examples"
DEFAULT_LAYER = "up_blocks.0.resnets.2.conv2:in"


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200", **(env or {})})


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("memdetect:")]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


# -- 6. the config -------------------------------------------------------------------------------------------------

def test_a_committed_memdetect_toml_is_not_read_without_config(tiny_ddpm, images_dir, tmp_path, monkeypatch):
    """A pull request commits ./memdetect.toml with threshold = 1e9: audit used to load it and pass everything."""
    monkeypatch.chdir(tmp_path)
    Path("memdetect.toml").write_text(f'model = "ddpm"\nmodel_path = "{tiny_ddpm}"\nthreshold = 1e9\n')
    res = invoke("audit", images_dir, "--model", "ddpm", "--model-path", tiny_ddpm, "--workers", 0)
    assert res.exit_code == 2, res.output
    line = one_error_line(res.output)
    assert "audit needs a threshold" in line and "not read unless given with --config" in res.output
    # the same file given explicitly is read (and says so)
    res = invoke("audit", images_dir, "--config", "memdetect.toml", "--workers", 0)
    assert res.exit_code == 0 and "config memdetect.toml" in res.output, res.output


def test_a_committed_memdetect_toml_cannot_change_what_is_scored(tiny_ddpm, images_dir, tmp_path, monkeypatch):
    """CI pins --threshold; the pull request's ./memdetect.toml sets only layer / timestep: not read either."""
    monkeypatch.chdir(tmp_path)
    Path("memdetect.toml").write_text(f'model = "ddpm"\nmodel_path = "{tiny_ddpm}"\nthreshold = 1e9\n'
                                      f'layer = "conv_in"\ntimestep = 999\n')
    res = invoke("audit", images_dir, "--model", "ddpm", "--model-path", tiny_ddpm, "--threshold", "-1",
                 "--workers", 0, "--summary-json", "s.json")
    assert res.exit_code == 1, res.output
    doc = json.loads(Path("s.json").read_text())
    assert (doc["settings"]["layer"], doc["settings"]["timestep"], doc["config"]) == (DEFAULT_LAYER, 50, None)
    assert doc["flagged"] == 5


def test_the_command_line_wins_over_an_explicit_config(tiny_ddpm, images_dir, tmp_path):
    """With --config, flags typed on the command line win; a setting the config's threshold was calibrated for may
    only change together with an explicit --threshold (else the threshold would mean nothing: refused)."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'model = "ddpm"\nmodel_path = "{tiny_ddpm}"\nthreshold = 1e9\nlayer = "conv_in"\n'
                   f'timestep = 999\n')
    s = tmp_path / "s.json"
    res = invoke("audit", images_dir, "--config", cfg, "--layer", DEFAULT_LAYER, "--timestep", 50, "--threshold",
                 "-1", "--workers", 0, "--summary-json", s, "-o", tmp_path / "r.csv")
    assert res.exit_code == 1, res.output
    doc = json.loads(s.read_text())
    assert (doc["settings"]["layer"], doc["settings"]["timestep"], doc["threshold"]) == (DEFAULT_LAYER, 50, -1)
    res = invoke("audit", images_dir, "--config", cfg, "--timestep", 50, "-o", tmp_path / "r.csv")
    assert res.exit_code == 2 and "differs from timestep = 999" in one_error_line(res.output)


def test_the_demo_memorized_images_are_flagged_whatever_the_pr_commits(tmp_path, monkeypatch):
    """The issue's case on the demo model: CI pins the calibrated threshold; the pull request's ./memdetect.toml
    moves the layer to conv_in. Every memorized image must still be flagged."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for f in sorted(EXAMPLES.joinpath("demo").glob("mem_*.png"))[:2]:
        shutil.copy(f, imgs)
    monkeypatch.chdir(tmp_path)
    Path("memdetect.toml").write_text('model = "demo"\nthreshold = 1e9\nlayer = "conv_in"\n')
    res = invoke("audit", imgs, "--model", "demo", "--threshold", "0.6385", "--workers", 0, "--device", "cpu")
    assert res.exit_code == 1 and "2 flagged memorized" in res.output, res.output


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_config_sha256_pins_the_config(tiny_ddpm, images_dir, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'model = "ddpm"\nmodel_path = "{tiny_ddpm}"\nthreshold = -1\n')
    pinned = _sha(cfg)
    base = ["audit", images_dir, "--workers", 0, "-o", tmp_path / "r.csv"]
    res = invoke(*base, "--config", cfg, "--config-sha256", pinned.upper())
    assert res.exit_code == 1, res.output
    cfg.write_text(f'model = "ddpm"\nmodel_path = "{tiny_ddpm}"\nthreshold = 1e9\n')  # the pull request's edit
    res = invoke(*base, "--config", cfg, "--config-sha256", pinned)
    line = one_error_line(res.output)
    assert res.exit_code == 2 and "SHA-256" in line and pinned[:12] in line and _sha(cfg)[:12] in line
    res = invoke(*base, "--config", cfg, "--config-sha256", "abc")
    assert res.exit_code == 2 and "64 hexadecimal" in one_error_line(res.output)
    res = invoke(*base, "--threshold", "1", "--config-sha256", pinned)
    assert res.exit_code == 2 and "--config-sha256 needs --config" in one_error_line(res.output)


def test_the_action_passes_config_sha256(tmp_path):
    import yaml

    action = yaml.safe_load((REPO / "hooks" / "github-action" / "action.yml").read_text())
    assert action["inputs"]["config-sha256"]["default"] == ""
    audit = next(s for s in action["runs"]["steps"] if s.get("id") == "audit")
    assert audit["env"]["MEMDETECT_CONFIG_SHA256"] == "${{ inputs.config-sha256 }}"
    fake = tmp_path / "fake-memdetect"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    fake.chmod(0o755)
    import subprocess

    env = {"PATH": os.environ["PATH"], "MEMDETECT_BIN": str(fake), "ARGS_OUT": str(tmp_path / "args"),
           "MEMDETECT_PATHS": "x/", "MEMDETECT_CONFIG": "base.toml", "MEMDETECT_CONFIG_SHA256": "ab" * 32}
    subprocess.run(["bash", str(REPO / "hooks" / "github-action" / "run.sh")], env=env, cwd=tmp_path, check=True)
    args = (tmp_path / "args").read_text().splitlines()
    assert args[args.index("--config-sha256") + 1] == "ab" * 32 and args[args.index("--config") + 1] == "base.toml"


def _with_reference(tmp_path: Path, n: int, k: int) -> Path:
    scores = ", ".join(str(1.0 - i / (k + 1)) for i in range(k))
    cfg = tmp_path / f"ref-{n}-{k}.toml"
    cfg.write_text(f'model = "demo"\nthreshold = 0.6\n[calibration.reference_scores]\nn = {n}\nstd = [{scores}]\n')
    return cfg


def test_a_stored_calibration_must_agree_with_itself(tmp_path, images_dir):
    """n = 10^12 reference images beside 100 stored scores gave p-values of 1e-12."""
    with pytest.raises(UsageError, match=r"holds 100 stored scores.* n = 1000000000000 "):
        load_config(_with_reference(tmp_path, 10**12, 100))
    with pytest.raises(UsageError, match="reference_scores"):
        load_config(_with_reference(tmp_path, 150, 100))
    with pytest.raises(UsageError, match="reference_scores"):
        load_config(_with_reference(tmp_path, 10**12, 2000 - 1))
    assert load_config(_with_reference(tmp_path, 100, 100)).reference_for("std").n == 100
    assert load_config(_with_reference(tmp_path, 10**6, 2000)).reference_for("std").n == 10**6  # 2,000 order stats
    res = invoke("audit", images_dir, "--config", _with_reference(tmp_path, 10**12, 100))
    assert res.exit_code == 2 and "reference_scores" in one_error_line(res.output)


# -- 7. merge ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dets(tiny_ddpm):
    from memdetect import Detector

    return {t: Detector.from_pretrained("ddpm", str(tiny_ddpm), device="cpu", batch_size=2, threshold=t)
            for t in (-1.0, 5.0)}


def _shards(det, imgs: Path, out: Path, n: int = 2, suffix: str = ".csv", **kw) -> list[Path]:
    from memdetect.workflows.scan import scan

    parts = [out / f"p{i}{suffix}" for i in range(n)]
    for i, p in enumerate(parts):
        scan(det, [imgs], output=p, shard=(i, n), num_workers=0, **kw)
    return parts


def _merge(*parts, out: Path, env=None):
    return invoke("merge", *parts, "-o", out, env=env)


def test_merge_recomputes_memorized_from_score_and_threshold(dets, tmp_path):
    """Flipping `memorized` to False while keeping the score gave a merged "0 flagged"."""
    write_images(tmp_path / "imgs", 4)
    parts = _shards(dets[-1.0], tmp_path / "imgs", tmp_path)
    for p in parts:
        df = pd.read_csv(p)
        df["memorized"] = False
        df.to_csv(p, index=False)
    res = _merge(*parts, out=tmp_path / "m.csv")
    assert res.exit_code == 1 and "4 flagged memorized" in res.output, res.output
    assert pd.read_csv(tmp_path / "m.csv")["memorized"].all()
    for p in parts:  # the score column moved below the threshold, the metric's own column kept: rederived too
        df = pd.read_csv(p)
        df["score"] = -9.0
        df.to_csv(p, index=False)
    res = _merge(*parts, out=tmp_path / "m.csv")
    assert res.exit_code == 1 and "4 flagged memorized" in res.output, res.output


def test_merge_compares_the_settings_not_a_hash_the_file_carries(dets, tmp_path):
    """A threshold-5 shard with the shard_settings hash copied from a threshold -1 shard merged."""
    write_images(tmp_path / "imgs", 4)
    (tmp_path / "low").mkdir()
    (tmp_path / "high").mkdir()
    low = _shards(dets[-1.0], tmp_path / "imgs", tmp_path / "low")
    high = _shards(dets[5.0], tmp_path / "imgs", tmp_path / "high")
    forged = pd.read_csv(high[1])
    forged["shard_settings"] = pd.read_csv(low[0])["shard_settings"].iloc[0]
    forged.to_csv(tmp_path / "forged.csv", index=False)
    res = _merge(low[0], tmp_path / "forged.csv", out=tmp_path / "m.csv")
    assert res.exit_code == 2 and "edited" in one_error_line(res.output), res.output
    # every mark copied: the copied threshold then decides, and every image is flagged
    for c in [c for c in forged.columns if c.startswith("shard_")]:
        forged[c] = pd.read_csv(low[0])[c].iloc[0]
    forged.to_csv(tmp_path / "forged.csv", index=False)
    res = _merge(low[0], tmp_path / "forged.csv", out=tmp_path / "m.csv")
    assert res.exit_code == 1 and "4 flagged memorized" in res.output, res.output
    # the JSON form carries the settings: a threshold edited in one part is named
    lj = _shards(dets[-1.0], tmp_path / "imgs", tmp_path, suffix=".json")
    hj = _shards(dets[5.0], tmp_path / "imgs", tmp_path / "high", suffix=".json")
    doc = json.loads(hj[1].read_text())
    doc["settings"]["shard_settings"] = json.loads(lj[0].read_text())["settings"]["shard_settings"]
    hj[1].write_text(json.dumps(doc))
    res = _merge(lj[0], hj[1], out=tmp_path / "m.json")
    assert res.exit_code == 2 and "edited" in one_error_line(res.output), res.output


def test_merge_refuses_a_shard_replaced_by_a_copy_of_another(dets, tmp_path):
    """Shard 2/2 replaced by shard 1/2's rows (the memorized ones gone): the count matched, so it merged."""
    write_images(tmp_path / "imgs", 4)
    parts = _shards(dets[-1.0], tmp_path / "imgs", tmp_path)
    copy = pd.read_csv(parts[0])
    copy["shard"] = "2/2"
    copy.to_csv(tmp_path / "copy.csv", index=False)
    res = _merge(parts[0], tmp_path / "copy.csv", out=tmp_path / "m.csv")
    assert res.exit_code == 2 and "more than once" in one_error_line(res.output), res.output
    # other rows of the right count, not duplicates: the names do not hash to the scan's inputs
    other = pd.read_csv(parts[1])
    other["path"] = [p.replace("img_", "other_") for p in other["path"]]
    other.to_csv(tmp_path / "other.csv", index=False)
    res = _merge(parts[0], tmp_path / "other.csv", out=tmp_path / "m.csv")
    assert res.exit_code == 2 and "not the scan's inputs" in one_error_line(res.output), res.output
    # a part with a row moved to the other: each part must hold its own shard's rows
    a, b = pd.read_csv(parts[0]), pd.read_csv(parts[1])
    pd.concat([a, b.iloc[:1].assign(shard="1/2")]).to_csv(tmp_path / "a.csv", index=False)
    b.iloc[1:].to_csv(tmp_path / "b.csv", index=False)
    res = _merge(tmp_path / "a.csv", tmp_path / "b.csv", out=tmp_path / "m.csv")
    assert res.exit_code == 2 and "holds 3 rows, not 2" in one_error_line(res.output), res.output


def test_merge_refuses_non_numeric_marks(dets, tmp_path):
    """A non-numeric `shard_inputs` count skipped the row-count check."""
    write_images(tmp_path / "imgs", 4)
    parts = _shards(dets[-1.0], tmp_path / "imgs", tmp_path)
    for p in parts:
        df = pd.read_csv(p)
        df["shard_inputs"] = "many:" + df["shard_inputs"].str.split(":").str[1]
        df.iloc[:1].to_csv(p, index=False)  # a row dropped from each
    res = _merge(*parts, out=tmp_path / "m.csv")
    assert res.exit_code == 2 and "malformed shard_inputs" in one_error_line(res.output), res.output
    df = pd.read_csv(parts[0])
    df["shard_inputs"] = "4:" + df["shard_inputs"].str.split(":").str[1]
    df["shard"] = "1/x"
    df.to_csv(parts[0], index=False)
    res = _merge(*parts, out=tmp_path / "m.csv")
    assert res.exit_code == 2 and "malformed shard mark" in one_error_line(res.output), res.output


KEY = "k" * 40


def test_shard_reports_carry_a_mac_that_merge_verifies(tiny_ddpm, tmp_path):
    write_images(tmp_path / "imgs", 4)
    base = ["scan", tmp_path / "imgs", "--model", "ddpm", "--model-path", tiny_ddpm, "--threshold", "-1",
            "--workers", 0, "-q"]
    keyed = {"MEMDETECT_SHARD_KEY": KEY}
    for suffix in (".csv", ".json", ".parquet"):
        parts = [tmp_path / f"k{i}{suffix}" for i in (1, 2)]
        for i, p in enumerate(parts, 1):
            res = invoke(*base, "--shard", f"{i}/2", "-o", p, env=keyed)
            assert res.exit_code == 1, res.output
        res = _merge(*parts, out=tmp_path / f"m{suffix}", env=keyed)
        assert res.exit_code == 1 and "4 flagged" in res.output and "verified" in res.output, (suffix, res.output)
        assert "trusted as given" not in res.output
    # the key from a file (the command line wins over the environment)
    key_file = tmp_path / "shard.key"
    key_file.write_text(KEY + "\n")
    res = invoke("merge", *parts, "-o", tmp_path / "m.csv", "--shard-key-file", key_file,
                 env={"MEMDETECT_SHARD_KEY": "w" * 40})
    assert res.exit_code == 1 and "verified" in res.output, res.output
    # a score edited (memorized kept consistent), another key, a part without a MAC: refused
    parts = [tmp_path / "k1.csv", tmp_path / "k2.csv"]
    df = pd.read_csv(parts[1])
    df.loc[0, ["score", "std"]] = -5.0
    df.to_csv(tmp_path / "edited.csv", index=False)
    res = _merge(parts[0], tmp_path / "edited.csv", out=tmp_path / "m.csv", env=keyed)
    assert res.exit_code == 2 and "MAC does not verify" in one_error_line(res.output), res.output
    res = _merge(*parts, out=tmp_path / "m.csv", env={"MEMDETECT_SHARD_KEY": "w" * 40})
    assert res.exit_code == 2 and "MAC does not verify" in one_error_line(res.output), res.output
    res = invoke(*base, "--shard", "2/2", "-o", tmp_path / "plain2.csv")
    assert res.exit_code == 1
    res = _merge(parts[0], tmp_path / "plain2.csv", out=tmp_path / "m.csv", env=keyed)
    assert res.exit_code == 2 and "carries no MAC" in one_error_line(res.output), res.output
    # without a key, merge says plainly that the shards are trusted as given (one line on stderr)
    res = _merge(parts[0], tmp_path / "plain2.csv", out=tmp_path / "m.csv")
    assert res.exit_code == 1 and res.output.count("trusted as given") == 1, res.output
    # a key too short to be a secret, an unreadable key file
    res = _merge(*parts, out=tmp_path / "m.csv", env={"MEMDETECT_SHARD_KEY": "short"})
    assert res.exit_code == 2 and "at least 16" in one_error_line(res.output)
    res = invoke("merge", *parts, "-o", tmp_path / "m.csv", "--shard-key-file", tmp_path / "nope.key")
    assert res.exit_code == 2 and "shard key" in one_error_line(res.output)


# -- 8. the state directory ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["scan", "audit"])
def test_a_state_dir_inside_the_scanned_input_is_refused(command, tiny_ddpm, images_dir, tmp_path):
    """`--state-dir` inside the audited folder was accepted silently (its secret then lives in the scanned tree)."""
    inside = images_dir / "sub" / ".memdetect-state"
    res = invoke(command, images_dir, "--model", "ddpm", "--model-path", tiny_ddpm, "--threshold", "-1",
                 "--state-dir", inside, "-o", tmp_path / "r.csv", "--workers", 0)
    assert res.exit_code == 2 and "inside the scanned input" in one_error_line(res.output), res.output
    assert not inside.exists() and not (tmp_path / "r.csv").exists()
    res = invoke(command, images_dir, "--model", "ddpm", "--model-path", tiny_ddpm, "--threshold", "-1",
                 "-o", tmp_path / "r.csv", "--workers", 0, env={"MEMDETECT_STATE_DIR": str(images_dir)})
    assert res.exit_code == 2 and "inside the scanned input" in one_error_line(res.output), res.output


def _plant_state(state: Path, tiny_ddpm: Path, images: Path, report: Path, key: bytes) -> None:
    """What a pull request can commit: a state directory with a secret it knows (0600 after checkout) and journal rows
    for every image, scored -5 and signed with that secret."""
    from memdetect import Detector
    from memdetect.speed import runtime
    from memdetect.store.journal import fingerprint, record_mac, row_key
    from memdetect.store.state import StateDir

    state.mkdir(mode=0o700, parents=True)
    (state / "secret").write_text(key.hex() + "\n")
    os.chmod(state / "secret", 0o600)
    runtime.retain_freed_memory()  # as the command does: the allocator setting is part of the key
    det = Detector.from_pretrained("ddpm", str(tiny_ddpm), device="cpu", threshold=-1.0)
    fp = fingerprint(asdict(det.settings), weights=det.weights_digest(StateDir(state)))
    journal = StateDir(state).journal_path(fp, report)
    journal.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for f in sorted(images.glob("*.png")):
        rec = {"key": row_key(hashlib.sha256(f.read_bytes()).hexdigest(), fp), "path": str(f), "std": -5.0,
               "l4l2": -5.0, "entropy": -5.0, "maxmin": -5.0}
        lines.append(json.dumps({**rec, "mac": record_mac(rec, key)}) + "\n")
    journal.write_text("".join(lines))


@pytest.mark.parametrize("where", ["checkout", "elsewhere"])
def test_a_planted_secret_is_not_trusted_by_audit_resume(where, tiny_ddpm, tmp_path, monkeypatch):
    """A state dir committed in the repository (or put anywhere by someone else) with a 0600 secret and re-signed
    journal rows was trusted by `audit --resume`: every image passed with the forged scores."""
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)  # a checkout
    images = repo / "generated"
    write_images(images, 3)
    monkeypatch.chdir(repo)
    state = repo / ".mdstate" if where == "checkout" else tmp_path / "planted"
    report = repo / ".memdetect" / "report.csv"
    _plant_state(state, tiny_ddpm, images, report, b"\x07" * 32)
    res = invoke("audit", "generated", "--model", "ddpm", "--model-path", tiny_ddpm, "--threshold", "-1",
                 "--resume", "--state-dir", state, "--workers", 0)
    assert res.exit_code == 2, res.output
    assert "memdetect did not create" in one_error_line(res.output)
    # without --resume nothing is read from it: every image is scored (and flagged)
    res = invoke("audit", "generated", "--model", "ddpm", "--model-path", tiny_ddpm, "--threshold", "-1",
                 "--state-dir", state, "--workers", 0)
    assert res.exit_code == 1 and "3 flagged" in res.output, res.output


def test_a_secret_memdetect_created_is_trusted_unless_under_the_checkout(tiny_ddpm, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    write_images(repo / "generated", 3)
    monkeypatch.chdir(repo)
    base = ["audit", "generated", "--model", "ddpm", "--model-path", tiny_ddpm, "--threshold", "-1", "--resume",
            "--workers", 0]
    own = tmp_path / "own-state"
    for _ in range(2):
        res = invoke(*base, "--state-dir", own)
        assert res.exit_code == 1 and "3 flagged" in res.output, res.output
    assert "3 rows reused" in res.output
    # the same secret, copied (a backup, another machine): not the file memdetect made
    shutil.copytree(own, tmp_path / "copied")
    res = invoke(*base, "--state-dir", tmp_path / "copied")
    assert res.exit_code == 2 and "memdetect did not create" in one_error_line(res.output), res.output
    # a state dir under the checkout: made fresh on the first run, refused once its secret exists
    inrepo = repo / ".cache" / "state"
    res = invoke(*base, "--state-dir", inrepo)
    assert res.exit_code == 1, res.output
    res = invoke(*base, "--state-dir", inrepo)
    assert res.exit_code == 2 and "git checkout" in one_error_line(res.output), res.output


def test_generate_guard_the_command_line_wins_over_the_config(tiny_ddpm, tmp_path):
    """`generate --guard --config` took metric, layer and step from the file even when typed on the command line."""
    cfg = tmp_path / "guard.toml"
    cfg.write_text(f'model = "ddpm"\nmodel_path = "{tiny_ddpm}"\n[guard]\nthreshold = 1e9\nmetric = "std"\n'
                   f'layer = "conv_in"\nstep_t = 50\nsteps = 2\n')
    base = ["generate", "--model", "ddpm", "--guard", "--config", cfg, "-n", 1, "--device", "cpu", "-o",
            tmp_path / "gen"]
    res = invoke(*base, "--layer", "mid_block")
    assert res.exit_code == 2 and "differs from layer = 'conv_in'" in one_error_line(res.output), res.output
    res = invoke(*base, "--layer", "mid_block", "--threshold", "-1")
    assert res.exit_code == 1, res.output
    assert "guard: mid_block at timestep" in res.output and ">= -1" in res.output


@pytest.mark.parametrize("suffix", [".csv", ".json", ".parquet"])
def test_a_shard_mac_covers_error_rows_and_p_values(dets, tmp_path, suffix):
    """The MAC is computed over the report as merge reads it back (JSON keeps 10 decimals of a float): it verifies
    for every format, with error rows and p-value columns, and any edited cell breaks it."""
    import numpy as np

    from memdetect.workflows.merge import merge_reports
    from memdetect.core.pvalues import Reference

    write_images(tmp_path / "imgs", 5)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not an image")
    ref = Reference.from_scores(np.linspace(0.0, 2.0, 50) + 1e-7 / 3)
    key = b"s" * 32
    parts = _shards(dets[-1.0], tmp_path / "imgs", tmp_path, n=3, suffix=suffix, reference=ref, shard_key=key)
    res = merge_reports(parts, tmp_path / f"m{suffix}", key=key)
    assert res.verified and res.counts == {"images": 6, "scored": 5, "errored": 1, "flagged": 5}
    assert res.frame["p_value"].notna().sum() == 5
    with pytest.raises(InputError, match="MAC does not verify"):
        merge_reports(parts, tmp_path / f"m{suffix}", key=b"t" * 32)
