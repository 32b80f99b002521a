"""Images in, reports out: discovery, safe decoding, the preprocessing recipe, and report writers.

Preprocessing recipe ``pil-fit-bicubic`` (written into every report): decode with Pillow, apply the EXIF
orientation, convert any mode to 8-bit RGB (16-bit and float images are rescaled from their full range, alpha is
dropped), then scale the shorter side to the model's resolution with bicubic filtering and crop the centre square
(``ImageOps.fit``). Every frame of an animated / multi-page file is decoded so (``decode_frames``; at most
``MAX_FRAMES``, more is an error): a scan scores each and keeps, per score, the highest over the frames.

Read once: ``read_file`` reads a file into memory once (at most ``MAX_FILE_BYTES``), and the scan hashes and decodes
those same bytes (``content_digest``, ``decode_image``), so a row's key always names the bytes whose pixels were
scored, even when the file is replaced while the scan runs. Decoding is bounded per image: at most ``MAX_PIXELS``
pixels and ``MAX_DECODED_BYTES`` of decoded frame, checked from the header before any pixel is decoded, and 16-bit
and float images are converted to 8 bits a band of rows at a time.

A file that cannot be turned into pixels raises ``ImageError`` with a one-line reason; the scan records it as an
error row and goes on.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import io as _io
import json
import os
import stat
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import InputError, UsageError
from ..text import printable

PREPROCESS = "pil-fit-bicubic"
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"})
#: Refuse images with more pixels than this (decompression-bomb guard; Pillow's own default warns at 89 MP).
MAX_PIXELS = 64_000_000
#: Refuse image files larger than this: a file is read into memory once, then hashed and decoded from those bytes.
MAX_FILE_BYTES = 256 * 2**20
#: Refuse images whose decoded first frame would take more than this (Pillow keeps most modes at 4 bytes per pixel:
#: 64 MP of RGB is 256 MB). Checked from the header, before decoding.
MAX_DECODED_BYTES = 256 * 2**20
#: Bytes per pixel of Pillow's in-memory modes (others: 4).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
#: Refuse animated / multi-page images with more frames than this (each frame is scored).
MAX_FRAMES = 64
#: Rows converted at a time from 16-bit / float images (bounds the temporaries).
_ROW_BAND = 256

ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(Exception):
    """A file could not be read as an image; the message is one line, for the report's ``error`` column."""


def display_bytes(raw: bytes) -> str:
    """A UTF-8-safe form of a name's bytes that tells every two names apart: undecodable bytes become ``\\xNN`` and,
    so that a name holding those four characters never prints the same, a backslash becomes ``\\\\`` (on POSIX,
    where it is an ordinary character of a file name; Windows paths keep theirs as separators)."""
    if os.sep == "/":
        raw = raw.replace(b"\\", b"\\\\")
    return raw.decode("utf-8", errors="backslashreplace")


def display_path(path: str | os.PathLike) -> str:
    """A printable, UTF-8-safe form of a path that never equals another path's (``display_bytes``)."""
    return display_bytes(os.fsencode(path))


def display_name(name: str) -> str:
    """``display_path`` for a name that is not a local path (a tar member's, a URL), given as text."""
    return display_bytes(name.encode("utf-8", errors="surrogateescape"))


#: Leading bytes of a file that ``sniff_image`` reads, at most.
SNIFF_BYTES = 32
_PNM_SPACE = b" \t\r\n"


def looks_like_image(head: bytes) -> bool:
    """Whether a file's first bytes (``SNIFF_BYTES`` suffice) are the signature of an image format of
    ``IMAGE_EXTENSIONS`` that Pillow decodes: PNG / APNG, JPEG, GIF, WebP, BMP, TIFF (and BigTIFF), PNM (P1-P6,
    PFM). The weak ones are checked further, so that text is not taken for an image: a BMP's header size must be
    one Pillow reads, a PNM's magic must be followed by white space and a number (or a comment)."""
    if head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a",
                        b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return True
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    if head[:2] == b"BM" and len(head) >= 18:
        return int.from_bytes(head[14:18], "little") in (12, 40, 52, 56, 64, 108, 124)
    if len(head) >= 4 and head[:1] == b"P" and head[1:2] in (b"1", b"2", b"3", b"4", b"5", b"6", b"f", b"F"):
        rest = head[2:].lstrip(_PNM_SPACE)
        return head[2] in _PNM_SPACE and rest[:1] != b"" and (rest[:1].isdigit() or rest[:1] == b"#")
    return False


def sniff_image(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a regular file whose first bytes are an image signature (``looks_like_image``). Reads at
    most ``SNIFF_BYTES``; anything that is not a readable regular file (a folder, FIFO, device, broken link) is not
    an image by content, and is never waited on."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        return looks_like_image(os.read(fd, SNIFF_BYTES))
    except OSError:
        return False
    finally:
        os.close(fd)


def discover(paths: Iterable[str | os.PathLike], sniff: bool = False,
             by_content: set[Path] | None = None) -> list[Path]:
    """Image files under ``paths``: files given directly are kept whatever their suffix; folders are searched
    recursively for image suffixes (case-insensitive). Sorted per argument, duplicates removed, order kept.
    ``sniff=True`` (``memdetect audit``'s default): a folder's regular files without an image suffix are kept too
    when their first bytes are an image signature (``sniff_image``), and added to ``by_content`` when given (not
    under a ``.git`` folder inside the searched one: git's own files, never a commit's).

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
                # by content: a few leading bytes of each other file, outside git's own folder (no commit can put
                # a file there, and its LFS cache holds the raw bytes of other commits' images)
                git = sniff and ".git" in os.path.relpath(root, p).lower().split(os.sep)
                for name in files if sniff and not git else ():
                    if Path(name).suffix.lower() not in IMAGE_EXTENSIONS and sniff_image(os.path.join(root, name)):
                        found.append(Path(root, name))
                        if by_content is not None:
                            by_content.add(found[-1])
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


def _to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit or float image as 8-bit ``L``: rescaled from its full range (16-bit: 0..65535; ``I``: 0..max(255,
    max); ``F``: min(0, min)..max, or 0..1 when max <= 1), rounded. Converted a band of rows at a time: an 8000 x 8000
    16-bit image needs its 8-bit result and a few MB more, not float64 copies of the whole image."""
    mode = img.mode
    lo_px, hi_px = img.getextrema() if mode in ("I", "F") else (0, 65535)
    if mode.startswith("I;16"):
        lo, hi = 0.0, 65535.0
    elif mode == "I":
        lo, hi = 0.0, float(hi_px) if hi_px > 255 else 255.0
    else:  # "F"
        lo = min(0.0, float(lo_px))
        hi = 1.0 if hi_px <= 1.0 else (float(hi_px) if hi_px > 255 else 255.0)
    span = max(hi - lo, 1e-12)
    w, h = img.size
    out = np.empty((h, w), dtype=np.uint8)
    for top in range(0, h, _ROW_BAND):
        band = np.asarray(img.crop((0, top, w, min(h, top + _ROW_BAND))), dtype=np.float64)
        band -= lo  # the same operations, in the same order, as on the whole image: the same uint8 values
        band /= span
        band *= 255.0
        np.clip(band, 0, 255, out=band)
        out[top:top + band.shape[0]] = band.round()
    return Image.fromarray(out, mode="L")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _to_8bit(img)  # grey: converted to RGB after resizing (the same pixels, a third of the memory)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n} bytes"


def read_file(path: str | os.PathLike, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of an image file, read once (at most ``limit``); ``ImageError`` with a one-line reason for anything
    that is not a readable regular file of that size. A FIFO is never waited on (it is opened non-blocking and
    refused), and what is read is what was checked (``fstat`` of the open file)."""
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
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        raise ImageError("permission denied") from None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOENT) and p.is_symlink():
            raise ImageError("broken symbolic link") from None
        raise ImageError(f"cannot open: {printable(e.strerror or type(e).__name__)}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ImageError("is a directory, not an image file")
        if not stat.S_ISREG(st.st_mode):
            raise ImageError("not a regular file")
        if st.st_size > limit:
            raise ImageError(f"file too large ({_size(st.st_size)} > {_size(limit)} limit)")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except PermissionError:
        raise ImageError("permission denied") from None
    except OSError as e:
        raise ImageError(f"cannot read: {printable(e.strerror or type(e).__name__)}") from None
    finally:
        os.close(fd)
    if size > limit:  # the file grew while it was read
        raise ImageError(f"file too large (> {_size(limit)} limit)")
    return b"".join(chunks)


def content_digest(data: bytes) -> str:
    """sha256 of a file's bytes: the content part of a row's key (``memdetect.store.journal``)."""
    return hashlib.sha256(data).hexdigest()


def _check_frame(img: Image.Image) -> None:
    """The pixel and decoded-size limits of the current frame, from its header (before any pixel is decoded)."""
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise ImageError(f"image too large ({w}x{h} = {w * h / 1e6:.0f} MP > {MAX_PIXELS / 1e6:.0f} MP "
                         f"limit; possible decompression bomb)")
    if w < 1 or h < 1:
        raise ImageError(f"image has no pixels ({w}x{h})")
    decoded = w * h * _MODE_BYTES.get(img.mode, 4)
    if decoded > MAX_DECODED_BYTES:
        raise ImageError(f"image too large to decode ({w}x{h} {printable(img.mode, 20)} = "
                         f"{_size(decoded)} > {_size(MAX_DECODED_BYTES)} limit)")


def _fit(rgb: Image.Image, resolution: int) -> np.ndarray:
    rgb = ImageOps.fit(rgb, (resolution, resolution), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))
    arr = np.asarray(rgb if rgb.mode == "RGB" else rgb.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _decode(data: bytes, resolution: int, every_frame: bool) -> list[np.ndarray]:
    if not data:
        raise ImageError("empty file (0 bytes)")
    with _decoding():
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(_io.BytesIO(data)) as img:
                return _frames(img, resolution, every_frame, owned=True)


def _frames(img: Image.Image, resolution: int, every_frame: bool, *, owned: bool) -> list[np.ndarray]:
    """The recipe on an open image. ``owned``: the image is ours to turn in place and close early (decoded from
    bytes); else (a caller's image) it is left as it was, at the frame it was at."""
    _check_frame(img)
    n = getattr(img, "n_frames", 1)
    if every_frame and n > MAX_FRAMES:
        raise ImageError(f"too many frames ({n} > {MAX_FRAMES} limit): not every frame can be checked")
    if n > 1 and every_frame:
        at = img.tell()
        try:
            out = []
            for k in range(n):  # each frame as the viewer shows it (Pillow composes GIF / APNG frames)
                img.seek(k)
                _check_frame(img)  # a page of a TIFF has its own size
                img.load()
                out.append(_fit(_to_rgb(ImageOps.exif_transpose(img)), resolution))
            return out
        finally:
            if not owned:
                img.seek(at)
    if n > 1:
        img.seek(0)
    img.load()
    if owned:
        ImageOps.exif_transpose(img, in_place=True)  # no copy of an image that needs no turning
        rgb = _to_rgb(img)
        if rgb is not img:
            img.close()  # a converted frame's source goes before the resize allocates
    else:
        rgb = _to_rgb(ImageOps.exif_transpose(img))
    return [_fit(rgb, resolution)]


class _decoding:
    """Decoding errors as ``ImageError`` with a one-line reason."""

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if e is None or isinstance(e, ImageError) or not isinstance(e, Exception):
            return False
        if isinstance(e, UnidentifiedImageError):
            raise ImageError("not a recognised image format") from None
        if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
            raise ImageError(f"decompression bomb guard: {printable(e)}") from None
        if isinstance(e, OSError):  # truncated / corrupt data
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ImageError(f"corrupt or unreadable image: {printable(msg, 200)}") from None
        if isinstance(e, (ValueError, SyntaxError, TypeError, IndexError, MemoryError, EOFError)):
            raise ImageError(f"cannot decode image: {type(e).__name__}: {printable(e, 200)}") from None
        return False


def decode_image(data: bytes, resolution: int) -> np.ndarray:
    """Decode an image file's bytes into uint8 ``[3, R, R]`` following the ``pil-fit-bicubic`` recipe (the first
    frame of an animated / multi-page file: thumbnails, evidence, benchmarks; a scan uses ``decode_frames``)."""
    return _decode(data, resolution, every_frame=False)[0]


def decode_frames(data: bytes, resolution: int) -> np.ndarray:
    """Every frame of an image file's bytes as uint8 ``[F, 3, R, R]`` (``F`` = 1 for a still image), each following
    the ``pil-fit-bicubic`` recipe; ``ImageError`` for more than ``MAX_FRAMES`` frames (or any frame past the
    limits)."""
    return np.stack(_decode(data, resolution, every_frame=True))


def image_frames(img: Image.Image, resolution: int) -> np.ndarray:
    """Every frame of an open Pillow image as uint8 ``[F, 3, R, R]``, by the same ``pil-fit-bicubic`` recipe (EXIF
    orientation, 16-bit rescaling, the limits) as ``decode_frames``; the image is left as it was. ``ImageError``
    for one that cannot be turned into pixels."""
    with _decoding():
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return np.stack(_frames(img, resolution, every_frame=True, owned=False))


def load_image(path: str | os.PathLike, resolution: int) -> np.ndarray:
    """Read ``path`` (once) and return uint8 ``[3, R, R]`` following the ``pil-fit-bicubic`` recipe."""
    return decode_image(read_file(path), resolution)


def read_image(path: str | os.PathLike, resolution: int) -> tuple[str, np.ndarray]:
    """``(sha256 of the bytes, pixels decoded from those same bytes)``: the key and the pixels of one read."""
    data = read_file(path)
    return content_digest(data), decode_image(data, resolution)


def image_seed(pixels: np.ndarray, seed: int) -> int:
    """Per-image noise seed from the run seed and the preprocessed pixels (not from batch or position)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(int(seed).to_bytes(8, "little"))  # seeds are in [0, 2**64) (``check_seed``)
    h.update(np.ascontiguousarray(pixels).tobytes())
    return int.from_bytes(h.digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


def draw_seed(seed: int, k: int) -> int:
    """The noise seed of an image's ``k``-th draw (``--draws``): draw 0 is the image's own seed (``image_seed``), so
    one draw scores as before; draw k > 0 hashes the seed with k (deterministic, independent of batch and position)."""
    if k == 0:
        return int(seed)
    h = hashlib.blake2b(digest_size=8, person=b"memdetect-draw")
    h.update(int(seed).to_bytes(8, "little"))
    h.update(int(k).to_bytes(4, "little"))
    return int.from_bytes(h.digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


def file_digest(path: str | os.PathLike, limit: int = MAX_FILE_BYTES) -> str | None:
    """sha256 of a file's bytes, read in chunks (None if it cannot be read, is not a regular file, or is larger than
    ``limit``: such a file is an error row, never a journaled one). A FIFO is opened non-blocking and refused."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            h, size = hashlib.sha256(), 0
            for chunk in iter(lambda: f.read(1 << 20), b""):
                size += len(chunk)
                if size > limit:
                    return None
                h.update(chunk)
        return h.hexdigest()
    except OSError:
        return None


REPORT_FORMATS = (".csv", ".json", ".parquet")


def check_report_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.suffix.lower() not in REPORT_FORMATS:
        raise UsageError(f"report format {printable(p.suffix or '(none)')!r} is not supported; use one of "
                         f"{', '.join(REPORT_FORMATS)}")
    return p


def refuse_symlink(path: str | os.PathLike, what: str = "output") -> None:
    """UsageError when ``path`` is a symbolic link: reports and journals are never written through one."""
    if os.path.islink(path):
        raise UsageError(f"{what} {display_path(path)} is a symbolic link; memdetect does not write through links "
                         f"(remove it or choose another path)")


def check_destination(path: str | os.PathLike, what: str = "output") -> Path:
    """Check, before any work, that a file can be written at ``path``: not a symbolic link, a folder or a special
    file, and its nearest existing parent is a folder this process may create files in. UsageError (one line)
    otherwise; returns ``path``."""
    p = Path(path)
    name = display_path(p)
    refuse_symlink(p, what)
    if p.exists():
        if p.is_dir():
            raise UsageError(f"{what} {name} is a directory; give a file name")
        if not p.is_file():
            raise UsageError(f"{what} {name} is not a regular file")
    parent = p.parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{what} {name} cannot be written: {display_path(parent)} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {name} cannot be written: no permission to create files in "
                         f"{display_path(parent)}")
    return p


def check_destinations(destinations: dict[str, str | os.PathLike | None]) -> None:
    """``check_destination`` for every ``{what: path}`` given, and no two of them the same file."""
    seen: dict[str, str] = {}
    for what, path in destinations.items():
        if path is None:
            continue
        check_destination(path, what)
        real = os.path.realpath(path)
        if real in seen:
            raise UsageError(f"{what} and {seen[real]} are the same file ({display_path(path)}); give each its own")
        seen[real] = what


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Write ``path`` all at once: ``write(tmp)`` fills a temporary file beside it, which is fsynced and renamed over
    ``path`` (readers see the old file or the new one, never half of one). Returns ``path``."""
    path = Path(path)
    refuse_symlink(path)  # os.replace would replace a link, not follow it; refusing says so
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
        from .strict_json import dumps

        atomic_write(p, lambda tmp: Path(tmp).write_text(dumps(doc, indent=1)))
    else:
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UsageError("writing .parquet needs pyarrow: pip install 'memdetect[parquet]'") from None
        atomic_write(p, lambda tmp: df.to_parquet(tmp, index=False))
    return p
