"""No foreign code runs: an `auto_map` to a module in the model directory is never imported (trust_remote_code is
False everywhere), no [y/N] prompt reaches stdout, and the package never unpickles (no torch.load)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from conftest import assert_one_line_error, build_tiny_model, run_cli, save_word_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def booby_trap(directory: Path, marker: Path, keep_tokenizer_class: bool) -> None:
    """config.json and tokenizer_config.json point `auto_map` at evil.py, which creates `marker` when imported."""
    (directory / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('custom code ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast\n"
        "class EvilConfig(LlamaConfig): pass\n"
        "class EvilModel(LlamaForCausalLM): pass\n"
        "class EvilTokenizer(PreTrainedTokenizerFast): pass\n")
    cfg = json.loads((directory / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (directory / "config.json").write_text(json.dumps(cfg))
    tcfg = json.loads((directory / "tokenizer_config.json").read_text())
    tcfg["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    if not keep_tokenizer_class:
        tcfg.pop("tokenizer_class", None)  # nothing built-in to fall back on: transformers would ask [y/N]
    (directory / "tokenizer_config.json").write_text(json.dumps(tcfg))


@pytest.fixture
def trapped(tmp_path):
    d = tmp_path / "hf"
    build_tiny_model(d, "llama")
    save_word_tokenizer(d)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": "w5 w6 w7 w8 w9 w10"}) + "\n" for _ in range(3)))
    return d, data, tmp_path / "MARKER"


def test_eval_uses_builtin_classes_and_never_imports_the_auto_map(trapped, capsys):
    d, data, marker = trapped
    booby_trap(d, marker, keep_tokenizer_class=True)
    rc, out, err = run_cli(capsys, "eval", d, "--data", data, "--json")
    assert rc == 0, err
    assert json.loads(out)["examples"] == 3
    assert not marker.exists()


def test_eval_never_asks_to_run_a_tokenizer_that_only_custom_code_provides(trapped, capsys):
    """transformers 5 refuses such a tokenizer (a one-line error here); 4.x falls back to config.json's built-in
    class. Either way the custom code never runs and no [y/N] prompt reaches stdout."""
    d, data, marker = trapped
    booby_trap(d, marker, keep_tokenizer_class=False)
    rc, out, err = run_cli(capsys, "eval", d, "--data", data, "--json")
    assert "[y/N]" not in out + err and not marker.exists()
    if rc == 0:
        assert json.loads(out)["examples"] == 3
    else:
        assert_one_line_error(rc, out, err, "eval")


def test_prepare_and_load_never_import_the_auto_map(trapped, tmp_path):
    from qosora.config import PrepareConfig
    from qosora.loading import load
    from qosora.preparation import prepare

    d, _, marker = trapped
    booby_trap(d, marker, keep_tokenizer_class=True)
    prepare(d, tmp_path / "p", PrepareConfig(method="sorsa", rank=4, targets=("q_proj",)), progress=False)
    assert json.loads((tmp_path / "p" / "config.json").read_text())["auto_map"]  # copied as is, but never followed
    load(tmp_path / "p")
    assert not marker.exists()


def _package_files():
    return sorted([*ROOT.joinpath("qosora").rglob("*.py"), *ROOT.joinpath("export").rglob("*.py")])


def test_no_code_path_unpickles():
    """No torch.load (nor its aliases) anywhere in the package: checkpoints are safetensors only."""
    pattern = re.compile(r"\btorch\s*\.\s*load\b|\bfrom\s+torch(\.serialization)?\s+import\s+[^\n]*\bload\b"
                         r"|\bpickle\s*\.\s*loads?\b|weights_only\s*=\s*False")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in _package_files()
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


# The files this robustness pass owns; the rest of the package is checked by the behavioural tests above and by
# their owners (qosora/train/loop.py and export/api.py call from_pretrained too).
PACKAGE = sorted(p.relative_to(ROOT) for d in ("qosora", "export") for p in (ROOT / d).rglob("*.py"))


def test_every_transformers_loader_call_passes_trust_remote_code_false():
    calls, bad = 0, []
    for path in PACKAGE:  # every transformers Auto*.from_pretrained / from_config call, and the one generic loader
        for node in ast.walk(ast.parse((ROOT / path).read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("from_pretrained", "from_config") and isinstance(node.func.value, ast.Name)
                    and (node.func.value.id.startswith("Auto") or node.func.value.id == "loader")):
                calls += 1
                value = {k.arg: k.value for k in node.keywords}.get("trust_remote_code")
                if not (isinstance(value, ast.Constant) and value.value is False):
                    bad.append(f"{path}:{node.lineno}")
    assert calls >= 5 and not bad, (calls, bad)
