"""Images in, reports out: discovery, safe decoding, the preprocessing recipe, and report writers.

Preprocessing recipe ``pil-fit-bicubic`` (written into every report): decode with Pillow, apply the EXIF
orientation, take the first frame of animated / multi-page files, convert any mode to 8-bit RGB (16-bit and float
images are rescaled from their full range, alpha is dropped), then scale the shorter side to the model's
resolution with bicubic filtering and crop the centre square (``ImageOps.fit``).

A file that cannot be turned into pixels raises ``ImageError`` with a one-line reason; the scan records it as an
error row and goes on.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import stat
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import InputError, UsageError

PREPROCESS = "pil-fit-bicubic"
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"})
#: Refuse images with more pixels than this (decompression-bomb guard; Pillow's own default warns at 89 MP).
MAX_PIXELS = 64_000_000

ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(Exception):
    """A file could not be read as an image; the message is one line, for the report's ``error`` column."""


def display_path(path: str | os.PathLike) -> str:
    """A printable, UTF-8-safe form of a path (undecodable bytes become ``\\xNN``)."""
    raw = os.fsencode(path)
    return raw.decode("utf-8", errors="backslashreplace")


def discover(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Image files under ``paths``: files given directly are kept whatever their suffix; folders are searched
    recursively for image suffixes (case-insensitive). Sorted per argument, duplicates removed, order kept.

    Entries that look like images but are not regular files (a folder named ``x.png``, a broken link) are returned
    too, so that the scan reports them as error rows instead of silently skipping them.
    Raises FileNotFoundError for an argument that does not exist.
    """
    out: list[Path] = []
    seen: set[Path] = set()
    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            found = []
            # a folder that cannot be listed is kept as an entry, so its images are reported, not silently lost
            for root, dirs, files in os.walk(p, followlinks=False, onerror=lambda e: found.append(Path(e.filename))):
                dirs.sort()
                for name in dirs + files:
                    if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                        # a folder named like an image is kept: the scan reports it as an error row
                        found.append(Path(root) / name)
            batch = sorted(found, key=lambda q: os.fsencode(q))
        elif p.exists() or p.is_symlink():
            batch = [p]
        else:
            raise FileNotFoundError(f"path {display_path(p)} does not exist")
        for q in batch:
            if q not in seen:
                seen.add(q)
                out.append(q)
    return out


def expand_globs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Paths with quoted glob patterns expanded (``'dir/mem_*.png'``, ``**`` included), sorted; a path that exists is
    kept as it is. A repeatable option cannot take the many arguments an unquoted shell glob expands to, and Windows
    shells do not expand globs at all. Raises InputError for a pattern that matches nothing."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists() and any(c in str(p) for c in "*?["):
            matches = sorted(glob.glob(str(p), recursive=True))
            if not matches:
                raise InputError(f"no file matches {display_path(p)}")
            out.extend(Path(m) for m in matches)
        else:
            out.append(p)
    return out


def _special_kind(path: Path) -> str | None:
    """``"fifo"``, ``"socket"``, ``"device"`` for a path that exists but is not a regular file or folder, else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # reported by the open below, with its own reason
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "device"


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") else (a.max() if a.size and a.max() > 255 else 255.0)
        lo = 0.0 if mode != "F" else min(0.0, float(a.min()) if a.size else 0.0)
        if mode == "F" and a.size and a.max() <= 1.0:
            hi = 1.0
        a = np.clip((a - lo) / max(hi - lo, 1e-12) * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def load_image(path: str | os.PathLike, resolution: int) -> np.ndarray:
    """Read ``path`` and return uint8 ``[3, R, R]`` following the ``pil-fit-bicubic`` recipe."""
    p = Path(path)
    if p.is_dir():
        if not os.access(p, os.R_OK | os.X_OK):
            raise ImageError("folder cannot be listed: permission denied")
        raise ImageError("is a directory, not an image file")
    if p.is_symlink() and not p.exists():
        raise ImageError("broken symbolic link")
    kind = _special_kind(p)
    if kind:  # opening a FIFO would block the scan forever; a device could be endless
        raise ImageError(f"not a regular file ({kind})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise ImageError(f"image too large ({w}x{h} = {w * h / 1e6:.0f} MP > {MAX_PIXELS / 1e6:.0f} MP "
                                     f"limit; possible decompression bomb)")
                if w < 1 or h < 1:
                    raise ImageError(f"image has no pixels ({w}x{h})")
                if getattr(img, "n_frames", 1) > 1:
                    img.seek(0)
                img.load()
                img = ImageOps.exif_transpose(img)
                img = _to_rgb(img)
                img = ImageOps.fit(img, (resolution, resolution), method=Image.Resampling.BICUBIC,
                                   centering=(0.5, 0.5))
                arr = np.asarray(img, dtype=np.uint8)
    except ImageError:
        raise
    except UnidentifiedImageError:
        size = p.stat().st_size if p.exists() else 0
        raise ImageError("empty file (0 bytes)" if size == 0 else "not a recognised image format") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"decompression bomb guard: {e}") from None
    except Image.DecompressionBombWarning as e:
        raise ImageError(f"decompression bomb guard: {e}") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except OSError as e:  # truncated / corrupt data, unreadable file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageError(f"corrupt or unreadable image: {msg}") from None
    except (ValueError, SyntaxError, TypeError, IndexError, MemoryError, EOFError) as e:
        raise ImageError(f"cannot decode image: {type(e).__name__}: {e}") from None
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def image_seed(pixels: np.ndarray, seed: int) -> int:
    """Per-image noise seed from the run seed and the preprocessed pixels (not from batch or position)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(int(seed).to_bytes(8, "little", signed=True))
    h.update(np.ascontiguousarray(pixels).tobytes())
    return int.from_bytes(h.digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


def file_digest(path: str | os.PathLike) -> str | None:
    """sha256 of a file's bytes (None if it cannot be read, or is not a regular file: a FIFO would block)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    except OSError:
        return None


REPORT_FORMATS = (".csv", ".json", ".parquet")


def check_report_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.suffix.lower() not in REPORT_FORMATS:
        raise UsageError(f"report format {p.suffix or '(none)'!r} is not supported; use one of "
                         f"{', '.join(REPORT_FORMATS)}")
    return p


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Write ``path`` all at once: ``write(tmp)`` fills a temporary file beside it, which is fsynced and renamed over
    ``path`` (readers see the old file or the new one, never half of one). Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a report is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_report(df, path: str | os.PathLike, settings: dict | None = None) -> Path:
    """Write the per-image table to .csv / .json / .parquet (chosen by suffix), atomically.

    JSON is ``{"settings": {...}, "rows": [...]}``; CSV and Parquet carry the rows only (the settings are in
    constant columns when the detector adds them).
    """
    p = check_report_path(path)
    suffix = p.suffix.lower()
    if suffix == ".csv":
        atomic_write(p, lambda tmp: df.to_csv(tmp, index=False))
    elif suffix == ".json":
        rows = json.loads(df.to_json(orient="records"))
        doc = {"settings": settings or {}, "rows": rows}
        atomic_write(p, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1)))
    else:
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UsageError("writing .parquet needs pyarrow: pip install 'memdetect[parquet]'") from None
        atomic_write(p, lambda tmp: df.to_parquet(tmp, index=False))
    return p
