"""EDM's network: the DDPM++ SongUNet (NVlabs' module names, so their state dicts load as they are) and its three
preconditioners D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (VP, VE, EDM). The module tree and what is
implemented are in the package docstring (``memdetect.models.edm``); building one from checkpoint arguments, checked
first, is ``config.build_network``."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UnsupportedModelError

# ------------------------------------------------------------------------------------------------------------------
# Layers. Each casts its parameters to the input's dtype, as NVlabs' layers do: the preconditioner feeds the mapping
# network float32 noise labels and the convolutional path the weights' dtype.


class Linear(nn.Module):
    """Fully connected layer; parameters ``weight`` [out, in] and optional ``bias`` [out]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / math.sqrt(in_features))
        self.bias = nn.Parameter(torch.randn(out_features) * 0.1) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), b)


class Conv2d(nn.Module):
    """KxK convolution, optionally preceded by a 2x up- or downsampling with a separable FIR filter.

    The filter is a buffer ``resample_filter`` [1, 1, k, k] (outer product of the 1-D filter, normalised to sum 1),
    present only when the layer resamples. Downsampling is a depthwise stride-2 convolution with it; upsampling a
    depthwise stride-2 transposed convolution with 4x the filter (for [1, 1]: 2x2 mean pooling and nearest-neighbour
    upsampling).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter=(1, 1)):
        super().__init__()
        if up and down:
            raise ValueError("a convolution resamples up or down, not both")
        self.in_channels, self.out_channels, self.up, self.down = in_channels, out_channels, up, down
        fan_in = in_channels * kernel * kernel
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel) / math.sqrt(fan_in))
        self.bias = nn.Parameter(torch.randn(out_channels) * 0.1) if bias else None
        if up or down:
            f = torch.as_tensor([float(v) for v in resample_filter], dtype=torch.float32)
            self.register_buffer("resample_filter", (torch.outer(f, f) / f.sum() ** 2)[None, None])
        else:
            self.resample_filter = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample_filter is not None:
            f = self.resample_filter.to(x.dtype)
            pad = (f.shape[-1] - 1) // 2
            c = x.shape[1]
            if self.up:
                x = F.conv_transpose2d(x, (f * 4).expand(c, 1, -1, -1), stride=2, padding=pad, groups=c)
            else:
                x = F.conv2d(x, f.expand(c, 1, -1, -1), stride=2, padding=pad, groups=c)
        w = self.weight.to(x.dtype)
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.conv2d(x, w, b, padding=w.shape[-1] // 2)


class GroupNorm(nn.Module):
    """Group normalisation with min(32, C / 4) groups; parameters ``weight`` and ``bias`` [C]."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.num_groups = min(32, num_channels // 4)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class UNetBlock(nn.Module):
    """Residual block (DDPM++ settings: additive embedding, residual and attention outputs scaled by sqrt(1/2)).

    h = conv0(silu(norm0(x)));  h = conv1(dropout(silu(norm1(h + affine(emb)))));  x = (h + skip(x)) * sqrt(1/2);
    then, with attention: x = (proj(attend(qkv(norm2(x)))) + x) * sqrt(1/2), with softmax(q^T k / sqrt(c)) in float32.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: int = 1, dropout: float = 0.0,
                 resample_filter=(1, 1)):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_heads = num_heads if attention else 0
        self.dropout = float(dropout)
        self.skip_scale = math.sqrt(0.5)
        self.norm0 = GroupNorm(in_channels)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter)
        self.affine = Linear(emb_channels, out_channels)
        self.norm1 = GroupNorm(out_channels)
        self.conv1 = Conv2d(out_channels, out_channels, 3)
        self.skip = None
        if in_channels != out_channels or up or down:
            self.skip = Conv2d(in_channels, out_channels, 1, up=up, down=down, resample_filter=resample_filter)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1)
            self.proj = Conv2d(out_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        h = h + self.affine(emb).to(h.dtype)[:, :, None, None]
        h = F.silu(self.norm1(h))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = (h + (self.skip(x) if self.skip is not None else x)) * self.skip_scale
        if self.num_heads:
            b, c, height, width = x.shape
            # qkv's 3C output channels are laid out channel-major: channel i*3 + j is (q, k, v)[j] of channel i.
            q, k, v = self.qkv(self.norm2(x)).reshape(b * self.num_heads, c // self.num_heads, 3, -1).unbind(2)
            w = torch.einsum("ncq,nck->nqk", q.float(), (k / math.sqrt(k.shape[1])).float()).softmax(dim=2)
            w = w.to(q.dtype)
            a = torch.einsum("nqk,nck->ncq", w, v)
            x = (self.proj(a.reshape(b, c, height, width)) + x) * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """Sinusoidal noise-level embedding, [cos | sin] of c_noise x 10000^(-i / (n/2 - 1)), i < n/2. No parameters."""

    def __init__(self, num_channels: int, max_positions: int = 10000):
        super().__init__()
        self.num_channels, self.max_positions = num_channels, max_positions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / max(half - 1, 1)
        freqs = (1.0 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class SongUNet(nn.Module):
    """The DDPM++ U-Net of Song et al. (2021) as configured in EDM; see the module docstring for the layout."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult=(1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions=(16,), dropout: float = 0.10,
                 label_dropout: float = 0.0, embedding_type: str = "positional", channel_mult_noise: int = 1,
                 encoder_type: str = "standard", decoder_type: str = "standard", resample_filter=(1, 1)):
        super().__init__()
        if embedding_type != "positional" or encoder_type != "standard" or decoder_type != "standard":
            raise UnsupportedModelError(
                f"memdetect implements the DDPM++ SongUNet only (positional embedding, standard encoder and "
                f"decoder), not embedding {embedding_type!r} / encoder {encoder_type!r} / decoder {decoder_type!r}")
        self.img_resolution = img_resolution
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        block = dict(emb_channels=emb_channels, dropout=dropout, resample_filter=resample_filter)

        self.map_noise = PositionalEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)

        self.enc = nn.ModuleDict()
        skips: list[int] = []  # channels of each encoder output, consumed in reverse by the decoder
        channels = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(channels, model_channels, 3)
                channels = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(channels, channels, down=True, **block)
            skips.append(channels)
            for i in range(num_blocks):
                out = model_channels * mult
                self.enc[f"{res}x{res}_block{i}"] = UNetBlock(channels, out, attention=res in attn_resolutions,
                                                              **block)
                channels = out
                skips.append(channels)

        self.dec = nn.ModuleDict()
        self._takes_skip: set[str] = set()
        for level in reversed(range(len(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(channels, channels, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(channels, channels, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(channels, channels, up=True, **block)
            for i in range(num_blocks + 1):
                name = f"{res}x{res}_block{i}"
                out = model_channels * channel_mult[level]
                self.dec[name] = UNetBlock(channels + skips.pop(), out,
                                           attention=(i == num_blocks and res in attn_resolutions), **block)
                self._takes_skip.add(name)
                channels = out
            if level == 0:
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(channels)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(channels, out_channels, 3)
        self._head = (f"{img_resolution}x{img_resolution}_aux_norm", f"{img_resolution}x{img_resolution}_aux_conv")

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        half = emb.shape[1] // 2
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=1)  # the network sees [sin | cos]
        if self.map_label is not None and class_labels is not None:
            emb = emb + self.map_label(class_labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for name, block in self.dec.items():
            if name == self._head[0]:
                x = block(x)
            elif name == self._head[1]:
                x = block(F.silu(x))
            else:
                if name in self._takes_skip:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return x


# ------------------------------------------------------------------------------------------------------------------
# Preconditioning: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise).


class _Precond(nn.Module):
    """Shared part of the three preconditioners; subclasses define ``coefficients(sigma)``."""

    extra_args: ClassVar[tuple[str, ...]] = ()

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 model_type: str = "SongUNet", **model_kwargs):
        super().__init__()
        if model_type != "SongUNet":
            raise UnsupportedModelError(f"memdetect implements the SongUNet (DDPM++) network, not {model_type}")
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16 = bool(use_fp16)  # recorded only: the run's --dtype decides the precision
        self.model = SongUNet(img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels,
                              label_dim=label_dim, **model_kwargs)
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                use_fp16=self.use_fp16, model_type=model_type, **model_kwargs)

    def coefficients(self, sigma: torch.Tensor):
        raise NotImplementedError

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        x = x.float()
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        labels = None
        if self.label_dim:
            labels = (torch.zeros(1, self.label_dim, device=x.device) if class_labels is None
                      else class_labels.float().reshape(-1, self.label_dim))
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        dtype = self.model.map_layer0.weight.dtype
        out = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=labels)
        return c_skip * x + c_out * out.float()


class VPPrecond(_Precond):
    """Variance preserving: sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), c_noise = (M - 1) t(sigma)."""

    extra_args = ("beta_d", "beta_min", "M", "epsilon_t")

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, beta_d=19.9, beta_min=0.1,
                 M=1000, epsilon_t=1e-5, model_type="SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = float(beta_d), float(beta_min), int(M), float(epsilon_t)
        self.sigma_min, self.sigma_max = self.sigma_of_t(self.epsilon_t), self.sigma_of_t(1.0)
        self.init_kwargs.update(beta_d=self.beta_d, beta_min=self.beta_min, M=self.M, epsilon_t=self.epsilon_t)

    def sigma_of_t(self, t: float) -> float:
        return math.sqrt(math.expm1(0.5 * self.beta_d * t * t + self.beta_min * t))

    def t_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return ((self.beta_min ** 2 + 2 * self.beta_d * torch.log1p(sigma ** 2)).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma):
        return 1.0, -sigma, 1 / (sigma ** 2 + 1).sqrt(), (self.M - 1) * self.t_of_sigma(sigma)


class VEPrecond(_Precond):
    """Variance exploding: c_in = 1, c_out = sigma, c_noise = log(sigma / 2)."""

    extra_args = ("sigma_min", "sigma_max")

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0.02, sigma_max=100,
                 model_type="SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.init_kwargs.update(sigma_min=self.sigma_min, sigma_max=self.sigma_max)

    def coefficients(self, sigma):
        return 1.0, sigma, 1.0, (0.5 * sigma).log()


class EDMPrecond(_Precond):
    """EDM: c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2), c_in = 1 / sqrt(s^2 + sd^2),
    c_noise = log(s) / 4, with sd = sigma_data."""

    extra_args = ("sigma_min", "sigma_max", "sigma_data")

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0.0,
                 sigma_max=float("inf"), sigma_data=0.5, model_type="SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        self.sigma_min, self.sigma_max, self.sigma_data = float(sigma_min), float(sigma_max), float(sigma_data)
        self.init_kwargs.update(sigma_min=self.sigma_min, sigma_max=self.sigma_max, sigma_data=self.sigma_data)

    def coefficients(self, sigma):
        sd2 = self.sigma_data ** 2
        norm = (sigma ** 2 + sd2).sqrt()
        return sd2 / (sigma ** 2 + sd2), sigma * self.sigma_data / norm, 1 / norm, sigma.log() / 4


PRECONDS: dict[str, type[_Precond]] = {c.__name__: c for c in (VPPrecond, VEPrecond, EDMPrecond)}
