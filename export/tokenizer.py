"""The exported directory's tokenizer files, made loadable by transformers 4 and 5 alike (and `tokenizers` alone).

transformers 5 writes `tokenizer_config.json` with `tokenizer_class: "TokenizersBackend"` (plus `backend`,
`is_local`, `local_files_only`), a class transformers 4's AutoTokenizer does not know, so optimum's
ORTModelForCausalLM (pinned to transformers < 4.58) could not load the tokenizer of an export. Both majors load
`PreTrainedTokenizerFast` from `tokenizer.json`; that is what the export writes, with `model_input_names` set so
transformers 4 returns no `token_type_ids` (a causal LM's `generate` refuses them). The chat template stays in
`chat_template.jinja`, which both read, and which `qosora generate --chat` renders without transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIG = "tokenizer_config.json"
# transformers-5-only classes and the loader bookkeeping it saves alongside them.
_V5_ONLY_CLASSES = {"TokenizersBackend"}
_V5_ONLY_KEYS = ("backend", "is_local", "local_files_only")


def make_portable(directory: Path) -> bool:
    """Rewrite directory/tokenizer_config.json for transformers 4 and 5 when it names a 5-only class; True if
    it changed anything. A file that is not a JSON object is left alone (the export copies, never invents, it)."""
    path = Path(directory) / CONFIG
    if not (path.is_file() and (path.parent / "tokenizer.json").is_file()):
        return False
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(cfg, dict) or cfg.get("tokenizer_class") not in _V5_ONLY_CLASSES:
        return False
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    # transformers 4's PreTrainedTokenizerFast also returns token_type_ids, which a causal LM's generate() refuses.
    cfg.setdefault("model_input_names", ["input_ids", "attention_mask"])
    for key in _V5_ONLY_KEYS:
        cfg.pop(key, None)
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    return True
