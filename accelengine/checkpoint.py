"""Pickle-free, atomic checkpoint storage.

A checkpoint stores named *parts*, each a nested Python state such as `state_dict()` returns, and reads them back
exactly. It knows nothing about the training engine.

On-disk format (a checkpoint is a directory holding only `.json` and `.safetensors` files; nothing is ever pickled):

- `P.json` for every part `P`: `{"format", "format_version", "part", "rank", "tree"}`, where `tree` is the part's
  structure with every tensor replaced by a reference. JSON-native values (None, bool, int, str, finite float, list,
  dict with str keys) are stored as themselves; everything else is an object tagged with `"$t"`:
  `tuple`, `dict`/`odict` (non-str keys as an `items` list, `OrderedDict` with its `_metadata`), `float`
  (inf/nan as the IEEE-754 bits, so even the NaN payload survives), `bytes`, `npscalar`, `tensor` and `ndarray`
  (`key` names the tensor in the part's safetensors file; `ndarray` also records the numpy dtype). A plain dict that
  happens to contain a `"$t"` key is stored in the tagged form, so user data can never be mistaken for a tag.
- `P.safetensors` when the part holds at least one tensor (always a json too, even for a flat weights dict, so every
  part reads back the same way). Tensor keys are their path in the structure joined by dots (`state.0.exp_avg`), so
  `model.safetensors` of a `state_dict()` is a plain `{param_name: tensor}` weights file that
  `safetensors.torch.load_file` reads on its own. Numpy arrays are stored as tensors of the same width.
- Per-rank parts are `P.rank{r}.json` / `P.rank{r}.safetensors`, written by rank `r`.
- `manifest.json`, written last: format name and version, save sequence number, world size, part names, `meta`,
  the keep-best metric, and every file with its size and checksum, stored under the algorithm's name:
  `{"name", "size", "xxh3_128": <hex>}` (what saves write) or `{"name", "size", "sha256": <hex>}` (what earlier
  versions wrote; still read). Last, `manifest_xxh3_128`: the manifest's own checksum, of its other entries as
  written (manifests of earlier versions have none and are still read). A directory without a valid manifest is
  incomplete; one whose manifest does not match its own checksum is damaged.
- `root/latest` is a text file naming the newest checkpoint directory.

Saving writes into `root/.tmp-<name>`, fsyncs every file and the directory, renames it into place, fsyncs the root,
and only then updates `latest` and rotates (old checkpoints are renamed away at once and deleted on a background
thread; `CheckpointManager.wait()` waits for that). The checksum of each big file is computed from memory on a
worker thread while the file is written, so nothing is read back.

Reading checks the manifest and the size and checksum of every file it will read before decoding any part (other
listed files are size-checked); files the manifest does not list are never opened. Each file is read exactly once,
in one pass that hashes every chunk as it arrives: a `.safetensors` file's header (held to the layout this module
writes: tensors tiling the data exactly) directs its tensors' bytes straight into one new tensor each, in memory
the process owns, and nothing read is used before the whole file has matched its checksum. No memory mapping: a
mapping would pin the file, so a checkpoint deleted by rotation after a resume would keep its disk space (and
leave .nfs files on NFS) until exit. Tensors come back on the CPU as plain tensors, each with its own storage;
storage shared between tensors when saved is not preserved (each is stored on its own). One writer per root.

What the checksums are for: they detect damage (a truncated or partly written file, a bad disk or transfer, a file
swapped in by mistake), so that a damaged checkpoint is never half-loaded and `find_latest` falls back to an intact
one. They are not a defence against tampering: whoever can rewrite a file can rewrite `manifest.json` too, so a
fast non-cryptographic hash (xxh3-128, tens of GB/s) protects exactly as much as sha256 did, at a small fraction of
the cost. (Nothing is ever unpickled, so a tampered checkpoint can hold wrong numbers, not run code.) Verification
also does not guard against a file being rewritten while it is read.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import stat
import struct
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import xxhash
from safetensors import safe_open

logger = logging.getLogger(__name__)

FORMAT_NAME = "accelengine-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
_TMP_PREFIX = ".tmp-"  # a save in progress (or a crashed one); removed at the next save
_TRASH_PREFIX = ".trash-"  # a checkpoint being deleted by rotation
_ASIDE_PREFIX = ".replaced-"  # the old copy while a checkpoint of the same name is replaced
_TAG = "$t"
_HASH_CHUNK = 1 << 20  # 1 MiB reads stay in L2 while being hashed; measured faster than 256 KiB or 8 MiB here
_WRITE_CHUNK = 8 << 20
_MAX_MANIFEST_BYTES = 64 << 20
# Checksum algorithms a manifest may name (and their hex digest length); saves use `_CHECKSUM`. xxh3-128 hashes at
# >10 GB/s, so checking a file costs a small part of reading it; sha256 (~1.7 GB/s here) is what earlier saves wrote.
_CHECKSUMS: dict[str, tuple[Callable[[], Any], int]] = {
    "xxh3_128": (xxhash.xxh3_128, 32),
    "sha256": (hashlib.sha256, 64),
}
_CHECKSUM = "xxh3_128"
_SEAL = "manifest_xxh3_128"  # the manifest's own checksum (see `_sealed`)
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=-]{0,199}")
_PART_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,99}")

# torch dtype -> safetensors dtype code, for the dtypes this torch build has.
_ST_DTYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.complex64: "C64",
}
for _attr, _code in [
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
    ("float8_e5m2fnuz", "F8_E5M2FNUZ"),
]:
    if hasattr(torch, _attr):
        _ST_DTYPES[getattr(torch, _attr)] = _code
_ITEMSIZE: dict[str, int] = {code: dtype.itemsize for dtype, code in _ST_DTYPES.items()}
_TORCH_DTYPES: dict[str, torch.dtype] = {code: dtype for dtype, code in _ST_DTYPES.items()}
# numpy dtype name -> the torch dtype of the same width used to store it. Torch < 2.3 has no uint16/32/64: those
# arrays (numpy's RNG state is uint32) are then stored bit for bit as the signed type and viewed back on load.
_NP_TO_TORCH: dict[str, torch.dtype] = {
    name: getattr(torch, name, None) or getattr(torch, name.lstrip("u"))
    for name in (
        *("bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64"),
        *("float16", "float32", "float64", "complex64"),
    )
}


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or is missing, incomplete, damaged or not ours."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read back: its directory, the `meta` given to `save`, and the parts that were asked for."""

    path: Path
    meta: dict[str, Any]
    parts: dict[str, Any]


@dataclass(frozen=True)
class CheckpointEntry:
    """One complete checkpoint in a root, as its manifest describes it (files not verified)."""

    path: Path
    name: str
    step: int | None
    sequence: int
    created: float
    metric: float | None
    monitor: str | None
    meta: dict[str, Any]

    @property
    def order(self) -> tuple[int, int]:
        """Sort key for "newest": the step recorded in meta, then save order (entries without a step sort first)."""
        return (self.step if self.step is not None else -1, self.sequence)


# --------------------------------------------------------------------------------------------------------------------
# Encoding: nested Python state <-> JSON tree + flat dict of tensor bytes


class _Blob(NamedTuple):
    dtype: str  # safetensors code
    shape: tuple[int, ...]
    data: memoryview  # the raw bytes, flat, C order
    owner: Any  # keeps the memory `data` points into alive


class _Encoder:
    """Turns one part into a JSON-able tree plus the tensors it references."""

    def __init__(self, part: str, *, allow_tensors: bool = True) -> None:
        self.part = part
        self.allow_tensors = allow_tensors
        self.blobs: dict[str, _Blob] = {}

    def fail(self, path: tuple, problem: str) -> CheckpointError:
        where = ".".join(map(str, path)) or "<root>"
        return CheckpointError(f"cannot save part {self.part!r} at key path {where!r}: {problem}")

    def encode(self, obj: Any, path: tuple = ()) -> Any:
        kind = type(obj)
        if obj is None or kind is bool or kind is str or kind is int:
            return obj
        if kind is float:
            if math.isfinite(obj):
                return obj  # json writes repr(), which round-trips every finite float exactly
            return {_TAG: "float", "bits": struct.pack(">d", obj).hex()}
        if kind is list:
            return [self.encode(v, (*path, i)) for i, v in enumerate(obj)]
        if kind is tuple:
            return {_TAG: "tuple", "v": [self.encode(v, (*path, i)) for i, v in enumerate(obj)]}
        if kind is dict or kind is OrderedDict:
            return self._encode_dict(obj, path)
        if isinstance(obj, torch.Tensor):
            return {_TAG: "tensor", "key": self._add_tensor(obj, path)}
        if kind is np.ndarray:
            return {_TAG: "ndarray", "key": self._add_array(obj, path), "dtype": obj.dtype.str}
        if isinstance(obj, np.generic) and obj.dtype.kind in "biufc":
            # np.float64 subclasses float: the exact type checks above let it through so it comes back as np.float64
            return {_TAG: "npscalar", "dtype": obj.dtype.str, "hex": obj.tobytes().hex()}
        if kind is bytes:
            return {_TAG: "bytes", "hex": obj.hex()}
        raise self.fail(
            path,
            f"values of type {kind.__module__}.{kind.__qualname__} are not supported (supported: None, bool, int, "
            "float, str, bytes, list, tuple, dict, OrderedDict, torch tensors, numpy arrays and scalars); convert it "
            "to one of these before saving",
        )

    def _encode_dict(self, obj: dict, path: tuple) -> dict:
        tag = "dict" if type(obj) is dict else "odict"
        if all(type(k) is str for k in obj):
            body = {k: self.encode(v, (*path, k)) for k, v in obj.items()}
            if tag == "dict" and _TAG not in obj:
                return body
            out: dict[str, Any] = {_TAG: tag, "v": body}
        else:
            out = {
                _TAG: tag,
                "items": [[self._encode_key(k, path), self.encode(v, (*path, k))] for k, v in obj.items()],
            }
        metadata = getattr(obj, "_metadata", None)  # nn.Module.state_dict() keeps per-module versions here
        if tag == "odict" and metadata is not None:
            out["metadata"] = self.encode(metadata, (*path, "_metadata"))
        return out

    def _encode_key(self, key: Any, path: tuple) -> Any:
        allow, self.allow_tensors = self.allow_tensors, False
        try:
            return self.encode(key, (*path, f"<key {key!r}>"))
        finally:
            self.allow_tensors = allow

    def _unique_key(self, path: tuple) -> str:
        base = ".".join(map(str, path)) or "tensor"
        key, n = base, 0
        while key in self.blobs or key == "__metadata__":  # `__metadata__` is reserved by the safetensors header
            n += 1
            key = f"{base}~{n}"
        return key

    def _add_tensor(self, tensor: torch.Tensor, path: tuple) -> str:
        if not self.allow_tensors:
            raise self.fail(path, "tensors are not allowed here (dict keys and meta must be plain values)")
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            raise self.fail(path, f"tensor subclass {type(tensor).__qualname__} is not supported; save a plain tensor")
        if tensor.layout != torch.strided:
            raise self.fail(path, f"{tensor.layout} tensors are not supported; call .to_dense() first")
        code = _ST_DTYPES.get(tensor.dtype)
        if code is None:
            raise self.fail(path, f"dtype {tensor.dtype} cannot be stored in safetensors; convert it first")
        try:
            t = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous()
        except (RuntimeError, NotImplementedError) as e:
            raise self.fail(path, f"could not bring the tensor to the CPU ({e})") from e
        # A byte view of the tensor's own memory: no copy, and shared or strided storage no longer matters.
        data = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
        key = self._unique_key(path)
        self.blobs[key] = _Blob(code, tuple(t.shape), data, t)
        return key

    def _add_array(self, array: np.ndarray, path: tuple) -> str:
        if not self.allow_tensors:
            raise self.fail(path, "numpy arrays are not allowed here (dict keys and meta must be plain values)")
        native = array.dtype.newbyteorder("=")
        dtype = _NP_TO_TORCH.get(native.name) if array.dtype.kind in "biufc" else None
        if dtype is None or dtype not in _ST_DTYPES:
            raise self.fail(path, f"numpy dtype {array.dtype} is not supported; convert the array first")
        a = array.astype(native, copy=False)
        if not a.flags.c_contiguous:  # not np.ascontiguousarray: it turns 0-d arrays into 1-d ones
            a = a.copy(order="C")
        key = self._unique_key(path)
        self.blobs[key] = _Blob(_ST_DTYPES[dtype], a.shape, memoryview(a.reshape(-1).view(np.uint8)), a)
        return key


def _decode(node: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    tag = node.get(_TAG)
    if tag is None:
        return {k: _decode(v, tensors) for k, v in node.items()}
    if tag == "tuple":
        return tuple(_decode(v, tensors) for v in node["v"])
    if tag in ("dict", "odict"):
        cls = dict if tag == "dict" else OrderedDict
        if "v" in node:
            out = cls((k, _decode(v, tensors)) for k, v in node["v"].items())
        else:
            out = cls((_decode(k, tensors), _decode(v, tensors)) for k, v in node["items"])
        if "metadata" in node:
            out._metadata = _decode(node["metadata"], tensors)
        return out
    if tag == "float":
        return struct.unpack(">d", bytes.fromhex(node["bits"]))[0]
    if tag == "tensor":
        return tensors[node["key"]]
    if tag == "ndarray":
        dtype = _numeric_dtype(node["dtype"])
        array = tensors[node["key"]].numpy()
        if array.dtype != dtype.newbyteorder("="):  # stored as a same-width stand-in (see _NP_TO_TORCH)
            array = array.view(dtype.newbyteorder("="))
        return array.astype(dtype, copy=False)  # restores a non-native byte order
    if tag == "npscalar":
        return np.frombuffer(bytes.fromhex(node["hex"]), dtype=_numeric_dtype(node["dtype"]))[0]
    if tag == "bytes":
        return bytes.fromhex(node["hex"])
    raise ValueError(f"unknown tag {tag!r}")


def _numeric_dtype(name: str) -> np.dtype:
    dtype = np.dtype(name)
    if dtype.kind not in "biufc":  # never build object (or other exotic) arrays from file contents
        raise ValueError(f"unsupported numpy dtype {name!r}")
    return dtype


def _encode_plain(value: Any, what: str) -> Any:
    """Encode meta/metric values that go into the manifest (no tensors)."""
    return _Encoder(what, allow_tensors=False).encode(value)


# --------------------------------------------------------------------------------------------------------------------
# Low-level file IO


class _FileRecord(NamedTuple):
    name: str
    size: int
    algorithm: str  # a key of _CHECKSUMS
    digest: str

    def entry(self) -> dict[str, Any]:
        """The manifest's form: the checksum is stored under the algorithm's name."""
        return {"name": self.name, "size": self.size, self.algorithm: self.digest}


def _checksum_of(entry: Mapping[str, Any]) -> tuple[str, str]:
    """(algorithm, hex digest) of a manifest file entry; ValueError unless it holds exactly one known checksum."""
    named = [k for k in entry if k not in ("name", "size")]
    if len(named) != 1:
        raise ValueError(f"file entry {dict(entry)!r} must hold exactly one checksum")
    algorithm, digest = named[0], entry[named[0]]
    if algorithm not in _CHECKSUMS:
        raise ValueError(
            f"file entry {entry.get('name')!r} uses checksum {algorithm!r}, which this accelengine does not know "
            f"(it knows {sorted(_CHECKSUMS)}); upgrade accelengine"
        )
    if not (isinstance(digest, str) and re.fullmatch(rf"[0-9a-f]{{{_CHECKSUMS[algorithm][1]}}}", digest)):
        raise ValueError(f"bad {algorithm} digest in file entry {dict(entry)!r}")
    return algorithm, digest


def _record_from_entry(entry: Mapping[str, Any]) -> _FileRecord:
    return _FileRecord(entry["name"], entry["size"], *_checksum_of(entry))


def _io_error(action: str, path: Path, exc: OSError) -> CheckpointError:
    reason = exc.strerror or str(exc)
    code = errno.errorcode.get(exc.errno or 0, "")
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        hint = "the disk (or quota) is full: free space or choose another checkpoint directory"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "no write permission: check the directory's owner and mode, or choose another checkpoint directory"
    else:
        hint = "check that the filesystem is healthy and writable"
    return CheckpointError(f"{action} {path} failed: {reason}{f' [{code}]' if code else ''}; {hint}")


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # directories cannot be opened (or fsynced) on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, chunks: Iterable[bytes | memoryview]) -> int:
    """Create `path` (it must not exist), write the chunks, fsync; returns the size."""
    size = 0
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                for start in range(0, len(view), _WRITE_CHUNK):
                    piece = view[start : start + _WRITE_CHUNK]
                    while piece:  # os.write may write less than asked
                        piece = piece[os.write(fd, piece) :]
                size += len(view)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise _io_error("writing", path, e) from e
    return size


def _digest(chunks: Iterable[bytes | memoryview]) -> str:
    digest = _CHECKSUMS[_CHECKSUM][0]()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def _write_bytes(path: Path, data: bytes) -> _FileRecord:
    size = _write_file(path, [data])
    return _FileRecord(path.name, size, _CHECKSUM, _digest([data]))


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def _write_json(path: Path, obj: Any) -> _FileRecord:
    return _write_bytes(path, _json_bytes(obj))


def _sealed(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest with its own checksum added last (`_SEAL`): of the manifest's other entries as they are written.
    Parsing and writing them again gives the same bytes (insertion order, Python's shortest float repr), so a reader
    recomputes it from what it parsed."""
    return {**manifest, _SEAL: _digest([_json_bytes(manifest)])}


def _write_safetensors(path: Path, blobs: Mapping[str, _Blob], pool: ThreadPoolExecutor) -> tuple[int, Future]:
    """Write a safetensors file; returns its size and the checksum, computed from memory on `pool` during the write."""
    # Widest dtypes first: every tensor then starts at a multiple of its item size, so mmap loads need no copy.
    order = sorted(blobs.items(), key=lambda kv: -_ITEMSIZE[kv[1].dtype])
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}  # transformers refuses weights files without it
    offset = 0
    for key, blob in order:
        header[key] = {
            "dtype": blob.dtype,
            "shape": list(blob.shape),
            "data_offsets": [offset, offset + blob.data.nbytes],
        }
        offset += blob.data.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format allows trailing spaces; keeps the data 8-byte aligned
    chunks = [struct.pack("<Q", len(head)) + head, *(blob.data for _, blob in order)]
    digest = pool.submit(_digest, chunks)
    return _write_file(path, chunks), digest


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _delete_all(paths: Iterable[Path]) -> None:
    for path in paths:
        try:
            shutil.rmtree(path)
        except OSError as e:
            logger.warning("could not delete %s: %s (the next save retries)", path, e)


def _written_by(path: Path, token: str) -> bool:
    """Whether the checkpoint at `path` is the one whose save carried `token` (every rank adds one)."""
    try:
        return token in _load_manifest(path).get("writers", [])
    except CheckpointError:
        return False


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (LATEST, MANIFEST):
        raise CheckpointError(
            f"invalid checkpoint name {name!r}: use 1-200 letters, digits and `._+=-`, not starting with `.` or `-` "
            f"(e.g. 'step-00000050'), and not {LATEST!r}"
        )


# --------------------------------------------------------------------------------------------------------------------
# Reading and verifying


def _load_manifest(path: Path) -> dict[str, Any]:
    """Parse and sanity-check `path/manifest.json`; CheckpointError if the checkpoint is incomplete or not ours."""
    where = path / MANIFEST
    try:
        st = os.lstat(where)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"checkpoint {path} is not valid: {MANIFEST} is not a regular file")
        if st.st_size > _MAX_MANIFEST_BYTES:
            raise CheckpointError(f"checkpoint {path} is not valid: {MANIFEST} is implausibly large")
        manifest = json.loads(where.read_bytes())
    except RecursionError as e:
        raise CheckpointError(f"checkpoint {path} is damaged: {MANIFEST} is nested too deeply") from e
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no {MANIFEST} (the save did not finish)") from e
    except OSError as e:
        raise CheckpointError(f"cannot read {where}: {e.strerror or e}") from e
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path} is damaged: {MANIFEST} is not valid JSON ({e})") from e
    seal = manifest.pop(_SEAL, None) if isinstance(manifest, dict) else None
    if seal is not None:  # manifests of earlier versions have none: their files' checksums still protect the data
        try:
            intact = seal == _digest([_json_bytes(manifest)])
        except ValueError:  # a NaN or infinity, which no save writes
            intact = False
        if not intact:
            raise CheckpointError(f"checkpoint {path} is damaged: {MANIFEST} does not match its own checksum")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not an accelengine checkpoint ({MANIFEST} has no format {FORMAT_NAME!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version!r}; this accelengine reads version {FORMAT_VERSION} "
            "(upgrade accelengine to read newer checkpoints)"
        )
    try:
        files = manifest["files"]
        for f in files:
            if not (
                isinstance(f["name"], str)
                and re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*\.(json|safetensors)", f["name"])
                and type(f["size"]) is int
                and f["size"] >= 0
            ):
                raise ValueError(f"bad file entry {f!r}")
            _checksum_of(f)
        for key in ("shared_parts", "per_rank_parts"):
            if not all(isinstance(p, str) and _PART_RE.fullmatch(p) for p in manifest[key]):
                raise ValueError(f"bad {key}")
        if type(manifest["world_size"]) is not int or type(manifest["sequence"]) is not int:
            raise ValueError("bad world_size or sequence")
        # `list_checkpoints` (and with it every save's sequence number and rotation) converts these to floats
        created = manifest.get("created", 0.0)
        if type(created) not in (int, float):
            raise ValueError(f"bad created time {created!r}")
        float(created)
        manifest["meta"] = _decode(manifest["meta"], {})
        manifest["metric"] = _decode(manifest.get("metric"), {})
        if type(manifest["metric"]) is int:
            float(manifest["metric"])
    except (
        KeyError,
        TypeError,
        ValueError,
        RecursionError,
        struct.error,
        AttributeError,
        IndexError,
        OverflowError,
    ) as e:
        raise CheckpointError(f"checkpoint {path} is damaged: {MANIFEST} is malformed ({e})") from e
    return manifest


class _HashingReader:
    """Reads a file of known size exactly once, hashing every byte in file order as it arrives."""

    def __init__(self, file: Any, digest: Any, size: int) -> None:
        self.file, self.digest, self.size, self.done = file, digest, size, 0

    def read_into(self, view: memoryview) -> None:
        """Fill `view` with the next bytes of the file (OSError if it ends first)."""
        if self.done + len(view) > self.size:
            raise OSError(errno.EIO, "read past the size the manifest records")
        for start in range(0, len(view), _HASH_CHUNK):
            chunk, got = view[start : start + _HASH_CHUNK], 0
            while got < len(chunk):
                n = self.file.readinto(chunk[got:])
                if not n:
                    raise OSError(errno.EIO, "the file shrank while it was read")
                got += n
            self.digest.update(chunk)  # hashed right after the read, while the chunk is still in the CPU cache
        self.done += len(view)

    def read_bytes(self, n: int) -> bytes:
        buf = bytearray(n)
        self.read_into(memoryview(buf))
        return bytes(buf)

    def read_rest(self) -> None:
        """Hash the bytes not read yet, through a small scratch buffer."""
        scratch = memoryview(bytearray(min(_HASH_CHUNK, self.size - self.done)))
        while self.done < self.size:
            self.read_into(scratch[: self.size - self.done])


def _safetensors_layout(header: bytes, data_len: int) -> list[tuple[str, torch.dtype, list[int]]]:
    """(key, dtype, shape) of each tensor in a safetensors header, in file order; ValueError (or KeyError,
    TypeError) unless the layout is one this module could have written: known dtypes, byte sizes matching the
    shapes, and the tensors tiling the data section exactly (so none overlaps another or reaches past the file)."""
    info = json.loads(header)
    if not isinstance(info, dict):
        raise ValueError("the safetensors header is not an object")
    info.pop("__metadata__", None)
    items = []
    for key, t in info.items():
        dtype, shape, (begin, end) = _TORCH_DTYPES[t["dtype"]], t["shape"], t["data_offsets"]
        if not all(type(d) is int and d >= 0 for d in shape) or not all(type(x) is int for x in (begin, end)):
            raise ValueError(f"tensor {key!r} has a bad shape or bad offsets")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"tensor {key!r}: {end - begin} bytes cannot hold shape {shape} of {t['dtype']}")
        items.append((begin, end, key, dtype, shape))
    items.sort(key=lambda item: item[:2])
    position = 0
    for begin, end, key, _, _ in items:
        if begin != position:
            raise ValueError(f"the data of tensor {key!r} leaves a gap or overlaps another")
        position = end
    if position != data_len:
        raise ValueError("the tensors do not fill the data section exactly")
    return [(key, dtype, shape) for _, _, key, dtype, shape in items]


def _read_tensors(reader: _HashingReader) -> dict[str, torch.Tensor]:
    """Read a safetensors file straight into one new tensor each (no mapping, no intermediate copy).

    The header only directs the reads: the tensors are returned after the caller has checked the whole file's
    checksum. ValueError (KeyError, TypeError) for a layout `_safetensors_layout` refuses.
    """
    if sys.byteorder != "little":  # safetensors is little-endian: let its own loader swap the bytes
        from safetensors.torch import load

        return load(reader.read_bytes(reader.size))
    if reader.size < 8:
        raise ValueError("the file is too short for a safetensors header")
    (head_len,) = struct.unpack("<Q", reader.read_bytes(8))
    if head_len > reader.size - 8:
        raise ValueError("the safetensors header is longer than the file")
    layout = _safetensors_layout(reader.read_bytes(head_len), reader.size - 8 - head_len)
    tensors = {}
    for key, dtype, shape in layout:
        tensor = torch.empty(shape, dtype=dtype)
        if tensor.numel():
            reader.read_into(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        tensors[key] = tensor
    return tensors


def _verify_file(ckpt: Path, entry: Mapping[str, Any], *, keep: bool) -> Any:
    """Check one file's size and checksum against the manifest, reading it once.

    With `keep`, what was read is returned once the whole file matched its checksum: a json file's bytes, a
    safetensors file's tensors (see `_read_tensors`): the bytes that were hashed are the bytes that are used.
    Without, the file streams through a small buffer and None is returned.
    """
    name, (algorithm, expected) = entry["name"], _checksum_of(entry)
    path, result, problem = ckpt / name, None, None
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):  # before opening: never block on a FIFO or follow a planted symlink
            raise CheckpointError(f"{name} in checkpoint {ckpt} is not a regular file")
        if st.st_size != entry["size"]:
            raise CheckpointError(
                f"{name} in checkpoint {ckpt} is {st.st_size} bytes but the manifest says {entry['size']} "
                "(truncated or modified)"
            )
        # Buffered: the many tiny tensors (optimizer step counters) cost no system call each; big reads bypass it.
        with open(path, "rb", buffering=_HASH_CHUNK) as f:
            reader = _HashingReader(f, _CHECKSUMS[algorithm][0](), st.st_size)
            if keep and name.endswith(".json"):
                result = reader.read_bytes(reader.size)
            elif keep:
                try:
                    result = _read_tensors(reader)
                except (ValueError, KeyError, TypeError, RecursionError, struct.error) as e:
                    problem = e  # reported below if the checksum matches; a damaged file fails the checksum
            reader.read_rest()
    except FileNotFoundError as e:
        raise CheckpointError(f"{name} is missing from checkpoint {ckpt}") from e
    except OSError as e:
        raise CheckpointError(f"cannot read {name} in checkpoint {ckpt}: {e.strerror or e}") from e
    if reader.digest.hexdigest() != expected:
        raise CheckpointError(f"{name} in checkpoint {ckpt} fails its {algorithm} check (damaged or modified)")
    if problem is not None:
        raise CheckpointError(
            f"{name} in checkpoint {ckpt} matches its checksum but is not a valid safetensors file "
            f"({problem!r}): it was not written by accelengine"
        )
    return result


def _verify(
    ckpt: Path, manifest: Mapping[str, Any], names: Iterable[str] | None = None, *, keep: bool = False
) -> dict[str, Any]:
    """Hash-check the named files (all when None), size-check the rest; with `keep`, returns what was read of the
    named files (see `_verify_file`) once every one of them has matched its checksum."""
    entries = {f["name"]: f for f in manifest["files"]}
    wanted = set(entries) if names is None else set(names)
    for name in sorted(set(entries) - wanted):  # cheap: catches deleted/truncated files we are not going to read
        try:
            size = os.lstat(ckpt / name).st_size
        except FileNotFoundError as e:
            raise CheckpointError(f"{name} is missing from checkpoint {ckpt}") from e
        if size != entries[name]["size"]:
            raise CheckpointError(f"{name} in checkpoint {ckpt} has the wrong size (truncated or modified)")
    jobs = sorted((entries[n] for n in wanted), key=lambda e: -e["size"])  # biggest first balances the threads
    if len(jobs) == 1 or sum(e["size"] for e in jobs[1:]) < _HASH_CHUNK:  # one big file: threads would not help
        results = {e["name"]: _verify_file(ckpt, e, keep=keep) for e in jobs}
    else:  # reads release the GIL: files are read and checked side by side
        with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1, 8))) as pool:
            futures = {e["name"]: pool.submit(_verify_file, ckpt, e, keep=keep) for e in jobs}
            results = {name: fut.result() for name, fut in futures.items()}
    return {name: data for name, data in results.items() if data is not None}


def _stems(manifest: Mapping[str, Any], rank: int | None) -> dict[str, str]:
    """Part name -> file stem: shared parts, plus per-rank parts of `rank` (all ranks as `P.rank{r}` when None)."""
    stems = {p: p for p in manifest["shared_parts"]}
    ranks = range(manifest["world_size"]) if rank is None else [rank]
    for p in manifest["per_rank_parts"]:
        for r in ranks:
            stems[p if rank is not None else f"{p}.rank{r}"] = f"{p}.rank{r}"
    return stems


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check that `path` is a complete checkpoint whose files all match the manifest; returns the manifest."""
    path = Path(path)
    manifest = _load_manifest(path)
    _verify(path, manifest)
    return manifest


def read_checkpoint(path: str | os.PathLike, rank: int = 0, parts: Iterable[str] | None = None) -> Checkpoint:
    """Verify and read a checkpoint: shared parts plus the per-rank parts of `rank` (or only `parts`)."""
    path = Path(path)
    manifest = _load_manifest(path)
    names = {f["name"] for f in manifest["files"]}
    stems = _stems(manifest, rank)
    if parts is not None:
        parts = list(parts)
        unknown = [p for p in parts if p not in stems]
        if unknown:
            raise CheckpointError(f"checkpoint {path} has no part(s) {unknown}; it has {sorted(stems)}")
        stems = {p: stems[p] for p in parts}
    per_rank = sorted(p for p in stems if p in manifest["per_rank_parts"])
    if per_rank and not 0 <= rank < manifest["world_size"]:
        raise CheckpointError(
            f"checkpoint {path} was saved by {manifest['world_size']} process(es), so rank {rank} has no per-rank "
            f"parts {per_rank}; resume with the same number of processes, or pass parts= without them"
        )
    wanted = [f"{s}.json" for s in stems.values()] + [f"{s}.safetensors" for s in stems.values()]
    missing = [w for w in wanted if w.endswith(".json") and w not in names]
    if missing:
        raise CheckpointError(f"checkpoint {path} is damaged: its manifest does not list {missing}")
    # Every file is read once; all are verified before any is parsed.
    verified = _verify(path, manifest, [w for w in wanted if w in names], keep=True)
    out: dict[str, Any] = {}
    for part, stem in stems.items():
        try:
            doc = json.loads(verified.pop(f"{stem}.json"))
            if doc.get("format") != FORMAT_NAME or doc.get("part") != part.split(".rank")[0]:
                raise ValueError("header does not match the manifest")
            st_name = f"{stem}.safetensors"
            tensors = verified.pop(st_name) if st_name in names else {}
            out[part] = _decode(doc["tree"], tensors)
        except CheckpointError:
            raise
        except Exception as e:  # any parse problem in a verified file means a bug or a foreign writer
            raise CheckpointError(f"part {part!r} of checkpoint {path} could not be decoded: {e!r}") from e
    return Checkpoint(path=path, meta=manifest["meta"], parts=out)


def _entry(path: Path, manifest: Mapping[str, Any]) -> CheckpointEntry:
    meta = manifest["meta"] if isinstance(manifest["meta"], dict) else {}
    step = meta.get("step")
    metric = manifest.get("metric")
    return CheckpointEntry(
        path=path,
        name=path.name,
        step=step if type(step) is int else None,
        sequence=manifest["sequence"],
        created=float(manifest.get("created", 0.0)),
        metric=float(metric) if isinstance(metric, (int, float)) and not isinstance(metric, bool) else None,
        monitor=manifest.get("monitor"),
        meta=meta,
    )


def _candidates(root: Path) -> list[Path]:
    """Checkpoint directories in `root`, including an old copy stranded by a crash in the middle of a replace."""
    try:
        children = sorted(root.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        raise CheckpointError(f"cannot list checkpoint directory {root}: {e.strerror or e}") from e
    out = []
    for child in children:
        if not child.is_dir() or child.is_symlink():
            continue
        if child.name.startswith(_ASIDE_PREFIX):
            if not os.path.lexists(root / child.name[len(_ASIDE_PREFIX) :]):
                out.append(child)
        elif not child.name.startswith("."):
            out.append(child)
    return out


def list_checkpoints(root: str | os.PathLike) -> list[CheckpointEntry]:
    """Complete checkpoints in `root` (valid manifest; files not hashed), oldest first; incomplete ones are skipped."""
    entries = []
    for path in _candidates(Path(root)):
        try:
            entries.append(_entry(path, _load_manifest(path)))
        except CheckpointError as e:
            logger.debug("not a complete checkpoint: %s", e)
    return sorted(entries, key=lambda e: e.order)


def _read_latest_pointer(root: Path) -> str | None:
    try:
        with open(root / LATEST, encoding="utf-8") as f:
            name = f.read(4096).strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        logger.warning("cannot read %s (%s); looking for the newest complete checkpoint instead", root / LATEST, e)
        return None
    if not _NAME_RE.fullmatch(name) or name in (LATEST, MANIFEST):
        logger.warning("%s holds an invalid name %r; looking for the newest complete checkpoint", root / LATEST, name)
        return None
    return name


def point_latest(root: str | os.PathLike, name: str) -> None:
    """Make `root/latest` name the checkpoint `name` (atomically: a reader sees the old name or the new one)."""
    root = Path(root)
    latest, tmp = root / LATEST, root / f"{_TMP_PREFIX}{LATEST}"
    try:
        if os.path.lexists(tmp):
            _remove(tmp)
        _write_bytes(tmp, f"{name}\n".encode())
        os.replace(tmp, latest)
        _fsync_dir(root)
    except (OSError, CheckpointError) as e:
        raise CheckpointError(f"updating {latest} failed: {e}") from e


def branch_from(path: str | os.PathLike) -> list[str]:
    """Resuming from `path` when its directory's `latest` names another checkpoint starts a new branch of the run:
    `latest` then names `path`, so that a re-run after a crash continues this branch, not the abandoned one (whose
    checkpoints are replaced as this run reaches their steps, or rotated away). Returns the names of the abandoned
    branch's checkpoints (newer than `path`), for the log; nothing changes when `latest` already names `path`."""
    path = Path(path)
    pointed = _read_latest_pointer(path.parent)
    if pointed is None or pointed == path.name:
        return []
    entries = list_checkpoints(path.parent)
    resumed = next((e for e in entries if e.name == path.name), None)
    point_latest(path.parent, path.name)
    return [e.name for e in entries if resumed is not None and e.order > resumed.order]


def find_latest(root: str | os.PathLike) -> Path | None:
    """The newest complete, verified checkpoint in `root`: the one `latest` names, else the newest by step."""
    root = Path(root)
    pointed = _read_latest_pointer(root)
    if pointed is not None:
        try:
            verify_checkpoint(root / pointed)
            return root / pointed
        except CheckpointError as e:
            logger.warning(
                "%s names %r, which cannot be used (%s); falling back to an older checkpoint", root / LATEST, pointed, e
            )
    entries = []
    for path in _candidates(root):
        if path.name == pointed:
            continue
        try:
            entries.append((_entry(path, _load_manifest(path)), path))
        except CheckpointError as e:
            logger.warning("skipping %s: %s", path, e)
    for _, path in sorted(entries, key=lambda ep: ep[0].order, reverse=True):
        try:
            _verify(path, _load_manifest(path))
            return path
        except CheckpointError as e:
            logger.warning("skipping damaged checkpoint %s: %s", path, e)
    return None


def inspect_checkpoint(path: str | os.PathLike, *, verify: bool = False) -> dict[str, Any]:
    """Summarise a checkpoint from its manifest and safetensors headers, without loading any tensor data.

    With `verify=True` every file's checksum is checked first (reads all the data once).
    """
    path = Path(path)
    manifest = _load_manifest(path)
    if verify:
        _verify(path, manifest)
    files = {f["name"]: f for f in manifest["files"]}
    parts: dict[str, Any] = {}
    for part, stem in _stems(manifest, None).items():
        st_name = f"{stem}.safetensors"
        tensors: dict[str, dict[str, Any]] = {}
        if st_name in files:
            try:
                if os.path.getsize(path / st_name) != files[st_name]["size"]:
                    raise ValueError("its size differs from the manifest (truncated or modified)")
                with safe_open(path / st_name, framework="pt") as f:  # reads the header only
                    names = f.keys()  # the header's tensor names (sorted)
                    for key in names:
                        piece = f.get_slice(key)
                        shape, dtype = list(piece.get_shape()), piece.get_dtype()
                        tensors[key] = {
                            "dtype": dtype,
                            "shape": shape,
                            "bytes": math.prod(shape) * _ITEMSIZE.get(dtype, 0),
                        }
            except Exception as e:  # report any file or header problem the same way
                raise CheckpointError(f"cannot read the header of {st_name} in checkpoint {path}: {e}") from e
        part_files = [n for n in (f"{stem}.json", st_name) if n in files]
        parts[part] = {
            "files": part_files,
            "file_bytes": sum(files[n]["size"] for n in part_files),
            "num_tensors": len(tensors),
            "tensor_bytes": sum(t["bytes"] for t in tensors.values()),
            "tensors": tensors,
        }
    meta = manifest["meta"]
    return {
        "path": str(path),
        "name": manifest.get("name", path.name),
        "format_version": manifest["format_version"],
        "sequence": manifest["sequence"],
        "created": manifest.get("created"),
        "world_size": manifest["world_size"],
        "step": meta.get("step") if isinstance(meta, dict) else None,
        "epoch": meta.get("epoch") if isinstance(meta, dict) else None,
        "metrics": meta.get("metrics", {}) if isinstance(meta, dict) else {},
        "meta": meta,
        "monitor": manifest.get("monitor"),
        "metric": manifest.get("metric"),
        "parts": parts,
        "files": len(files) + 1,
        "total_bytes": sum(f["size"] for f in files.values()) + os.path.getsize(path / MANIFEST),
        "verified": verify,
    }


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_inspection(info: Mapping[str, Any], max_tensors: int | None = 20) -> str:
    """Render `inspect_checkpoint`'s summary as a human-readable table (at most `max_tensors` rows per part)."""
    created = info.get("created")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)) if isinstance(created, (int, float)) else "?"
    lines = [
        f"checkpoint {info['path']}",
        f"  step {info.get('step')}  epoch {info.get('epoch')}  saved {when}  world size {info['world_size']}  "
        f"format v{info['format_version']}",
        f"  {info['files']} files, {_human(info['total_bytes'])}, checksums "
        + ("verified" if info.get("verified") else "not verified (use verify=True)"),
    ]
    metrics = info.get("metrics") or {}
    if isinstance(metrics, dict) and metrics:
        lines.append(
            "  metrics: "
            + ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        )
    if info.get("monitor") is not None:
        lines.append(f"  keep-best metric {info['monitor']} = {info.get('metric')}")
    lines.append("")
    lines.append(f"  {'part':<24} {'tensors':>8} {'tensor bytes':>14} {'file bytes':>14}")
    for part, p in info["parts"].items():
        lines.append(
            f"  {part:<24} {p['num_tensors']:>8} {_human(p['tensor_bytes']):>14} {_human(p['file_bytes']):>14}"
        )
    for part, p in info["parts"].items():
        if not p["tensors"]:
            continue
        lines += ["", f"  {part}:", f"    {'tensor':<48} {'dtype':<6} {'shape':<20} {'bytes':>12}"]
        rows = list(p["tensors"].items())
        for key, t in rows[:max_tensors] if max_tensors is not None else rows:
            lines.append(f"    {key:<48} {t['dtype']:<6} {tuple(t['shape'])!s:<20} {_human(t['bytes']):>12}")
        if max_tensors is not None and len(rows) > max_tensors:
            lines.append(f"    ... {len(rows) - max_tensors} more")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Writing


class CheckpointManager:
    """Saves checkpoints atomically into `root`, keeps `latest` up to date and rotates old ones.

    Every process calls `save` collectively. Rank 0 creates, commits and rotates; rank `r` writes its per-rank parts
    into the shared temporary directory. `barrier` must synchronise all processes (it may be a no-op for one).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        keep_last: int | None = None,
        keep_best: int = 0,
        monitor: str | None = None,
        mode: str = "max",
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], Any] | None = None,
    ) -> None:
        if keep_last is not None and (type(keep_last) is not int or keep_last < 1):
            raise ValueError(f"keep_last must be None (keep all) or an int >= 1, got {keep_last!r}")
        if type(keep_best) is not int or keep_best < 0:
            raise ValueError(f"keep_best must be an int >= 0, got {keep_best!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank} world_size={world_size}")
        if barrier is None and world_size > 1:
            raise ValueError("a barrier is required when world_size > 1 (e.g. accelerator.wait_for_everyone)")
        self.root = Path(root)
        self.keep_last, self.keep_best, self.monitor, self.mode = keep_last, keep_best, monitor, mode
        self.rank, self.world_size = rank, world_size
        self._barrier = barrier or (lambda: None)
        self._deleter: threading.Thread | None = None

    def wait(self) -> None:
        """Block until checkpoints dropped by rotation are gone from disk (they are deleted in the background)."""
        if self._deleter is not None:
            self._deleter.join()
            self._deleter = None

    def latest(self) -> Path | None:
        """The newest complete, verified checkpoint (see `find_latest`)."""
        return find_latest(self.root)

    def checkpoints(self) -> list[CheckpointEntry]:
        """Complete checkpoints in the root, oldest first."""
        return list_checkpoints(self.root)

    def save(
        self,
        name: str,
        *,
        shared: Mapping[str, Any] | None = None,
        per_rank: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        metric: float | None = None,
    ) -> Path:
        """Save a checkpoint called `name` (collective: every rank calls it); returns its directory.

        `shared` parts are written by rank 0 only (other ranks may pass them or not), `per_rank` parts by every rank.
        `meta` (plain values; `meta["step"]` orders checkpoints) and `metric` (for keep_best) go into the manifest.
        Raises CheckpointError on every rank if any rank failed; earlier checkpoints and `latest` then stay intact.
        """
        _check_name(name)
        shared, per_rank = dict(shared or {}), dict(per_rank or {})
        tmp, final = self.root / f"{_TMP_PREFIX}{name}", self.root / name
        token = uuid.uuid4().hex  # lets every rank recognise the manifest of this very save
        # Errors are held until after the last barrier, so one failing rank cannot leave the others waiting forever.
        error: Exception | None = None
        encoded: dict[str, _Encoder] = {}
        trees: dict[str, Any] = {}
        records: list[_FileRecord] = []
        try:
            self._check_parts(shared, per_rank)
            extra = {"meta": _encode_plain(dict(meta or {}), "meta"), "metric": self._metric(metric)}
            parts = {**(shared if self.rank == 0 else {}), **{f"{p}.rank{self.rank}": v for p, v in per_rank.items()}}
            for stem, value in parts.items():
                encoded[stem] = _Encoder(stem.split(".")[0])
                trees[stem] = encoded[stem].encode(value)
            if self.rank == 0:
                self._prepare(tmp)
        except Exception as e:
            error = e
        self._barrier()  # the temporary directory exists (or rank 0 failed)

        if error is None:
            try:
                if not tmp.is_dir():
                    raise CheckpointError(f"rank 0 did not create {tmp}; see the error reported by rank 0")
                records = self._write_parts(tmp, encoded, trees)
                if self.rank != 0:  # rank 0 needs our checksums for the manifest
                    report = {"token": token, "files": [r.entry() for r in records]}
                    _write_json(tmp / f".rank{self.rank}.files.json", report)
            except Exception as e:
                error = e
        self._barrier()  # every rank has written (or failed)

        if self.rank == 0:
            if error is None:
                try:
                    self._commit(name, tmp, final, token, records, shared, per_rank, extra)
                    self._publish(name)
                except Exception as e:
                    error = e
            if os.path.lexists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        self._barrier()  # rank 0 has committed (or cleaned up)

        if isinstance(error, CheckpointError):
            untouched = not _written_by(final, token)  # the new checkpoint never replaced anything
            note = "; existing checkpoints and `latest` were left untouched" if untouched else ""
            raise CheckpointError(f"saving checkpoint {name!r} in {self.root} failed: {error}{note}") from error
        if error is not None:
            raise error
        if self.rank != 0 and not _written_by(final, token):
            raise CheckpointError(f"rank 0 did not commit checkpoint {final}; see the error reported by rank 0")
        return final

    # -- save steps ---------------------------------------------------------------------------------------------

    def _check_parts(self, shared: Mapping[str, Any], per_rank: Mapping[str, Any]) -> None:
        for part in (*shared, *per_rank):
            if not isinstance(part, str) or not _PART_RE.fullmatch(part) or part == "manifest":
                raise CheckpointError(
                    f"invalid part name {part!r}: use letters, digits, `_` and `-` (no dots), and not 'manifest'"
                )
        both = set(shared) & set(per_rank)
        if both:
            raise CheckpointError(f"part(s) {sorted(both)} are given both as shared and as per-rank; pick one")

    def _metric(self, metric: Any) -> Any:
        if metric is None:
            return None
        try:
            if isinstance(metric, (bool, str)):
                raise TypeError
            return _encode_plain(float(metric), "metric")
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"metric must be a number or None, got {metric!r}") from e

    def _prepare(self, tmp: Path) -> None:
        """Rank 0: create the root, recover from a crash mid-replace, drop stale temporaries, create `tmp`."""
        self.wait()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _io_error("creating checkpoint directory", self.root, e) from e
        for child in sorted(self.root.iterdir()):
            try:
                if child.name.startswith(_ASIDE_PREFIX):
                    original = self.root / child.name[len(_ASIDE_PREFIX) :]
                    if not os.path.lexists(original):
                        logger.warning("restoring %s, left aside by an interrupted save, as %s", child, original)
                        os.rename(child, original)
                        continue
                if child.name.startswith((_TMP_PREFIX, _TRASH_PREFIX, _ASIDE_PREFIX)):
                    logger.info("removing %s, left over by an interrupted save", child)
                    _remove(child)
            except OSError as e:
                logger.warning("could not clean up %s: %s", child, e)
        try:
            tmp.mkdir()
        except OSError as e:
            raise _io_error("creating temporary directory", tmp, e) from e

    def _write_parts(self, tmp: Path, encoded: Mapping[str, _Encoder], trees: Mapping[str, Any]) -> list[_FileRecord]:
        records: list[_FileRecord] = []
        digests: list[tuple[str, int, Future]] = []
        # The checksum of big files is computed on worker threads while this thread writes and fsyncs.
        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="ckpt-sha") as pool:
            for stem, enc in encoded.items():
                if enc.blobs:
                    path = tmp / f"{stem}.safetensors"
                    digests.append((path.name, *_write_safetensors(path, enc.blobs, pool)))
                rank = int(stem.rsplit(".rank", 1)[1]) if "." in stem else None
                doc = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "part": enc.part, "rank": rank}
                records.append(_write_json(tmp / f"{stem}.json", {**doc, "tree": trees[stem]}))
            records += [_FileRecord(name, size, _CHECKSUM, digest.result()) for name, size, digest in digests]
        return records

    def _commit(
        self,
        name: str,
        tmp: Path,
        final: Path,
        token: str,
        records: list[_FileRecord],
        shared: Mapping[str, Any],
        per_rank: Mapping[str, Any],
        extra: Mapping[str, Any],
    ) -> None:
        """Rank 0: gather the other ranks' checksums, write the manifest last, and rename the directory into place."""
        files, tokens = list(records), [token]
        for r in range(1, self.world_size):
            report_path = tmp / f".rank{r}.files.json"
            try:
                report = json.loads(report_path.read_bytes())
                theirs = [_record_from_entry(f) for f in report["files"]]
                tokens.append(report["token"])
                report_path.unlink()
            except (OSError, ValueError, TypeError, KeyError) as e:
                raise CheckpointError(
                    f"rank {r} did not finish writing its files; see the error reported by rank {r}"
                ) from e
            for f in theirs:
                if not f.name.endswith(f".rank{r}.json") and not f.name.endswith(f".rank{r}.safetensors"):
                    raise CheckpointError(f"rank {r} reported an unexpected file {f.name!r}")
                if not (tmp / f.name).is_file() or (tmp / f.name).stat().st_size != f.size:
                    raise CheckpointError(f"{tmp / f.name}, written by rank {r}, is missing or has the wrong size")
            files += theirs
        expected = {f"{p}.rank{r}.json" for p in per_rank for r in range(self.world_size)}
        missing = expected - {f.name for f in files}
        if missing:
            raise CheckpointError(
                f"the ranks saved different per-rank parts (missing {sorted(missing)}); every rank must pass the same "
                "per_rank keys"
            )
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "name": name,
            "sequence": 1 + max((e.sequence for e in list_checkpoints(self.root)), default=0),
            "created": time.time(),
            "world_size": self.world_size,
            "shared_parts": list(shared),
            "per_rank_parts": list(per_rank),
            "monitor": self.monitor,
            "mode": self.mode,
            "metric": extra["metric"],
            "files": [f.entry() for f in sorted(files)],
            "writers": tokens,
            "meta": extra["meta"],
        }
        _write_json(tmp / MANIFEST, _sealed(manifest))
        try:
            _fsync_dir(tmp)
        except OSError as e:
            raise _io_error("syncing", tmp, e) from e
        self._rename_into_place(tmp, final)

    def _rename_into_place(self, tmp: Path, final: Path) -> None:
        aside = self.root / f"{_ASIDE_PREFIX}{final.name}"
        moved_aside = False
        try:
            if os.path.lexists(final):  # re-saving under an existing name: keep the old copy until the new one is in
                os.rename(final, aside)
                moved_aside = True
            os.rename(tmp, final)
        except OSError as e:
            if moved_aside and not os.path.lexists(final):
                try:
                    os.rename(aside, final)
                except OSError:  # find_latest still finds it there, and the next save moves it back
                    logger.error("could not move %s back to %s", aside, final)
            raise _io_error("renaming the finished checkpoint to", final, e) from e
        try:
            _fsync_dir(self.root)
        except OSError as e:
            raise _io_error("syncing", self.root, e) from e
        if moved_aside:
            try:
                _remove(aside)
            except OSError as e:
                logger.warning("could not delete the replaced checkpoint %s: %s", aside, e)

    def _publish(self, name: str) -> None:
        """Rank 0, after the rename: point `latest` at the new checkpoint, then rotate."""
        try:
            point_latest(self.root, name)
        except CheckpointError as e:
            raise CheckpointError(f"{self.root / name} was saved, but {e}") from e
        try:
            self._rotate(name)
        except CheckpointError as e:  # the new checkpoint is safe; failing to delete old ones must not fail the save
            logger.warning("could not rotate old checkpoints: %s", e)

    def _rotate(self, current: str) -> None:
        """Delete checkpoints beyond the keep_last newest and keep_best best; never the current or `latest` one."""
        if self.keep_last is None:
            return
        entries = [e for e in list_checkpoints(self.root) if not e.name.startswith(".")]
        keep = {current, _read_latest_pointer(self.root)}
        keep |= {e.name for e in sorted(entries, key=lambda e: e.order, reverse=True)[: self.keep_last]}
        if self.keep_best:
            sign = 1.0 if self.mode == "max" else -1.0
            scored = [
                e for e in entries if e.monitor == self.monitor and e.metric is not None and not math.isnan(e.metric)
            ]
            ranked = sorted(scored, key=lambda e: (sign * e.metric, e.order), reverse=True)
            keep |= {e.name for e in ranked[: self.keep_best]}
        trash = []
        for e in entries:
            if e.name in keep:
                continue
            try:
                os.rename(e.path, self.root / f"{_TRASH_PREFIX}{e.name}")  # atomic: gone whole, never half-deleted
                trash.append(self.root / f"{_TRASH_PREFIX}{e.name}")
                logger.info("deleting old checkpoint %s", e.path)
            except OSError as err:
                logger.warning("could not delete old checkpoint %s: %s", e.path, err)
        if trash:
            # Freeing gigabytes can take a while (e.g. ext4 with `discard`); training need not wait for it. Not a
            # daemon thread, so it finishes at exit; if the process is killed, the next save removes what is left.
            self._deleter = threading.Thread(target=_delete_all, args=(trash,), name="ckpt-rotate")
            self._deleter.start()
