"""Prepared datasets in ArrayRecord files: the record format, an atomic split writer, a random-access source.

A prepared split (scripts/prepare_data.py writes it) is one folder:
    OUT/<split>/records.json                               metadata (below)
    OUT/<split>/<split>-00000-of-0000N.array_record        N shards, group_size 1 (one record per chunk,
                                                           so grain reads any record without its neighbours)

Record format (version 1), dependency-free: one ArrayRecord record per example holds
    b"LQR1"                     4 bytes, magic and version
    n                           uint32, little-endian: length of the header
    header                      n bytes of UTF-8 JSON: {"name": str, "image": int, "label": int} and, for a
                                paired example, "reference": int
    image bytes                 header["image"] bytes: the encoded image exactly as in the source (JPEG/PNG)
    label bytes                 header["label"] bytes: a single-channel 8-bit PNG of train ids (255 = ignore),
                                so the source's label_map is "identity"; 0 bytes for an unlabeled example
    reference bytes             header["reference"] bytes (paired examples only): the encoded reference image
    matches bytes               header["matches"] bytes (matching pairs only): .npy of (n, 4) float32
                                (x_ref, y_ref, x, y) pixel correspondences
A record therefore decodes to {"image": bytes, "label": bytes, "name": str}, the record FolderSource gives,
plus "reference": bytes for a paired example (refign_sources.PairedSource) and "matches": bytes for a
matching pair (refign_matching.py). RecordSource.with_origin adds "image_path" and "label_path", which name
the record, its index and its shard in decoding errors (the pipelines apply it).

records.json: {"format": "lqseg-records", "version": 1, "dataset", "split", "count", "shards":
[{"file", "count"}], "num_classes", "classes", "label_map": "identity", "ignore_label": 255,
"label_encoding", "source"}.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import grain
from tqdm.auto import tqdm

from .sources import DataError

MAGIC = b"LQR1"
FORMAT = "lqseg-records"
VERSION = 1
METADATA = "records.json"
WRITER_OPTIONS = "group_size:1"
_HEADER_LEN = struct.Struct("<I")


# Payloads after the label, in this order, present when the header names them.
OPTIONAL_FIELDS = ("reference", "matches")


def encode_record(
    name: str, image: bytes, label: bytes, reference: bytes | None = None, matches: bytes | None = None
) -> bytes:
    """One example -> the bytes of one record (format above); `reference` for a paired example, `matches`
    (an .npy of (n, 4) float32 x_ref, y_ref, x, y) for a matching pair."""
    fields = {"name": name, "image": len(image), "label": len(label)}
    payloads = [image, label]
    for key, value in zip(OPTIONAL_FIELDS, (reference, matches), strict=True):
        if value is not None:
            fields[key] = len(value)
            payloads.append(value)
    header = json.dumps(fields).encode()
    return b"".join((MAGIC, _HEADER_LEN.pack(len(header)), header, *payloads))


def decode_record(data: bytes, where: str = "record") -> dict:
    """The bytes of one record -> {"image": bytes, "label": bytes, "name": str} plus the optional fields its
    header names; `where` names it in errors."""
    if data[:4] != MAGIC:
        raise DataError(f"{where}: starts with {data[:4]!r} (expected the record magic {MAGIC!r})")
    if len(data) < 8:
        raise DataError(f"{where}: {len(data)} bytes is too short for a record header")
    (n,) = _HEADER_LEN.unpack_from(data, 4)
    try:
        header = json.loads(data[8 : 8 + n])
        name = header["name"]
        sizes = {"image": int(header["image"]), "label": int(header["label"])}
        sizes.update({k: int(header[k]) for k in OPTIONAL_FIELDS if k in header})
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{where}: malformed header ({e}); expected JSON with name, image, label") from e
    start = 8 + n
    if len(data) != start + sum(sizes.values()):
        raise DataError(
            f"{where} ({name}): holds {len(data) - start} payload bytes, the header announces "
            + " + ".join(str(v) for v in sizes.values())
        )
    out = {"name": name}
    for key, size in sizes.items():
        out[key] = data[start : start + size]
        start += size
    return out


def split_dir(root: str | Path, split: str) -> Path:
    return Path(root) / split


def has_records(root: str | Path, split: str) -> bool:
    """True when ROOT holds a prepared split (ROOT/<split>/records.json)."""
    return (split_dir(root, split) / METADATA).is_file()


def read_metadata(directory: str | Path) -> dict:
    """Reads and checks DIRECTORY/records.json; every shard it lists must exist."""
    directory = Path(directory)
    path = directory / METADATA
    if not path.is_file():
        raise DataError(f"prepared records: {path} does not exist (run scripts/prepare_data.py first)")
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f"prepared records: {path} is not valid JSON ({e})") from e
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise DataError(
            f"prepared records: {path} has format {meta.get('format')!r} version {meta.get('version')!r} "
            f"(expected {FORMAT!r} version {VERSION}; re-run scripts/prepare_data.py)"
        )
    for shard in meta["shards"]:
        if not (directory / shard["file"]).is_file():
            raise DataError(
                f"prepared records: shard {directory / shard['file']} listed in {path} is missing"
            )
    return meta


class RecordSource:
    """A prepared split with random access; the same interface as FolderSource (grain RandomAccessDataSource).

    `num_classes` is the model's class count (Decode checks labels against it); by default the dataset's.
    """

    def __init__(self, directory: str | Path, *, num_classes: int | None = None):
        directory = Path(directory)
        meta = read_metadata(directory)
        self.directory = directory
        self.metadata = meta
        self.label_map = meta["label_map"]
        self.num_classes = num_classes if num_classes is not None else meta["num_classes"]
        self.description = f"{meta['dataset']} records {directory} [{meta['split']}]"
        paths = [str(directory / s["file"]) for s in meta["shards"]]
        self._shards = [(path, int(s["count"])) for path, s in zip(paths, meta["shards"], strict=True)]
        try:
            self._data = grain.sources.ArrayRecordDataSource(paths)
        except Exception as e:  # array_record raises a bare RuntimeError for a truncated or damaged shard
            raise DataError(
                f"{self.description}: shard {self._unreadable_shard(paths)} cannot be opened "
                f"({type(e).__name__}: {str(e).strip()[:200] or 'truncated or damaged'}); expected a complete "
                "ArrayRecord file (re-run scripts/prepare_data.py)"
            ) from e
        if len(self._data) != meta["count"]:
            raise DataError(
                f"{self.description}: shards hold {len(self._data)} records, {directory / METADATA} says "
                f"{meta['count']} (re-run scripts/prepare_data.py)"
            )
        if not len(self._data):
            raise DataError(f"{self.description}: no records")

    def __len__(self) -> int:
        return len(self._data)

    def _unreadable_shard(self, paths: list[str]) -> str:
        for path in paths:
            try:
                grain.sources.ArrayRecordDataSource([path])
            except Exception:
                return path
        return " or ".join(paths)

    def _shard_of(self, index: int) -> str:
        for path, count in self._shards:
            if index < count:
                return path
            index -= count
        return "?"

    def __getitem__(self, index: int) -> dict:
        try:
            data = self._data[index]
        except (IndexError, KeyError):
            raise
        except Exception as e:  # a damaged chunk: riegeli reports a hash mismatch without the file
            raise DataError(
                f"{self.description}: record {index} in shard {self._shard_of(index)} cannot be read "
                f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else 'damaged'}); "
                "re-run scripts/prepare_data.py"
            ) from e
        return decode_record(data, f"{self.description} record {index}")

    def with_origin(self, index: int, record: dict) -> dict:
        """`record` (this source's `index`) with "image_path" and "label_path" naming its record and shard,
        which Decode's errors name (a folder source's records carry their files' paths)."""
        where = f"{record['name']} (record {index} of {self._shard_of(index)})"
        return {**record, "image_path": where, "label_path": f"of {where}"}

    def __repr__(self) -> str:
        return f"RecordSource({self.description}, {len(self)} examples)"


def shard_counts(count: int, num_shards: int) -> list[int]:
    """Contiguous, near-equal shard sizes (the first `count % num_shards` shards take one more)."""
    num_shards = max(1, min(num_shards, count))
    base, extra = divmod(count, num_shards)
    return [base + (i < extra) for i in range(num_shards)]


def write_split(
    out: str | Path,
    split: str,
    examples: Iterable[tuple],
    *,
    count: int,
    num_shards: int,
    metadata: dict,
    progress: bool = True,
    extra_files: dict[str, bytes] | Callable[[], dict[str, bytes]] | None = None,
) -> dict:
    """Writes `count` (name, image bytes, label PNG bytes[, reference bytes[, matches]]) examples as OUT/<split>/,
    replacing what was there; `extra_files` (file name -> bytes, or a function called once every example is
    written, for files computed on the way) are written beside records.json.

    Everything is written to a temporary folder beside it and swapped in by renames only once complete,
    so an error half-way (a corrupt image) leaves the previous output untouched. Returns the metadata.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob(f".{split}.tmp-*"), *out.glob(f".{split}.old-*")]:  # left by an interrupted run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out / f".{split}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # (not mkdtemp: its 0700 mode would become the split folder's)
    try:
        counts = shard_counts(count, num_shards)
        files = [f"{split}-{i:05d}-of-{len(counts):05d}.array_record" for i in range(len(counts))]
        it = iter(examples)
        written = 0
        with tqdm(
            total=count, desc=f"{metadata.get('dataset', 'records')} {split}", disable=not progress
        ) as bar:
            for file, n in zip(files, counts, strict=True):
                writer = ArrayRecordWriter(str(tmp / file), WRITER_OPTIONS)
                try:
                    for _ in range(n):
                        example = next(it, None)
                        if example is None:
                            raise DataError(f"{split}: got {written} examples, expected {count}")
                        writer.write(encode_record(*example))
                        written += 1
                        bar.update(1)
                finally:
                    writer.close()
        if next(it, None) is not None:
            raise DataError(f"{split}: got more than the {count} examples announced")
        meta = {
            "format": FORMAT,
            "version": VERSION,
            **metadata,
            "split": split,
            "count": count,
            "shards": [{"file": f, "count": n} for f, n in zip(files, counts, strict=True)],
        }
        (tmp / METADATA).write_text(json.dumps(meta, indent=1) + "\n")
        if callable(extra_files):
            extra_files = extra_files()
        for file_name, data in (extra_files or {}).items():
            (tmp / file_name).write_bytes(data)
        final = split_dir(out, split)
        old = None
        if final.exists():
            old = out / f".{split}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return meta
    except BaseException:
        if hasattr(examples, "close"):  # a generator: stop its workers
            examples.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
