"""Streamed safetensors I/O, checked against the safetensors library as the oracle."""

import json

import pytest
import torch
from safetensors import safe_open

from qosora.shards import ShardReader, ShardedWriter
from qosora.errors import QosoraError

TENSORS = {
    "a": torch.randn(10, 20), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(5),
    "d": torch.randint(0, 255, (33,), dtype=torch.uint8), "scalar": torch.tensor(3.0), "f": torch.randn(300).half(),
    "empty": torch.empty(0, 4),
}


@pytest.mark.parametrize("max_shard_bytes", [1 << 30, 500])
def test_written_shards_read_back_identically(tmp_path, max_shard_bytes):
    writer = ShardedWriter(tmp_path, "x", max_shard_bytes=max_shard_bytes)
    for name, t in TENSORS.items():
        writer.add(name, t)
    files = writer.close()
    assert (len(files) > 1) == (max_shard_bytes == 500)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"
    seen = {}
    for f in files:
        with safe_open(tmp_path / f, "pt") as h:
            seen.update({k: h.get_tensor(k) for k in h.keys()})
    reader = ShardReader(tmp_path, "x")
    for name, t in TENSORS.items():
        assert torch.equal(seen[name], t) and seen[name].dtype == t.dtype, name
        assert torch.equal(reader.get(name), t) and reader.shape(name) == tuple(t.shape), name
    if len(files) > 1:
        index = json.loads((tmp_path / "x.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(TENSORS)


def test_truncated_file_is_reported(tmp_path):
    writer = ShardedWriter(tmp_path, "model")
    writer.add("w", torch.randn(64, 64))
    writer.close()
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(QosoraError, match="truncated"):
        ShardReader(tmp_path).get("w")


def test_missing_shard_is_reported(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-1.safetensors"}}))
    with pytest.raises(QosoraError, match="missing"):
        ShardReader(tmp_path)
