"""Crafted safetensors files and indexes: `ShardReader` refuses them with one line, before any tensor is used, and
never reads a shard outside the model directory."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_one_line_error, build_tiny_model, files_under, run_cli
from qosora.errors import QosoraError
from qosora.shards import ShardReader


def write_raw(path: Path, header, data: bytes = b"") -> None:
    """A safetensors file with an arbitrary (possibly invalid) JSON header."""
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


F32_2x2 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


@pytest.mark.parametrize("header, data, needle", [
    ([1, 2, 3], b"", "not a JSON object"),
    ({"w": {"dtype": "F32", "shape": [2, 2]}}, bytes(16), "without dtype, shape and data_offsets"),
    ({"w": {**F32_2x2, "data_offsets": [16, 0]}}, bytes(16), "outside the file"),
    ({"w": {**F32_2x2, "data_offsets": [0, 64]}}, bytes(16), "outside the file"),
    ({"w": {**F32_2x2, "data_offsets": [0, "16"]}}, bytes(16), "outside the file"),
    ({"w": {**F32_2x2, "shape": [3, 2]}}, bytes(16), "does not match its 16 bytes"),
    ({"w": {**F32_2x2, "shape": [2, -2]}}, bytes(16), "is not a list of sizes"),
    ({"w": {**F32_2x2, "dtype": ["F32"]}}, bytes(16), "is not a name"),
    ({"w": "F32"}, b"", "without dtype, shape and data_offsets"),
])
def test_crafted_headers_are_refused(tmp_path, header, data, needle):
    write_raw(tmp_path / "model.safetensors", header, data)
    with pytest.raises(QosoraError, match="not a valid safetensors file") as e:
        ShardReader(tmp_path)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("raw", [b"", b"\x01\x02", struct.pack("<Q", 1 << 40) + b"{}", struct.pack("<Q", 2) + b"\xff\xfe",
                                 struct.pack("<Q", 20000) + b"[" * 10000 + b"]" * 10000])
def test_truncated_binary_and_deeply_nested_headers(tmp_path, raw):
    (tmp_path / "model.safetensors").write_bytes(raw)
    with pytest.raises(QosoraError, match="not a valid safetensors file"):
        ShardReader(tmp_path)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/ABS/outside.safetensors", "sub/model.safetensors", ".."])
def test_index_shard_names_outside_the_directory_are_refused(tmp_path, shard):
    model = tmp_path / "model"
    model.mkdir()
    save_file({"w": torch.zeros(2)}, tmp_path / "outside.safetensors")  # a valid file it must not read
    shard = shard.replace("/ABS", str(tmp_path))
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(QosoraError, match="outside") as e:
        ShardReader(model)
    assert "plain file names" in str(e.value)


@pytest.mark.parametrize("index", ["[]", "null", '{"weight_map": [1]}', '{"weight_map": {"w": 3}}', "{"])
def test_malformed_index(tmp_path, index):
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(QosoraError):
        ShardReader(tmp_path)


@pytest.mark.parametrize("case", ["json-list", "reversed-offsets", "shape-bytes", "index-escape"])
def test_prepare_on_crafted_checkpoints_is_a_one_line_error(tmp_path, capsys, case):
    src = tmp_path / "src"
    build_tiny_model(src, "llama")
    if case == "index-escape":
        (src / "model.safetensors").rename(tmp_path / "outside.safetensors")
        (src / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"model.embed_tokens.weight": "../outside.safetensors"}}))
    else:
        header = {"json-list": [F32_2x2], "reversed-offsets": {"w": {**F32_2x2, "data_offsets": [16, 0]}},
                  "shape-bytes": {"w": {**F32_2x2, "shape": [4, 4]}}}[case]
        write_raw(src / "model.safetensors", header, bytes(16))
    before = files_under(tmp_path)
    rc, out, err = run_cli(capsys, "prepare", src, "--rank", 4, "--out", tmp_path / "out", "--json")
    assert_one_line_error(rc, out, err, "prepare")
    assert files_under(tmp_path) == before
