"""Prompts as `qosora generate` takes them: --prompt (raw text), --chat (a user turn, optionally after --system),
or --input FILE.jsonl, one object a line:

    {"prompt": "The capital of France is"}                      raw continuation
    {"chat": "Name a colour", "system": "Be brief"}             one user turn (system optional)
    {"messages": [{"role": "user", "content": "Hi"}, ...]}      a conversation, rendered with the chat template
"""

from __future__ import annotations

import json
from pathlib import Path

from qosora.errors import QosoraError
from qosora.run.chat import check_messages


def chat_messages(user: str, system: str | None = None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def _prompt_of(obj) -> str | list[dict]:
    if not isinstance(obj, dict):
        raise QosoraError("expected a JSON object with \"prompt\", \"chat\" or \"messages\"")
    keys = [k for k in ("prompt", "chat", "messages") if k in obj]
    if len(keys) != 1:
        raise QosoraError(f"expected exactly one of \"prompt\", \"chat\", \"messages\", got keys {sorted(obj)}")
    value, system = obj[keys[0]], obj.get("system")
    if system is not None and (keys[0] != "chat" or not isinstance(system, str)):
        raise QosoraError("\"system\" goes with \"chat\" and must be a string")
    if keys[0] == "messages":
        return check_messages(value)
    if not isinstance(value, str) or not value:
        raise QosoraError(f"\"{keys[0]}\" must be a non-empty string")
    return value if keys[0] == "prompt" else chat_messages(value, system)


def read_prompts(path: str | Path) -> list[tuple[str, str | list[dict]]]:
    """[(FILE:LINE, prompt)] of a JSONL file (blank lines skipped); a bad line raises `FILE:LINE: problem`."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise QosoraError(f"--input {path} cannot be read ({type(e).__name__}): pass a UTF-8 JSONL file") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            prompts.append((f"{path}:{n}", _prompt_of(json.loads(line))))
        except json.JSONDecodeError as e:
            raise QosoraError(f"{path}:{n}: not JSON ({e.msg})") from None
        except QosoraError as e:
            raise QosoraError(f"{path}:{n}: {e}") from None
    if not prompts:
        raise QosoraError(f"--input {path} holds no prompts: one JSON object a line")
    return prompts
