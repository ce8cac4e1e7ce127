"""Tests run offline on the embedded model and the real data in ../shared/data (or $LPFT_DATA)."""

import fcntl
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers share the 2 cores (-n 2 in pyproject.toml): one thread each,
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # here and in every process a test starts, so none oversubscribes
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


def run_all(*args, timeout=900):
    """bash run_all.sh ARGS from the kit's folder; it must succeed. -> its output (stdout + stderr)."""
    env = dict(os.environ, PYTHON=sys.executable)
    p = subprocess.run(["bash", str(ROOT / "run_all.sh"), *map(str, args)], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


TINY_STUDY = ["--tasks", "cb", "--seeds", "1001", "--epochs", "1", "--max_steps", "2", "--max_train_samples", "16",
              "--max_eval_samples", "16", "--methods", "lp ft lp_ft lora lp_lora", "--ntk_n", "4", "--scales", "10"]


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """One finished tiny CB study (every method, the kernels, norm scaling, calibration, the report), built once per
    test run for every test that reads one, whichever worker (-n 2) asks first; the others wait for it. Built as a
    job runner would: run_all.sh --print_jobs, the jobs two at a time under xargs -P 2 (several start with the same
    `lp.py ... &&`: one fits the head, the others wait for it or find it done), then run_all.sh --report_only.
    Tests must leave it as they found it."""
    base = tmp_path_factory.getbasetemp()
    base = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the workers' basetemps share this parent
    out, args = base / "tiny_study", [*TINY_STUDY, "--out", str(base / "tiny_study")]
    with open(base / "tiny_study.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        done = base / "tiny_study.json"
        if not done.exists():
            done.write_text(json.dumps(build_tiny_study(out, args)))
        made = json.loads(done.read_text())
    return SimpleNamespace(out=out, args=args, **made)


def build_tiny_study(out, args):
    env = dict(os.environ, PYTHON=sys.executable)
    jobs = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--print_jobs", *args], capture_output=True, text=True,
                          check=True, env=env).stdout
    p = subprocess.run(["xargs", "-P", "2", "-I{}", "bash", "-c", "{}"], input=jobs, capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]  # xargs: 123 when any job failed
    return {"jobs": jobs, "report_log": run_all("--report_only", *args)}
