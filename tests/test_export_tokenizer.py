"""The exported tokenizer_config.json names a class transformers 4 and 5 both load (optimum pins transformers 4)."""

from __future__ import annotations

import json

from qosora.export.tokenizer import make_portable

from conftest import save_word_tokenizer


def test_a_transformers_5_only_config_is_rewritten_and_still_loads(tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    save_word_tokenizer(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.update(tokenizer_class="TokenizersBackend", backend="tokenizers", is_local=True, local_files_only=False)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))

    assert make_portable(tmp_path) is True
    new = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert new["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not {"backend", "is_local", "local_files_only"} & set(new)
    assert new["model_input_names"] == ["input_ids", "attention_mask"]
    assert {k: v for k, v in new.items() if k not in ("tokenizer_class", "model_input_names")} == {
        k: v for k, v in cfg.items() if k not in ("tokenizer_class", "backend", "is_local", "local_files_only")}
    text = "w3 w17 w42"
    loaded = AutoTokenizer.from_pretrained(tmp_path)(text)
    assert loaded.input_ids == Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(text).ids
    assert set(loaded) == {"input_ids", "attention_mask"}
    assert make_portable(tmp_path) is False  # idempotent: nothing left to change


def test_other_configs_are_left_alone(tmp_path):
    save_word_tokenizer(tmp_path)
    before = (tmp_path / "tokenizer_config.json").read_text()
    cfg = json.loads(before)
    cfg["tokenizer_class"] = "LlamaTokenizerFast"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert make_portable(tmp_path) is False
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")  # not an object: copied as it was, not ours to fix
    assert make_portable(tmp_path) is False and (tmp_path / "tokenizer_config.json").read_text() == "[1, 2]"
