"""Data files shipped with qosora: `demo.jsonl` (a generated arithmetic task, see tools/make_demo_data.py) and
`models/*.json` (dimensions of well-known models for `qosora plan`)."""

from pathlib import Path

DATA_DIR = Path(__file__).parent
DEMO_JSONL = DATA_DIR / "demo.jsonl"
MODELS_DIR = DATA_DIR / "models"
