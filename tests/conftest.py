"""Tests run offline on the embedded model and the real data in ../shared/data (or $LPFT_DATA)."""

import hashlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SHARED = ROOT.parent / "shared" / "data"
os.environ.setdefault("LPFT_DATA", str(SHARED if SHARED.exists() else ROOT / "data"))
DATA = Path(os.environ["LPFT_DATA"])


@pytest.fixture(scope="session")
def data_dir():
    return DATA


def snapshot(folder, lock=False):
    """{path: sha256} of every file under folder: what a refused run must leave as it was. A run's .lock records
    whoever last held it, so it is left out unless lock=True."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and (lock or p.name != ".lock")}
