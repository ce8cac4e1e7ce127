"""run_all.sh end to end in a tiny configuration: every stage, resume, the report, a learning-rate grid."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_all

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--tasks", "cb", "--seeds", "1001", "--epochs", "1", "--max_steps", "2", "--max_train_samples", "32",
        "--max_eval_samples", "16", "--jobs", "1"]  # one at a time: every job's output in the log


def mtimes(out):
    """Every result, checkpoint, kernel and calibration file (the report itself is rewritten on purpose)."""
    return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".json", ".npz", ".pt", ".safetensors")}


def test_tiny_study_writes_every_table(tiny_study):
    out = tiny_study.out
    md = (out / "report.md").read_text()
    for title in ("Test performance", "Head norm", "Feature change", "Calibration on test", "eNTK at the start",
                  "Norm scaling", "Learning rates", "Paired differences", "The paper's claims"):
        assert f"## {title}" in md, title
    assert "| cb |" in md and (out / "report.csv").exists() and (out / "head_norm.png").exists()
    for d in ("lp-seed1001", "ft-seed1001", "lp_ft-seed1001", "ft-scale10-seed1001", "ntk-lp_lora-seed1001"):
        assert (out / "cb" / d).is_dir(), d
    ntk = json.loads((out / "cb/ntk-ft-seed1001/ntk_results.json").read_text())
    assert ntk["config"]["method"] == "structured"  # the default study's engine


def test_print_jobs_under_a_parallel_runner(tiny_study):
    """The shared tiny study was made by its printed jobs, two at a time (xargs -P 2), then --report_only. Several
    jobs start with the same `lp.py ... &&` (LP-FT, LP-LoRA, the LP NTK jobs): one fits the head, the
    others wait for it or find it done; every job finishes, and every LP-start run begins at that one head."""
    cb = tiny_study.out / "cb"
    assert sum(j.startswith(f"{sys.executable} lp.py") for j in tiny_study.jobs.splitlines()) == 5  # lp + 4 after it
    lp = json.loads((cb / "lp-seed1001/lp_results.json").read_text())
    for m in ("ft", "lp_ft", "lora", "lp_lora"):
        res = json.loads((cb / f"{m}-seed1001/results.json").read_text())
        assert res["finished"] and res["config"]["method"] == m
        if m.startswith("lp_"):  # epoch 0 is the LP head itself
            assert res["history"][0]["head_norm"] == pytest.approx(lp["head_norm"], rel=1e-5)
        ntk = json.loads((cb / f"ntk-{m}-seed1001/ntk_results.json").read_text())
        if m.startswith("lp_"):
            assert ntk["head_norm"] == pytest.approx(lp["head_norm"], rel=1e-5)
    norm0 = {d: json.loads((cb / d / "results.json").read_text())["history"][0]["head_norm"]
             for d in ("ft-seed1001", "ft-scale10-seed1001")}
    assert norm0["ft-scale10-seed1001"] == pytest.approx(10 * norm0["ft-seed1001"], rel=1e-5)  # FT's head x 10
    for m in ("lp", "ft", "lp_ft", "lora", "lp_lora"):
        assert (cb / f"{m}-seed1001/calibration.json").exists(), m
    table = (tiny_study.out / "report.md").read_text().split("## Test performance")[1].split("##")[0]
    header, row = (next(x for x in table.splitlines() if x.startswith(f"| {c} |")) for c in ("task", "cb"))
    assert all(f" {name} " in header for name in ("LP", "FT", "LP-FT", "LoRA", "LP-LoRA")), header
    assert "–" not in row, row  # every method has a test score
    assert not list(tiny_study.out.rglob(".*.tmp"))


def test_print_jobs_respects_dependencies(tmp_path):
    jobs = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--print_jobs", "--out", str(tmp_path)],
                          capture_output=True, text=True, check=True).stdout.splitlines()
    assert jobs and not any(tmp_path.iterdir())  # printing runs nothing
    for j in jobs:
        if "--init" in j:  # LP-FT / LP-LoRA / LP NTK jobs fit their LP head first, on the same line
            assert j.startswith("python lp.py") and " && " in j
    paper = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--paper", "--print_jobs"], capture_output=True,
                           text=True, check=True).stdout.splitlines()
    assert sum("--seed 5005" in j and "ft.py" in j for j in paper) > 0
    trains = [j.split(" && ")[-1] for j in paper if " ft.py " in f" {j}" or "lora.py" in j]
    assert trains and all("--lr_table table6" in j for j in trains)  # Table 6 under --paper, whatever the model
    kernels = [j.split(" && ")[-1] for j in paper if "ntk.py" in j]
    assert kernels and all("--ridge 0" in j for j in kernels)  # the authors' solvers fit the raw kernel
    scaled = {s for j in paper for s in ("1001", "5005") if "--head_scale" in j and f"--seed {s}" in j}
    assert scaled == {"1001", "5005"}  # norm scaling over every seed
    # the default study: FT/LP-FT kernels for every seed (claim c5 is paired by seed), LoRA's for the first
    ntk = [j.split(" && ")[-1] for j in jobs if "ntk.py" in j]
    assert sum("--seed 3003" in j for j in ntk) == 2 * len({j.split("--task ")[1].split()[0] for j in ntk})
    assert not any("--lora" in j and "--seed 1001" not in j for j in ntk)
    assert {t for j in paper for t in ["boolq", "pubmed", "amazon"] if f"--task {t} " in j} == {
        "boolq", "pubmed", "amazon"}


def test_print_jobs_puts_ehft_sources_first_and_chains_them(tmp_path):
    """EH-FT (lora_ft, bitfit_ft): each (task, seed)'s LoRA / BitFit source is printed once, before every job that
    starts from it, and every such job (fine-tuning at each lr, its eNTK) chains it with --wait in front, so a job
    finding another process writing it waits and then finds it finished."""
    args = ["--print_jobs", "--out", str(tmp_path), "--tasks", "cb", "--seeds", "1001 2002", "--no_scale",
            "--methods", "lora lora_ft bitfit_ft", "--lr_grid_lora_ft", "1e-5 1e-4"]
    jobs = subprocess.run(["bash", str(ROOT / "run_all.sh"), *args], capture_output=True, text=True,
                          check=True).stdout.splitlines()
    assert not any(tmp_path.iterdir())
    for m in ("lora", "bitfit"):
        for s in ("1001", "2002"):
            src = f"--output_dir {tmp_path}/cb/{m}-seed{s}"
            alone = [i for i, j in enumerate(jobs) if j.endswith(src + (" --bitfit" if m == "bitfit" else ""))]
            users = [i for i, j in enumerate(jobs) if j.endswith(f"--init {tmp_path}/cb/{m}-seed{s}")]
            assert len(alone) == 1 and len(users) == (3 if m == "lora" else 2)  # LoRA-FT at 2 lrs, BitFit-FT; NTK
            assert all(alone[0] < i and jobs[i].split(" && ")[0].endswith(" --wait") and src in jobs[i]
                       and "--overwrite" not in jobs[i].split(" && ")[0] for i in users)
    first_user = min(i for i, j in enumerate(jobs) if "--init" in j)
    assert all(" && " not in j for j in jobs[:first_user]) and first_user == 4  # the sources' phase comes first
    assert sum("ntk-lora_ft-seed" in j or "ntk-bitfit_ft-seed" in j for j in jobs) == 4  # every seed (paired)
    # run by run_all.sh itself (PYTHON=true: every job a no-op): the sources' phase before the rest, each job weighed
    # by its kind in the time-left estimate (the sources as LoRA, EH-FT as fine-tuning)
    out = tmp_path / "seq"
    log = subprocess.run(["bash", str(ROOT / "run_all.sh"), *args[1:], "--out", str(out), "--jobs", "1"],
                         capture_output=True, text=True, check=True, env=dict(os.environ, PYTHON="true")).stdout
    ran = [m.groups() for m in re.finditer(r"^\[(\d+)/\d+ \d+m\] (.+)$", log, re.M)]  # (job number, name)
    assert [n.split()[0] for _, n in ran[:4]] == ["source"] * 4 and not any("source" in n for _, n in ran[4:])
    kinds = dict(line.split()[:2] for line in (out / "logs/plan").read_text().splitlines())
    assert {n.split()[0] + " " + kinds[str(int(k) - 1)] for k, n in ran if "ft" in n.split()[0] or "source" in n} == {
        "source lora", "lora_ft train", "bitfit_ft train"}


def test_lr_grid_end_to_end_two_jobs_at_once_then_a_second_run_does_no_work(tmp_path):
    study = [*TINY, "--methods", "lp lp_ft", "--no_ntk", "--no_scale", "--lr_grid", "1e-5 1e-4", "--out",
             str(tmp_path), "--jobs", "2"]  # the last --jobs wins
    log = run_all(*study)
    assert "2 at a time" in log and log.count("  done: ") == 3 and log.count(" left (at ") == 3 and "[1/" in log
    assert "already fit" not in log  # LP-FT reuses the LP job's head without starting lp.py again
    logs = sorted(p.name for p in (tmp_path / "logs").glob("*.log"))
    assert logs[0] == "01-lp-cb-seed-1001.log" and len(logs) == 3  # LP first (its own phase), then the rest
    assert "estimated total" in (tmp_path / "logs" / logs[1]).read_text()  # ft.py's estimate after its first epoch
    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, len(os.sched_getaffinity(0)) // 2))
    assert json.loads((tmp_path / "cb/lp_ft-lr1e-5-seed1001/results.json").read_text())["config"]["threads"] == threads
    dirs = sorted(p.name for p in (tmp_path / "cb").iterdir())
    assert {"lp_ft-lr1e-5-seed1001", "lp_ft-lr1e-4-seed1001"} <= set(dirs)
    lrs = {json.loads((tmp_path / "cb" / d / "results.json").read_text())["config"]["lr"] for d in dirs
           if d.startswith("lp_ft-")}
    assert lrs == {1e-5, 1e-4}
    md = (tmp_path / "report.md").read_text()
    grid = md.split("## Learning rates")[1].split("##")[0]
    assert grid.count("| cb LP-FT |") == 2 and grid.count("**chosen**") == 1
    assert not (tmp_path / "logs/failed").exists()
    before = mtimes(tmp_path)
    log = run_all(*study) + "".join(f.read_text() for f in (tmp_path / "logs").glob("*.log"))  # --jobs 2: job logs
    assert mtimes(tmp_path) == before
    assert log.count("already finished") == 2  # LP-FT at both learning rates
    assert "already fit" in log and "calibration.json is up to date" in log


def test_bad_ntk_method_is_a_one_line_error(tmp_path):
    p = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--ntk_method", "bogus", "--out", str(tmp_path)],
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "use func, structured or naive" in p.stderr
    assert not any(tmp_path.iterdir())  # nothing ran


@pytest.mark.parametrize("bad, says", [
    (["--bogus"], "unknown option --bogus"),
    (["--tasks"], "--tasks needs a value"),
    (["--epochs", "0"], "--epochs 0: must be a whole number >= 1"),
    (["--max_train_samples", "lots"], "--max_train_samples lots"),
    (["--tasks", "cb bogus"], "--tasks: unknown 'bogus'"),
    (["--methods", "ft lpft"], "--methods: unknown 'lpft'"),
    (["--scales", "0.1 x"], "--scales: 'x' is not a number > 0"),
    (["--lr_grid_lpft", "-1e-5"], "--lr_grid_lpft: '-1e-5'"),
    (["--patience", "-1"], "--patience -1"),
    (["--report_only", "--out", "no_such_folder_here"], "--out no_such_folder_here: no such folder"),
    (["--data_dir", "my data"], "'my data' has a space"),
])
def test_bad_options_stop_before_any_job(tmp_path, bad, says):
    """Every value is checked before a job starts (or is printed): one line naming it, exit 2, nothing written."""
    p = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--out", str(tmp_path / "out"), "--print_jobs", *bad],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2 and p.stdout == "" and p.stderr.count("\n") == 1 and says in p.stderr, p.stderr
    assert not any(tmp_path.iterdir())


def estimate(tmp_path, plan, times, now, par=1, sizes="cb 225 81 75.6 56 3\nsst2 1000 600 14.0 300 2\n"):
    """run_all.sh's awk estimate (estimate_left) on a plan, sizes and start/end times written by hand."""
    src = (ROOT / "run_all.sh").read_text()
    prog = src.split("estimate_left() {")[1].split("'\n    BEGIN")[0]  # the awk -v line(s) end in a quote
    body = "BEGIN" + src.split("estimate_left() {")[1].split("'\n    BEGIN", 1)[1].split("' \"$logs/sizes\"")[0]
    assert "-v now=" in prog
    for name, text in (("sizes", sizes), ("plan", plan), ("times", times)):
        (tmp_path / name).write_text(text)
    p = subprocess.run(["awk", "-v", f"now={now}", "-v", f"par={par}", "-v", "epochs=3", "-v", "max_steps=0",
                        "-v", "ks=0", "-v", "n_test=0", "-v", f"nrun={len(plan.splitlines())}", body,
                        *(str(tmp_path / n) for n in ("sizes", "plan", "times"))], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return int(p.stdout)


FINISH = lambda n: 8 + 0.5 * n  # calibration and the report, added to every estimate


def test_estimate_measures_each_kind_on_its_own_jobs(tmp_path):
    # two CB FT jobs: the second is predicted at exactly the first's measured time
    assert estimate(tmp_path, "0 train cb 0\n1 train cb 0\n", "start 0 0\nend 0 100 100\n", 100) == int(100 + FINISH(2))
    # a running job counts what is left of it
    assert estimate(tmp_path, "0 train cb 0\n1 train cb 0\n", "start 0 0\nend 0 100 100\nstart 1 100\n",
                    130) == int(70 + FINISH(2))
    # an LP fit is not a fine-tuning epoch: each kind at its own measured pace
    plan = "0 lp cb 0\n1 train cb 0\n2 lp cb 0\n3 train cb 0\n"
    times = "start 0 0\nend 0 10 10\nstart 1 10\nend 1 110 100\n"
    assert estimate(tmp_path, plan, times, 110) == int(10 + 100 + FINISH(4))
    # two at a time: the work left is shared by two
    assert estimate(tmp_path, plan, times, 110, par=2) == int((10 + 100) / 2 + FINISH(4))
    # a failed job is not left to do
    assert estimate(tmp_path, plan, times + "start 2 110\nfail 2 111\n", 111) == int(100 + FINISH(4))


def test_estimate_weighs_jobs_by_their_size(tmp_path):
    """A job on a task with more (or longer) training examples is predicted longer than one measured on CB; the
    same job on a task twice CB's size in every respect takes twice as long, less the fixed start-up."""
    sizes = "cb 225 81 75.6 56 3\nbig 450 162 75.6 112 3\n"
    one = estimate(tmp_path, "0 train cb 0\n1 train cb 0\n", "start 0 0\nend 0 100 100\n", 100, sizes=sizes)
    two = estimate(tmp_path, "0 train cb 0\n1 train big 0\n", "start 0 0\nend 0 100 100\n", 100, sizes=sizes)
    assert 100 < two - FINISH(2) < 200 and one - FINISH(2) == pytest.approx(100, abs=1)
