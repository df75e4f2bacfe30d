"""Every verb's error path, the same way: exit 2, one line `qosora VERB: error: ...`, nothing on stdout under --json,
and no file or directory left anywhere under the working directory (hidden temporaries included)."""

from __future__ import annotations

import pytest

from conftest import assert_one_line_error, files_under, make_prepared, reversal_data, run_cli

# verb -> (arguments with {p}: a prepared dir, {d}: a data file, {w}: the work dir; a needle of the expected error)
CASES = {
    "prepare": (["prepare", "{w}/hf", "--out", "{w}/o", "--rank", "0", "--json"], "--rank must be >= 1"),
    "train": (["train", "{p}", "--data", "{w}/missing.jsonl", "--out", "{w}/o", "--json"], "does not exist"),
    "merge": (["merge", "{w}/hf", "--out", "{w}/o", "--json"], "not a qosora directory"),
    "export": (["export", "{p}", "--onnx", "{w}/o", "--check-tokens", "-1", "--json"], "--check-tokens must be >= 0"),
    "generate": (["generate", "{w}/hf", "--prompt", "hi", "--json"], "model.onnx"),
    "bench": (["bench", "{w}/hf", "--json"], "model.onnx"),
    "eval": (["eval", "{p}", "--data", "{d}", "--batch-size", "0", "--json"], "--batch-size must be >= 1"),
    "plan": (["plan", "--config", "llama-2-7b", "--rank", "0", "--json"], "--rank must be >= 1"),
    "inspect": (["inspect", "{w}/nowhere", "--json"], "nowhere"),
    "convert": (["convert", "{p}", "--to", "lora", "--out", "{w}/o", "--json"], "--base"),
    "demo": (["demo", "--out", "{w}/o", "--rank", "0", "--json"], "--rank must be >= 1"),
}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    w = tmp_path_factory.mktemp("verbs")
    prepared = make_prepared(w, "sorsa", rank=4)
    return w, prepared, reversal_data(w / "d.jsonl", n=8)


@pytest.mark.parametrize("verb", sorted(CASES))
def test_every_verb_fails_cleanly(verb, work, capsys):
    w, prepared, data = work
    args, needle = CASES[verb]
    before = files_under(w)
    rc, out, err = run_cli(capsys, *[a.format(p=prepared, d=data, w=w) for a in args])
    assert_one_line_error(rc, out, err, verb, needle)
    assert files_under(w) == before


def test_every_verb_is_covered():
    from qosora.cli import COMMANDS

    assert sorted(CASES) == sorted(COMMANDS)
