"""Where several families look: layer choices shared by adapters, as mixins placed before the adapter base class."""

from __future__ import annotations

from .base import UNET_LAYER, unet_layer, unet_selection_layers

#: The MLP activation of transformer block ``k`` (diffusers' transformer models).
MLP_LAYER = "transformer_blocks.{k}.ff.net.0"


class UNetLayer:
    """A diffusers UNet denoiser read where the paper reads SD's: the input of the last resnet's second convolution
    in the lowest-resolution up block (``unet_layer``); spatial-max pooling."""

    pooling = "spatial-max"

    @classmethod
    def layer_hint(cls, options):
        return UNET_LAYER.format(last="<last>")

    def default_layer(self) -> str:
        return unet_layer(self.denoiser)


class UNetLayers(UNetLayer):
    """``UNetLayer`` and the candidates ``calibrate --select-layer`` tries (``unet_selection_layers``)."""

    def selection_layers(self) -> list[str]:
        return unet_selection_layers(self.denoiser)


class MiddleBlockMLP:
    """A transformer denoiser read at the MLP activation of its middle block (DiT-XL's reading:
    ``transformer_blocks.{num_layers/2-1}.ff.net.0``, e.g. block 12 of SD3-medium's 24); token-max pooling (the
    tokens are image patches)."""

    pooling = "token-max"

    @classmethod
    def layer_hint(cls, options):
        return MLP_LAYER.format(k="<num_layers/2-1>")

    def default_layer(self) -> str:
        return MLP_LAYER.format(k=self.denoiser.config.num_layers // 2 - 1)


__all__ = ["MLP_LAYER", "MiddleBlockMLP", "UNetLayer", "UNetLayers"]
