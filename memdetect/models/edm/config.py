"""Building EDM networks from constructor arguments read from a checkpoint (untrusted data): every name, type and
range is checked before anything is built (``build_network``), and a state dict is checked against the network
before it is loaded (``load_state``). Names a file provides reach messages through ``safe_pickle.printable`` /
``short_repr`` (control characters escaped, length cut)."""

from __future__ import annotations

import math

import torch

from ...errors import ModelNotFoundError, UnsupportedModelError
from .network import PRECONDS, GroupNorm, _Precond
from .safe_pickle import printable, short_repr

_PRECOND_ALIASES = {"vp": "VPPrecond", "ve": "VEPrecond", "edm": "EDMPrecond"}
_COMMON_ARGS = ("img_resolution", "img_channels", "label_dim", "use_fp16", "model_type")
_UNET_ARGS = ("augment_dim", "model_channels", "channel_mult", "channel_mult_emb", "num_blocks", "attn_resolutions",
              "dropout", "label_dropout", "embedding_type", "channel_mult_noise", "encoder_type", "decoder_type",
              "resample_filter")
#: The one value memdetect implements for each string argument.
_STRING_ARGS = {"model_type": "SongUNet", "embedding_type": "positional", "encoder_type": "standard",
                "decoder_type": "standard"}
#: Ranges of the integer arguments, checked before anything is built. NVlabs' DDPM++ networks are CIFAR-10 32x32
#: (model_channels 128, channel_mult [2, 2, 2], num_blocks 4, channel_mult_emb 4, channel_mult_noise 1, augment_dim
#: 9) and FFHQ / AFHQv2 64x64 (channel_mult [1, 2, 2, 2]); class-conditional ImageNet has label_dim 1000. The bounds
#: leave room for other DDPM++ networks while a config (a few bytes) cannot describe a network that takes minutes to
#: build: tensors must match every parameter, so its weights are bounded by the file's size anyway.
_INT_RANGES = {"img_resolution": (8, 512), "img_channels": (1, 4), "label_dim": (0, 10_000), "augment_dim": (0, 64),
               "model_channels": (1, 1024), "channel_mult_emb": (1, 16), "num_blocks": (1, 16),
               "channel_mult_noise": (1, 16), "M": (1, 1_000_000)}
_MAX_LEVELS = 8  # entries of channel_mult (resolutions), and of attn_resolutions
#: model_channels * max(channel_mult) * img_resolution**2: the widest feature map of one image (CIFAR-10: 262,144;
#: FFHQ 64x64: 1,048,576). Weights grow with channels squared but feature maps with resolution squared, so this keeps
#: a small network at a large resolution from costing GBs per batch.
_MAX_FEATURE_VALUES = 1 << 24
#: Ranges of the float arguments (NaN never passes). Only sigma_max may be infinite (EDMPrecond's default).
_FLOAT_RANGES = {"dropout": (0.0, 1.0), "label_dropout": (0.0, 1.0), "beta_d": (1e-6, 100.0),
                 "beta_min": (0.0, 100.0), "epsilon_t": (1e-12, 1.0), "sigma_min": (0.0, 1e6),
                 "sigma_max": (1e-9, math.inf), "sigma_data": (1e-6, 1e6)}


def _checked_kwargs(class_name: str, kwargs: dict, source: str) -> dict:
    """Validate constructor arguments read from a checkpoint (untrusted data) before anything is built: known names,
    types and ranges (``_INT_RANGES``, ``_FLOAT_RANGES``, ``_STRING_ARGS``), a resample filter that resamples by
    exactly 2, a resolution that halves cleanly at every level, and a bounded feature-map size."""
    cls = PRECONDS[class_name]
    if not isinstance(kwargs, dict):
        raise UnsupportedModelError(f"{source}: the constructor arguments of {class_name} are not a dict")
    allowed = set(_COMMON_ARGS) | set(cls.extra_args) | set(_UNET_ARGS)
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        shown = ", ".join(short_repr(k, 40) for k in unknown[:5]) + (
            f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise UnsupportedModelError(f"{source}: {class_name} argument(s) {shown} are not supported by memdetect's "
                                    f"EDM network")

    def bad(name, value, want):
        return UnsupportedModelError(f"{source}: {class_name} argument {name}={short_repr(value, 60)} is not "
                                     f"supported ({want})")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    kwargs = dict(kwargs)  # a value given as None is checked like any other (and refused)
    for name in ("img_resolution", "img_channels"):
        if name not in kwargs:
            raise UnsupportedModelError(f"{source}: {class_name} needs the constructor argument {name}")
    for name, (lo, hi) in _INT_RANGES.items():
        v = kwargs.get(name, lo)
        if not (is_int(v) and lo <= v <= hi):
            raise bad(name, v, f"an integer in [{lo}, {hi}]")
    for name, lo, hi in [("channel_mult", 1, 16), ("attn_resolutions", 1, 512)]:
        if name not in kwargs:
            continue
        v = kwargs[name]
        if not isinstance(v, (list, tuple)) or len(v) > _MAX_LEVELS or any(not (is_int(i) and lo <= i <= hi)
                                                                           for i in v):
            raise bad(name, v, f"a list of at most {_MAX_LEVELS} integers in [{lo}, {hi}]")
        kwargs[name] = list(v)
    if kwargs.get("channel_mult") == []:
        raise bad("channel_mult", [], "at least one resolution level")
    if "resample_filter" in kwargs:
        v = kwargs["resample_filter"]
        ok = (isinstance(v, (list, tuple)) and len(v) in (2, 4, 6, 8)
              and all(is_number(i) and -1e6 <= i <= 1e6 for i in v))
        if not (ok and sum(v) > 0 and max(abs(i) for i in v) <= 1e6 * sum(v)):
            raise bad("resample_filter", v, "2, 4, 6 or 8 finite numbers with a positive sum, as in [1, 1] or "
                                            "[1, 3, 3, 1]")
        kwargs["resample_filter"] = [float(i) for i in v]
    for name, (lo, hi) in _FLOAT_RANGES.items():
        v = kwargs.get(name, lo)
        if not (is_number(v) and lo <= v <= hi):
            raise bad(name, v, f"a number in [{lo:g}, {hi:g}]")
    for name, want in _STRING_ARGS.items():
        v = kwargs.get(name, want)
        if not (isinstance(v, str) and v == want):
            raise bad(name, v, f"memdetect implements the DDPM++ SongUNet: {name}={want!r}")
    if "use_fp16" in kwargs and not isinstance(kwargs["use_fp16"], (bool, int)):
        raise bad("use_fp16", kwargs["use_fp16"], "a boolean")
    # the structure these numbers describe (SongUNet's defaults: model_channels 128, channel_mult [1, 2, 2, 2])
    res, mult = kwargs["img_resolution"], kwargs.get("channel_mult", [1, 2, 2, 2])
    mc, noise = kwargs.get("model_channels", 128), kwargs.get("channel_mult_noise", 1)
    if res % (1 << (len(mult) - 1)):
        raise bad("img_resolution", res, f"a multiple of {1 << (len(mult) - 1)}, to halve at each of "
                                         f"{len(mult)} levels")
    if mc * noise % 2:
        raise bad("model_channels", mc, "even times channel_mult_noise: the noise embedding has cos and sin halves")
    if mc * max(mult) * res * res > _MAX_FEATURE_VALUES:
        raise UnsupportedModelError(f"{source}: {class_name} at img_resolution {res} with model_channels {mc} and "
                                    f"channel_mult {mult} has feature maps of {mc * max(mult) * res * res:,} values "
                                    f"per image, more than memdetect's limit of {_MAX_FEATURE_VALUES:,}")
    return kwargs


def build_network(class_name: str, init_kwargs: dict, *, source: str = "checkpoint",
                  device: str | torch.device = "cpu") -> _Precond:
    """A preconditioner + SongUNet from constructor arguments (as NVlabs records them), checked first.

    ``device="meta"`` builds the structure without allocating weights.
    """
    source = printable(source, 200)
    if not isinstance(class_name, str):
        raise UnsupportedModelError(f"{source} names its network with a {type(class_name).__name__}, not a class "
                                    f"name (supported: {', '.join(PRECONDS)})")
    class_name = _PRECOND_ALIASES.get(class_name, class_name)
    if class_name not in PRECONDS:
        raise UnsupportedModelError(f"{source} holds a {printable(class_name, 60)}, which memdetect does not support "
                                    f"(supported: {', '.join(PRECONDS)} with the DDPM++ SongUNet)")
    kwargs = _checked_kwargs(class_name, init_kwargs, source)
    with torch.device(device):
        try:
            net = PRECONDS[class_name](**kwargs)
        except UnsupportedModelError as e:
            raise UnsupportedModelError(f"{source}: {e}") from None
        except (ValueError, TypeError, RuntimeError, ArithmeticError) as e:
            raise UnsupportedModelError(f"{source}: cannot build {class_name} from its arguments "
                                        f"({printable(str(e), 160)})") from None
    for name, m in net.named_modules():
        channels = m.weight.shape[0] if isinstance(m, GroupNorm) else 0
        if isinstance(m, GroupNorm) and (m.num_groups < 1 or channels % m.num_groups):
            raise UnsupportedModelError(f"{source}: the arguments of {class_name} give {name} {channels} channels, "
                                        f"which group normalisation cannot split into min(32, channels / 4) groups")
    return net


def load_state(net: _Precond, state: dict[str, torch.Tensor], source: str) -> _Precond:
    """Load ``state`` into ``net`` (built on any device, meta included) after checking names, shapes and dtypes.

    Every parameter must have a floating-point tensor of its exact shape, so the network allocated here is at most
    twice the bytes of the tensors read (float16 -> float32), which the readers bound by the file size.
    """
    source = printable(source, 200)
    want = net.state_dict(keep_vars=True)
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    if missing or unexpected:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {printable(unexpected[0], 120)})" if unexpected else ""]
        raise ModelNotFoundError(f"{source} does not match the network its configuration describes: tensors "
                                 f"{' and '.join(p for p in parts if p)}")
    for k, v in want.items():
        t = state[k]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(v.shape):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ModelNotFoundError(f"{source}: tensor {k} has shape {got}, the network expects {tuple(v.shape)}")
        if not t.is_floating_point():
            raise ModelNotFoundError(f"{source}: tensor {k} holds {str(t.dtype).replace('torch.', '')} values, not "
                                     f"floating-point weights")
    if any(p.is_meta for p in want.values()):
        net = net.to_empty(device="cpu")
    with torch.no_grad():
        for k, v in net.state_dict(keep_vars=True).items():
            v.copy_(state[k])
    return net.eval().requires_grad_(False)
