"""Real architectures built from the configs in ../shared/data/configs with random weights (no downloads).

SD1.4's UNet is 860M parameters: these tests take about a minute on 2 CPU cores and 4 GB of memory (``slow``).
"""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from memdetect.core.capture import Trace, pool

from .conftest import CONFIGS, needs_shared

pytestmark = pytest.mark.slow


def _config(*parts):
    return json.loads(CONFIGS.joinpath(*parts).read_text())


def _forward_with_flops(model, spec, run, stop):
    with FlopCounterMode(display=False) as fc, Trace(model, [spec], stop=stop) as tr:
        run()
    return tr[spec], fc.get_total_flops()


@needs_shared("data", "configs", "sd14", "unet", "config.json")
def test_sd14_default_layer_pools_to_1280_and_early_exit_is_exact_and_cheap():
    from diffusers import UNet2DConditionModel

    from memdetect.models.presets import PRESETS
    from memdetect.models.sd import cross_attention_values

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(_config("sd14", "unet", "config.json")).eval()
    values = cross_attention_values(unet)  # found from the module tree: NeMo's 7 value layers of SD 1.x
    assert len(values) == 7 and all(n.startswith(("down_blocks.", "mid_block.")) and n.endswith(".attn2.to_v")
                                    for n in values)
    spec = PRESETS["sd14"].layer
    assert spec == "up_blocks.0.resnets.2.conv2:in"
    x = torch.randn(1, 4, 64, 64)
    cond = torch.randn(1, 77, 768)

    def run():
        unet(x, 50, encoder_hidden_states=cond)

    with torch.inference_mode():
        early, early_flops = _forward_with_flops(unet, spec, run, stop=True)
        full, full_flops = _forward_with_flops(unet, spec, run, stop=False)
        with Trace(unet, ["up_blocks.0.resnets.2.nonlinearity@2"], stop=True) as tr:
            run()
    assert early.shape == (1, 1280, 8, 8)
    assert pool(early, "spatial-max").shape == (1, 1280)
    assert torch.equal(early, full)
    assert torch.equal(tr["up_blocks.0.resnets.2.nonlinearity@2"], early)  # same tensor as the SiLU's third call
    ratio = early_flops / full_flops
    print(f"SD1.4 UNet FLOPs: early exit {early_flops / 1e9:.0f} G, full {full_flops / 1e9:.0f} G, ratio {ratio:.3f}")
    assert ratio <= 0.45


@needs_shared("data", "configs", "dit-xl-2-256", "transformer", "config.json")
def test_dit_xl_default_layers():
    from diffusers import DiTTransformer2DModel

    from memdetect.models.dit import READINGS

    cfg = _config("dit-xl-2-256", "transformer", "config.json")
    model = DiTTransformer2DModel.from_config(cfg).eval()
    assert model.config.num_layers == 28
    k = model.config.num_layers // 2 - 1
    mlp, adaln = READINGS["mlp"].format(k=k), READINGS["adaln"].format(k=k)
    x = torch.randn(1, 4, 32, 32)
    with torch.inference_mode(), Trace(model, [mlp, adaln]) as tr:
        model(x, timestep=torch.tensor([50]), class_labels=torch.tensor([1000]))
    assert tr[mlp].shape == (1, 256, 4 * 1152)
    assert pool(tr[mlp], "token-max").shape == (1, 4608)
    assert tr[adaln].shape == (1, 1152)


@needs_shared("data", "configs", "ddpm-cifar10-32", "config.json")
def test_ddpm_cifar10_default_layer():
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_config(_config("ddpm-cifar10-32", "config.json")).eval()
    spec = f"up_blocks.0.resnets.{len(unet.up_blocks[0].resnets) - 1}.conv2:in"
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        early, _ = _forward_with_flops(unet, spec, lambda: unet(x, 50), stop=True)
        full, _ = _forward_with_flops(unet, spec, lambda: unet(x, 50), stop=False)
    assert early.shape == (2, 256, 4, 4)
    assert torch.equal(early, full)
