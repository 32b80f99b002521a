"""The paper benchmarks (`memdetect bench laion | imagenet | cifar10`) end to end on tiny models, offline on CPU;
prompt-list reading and caching; the samplers against closed forms."""

from __future__ import annotations

import json
import math
import shutil
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from memdetect import Detector
from memdetect.bench import generate as gen
from memdetect.bench import prompts
from memdetect.bench.paper import DIFFERENCE_COLUMNS, LAION_METHODS, OURS, RESULT_COLUMNS
from memdetect.cli import app
from memdetect.errors import InputError, UsageError
from memdetect.store.prompts import detect_format
from memdetect.models import edm
from memdetect.models.base import Adapter

from .conftest import SHARED, needs_shared, write_images

runner = CliRunner()
PAPER_COLUMNS = RESULT_COLUMNS
MEMORIZED = ["The No Limits Business Woman Podcast", "Mothers influence on her young hippo",
             "Talks on the Precepts and Buddhist Ethics", "Full body U-Zip main opening"]
NORMAL = ["A small kitchen with some quirky art decorations.", "a red car parked on a quiet road",
          "A dog wearing a bandanna and sitting on the trunk of a car.", "a tuxemon cartoon of a blue bird"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These models are tiny: on a small shared machine, intra-op threads cost (much) more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- prompt lists --------------------------------------------------------------------------------------------------


def test_prompt_list_formats_are_detected(tmp_path):
    files = {
        "wen.jsonl": "\n".join(json.dumps({"caption": p, "index": i}) for i, p in enumerate(MEMORIZED)) + "\n",
        "nemo.csv": ";Caption;URL;type\n" + "".join(f"{i};{p};http://x/{i};VM\n" for i, p in enumerate(MEMORIZED)),
        "plain.csv": "id,Prompt\n" + "".join(f'{i},"{p}"\n' for i, p in enumerate(MEMORIZED)),
        "lines.txt": "\n\n".join(MEMORIZED),  # blank lines skipped, no trailing newline
        "list.json": json.dumps(MEMORIZED),
        "sniffed_jsonl.dat": "".join(json.dumps({"prompt": p}) + "\n" for p in MEMORIZED),
        "sniffed_csv": "text\tother\n" + "".join(f"{p}\t1\n" for p in MEMORIZED),
        "sniffed_txt": "\n".join(MEMORIZED) + "\n",
    }
    formats = {"wen.jsonl": "jsonl", "nemo.csv": "csv", "plain.csv": "csv", "lines.txt": "txt", "list.json": "json",
               "sniffed_jsonl.dat": "jsonl", "sniffed_csv": "csv", "sniffed_txt": "txt"}
    for name, text in files.items():
        path = tmp_path / name
        path.write_text(text)
        assert detect_format(path) == formats[name], name
        df = prompts.read_prompts(path)
        assert list(df["prompt"]) == MEMORIZED, name
        assert list(df["row"]) == list(range(len(MEMORIZED)))
    nemo = prompts.read_prompts(tmp_path / "nemo.csv")
    assert list(nemo.columns) == ["row", "prompt", "URL", "type"]  # the unnamed index column is dropped


def test_prompt_filters_and_errors(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("Caption;type;max_sscd\na;VM;0.9\nb;TM;0.2\nc;tm;\nd;VM;0.4\n")
    df = prompts.read_prompts(path)
    assert list(prompts.apply_filter(df, "type=VM")["prompt"]) == ["a", "d"]
    assert list(prompts.apply_filter(df, "TYPE = tm")["prompt"]) == ["b", "c"]  # case-insensitive
    assert list(prompts.apply_filter(df, "type!=vm")["prompt"]) == ["b", "c"]
    assert list(prompts.apply_filter(df, "max_sscd>=0.4")["row"]) == [0, 3]  # rows keep their file positions
    assert list(prompts.apply_filter(df, "max_sscd<0.4")["prompt"]) == ["b"]  # no value: never passes
    with pytest.raises(UsageError, match="no column 'kind'.*type"):
        prompts.apply_filter(df, "kind=VM")
    with pytest.raises(UsageError, match="COLUMN=VALUE"):
        prompts.apply_filter(df, "type")
    with pytest.raises(UsageError, match="needs a number"):
        prompts.apply_filter(df, "max_sscd>=high")
    with pytest.raises(InputError, match="passes the filter"):
        prompts.load_list(path, "wen-memorized", filters=["type=XX"])
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(InputError, match="no prompts"):
        prompts.read_prompts(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"caption": "a"}\n{"url": "b"}\n')
    with pytest.raises(InputError, match="entry 1 has no prompt/caption/text key"):
        prompts.read_prompts(tmp_path / "bad.jsonl")
    assert list(prompts.load_list(path, "wen-memorized", limit=2)[0]["prompt"]) == ["a", "b"]


def test_public_list_download_cache_and_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMDETECT_CACHE", str(tmp_path / "cache"))
    data = b"".join(json.dumps({"caption": p}).encode() + b"\n" for p in MEMORIZED)
    fake = prompts.PublicList("fake", "https://example.invalid/x/list.jsonl", prompts.git_blob_id(data), "a test list")
    monkeypatch.setitem(prompts.PUBLIC_LISTS, "fake", fake)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="not cached .* offline mode is set .* pass --memorized FILE") as e:
        prompts.fetch_public_list("fake", option="--memorized")
    assert "\n" not in str(e.value)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    served = []

    class Response:
        def __init__(self, body):
            self.body = body

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self, size=-1):
            out, self.body = self.body, b""
            return out

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: served.append(url) or Response(data))
    path = prompts.fetch_public_list("fake")
    assert served == [fake.url] and path.read_bytes() == data
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # cached now: offline is fine, nothing downloaded
    assert prompts.fetch_public_list("fake") == path and len(served) == 1
    assert list(prompts.load_list(None, "fake")[0]["prompt"]) == MEMORIZED
    monkeypatch.delenv("HF_HUB_OFFLINE")
    path.write_bytes(data + b"tampered\n")  # a cached copy that no longer matches is fetched again
    assert prompts.fetch_public_list("fake").read_bytes() == data and len(served) == 2
    path.unlink()
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Response(data + b"x"))
    with pytest.raises(InputError, match="not the pinned file"):
        prompts.fetch_public_list("fake")
    assert not path.exists()


def test_bench_laion_default_lists_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMDETECT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "n.txt").write_text("\n".join(NORMAL))
    res = invoke("bench", "laion", "--normal", tmp_path / "n.txt", "--output", tmp_path / "out")
    assert res.exit_code == 2
    assert "Wen et al.'s 500 memorized SD v1 prompts" in res.output and "--memorized FILE" in res.output
    res = invoke("bench", "laion", "--memorized", tmp_path / "n.txt", "--output", tmp_path / "out")
    assert res.exit_code == 2 and "unmemorized_laion_prompts.csv" in res.output and "--normal FILE" in res.output


def test_bench_laion_filters_read_the_labelled_copy_of_the_default_list(tmp_path, monkeypatch):
    from memdetect.bench import paper

    asked = []

    def record(source, default, **kwargs):
        asked.append((default, tuple(kwargs.get("filters", ()))))
        raise InputError("stop here")

    monkeypatch.setattr(paper, "load_list", record)
    invoke("bench", "laion", "--output", tmp_path / "o")
    invoke("bench", "laion", "--memorized-filter", "type=VM", "--memorized-filter", "max_sscd>=0.5",
           "--output", tmp_path / "o")
    assert asked == [("wen-memorized", ()), ("nemo-memorized", ("type=VM", "max_sscd>=0.5"))]


@needs_shared("data", "prompts")
def test_pinned_public_lists_match_the_shared_copies(tmp_path, monkeypatch):
    """The pinned blob ids are those of the copies in ../shared; placed in the cache, they serve the defaults."""
    folders = {"wen-memorized": "YuxinWenRick__diffusion_memorization",
               "nemo-memorized": "ml-research__localizing_memorization_in_diffusion_models",
               "nemo-unmemorized": "ml-research__localizing_memorization_in_diffusion_models"}
    monkeypatch.setenv("MEMDETECT_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, pub in prompts.PUBLIC_LISTS.items():
        copy = SHARED / "data" / "prompts" / folders[name] / pub.filename
        assert prompts.git_blob_id(copy.read_bytes()) == pub.blob, name
        dest = prompts.prompt_cache_dir() / f"{pub.blob[:12]}-{pub.filename}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(copy, dest)
    wen, _ = prompts.load_list(None, prompts.DEFAULT_MEMORIZED)
    vm, _ = prompts.load_list(None, prompts.DEFAULT_MEMORIZED_LABELLED, filters=["type=VM"])
    normal, _ = prompts.load_list(None, prompts.DEFAULT_NORMAL, limit=10)
    assert len(wen) == 500 and len(vm) == 112 and len(normal) == 10
    assert set(vm["prompt"]) <= set(wen["prompt"])  # NeMo's copy holds the same 500 prompts


# -- samplers ------------------------------------------------------------------------------------------------------


class GaussianEDM(Adapter):
    """A pixel 'model' of data ~ N(0, s^2 I): its ideal denoiser D(x; sigma) = x s^2 / (s^2 + sigma^2) makes the
    probability-flow ODE solvable, x(sigma) = x_T sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_max^2)."""

    family = "edm"
    S = 0.5

    class Net(nn.Module):
        sigma_min, sigma_max = 0.002, 80.0

        def forward(self, x, sigma):
            s2 = GaussianEDM.S ** 2
            return x * s2 / (s2 + sigma.reshape(-1, 1, 1, 1) ** 2)

    def __init__(self):
        from diffusers import DDPMScheduler

        super().__init__(self.Net(), DDPMScheduler(), resolution=4, device=torch.device("cpu"), dtype=torch.float32)

    @classmethod
    def load(cls, source, **kw):  # pragma: no cover - built in memory
        raise TypeError("built in memory")

    def encode(self, images):
        return images.float() / 127.5 - 1

    def predict_noise(self, x_t, t, cond=None):  # pragma: no cover - not used
        raise NotImplementedError

    def default_layer(self):
        return ""


def test_edm_heun_sampler_solves_the_gaussian_ode():
    adapter = GaussianEDM()
    s = GaussianEDM.S
    errors = {}
    for steps in (36, 72, 144):
        x0, x_T = edm.sample_heun(adapter, [3, 4], steps=steps)
        assert x_T.std() > 50  # starts at sigma_max = 80
        expected = x_T * s / math.sqrt(s ** 2 + 80.0 ** 2)  # the ODE's exact end point
        errors[steps] = float((x0 - expected).abs().max() / expected.abs().max())
    assert errors[144] < 1e-3
    assert 3.5 < errors[36] / errors[72] < 4.5  # Heun is second order: twice the steps, a quarter of the error
    with pytest.raises(ValueError, match="at least 2"):
        edm.sample_heun(adapter, [1], steps=1)


@pytest.mark.parametrize("family", ["sd", "ddpm"])
def test_generation_is_seeded_per_image(family, tiny_sd, tiny_ddpm):
    det = Detector.from_pretrained(family, str({"sd": tiny_sd, "ddpm": tiny_ddpm}[family]), device="cpu",
                                   dtype="float32", prune=False)  # generation runs the whole model
    a = det.adapter
    cond = None
    if family == "sd":
        cond = a.encode_condition(["a cat", "a dog"])
    both = gen.generate(a, [11, 12], cond=cond, steps=4, guidance=7.5)
    alone = gen.generate(a, [12], cond=None if cond is None else cond[1:], steps=4, guidance=7.5)
    assert both.images.shape == (2, 3, a.resolution, a.resolution) and both.images.dtype == torch.uint8
    # the same sample alone or second in a batch: equal up to float rounding of batched kernels
    assert (both.images[1].int() - alone.images[0].int()).abs().max() <= 1
    assert (both.images[0].int() - both.images[1].int()).abs().max() > 10  # different seeds, different images
    if family == "sd":
        assert both.sample.noise_difference.shape == (4, 2) and torch.isfinite(both.sample.noise_difference).all()
    else:
        assert both.sample.noise_difference is None  # unconditional: no Wen score


# -- bench laion ---------------------------------------------------------------------------------------------------


def _lists(tmp_path):
    (tmp_path / "m.txt").write_text("\n".join(MEMORIZED))
    (tmp_path / "n.csv").write_text("prompt,source\n" + "".join(f'"{p}",coco\n' for p in NORMAL))
    return tmp_path / "m.txt", tmp_path / "n.csv"


def _check_intervals(results: pd.DataFrame) -> None:
    assert (results["auroc_lo"] <= results["auroc"] + 1e-12).all() and (results["auroc"] <= results["auroc_hi"] + 1e-12).all()
    assert (results["tpr_lo"] <= results["tpr_at_1pct_fpr"] + 1e-12).all()
    assert (results["tpr_at_1pct_fpr"] <= results["tpr_hi"] + 1e-12).all()
    assert results[["auroc_lo", "auroc_hi", "tpr_lo", "tpr_hi"]].apply(lambda c: c.between(0, 1)).all().all()


def nemo_statistics_file(path, widths, seed=0):
    """A statistics file in NeMo's published format: torch.save((means, stds)), one float32 tensor per layer."""
    g = torch.Generator().manual_seed(seed)
    means = [torch.rand(w, generator=g) for w in widths]
    stds = [torch.rand(w, generator=g) * 0.5 + 0.05 for w in widths]
    torch.save((means, stds), path)
    return torch.cat(means), torch.cat(stds)


def test_bench_laion_end_to_end_and_resume(tiny_sd, tmp_path, monkeypatch):
    from memdetect.bench import baselines, nemo_stats, paper

    m, n = _lists(tmp_path)
    out = tmp_path / "out"
    base = ["bench", "laion", "--model", "sd14", "--model-path", tiny_sd, "--memorized", m, "--normal", n,
            "--generations", "2", "--steps", "3", "--device", "cpu", "--output", out, "--bootstrap", "100"]
    # the tiny model's value layers are not SD 1.4's: no download is tried, NeMo falls back to leave-one-out
    monkeypatch.setattr(nemo_stats, "fetch_published", lambda **k: pytest.fail("published statistics fetched"))
    res = invoke(*base, "--limit", "2")  # 2 normal prompts: too few for leave-one-out NeMo statistics
    assert res.exit_code == 2 and "at least 3 reference prompts" in res.output
    res = invoke(*base, "--limit", "3")
    assert res.exit_code == 0, res.output
    assert "ours_std minus each baseline" in res.output and "leave-one-out" in res.output
    results = pd.read_csv(out / "results.csv")
    assert list(results.columns) == PAPER_COLUMNS
    assert list(results["method"]) == LAION_METHODS * 2
    assert list(results["unit"]) == ["image"] * len(LAION_METHODS) + ["prompt"] * len(LAION_METHODS)
    assert set(LAION_METHODS) == {*OURS, "wen_first_step", "wen_all_steps", "nemo", "ross_flipd", "ross_flipd_cond",
                                  "carlini"}
    img = results[results["unit"] == "image"]
    assert (img["n_memorized"] == 6).all() and (img["n_generalized"] == 6).all()  # 3 prompts x 2 images each
    prm = results[results["unit"] == "prompt"]
    assert (prm["n_memorized"] == 3).all() and (prm["n_generalized"] == 3).all()
    assert results["auroc"].between(0, 1).all() and (results["seconds_per_sample"] > 0).all()
    _check_intervals(results)
    by = results[results["unit"] == "image"].set_index("method")
    assert by.loc["wen_all_steps", "timing"].startswith("the generation itself")
    assert by.loc["carlini", "timing"].startswith("the generation of all 2 generations")
    assert "leave-one-out" in by.loc["nemo", "note"] and "prompt-free" in by.loc["ross_flipd", "note"]
    diffs = pd.read_csv(out / "differences.csv")
    assert list(diffs.columns) == DIFFERENCE_COLUMNS
    assert len(diffs) == len(OURS) * (len(LAION_METHODS) - len(OURS)) * 2
    assert (diffs["ahead"] == (diffs["d_auroc_lo"] > 0)).all()
    images = pd.read_csv(out / "scores.csv")
    assert len(images) == 12 and all((out / p).is_file() for p in images["image"])
    assert list(images["label"]) == [1] * 6 + [0] * 6
    assert np.isfinite(images[LAION_METHODS].to_numpy()).all()  # every method, a finite score per image
    prompts_df = pd.read_csv(out / "prompts.csv")
    assert list(prompts_df["prompt"]) == MEMORIZED[:3] + NORMAL[:3] and list(prompts_df["label"]) == [1, 1, 1, 0, 0, 0]
    # the headline is per image: recomputed from scores.csv, not from the prompt means
    from memdetect.core.metrics import roc_metrics
    for meth in ("ours_std", "ross_flipd", "carlini"):
        assert by.loc[meth, "auroc"] == pytest.approx(roc_metrics(images["label"], images[meth])["auroc"])
        assert prm.set_index("method").loc[meth, "auroc"] == pytest.approx(
            roc_metrics(prompts_df["label"], prompts_df[meth])["auroc"])
    # NeMo: statistics of the normal prompts; a normal prompt is scored against the other two only
    a = Detector.from_pretrained("sd", str(tiny_sd), device="cpu", dtype="float32", prune=False).adapter
    values = a.cross_attention_values().values()
    acts = {p: baselines.nemo_activations(values, a.encode_condition([p]))[0] for p in MEMORIZED[:3] + NORMAL[:3]}

    def max_z(p, reference):
        ref = torch.stack([acts[q] for q in reference])
        return float(((acts[p] - ref.mean(0)).abs() / ref.std(0)).max())

    expected = [max_z(p, NORMAL[:3]) for p in MEMORIZED[:3]] + [
        max_z(p, [q for q in NORMAL[:3] if q != p]) for p in NORMAL[:3]]
    np.testing.assert_allclose(prompts_df["nemo"], expected, rtol=1e-3)
    np.testing.assert_allclose(images["nemo"], np.repeat(expected, 2), rtol=1e-3)  # each image carries its prompt's
    # prompt score = mean of its generations' scores
    np.testing.assert_allclose(images.groupby("key", sort=False)["ross_flipd"].mean(), prompts_df["ross_flipd"])
    # Ross prompt-free = FLIPD with the empty prompt; the conditional variant differs
    from memdetect.store.io import image_seed
    first = torch.from_numpy(np.stack([paper._read_png(out / p) for p in images["image"][:2]]))
    seeds = [image_seed(x, 0) for x in first.numpy()]
    free = baselines.flipd(a, first, 50, seeds).numpy()
    np.testing.assert_allclose(images["ross_flipd"][:2], free, rtol=1e-4)
    assert not np.allclose(images["ross_flipd_cond"], images["ross_flipd"])
    # ours is the scan path: the image alone, no prompt
    scanned = Detector.from_pretrained("sd", str(tiny_sd), device="cpu", dtype="float32").scan([out / "images"])
    by_name = dict(zip(scanned["path"].map(lambda p: p.rsplit("/", 1)[-1]), scanned["std"]))
    np.testing.assert_allclose([by_name[p.rsplit("/", 1)[-1]] for p in images["image"]], images["ours_std"],
                               rtol=1e-5)
    assert "leave-one-out" in json.loads((out / "settings.json").read_text())["nemo_reference"]
    assert (out / "roc.png").stat().st_size > 0

    # a rerun skips every finished prompt: nothing is generated again
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    monkeypatch.setattr(paper, "generate", lambda *a, **k: pytest.fail("a finished prompt was regenerated"))
    res = invoke(*base, "--limit", "3")
    assert res.exit_code == 0, res.output
    assert "generated 0, reused 6" in res.output
    assert {p: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == mtimes
    pd.testing.assert_frame_equal(pd.read_csv(out / "scores.csv"), images, rtol=1e-4)
    # a larger --limit generates only the new prompts
    calls = []
    monkeypatch.setattr(paper, "generate", lambda *a, **k: calls.append(1) or gen.generate(*a, **k))
    res = invoke(*base, "--limit", "4")
    assert res.exit_code == 0, res.output
    assert len(calls) == 2 and "generated 2, reused 6" in res.output
    assert len(pd.read_csv(out / "prompts.csv")) == 8
    # other settings in the same folder are refused, not mixed
    res = invoke(*base[:-6], "--steps", "4", "--device", "cpu", "--output", out)
    assert res.exit_code == 2 and "steps=3" in res.output


def test_bench_laion_nemo_statistics_file_and_carlini_generations(tiny_sd, tmp_path, monkeypatch):
    """--nemo-stats reads a file in NeMo's published format (through the safe loader) and scores every prompt
    against it; Carlini's extra generations are made, kept apart and paid for."""
    from memdetect.bench import baselines, nemo_stats, paper

    m, n = _lists(tmp_path)
    a = Detector.from_pretrained("sd", str(tiny_sd), device="cpu", dtype="float32", prune=False).adapter
    values = a.cross_attention_values()
    widths = nemo_stats.layer_widths(values)
    mean, std = nemo_statistics_file(tmp_path / "stats.pt", widths)
    nemo_statistics_file(tmp_path / "wrong.pt", [*widths[:-1], widths[-1] + 1])
    out = tmp_path / "out"
    base = ["bench", "laion", "--model", "sd14", "--model-path", tiny_sd, "--memorized", m, "--normal", n,
            "--limit", "2", "--generations", "2", "--steps", "2", "--device", "cpu", "--output", out, "--bootstrap", "100"]
    res = invoke(*base, "--nemo-stats", tmp_path / "wrong.pt")
    assert res.exit_code == 2 and "widths" in res.output and str(list(widths)) in res.output, res.output
    timed = {}
    clock = paper.Clock.__call__

    def record(self, fn):
        out_, sec = clock(self, fn)
        if getattr(fn, "__name__", "") == "extra":
            timed["extra"] = sec
        return out_, sec

    monkeypatch.setattr(paper.Clock, "__call__", record)
    res = invoke(*base, "--nemo-stats", tmp_path / "stats.pt", "--carlini-generations", "5", "--carlini-neighbours",
                 "3", "--flipd-timestep", "100")
    assert res.exit_code == 0, res.output
    assert "statistics file stats.pt" in res.output and "FLIPD 1 probe(s) at t=100" in res.output
    # --flipd-timestep: Ross at t=100, prompt-free; the detector stays at its own t=50
    from memdetect.store.io import image_seed
    images = pd.read_csv(out / "scores.csv")
    first = torch.from_numpy(np.stack([paper._read_png(out / p) for p in images["image"][:2]]))
    seeds = [image_seed(x, 0) for x in first.numpy()]
    np.testing.assert_allclose(images["ross_flipd"][:2], baselines.flipd(a, first, 100, seeds).numpy(), rtol=1e-4)
    assert not np.allclose(images["ross_flipd"][:2], baselines.flipd(a, first, 50, seeds).numpy(), rtol=1e-4)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["flipd_timestep"] == 100 and settings["timestep"] == 50
    scores = pd.read_csv(out / "prompts.csv")
    expected = [float(((baselines.nemo_activations(values.values(), a.encode_condition([p]))[0] - mean).abs()
                       / std).max()) for p in MEMORIZED[:2] + NORMAL[:2]]
    np.testing.assert_allclose(scores["nemo"], expected, rtol=1e-4)  # no leave-one-out: one fixed reference
    assert len(list((out / "images" / "carlini").glob("*.png"))) == 4 * 3  # 5 - 2 extra generations per prompt
    assert len(list((out / "images").glob("*.png"))) == 8  # the scored ones
    results = pd.read_csv(out / "results.csv").set_index(["unit", "method"])
    assert "3-th nearest of 5 generations" in results.loc[("image", "carlini"), "note"]
    assert timed["extra"] > 0
    recs = [json.loads(x) for x in (out / "records" / "records-0.jsonl").read_text().splitlines()]
    for r in recs:  # carlini's time = all its generations + its distances
        assert r["seconds"]["carlini"] > r["carlini_generation_seconds"] > r["generation_seconds"]
    assert "nemo_reference" in json.loads((out / "settings.json").read_text())
    res = invoke(*base, "--nemo-stats", tmp_path / "stats.pt", "--nemo-reference", n)
    assert res.exit_code == 2 and "alternatives" in res.output


def test_published_nemo_statistics_download_is_checked(tmp_path, monkeypatch):
    """The published file: downloaded once from the pinned URL, SHA-256 and size checked, cached, read offline."""
    import hashlib

    from memdetect.core import hub
    from memdetect.bench import nemo_stats

    monkeypatch.setenv("MEMDETECT_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "published.pt"
    nemo_statistics_file(src, nemo_stats.SD1_WIDTHS)
    data = src.read_bytes()
    pinned = nemo_stats.PublishedStatistics(nemo_stats.PUBLISHED.url, hashlib.sha256(data).hexdigest(), len(data),
                                            "test statistics")
    monkeypatch.setattr(nemo_stats, "PUBLISHED", pinned)
    served = []

    def fake_download(url, dest, timeout=60.0):
        served.append(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        return hashlib.sha256(data).hexdigest(), len(data)

    monkeypatch.setattr(hub, "download", fake_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="offline mode is set .* --nemo-stats FILE"):
        nemo_stats.fetch_published()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    path = nemo_stats.fetch_published()
    assert served == [pinned.url] and path.read_bytes() == data
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert nemo_stats.fetch_published() == path and len(served) == 1  # cached: read offline
    monkeypatch.delenv("HF_HUB_OFFLINE")
    path.write_bytes(data[:-1] + b"x")  # a damaged cache is fetched again
    assert nemo_stats.fetch_published().read_bytes() == data and len(served) == 2
    path.unlink()
    monkeypatch.setattr(nemo_stats, "PUBLISHED", nemo_stats.PublishedStatistics(pinned.url, "0" * 64, len(data), "x"))
    with pytest.raises(InputError, match="not the pinned file"):
        nemo_stats.fetch_published()
    assert not path.exists()
    assert nemo_stats.PUBLISHED.url.startswith("https://raw.githubusercontent.com/ml-research/")
    # read through the safe loader, in layer order, checked against the model's widths
    layers = {f"l{i}": nn.Linear(4, w) for i, w in enumerate(nemo_stats.SD1_WIDTHS)}
    moments = nemo_stats.read_statistics(src, layers)
    assert moments.mean.shape == (sum(nemo_stats.SD1_WIDTHS),)
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo unsafe",))

    torch.save((Evil(), []), tmp_path / "evil.pt")
    with pytest.raises(InputError, match="refuses"):
        nemo_stats.read_statistics(tmp_path / "evil.pt", layers)


def test_published_nemo_statistics_are_used_for_sd14_shaped_models(monkeypatch, tmp_path):
    """The default for the sd14 preset with SD 1.4's value-layer widths: the published file; any other preset, or
    other widths, or no file to be had: leave-one-out, and the reference says which."""
    from memdetect.bench import nemo_stats, paper

    src = tmp_path / "published.pt"
    nemo_statistics_file(src, nemo_stats.SD1_WIDTHS)

    class FakeAdapter:
        def __init__(self, widths):
            self.layers = {f"l{i}": nn.Linear(2, w) for i, w in enumerate(widths)}

        def cross_attention_values(self):
            return self.layers

    monkeypatch.setattr(nemo_stats, "fetch_published", lambda **k: src)
    normal = ["a", "b", "c"]
    ref = paper.nemo_reference_for(FakeAdapter(nemo_stats.SD1_WIDTHS), preset="sd14", nemo_stats=None,
                                   reference_file=None, normal=normal)
    assert ref.moments is not None and ref.description.startswith("NeMo's published statistics")
    for preset, widths in (("sd15", nemo_stats.SD1_WIDTHS), ("sd14", (8, 8, 16))):
        ref = paper.nemo_reference_for(FakeAdapter(widths), preset=preset, nemo_stats=None, reference_file=None,
                                       normal=normal)
        assert ref.moments is None and ref.prompts == tuple(normal) and "leave-one-out" in ref.description

    def unavailable(**k):
        raise InputError("not cached and offline")

    monkeypatch.setattr(nemo_stats, "fetch_published", unavailable)
    ref = paper.nemo_reference_for(FakeAdapter(nemo_stats.SD1_WIDTHS), preset="sd14", nemo_stats=None,
                                   reference_file=None, normal=normal)
    assert ref.moments is None and "leave-one-out" in ref.description


def test_bench_laion_rejects_a_class_model(tiny_dit, tmp_path):
    m, n = _lists(tmp_path)
    res = invoke("bench", "laion", "--model", "dit", "--model-path", tiny_dit, "--memorized", m, "--normal", n,
                 "--output", tmp_path / "out", "--device", "cpu")
    assert res.exit_code == 2 and "needs a model that is text-conditional (prompts); " in res.output, res.output


# -- bench imagenet / cifar10 --------------------------------------------------------------------------------------


def _two_runs(args: list, out, train, copies: list[str], monkeypatch) -> pd.DataFrame:
    """Run once against unrelated training images (nothing memorized: an error, but the samples are kept), copy
    some generations into the training folder, rerun: those are memorized now, and nothing is regenerated."""
    from memdetect.bench import paper

    res = invoke(*args)
    assert res.exit_code == 2 and "found 0 memorized" in res.output, res.output
    assert "generations stay in" in res.output and "a rerun into the same --output reuses them" in res.output
    assert len(list((out / "images").glob("*.png"))) == 6  # kept for the rerun
    for key in copies:
        shutil.copy(out / "images" / f"{key}.png", train / f"copy-{key}.png")
    monkeypatch.setattr(paper, "generate", lambda *a, **k: pytest.fail("a finished sample was regenerated"))
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    return pd.read_csv(out / "scores.csv")


@pytest.mark.parametrize("bench", ["imagenet", "cifar10-ddpm", "cifar10-edm"])
def test_bench_samples_end_to_end(bench, tiny_dit, tiny_ddpm, tmp_path, monkeypatch):
    if bench == "cifar10-edm":
        from memdetect.models import edm

        torch.manual_seed(0)
        net = edm.build_network("VPPrecond", dict(img_resolution=16, img_channels=3, model_channels=8,
                                                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[]))
        model, path = "edm", edm.save_safetensors(net, tmp_path / "edm.safetensors")
    else:
        model, path = {"imagenet": ("dit", tiny_dit), "cifar10-ddpm": ("ddpm-cifar10", tiny_ddpm)}[bench]
    train = tmp_path / "train"
    write_images(train, 4, size=(16, 16))
    (train / "aaa-broken.png").write_bytes(b"not an image")  # skipped, first in order: indices must still map
    out = tmp_path / "out"
    args = ["bench", bench.split("-")[0], "--model", model, "--model-path", path, "--train-dir", train,
            "--num-samples", "6", "--batch-size", "3", "--steps", "3", "--device", "cpu", "--output", out,
            "--min-memorized", "2"]
    if bench == "imagenet":
        args += ["--classes", "0-2,7"]
    scores = _two_runs(args, out, train, ["sample-000001", "sample-000004"], monkeypatch)
    conditional = bench == "imagenet"
    methods = [*OURS, *(["wen_first_step", "wen_all_steps"] if conditional else []), "ross_flipd",
               *(["ross_flipd_cond"] if conditional else []), "carlini"]
    assert len(scores) == 6 and np.isfinite(scores[methods].to_numpy()).all()
    assert list(scores.loc[scores["label"] == "memorized", "key"]) == ["sample-000001", "sample-000004"]
    np.testing.assert_allclose(scores.loc[[1, 4], "similarity"], 1.0, atol=1e-5)
    assert [p.rsplit("/", 1)[-1] for p in scores.loc[[1, 4], "nearest_train"]] == [
        "copy-sample-000001.png", "copy-sample-000004.png"]
    if conditional:
        assert list(scores["class"]) == [0, 1, 2, 7, 0, 1]  # --classes cycled
    results = pd.read_csv(out / "results.csv")
    assert list(results.columns) == PAPER_COLUMNS and list(results["method"]) == methods
    assert (results["unit"] == "image").all()
    assert (results["n_memorized"] == 2).all()
    assert (results["n_generalized"] == int((scores["label"] == "generalized").sum())).all()
    _check_intervals(results)
    carlini = results.set_index("method").loc["carlini"]
    assert carlini["timing"].startswith("the generation of the pool")
    recs = [json.loads(x) for p in (out / "records").glob("*.jsonl") for x in p.read_text().splitlines()]
    generation = sum(r["generation_seconds"] for r in recs) / len(recs)
    assert carlini["seconds_per_sample"] > generation  # its pool's generation is paid for
    assert len(pd.read_csv(out / "differences.csv")) == len(OURS) * (len(methods) - len(OURS))


def test_bench_imagenet_public_checkpoint_warns_and_stops_on_too_few_memorized(tiny_dit, tmp_path, monkeypatch):
    """The dit preset's public checkpoint (a tiny stand-in here): a warning before generating, then exit 2 with a
    sentence when fewer than --min-memorized samples are memorized; the generations stay for a rerun."""
    from memdetect.bench import paper
    from memdetect.models import PRESETS

    # the real presets, nothing loaded: public checkpoints warn, --model-path and local models do not
    assert "facebook/DiT-XL-2-256 is a public checkpoint" in paper.public_checkpoint_warning("imagenet", "dit", None)
    assert "train_ground_truth.py edm" in paper.public_checkpoint_warning("cifar10", "edm-cifar10", None)
    assert paper.public_checkpoint_warning("imagenet", "dit", str(tiny_dit)) is None
    assert paper.public_checkpoint_warning("cifar10", "demo", None) is None  # shipped inside the package
    monkeypatch.setitem(PRESETS, "dit", replace(PRESETS["dit"], source=str(tiny_dit)))
    monkeypatch.setattr(Path, "exists", lambda self: False if str(self) == str(tiny_dit) else _exists(self))
    train = tmp_path / "train"
    write_images(train, 3, size=(16, 16))
    out = tmp_path / "out"
    generated = []
    monkeypatch.setattr(paper, "generate", lambda *a, **k: generated.append(1) or gen.generate(*a, **k))
    args = ["bench", "imagenet", "--model", "dit", "--train-dir", train, "--num-samples", "4", "--batch-size", "4",
            "--steps", "2", "--classes", "0-1", "--device", "cpu", "--output", out, "--min-memorized", "2"]
    res = invoke(*args)
    assert res.exit_code == 2, res.output
    assert "trained on the full imagenet training set" in res.output and "rarely memorize" in res.output
    assert res.output.index("rarely memorize") < res.output.index("found 0 memorized")  # warned before
    assert "--model-path" in res.output and "train_ground_truth.py dit" in res.output
    assert len(generated) == 1 and len(list((out / "images").glob("*.png"))) == 4
    shutil.copy(out / "images" / "sample-000002.png", train / "copy.png")  # one memorized: still too few
    res = invoke(*args)
    assert res.exit_code == 2 and "found 1 memorized" in res.output and "at least 2 memorized" in res.output
    assert len(generated) == 1  # nothing regenerated


_exists = Path.exists


def test_bench_cifar10_rejects_a_latent_model_and_classes(tiny_dit, tmp_path):
    train = tmp_path / "train"
    write_images(train, 2, size=(16, 16))
    res = invoke("bench", "cifar10", "--model", "dit", "--model-path", tiny_dit, "--train-dir", train,
                 "--output", tmp_path / "o", "--device", "cpu")
    assert res.exit_code == 2 and "needs a model that is unconditional; " in res.output and "class-conditional" in res.output, res.output
    res = invoke("bench", "imagenet", "--model-path", tiny_dit, "--train-dir", train, "--classes", "1,x",
                 "--output", tmp_path / "o", "--device", "cpu")
    assert res.exit_code == 2 and "--classes takes" in res.output


def test_processes_split_the_work_and_the_main_one_writes_the_tables(tiny_ddpm, tmp_path, monkeypatch):
    """Two processes (threads here, with a barrier for accelerate's wait_for_everyone) share the batches through
    their own records files; only the main process writes the tables, which cover every sample."""
    import threading

    from memdetect.bench import paper

    barrier = threading.Barrier(2, timeout=120)
    monkeypatch.setattr(paper, "processes", lambda: paper.Processes(
        rank=int(threading.current_thread().name[-1]), world=2, wait=barrier.wait))
    # diffusers loads through accelerate's init_empty_weights, which patches nn.Module globally: two threads loading
    # at once can leave the patch in place (real processes do not share it), so the stand-ins load one at a time
    lock, load = threading.Lock(), paper._load

    def load_one_at_a_time(*args, **kwargs):
        with lock:
            return load(*args, **kwargs)

    monkeypatch.setattr(paper, "_load", load_one_at_a_time)
    train = tmp_path / "train"
    write_images(train, 2, size=(16, 16))
    out = tmp_path / "out"
    results, errors = {}, []

    def run(rank):
        try:
            results[rank] = paper.run_samples("cifar10", out, model="ddpm-cifar10", model_path=str(tiny_ddpm),
                                              train_dir=train, num_samples=8, batch_size=2, steps=2, device="cpu")
        except Exception as e:
            errors.append((rank, e))
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,), name=f"rank{r}") for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # nothing is memorized by random training images: the main process says so once the tables are due
    assert len(errors) == 1 and errors[0][0] == 0 and "0 memorized and 8 generalized" in str(errors[0][1])
    shares = {r: [json.loads(x)["key"] for x in (out / "records" / f"records-{r}.jsonl").read_text().splitlines()]
              for r in (0, 1)}
    assert shares == {0: ["sample-000000", "sample-000001", "sample-000004", "sample-000005"],
                      1: ["sample-000002", "sample-000003", "sample-000006", "sample-000007"]}  # batches 0, 2 | 1, 3
    assert results[1]["generated"] == 4 and "results" not in results[1]  # the other process writes no tables
    assert list(pd.read_csv(out / "scores.csv")["key"]) == [f"sample-{i:06d}" for i in range(8)]
