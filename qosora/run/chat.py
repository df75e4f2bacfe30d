"""The model's chat template, rendered without transformers: the same jinja2 environment `apply_chat_template`
builds (sandboxed, trim_blocks + lstrip_blocks, loopcontrols, a `tojson` that does not escape HTML,
`raise_exception`, `strftime_now`) over messages [{"role", "content"}] and the special tokens of
tokenizer_config.json.

Where the template comes from, first found: chat_template.jinja, tokenizer_config.json["chat_template"] (a string,
or a list of {"name", "template"} whose "default" is used), chat_template.json["chat_template"].
The rendered text holds special tokens as text (`<|im_start|>`); `tokenizers` matches added tokens before
splitting, so `encode(text, add_special_tokens=False)` turns each into its one id and adds no second BOS.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from qosora.errors import QosoraError

_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")
NO_TEMPLATE_FIX = ("copy chat_template.jinja or tokenizer_config.json (with its chat_template) from the source "
                   "model, or pass --prompt for a raw continuation")


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QosoraError(f"{path} cannot be read ({e}): copy it again from the source model") from None
    if not isinstance(obj, dict):
        raise QosoraError(f"{path} is not a JSON object: copy it again from the source model")
    return obj


def _token_text(value) -> str | None:
    """tokenizer_config.json stores a special token as a string or as an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def find_template(model_dir: Path) -> tuple[str | None, dict]:
    """(template source or None, special tokens {bos_token: ..., ...}) of an exported directory."""
    config = _read_json(model_dir / "tokenizer_config.json") if (model_dir / "tokenizer_config.json").is_file() \
        else {}
    tokens = {k: t for k in _SPECIAL if (t := _token_text(config.get(k))) is not None}
    if (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text(encoding="utf-8"), tokens
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None and (model_dir / "chat_template.json").is_file():
        template = _read_json(model_dir / "chat_template.json").get("chat_template")
    return (template if isinstance(template, str) and template else None), tokens


def check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise QosoraError("messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise QosoraError(f"a message must be an object with string \"role\" and \"content\", got {m!r:.80}")
    return messages


class ChatTemplate:
    """`ChatTemplate.load(dir).render(messages)` -> the prompt text, as transformers' apply_chat_template(
    tokenize=False, add_generation_prompt=True) renders it."""

    def __init__(self, source: str, special_tokens: dict, where: str = "the chat template"):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.where, self.special_tokens = where, dict(special_tokens)
        try:
            self.template = env.from_string(source)
        except jinja2.exceptions.TemplateError as e:
            raise QosoraError(f"{where} does not compile ({e}): {NO_TEMPLATE_FIX}") from None

    @classmethod
    def load(cls, model_dir: str | Path) -> "ChatTemplate":
        model_dir = Path(model_dir)
        source, tokens = find_template(model_dir)
        if source is None:
            raise QosoraError(f"{model_dir} has no chat template (chat_template.jinja or tokenizer_config.json's "
                              f"chat_template): {NO_TEMPLATE_FIX}")
        return cls(source, tokens, f"the chat template of {model_dir}")

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        import jinja2

        try:
            return self.template.render(messages=check_messages(messages), add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens)
        except jinja2.exceptions.TemplateError as e:
            raise QosoraError(f"{self.where} refused the messages ({e})") from None
