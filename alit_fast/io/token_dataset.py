"""A tokenized dataset on disk: shards of token files and one index, written by
``alit-fast pretokenize`` and read back by ``open_dataset`` for training a generator on tokens.

Layout of the output directory:

- ``shard-00000.safetensors``, ... : ordinary token files (``TokenBatch.save``: checksums, the
  encoding model's config, the source names), shard k holding images [k*S, (k+1)*S) of the plan;
- ``shard-00000.stamps.json``, ... : beside each shard, what its images were on disk when they were
  read (a file's size and modification time; a tar member's tar and header), so that a resume
  redoes a shard whose images were edited or replaced in place since. Not in the index, and not in
  the shards: two copies of a data set give the same shards and index whatever their files' times;
- ``index.json``: the plan's fingerprint, the model and criterion, every shard (file, sha256 of its
  bytes, images) and per image [source, token count, shard, offset]; images that could not be read
  are listed under ``skipped`` with the reason, never dropped silently.

A shard depends only on its images and the model (its batches start at the shard's first image),
so any number of processes, any resumption order and a single process all write the same bytes.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import tarfile
import threading
import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors import safe_open

from ..inference import TokenBatch
from ..files import LOCK_NAME, write_atomic
from .images import IMAGE_EXTENSIONS, find_images, load_image, read_in_order

INDEX_NAME = "index.json"
INDEX_FORMAT = "alit_fast.token_dataset.v1"
SHARD_PATTERN = "shard-{:05d}.safetensors"
STAMPS_PATTERN = "shard-{:05d}.stamps.json"
STAMPS_FORMAT = "alit_fast.token_dataset.stamps.v1"
TAR_SEPARATOR = "::"
# the names of the temporary files a killed save leaves, which a run may claim as its own
_SHARD_NAME = re.compile(r"shard-\d{5,}\.(safetensors|stamps\.json)\.tmp")


# ---------------------------------------------------------------------------- sources
def list_sources(inputs: Iterable[str | os.PathLike]) -> list[str]:
    """Every image to tokenize, in a fixed order: files as given, directories searched recursively
    (sorted), and webdataset-style ``.tar`` shards as ``TAR::MEMBER`` for each image member, in
    the tar's own order."""
    sources: list[str] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"input not found: {path}")
        if path.is_file() and path.suffix.lower() == ".tar":
            sources += _tar_members(path)
        elif path.is_dir():
            for found in find_images([path]):
                sources.append(str(found))
            for tar in sorted(p for p in path.rglob("*.tar") if p.is_file()):
                sources += _tar_members(tar)
        else:
            sources.append(str(path))
    return sources


def _tar_members(path: Path) -> list[str]:
    try:
        with tarfile.open(path) as tar:
            members = tar.getmembers()
        end = members[-1].offset_data + -(-members[-1].size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE if members else 0
        with open(path, "rb") as f:
            f.seek(end)
            trailer = f.read(tarfile.BLOCKSIZE)
    except (tarfile.TarError, OSError) as exc:
        raise ValueError(f"{path} cannot be read as a tar shard: {exc}") from exc
    # tarfile stops quietly where a file cut between members ends: only the end-of-archive block
    # (zeros) after the last member shows that nothing is missing
    if len(trailer) < tarfile.BLOCKSIZE or any(trailer):
        raise ValueError(f"{path} is cut short or damaged after its {len(members)}th member (no end-of-archive "
                         "block): images after it would be lost; re-create or re-download it")
    names = [m.name for m in members if m.isfile() and Path(m.name).suffix.lower() in IMAGE_EXTENSIONS]
    return [f"{path}{TAR_SEPARATOR}{name}" for name in names]


@dataclass(frozen=True)
class _Member:
    offset: int  # where its bytes start in the tar file (an uncompressed tar's)
    size: int
    mtime: int
    regular: bool  # neither a link nor sparse (tarfile resolves those)


@functools.lru_cache(maxsize=8)
def _tar_index(tar_path: str, stamp: tuple) -> tuple[dict[str, _Member], bool]:
    """Every member of a tar by name (a repeated name: the last, as tarfile reads it), and whether
    its offsets can be sought in the file (not for a compressed tar). Read once per tar, and again
    when ``stamp``, its stat, changes: finding a member by name walks every header before it."""
    try:
        tar, seekable = tarfile.open(tar_path, "r:"), True
    except tarfile.ReadError:
        tar, seekable = tarfile.open(tar_path), False
    with tar:
        # a sparse member's stored bytes are not its contents: tarfile expands them
        return {m.name: _Member(m.offset_data, m.size, m.mtime, m.isreg() and not m.issparse()) for m in tar.getmembers()}, seekable


def _tar_members_of(tar_path: str) -> tuple[dict[str, _Member], bool]:
    return _tar_index(tar_path, _file_identity(tar_path))


def _tar_member_bytes(tar_path: str, member: str) -> bytes:
    try:
        members, seekable = _tar_members_of(tar_path)
    except tarfile.TarError:
        members, seekable = {}, False
    entry = members.get(member)
    if seekable and entry is not None and entry.regular:
        with open(tar_path, "rb") as f:
            f.seek(entry.offset)
            data = f.read(entry.size)
        if len(data) == entry.size:
            return data
    try:
        with tarfile.open(tar_path) as tar:  # a link, a compressed tar, or a tar changed since it was listed
            handle = tar.extractfile(member)
            if handle is None:
                raise OSError(f"{member} is not a file in {tar_path}")
            return handle.read()
    except (KeyError, tarfile.TarError) as exc:
        raise OSError(f"{member} cannot be read from {tar_path} ({type(exc).__name__}: {exc})") from exc


def tar_member(source: str) -> tuple[str, str] | None:
    """(tar path, member name) for a source that names a member of a tar shard, else None: an image
    file whose own name holds the separator stays a file."""
    tar_path, separator, member = source.partition(TAR_SEPARATOR)
    if not separator or os.path.isfile(source):
        return None
    return tar_path, member


def read_source(source: str, size: int) -> torch.Tensor:
    """[3, size, size] in [0, 1] (the evaluation transform); OSError/ValueError for a bad image."""
    parts = tar_member(source)
    if parts is not None:
        tar_path, member = parts
        data = _tar_member_bytes(tar_path, member)
        try:
            return load_image(io.BytesIO(data), size)
        except (OSError, ValueError) as exc:
            # Pillow names the in-memory file by its address, which differs from run to run: the
            # reason a shard and the index record must not
            reason = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise (ValueError if isinstance(exc, ValueError) else OSError)(f"{member} in {tar_path}: {reason}") from exc
    return load_image(source, size)


# ---------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Plan:
    """What a run tokenizes and how: the same plan always gives the same shards."""

    sources: tuple[str, ...]
    shard_size: int
    config_json: str
    checkpoint: str
    criterion: str
    batch_size: int
    weights: str = ""  # a digest of the model's weights: a path or name can come to hold other weights
    version: str = ""  # the package version that encodes (an upgrade may change the tokens)

    @property
    def num_shards(self) -> int:
        return (len(self.sources) + self.shard_size - 1) // self.shard_size

    def shard_sources(self, k: int) -> tuple[str, ...]:
        return self.sources[k * self.shard_size : (k + 1) * self.shard_size]

    @property
    def fingerprint(self) -> str:
        doc = json.dumps([list(self.sources), self.shard_size, self.config_json, self.checkpoint, self.criterion,
                          self.batch_size, self.weights, self.version])
        return hashlib.sha256(doc.encode()).hexdigest()


def shard_path(out: str | os.PathLike, k: int) -> Path:
    return Path(out) / SHARD_PATTERN.format(k)


def recorded_plan(path: str | os.PathLike) -> str | None:
    """The plan fingerprint a shard file or index records (metadata only; None if unreadable)."""
    path = Path(path)
    try:
        if path.suffix == ".json":
            plan = json.loads(path.read_text(encoding="utf-8")).get("plan")
            return plan if isinstance(plan, str) else None
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("extra.plan")
    except Exception:  # damaged: belongs to no plan
        return None


def stamps_path(out: str | os.PathLike, k: int) -> Path:
    return Path(out) / STAMPS_PATTERN.format(k)


# file times tick coarsely (milliseconds on ext4, seconds on FAT, NFS, SMB): a file written this
# close before its stamp was taken may be written again within the same tick, unseen
RACY_NS = 2_000_000_000


def stamp_shard(sources: Iterable[str]) -> list[list]:
    """``source_stamps`` as ``save_shard`` records them: a stamp whose times lie within RACY_NS of
    now is marked unsure, so that it matches nothing and a resume redoes the shard. Take it before
    the images are read."""
    recent = time.time_ns() - RACY_NS
    return [[source, ["unsure", *stamp] if stamp is not None and max(stamp[1], stamp[2]) >= recent else stamp]
            for source, stamp in source_stamps(sources)]


def source_stamps(sources: Iterable[str]) -> list[list]:
    """[source, stamp] for each source, from metadata alone (no image is read): a file's [size,
    mtime_ns, ctime_ns, inode]; a tar member's tar stamp plus the member's header [size, mtime]; None
    for what cannot be found (so its coming back is a change too). Take them before the images
    are read: a file changed while it is encoded then shows as changed at the next resume."""
    headers: dict[str, dict[str, list]] = {}
    stamped = []
    for source in sources:
        path, member = tar_member(source) or (source, None)
        stamp = _stat_stamp(path)
        if member is not None and stamp is not None:
            if path not in headers:
                headers[path] = _member_headers(path)
            stamp += headers[path].get(member, [None])
        stamped.append([source, stamp])
    return stamped


def _stat_stamp(path: str) -> list | None:
    # ctime, which no user call can set back, catches a replacement that kept the old size and
    # mtime (cp -p, rsync -a, a restored backup); the inode, a link swapped for another file
    try:
        return list(_file_identity(path))
    except OSError:
        return None


def _member_headers(path: str) -> dict[str, list]:
    try:
        return {name: [m.size, m.mtime] for name, m in _tar_members_of(path)[0].items()}
    except (tarfile.TarError, OSError):
        return {}


def _read_stamps(path: Path) -> dict | None:
    """A stamps record pretokenize wrote (None for anything else, or damaged)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and record.get("format") == STAMPS_FORMAT and isinstance(record.get("plan"), str)
    return record if ok else None


def shard_status(out: str | os.PathLike, plan: Plan, k: int) -> str:
    """``done``: shard k is whole, belongs to this plan and its stamps record names these bytes and
    matches its images now; ``changed``: all that, but an image changed since (edited, replaced,
    touched: the stamps are metadata); ``todo``: missing, damaged, another plan's, or without a
    stamps record of these bytes (killed before it was written, or an earlier alit_fast's)."""
    path = shard_path(out, k)
    if not path.exists():
        return "todo"
    try:
        batch = TokenBatch.load(path)
    except (OSError, ValueError):
        return "todo"  # a damaged shard is redone (the writer replaces files atomically)
    if batch.extra.get("plan") != plan.fingerprint or batch.extra.get("shard") != str(k):
        return "todo"
    record = _read_stamps(stamps_path(out, k))
    if (record is None or record["plan"] != plan.fingerprint or record.get("shard") != k
            or record.get("sha256") != _file_sha256(path)):
        return "todo"
    return "done" if record.get("sources") == source_stamps(plan.shard_sources(k)) else "changed"


def shard_is_done(out: str | os.PathLike, plan: Plan, k: int) -> bool:
    """A shard file that exists, passes its checksums, belongs to this plan and whose images are
    as they were when it was encoded (``shard_status``)."""
    return shard_status(out, plan, k) == "done"


def save_shard(out: str | os.PathLike, plan: Plan, k: int, batch: TokenBatch, stamps: list[list]) -> None:
    """Shard k, then its stamps record (``stamp_shard`` taken before its images were read). The
    record names the shard's sha256: a shard saved without its record (killed in between), or
    beside an earlier run's record, is not done."""
    path = shard_path(out, k)
    batch.save(path)
    record = {"format": STAMPS_FORMAT, "plan": plan.fingerprint, "shard": k, "sha256": _file_sha256(path),
              "sources": stamps}
    text = json.dumps(record, separators=(",", ":")) + "\n"
    write_atomic(stamps_path(out, k), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def encode_shard(
    plan: Plan, k: int, read: Callable[[str], torch.Tensor],
    encode: Callable[[Iterator[torch.Tensor]], Iterable[TokenBatch]], workers: int = 0,
) -> TokenBatch:
    """Shard k's tokens: its readable images, read in batches of ``plan.batch_size`` from the
    shard's start (on ``workers`` threads, in order), given to ``encode`` as one stream (it returns
    one TokenBatch per batch, in order: e.g. ``ALIT.encode_stream``), so a shard's tokens depend on
    its images alone."""
    names: list[str] = []
    skipped: dict[str, str] = {}

    def batches() -> Iterator[torch.Tensor]:
        pending: list[tuple[str, torch.Tensor]] = []
        for source, image, exc in read_in_order(plan.shard_sources(k), read, workers, ahead=2 * plan.batch_size):
            if exc is not None:
                if not isinstance(exc, (OSError, ValueError)):
                    raise exc
                skipped[source] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__  # reported, never dropped
            else:
                pending.append((source, image))
            if len(pending) == plan.batch_size:
                yield flush(pending)
                pending = []
        if pending:
            yield flush(pending)

    def flush(pending: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
        names.extend(name for name, _ in pending)
        return torch.stack([image for _, image in pending])

    parts = list(encode(batches()))
    if parts:
        batch = TokenBatch.cat(parts)
    else:
        codebook_size = json.loads(plan.config_json).get("codebook_size", 4096)
        batch = TokenBatch(torch.zeros(0, 0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), codebook_size,
                           config_json=plan.config_json)
    batch.names = names
    batch.checkpoint = plan.checkpoint
    batch.extra = {"plan": plan.fingerprint, "shard": str(k), "criterion": plan.criterion,
                   "skipped": json.dumps(skipped, sort_keys=True)}
    return batch


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_index(out: str | os.PathLike, plan: Plan) -> dict:
    """index.json from the shard files themselves (so it is the same whoever wrote them)."""
    items, skipped, shards = [], {}, []
    for k in range(plan.num_shards):
        path = shard_path(out, k)
        batch = TokenBatch.load(path)
        if batch.extra.get("plan") != plan.fingerprint:
            raise ValueError(f"{path} belongs to another run (its plan fingerprint differs)")
        lengths = batch.lengths.tolist()
        items += [[name, n, k, offset] for offset, (name, n) in enumerate(zip(batch.names or [], lengths))]
        skipped.update(json.loads(batch.extra.get("skipped", "{}")))
        shards.append({"file": path.name, "sha256": _file_sha256(path), "images": len(lengths)})
    index = {
        "format": INDEX_FORMAT,
        "plan": plan.fingerprint,
        "checkpoint": plan.checkpoint,
        "criterion": plan.criterion,
        "weights_sha256": plan.weights,
        "alit_fast_version": plan.version,
        "config": json.loads(plan.config_json),
        "shard_size": plan.shard_size,
        "batch_size": plan.batch_size,
        "images": len(items),
        "shards": shards,
        "items": items,
        "skipped": skipped,
    }
    text = json.dumps(index, separators=(",", ":")) + "\n"
    write_atomic(Path(out) / INDEX_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return index


def owned_files(out: str | os.PathLike) -> list[Path]:
    """The files a pretokenize run writes into its directory (what --overwrite may remove)."""
    root = Path(out)
    found = [p for p in root.glob("shard-*.safetensors") if p.is_file() and recorded_plan(p) is not None]
    found += [p for p in root.glob("shard-*.safetensors.tmp") if p.is_file() and _SHARD_NAME.fullmatch(p.name)]  # a killed save's
    found += [p for p in root.glob("shard-*.stamps.json") if p.is_file() and _read_stamps(p) is not None]
    found += [p for p in root.glob("shard-*.stamps.json.tmp") if p.is_file() and _SHARD_NAME.fullmatch(p.name)]
    found += [p for p in (root / INDEX_NAME,) if p.is_file() and recorded_plan(p) is not None and _is_index(p)]
    found += [p for p in (root / (INDEX_NAME + ".tmp"), root / LOCK_NAME) if p.is_file()]
    return sorted(found)


def _is_index(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == INDEX_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


# ---------------------------------------------------------------------------- reading
@dataclass
class TokenItem:
    codes: torch.Tensor  # [n] ids, or [n, d] continuous vectors
    length: int
    path: str


@dataclass
class _Shard:
    """A shard checked once (its sha256 against the index, its checksums, its plan): where each
    image's codes lie in the file, the names, and which file that was."""

    path: Path
    file: tuple  # _file_identity when it was checked: the file read later must be that one
    starts: array  # len(images) + 1 token offsets into the flat codes (compact: a data set may have millions)
    lengths: array
    names: list | None
    continuous: bool
    data: int  # where the flat codes start in the file
    dtype: torch.dtype
    width: int  # values per token: 1 for ids, d for continuous vectors


# safetensors' dtype names (the format's header) -> torch's
_STORED = {"I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
           "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


class TokenDataset(torch.utils.data.Dataset):
    """Random access to a tokenized dataset: ``dataset[i]`` -> TokenItem(codes, length, path).

    Each shard is checked the first time one of its images is read (its bytes against the index's
    sha256, its own checksums and plan); after that an image's codes are read alone, at their place
    in the file, through a descriptor kept open since the check (a shard replaced meanwhile is
    refused by name, never read at the old one's places). So a shuffled pass costs about what a
    sequential one does: reading a whole shard for each image made it some 1000x slower."""

    OPEN_FILES = 16  # shard files kept open (the least recently read is closed)

    def __init__(self, index_path: str | os.PathLike) -> None:
        path = Path(index_path)
        if path.is_dir():
            path = path / INDEX_NAME
        if not path.is_file():
            raise FileNotFoundError(f"token dataset index not found: {path}")
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a token dataset index: {exc}") from None
        if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
            raise ValueError(f"{path} is not a token dataset index (format {INDEX_FORMAT!r} expected)")
        self.root = path.parent
        self.index = index
        self.items = _checked_items(path, index)
        self._shards: dict[int, _Shard] = {}
        self._open: "OrderedDict[int, int]" = OrderedDict()  # shard -> open descriptor
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self) -> dict:
        # DataLoader workers get a copy: open files and the lock do not travel; each worker has its own
        return {k: v for k, v in self.__dict__.items() if k not in ("_open", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _open=OrderedDict(), _lock=threading.Lock())

    def __del__(self) -> None:
        for fd in getattr(self, "_open", {}).values():
            os.close(fd)

    @property
    def lengths(self) -> list[int]:
        return [item[1] for item in self.items]

    def _shard(self, k: int) -> _Shard:
        if k not in self._shards:
            info = self.index["shards"][k]
            path = self.root / info["file"]
            # the index records each shard's bytes: a shard swapped or replaced on disk is caught
            # here, not read back under another image's name
            file = _file_identity(path) if path.is_file() else None
            if file is not None and info.get("sha256") != _file_sha256(path):
                raise ValueError(f"{path} is not the shard {INDEX_NAME} records (its sha256 differs): "
                                 "swapped, replaced or damaged")
            batch = TokenBatch.load(path)  # a missing shard: the loader's own error, naming it
            if batch.extra.get("plan") != self.index["plan"]:
                raise ValueError(f"{path} belongs to another run than {INDEX_NAME}")
            data, dtype, width = _codes_place(path)
            if _file_identity(path) != file:
                raise ValueError(f"{path} changed while it was being checked: open the data set again")
            lengths = array("q", batch.lengths.tolist())
            starts = array("q", [0]) + array("q", torch.cumsum(batch.lengths, 0).tolist())
            self._shards[k] = _Shard(path, file, starts, lengths, batch.names, batch.continuous, data, dtype, width)
        return self._shards[k]

    def _descriptor(self, k: int, shard: _Shard) -> int:
        fd = self._open.pop(k, None)
        if fd is None:
            fd = os.open(shard.path, os.O_RDONLY)
            if _file_identity(fd) != shard.file:  # replaced since it was checked: its places are another file's
                os.close(fd)
                raise ValueError(f"{shard.path} was replaced or changed after it was checked against {INDEX_NAME}: "
                                 "open the data set again")
            while len(self._open) >= self.OPEN_FILES:
                os.close(self._open.popitem(last=False)[1])
        self._open[k] = fd  # now the most recently read
        return fd

    def _codes(self, k: int, shard: _Shard, offset: int) -> torch.Tensor:
        first, last = shard.starts[offset], shard.starts[offset + 1]
        shape = (last - first,) if not shard.continuous else (last - first, shard.width)
        itemsize = shard.dtype.itemsize
        size = (last - first) * shard.width * itemsize
        if size == 0:
            codes = torch.empty(shape, dtype=shard.dtype)
        else:
            with self._lock:  # the open files are shared by the threads that read this data set
                raw = os.pread(self._descriptor(k, shard), size, shard.data + first * shard.width * itemsize)
            if len(raw) != size:
                raise ValueError(f"{shard.path} was cut short after it was checked against {INDEX_NAME}")
            codes = torch.frombuffer(bytearray(raw), dtype=shard.dtype).reshape(shape)
        return codes if shard.continuous else codes.to(torch.int64)

    def __getitem__(self, i: int) -> TokenItem:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        name, length, k, offset = self.items[i]
        shard = self._shard(k)
        if offset >= len(shard.lengths) or shard.lengths[offset] != length or (shard.names or [None] * len(shard.lengths))[offset] != name:
            raise ValueError(f"{INDEX_NAME} item {i} ({name}, {length} tokens) disagrees with shard {k} at offset "
                             f"{offset}: the index was edited")
        return TokenItem(self._codes(k, shard, offset), int(length), name)


def _file_identity(path_or_fd: "str | Path | int") -> tuple[int, int, int, int]:
    """Which file, as written when: size, modification and change times (ctime, which no user call
    sets back) and inode. Stamps records store it, the tar index and checked shards key on it."""
    st = os.stat(path_or_fd)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def _codes_place(path: Path) -> tuple[int, torch.dtype, int]:
    """Where a token file's flat codes start, their dtype and values per token (from the
    safetensors header: 8 bytes of its length, then the JSON)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    codes = header["codes"]
    width = 1 if len(codes["shape"]) == 1 else int(codes["shape"][1])
    return 8 + size + int(codes["data_offsets"][0]), _STORED[codes["dtype"]], width


def _checked_items(path: Path, index: dict) -> list:
    """The index's items, once every one names a shard it lists and a place in it."""
    shards, items = index.get("shards"), index.get("items")
    if (not isinstance(shards, list) or not isinstance(items, list) or not isinstance(index.get("plan"), str)
            or not all(isinstance(sh, dict) and isinstance(sh.get("file"), str) for sh in shards)):
        raise ValueError(f"{path} is damaged: its 'shards', 'items' or 'plan' entry is missing or malformed")
    for i, item in enumerate(items):
        ok = isinstance(item, list) and len(item) == 4 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                for v in item[1:])
        if not ok or not 0 <= item[2] < len(shards) or item[1] < 0 or not 0 <= item[3] < shards[item[2]].get("images", 0):
            raise ValueError(f"{path}: item {i} ({item!r:.80}) is malformed or points outside its shard list "
                             f"({len(shards)} shards): the index was edited or is damaged")
    # items removed or repeated: the shards' places must each be named once (else images are dropped
    # or read twice without a word)
    places = sum(sh.get("images", 0) if isinstance(sh.get("images"), int) else -1 for sh in shards)
    if len(items) != places or len({(item[2], item[3]) for item in items}) != len(items):
        raise ValueError(f"{path}: its {len(items)} items do not name each of the {places} places in its shards once: "
                         "the index was edited or is damaged")
    return items


def open_dataset(index_path: str | os.PathLike) -> TokenDataset:
    """A tokenized dataset written by ``alit-fast pretokenize`` (its index.json or its directory)."""
    return TokenDataset(index_path)
