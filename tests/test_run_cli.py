"""`qosora generate` output formats (streamed text, JSON lines in input order over batches) and `qosora bench`."""

from __future__ import annotations

import json

import pytest

from conftest import build_tiny_model, run_cli, write_jsonl, write_tiny_tokenizer

PROMPTS = ["w3 w17 w42 w9", "w5 w6", "w7 w8 w9 w10 w11 w12 w13"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from qosora.export import ExportOptions, export_onnx

    root = tmp_path_factory.mktemp("cli")
    build_tiny_model(root / "hf", "llama", weight_std=0.15)
    write_tiny_tokenizer(root / "hf")
    export_onnx(root / "hf", root / "onnx", options=ExportOptions(format="int4"), check=False, progress=False)
    return root


def test_prompt_prints_prompt_and_streamed_text(exported, capsys):
    from qosora.run import GenerationOptions, Generator

    rc, out, err = run_cli(capsys, "generate", exported / "onnx", "--prompt", PROMPTS[0], "--max-new-tokens", "8",
                           "--threads", "1")
    assert rc == 0, err
    ref = Generator(exported / "onnx", provider="cpu", threads=1).generate([PROMPTS[0]],
                                                                           GenerationOptions(max_new_tokens=8))[0]
    assert out == PROMPTS[0] + ref.text + "\n" and ref.text


def test_jsonl_input_gives_json_lines_in_input_order(exported, capsys, tmp_path):
    singles = []
    for p in PROMPTS:
        rc, out, err = run_cli(capsys, "generate", exported / "onnx", "--prompt", p, "--max-new-tokens", "6",
                               "--threads", "1", "--json")
        assert rc == 0, err
        singles.append(json.loads(out))
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])
    rc, out, err = run_cli(capsys, "generate", exported / "onnx", "--input", path, "--batch-size", "2",
                           "--max-new-tokens", "6", "--threads", "1", "--json")
    assert rc == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [r["token_ids"] for r in lines] == [r["token_ids"] for r in singles]
    for r in lines:
        assert set(r) == {"text", "prompt_tokens", "new_tokens", "token_ids", "prefill_ms", "decode_tokens_per_s",
                          "stop_reason"}
        assert r["new_tokens"] == len(r["token_ids"]) and r["stop_reason"] in ("eos", "length")
    assert [r["prompt_tokens"] for r in lines] == [len(p.split()) for p in PROMPTS]


def test_stop_flag_repeats(exported, capsys):
    rc, out, _ = run_cli(capsys, "generate", exported / "onnx", "--prompt", PROMPTS[0], "--max-new-tokens", "8",
                         "--threads", "1", "--json")
    full = json.loads(out)
    stop = full["text"].split()[2]
    rc, out, err = run_cli(capsys, "generate", exported / "onnx", "--prompt", PROMPTS[0], "--max-new-tokens", "8",
                           "--threads", "1", "--json", "--stop", "nothing-like-it", "--stop", stop)
    assert rc == 0, err
    r = json.loads(out)
    assert r["stop_reason"] == "stop" and r["text"] == full["text"][: full["text"].index(stop)]


def test_bench_reports_every_point(exported, capsys):
    rc, out, err = run_cli(capsys, "bench", exported / "onnx", "--prompt-len", "8,16", "--gen-len", "4",
                           "--batch-size", "1,2", "--repeats", "1", "--threads", "1", "--against-genai", "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["contract"] == "gqa"
    points = report["points"]
    assert [(p["prompt_len"], p["batch_size"]) for p in points] == [(8, 1), (8, 2), (16, 1), (16, 2)]
    assert all(p["decode_tokens_per_s"] > 0 and p["prefill_ms"] > 0 for p in points)
    assert all(p["decode_tokens_per_s_total"] == pytest.approx(p["batch_size"] * p["decode_tokens_per_s"])
               for p in points)
    if report["genai"] == "ran":
        assert all(p["genai_decode_tokens_per_s"] > 0 for p in points)
    else:
        assert report["genai"] == "not installed" and "onnxruntime-genai is not installed" in err
    rc, out, err = run_cli(capsys, "bench", exported / "onnx", "--prompt-len", "8", "--gen-len", "4",
                           "--batch-size", "1", "--repeats", "1", "--threads", "1")
    assert rc == 0 and "decode tok/s" in out and len(out.splitlines()) == 3
