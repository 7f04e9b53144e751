"""Streaming safetensors reading and writing, and the tensor-content digest.

Reading validates the whole header before any tensor is touched (files are untrusted data) and then reads one
tensor at a time with positioned reads, so a model is never loaded whole. Writing lays out the header from the
lazy model's specs, streams tensors in sorted name order, hashes them on the way, and patches the digests into
fixed-width metadata fields at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import stat
import struct
import threading
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
import xxhash

from mergekit_sd.errors import UserError
from mergekit_sd.formats.budget import MemoryBudget
from mergekit_sd.formats.prefetch import DEFAULT_WINDOW, produce_ahead
from mergekit_sd.lazy import LazyModel, TensorSpec

MAX_HEADER_SIZE = 100_000_000

DTYPE_CODES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CODE_OF: dict[torch.dtype, str] = {v: k for k, v in DTYPE_CODES.items()}

DTYPE_NAMES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp64": torch.float64,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


def dtype_code(dtype: torch.dtype) -> str:
    return CODE_OF[dtype]


# ---------------------------------------------------------------------------------------------------------------
# content digest


def tensor_digest(name: str, dtype: torch.dtype, shape: Iterable[int], data) -> bytes:
    """xxh3-128 of one tensor's name, dtype, shape and bytes."""
    h = xxhash.xxh3_128()
    h.update(_tensor_prefix(name, dtype, shape))
    h.update(data)
    return h.digest()


def _tensor_prefix(name: str, dtype: torch.dtype, shape: Iterable[int]) -> bytes:
    return b"%s\0%s\0%s\0" % (name.encode(), dtype_code(dtype).encode(), json.dumps(list(shape)).encode())


def combine_digests(per_tensor: Mapping[str, bytes]) -> str:
    """The content digest of a model: tensor digests combined in sorted name order (independent of file layout)."""
    h = xxhash.xxh3_128(b"sdbuild-content-v1\0")
    for name in sorted(per_tensor):
        h.update(per_tensor[name])
    return h.hexdigest()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor."""
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


# ---------------------------------------------------------------------------------------------------------------
# reading


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate name {k!r} in header")
        out[k] = v
    return out


class SafetensorsFile:
    """A validated safetensors file; tensors are read one at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        where = str(self.path)
        try:
            st = os.stat(self.path)
            if not stat.S_ISREG(st.st_mode):  # a directory, FIFO or device would fail later or block forever
                raise UserError("not a regular file", where)
            self.size = st.st_size
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise UserError(f"cannot open model file: {e.strerror}", where) from None
        self._fd = fd
        try:
            self._parse(where)
        except BaseException:
            os.close(fd)
            raise

    def _parse(self, where: str) -> None:
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise UserError("not a safetensors file: shorter than its 8-byte header length", where)
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_SIZE:
            raise UserError(f"safetensors header of {n} bytes exceeds the {MAX_HEADER_SIZE}-byte limit", where)
        if 8 + n > self.size:
            raise UserError(f"truncated safetensors file: header length {n} runs past the end of the file ({self.size} bytes)", where)
        raw = _pread_all(self._fd, n, 8)
        self.header_bytes = head + raw  # the file's first bytes, for hashing it without reading them again
        if not raw.lstrip(b" ").startswith(b"{"):
            raise UserError("not a safetensors file: header does not start with '{'", where)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise UserError(f"corrupt safetensors header: {str(e).splitlines()[0][:200]}", where) from None
        if not isinstance(header, dict):
            raise UserError("corrupt safetensors header: not a JSON object", where)
        meta = header.pop("__metadata__", None)
        meta = {} if meta is None else meta
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise UserError("invalid safetensors metadata: __metadata__ must map strings to strings", where)
        bad = next((s for s in (*meta, *meta.values(), *header) if not _valid_utf8(s)), None)
        if bad is not None:
            raise UserError(f"corrupt safetensors header: invalid Unicode in {bad[:80]!r}", where)
        self.metadata: dict[str, str] = meta
        self.data_start = 8 + n
        buffer_len = self.size - self.data_start
        specs: dict[str, TensorSpec] = {}
        offsets: dict[str, tuple[int, int]] = {}
        for name, entry in header.items():
            tw = f"{where}: tensor {name[:120]!r}"
            if not isinstance(entry, dict) or set(entry) - {"dtype", "shape", "data_offsets"} or len(entry) != 3:
                raise UserError("corrupt header entry: expected dtype, shape and data_offsets", tw)
            code, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not isinstance(code, str) or code not in DTYPE_CODES:
                raise UserError(f"unsupported dtype {str(code)[:40]!r}; known: {' '.join(DTYPE_CODES)}", tw)
            if not isinstance(shape, list) or len(shape) > 16 or not all(type(d) is int and 0 <= d < 2**40 for d in shape):
                raise UserError(f"invalid shape {str(shape)[:80]}", tw)
            if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)):
                raise UserError(f"invalid data_offsets {str(offs)[:80]}", tw)
            b, e = offs
            if not 0 <= b <= e:
                raise UserError(f"invalid data_offsets {offs!r}", tw)
            if e > buffer_len:
                raise UserError(f"data_offsets {offs!r} run past the end of the file (truncated?)", tw)
            spec = TensorSpec(DTYPE_CODES[code], tuple(shape))
            if e - b != spec.nbytes:
                raise UserError(f"data_offsets span {e - b} bytes but dtype {code} and shape {shape} need {spec.nbytes}", tw)
            specs[name] = spec
            offsets[name] = (b, e)
        last_end, last_name = 0, None
        for name, (b, e) in sorted(offsets.items(), key=lambda kv: kv[1]):
            if b < last_end:
                raise UserError(f"tensors {str(last_name)[:120]!r} and {name[:120]!r} overlap in the data buffer", where)
            if e > b or last_name is None:
                last_end, last_name = e, name
        self.specs = specs
        self.offsets = offsets

    def read(self, name: str) -> torch.Tensor:
        spec = self.specs[name]
        b, e = self.offsets[name]
        if e == b:
            return torch.empty(spec.shape, dtype=spec.dtype)
        raw = torch.empty(e - b, dtype=torch.uint8)  # not zero-filled: the read overwrites every byte
        _preadinto(self._fd, raw.numpy(), self.data_start + b, str(self.path))
        return raw.view(spec.dtype).reshape(spec.shape)

    def read_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of a tensor, flattened (a chunk of a large tensor without reading the rest)."""
        spec = self.specs[name]
        start, stop = max(0, start), min(stop, spec.numel)
        if stop <= start:
            return torch.empty(0, dtype=spec.dtype)
        size = spec.nbytes // spec.numel
        b = self.offsets[name][0] + start * size
        buf = bytearray((stop - start) * size)
        _preadinto(self._fd, buf, self.data_start + b, str(self.path))
        return torch.frombuffer(buf, dtype=spec.dtype)

    def read_raw(self, name: str) -> bytearray:
        b, e = self.offsets[name]
        buf = bytearray(e - b)
        if e > b:
            _preadinto(self._fd, buf, self.data_start + b, str(self.path))
        return buf

    def lazy(self) -> LazyModel:
        return LazyModel(self.specs, self.read, self.metadata, label=self.path.name, ranger=self.read_range,
                         coster=lambda n: self.specs[n].nbytes)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    buf = bytearray(n)
    _preadinto(fd, buf, offset)
    return bytes(buf)


def _preadinto(fd: int, buf, offset: int, where: str | None = None) -> None:
    """Fill a writable buffer (bytearray, numpy array) from `offset`; short reads continue, end of file is an error."""
    view = memoryview(buf)
    done = 0
    while done < len(buf):
        try:
            got = os.preadv(fd, [view[done:]], offset + done)
        except OSError as e:
            raise UserError(f"cannot read model file: {e.strerror}", where) from None
        if got <= 0:
            raise UserError(f"unexpected end of file while reading at byte {offset + done} (file truncated or changed while reading?)", where)
        done += got


def _valid_utf8(s: str) -> bool:
    """JSON escapes can encode lone surrogates, which no UTF-8 writer or hash can take."""
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    with SafetensorsFile(path) as f:
        return f.specs, f.metadata


# ---------------------------------------------------------------------------------------------------------------
# writing


class WriteResult:
    def __init__(self, content_digest: str, buffer_sha256: str, tensor_digests: dict[str, bytes], size: int):
        self.content_digest = content_digest
        self.buffer_sha256 = buffer_sha256
        self.tensor_digests = tensor_digests
        self.size = size


CONTENT_DIGEST_KEY = "sdbuild.content_digest"
BUFFER_SHA_KEY = "modelspec.hash_sha256"
_PLACEHOLDERS = {CONTENT_DIGEST_KEY: "0" * 32, BUFFER_SHA_KEY: "0x" + "0" * 64}


class _Consumer:
    """A thread that applies `fn` to queued (name, tensor) items in order; failures surface on the producer.
    With `inline`, `put` runs `fn` at once on the caller's thread (a build on one thread)."""

    def __init__(self, fn: Callable[[str, torch.Tensor], None], failure: list[BaseException], inline: bool = False,
                 done: Callable[[str], None] | None = None):
        self.fn, self.failure, self.inline, self.done = fn, failure, inline, done
        self.q: queue.Queue = queue.Queue(maxsize=3)
        self.thread = None if inline else threading.Thread(target=self._run, name="sdbuild-writer", daemon=True)
        if self.thread is not None:
            self.thread.start()

    def _apply(self, name: str, t: torch.Tensor) -> None:
        try:
            self.fn(name, t)
        finally:
            if self.done is not None:
                self.done(name)

    def _run(self) -> None:
        try:
            while (item := self.q.get()) is not None:
                self._apply(*item)
                item = None  # not kept alive while waiting for the next one
        except BaseException as e:
            self.failure.append(e)
            while (item := self.q.get()) is not None:  # drain so the producer never blocks
                if self.done is not None:
                    self.done(item[0])

    def put(self, item) -> None:
        if self.thread is None:
            try:
                self._apply(*item)
            except BaseException as e:
                self.failure.append(e)
            return
        self.q.put(item)

    def finish(self) -> None:
        if self.thread is not None:
            self.q.put(None)
            self.thread.join()


class _Handover:
    """Gives a written tensor's bytes back to the budget once every consumer is done with it."""

    def __init__(self, budget: MemoryBudget | None, specs: Mapping[str, TensorSpec], consumers: int):
        self.budget, self.specs, self.consumers = budget, specs, consumers
        self.left: dict[str, int] = {}
        self.lock = threading.Lock()

    def start(self, name: str) -> None:
        with self.lock:
            self.left[name] = self.consumers

    def done(self, name: str) -> None:
        with self.lock:
            self.left[name] -= 1
            last = self.left[name] == 0
            if last:
                del self.left[name]
        if last and self.budget is not None:
            self.budget.release(self.specs[name].nbytes)


def _header_bytes(specs: Mapping[str, TensorSpec], names: list[str], metadata: Mapping[str, str],
                  patched: Mapping[str, str]) -> bytes:
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta.update(patched)
    meta.setdefault("format", "pt")
    header: dict = {"__metadata__": dict(sorted(meta.items()))}
    off = 0
    for n in names:
        s = specs[n]
        header[n] = {"dtype": dtype_code(s.dtype), "shape": list(s.shape), "data_offsets": [off, off + s.nbytes]}
        off += s.nbytes
    hbytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hbytes += b" " * (-len(hbytes) % 8)
    if len(hbytes) > MAX_HEADER_SIZE:
        raise UserError(f"output header would be {len(hbytes)} bytes, over the safetensors limit")
    return hbytes


def header_size(model: LazyModel, metadata: Mapping[str, str]) -> int:
    """The bytes a file of `model` will take (header included), known before any tensor is produced."""
    names = model.keys()
    return 8 + len(_header_bytes(model.specs, names, metadata, _PLACEHOLDERS)) + sum(model.spec(n).nbytes for n in names)


def write_model(
    path: str | os.PathLike,
    model: LazyModel,
    metadata: Mapping[str, str],
    on_tensor: Callable[[str], None] | None = None,
    *,
    final_metadata: Callable[[], Mapping[str, str]] | None = None,
    workers: int | None = None,
    window: int = DEFAULT_WINDOW,
    known_digest: Callable[[str], bytes | None] | None = None,
    budget: MemoryBudget | None = None,
) -> WriteResult:
    """Stream `model` into a new safetensors file at `path` (which the caller renames into place).

    The metadata gains the content digest and the tensor-buffer sha256, patched in after the tensors are written.
    `final_metadata`, when given, is asked for the real metadata only after every tensor was produced (facts learnt
    while producing, such as the digests of inputs hashed as they were read); `metadata` then only reserves the
    header's space, and a header that came out a different length is moved into place at the end.
    Producing runs on `workers` threads ahead of the writer (in name order, at most `window` bytes waiting);
    writing (with the content digest) and the buffer sha256 run on two more, so computation, hashing and the disk
    overlap; with `workers=1` everything runs on the calling thread. With `budget`, work in flight and tensors
    waiting to be written share it (formats.prefetch); a tensor's bytes go back once it is written and hashed.
    Nothing is fsynced here: durability is the caller's (see formats.atomic and the store).
    `known_digest(name)`, when it gives one, is the digest the producer already checked the tensor's bytes
    against (a tensor reused from a stored object): it is not hashed a second time.
    """
    names = model.keys()
    specs = {n: model.spec(n) for n in names}
    hbytes = _header_bytes(specs, names, metadata, _PLACEHOLDERS)

    digests: dict[str, bytes] = {}
    sha = hashlib.sha256()
    failure: list[BaseException] = []

    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)

        def write_and_digest(name: str, t: torch.Tensor) -> None:
            data = tensor_bytes(t)
            known = known_digest(name) if known_digest is not None else None
            if known is None:
                h = xxhash.xxh3_128(_tensor_prefix(name, t.dtype, t.shape))
                h.update(data)
                known = h.digest()
            digests[name] = known
            f.write(data)

        def buffer_sha(name: str, t: torch.Tensor) -> None:
            sha.update(tensor_bytes(t))

        # two consumers, each in tensor order: the sha256 runs while the other hashes and writes
        inline = workers is not None and workers <= 1
        handover = _Handover(budget, specs, 2)
        consumers = [_Consumer(fn, failure, inline, handover.done) for fn in (write_and_digest, buffer_sha)]
        produced = produce_ahead(model, names, workers, window, budget, release_on_yield=budget is None)
        try:
            for n, t in produced:
                if failure:
                    if budget is not None:
                        budget.release(specs[n].nbytes)
                    break
                s = specs[n]
                if t.dtype != s.dtype or tuple(t.shape) != s.shape:
                    if budget is not None:
                        budget.release(specs[n].nbytes)
                    raise RuntimeError(f"tensor {n!r}: produced {t.dtype} {tuple(t.shape)} but declared {s.dtype} {s.shape}")
                t = t.contiguous()
                handover.start(n)
                for c in consumers:
                    c.put((n, t))
                del t
                if on_tensor:
                    on_tensor(n)
        finally:
            produced.close()
            for c in consumers:
                c.finish()
        if failure:
            raise failure[0]
        content = combine_digests(digests)
        buf_sha = sha.hexdigest()
        final = _header_bytes(specs, names, final_metadata() if final_metadata else metadata,
                              {CONTENT_DIGEST_KEY: content, BUFFER_SHA_KEY: "0x" + buf_sha})
        if len(final) == len(hbytes):
            f.seek(8)
            f.write(final)
    if len(final) != len(hbytes):
        _move_data(Path(path), 8 + len(hbytes), final)
    return WriteResult(content, buf_sha, digests, os.path.getsize(path))


def _move_data(path: Path, data_start: int, header: bytes) -> None:
    """Rewrite `path` with a header of another length in front of the same tensor bytes."""
    tmp = path.with_name(path.name + ".relayout")
    try:
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            dst.write(struct.pack("<Q", len(header)))
            dst.write(header)
            src.seek(data_start)
            shutil.copyfileobj(src, dst, 16 << 20)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def file_content_digest(path: str | os.PathLike, with_sha256: bool = True,
                        per_tensor: dict[str, bytes] | None = None) -> tuple[str, str | None]:
    """(content digest, full-file sha256) of a safetensors file in one sequential pass; `per_tensor`, when given,
    receives each tensor's digest from the same pass (what tensor-level reuse keys on)."""
    sf = SafetensorsFile(path)
    try:
        sha = hashlib.sha256() if with_sha256 else None
        if sha is not None:
            sha.update(_pread_all(sf._fd, sf.data_start, 0))
        digests: dict[str, bytes] = {}
        by_offset = sorted(sf.offsets.items(), key=lambda kv: kv[1])
        pos = 0
        chunk = 64 << 20
        scratch = memoryview(bytearray(min(chunk, max([e - b for b, e in sf.offsets.values()], default=0))))
        for name, (b, e) in by_offset:
            if sha is not None and b > pos:  # bytes between tensors still belong to the file
                sha.update(_pread_all(sf._fd, b - pos, sf.data_start + pos))
            spec = sf.specs[name]
            h = xxhash.xxh3_128(_tensor_prefix(name, spec.dtype, spec.shape))
            cur = b
            while cur < e:
                n = min(chunk, e - cur)
                if cur < pos:  # overlapping zero-size edge; never happens for validated files
                    n = min(n, pos - cur)
                buf = scratch[:n]
                _preadinto(sf._fd, buf, sf.data_start + cur)
                h.update(buf)
                if sha is not None and cur >= pos:
                    sha.update(buf)
                cur += n
            digests[name] = h.digest()
            pos = max(pos, e)
        if per_tensor is not None:
            per_tensor.update(digests)
        if sha is not None:
            end = sf.size - sf.data_start
            if end > pos:
                sha.update(_pread_all(sf._fd, end - pos, sf.data_start + pos))
        return combine_digests(digests), (sha.hexdigest() if sha is not None else None)
    finally:
        sf.close()


def model_content_digest(model: LazyModel) -> str:
    """Content digest of any lazy model (used for .ckpt inputs, which have no byte layout of their own)."""
    return combine_digests({n: tensor_digest(n, model.spec(n).dtype, model.spec(n).shape, tensor_bytes(model.get(n))) for n in model.keys()})
