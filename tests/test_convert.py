"""`qosora convert` and `qosora prepare --from-peft`, checked against PEFT and transformers themselves (the oracles).

- `--to peft`: transformers loads OUT/base as bitsandbytes 4-bit (no qosora import), PEFT loads OUT/adapter on it, and
  the pair's logits equal `qosora.load(DIR, compute_dtype=float32)`'s, for every method, with the same NF4 bits.
- `--to lora`: PEFT's merge of the LoRA into the original model equals W + (B A - B0 A0) computed in float64, with
  B0 A0 from DIR/prepared or recomputed; `--rank` gives the best low-rank approximation and its dropped energy.
- `--from-peft`: PEFT's own PiSSA init (and a plain LoRA) becomes a qosora directory computing PEFT's function, and
  comes back to PEFT through `--to peft`.
- bad input: one line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import (assert_one_line_error, build_tiny_model, files_under, input_ids, make_prepared, run_cli)

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")
METHODS = ["sorsa", "osora", "pissa", "qlora"]
RANK = 8


def trained(tmp: Path, method: str, keep_prepared: bool = False, **prepare_kw) -> Path:
    """A stand-in for a trained run: the prepared directory with every trainable factor moved by seeded noise
    (`tmp/run-METHOD`; with `keep_prepared`, the prepared directory as its `prepared/`, as `qosora train` leaves it)."""
    import qosora
    from qosora.layer import adapter_layers

    prepared = make_prepared(tmp, method, rank=RANK, **prepare_kw)
    model = qosora.load(prepared)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for p in layer.adapter_params().values():
                noise = torch.randn(p.shape, generator=g) * (0.1 * p.float().abs().mean() + 0.01)
                p.add_(noise.to(p.dtype))
    run = tmp / f"run-{method}"
    qosora.save_trained(model, prepared, run, trained_steps=1)
    if keep_prepared:
        shutil.copytree(prepared, run / "prepared")
    return run


def peft_pair(out: Path, dtype=torch.float32):
    """PeftModel(base, adapter) of a `--to peft` output. bitsandbytes' CPU inference path on AVX512-BF16 processors
    runs in bf16 whatever the dtype; it is switched off so that float32 means float32 (the README says so too)."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(out / "base", dtype=dtype)
    for m in base.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return base, peft.PeftModel.from_pretrained(base, out / "adapter").eval()


@torch.no_grad()
def logits(model, ids=None) -> torch.Tensor:
    return model(input_ids() if ids is None else ids).logits.float()


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def convert_ok(capsys, *args) -> dict:
    rc, out, err = run_cli(capsys, "convert", *args, "--json")
    assert rc == 0, err
    return json.loads(out)


# ---------------------------------------------------------------------------------------------------------------
# --to peft


@pytest.mark.parametrize("method", METHODS)
def test_peft_pair_computes_the_trained_function_with_the_same_nf4_bits(tmp_path, capsys, method):
    import qosora
    from qosora.prepared import PreparedReader

    run = trained(tmp_path, method)
    report = convert_ok(capsys, run, "--to", "peft", "--out", tmp_path / "out", "--dtype", "float32")
    assert report["rank"] == RANK and report["modules"] == 14 and report["method"] == method
    assert report["bytes"]["base"] > 0 and report["bytes"]["adapter"] > 0
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"], config["task_type"]) == (RANK, RANK, "LORA",
                                                                                             "CAUSAL_LM")
    base, model = peft_pair(tmp_path / "out")
    reader = PreparedReader(run)
    for module in reader.modules[:3]:  # the bits trained on, not requantized
        layer, ours = base.get_submodule(module), reader.residual(module)
        assert type(layer).__name__ == "Linear4bit"
        assert torch.equal(layer.weight.data.reshape(-1), ours.data.reshape(-1))
        assert torch.equal(layer.weight.quant_state.absmax, ours.state.absmax)
    reference = logits(qosora.load(run, compute_dtype=torch.float32).eval())
    assert relative_gap(logits(model), reference) < 1e-5
    untrained = logits(qosora.load(tmp_path / f"prep-{method}-nf4", compute_dtype=torch.float32).eval())
    assert relative_gap(untrained, reference) > 1e-3  # the check above can tell a trained adapter from none


def test_peft_pair_keeps_biases_tied_head_and_unadapted_linears(tmp_path, capsys):
    """qwen2 (q/k/v biases), a tied lm_head, only q and v adapted: k, o and the MLP stay dense nn.Linear."""
    import qosora
    from qosora.config import PrepareConfig

    build_tiny_model(tmp_path / "hf", "qwen2", tied=True, weight_std=0.05)
    qosora.prepare(tmp_path / "hf", tmp_path / "prep", PrepareConfig(method="sorsa", rank=4, targets=("q", "v")),
                   progress=False)
    convert_ok(capsys, tmp_path / "prep", "--to", "peft", "--out", tmp_path / "out", "--dtype", "float32")
    config = json.loads((tmp_path / "out" / "base" / "config.json").read_text())
    skip = config["quantization_config"]["llm_int8_skip_modules"]
    assert "lm_head" in skip and "model.layers.1.self_attn.k_proj" in skip and len(skip) == 1 + 2 * 5
    base, model = peft_pair(tmp_path / "out")
    assert type(base.get_submodule("model.layers.0.self_attn.q_proj")).__name__ == "Linear4bit"
    assert type(base.get_submodule("model.layers.0.self_attn.k_proj")) is torch.nn.Linear
    assert base.get_submodule("model.layers.0.self_attn.q_proj").bias is not None
    reference = logits(qosora.load(tmp_path / "prep", compute_dtype=torch.float32).eval())
    assert relative_gap(logits(model), reference) < 1e-5


def test_base_and_adapter_load_without_qosora(tmp_path, capsys):
    """In a fresh interpreter: transformers + PEFT only, the default bfloat16 output, bitsandbytes' default kernels."""
    import qosora

    run = trained(tmp_path, "sorsa")
    convert_ok(capsys, run, "--to", "peft", "--out", tmp_path / "out")
    code = f"""
import json, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out' / 'base')!r})
model = PeftModel.from_pretrained(base, {str(tmp_path / 'out' / 'adapter')!r}).eval()
with torch.no_grad():
    logits = model(torch.tensor({input_ids().tolist()})).logits.float()
print(json.dumps({{"qosora": "qosora" in sys.modules, "dtype": str(base.dtype),
                  "q_proj": type(base.get_submodule("model.layers.0.self_attn.q_proj")).__name__,
                  "logits": logits.tolist()}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["qosora"] is False and result["dtype"] == "torch.bfloat16" and result["q_proj"] == "Linear4bit"
    reference = logits(qosora.load(run, compute_dtype=torch.float32).eval())
    assert relative_gap(torch.tensor(result["logits"]), reference) < 0.02  # bf16 activations and factors (~0.7 %)


# ---------------------------------------------------------------------------------------------------------------
# --to lora


def expected_weights(run: Path, prepared: Path, original: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (W, W + B A - B0 A0)} in float64, B0 A0 from the prepared directory the run started from."""
    from qosora.prepared import PreparedReader
    from qosora.shards import ShardReader

    now, start, weights = PreparedReader(run), PreparedReader(prepared), ShardReader(original)
    out = {}
    for m in now.modules:
        (B, A), (B0, A0) = now.adapted(m).lowrank(), start.adapted(m).lowrank()
        W = weights.get(f"{m}.weight").double()
        out[m] = W, W + B.double() @ A.double() - B0.double() @ A0.double()
    return out


def merged_by_peft(original: Path, lora: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(model, lora).merge_and_unload()


@pytest.mark.parametrize("source", ["recomputed", "prepared"])
@pytest.mark.parametrize("method", METHODS)
def test_lora_for_the_original_model_is_the_trained_delta(tmp_path, capsys, method, source):
    run = trained(tmp_path, method, keep_prepared=source == "prepared")
    report = convert_ok(capsys, run, "--to", "lora", "--base", tmp_path / "hf", "--out", tmp_path / "lora",
                        "--dtype", "float32")
    assert report["rank"] == {"sorsa": 2 * RANK, "pissa": 2 * RANK, "osora": RANK, "qlora": RANK}[method]
    assert report["exact"] is True and report["initial_principal"] == {"prepared": 0, "recomputed": 0, source: 14}
    assert "NF4 error" in (tmp_path / "lora" / "README.md").read_text()
    merged = merged_by_peft(tmp_path / "hf", tmp_path / "lora")
    for module, (_, expected) in expected_weights(run, tmp_path / f"prep-{method}-nf4", tmp_path / "hf").items():
        got = merged.get_submodule(module).weight.double()
        assert float((got - expected).norm() / expected.norm()) < 1e-5, module


def test_lora_rank_truncation_is_the_best_approximation(tmp_path, capsys):
    run = trained(tmp_path, "sorsa")
    wide = convert_ok(capsys, run, "--to", "lora", "--base", tmp_path / "hf", "--out", tmp_path / "wide",
                      "--rank", 100)
    assert wide["rank"] == 2 * RANK and wide["exact"] is True and wide["dropped_energy"]["max"] == 0
    report = convert_ok(capsys, run, "--to", "lora", "--base", tmp_path / "hf", "--out", tmp_path / "lora",
                        "--rank", 3, "--dtype", "float32")
    assert report["rank"] == 3 and report["exact"] is False
    merged = merged_by_peft(tmp_path / "hf", tmp_path / "lora")
    dropped = []
    for module, (W, expected) in expected_weights(run, tmp_path / "prep-sorsa-nf4", tmp_path / "hf").items():
        U, S, Vh = torch.linalg.svd(expected - W)
        best = W + (U[:, :3] * S[:3]) @ Vh[:3]  # Eckart-Young
        got = merged.get_submodule(module).weight.double()
        assert float((got - best).norm() / best.norm()) < 1e-5, module
        dropped.append(float((S[3:] ** 2).sum() / (S**2).sum()))
    assert report["dropped_energy"]["mean"] == pytest.approx(sum(dropped) / len(dropped), rel=1e-4)
    assert report["dropped_energy"]["max"] == pytest.approx(max(dropped), rel=1e-4)


@pytest.mark.parametrize("d_out, d_in, r", [(12, 7, 1), (7, 12, 3), (9, 9, 9)])
def test_delta_factorisations_against_float64(d_out, d_in, r):
    from qosora.interop.lora_delta import exact_delta, pad, truncate

    g = torch.Generator().manual_seed(d_out * d_in + r)
    B, A, B0, A0 = (torch.randn(s, generator=g) for s in ((d_out, r), (r, d_in), (d_out, r), (r, d_in)))
    delta = B.double() @ A.double() - B0.double() @ A0.double()
    for (trained, initial), rank, want in [(((B, A), (B0, A0)), 2 * r, delta),              # SORSA, PiSSA
                                           (((B, A), (B0, A)), r, (B.double() - B0.double()) @ A.double()),  # OSoRA
                                           (((B, A), (torch.zeros_like(B0), A0)), r, B.double() @ A.double())]:
        Bd, Ad = exact_delta(trained, initial)
        assert Ad.shape[0] == rank and torch.allclose(Bd @ Ad, want, atol=1e-12)
        Bp, Ap = pad((Bd, Ad), rank + 2)
        assert Ap.shape[0] == rank + 2 and torch.allclose(Bp @ Ap, want, atol=1e-12)
    U, S, Vh = torch.linalg.svd(delta)
    (Bt, At), dropped = truncate(exact_delta((B, A), (B0, A0)), 1)
    assert torch.allclose(Bt @ At, S[0] * torch.outer(U[:, 0], Vh[0]), atol=1e-10)
    assert dropped == pytest.approx(float((S[1:] ** 2).sum() / (S**2).sum()), rel=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# --from-peft


def peft_model(tmp: Path, init, rank: int = 4, alpha: int = 8, perturb: bool = False):
    """A PEFT LoRA (`init_lora_weights=init`) on the tiny model tmp/hf, optionally moved off its init (trained)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if not (tmp / "hf" / "config.json").is_file():
        build_tiny_model(tmp / "hf", weight_std=0.05)
    model = AutoModelForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, config)
    if perturb:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.add_(0.05 * torch.randn(p.shape, generator=g) * (p.abs().mean() + 0.01))
    model.save_pretrained(tmp / "adapter")
    return model.eval()


def from_peft(capsys, tmp: Path, *extra) -> dict:
    rc, out, err = run_cli(capsys, "prepare", tmp / "hf", "--from-peft", tmp / "adapter", "--out", tmp / "imported",
                           "--json", *extra)
    assert rc == 0, err
    return json.loads(out)


@pytest.mark.parametrize("perturb", [False, True], ids=["peft-init", "trained"])
def test_from_peft_pissa_round_trips(tmp_path, capsys, perturb):
    import qosora
    from qosora.prepared import PreparedReader

    reference_model = peft_model(tmp_path, "pissa", perturb=perturb)
    reference = logits(reference_model)
    report = from_peft(capsys, tmp_path, "--no-quant", "--adapter-dtype", "float32")
    assert (report["method"], report["rank"]) == ("pissa", 4)
    reader = PreparedReader(tmp_path / "imported")
    module = "model.layers.1.mlp.down_proj"
    peft_layer = reference_model.base_model.model.get_submodule(module)
    # the residual is PEFT's own base weight after its PiSSA init, W - s B0 A0
    assert torch.allclose(reader.residual(module), peft_layer.base_layer.weight, rtol=0, atol=1e-6)
    B, A = reader.adapted(module).lowrank()
    scaled = peft_layer.scaling["default"] * peft_layer.lora_B["default"].weight @ peft_layer.lora_A["default"].weight
    assert torch.allclose(B @ A, scaled, atol=1e-6)
    assert relative_gap(logits(qosora.load(tmp_path / "imported", compute_dtype=torch.float32)), reference) < 1e-5
    # ... and back to PEFT: the dense residual as a plain base, the adapter at scale 1
    convert_ok(capsys, tmp_path / "imported", "--to", "peft", "--out", tmp_path / "back", "--dtype", "float32")
    base, back = peft_pair(tmp_path / "back")
    assert type(base.get_submodule(module).base_layer) is torch.nn.Linear  # no NF4: no quantization_config
    assert relative_gap(logits(back), reference) < 1e-5
    # PEFT's own reload of the adapter onto the original model (re-running PiSSA's init) computes the same
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    reloaded = peft.PeftModel.from_pretrained(original, tmp_path / "adapter")
    assert relative_gap(logits(reloaded.eval()), reference) < 1e-5


def test_from_peft_nf4_residual_is_closer_than_plain_nf4(tmp_path, capsys):
    """With the default NF4 residual the imported PiSSA model is W up to NF4(W - s B A)'s error, below NF4(W)'s."""
    peft_model(tmp_path, "pissa", rank=8, alpha=8)
    report = from_peft(capsys, tmp_path)
    assert report["method"] == "pissa" and report["mean_rel_error"] < report["mean_rel_error_plain_nf4"]
    config = json.loads((tmp_path / "imported" / "qosora_config.json").read_text())
    assert config["source"]["peft_adapter"] == str((tmp_path / "adapter").resolve())


def test_from_peft_plain_lora_becomes_qlora(tmp_path, capsys):
    import qosora

    reference = logits(peft_model(tmp_path, True, perturb=True))
    report = from_peft(capsys, tmp_path, "--no-quant", "--adapter-dtype", "float32")
    assert (report["method"], report["rank"]) == ("qlora", 4)
    assert relative_gap(logits(qosora.load(tmp_path / "imported", compute_dtype=torch.float32)), reference) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written


def fails(capsys, tmp_path, verb, args, *needles):
    before = files_under(tmp_path)
    rc, out, err = run_cli(capsys, verb, *args, "--json")
    assert_one_line_error(rc, out, err, verb, *needles)
    assert files_under(tmp_path) == before


def test_convert_refuses_bad_input(tmp_path, capsys):
    run = trained(tmp_path, "sorsa")
    out = tmp_path / "out"
    fails(capsys, tmp_path, "convert", [tmp_path / "hf", "--to", "peft", "--out", out], "not a qosora directory")
    fails(capsys, tmp_path, "convert", [run, "--to", "lora", "--out", out], "--to lora needs --base")
    fails(capsys, tmp_path, "convert", [run, "--to", "lora", "--base", tmp_path / "hf", "--rank", 0, "--out", out],
          "--rank must be >= 1")
    fails(capsys, tmp_path, "convert", [run, "--to", "peft", "--base", tmp_path / "hf", "--out", out],
          "--base and --rank belong to --to lora")
    fails(capsys, tmp_path, "convert", [run, "--to", "lora", "--base", tmp_path / "missing", "--out", out],
          "does not exist")
    build_tiny_model(tmp_path / "wide", intermediate_size=96)  # the run's model has 128
    fails(capsys, tmp_path, "convert", [run, "--to", "lora", "--base", tmp_path / "wide", "--out", out],
          "model.layers.0.mlp.down_proj.weight is (64, 96)", "pass the model it was prepared from")
    build_tiny_model(tmp_path / "other", seed=7, intermediate_size=128)  # same shapes, other weights
    fails(capsys, tmp_path, "convert", [run, "--to", "lora", "--base", tmp_path / "other", "--out", out],
          "does not quantize to the residual", "bit for bit")


def test_from_peft_refuses_what_it_cannot_represent(tmp_path, capsys):
    peft_model(tmp_path, True)
    adapter, out = tmp_path / "adapter", tmp_path / "out"
    fails(capsys, tmp_path, "prepare", [tmp_path / "hf", "--from-peft", adapter, "--rank", 16, "--out", out],
          "--from-peft takes the method, rank and targets")
    fails(capsys, tmp_path, "prepare", [tmp_path / "hf", "--from-peft", tmp_path, "--out", out],
          "no adapter_config.json")
    config = json.loads((adapter / "adapter_config.json").read_text())
    for change, needle in [({"init_lora_weights": "pissa_niter_4"}, "path_initial_model_for_weight_conversion"),
                           ({"use_dora": True}, "use_dora"), ({"rank_pattern": {"q_proj": 2}}, "rank_pattern")]:
        (adapter / "adapter_config.json").write_text(json.dumps({**config, **change}))
        fails(capsys, tmp_path, "prepare", [tmp_path / "hf", "--from-peft", adapter, "--out", out], needle)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    build_tiny_model(tmp_path / "wide", intermediate_size=128)  # the adapter was trained on intermediate 96
    fails(capsys, tmp_path, "prepare", [tmp_path / "wide", "--from-peft", adapter, "--out", out],
          "pass the model the adapter was trained on")


def test_convert_help_shows_an_example_and_imports_no_torch():
    code = ("import contextlib, io, sys\nfrom qosora.cli import main\nhelp = io.StringIO()\n"
            "with contextlib.redirect_stdout(help), contextlib.suppress(SystemExit): main(['convert', '--help'])\n"
            "heavy = [m for m in ('torch', 'transformers', 'bitsandbytes') if m in sys.modules]\n"
            "print('qosora convert run/' in help.getvalue(), heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True []"


# ---------------------------------------------------------------------------------------------------------------
# the real-model tier


@pytest.mark.slow
def test_smollm2_peft_pair_reproduces_the_fine_tuned_greedy_output(smollm2_dir, tmp_path, capsys):
    import os

    import qosora
    from qosora.config import PrepareConfig
    from qosora.data import DEMO_JSONL
    from qosora.loading import load_tokenizer
    from qosora.train.loop import TrainConfig, finetune

    torch.set_num_threads(os.cpu_count() or 1)  # this tier is not tiny
    run = tmp_path / "run"
    finetune(smollm2_dir, TrainConfig(data=str(DEMO_JSONL), out=str(run), steps=12, lr=3e-4, batch_size=8,
                                      seq_len=64), PrepareConfig(method="sorsa", rank=16), progress=False)
    sizes = {"peft --dtype float32": convert_ok(capsys, run, "--to", "peft", "--out", tmp_path / "exact",
                                                "--dtype", "float32")["bytes"]}
    _, pair = peft_pair(tmp_path / "exact")
    ours = qosora.load(run, dtype=torch.float32, compute_dtype=torch.float32).eval()
    tokenizer = load_tokenizer(run)
    prompts = ["What is 12 plus 30?\n", "What is 7 times 8?\n", "The capital of France is", "def fibonacci(n):",
               "Once upon a time"]
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            want = ours.generate(ids, max_new_tokens=64, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            got = pair.generate(input_ids=ids, max_new_tokens=64, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        assert torch.equal(got, want), (prompt, tokenizer.decode(got[0]), tokenizer.decode(want[0]))
    sizes["peft"] = convert_ok(capsys, run, "--to", "peft", "--out", tmp_path / "bf16")["bytes"]
    lora = convert_ok(capsys, run, "--to", "lora", "--base", smollm2_dir, "--out", tmp_path / "lora")
    assert lora["exact"] is True and lora["initial_principal"]["prepared"] == lora["modules"]
    sizes["lora"] = lora["bytes"]
    print(json.dumps(sizes))
