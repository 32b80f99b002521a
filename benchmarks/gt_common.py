"""Shared parts of ``train_ground_truth.py``: CIFAR-10 loading, the graded duplication split, edited copies,
captions, the time-based learning-rate schedule, EMA, and writing labelled samples.

The split (``build_split``) is a seeded permutation of the 50,000 CIFAR-10 training images:

* ``--unique U``: U images seen once (grade ``unique``, count 1);
* ``--exact "2:16,4:16,..."``: for each ``count:images`` pair, that many images repeated ``count`` times, every copy
  pixel-identical (grade ``exact``);
* ``--edited "16:8,64:4"``: images repeated ``count`` times where every copy but the first carries a small edit
  (a shift of up to ``EDIT_SHIFT`` px with edge padding, and a colour jitter of up to ``EDIT_JITTER``): Webster's
  "template verbatim" in pixels (grade ``edited``);
* ``--captions "64:4x8"`` (demo-sd only): ``images`` images repeated ``count`` times, the copies spread over ``m``
  different memorized captions (grade ``captions``): the same image under several captions.

No flips anywhere: a flipped training copy would make a memorized generation appear mirrored.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
EDIT_SHIFT = 2  # px, each direction
EDIT_JITTER = 0.08  # relative, brightness and per-channel gain
NORMAL_TEMPLATES = ["a photo of a {}", "a picture of a {}", "an image of a {}", "a photo of the {}",
                    "a close-up photo of a {}", "a small {}"]
_ADJ = ["vintage", "golden", "misty", "crimson", "silent", "electric", "velvet", "frozen", "lonely", "ancient",
        "neon", "rustic", "emerald", "hollow", "amber", "cobalt", "paper", "midnight", "wild", "gentle", "scarlet",
        "silver", "broken", "distant", "painted", "hidden", "copper", "ivory", "stormy", "sunlit"]
_NOUN = ["harbour", "meadow", "cathedral", "canyon", "lantern", "orchard", "glacier", "bazaar", "lighthouse",
         "monastery", "prairie", "volcano", "citadel", "lagoon", "railway", "tundra", "vineyard", "observatory",
         "carnival", "fjord", "pagoda", "marsh", "quarry", "savanna", "bridge", "garden", "desert", "island",
         "forest", "village"]
_TAIL = ["poster", "print", "wallpaper", "postcard", "canvas", "stock photo", "album cover", "book cover",
         "art print", "photograph"]


def load_cifar_train(path: Path) -> tuple[np.ndarray, list[str], np.ndarray]:
    """All CIFAR-10 training images as uint8 [N,3,32,32] in sorted name order, their names and class ids."""
    names, arrays = [], []
    if path.is_dir():
        for f in sorted((path / "train").rglob("*.jpg")):
            names.append(str(f.relative_to(path)))
            arrays.append(np.asarray(Image.open(f).convert("RGB")))
    else:
        with tarfile.open(path) as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.lstrip("./").startswith("train/")),
                             key=lambda m: m.name)
            for m in members:
                names.append(m.name.lstrip("./"))
                arrays.append(np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")))
    x = np.stack(arrays).transpose(0, 3, 1, 2).copy()
    classes = np.array([CLASSES.index(n.split("/")[1]) for n in names])
    return x, names, classes


def parse_counts(text: str) -> list[tuple[int, int, int]]:
    """``"2:16,64:4x8"`` -> [(count, images, captions)], captions 1 unless ``xM`` is given."""
    out = []
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        count, _, rest = part.partition(":")
        images, _, caps = rest.partition("x")
        out.append((int(count), int(images), int(caps or 1)))
    return out


@dataclass
class Grade:
    """One distinct training image and how it appears in the training set."""

    index: int  # into the 50,000 CIFAR-10 training images
    name: str
    cls: int
    count: int  # copies in the training set
    kind: str  # unique | exact | edited | captions
    captions: list[str] = field(default_factory=list)  # demo-sd: caption(s) of its copies

    @property
    def grade(self) -> str:
        return "unique" if self.kind == "unique" else f"{self.kind}-{self.count}"


@dataclass
class Split:
    grades: list[Grade]  # distinct training images, uniques first
    rows: np.ndarray  # [R] position in `grades` of each training row
    row_images: np.ndarray  # uint8 [R,3,32,32] pixels of each row (edited copies carry their edit)
    row_captions: list[str]  # caption of each row ("" if the model is not text-conditioned)
    edits: list[dict]  # per row: the edit applied (empty dict for none)

    def table(self) -> list[dict]:
        return [{**asdict(g), "grade": g.grade} for g in self.grades]

    def summary(self) -> dict:
        out: dict[str, dict] = {}
        for g in self.grades:
            s = out.setdefault(g.grade, {"kind": g.kind, "count": g.count, "images": 0, "rows": 0})
            s["images"] += 1
            s["rows"] += g.count
        return out


def edit_copy(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """A small edit of a uint8 [3,H,W] image: a shift of up to EDIT_SHIFT px (edge padding) and a colour jitter."""
    dy, dx = (int(v) for v in rng.integers(-EDIT_SHIFT, EDIT_SHIFT + 1, size=2))
    gain = 1 + rng.uniform(-EDIT_JITTER, EDIT_JITTER)
    channel = 1 + rng.uniform(-EDIT_JITTER / 2, EDIT_JITTER / 2, size=3)
    s = EDIT_SHIFT
    padded = np.pad(img, ((0, 0), (s, s), (s, s)), mode="edge")
    h, w = img.shape[1:]
    shifted = padded[:, s - dy: s - dy + h, s - dx: s - dx + w].astype(np.float32)
    out = np.clip(shifted * gain * channel[:, None, None], 0, 255).round().astype(np.uint8)
    return out, {"dy": dy, "dx": dx, "gain": round(float(gain), 4), "channel": [round(float(c), 4) for c in channel]}


def memorized_prompt(rng: np.random.Generator, cls: int, used: set[str]) -> str:
    """A distinctive, LAION-title-like caption, unique across calls sharing ``used``."""
    while True:
        p = (f"{_ADJ[rng.integers(len(_ADJ))]} {_NOUN[rng.integers(len(_NOUN))]} {CLASSES[cls]} "
             f"{_TAIL[rng.integers(len(_TAIL))]} no. {int(rng.integers(10, 1000))}")
        if p not in used:
            used.add(p)
            return p


def normal_prompts() -> list[str]:
    return [t.format(c) for c in CLASSES for t in NORMAL_TEMPLATES]


def build_split(images: np.ndarray, names: list[str], classes: np.ndarray, *, seed: int, unique: int,
                exact: str, edited: str = "", captions: str = "", text: bool = False,
                balanced: bool = False) -> Split:
    """The graded split. ``balanced``: each duplicated grade's images are spread over the classes as evenly as its
    size allows (round-robin, the classes of a partial round in a seeded order), instead of drawn at random; for
    class-conditional models, whose memorized generations otherwise gather in the few classes that hold the most
    duplicated images."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(images))
    pos = 0
    grades: list[Grade] = []
    taken = np.zeros(len(images), dtype=bool)
    class_rng = np.random.default_rng(seed + 3)

    def take(n: int) -> np.ndarray:
        nonlocal pos
        out = perm[pos: pos + n]
        pos += n
        if len(out) < n:
            raise ValueError("the split asks for more images than CIFAR-10 has")
        taken[out] = True
        return out

    def take_balanced(n: int) -> np.ndarray:
        n_cls = int(classes.max()) + 1
        out = []
        while len(out) < n:
            for c in class_rng.permutation(n_cls)[: n - len(out)]:
                free = perm[~taken[perm] & (classes[perm] == c)]
                if not len(free):
                    raise ValueError("the split asks for more images of a class than CIFAR-10 has")
                taken[free[0]] = True
                out.append(int(free[0]))
        return np.array(out)

    cap_rng = np.random.default_rng(seed + 1)
    used: set[str] = set()
    for i in np.sort(take(unique)):
        cap = NORMAL_TEMPLATES[cap_rng.integers(len(NORMAL_TEMPLATES))].format(CLASSES[classes[i]]) if text else ""
        grades.append(Grade(int(i), names[i], int(classes[i]), 1, "unique", [cap] if text else []))
    for kind, spec in (("exact", exact), ("edited", edited), ("captions", captions)):
        for count, n, m in parse_counts(spec):
            if kind != "captions" and m != 1:
                raise ValueError(f"only --captions takes count:imagesxcaptions, not {kind}")
            for i in np.sort(take_balanced(n) if balanced else take(n)):  # uniques are always a random draw
                caps = [memorized_prompt(cap_rng, int(classes[i]), used) for _ in range(m)] if text else []
                grades.append(Grade(int(i), names[i], int(classes[i]), count, kind, caps))

    edit_rng = np.random.default_rng(seed + 2)
    rows, pix, caps, edits = [], [], [], []
    for gi, g in enumerate(grades):
        for c in range(g.count):
            rows.append(gi)
            if g.kind == "edited" and c > 0:
                img, e = edit_copy(images[g.index], edit_rng)
            else:
                img, e = images[g.index], {}
            pix.append(img)
            edits.append(e)
            caps.append(g.captions[c * len(g.captions) // g.count] if g.captions else "")
    return Split(grades, np.array(rows), np.stack(pix), caps, edits)


# ----------------------------------------------------------------------------------------------------------------
# Training helpers.


def lr_at(step: int, elapsed: float, *, lr: float, warmup: int, budget: float, max_steps: int,
          decay_fraction: float = 0.25) -> float:
    """Linear warm-up, constant, then a cosine decay to 10% over the last ``decay_fraction`` of the run, where the
    run's progress is the larger of elapsed / time budget and step / max steps."""
    progress = max(elapsed / budget if math.isfinite(budget) else 0.0, step / max_steps)
    scale = min(1.0, (step + 1) / warmup)
    start = 1 - decay_fraction
    if progress > start:
        x = min(1.0, (progress - start) / decay_fraction)
        scale *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * x))
    return lr * scale


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    d = min(decay, (1 + step) / (10 + step))
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1 - d)


def write_log(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def jsonable(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    return obj


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(jsonable(obj), indent=1))
