"""README's deploy-host commands install exactly the `deploy` / `deploy-gpu` extras, and nothing of the training
stack (torch, transformers, bitsandbytes)."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[list[str]]:
    section = ROOT.joinpath("README.md").read_text().split("### Deploy host", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line) for line in block.splitlines() if line.startswith("pip install --no-deps qosora")]


def test_readme_deploy_commands_are_the_extras():
    extras = tomllib.loads(ROOT.joinpath("pyproject.toml").read_text())["project"]["optional-dependencies"]
    commands = _readme_commands()
    assert len(commands) == 2
    installed = []
    for words in commands:
        first, second = " ".join(words).split(" && ")
        assert first == "pip install --no-deps qosora"
        assert second.startswith("pip install ")
        installed.append(sorted(shlex.split(second)[2:]))
    assert installed == [sorted(extras["deploy"]), sorted(extras["deploy-gpu"])]
    for reqs in installed:
        names = {re.split(r"[<>=!~ ]", r, maxsplit=1)[0] for r in reqs}
        assert not names & {"torch", "transformers", "bitsandbytes", "safetensors"}
        assert ("onnxruntime" in names) != ("onnxruntime-gpu" in names)  # one of the two, never both
