"""The chat template without transformers: rendered as jinja2 and transformers' apply_chat_template render it,
special tokens encoded as their own ids, and `qosora generate --chat` / JSONL chat lines driven by it."""

from __future__ import annotations

import json
import shutil

import jinja2
import pytest

from conftest import CHAT_TEMPLATE, build_tiny_model, char_tokenizer, run_cli

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "abc|"}]
# A Qwen-style template: bos from tokenizer_config, loop controls, raise_exception, a default system turn.
RICH = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|system|>default</s>{% endif %}\n"
    "{% for m in messages %}\n"
    "  {% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}"
    "{% endif %}\n"
    "  {% if m['content'] == 'skip' %}{% continue %}{% endif %}\n"
    "  <|{{ m['role'] }}|>{{ m['content'] | trim }}{{ eos_token }}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from qosora.export import ExportOptions, export_onnx

    root = tmp_path_factory.mktemp("chat")
    build_tiny_model(root / "hf", tokenizer=char_tokenizer(), weight_std=0.15)
    export_onnx(root / "hf", root / "onnx", options=ExportOptions(format="fp32"), check=False, progress=False)
    return root


def reference(template: str, messages, **tokens) -> str:
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, **tokens)


def test_render_matches_jinja2_and_transformers(chat_model):
    from qosora.run import ChatTemplate

    chat = ChatTemplate.load(chat_model / "onnx")
    assert chat.render(MESSAGES) == reference(CHAT_TEMPLATE, MESSAGES) == \
        "<|system|>be brief</s><|user|>abc|</s><|assistant|>"
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(chat_model / "hf")
    assert chat.render(MESSAGES) == tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("messages", [MESSAGES, [{"role": "user", "content": " x "}, {"role": "user", "content": "skip"}]])
def test_rich_template_from_tokenizer_config(chat_model, tmp_path, messages):
    from qosora.run import ChatTemplate

    out = tmp_path / "onnx"
    shutil.copytree(chat_model / "onnx", out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.update(chat_template=RICH, bos_token={"content": "<s>", "special": True}, eos_token="</s>")
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    got = ChatTemplate.load(out).render(messages)
    assert got == reference(RICH, messages, bos_token="<s>", eos_token="</s>")
    assert got.startswith("<s>") and "{" not in got
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(chat_model / "hf")
    assert got == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, chat_template=RICH)


def test_raise_exception_is_a_one_line_error(chat_model, tmp_path):
    from qosora.errors import QosoraError
    from qosora.run import ChatTemplate

    with pytest.raises(QosoraError, match="bad role tool"):
        ChatTemplate(RICH, {"bos_token": "<s>", "eos_token": "</s>"}).render([{"role": "tool", "content": "x"}])


def test_special_tokens_encode_as_one_id(chat_model):
    from qosora.run import Generator

    g = Generator(chat_model / "onnx", provider="cpu", threads=1)
    ids = g.encode(MESSAGES)
    vocab = g.tokenizer.get_vocab()
    assert ids[0] == vocab["<|system|>"] and ids[-1] == vocab["<|assistant|>"]
    assert ids.count(vocab["</s>"]) == 2 and len(ids) == 5 + len("be brief") + len("abc|")  # 5 role / end tokens, one id a char


def test_cli_chat_equals_the_rendered_prompt(chat_model, capsys):
    from qosora.run import Generator, GenerationOptions

    rc, out, err = run_cli(capsys, "generate", chat_model / "onnx", "--chat", "abc|", "--system", "be brief",
                           "--max-new-tokens", "6", "--threads", "1", "--json")
    assert rc == 0, err
    got = json.loads(out)
    g = Generator(chat_model / "onnx", provider="cpu", threads=1)
    ref = g.generate([g.tokenizer.encode(reference(CHAT_TEMPLATE, MESSAGES), add_special_tokens=False).ids],
                     GenerationOptions(max_new_tokens=6))[0]
    assert got["token_ids"] == ref.new_tokens and got["prompt_tokens"] == ref.prompt_tokens
    rc, out, err = run_cli(capsys, "generate", chat_model / "onnx", "--chat", "abc|", "--system", "be brief",
                           "--max-new-tokens", "6", "--threads", "1")
    assert rc == 0 and out == ref.text + "\n"
