"""Calibration data for `vflowopt optimize`: a JSONL of {"image": path, "prompt": text} lines, or the
small procedural sample set shipped in `vflowopt/assets/samples/` when no data file is given.

Relative image paths are resolved against the JSONL's folder. A bad line is a ConfigError naming
its line number; an image that cannot be opened is skipped with a warning, and if none is left the
data is refused.
"""

from __future__ import annotations

import json
import random
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..config import ConfigError

__all__ = ["DataSample", "load_jsonl", "select", "shipped_samples"]

SHIPPED_JSONL = "samples.jsonl"


@dataclass
class DataSample:
    line: int
    image_path: str
    prompt: str
    image: object = None  # PIL.Image once loaded


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise ConfigError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read data file {path}: {type(exc).__name__}: {exc}") from None
    return text.splitlines()


def parse_jsonl(path: str | Path) -> list[DataSample]:
    """The records of a JSONL data file (blank lines ignored), or a ConfigError naming the bad line."""
    path = Path(path).expanduser()
    records = []
    for number, raw in enumerate(_read_lines(path), start=1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"data file {path} line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(item, dict):
            raise ConfigError(f"data file {path} line {number}: expected an object like "
                              '{"image": "a.png", "prompt": "..."}')
        for key in ("image", "prompt"):
            if not isinstance(item.get(key), str) or not item[key].strip():
                raise ConfigError(f"data file {path} line {number}: '{key}' must be a non-empty string")
        image = Path(item["image"]).expanduser()
        if not image.is_absolute():
            image = path.parent / image
        records.append(DataSample(line=number, image_path=str(image), prompt=item["prompt"]))
    if not records:
        raise ConfigError(f"data file {path} is empty: it needs one JSON object per line, "
                          '{"image": "a.png", "prompt": "..."}')
    return records


def select(records: list[DataSample], n: int, seed: int = 0) -> list[DataSample]:
    """At most `n` records: all of them, or a seeded random subset kept in file order."""
    if len(records) <= n:
        return list(records)
    keep = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in keep]


def open_images(records: list[DataSample], source: str) -> list[DataSample]:
    """Opens every image as RGB; unreadable ones are skipped with a warning, none left is an error."""
    from PIL import Image, UnidentifiedImageError

    ok = []
    for rec in records:
        try:
            with Image.open(rec.image_path) as im:
                rec.image = im.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            warnings.warn(f"{source} line {rec.line}: skipping image {rec.image_path}: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}", stacklevel=2)
            continue
        ok.append(rec)
    if not ok:
        raise ConfigError(f"none of the {len(records)} images of {source} could be opened")
    return ok


def load_jsonl(path: str | Path, n: int | None = None, seed: int = 0) -> list[DataSample]:
    """Parse, subsample (n) and open the images of a JSONL data file."""
    records = parse_jsonl(path)
    if n is not None:
        records = select(records, n, seed)
    return open_images(records, f"data file {path}")


def shipped_samples(n: int | None = None, seed: int = 0) -> list[DataSample]:
    """The procedural sample images shipped with the package (see assets/samples/README)."""
    folder = resources.files("vflowopt").joinpath("assets", "samples")
    with resources.as_file(folder) as real:
        return load_jsonl(Path(real) / SHIPPED_JSONL, n, seed)
