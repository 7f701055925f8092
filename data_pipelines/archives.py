"""The dataset root behind prepare_data's --src: an extracted folder, or the downloaded zip archives, which
are extracted into a staging folder beside the output and removed afterwards."""

from __future__ import annotations

import contextlib
import shutil
import uuid
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from .sources import DataError

# What the dataset root holds (any of), to find it inside an extracted folder or archive.
MARKERS = {
    "cityscapes": ("leftImg8bit",),
    "acdc": ("rgb_anon",),
    "darkzurich": ("rgb_anon",),
    "nighttimedriving": ("leftImg8bit",),
    "bdd100k-night": ("images",),
    "robotcar": ("segmented_images", "correspondence_data"),
    "megadepth": ("scene_info", "Test"),
    "robotcar-matching": ("test6511.csv",),
}


def source_description(src: str | Path | Sequence[str | Path]) -> str:
    """The --src paths as written into records.json."""
    srcs = [src] if isinstance(src, (str, Path)) else src
    return ", ".join(str(Path(s).resolve()) for s in srcs)


def find_root(folder: Path, kind: str) -> Path:
    """FOLDER itself or the one folder at most two levels below it that holds the dataset's top entries."""
    markers = MARKERS[kind]

    def holds(p: Path) -> bool:
        return p.is_dir() and any((p / m).exists() for m in markers)

    if holds(folder):
        return folder
    found = sorted(p for p in [*folder.glob("*"), *folder.glob("*/*")] if holds(p))
    if len(found) != 1:
        what = "no folder" if not found else f"{len(found)} folders ({', '.join(map(str, found[:3]))})"
        raise DataError(
            f"{kind}: {folder} has {what} holding {' or '.join(markers)} (expected the {kind} dataset root, "
            "with its archives extracted into one folder)"
        )
    return found[0]


def _extract(archive: Path, into: Path, progress: bool) -> None:
    try:
        with zipfile.ZipFile(archive) as z:
            for member in tqdm(z.infolist(), desc=f"extracting {archive.name}", disable=not progress):
                z.extract(member, into)  # zipfile drops absolute and '..' path parts
    except zipfile.BadZipFile as e:
        raise DataError(f"{archive}: not a readable zip archive ({e})") from e


@contextlib.contextmanager
def dataset_root(
    kind: str, src: str | Path | Sequence[str | Path], out: str | Path, progress: bool = True
) -> Iterator[Path]:
    """The dataset root of SRC: an extracted folder (or the one below it holding the dataset), or the zip
    archives (SRC itself, or the *.zip in folder SRC when it holds no extracted dataset) extracted into
    OUT/.extract-<kind>-* and removed on exit, also after an error."""
    srcs = [Path(s) for s in ([src] if isinstance(src, (str, Path)) else src)]
    for s in srcs:
        if not s.exists():
            raise DataError(f"{kind}: --src {s} does not exist")
    archives = [s for s in srcs if s.is_file()]
    for folder in (s for s in srcs if s.is_dir()):
        try:
            root = find_root(folder.resolve(), kind)
        except DataError:
            found = sorted(folder.glob("*.zip"))
            if not found:
                raise
            archives += found
        else:
            if len(srcs) > 1:
                raise DataError(f"{kind}: --src takes one extracted folder or zip archives, got {srcs}")
            yield root
            return
    staging = Path(out).resolve() / f".extract-{kind}-{uuid.uuid4().hex[:8]}"
    try:
        for archive in archives:
            _extract(archive, staging, progress)
        yield find_root(staging, kind)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
