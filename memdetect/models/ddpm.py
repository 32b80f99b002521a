"""Pixel-space DDPM UNets (diffusers ``UNet2DModel``: google/ddpm-cifar10-32, the shipped ``demo`` model, ...).

x0 = the image in [-1, 1]; no condition. Default layer: ``up_blocks.0.resnets.<last>.conv2:in`` (the post-norm2
SiLU of the last resnet in the lowest-resolution up block).
"""

from __future__ import annotations

from ..core.hub import component_files, has_subfolder, load_component
from .base import Adapter, UNetLayers, place, register_adapter, to_unit_range


@register_adapter
class PixelDDPMAdapter(UNetLayers, Adapter):
    family = "ddpm"
    pooling = "spatial-max"
    pipeline_classes = ("DDPMPipeline", "DDIMPipeline", "UNet2DModel")
    sampling_steps = 1000
    sampling_eta = 1.0
    sampler = "DDPM ancestral (DDIM eta=1)"

    @classmethod
    def load(cls, source, *, device, dtype, **options):
        from diffusers import DDPMScheduler, UNet2DModel

        # New-layout repos keep unet/ and scheduler/ subfolders; the 2022 ones (google/ddpm-*) keep both at the root.
        unet_sub = "unet" if has_subfolder(source, "unet") else None
        sched_sub = "scheduler" if has_subfolder(source, "scheduler") else None
        unet = load_component(UNet2DModel, source, unet_sub)
        scheduler = load_component(DDPMScheduler, source, sched_sub)
        size = unet.config.sample_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        adapter = cls(unet, scheduler, resolution=size, device=device, dtype=dtype, source=source)
        adapter.components = tuple(dict.fromkeys([unet_sub, sched_sub]))
        return adapter

    def weight_files(self):
        return component_files(self.source, getattr(self, "components", ("unet", "scheduler")))

    def encode(self, images):
        return to_unit_range(images).to(self.device, self.dtype)

    def latent_shape(self):
        return (self.denoiser.config.in_channels, self.resolution, self.resolution)

    def predict_noise(self, x_t, t, cond=None):
        self._unconditional(cond)
        with self.autocast():
            out = self.denoiser(x_t, int(t)).sample
        if self.denoiser.config.out_channels == 2 * x_t.shape[1]:  # learned variance: first half is epsilon
            out = out[:, : x_t.shape[1]]
        return out

    def default_batch_size(self):
        return 256 if self.device.type == "cuda" else 64

    # -- memdetect.guard (every row is unconditional: the base class's guard_step and guard_subset) ---------------
    @classmethod
    def from_pipeline(cls, pipe):
        unet = pipe.unet
        size = unet.config.sample_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        return cls(unet, pipe.scheduler, resolution=size, device=unet.device, dtype=unet.dtype,
                   source=str(getattr(pipe, "name_or_path", "") or ""))

    @classmethod
    def load_pipeline(cls, source, *, device, dtype):
        """A ``DDIMPipeline`` over the model's UNet (DDIM runs eta 0 or, with eta 1 over every timestep, DDPM's
        ancestral sampler)."""
        from diffusers import DDIMPipeline, DDPMScheduler, UNet2DModel

        unet_sub = "unet" if has_subfolder(source, "unet") else None
        sched_sub = "scheduler" if has_subfolder(source, "scheduler") else None
        unet = load_component(UNet2DModel, source, unet_sub)
        scheduler = load_component(DDPMScheduler, source, sched_sub)
        return DDIMPipeline(unet=place(unet, device, dtype), scheduler=scheduler)
