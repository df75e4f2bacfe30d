"""The 7B rehearsal's pieces at a tiny size: the synthetic checkpoint writer (tools/make_synthetic_llama.py), the
CPU rehearsal's arguments and resume logic (tools/rehearse_7b.py), the GPU script's dry run (tools/gpu_rehearsal.sh),
and (slow) the whole rehearsal end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))

import make_synthetic_llama as synth  # noqa: E402
import rehearse_7b  # noqa: E402

TINY = dict(layers=2, hidden=256, vocab=1024)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """Llama-3-8B's family (GQA 4:1) at 2 layers, hidden 256, in shards of at most 1 MB."""
    out = tmp_path_factory.mktemp("synth") / "llama3-tiny"
    cfg = synth.scaled_config("llama3-8b", **TINY)
    summary = synth.write_checkpoint(out, cfg, dtype="bfloat16", weights="decaying", shard_bytes=1_000_000)
    return out, cfg, summary


def test_tiny_config_keeps_the_family():
    cfg = synth.scaled_config("llama3-8b", **TINY)
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (2, 256, 1024)
    assert cfg["num_attention_heads"] // cfg["num_key_value_heads"] == 4            # GQA 32:8 stays 4:1
    assert cfg["intermediate_size"] == 896 and cfg["rope_theta"] == 500000.0           # MLP ratio 3.5
    assert synth.scaled_config("llama2-7b", hidden=256)["num_key_value_heads"] == 4  # MHA stays MHA
    full = synth.scaled_config("llama2-7b")
    assert (full["hidden_size"], full["intermediate_size"], full["num_hidden_layers"], full["num_key_value_heads"],
            full["vocab_size"]) == (4096, 11008, 32, 32, 32000)
    with pytest.raises(ValueError):
        synth.scaled_config("llama2-7b", hidden=100)


def test_shards_and_index_are_consistent(tiny_ckpt):
    from safetensors import safe_open

    out, cfg, summary = tiny_ckpt
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards == sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    expected = dict(synth.tensor_shapes(cfg))
    assert set(index["weight_map"]) == set(expected)
    total = 0
    for shard in shards:
        assert (out / shard).stat().st_size <= 1_000_000
        with safe_open(out / shard, "pt") as f:
            for name in f.keys():
                assert index["weight_map"][name] == shard
                t = f.get_tensor(name)
                assert t.dtype == torch.bfloat16 and tuple(t.shape) == expected[name]
                total += t.numel() * 2
    assert index["metadata"]["total_size"] == total == summary["tensor_bytes"]
    config = json.loads((out / "config.json").read_text())
    assert config["qosora_synthetic"] is True and config["dtype"] == "bfloat16"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == config["eos_token_id"]


def test_transformers_loads_it_with_the_configured_shapes(tiny_ckpt):
    from transformers import AutoModelForCausalLM

    out, cfg, _ = tiny_ckpt
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    attn = model.model.layers[1].self_attn
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    assert attn.k_proj.weight.shape == (cfg["num_key_value_heads"] * hd, cfg["hidden_size"])
    assert model.model.layers[0].mlp.down_proj.weight.shape == (cfg["hidden_size"], cfg["intermediate_size"])
    assert model.lm_head.weight.shape == (cfg["vocab_size"], cfg["hidden_size"])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9, 300]])).logits
    assert torch.isfinite(logits).all() and logits.std() > 0.3  # lm_head rows of norm ~1: logits of std ~1


def test_singular_values_decay_as_designed(tiny_ckpt):
    from safetensors import safe_open

    out, cfg, _ = tiny_ckpt
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        with safe_open(out / index["weight_map"][name], "pt") as f:
            s = torch.linalg.svdvals(f.get_tensor(name).float())
        assert 0.7 < s[0] < 1.3                       # spectral norm ~1
        assert s[0] / s[15] > 4                       # the power law (16^0.7 = 7), not a flat spectrum
        assert s[0] / s[-1] > 50                      # a noise floor far below the head
    flat = torch.linalg.svdvals(torch.randn(256, 256)[:, :256])
    assert flat[0] / flat[15] < 1.5                   # what the gaussian weights look like to an SVD


def test_weights_are_seeded_per_tensor():
    g = lambda seed, name: synth._generator(seed, name, "cpu")  # noqa: E731
    a = synth.decaying_matrix(64, 128, g(0, "x"))
    assert torch.equal(a, synth.decaying_matrix(64, 128, g(0, "x")))
    assert not torch.equal(a, synth.decaying_matrix(64, 128, g(0, "y")))
    assert not torch.equal(a, synth.decaying_matrix(64, 128, g(1, "x")))


def test_the_tokenizer_encodes_the_demo_data_and_fills_the_vocabulary(tiny_ckpt):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from qosora.data import DEMO_JSONL

    out, cfg, _ = tiny_ckpt
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() == cfg["vocab_size"]
    for line in DEMO_JSONL.read_text().splitlines()[:50]:
        row = json.loads(line)
        text = row["prompt"] + row["completion"]
        ids = tok.encode(text).ids
        assert ids[0] == 1 and max(ids) < cfg["vocab_size"] and 0 not in ids  # <s> first, no <unk>
        assert len(ids) < len(text.encode())  # merges learnt: fewer tokens than bytes
        assert tok.decode(ids) == text
    assert tok.decode([cfg["vocab_size"] - 1]) == f"<tok{cfg['vocab_size'] - 1}>"  # every id decodes
    hf = AutoTokenizer.from_pretrained(out)
    assert (hf.bos_token_id, hf.eos_token_id) == (1, 2)
    assert hf("What is 7 times 35?\n").input_ids == tok.encode("What is 7 times 35?\n").ids


# --- tools/rehearse_7b.py -----------------------------------------------------------------------------------
def _rehearse(*args, **kw):
    return subprocess.run([sys.executable, str(TOOLS / "rehearse_7b.py"), *args], capture_output=True, text=True,
                          **kw)


def test_rehearse_help_and_bad_arguments():
    r = _rehearse("--help")
    assert r.returncode == 0 and "--cuda-export" in r.stdout and "--keep" in r.stdout
    for bad in (["--shape", "llama9-70b"], ["--hidden", "100"], ["--steps", "0"]):
        r = _rehearse(*bad)
        assert r.returncode == 2 and "error" in r.stderr, (bad, r.stderr)


def test_a_resumed_rehearsal_runs_only_what_is_missing(tmp_path):
    def steps(**done):
        """a -> b -> c, a and b intermediate; the outputs named in `done` exist."""
        for name in "abc":
            path = tmp_path / name
            if done.get(name):
                path.mkdir(exist_ok=True)
            elif path.exists():
                path.rmdir()
        return [rehearse_7b.Step(n, ["true"], tmp_path / n, Path.is_dir, needs, intermediate=n != "c")
                for n, needs in (("a", ()), ("b", ("a",)), ("c", ("b",)))]

    assert rehearse_7b.steps_to_run(steps(), {}) == ["a", "b", "c"]
    # b killed half-way: a's output is there, b and c must run
    assert rehearse_7b.steps_to_run(steps(a=True), {"a": {}}) == ["b", "c"]
    # a and b ran and their outputs were deleted once c had what it needed: nothing to run
    assert rehearse_7b.steps_to_run(steps(c=True), {"a": {}, "b": {}, "c": {}}) == []
    # c's output lost as well: c needs b, b needs a, both deleted: all three again
    assert rehearse_7b.steps_to_run(steps(), {"a": {}, "b": {}, "c": {}}) == ["a", "b", "c"]


def test_a_failing_step_stops_the_rehearsal_and_is_reported(tmp_path):
    report = tmp_path / "report.json"
    # rank 300 exceeds every dimension of a hidden-256 model: qosora prepare refuses it
    r = _rehearse("--layers", "1", "--hidden", "256", "--vocab", "512", "--rank", "300", "--work", str(tmp_path / "w"),
                  "--out", str(report), timeout=120)
    assert r.returncode == 1 and "prepare: FAILED" in r.stderr and "rank" in r.stderr
    steps = json.loads(report.read_text())["steps"]
    assert steps["checkpoint"]["rc"] == 0 and steps["prepare"]["rc"] == 2 and steps["train"] == {"skipped": True}


def test_done_when_checks_compare_against_the_checkpoint():
    gib = 1 << 30
    records = {"prepare": {"peak_rss_bytes": 6 * gib}, "export": {"peak_rss_bytes": 7 * gib},
               "train": {"peak_rss_bytes": 11 * gib}, "merge": {"peak_rss_bytes": 21 * gib}}
    checks = rehearse_7b.done_when(records, ckpt_bytes=12.55 * gib, plan_bytes=10 * gib)
    assert checks["all_peaks_under_20_gib"]["ok"] is False                   # merge at 21 GiB
    assert checks["prepare_peak_le_0.35x_checkpoint_plus_2gib"]["ok"] is True  # 6 <= 6.39
    assert checks["export_peak_le_0.5x_checkpoint"]["ok"] is False           # 7 > 6.28
    assert checks["train_peak_within_15pct_of_plan"]["ok"] is True           # 10 %


# --- tools/gpu_rehearsal.sh ---------------------------------------------------------------------------------
def _gpu(*args, env=None):
    return subprocess.run(["bash", str(TOOLS / "gpu_rehearsal.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_gpu_rehearsal_dry_run_prints_the_plan_and_touches_nothing(tmp_path):
    work = tmp_path / "work"
    r = _gpu("--dry-run", "--shape", "llama3-8b", "--steps", "3", "--seq-len", "1024",
             env={"WORK": str(work), "BNB_WHEEL": str(tmp_path / "none.whl")})
    assert r.returncode == 0, r.stderr
    cmds = [line[2:] for line in r.stdout.splitlines() if line.startswith("+ ")]
    assert any("pip install" in c and "none.whl" in c for c in cmds)
    assert any("pip install" in c and "--no-deps" in c and "-e ." in c for c in cmds)
    assert any("make_synthetic_llama.py" in c and "--shape llama3-8b" in c for c in cmds)
    prepare = next(c for c in cmds if " prepare " in c)
    assert "--method sorsa" in prepare and "--rank 128" in prepare and "--device cuda" in prepare
    plan, train = next(c for c in cmds if " plan " in c), cmds[-1]
    assert "--device cuda" in plan
    for flag in ("--seq-len 1024", "--batch-size 1", "--optim paged_adamw8bit", "--gradient-checkpointing"):
        assert flag in plan and flag in train, flag  # the plan is for the very settings that train
    assert " 3 " in train  # --steps reaches the training step
    assert not work.exists()


def test_gpu_rehearsal_without_a_wheel_exits_2(tmp_path):
    work = tmp_path / "work"
    r = _gpu(env={"WORK": str(work), "BNB_WHEEL": str(tmp_path / "missing.whl")})
    assert r.returncode == 2
    assert "no bitsandbytes wheel" in r.stderr and "missing.whl" in r.stderr
    assert not work.exists()
    assert _gpu("--shape", "llama9", "--dry-run").returncode == 2


# --- end to end ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_whole_rehearsal_at_a_tiny_size(tmp_path):
    """checkpoint -> prepare -> plan -> train -> merge -> export -> generate, then a rerun that runs nothing."""
    report = tmp_path / "report.json"
    args = ["--layers", "2", "--hidden", "256", "--vocab", "2048", "--rank", "8", "--work", str(tmp_path / "w"),
            "--out", str(report)]
    r = _rehearse(*args, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(report.read_text())
    steps = result["steps"]
    assert list(steps) == ["checkpoint", "prepare", "plan", "train", "merge", "export", "generate"]
    assert all(s["rc"] == 0 and s["peak_rss_bytes"] > 0 and s["seconds"] > 0 for s in steps.values())
    assert steps["train"]["key"]["steps"] == 2 and steps["generate"]["key"]["new_tokens"] == 16
    assert steps["prepare"]["key"]["mean_rel_error"] < steps["prepare"]["key"]["mean_rel_error_plain_nf4"]
    assert result["training_peak"]["planned_bytes"] > 0 and result["full_size"] is False
    assert set(result["checks"]) == {"all_peaks_under_20_gib", "prepare_peak_le_0.35x_checkpoint_plus_2gib",
                                     "export_peak_le_0.5x_checkpoint", "train_peak_within_15pct_of_plan"}
    assert result["table"].count("\n") == 2 + len(steps) - 1 and "[rehearse" in r.stderr
    work = tmp_path / "w" / "llama2-7b-l2-h256-v2048"
    assert sorted(p.name for p in work.iterdir() if p.is_dir()) == ["logs", "onnx-int4"]  # intermediates deleted
    again = _rehearse(*args, timeout=120)
    assert again.returncode == 0 and "to run: nothing" in again.stderr
