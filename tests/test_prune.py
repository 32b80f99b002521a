"""Keeping only what runs: the detector probes its scan path on fake tensors, drops every weight it never reads
(``capture.trace_usage`` + ``capture.prune``), and scores stay bit-identical to the whole model's."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from memdetect.core import capture
from memdetect.detector import Detector
from memdetect.errors import PrunedModuleError, UsageError
from memdetect.models.base import place
from memdetect.models.ddpm import PixelDDPMAdapter

CPU = torch.device("cpu")


def mid_unet(seed: int = 0):
    """A mid-size pixel UNet (4 levels, 64-256 channels, attention at 8x8; 28M parameters) as a DDPM adapter."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=32, block_out_channels=(64, 128, 256, 256), layers_per_block=2,
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
    return PixelDDPMAdapter(unet.eval(), DDPMScheduler(num_train_timesteps=1000), resolution=32, device=CPU,
                            dtype=torch.float32, source="mid-size unet")


def images(n: int = 5, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


#: a layer that fires early (the second down block), and the modules that run after it in the forward pass
EARLY = "down_blocks.1.resnets.0.conv2:in"
AFTER = ["down_blocks.1.resnets.0.conv2", "down_blocks.1.resnets.1", "down_blocks.1.downsamplers",
         "down_blocks.2", "down_blocks.3", "mid_block", "up_blocks", "conv_norm_out", "conv_out"]
BEFORE = ["conv_in", "time_embedding", "down_blocks.0", "down_blocks.1.resnets.0.conv1",
          "down_blocks.1.resnets.0.norm2"]


@pytest.mark.parametrize("winograd", [False, True])
def test_modules_after_an_early_layer_hold_no_memory_and_scores_are_bit_identical(winograd):
    pruned_adapter, whole_adapter = mid_unet(), mid_unet()
    unet = pruned_adapter.denoiser
    total = sum(p.numel() for p in unet.parameters())
    det = Detector(pruned_adapter, layer=EARLY, winograd=winograd)
    assert det.pruned and pruned_adapter.pruned_for == EARLY
    for name in AFTER:
        module = unet.get_submodule(name)
        held = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if not t.is_meta]
        assert not held, (name, held[:3])  # no parameter or buffer in memory
        assert sum(p.numel() for p in module.parameters()) > 0  # ... though the module tree and shapes stay
    for name in BEFORE:
        assert all(not p.is_meta for p in unet.get_submodule(name).parameters()), name
    kept = sum(p.numel() for p in unet.parameters() if not p.is_meta)
    assert kept < 0.1 * total  # the first two levels of a four-level UNet
    assert set(unet.state_dict()) == set(whole_adapter.denoiser.state_dict())  # names unchanged

    whole = Detector(whole_adapter, layer=EARLY, early_exit=False, winograd=winograd)  # the full forward
    assert not whole.pruned
    x = images()
    assert torch.equal(det.features(x), whole.features(x))
    got, want = det.score_tensor(x), whole.score_tensor(x)
    assert all((got[k] == want[k]).all() for k in want)


def test_default_layer_keeps_the_down_path_and_drops_the_rest_of_the_up_path():
    adapter = mid_unet()
    det = Detector(adapter)  # up_blocks.0.resnets.2.conv2:in
    unet = adapter.denoiser
    assert all(p.is_meta for n in ("up_blocks.1", "up_blocks.2", "up_blocks.3", "conv_out",
                                   "up_blocks.0.resnets.2.conv2", "up_blocks.0.upsamplers")
               for p in unet.get_submodule(n).parameters())
    assert not any(p.is_meta for n in ("down_blocks", "mid_block", "up_blocks.0.resnets.1")
                   for p in unet.get_submodule(n).parameters())
    whole = Detector(mid_unet(), early_exit=False)
    x = images(3)
    assert torch.equal(det.features(x), whole.features(x))


def test_a_dropped_module_says_so_and_the_detector_refuses_what_needs_it():
    adapter = mid_unet()
    det = Detector(adapter, layer=EARLY)
    with pytest.raises(PrunedModuleError, match=r"up_blocks\.0 was dropped.*prune=False"):
        adapter.denoiser.up_blocks[0](torch.zeros(1, 256, 4, 4), torch.zeros(1, 256))
    with pytest.raises(PrunedModuleError):
        adapter.predict_noise(torch.zeros(1, 3, 32, 32), 10)  # the full forward reaches a dropped module
    with pytest.raises(UsageError, match="prune=False"):
        det.early_exit = False
    with pytest.raises(UsageError, match="prune=False"):
        det.layers()
    with pytest.raises(UsageError, match="pruned for a scan of"):
        Detector(adapter, layer="mid_block")  # a later layer: its modules are gone
    with pytest.raises(UsageError, match="pruned for a scan of"):
        Detector(adapter, layer=EARLY, prune=False)
    again = Detector(adapter, layer=EARLY)  # the same scan again is fine
    assert torch.equal(again.features(images(2)), det.features(images(2)))
    with pytest.raises(UsageError, match="needs early_exit"):
        Detector(mid_unet(), prune=True, early_exit=False)


def test_a_pruned_model_without_weight_files_hashes_its_whole_weights_before_dropping():
    pruned, whole = Detector(mid_unet(), layer=EARLY), Detector(mid_unet(), layer=EARLY, prune=False)
    assert pruned.pruned and not whole.pruned
    assert pruned.weights_digest() == whole.weights_digest()
    assert pruned.weights_digest() != Detector(mid_unet(seed=1), layer=EARLY).weights_digest()


def test_prune_false_and_full_forward_keep_everything():
    for kwargs in ({"prune": False}, {"early_exit": False}):
        adapter = mid_unet()
        det = Detector(adapter, **kwargs)
        assert not det.pruned and not any(p.is_meta for p in adapter.denoiser.parameters())
        assert len(det.layers()) > 50  # the full forward runs


def test_sd_drops_the_vae_decoder_and_the_unet_after_its_layer(tiny_sd):
    det = Detector.from_pretrained("sd", str(tiny_sd), device="cpu")
    a = det.adapter
    assert all(p.is_meta for p in [*a.vae.decoder.parameters(), *a.vae.post_quant_conv.parameters()])
    assert not any(p.is_meta for p in [*a.vae.encoder.parameters(), *a.vae.quant_conv.parameters()])
    assert all(p.is_meta for p in a.denoiser.up_blocks[1].parameters())
    assert not any(isinstance(m, nn.Module) and "CLIP" in type(m).__name__ for m in vars(a).values())
    with pytest.raises(PrunedModuleError, match="(post_quant_conv|decoder) was dropped"):
        a.decode(torch.zeros(1, 4, 8, 8))
    whole = Detector.from_pretrained("sd", str(tiny_sd), device="cpu", early_exit=False)
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(det.features(x), whole.features(x))


def test_the_probe_records_reads_not_just_calls():
    """A parent that uses a child's weight directly (without calling the child) keeps it."""

    class Direct(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)
            self.register_buffer("scale", torch.tensor(2.0))

        def forward(self, x):
            return x @ self.proj.weight.t() * self.scale

    m = Direct()
    with torch.device("cpu"):
        usage = capture.trace_usage([m], lambda: m(torch.ones(1, 4)))
    assert id(m.proj.weight) in usage.tensors and id(m.scale) in usage.tensors
    assert id(m.proj.bias) not in usage.tensors and id(m.unused.weight) not in usage.tensors
    assert m not in usage.fired or m.proj not in usage.fired  # proj never ran as a module
    freed = capture.prune([m], usage, "test")
    assert freed == 4 * (4 + 16 + 4) and m.proj.bias.is_meta and not m.proj.weight.is_meta
    assert torch.equal(m(torch.ones(1, 4)), torch.ones(1, 4) @ m.proj.weight.t() * 2)


def test_a_model_the_probe_cannot_run_keeps_every_module(caplog):
    """A forward that needs real values (here ``.item()``) cannot run on fake tensors: nothing is dropped."""
    adapter = mid_unet()
    forward = adapter.denoiser.forward

    def needs_values(x, t, *a, **k):
        if float(x.abs().max()) < 0:  # data-dependent control flow
            raise AssertionError
        return forward(x, t, *a, **k)

    adapter.denoiser.forward = needs_values
    with caplog.at_level(logging.INFO, logger="memdetect.detector"):
        det = Detector(adapter)
    assert not det.pruned and "could not probe" in caplog.text
    assert not any(p.is_meta for p in adapter.denoiser.parameters())
    det.features(images(2))


def test_place_copies_tensors_out_of_their_source_and_leaves_dropped_ones():
    lin = nn.Linear(8, 8)
    source = lin.weight.detach().clone()
    lin.weight.data = source  # e.g. a view of a memory-mapped file
    lin.bias = nn.Parameter(lin.bias.detach().to("meta"), requires_grad=False)
    place(lin, CPU, torch.float32)
    assert lin.weight.data_ptr() != source.data_ptr() and torch.equal(lin.weight, source)
    assert lin.bias.is_meta


# -- batch size: from free GPU memory, halved on out-of-memory errors --------------------------------------------------

def test_out_of_memory_halves_the_batch_retries_and_says_so_once(caplog, monkeypatch):
    det = Detector(mid_unet(), batch_size=8)
    x = images(8)
    want = det.features(x)
    reference = torch.cat([det.features(x[i:i + 2]) for i in range(0, 8, 2)])  # in batches of two, no OOM
    forward = det.adapter.forward
    sizes = []

    def small_batches_only(x_t, t):
        sizes.append(x_t.shape[0])
        if x_t.shape[0] > 2:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory. Tried to allocate 20.00 GiB")
        return forward(x_t, t)

    monkeypatch.setattr(det.adapter, "forward", small_batches_only)
    with caplog.at_level(logging.WARNING, logger="memdetect.detector"):
        got = det.features(x)
        again = det.features(x)
    assert sizes[:3] == [8, 4, 2] and set(sizes[3:]) == {2}  # halved twice, then kept at 2
    assert det.batch_size == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "halving the batch" in warnings[0].getMessage()
    assert torch.equal(got, reference) and torch.equal(again, reference)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # each image's score does not depend on its batch

    def never(x_t, t):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(det.adapter, "forward", never)
    with pytest.raises(torch.OutOfMemoryError):  # at one image there is nothing left to halve
        det.features(x[:3])


def test_the_gpu_batch_size_comes_from_free_memory(monkeypatch):
    from memdetect.detector import WORKING_SET_FACTOR, batch_for_memory

    assert batch_for_memory(80e9, 400e6) == 160
    assert batch_for_memory(1e9, 4e9) == 1 and batch_for_memory(1e12, 1) == 1024
    det = Detector(mid_unet())
    per_image = WORKING_SET_FACTOR * det.usage.largest_bytes
    assert det.usage.largest_bytes == 64 * 32 * 32 * 4  # the widest activation of one image: 64 ch x 32 x 32 fp32
    monkeypatch.setattr(det.adapter, "device", torch.device("cuda"))
    seen = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: seen.append(device) or (10 * per_image, 0))
    assert det._default_batch_size() == 8  # 80% of room for 10 images
    assert seen == [torch.device("cuda")]


def test_the_command_line_prunes_a_scan_and_keeps_the_whole_model_for_a_full_forward(tiny_ddpm, images_dir,
                                                                                     monkeypatch):
    from typer.testing import CliRunner

    from memdetect.workflows import scan as scan_mod
    from memdetect.cli import app
    from memdetect.errors import InputError

    seen = []

    def record(det, paths, **kwargs):
        seen.append(det)
        raise InputError("stop here")

    monkeypatch.setattr(scan_mod, "scan", record)
    base = ["scan", str(images_dir), "--model", "ddpm", "--model-path", str(tiny_ddpm), "--device", "cpu"]
    for extra in ([], ["--no-early-exit"]):
        assert CliRunner().invoke(app, base + extra).exit_code == 2
    assert seen[0].pruned and seen[0].early_exit
    assert not seen[1].pruned and not seen[1].early_exit
    x = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(seen[0].features(x), seen[1].features(x))
