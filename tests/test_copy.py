"""Each script copied into an empty folder with only the files the README names for it runs on a shipped task
(issue 25): the copy sets are the kit's promise to people who lift one script into their own project."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETS = {  # the README's file map: what each script needs beside it
    "lp.py": ["data.py", "rundir.py"],
    "ft.py": ["data.py", "rundir.py", "prompts.py", "heads.py"],
    "lora.py": ["ft.py", "data.py", "rundir.py", "prompts.py", "heads.py"],
    "ntk.py": ["ft.py", "lora.py", "ntk_structured.py", "kernel_view.py", "data.py", "rundir.py", "prompts.py",
               "heads.py"],
    "calibrate.py": ["data.py", "rundir.py"],
    "report.py": ["report_figs.py", "data.py", "rundir.py"],
}
SMALL = ["--task", "cb", "--max_train_samples", "24", "--max_eval_samples", "12", "--seed", "1001"]


def copy_of(script, base):
    d = base / script.removesuffix(".py")
    d.mkdir()
    for f in [script, *SETS[script]]:
        shutil.copy(ROOT / f, d / f)
    return d


def run(folder, *args):
    env = dict(os.environ, PYTHONPATH="")  # nothing of the kit's own folder on the path
    p = subprocess.run([sys.executable, *map(str, args)], cwd=folder, env=env, capture_output=True, text=True,
                       timeout=600)
    return p


def ok(p):
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "Traceback" not in p.stderr
    return p


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """Every script in its own folder; the stage copies each run once under runs/cb/ (ft.py from lp.py's head and
    from the LoRA run's)."""
    base = tmp_path_factory.mktemp("copies")
    dirs = {s: copy_of(s, base) for s in SETS}
    runs = base / "runs" / "cb"
    ok(run(dirs["lp.py"], "lp.py", *SMALL, "--output_dir", runs / "lp-seed1001", "--cache_dir", base / "cache"))
    train = ["--epochs", "1", "--max_steps", "2"]
    ok(run(dirs["ft.py"], "ft.py", *SMALL, *train, "--init", runs / "lp-seed1001/lp_head.pt",
           "--output_dir", runs / "lp_ft-seed1001"))
    ok(run(dirs["lora.py"], "lora.py", *SMALL, *train, "--output_dir", runs / "lora-seed1001"))
    ok(run(dirs["ft.py"], "ft.py", *SMALL, "--epochs", "1", "--max_steps", "1", "--init", runs / "lora-seed1001",
           "--output_dir", runs / "lora_ft-seed1001"))  # EH-FT: ft.py reads the LoRA run's files, lora.py absent
    ok(run(dirs["ntk.py"], "ntk.py", "--task", "cb", "--seed", "1001", "--n", "4", "--output_dir",
           runs / "ntk-ft-seed1001"))
    return base, dirs, runs


def test_each_copy_runs_alone(copies):
    base, dirs, runs = copies
    for d in ("lp-seed1001", "lp_ft-seed1001", "lora-seed1001", "lora_ft-seed1001"):
        assert (runs / d / "logits.npz").exists(), d
    assert json.loads((runs / "ntk-ft-seed1001/ntk_results.json").read_text())["kernels"]
    for script, d in dirs.items():  # no copy reached into the kit's own folder for a missing file
        assert sorted(p.name for p in d.glob("*.py")) == sorted([script, *SETS[script]])


def test_calibrate_and_report_copies_read_the_study(copies, tiny_study, tmp_path):
    """calibrate.py and report.py copies on a finished study (the shared tiny one, without its weights, calibration
    and report, so that the copies write them afresh)."""
    _, dirs, _ = copies
    made = ("*.safetensors", "calibration.json", "reliability_*.png", "report.*", "*.png", "logs")
    study = Path(shutil.copytree(tiny_study.out, tmp_path / "runs", ignore=shutil.ignore_patterns(*made)))
    ok(run(dirs["calibrate.py"], "calibrate.py", *(study / "cb" / d for d in ("ft-seed1001", "lp_ft-seed1001"))))
    assert (study / "cb/ft-seed1001/calibration.json").exists()
    ok(run(dirs["report.py"], "report.py", "--root", study))
    md = (study / "report.md").read_text()
    assert "| cb |" in md and "## Calibration on test" in md
    assert not (study / "cb/lora-seed1001/calibration.json").exists()  # only the runs it was given


def test_prompt_in_a_copy_is_one_line(copies):
    """lp.py --prompt needs prompts.py (the README says so) and a masked LM: with prompts.py beside it, the embedded
    model (no MLM head) is refused in one line; without prompts.py, one line names the missing file."""
    base, dirs, _ = copies
    shutil.copy(ROOT / "prompts.py", dirs["lp.py"] / "prompts.py")
    p = run(dirs["lp.py"], "lp.py", *SMALL, "--prompt", "--output_dir", base / "p1")
    assert p.returncode != 0 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "MLM head" in p.stderr
    (dirs["lp.py"] / "prompts.py").unlink()
    p = run(dirs["lp.py"], "lp.py", *SMALL, "--prompt", "--output_dir", base / "p2")
    assert p.returncode != 0 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "prompts.py" in p.stderr
