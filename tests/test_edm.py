"""EDM: our SongUNet / preconditioners, the restricted NVlabs-pickle reader, checksummed downloads, and the CLI.

Most tests use a reduced network (model_channels 16); one builds the real 128-channel CIFAR-10 configuration.
The NVlabs-format pickles are written here from the format's documented structure (``torch_utils.persistence``:
each network object pickles as ``_reconstruct_persistent_obj(meta)``), with a stand-in persistence module that
exists only while the pickle is written, and a ``module_src`` that would create a marker file if it were executed.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import math
import os
import pickle
import subprocess
import sys
import types
import warnings
from collections import OrderedDict
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from memdetect import Detector
from memdetect.models.edm import safe_pickle
from memdetect.core.capture import Trace
from memdetect.cli import app
from memdetect.errors import ModelNotFoundError, UnsafeCheckpointError, UnsupportedModelError, UsageError
from memdetect.models import PRESETS, resolve_model
from memdetect.models import edm
from memdetect.models.edm import EDMAdapter, build_network, ddpm_sigma, network_from_pickle

SMALL = dict(img_resolution=32, img_channels=3, model_channels=16, channel_mult=[2, 2, 2], num_blocks=4,
             attn_resolutions=[16], dropout=0.13, embedding_type="positional", channel_mult_noise=1,
             encoder_type="standard", decoder_type="standard", resample_filter=[1, 1], augment_dim=9,
             model_type="SongUNet")
ENC, DEC = "model.enc.8x8_block3.norm0", "model.dec.8x8_block3.norm0"
runner = CliRunner()


def small_net(class_name="EDMPrecond", seed=0, **over):
    torch.manual_seed(seed)
    return build_network(class_name, {**SMALL, **over}).eval().requires_grad_(False)


def inputs(b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 32, 32, generator=g), torch.rand(b, generator=g) * 2 + 0.05


# -- writing NVlabs-format pickles -----------------------------------------------------------------------------------

def _reconstruct_persistent_obj(meta):  # the name NVlabs pickles call; only referenced while writing test pickles
    raise AssertionError("test pickles are read by memdetect's restricted unpickler only")


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"


@contextlib.contextmanager
def fake_persistence():
    """A ``torch_utils.persistence`` module present only while a pickle is written, so pickle can name it."""
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    with mock.patch.dict(sys.modules, {"torch_utils": pkg, "torch_utils.persistence": mod}):
        yield


class Persistent:
    """Pickles as NVlabs' persistent objects do: ``_reconstruct_persistent_obj(meta)``."""

    def __init__(self, meta):
        self.meta = meta

    def __reduce__(self):
        return (_reconstruct_persistent_obj, (self.meta,))


def persistent_tree(module: torch.nn.Module, src: str, init_kwargs=None, tensor=None):
    """A torch module as NVlabs pickles it: persistent objects holding the module ``__dict__``; ModuleDicts stay
    real torch ModuleDicts (pickled natively) whose ``_modules`` hold persistent objects.

    ``tensor(t)``, when given, replaces each parameter and buffer by what it returns (hostile checkpoints use it to
    pickle other views of a meta network's shapes)."""
    children = OrderedDict((k, None if c is None else persistent_tree(c, src, tensor=tensor))
                           for k, c in module._modules.items())
    if isinstance(module, torch.nn.ModuleDict):
        md = torch.nn.ModuleDict()
        md._modules = children
        return md
    params = OrderedDict((k, None if p is None else tensor(p) if tensor else
                          torch.nn.Parameter(p.detach().clone(), requires_grad=False))
                         for k, p in module._parameters.items())
    buffers = OrderedDict((k, None if b is None else tensor(b) if tensor else b) for k, b in module._buffers.items())
    if type(module).__name__ == "Conv2d":
        buffers.setdefault("resample_filter", None)  # NVlabs registers a None buffer when not resampling
    state = {"training": False, "_parameters": params, "_buffers": buffers, "_non_persistent_buffers_set": set(),
             "_backward_hooks": OrderedDict(), "_forward_hooks": OrderedDict(), "_forward_pre_hooks": OrderedDict(),
             "_state_dict_hooks": OrderedDict(), "_load_state_dict_pre_hooks": OrderedDict(),
             "_modules": children, "_init_args": (), "_init_kwargs": dict(init_kwargs or {})}
    if type(module).__name__ == "UNetBlock":
        state["skip_scale"] = np.float64(np.sqrt(0.5))  # NVlabs records numpy scalars
    meta = dict(type="class", version=6, module_src=src, class_name=type(module).__name__, state=state)
    return Persistent(meta)


def write_nvlabs_pickle(path: Path, net, marker: Path, tensor=None, **extra) -> Path:
    src = f"open({str(marker)!r}, 'w').write('module_src was executed')\n"
    kwargs = dict(net.init_kwargs, dropout=np.float64(net.init_kwargs.get("dropout", 0.0)))
    data = dict(ema=persistent_tree(net, src, kwargs, tensor=tensor),
                loss_fn=Persistent(dict(type="class", version=6, module_src=src, class_name="EDMLoss",
                                        state={"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5, "_init_args": (),
                                               "_init_kwargs": {}})),
                augment_pipe=Persistent(dict(type="class", version=6, module_src=src, class_name="AugmentPipe",
                                             state={"p": 0.12, "xflip": 1e8, "_init_args": (),
                                                    "_init_kwargs": {"p": 0.12}})),
                dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="cifar10-32x32.zip",
                                    use_labels=False, xflip=False, cache=True, resolution=32, max_size=50000),
                **extra)
    with fake_persistence(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation
        path.write_bytes(pickle.dumps(data))
    assert "torch_utils" not in sys.modules
    return path


class Evil:
    """Calls ``fn(*args)`` when unpickled by a plain ``pickle.load``."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


class EvilStorage:
    """A tensor storage whose nested blob is itself a malicious pickle."""

    def __init__(self, blob):
        self.blob = blob

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.blob,))


# -- network ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("precond", ["EDMPrecond", "VPPrecond", "VEPrecond"])
def test_forward_shapes_and_layers(precond):
    net = small_net(precond, label_dim=10 if precond == "VPPrecond" else 0)
    x, sigma = inputs()
    with Trace(net, [ENC, DEC], stop=False) as tr:
        y = net(x, sigma)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert tr[ENC].shape == (2, 32, 8, 8)  # 2 x model_channels at 8x8
    assert tr[DEC].shape == (2, 64, 8, 8)  # decoder channels + encoder skip
    assert tr.calls[(ENC, "out")] == 1 and tr.calls[(DEC, "out")] == 1


def test_early_exit_equals_full_forward():
    net = small_net()
    x, sigma = inputs()
    with Trace(net, [ENC], stop=False) as full:
        net(x, sigma)
    with Trace(net, [ENC]) as early:
        net(x, sigma)
    assert early.stopped_early and not full.stopped_early
    assert torch.equal(early[ENC], full[ENC])


def test_preconditioning_formulas():
    net = small_net("EDMPrecond")
    s = torch.tensor([0.3]).reshape(-1, 1, 1, 1)
    c_skip, c_out, c_in, c_noise = net.coefficients(s)
    assert c_skip.item() == pytest.approx(0.25 / 0.34) and c_in.item() == pytest.approx(1 / math.sqrt(0.34))
    assert c_out.item() == pytest.approx(0.15 / math.sqrt(0.34)) and c_noise.item() == pytest.approx(math.log(0.3) / 4)
    vp = small_net("VPPrecond")
    # VP: sigma(t) and t(sigma) are inverse; c_noise = 999 t
    t = 0.37
    sig = torch.tensor([vp.sigma_of_t(t)]).reshape(-1, 1, 1, 1)
    assert torch.allclose(vp.coefficients(sig)[3], torch.tensor(999 * t), rtol=1e-5)
    assert math.isclose(vp.sigma_min, math.sqrt(math.expm1(0.5 * 19.9 * 1e-10 + 0.1 * 1e-5)))
    ve = small_net("VEPrecond")
    assert torch.allclose(ve.coefficients(s)[3], (0.5 * s).log())


@pytest.mark.slow
def test_real_cifar10_configuration():
    """The released DDPM++ CIFAR-10 structure: names, shapes, parameter count, and one real-size forward."""
    kw = {**SMALL, "model_channels": 128}
    meta = build_network("EDMPrecond", kw, device="meta")
    sd = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    assert sum(p.numel() for p in meta.parameters()) == 55_733_891
    expect = {
        "model.map_layer0.weight": (512, 128), "model.map_layer0.bias": (512,), "model.map_layer1.weight": (512, 512),
        "model.map_augment.weight": (128, 9), "model.enc.32x32_conv.weight": (128, 3, 3, 3),
        "model.enc.32x32_block0.skip.weight": (256, 128, 1, 1), "model.enc.16x16_down.conv0.resample_filter":
            (1, 1, 2, 2), "model.enc.16x16_down.skip.weight": (256, 256, 1, 1),
        "model.enc.16x16_block0.qkv.weight": (768, 256, 1, 1), "model.enc.16x16_block0.proj.bias": (256,),
        "model.enc.8x8_block3.norm0.weight": (256,), "model.enc.8x8_block3.affine.weight": (256, 512),
        "model.dec.8x8_in0.qkv.weight": (768, 256, 1, 1), "model.dec.8x8_block3.norm0.weight": (512,),
        "model.dec.16x16_block4.norm2.weight": (256,), "model.dec.32x32_up.conv0.resample_filter": (1, 1, 2, 2),
        "model.dec.32x32_block4.norm0.weight": (384,), "model.dec.32x32_aux_norm.weight": (256,),
        "model.dec.32x32_aux_conv.weight": (3, 256, 3, 3),
    }
    for k, shape in expect.items():
        assert sd[k] == shape, k
    for absent in ("model.map_augment.bias", "model.map_label.weight", "model.enc.8x8_block0.qkv.weight",
                   "model.dec.16x16_block3.qkv.weight", "model.enc.32x32_block1.skip.weight",
                   "model.enc.32x32_block1.conv0.resample_filter"):
        assert absent not in sd, absent
    torch.manual_seed(0)
    net = build_network("EDMPrecond", kw).eval()
    x, sigma = inputs(1)
    with torch.inference_mode(), Trace(net, [ENC, DEC], stop=False) as tr:
        assert net(x, sigma).shape == (1, 3, 32, 32)
    assert tr[ENC].shape == (1, 256, 8, 8) and tr[DEC].shape == (1, 512, 8, 8)


def test_unsupported_configurations_are_refused():
    with pytest.raises(UnsupportedModelError, match="fourier"):
        build_network("EDMPrecond", {**SMALL, "embedding_type": "fourier"})
    with pytest.raises(UnsupportedModelError, match="DhariwalUNet"):
        build_network("EDMPrecond", {**SMALL, "model_type": "DhariwalUNet"})
    with pytest.raises(UnsupportedModelError, match="iDDPMPrecond"):
        build_network("iDDPMPrecond", SMALL)
    with pytest.raises(UnsupportedModelError, match="wibble"):
        build_network("EDMPrecond", {**SMALL, "wibble": 1})
    with pytest.raises(UnsupportedModelError, match="model_channels"):
        build_network("EDMPrecond", {**SMALL, "model_channels": 10**9})


# -- adapter ---------------------------------------------------------------------------------------------------------

def test_sigma_mapping_and_variance_exploding_noise():
    assert ddpm_sigma(50) == pytest.approx(0.17601, abs=1e-4)
    a = EDMAdapter(small_net(), device=torch.device("cpu"), dtype=torch.float32)
    assert a.sigma(50) == pytest.approx(0.17601, abs=1e-4) and a.default_layer() == ENC
    x0 = a.encode(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8))
    xt = a.noise(x0, 50, [7, 8, 9])
    eps = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(8))
    assert torch.allclose(xt[1], x0[1] + a.sigma(50) * eps)
    assert torch.equal(a.noise(x0[1:2], 50, [8])[0], xt[1])  # per image, not per batch
    # epsilon prediction in the same space: x_t - sigma * eps_hat is the denoiser's D(x_t; sigma)
    d = a.denoiser(xt, torch.full((3,), a.sigma(50)))
    assert torch.allclose(xt - a.sigma(50) * a.predict_noise(xt, 50), d, atol=1e-5)
    b = EDMAdapter(small_net(), device=torch.device("cpu"), dtype=torch.float32, sigma=0.5)
    assert b.sigma(50) == b.sigma(999) == 0.5
    with pytest.raises(UsageError):
        EDMAdapter(small_net(), device=torch.device("cpu"), dtype=torch.float32, sigma=-1.0)


# -- NVlabs pickles --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("precond,over", [("EDMPrecond", {}), ("VPPrecond", {"label_dim": 10})])
def test_nvlabs_pickle_loads_as_data_with_equal_outputs(precond, over, tmp_path):
    net = small_net(precond, **over)
    marker = tmp_path / "module_src_ran"
    pkl = write_nvlabs_pickle(tmp_path / "net.pkl", net, marker)

    data = safe_pickle.load(pkl)
    assert set(data) == {"ema", "loss_fn", "augment_pipe", "dataset_kwargs"}
    assert isinstance(data["ema"], safe_pickle.PersistentObject) and data["ema"].class_name == precond
    assert "module_src was executed" in data["ema"].module_src  # kept as text ...
    assert data["ema"].init_kwargs["dropout"] == pytest.approx(0.13)  # numpy scalar -> float

    loaded = network_from_pickle(pkl)
    assert type(loaded).__name__ == precond
    x, sigma = inputs(3)
    assert torch.equal(loaded(x, sigma), net(x, sigma))
    assert not marker.exists()  # ... and never run
    assert "torch_utils" not in sys.modules and "torch_utils.persistence" not in sys.modules


def test_zip_format_storage_blobs_load(tmp_path):
    t = torch.arange(12, dtype=torch.float32)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(torch.storage.TypedStorage(wrap_storage=t.untyped_storage(), dtype=torch.float32,
                                              _internal=True), buf)

    class ZipTensor:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, (EvilStorage(buf.getvalue()), 2, (2, 3), (4, 1), False,
                                                      OrderedDict()))

    out = safe_pickle.load(io.BufferedReader(io.BytesIO(pickle.dumps({"t": ZipTensor()}))))
    assert torch.equal(out["t"], torch.tensor([[2.0, 3, 4], [6, 7, 8]]))


def _dump(obj) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pickle.dumps(obj)


def _evil_payloads(marker: Path):
    m = str(marker)
    return {
        "os.system": Evil(os.system, f"touch {m}"),
        "builtins.exec": Evil(builtins.exec, f"open({m!r}, 'w')"),
        "builtins.eval": Evil(builtins.eval, f"open({m!r}, 'w')"),
        "builtins.open": Evil(builtins.open, m, "w"),
        "subprocess.call": Evil(subprocess.call, ["touch", m]),
    }


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "builtins.eval", "builtins.open", "subprocess.call",
                                  "nested", "storage", "protocol0"])
def test_malicious_pickles_are_refused_without_side_effect(kind, tmp_path):
    marker = tmp_path / "pwned"
    payloads = _evil_payloads(marker)
    if kind in payloads:
        blob, named = _dump({"ema": payloads[kind]}), payloads[kind].fn
        named = f"{named.__module__}.{named.__name__}"  # os.system pickles as posix.system on Linux
    elif kind == "nested":  # deep inside an otherwise well-formed NVlabs pickle
        path = write_nvlabs_pickle(tmp_path / "ok.pkl", small_net(), tmp_path / "src_ran",
                                   extra=Evil(builtins.exec, f"open({str(marker)!r}, 'w')"))
        blob, named = path.read_bytes(), "builtins.exec"
    elif kind == "storage":  # inside the nested torch.save blob of a tensor storage
        blob, named = _dump({"ema": EvilStorage(_dump(Evil(os.system, f"touch {marker}")))}), "posix.system"
    else:  # protocol 0 INST opcode
        blob, named = b"(S'touch " + str(marker).encode() + b"'\nios\nsystem\n.", "os.system"
    path = tmp_path / "evil.pkl"
    path.write_bytes(blob)
    with pytest.raises(UnsafeCheckpointError, match=named.replace(".", r"\.")) as e:
        safe_pickle.load(path)
    assert "refuses" in str(e.value) and "evil.pkl" in str(e.value)
    with pytest.raises(UnsafeCheckpointError):
        network_from_pickle(path)
    assert not marker.exists()


def test_damaged_and_wrong_pickles_give_one_sentence(tmp_path):
    good = write_nvlabs_pickle(tmp_path / "good.pkl", small_net(), tmp_path / "m")
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelNotFoundError, match="cannot read cut.pkl"):
        network_from_pickle(cut)
    other = tmp_path / "other.pkl"
    other.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(ModelNotFoundError, match="no 'ema'"):
        network_from_pickle(other)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        network_from_pickle(tmp_path / "missing.pkl")
    # recorded arguments that disagree with the recorded tensors
    net = small_net()
    net.init_kwargs["num_blocks"] = 3
    with pytest.raises(ModelNotFoundError, match="does not match"):
        network_from_pickle(write_nvlabs_pickle(tmp_path / "mismatch.pkl", net, tmp_path / "m"))


# -- safetensors -----------------------------------------------------------------------------------------------------

def test_safetensors_with_full_or_minimal_sidecar(tmp_path):
    net = small_net("VEPrecond")
    path = edm.save_safetensors(net, tmp_path / "net.safetensors")
    x, sigma = inputs()
    assert torch.equal(edm.load_network(path)(x, sigma), net(x, sigma))
    path.with_suffix(".json").write_text(json.dumps({"precond": "ve"}))  # the rest inferred from shapes
    assert torch.equal(edm.load_network(path)(x, sigma), net(x, sigma))
    path.with_suffix(".json").unlink()
    with pytest.raises(ModelNotFoundError, match="sidecar"):
        edm.load_network(path)


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("precond", ["EDMPrecond", "VPPrecond", "VEPrecond"])
def test_safetensors_sidecar_is_strict_json_and_the_old_form_still_loads(precond, tmp_path):
    """EDMPrecond's sigma_max is infinite: the sidecar must not hold ``Infinity`` (strict parsers reject it)."""
    net = small_net(precond)
    path = edm.save_safetensors(net, tmp_path / "net.safetensors")
    text = path.with_suffix(".json").read_text()
    doc = _strict_json(text)  # raises on Infinity / NaN
    assert "Infinity" not in text and doc["class_name"] == precond
    x, sigma = inputs()
    loaded = edm.load_network(path)
    assert loaded.sigma_max == net.sigma_max and torch.equal(loaded(x, sigma), net(x, sigma))
    # a sidecar an older memdetect wrote, with "sigma_max": Infinity, loads the same network
    old = {"class_name": precond, "init_kwargs": dict(net.init_kwargs)}
    path.with_suffix(".json").write_text(json.dumps(old, indent=1))
    if precond == "EDMPrecond":
        assert "Infinity" in path.with_suffix(".json").read_text()
    assert torch.equal(edm.load_network(path)(x, sigma), net(x, sigma))


# -- downloads -------------------------------------------------------------------------------------------------------

def test_preset_and_offline_download(tmp_path, monkeypatch):
    spec = resolve_model("edm-cifar10")
    assert spec.family == "edm" and spec.layer == ENC and spec.timestep == 50
    assert PRESETS["edm-cifar10"].source in edm.KNOWN_DOWNLOADS
    monkeypatch.setenv("MEMDETECT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="not in the memdetect cache") as e:
        Detector.from_pretrained("edm-cifar10", device="cpu")
    assert str(e.value).count(". ") == 0 and "\n" not in str(e.value)


# -- CLI -------------------------------------------------------------------------------------------------------------

def test_cli_scan_on_nvlabs_pickle(tmp_path, images_dir):
    pkl = write_nvlabs_pickle(tmp_path / "edm.pkl", small_net(), tmp_path / "src_ran")
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["scan", str(images_dir), "--model", "edm", "--model-path", str(pkl), "--workers", "0",
                              "--output", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert len(doc["rows"]) == 5 and all(math.isfinite(r["score"]) for r in doc["rows"])
    s = doc["settings"]
    assert s["family"] == "edm" and s["layer"] == ENC and s["sigma"] == pytest.approx(0.176, abs=1e-3)
    res = runner.invoke(app, ["scan", str(images_dir), "--model", "edm", "--model-path", str(pkl), "--workers", "0",
                              "--sigma", "0.5", "--layer", DEC, "--output", str(out)])
    assert res.exit_code == 0, res.output
    s = json.loads(out.read_text())["settings"]
    assert s["sigma"] == 0.5 and s["layer"] == DEC
    assert not (tmp_path / "src_ran").exists()


def test_cli_refuses_malicious_pickle(tmp_path, images_dir):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(_dump({"ema": Evil(os.system, f"touch {marker}")}))
    res = runner.invoke(app, ["scan", str(images_dir), "--model", "edm", "--model-path", str(evil)])
    assert res.exit_code == 2
    assert res.output.count("memdetect: error:") == 1 and "Traceback" not in res.output
    assert "evil.pkl asks for posix.system, which memdetect refuses to load" in " ".join(res.output.split())
    assert not marker.exists()


def test_cli_sigma_needs_an_edm_model(tiny_ddpm, images_dir):
    res = runner.invoke(app, ["scan", str(images_dir), "--model", "ddpm", "--model-path", str(tiny_ddpm),
                              "--sigma", "0.3"])
    assert res.exit_code == 2 and "--sigma applies to edm, flux, sd3 models only" in " ".join(res.output.split())
