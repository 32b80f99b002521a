"""Random weights for a real architecture, streamed tensor by tensor into sharded safetensors files.

A 12B-parameter transformer is 24 GB in bf16: building it and calling ``save_pretrained`` would hold all of it in
memory. Here the network is built on ``meta`` (``memdetect.models.lazy.build_empty``: no memory), and each tensor of
its ``state_dict`` is written straight to disk in the safetensors layout (8-byte header length, JSON header with
dtype, shape and byte offsets, then the raw bytes), a few MB at a time, into shards of at most ``shard_bytes`` with
the ``*.safetensors.index.json`` that diffusers and transformers read (``weight_map``: tensor name -> file). Peak
memory is one pool of random numbers (8 MB), whatever the model's size.

Values: floating parameters are N(0, ``std``^2) in ``dtype`` (bf16 by default, as FLUX.1-dev and SD3.5 are
released), taken at a random offset of a pool of 4M independent normals drawn once from a seeded generator (tensors
larger than the pool are several random windows of it): random, not independent across tensors, which does not
change a forward's speed or memory. Persistent buffers keep the values the constructor computed (as in a real
checkpoint); integer tensors are written as constructed.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

POOL = 1 << 22
DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL", torch.uint8: "U8"}


def _pool(dtype: torch.dtype, std: float, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(POOL, generator=g) * std).to(dtype).view(torch.uint8).numpy()


#: (name, dtype on disk, shape, constructed value or None for random)
Spec = tuple[str, torch.dtype, tuple, "torch.Tensor | None"]


def tensor_specs(module: torch.nn.Module, dtype: torch.dtype) -> list[Spec]:
    """(name, dtype on disk, shape, constructed value or None for random) for every tensor of ``state_dict`` (a
    tensor tied under several names once): floating parameters random in ``dtype``; buffers (and non-floating
    tensors) as constructed."""
    params = dict(module.named_parameters())
    out, seen = [], set()
    for name, t in module.state_dict(keep_vars=True).items():
        if id(t) in seen:  # a tied weight (T5's encoder.embed_tokens is shared): once, as save_pretrained does
            continue
        seen.add(id(t))
        if name in params and t.is_floating_point():
            out.append((name, dtype, tuple(t.shape), None))
        else:
            if t.is_meta:
                raise ValueError(f"{name} is on meta and not a parameter: cannot write its value")
            out.append((name, t.dtype, tuple(t.shape), t.detach().cpu().contiguous()))
    return out


def write_sharded(specs, folder: Path, *, prefix: str, index_name: str, shard_bytes: int = 5 * 10**9,
                  std: float = 0.02, seed: int = 0) -> dict:
    """Write ``specs`` (from ``tensor_specs``) as ``prefix-0000k-of-0000n.safetensors`` shards plus ``index_name``
    in ``folder`` (a single ``prefix.safetensors`` when it fits one shard). Returns ``{"files", "bytes",
    "tensors"}``."""
    folder.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], [], 0
    for spec in specs:
        nbytes = int(np.prod(spec[2], dtype=np.int64)) * torch.empty((), dtype=spec[1]).element_size()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((spec, nbytes))
        size += nbytes
    if current:
        shards.append(current)
    rng = np.random.default_rng(seed)
    pools: dict[torch.dtype, np.ndarray] = {}
    names = ([f"{prefix}.safetensors"] if len(shards) == 1 else
             [f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards):
        header, offset = {}, 0
        for (name, dt, shape, _), nbytes in shard:
            header[name] = {"dtype": DTYPES[dt], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for (name, dt, shape, value), nbytes in shard:
                if value is not None:
                    f.write(value.view(torch.uint8).numpy().tobytes() if value.dtype == torch.bfloat16
                            else value.numpy().tobytes())
                else:
                    pool = pools.get(dt)
                    if pool is None:
                        pool = pools[dt] = _pool(dt, std, seed)
                    step = pool.size // 2
                    left = nbytes
                    while left:
                        n = min(left, step)
                        start = int(rng.integers(0, pool.size // 2)) & ~7  # aligned to the element size
                        f.write(memoryview(pool[start:start + n]))
                        left -= n
                weight_map[name] = fname
                total += nbytes
    if len(shards) > 1:
        (folder / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                    indent=2, sort_keys=True))
    return {"files": names, "bytes": total, "tensors": len(weight_map)}


def write_random_diffusers(cls, config: dict, folder: Path, *, dtype: torch.dtype = torch.bfloat16,
                           shard_bytes: int = 5 * 10**9, seed: int = 0) -> dict:
    """A diffusers model folder (``config.json`` + sharded ``diffusion_pytorch_model*.safetensors``) of ``cls``
    built from ``config`` with random weights, streamed (see the module docstring)."""
    from memdetect.models.lazy import INDEX_NAME, build_empty

    module = build_empty(cls, config)
    folder.mkdir(parents=True, exist_ok=True)
    module.save_config(str(folder))
    info = write_sharded(tensor_specs(module, dtype), folder, prefix="diffusion_pytorch_model",
                         index_name=INDEX_NAME, shard_bytes=shard_bytes, seed=seed)
    info["parameters"] = sum(p.numel() for p in module.parameters())
    return info


def write_random_transformers(model_cls, config, folder: Path, *, dtype: torch.dtype = torch.bfloat16,
                              shard_bytes: int = 5 * 10**9, seed: int = 0) -> dict:
    """The same for a transformers model (``config.json`` + ``model*.safetensors`` with
    ``model.safetensors.index.json``)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        module = model_cls(config)
    module.tie_weights()  # as a normal construction does (T5's encoder.embed_tokens is shared.weight)
    config.torch_dtype = dtype
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    info = write_sharded(tensor_specs(module, dtype), folder, prefix="model", index_name="model.safetensors.index.json",
                         shard_bytes=shard_bytes, seed=seed)
    info["parameters"] = sum(p.numel() for p in module.parameters())
    return info
