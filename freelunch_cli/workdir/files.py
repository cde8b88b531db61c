"""Crash-safe file writing: atomic replace, hashed safetensors, and a streaming tensor writer.

Every file of a work directory is written to a temporary name in the same folder, fsynced and renamed,
so a killed process leaves either the old file or the new one. The size and sha256 of what was written
are returned so the manifest can record them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.core.units import format_bytes

_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class FileInfo:
    """What the manifest remembers of a file: enough to notice truncation or alteration."""

    size: int
    sha256: str

    def as_dict(self) -> dict:
        return {"size": self.size, "sha256": self.sha256}


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def disk_full(path: Path) -> OSError:
    """The error of a full disk while writing ``path`` (the CLI names the file and says how to go on)."""
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _is_disk_full(e: BaseException) -> bool:
    """A full disk, as Python reports it (OSError) or as a library's native code does (tokenizers: "os error 28")."""
    return getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e) or "os error 28" in str(e)


@contextmanager
def atomic_open(path: Path) -> Iterator:
    """Open a temporary file beside ``path``; on clean exit fsync it and rename it over ``path``.

    On any failure the temporary file is removed and ``path`` keeps its old contents; a full disk is reported as
    an OSError naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    f = open(tmp, "wb")
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        f.close()
        tmp.unlink(missing_ok=True)
        if _is_disk_full(e) and not getattr(e, "filename", None):
            raise disk_full(path) from None
        raise


def save_pretrained_atomic(obj, folder: Path) -> dict[Path, FileInfo]:
    """``obj.save_pretrained`` (a tokenizer, a config) with every file landing atomically in ``folder``.

    The library writes into a temporary folder beside ``folder``; each file is then fsynced and renamed into place,
    so a failure (a full disk) leaves no truncated file where a resume would trust it. Returns each file's path and
    FileInfo, for the manifest.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.save-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        try:
            obj.save_pretrained(tmp)
        except Exception as e:
            if _is_disk_full(e):  # name the file the library was writing: the newest one in the temporary folder
                partial = max((p for p in tmp.glob("*") if p.is_file()), key=lambda p: p.stat().st_mtime_ns, default=None)
                raise disk_full(folder / partial.name if partial is not None else folder) from None
            raise
        written = {}
        for f in sorted(p for p in tmp.iterdir() if p.is_file()):
            written[folder / f.name] = write_bytes_atomic(folder / f.name, f.read_bytes())
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_free_space(folder: Path, needed: int, what: str, detail: str = "") -> None:
    """Refuse before writing when the disk under ``folder`` (or its nearest existing parent) cannot hold ``needed`` bytes.

    Raises FreelunchError naming ``what``, both sizes and the folder.
    """
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise FreelunchError(
            f"not enough disk for the {what}: it needs {format_bytes(needed)}{detail} but {folder} has {format_bytes(free)} free"
        )


HASH_BESIDE = 1 << 20  # files from this size are hashed on a thread while they are written (both release the GIL)


def write_bytes_atomic(path: Path, data: bytes) -> FileInfo:
    """Write ``data`` to ``path`` atomically; its size and sha256 for the manifest."""
    if len(data) < HASH_BESIDE:
        with atomic_open(path) as f:
            f.write(data)
        return FileInfo(len(data), hashlib.sha256(data).hexdigest())
    with ThreadPoolExecutor(1) as pool:
        digest = pool.submit(lambda: hashlib.sha256(data).hexdigest())
        with atomic_open(path) as f:
            f.write(data)
        return FileInfo(len(data), digest.result())


def write_json_atomic(path: Path, obj) -> FileInfo:
    return write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: Path):
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FreelunchError(f"missing file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FreelunchError(f"corrupt JSON file {path}: {e}") from None


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> FileInfo:
    """Save a dict of tensors as one safetensors file, atomically; return its size and hash."""
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    return write_bytes_atomic(path, st_save(clean, metadata=meta or None))


def load_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise FreelunchError(f"missing file: {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except FreelunchError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated headers
        raise FreelunchError(f"cannot read {path}: {e} (the file is truncated or corrupt)") from None


def tensor_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def tensor_names(path: Path) -> list[str]:
    """The tensor names of a safetensors file, read from its header only."""
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def tensor_shapes(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as meta tensors (shape and dtype, no data), read from its header only."""
    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    with safe_open(str(path), framework="pt") as f:
        return {
            k: torch.empty(f.get_slice(k).get_shape(), dtype=dtypes.get(f.get_slice(k).get_dtype(), torch.int64), device="meta")
            for k in f.keys()
        }


def count_params(path: Path) -> int:
    """Number of elements in a safetensors file, read from its header only."""
    with safe_open(str(path), framework="pt") as f:
        total = 0
        for k in f.keys():
            n = 1
            for d in f.get_slice(k).get_shape():
                n *= d
            total += n
        return total


def sha256_file(path: Path, chunk: int = 1 << 22) -> FileInfo:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            size += len(b)
            h.update(b)
    return FileInfo(size, h.hexdigest())


class StreamingTensorWriter:
    """Writes one large tensor of known shape to a safetensors file in row chunks.

    The header is written first, then rows are appended as they are computed, so an activation cache
    of N samples never has to be held in memory at once. The file becomes visible (atomic rename) only
    when every row has been written. Writing and hashing run on a background thread (both release the interpreter
    lock), overlapping the computation of the next rows; at most ``AHEAD`` appended chunks wait.
    """

    AHEAD = 2

    def __init__(self, path: Path, name: str, shape: tuple[int, ...], dtype: torch.dtype, metadata: dict | None = None):
        if dtype not in _ST_DTYPES:
            raise ValueError(f"unsupported dtype {dtype}")
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self.row_bytes = torch.tensor([], dtype=dtype).element_size()
        for s in self.shape[1:]:
            self.row_bytes *= s
        nbytes = self.row_bytes * self.shape[0]
        header = {name: {"dtype": _ST_DTYPES[dtype], "shape": list(self.shape), "data_offsets": [0, nbytes]}}
        if metadata:
            header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        self._hash = hashlib.sha256()
        self._rows = 0
        self._size = 0
        self._ctx = atomic_open(self.path)
        self._f = self._ctx.__enter__()
        self._pool = ThreadPoolExecutor(1)
        self._pending: deque = deque()  # (future, the rows it writes: kept alive until written)
        self._write(len(hb).to_bytes(8, "little") + hb)

    def _write(self, b: bytes) -> None:
        self._f.write(b)
        self._hash.update(b)
        self._size += len(b)

    def append(self, rows: torch.Tensor) -> None:
        """Append rows ``[n, *shape[1:]]`` (cast to the file's dtype here; written in the background)."""
        rows = rows.detach().to(device="cpu", dtype=self.dtype).contiguous()
        if tuple(rows.shape[1:]) != self.shape[1:] or self._rows + rows.shape[0] > self.shape[0]:
            raise ValueError(f"rows of shape {tuple(rows.shape)} do not fit tensor {self.shape} at row {self._rows}")
        data = memoryview(rows.view(-1).view(torch.uint8).numpy())  # the tensor's own bytes, not a copy
        self._pending.append((self._pool.submit(self._write, data), rows))
        self._rows += rows.shape[0]
        while len(self._pending) > self.AHEAD:
            self._wait(self._pending.popleft()[0])

    def _wait(self, future) -> None:
        try:
            future.result()
        except OSError as e:
            if _is_disk_full(e) and not e.filename:
                raise disk_full(self.path) from None
            raise

    def _drain(self) -> None:
        while self._pending:
            self._wait(self._pending.popleft()[0])

    def close(self) -> FileInfo:
        self._drain()
        self._pool.shutdown()
        if self._rows != self.shape[0]:
            raise ValueError(f"only {self._rows} of {self.shape[0]} rows were written to {self.path}")
        self._ctx.__exit__(None, None, None)
        return FileInfo(self._size, self._hash.hexdigest())

    def abort(self) -> None:
        for future, _ in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)
        self._pending.clear()
        try:
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
        except RuntimeError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self.info = self.close()
            except BaseException:
                self.abort()  # a write that failed in the background: no partial file stays
                raise
        else:
            self.abort()
        return False


class TensorRows:
    """Reads rows (samples) of one tensor in a safetensors file without loading the rest of it."""

    def __init__(self, path: Path, name: str = "hidden"):
        self.path = Path(path)
        if not self.path.exists():
            raise FreelunchError(f"missing activation cache {self.path}")
        try:
            self._f = safe_open(str(self.path), framework="pt")
            self._slice = self._f.get_slice(name)
        except Exception as e:
            raise FreelunchError(f"cannot read {self.path}: {e} (the file is truncated or corrupt)") from None
        self.shape = tuple(self._slice.get_shape())
        self.dtype = self._slice.get_dtype()

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor (its file less the header)."""
        return self.path.stat().st_size

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self._slice[start:stop]

    def take(self, indices) -> torch.Tensor:
        """Rows at arbitrary indices, read one contiguous run at a time."""
        idx = [int(i) for i in indices]
        parts, i = [], 0
        while i < len(idx):
            j = i
            while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
                j += 1
            parts.append(self._slice[idx[i] : idx[j] + 1])
            i = j + 1
        return torch.cat(parts) if len(parts) > 1 else parts[0]
