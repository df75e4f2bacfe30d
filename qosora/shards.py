"""Streamed safetensors I/O: read a Hugging Face checkpoint one tensor at a time, write sharded outputs.

`ShardReader` reads each tensor with a positioned read of its byte range (no memory map), so only the tensor being
processed is resident. `ShardedWriter` streams tensors into a shard's data file and writes the header when the
shard is full, so a 7B model is never held whole in memory.
Shards follow the Hugging Face convention (`name-00001-of-00003.safetensors` + `name.safetensors.index.json`),
with a single `name.safetensors` when everything fits one shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from qosora.errors import QosoraError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


def read_header(path: Path) -> tuple[dict, int]:
    """The safetensors JSON header of `path` (validated) and the byte offset where tensor data starts."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < _MAX_HEADER_BYTES or 8 + n > size:
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        header.pop("__metadata__", None)
        for name, info in header.items():
            _check_entry(name, info, size - 8 - n)
        return header, 8 + n
    except (ValueError, OSError, UnicodeDecodeError, RecursionError) as e:
        raise QosoraError(f"{path} is not a valid safetensors file ({e}): re-download or re-save it") from None


def _check_entry(name: str, info, data_bytes: int) -> None:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise ValueError(f"tensor {name!r}: entry without dtype, shape and data_offsets")
    if not isinstance(info["dtype"], str):
        raise ValueError(f"tensor {name!r}: dtype {info['dtype']!r} is not a name")
    offsets, shape = info["data_offsets"], info["shape"]
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_bytes):
        raise ValueError(f"tensor {name!r}: data_offsets {offsets} outside the file")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"tensor {name!r}: shape {shape} is not a list of sizes")
    if info["dtype"] in _DTYPES:
        numel = 1
        for d in shape:
            numel *= d
        if numel * _DTYPES[info["dtype"]].itemsize != offsets[1] - offsets[0]:
            raise ValueError(f"tensor {name!r}: shape {shape} does not match its {offsets[1] - offsets[0]} bytes")


_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class ShardReader:
    """Lazy access to the tensors of a (possibly sharded) safetensors checkpoint in `directory/prefix*`.

    Tensors are read with plain positioned reads, not a memory map: a mapped 15 GB checkpoint would count its
    touched pages in the process's resident memory until unmapped, and streaming is the point here. Shard names
    in an index must be plain file names inside `directory` (no `..`, no absolute paths).
    """

    def __init__(self, directory: str | Path, prefix: str = "model"):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            what = "is a file, not a directory" if self.directory.exists() else "does not exist"
            raise QosoraError(f"model directory {self.directory} {what}: pass a local Hugging Face model directory")
        index = self.directory / f"{prefix}.safetensors.index.json"
        single = self.directory / f"{prefix}.safetensors"
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError, TypeError, UnicodeDecodeError,
                    RecursionError) as e:
                raise QosoraError(f"{index} is corrupt ({e}): re-download or re-save the model") from None
            for f in files:
                if not isinstance(f, str) or Path(f).name != f or f in ("", ".", ".."):
                    raise QosoraError(f"{index} names shard {f!r} outside {self.directory}: refusing to read it; "
                                      "shard names must be plain file names in the model directory")
            paths = [self.directory / f for f in files]
        elif single.is_file():
            paths = [single]
        else:
            if any(self.directory.glob("*.bin")) or any(self.directory.glob("*.pt")):
                raise QosoraError(
                    f"{self.directory} has PyTorch .bin weights, which qosora does not unpickle: convert them once with "
                    "`AutoModelForCausalLM.from_pretrained(d).save_pretrained(d, safe_serialization=True)`"
                )
            raise QosoraError(f"no {prefix}.safetensors (or sharded index) in {self.directory}: not a safetensors checkpoint")
        # name -> (path, dtype, shape, absolute start, absolute end)
        self._entries: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
        for path in paths:
            if not path.is_file():
                raise QosoraError(f"shard {path} listed in the index is missing: re-download the model")
            header, base = read_header(path)
            for name, info in header.items():
                start, end = info["data_offsets"]
                self._entries[name] = (path, info["dtype"], tuple(info["shape"]), base + start, base + end)

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][2]

    def dtype(self, name: str) -> str:
        """The safetensors dtype name (F32, BF16, U8, ...)."""
        return self._entries[name][1]

    def get(self, name: str) -> torch.Tensor:
        path, dtype, shape, start, end = self._entries[name]
        if dtype not in _DTYPES:
            raise QosoraError(f"{path}: tensor {name} has dtype {dtype}, which qosora does not read")
        buf = bytearray(end - start)
        with open(path, "rb") as f:
            f.seek(start)
            if f.readinto(buf) != len(buf):
                raise QosoraError(f"{path} is truncated (tensor {name}): re-download or re-save it")
        if not buf:
            return torch.empty(shape, dtype=_DTYPES[dtype])
        return torch.frombuffer(buf, dtype=_DTYPES[dtype]).reshape(shape)

    def fingerprint(self) -> str:
        """sha256 over every shard's name, size and safetensors header: cheap, and changes when the weights do."""
        h = hashlib.sha256()
        for path in sorted({e[0] for e in self._entries.values()}):
            h.update(path.name.encode())
            h.update(str(path.stat().st_size).encode())
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                h.update(f.read(min(n, 1 << 24)))
        return h.hexdigest()


class ShardedWriter:
    """Write tensors into `directory/prefix*.safetensors` as they come, holding none of them in memory.

    Each tensor's bytes go straight to a shard's data file; when the shard reaches `max_shard_bytes` (or at
    `close`), the safetensors header (names, dtypes, shapes, offsets) is written and the data streamed after it.
    """

    def __init__(self, directory: str | Path, prefix: str, max_shard_bytes: int = 1 << 30):
        self.directory = Path(directory)
        self.prefix = prefix
        self.max_shard_bytes = max_shard_bytes
        self._data = None  # open data file of the current shard
        self._header: dict[str, dict] = {}
        self._offset = 0
        self._shards: list[tuple[str, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().contiguous().cpu()
        if t.dtype not in _DTYPE_NAMES:
            raise TypeError(f"cannot write {name}: dtype {t.dtype}")
        if self._data is None:
            self._data = open(self.directory / f".{self.prefix}-{len(self._shards)}.data", "wb")
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        self._data.write(raw)
        self._header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self._offset, self._offset + len(raw)]}
        self._offset += len(raw)
        if self._offset >= self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if self._data is None:
            return
        self._data.close()
        data_path = Path(self._data.name)
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # safetensors aligns the data start to 8 bytes
        tmp_name = f".{self.prefix}-shard{len(self._shards):05d}.safetensors"
        with open(self.directory / tmp_name, "wb") as out, open(data_path, "rb") as data:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            shutil.copyfileobj(data, out, 16 << 20)
        data_path.unlink()
        self._shards.append((tmp_name, list(self._header)))
        self._data, self._header, self._offset = None, {}, 0

    def close(self) -> list[str]:
        """Flush and give shards their final names; returns the file names written."""
        self._flush()
        if not self._shards:
            save_file({}, str(self.directory / f"{self.prefix}.safetensors"))
            return [f"{self.prefix}.safetensors"]
        if len(self._shards) == 1:
            final = f"{self.prefix}.safetensors"
            os.replace(self.directory / self._shards[0][0], self.directory / final)
            return [final]
        total = len(self._shards)
        weight_map, files = {}, []
        for i, (tmp_name, names) in enumerate(self._shards):
            final = f"{self.prefix}-{i + 1:05d}-of-{total:05d}.safetensors"
            os.replace(self.directory / tmp_name, self.directory / final)
            files.append(final)
            weight_map.update({n: final for n in names})
        index = {"metadata": {}, "weight_map": weight_map}
        (self.directory / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return files
