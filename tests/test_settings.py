"""One settings object, one validator per option (issue 33): a bad value gives the same one line wherever it comes
from (a flag of scan, audit or generate --guard, a memdetect.toml, the library), and the settings are frozen."""

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import memdetect
from memdetect.cli import app
from memdetect.config import TOP_KEYS, Config, ScanSettings, load_config
from memdetect.detector import Detector
from memdetect.errors import UsageError
from memdetect.settings import COLUMN_FIELDS, KEY_FIELDS, TOML_FIELDS, UNLESS_DEFAULT, VALIDATORS, Settings
from memdetect.store.io import display_path
from memdetect.store.journal import KEY_SETTINGS, fingerprint
from memdetect.store.report import SETTINGS_COLUMNS

runner = CliRunner()
NAN_THRESHOLD = "the threshold must be a finite number, got nan"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("memdetect:")]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


def record(**changes) -> Settings:
    """A valid ``Settings`` (what ``Detector.settings`` makes), with ``changes``."""
    base = dict(model="demo", family="ddpm", source="preset demo", layer="mid_block", timestep=50, sigma=0.5,
                pooling="spatial", metric="std", threshold=None, seed=0, preprocess="pil-fit-bicubic", resolution=32,
                dtype="float32", device="cpu", winograd=False, allocator="default")
    return Settings(**{**base, **changes})


def test_a_bad_threshold_is_the_same_one_line_from_every_entry_point(tiny_ddpm, images_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = ["--model", "ddpm", "--model-path", tiny_ddpm]
    results = {
        "scan": invoke("scan", images_dir, *model, "--threshold", "nan"),
        "audit": invoke("audit", images_dir, *model, "--threshold", "nan"),
        "generate --guard": invoke("generate", *model, "-n", 1, "--guard", "--threshold", "nan", "-o",
                                   tmp_path / "generated", "-q"),
    }
    lines = {command: (res.exit_code, error_line(res.output)) for command, res in results.items()}
    assert len(set(lines.values())) == 1, lines
    code, line = lines["scan"]
    assert code == 2 and line.endswith(": " + NAN_THRESHOLD), line

    from diffusers import DDIMPipeline, DDPMScheduler, UNet2DModel

    pipe = DDIMPipeline(unet=UNet2DModel.from_pretrained(tiny_ddpm, subfolder="unet"),
                        scheduler=DDPMScheduler.from_pretrained(tiny_ddpm, subfolder="scheduler"))
    library = {
        "Detector": lambda: Detector.from_pretrained("ddpm", str(tiny_ddpm), device="cpu", threshold=float("nan")),
        "guard": lambda: memdetect.guard(pipe, threshold=float("nan")),
        "ScanSettings": lambda: ScanSettings(model="ddpm", threshold=float("nan")),
        "Settings": lambda: record(threshold=float("nan")),
    }
    for name, make in library.items():
        with pytest.raises(UsageError) as e:
            make()
        assert str(e.value) == NAN_THRESHOLD, name
    # a config's threshold goes through the same validator; the message names the key and the file
    for text, key in (('model = "ddpm"\nthreshold = nan\n', "threshold"),
                      ('model = "ddpm"\nthreshold = 1\n[calibration.thresholds]\nl4l2 = nan\n',
                       "calibration.thresholds.l4l2"),
                      ('model = "ddpm"\n[guard]\nthreshold = nan\n', "guard.threshold")):
        path = tmp_path / "memdetect.toml"
        path.write_text(text)
        with pytest.raises(UsageError) as e:
            load_config(path)
        assert str(e.value) == f"{key} in {display_path(path)} must be a finite number, got nan"
    # an integer too large for a float is one line, at the top level and in [guard] alike (one typing function)
    for text, key in (('model = "ddpm"\nthreshold = 1\nsigma = 9' + "0" * 400 + "\n", "sigma"),
                      ('model = "ddpm"\n[guard]\nthreshold = 1\nguidance = 9' + "0" * 400 + "\n", "guard.guidance")):
        path = tmp_path / "memdetect.toml"
        path.write_text(text)
        with pytest.raises(UsageError) as e:
            load_config(path)
        assert str(e.value) == f"{key} in {display_path(path)} must be a finite number, got a 1332-bit integer"


@pytest.mark.parametrize("option,bad,in_config", [
    ("threshold", float("inf"), "inf"),
    ("seed", -1, "-1"),
    ("seed", 2**64, None),  # TOML integers stop at 2**63 - 1
    ("timestep", -3, "-3"),
    ("draws", 0, "0"),
    ("draws", 65, "65"),
    ("sigma", -0.5, "-0.5"),
    ("metric", "l3", '"l3"'),
    ("fpr", 1.0, None),
])
def test_each_option_has_one_validator(option, bad, in_config, tmp_path):
    """The settings object, the record and a config all refuse a bad value with the option's one validator."""
    with pytest.raises(UsageError) as direct:
        VALIDATORS[option](bad)
    with pytest.raises(UsageError) as made:
        ScanSettings(model="demo", **{option: bad})
    assert str(made.value) == str(direct.value)
    if option in {f.name for f in dataclasses.fields(Settings)} and option != "sigma":  # its sigma: the schedule's
        with pytest.raises(UsageError) as recorded:
            record(**{option: bad})
        assert str(recorded.value) == str(direct.value)
    if in_config is not None:
        path = tmp_path / "memdetect.toml"
        threshold = "" if option == "threshold" else "threshold = 1\n"
        path.write_text(f'model = "demo"\n{threshold}{option} = {in_config}\n')
        with pytest.raises(UsageError) as read:
            load_config(path)
        where = f"{option} in {display_path(path)}"
        with pytest.raises(UsageError) as expected:
            VALIDATORS[option](bad, f" in {display_path(path)}") if option == "metric" else VALIDATORS[option](bad,
                                                                                                               where)
        assert str(read.value) == str(expected.value)


def test_settings_are_frozen_and_validated_when_replaced():
    s = record()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.threshold = 1.0
    with pytest.raises(UsageError, match="threshold must be a finite number"):
        dataclasses.replace(s, threshold=float("nan"))
    scan = ScanSettings(model="demo", threshold=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        scan.threshold = 0.0
    with pytest.raises(UsageError, match="seed must be an integer"):
        dataclasses.replace(scan, seed=-1)


def test_scan_settings_come_once_from_the_flags_and_the_config():
    cfg = Config(model="demo", threshold=0.6, layer="up_blocks.0.resnets.2.conv2:in", timestep=50, seed=0,
                 thresholds={"maxmin": 3.5}, path=Path("memdetect.toml"))
    flags = dict(model="demo", model_path=None, layer=None, timestep=None, sigma=None, metric="std", threshold=None,
                 seed=0, fpr=None, allow_remote=False, draws=1)
    s = ScanSettings.from_sources(cfg, flags, set())
    assert (s.model, s.layer, s.timestep, s.threshold, s.metric) == ("demo", "up_blocks.0.resnets.2.conv2:in", 50,
                                                                     0.6, "std")
    assert ScanSettings.from_sources(cfg, dict(flags, metric="maxmin"), {"metric"}).threshold == 3.5
    assert ScanSettings.from_sources(None, flags, set()) == ScanSettings(**flags)
    assert s.detector_options()["layer"] == s.layer and s.reference_stats is None
    with pytest.raises(UsageError, match="--fpr must be in"):
        ScanSettings.from_sources(cfg, dict(flags, fpr=2.0), {"fpr"})


def test_the_journal_key_and_the_report_columns_are_the_records_fields():
    names = [f.name for f in dataclasses.fields(Settings)]
    assert set(KEY_FIELDS) | set(COLUMN_FIELDS) | set(UNLESS_DEFAULT) <= set(names)
    assert KEY_SETTINGS == KEY_FIELDS and SETTINGS_COLUMNS == COLUMN_FIELDS
    assert "metric" not in KEY_FIELDS and "threshold" not in KEY_FIELDS and "device" not in KEY_FIELDS
    one = dataclasses.asdict(record())
    assert list(Settings.written("column", one)) == ["model", "layer", "timestep", "seed", "metric"]
    two = dataclasses.asdict(record(draws=2, normalise="reference:abc"))
    assert list(Settings.written("column", two))[-2:] == ["draws", "normalise"]
    assert Settings.written("toml", one) == {"layer": "mid_block", "timestep": 50, "seed": 0}
    assert Settings.written("toml", two) == {"layer": "mid_block", "timestep": 50, "seed": 0, "draws": 2,
                                             "normalise": "reference"}
    # a config's top-level settings are the settings a scan asks for: each is read back into a ScanSettings field
    assert set(TOP_KEYS) - {"version"} <= {f.name for f in dataclasses.fields(ScanSettings)}
    assert set(TOML_FIELDS) | set(UNLESS_DEFAULT) <= set(TOP_KEYS)
    # the key of one draw without normalisation is the key runs made before draws and normalise existed
    old = {k: one[k] for k in KEY_FIELDS}
    assert fingerprint(one) == hashlib.sha256(json.dumps(old, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert fingerprint(two) != fingerprint(dict(two, draws=1)) != fingerprint(dict(two, normalise="none"))
