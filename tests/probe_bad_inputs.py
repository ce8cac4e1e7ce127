"""The bad-input probe: every script, fed foreseeable bad inputs and faults the way a new user would meet them.

    python tests/probe_bad_inputs.py                          # every case (a few minutes on 2 cores)
    python tests/probe_bad_inputs.py --only 'lp_|ntk_' --json probe.json --jobs 1

Each case runs a real script (subprocess, cwd = the repository root, HF offline, LPFT_DATA = $LPFT_DATA or
../shared/data or data/) on files in its own temporary folder, and is judged on what the user sees:
  - a refusal exits non-zero with exactly ONE non-empty line on stderr and no "Traceback"
    (a progress bar redrawn with carriage returns counts as what the terminal finally shows);
  - a refusal writes nothing new in its output folder (validation comes before any work; `.lock` aside);
  - every file that existed before in the case's folder is byte-identical after (nothing is lost);
  - where the right behaviour is success (a rerun that must skip, a report that must name a broken file),
    the exit status is 0 and the result is checked (e.g. features recomputed, not reused, for other data).
Verdicts: ok, traceback, silent-wrong (a bad input accepted, or a wrong result), multi-line, no-message,
lost-files, wrote-files, refused (success was right), timeout, no-fixture. Exit status 0 only if all are ok.

A shared fixture is built once (a CB LP head and a 1-epoch CB FT run, 16 train / 16 eval examples) and copied
into each case that needs it. --workdir DIR keeps everything there and reuses a finished fixture.
"""

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SHARED = ROOT.parent / "shared" / "data"
DATA = Path(os.environ.get("LPFT_DATA") or (SHARED if SHARED.exists() else ROOT / "data"))
CB = "superglue/CB"
TIMEOUT = 300  # seconds per command: a bad flag that is not validated may start real work
TOLERATED = []  # regexes of stderr lines that are harmless library noise (none so far: keep it that way)
VERDICTS = ["ok", "traceback", "silent-wrong", "multi-line", "no-message", "wrong-reason", "lost-files",
            "wrote-files", "refused", "timeout", "no-fixture", "probe-error"]

# the tiny configuration every training case starts from; a case appends its bad flag (argparse: last one wins)
SMALL = "--task cb --max_train_samples 16 --max_eval_samples 16"
TRAIN = f"{SMALL} --epochs 1 --output_dir {{w}}/out"
LP = f"{SMALL} --C 1 --output_dir {{w}}/out --cache_dir {{w}}/cache"
NTK = "--task cb --n 4 --n_test 4 --method structured --output_dir {w}/out"


def env(**extra):
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", LPFT_DATA=str(DATA)) | extra


@dataclass
class Case:
    name: str
    cmd: str  # script and flags; {w} = the case's folder, {fx} = the fixture's
    expect: str = "fail"  # fail | ok | either (a one-line refusal or a checked success)
    needs: tuple = ()  # fixture parts copied into {w}: lp (+ its feature cache), ft, heads
    setup: object = None  # setup(w): make the case's bad files
    check: object = None  # check(w, out) -> None, or why the result is wrong
    env: dict = field(default_factory=dict)  # extra environment, {w} formatted
    run: object = None  # run(case, w, fx) -> Out: cases that need more than one process
    mention: str = None  # a refusal's line must match this regex (case-insensitive): it names the problem
    keep: bool = True  # every file that existed before must be byte-identical after
    fresh: str = "out"  # a folder a refusal must not write into (relative to {w})
    fast: bool = False  # no fixture, no training: the subset tests/test_probe.py runs


@dataclass
class Out:
    rc: int
    stdout: str
    stderr: str
    note: str = ""
    extra: dict = field(default_factory=dict)  # what a check needs besides the output (new files, a first run)


# ---------------------------------------------------------------- judging
def shown_lines(stderr):
    """The stderr lines a terminal finally shows: a carriage-return redraw (tqdm) keeps its last text;
    blank and tolerated lines are dropped."""
    lines = []
    for line in stderr.split("\n"):
        text = line.split("\r")[-1].strip()  # tqdm(leave=False) ends by blanking its line
        if text and not any(re.search(t, text) for t in TOLERATED):
            lines.append(text)
    return lines


def judge(expect, out, lost=(), wrote=(), why_wrong=None, mention=None):
    """-> (verdict, why) for one case's outcome."""
    if out.rc is None:
        return "timeout", f"still running after {TIMEOUT}s"
    if "Traceback" in out.stderr or "Traceback" in out.stdout:
        return "traceback", last_line(out.stderr)
    if lost:
        return "lost-files", "changed or removed: " + ", ".join(lost[:3])
    lines = shown_lines(out.stderr)
    if out.rc == 0:
        if expect == "fail":
            return "silent-wrong", "exit 0: the bad input was accepted" + (f" ({out.note})" if out.note else "")
        if why_wrong:
            return "silent-wrong", why_wrong
        if expect == "either" and lines:  # a success instead of a refusal must be a clean one
            return "multi-line", "exit 0 with stderr: " + " | ".join(x[:60] for x in lines[:3])
        return "ok", ""
    if expect == "ok":
        return "refused", last_line(out.stderr) or f"exit {out.rc}"
    if not lines:
        return "no-message", f"exit {out.rc} with an empty stderr"
    if len(lines) > 1:
        return "multi-line", f"{len(lines)} lines: " + " | ".join(x[:60] for x in lines[:3])
    if wrote:
        return "wrote-files", "a refusal wrote: " + ", ".join(wrote[:3])
    if mention and not re.search(mention, lines[0], re.I):
        return "wrong-reason", f"the line does not name the problem (/{mention}/)"
    if why_wrong:
        return "silent-wrong", why_wrong
    return "ok", ""


def last_line(text):
    lines = shown_lines(text)
    return lines[-1] if lines else ""


def snapshot(folder):
    """{relative path: sha256} of every file under folder (the lock file aside)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


# ---------------------------------------------------------------- running
def fmt(text, w, fx):
    return text.replace("{w}", str(w)).replace("{fx}", str(fx))


def argv(cmd, w, fx):
    parts = [fmt(p, w, fx) for p in shlex.split(cmd)]
    if parts[0].endswith(".sh"):
        return ["bash", *parts]
    return [PY, *parts]


def text(raw):
    """Bytes -> str with carriage returns kept (text=True would turn a progress bar's redraws into lines)."""
    return (raw or b"").decode("utf-8", "replace")


def execute(args, extra_env=None, timeout=TIMEOUT):
    try:
        p = subprocess.run(args, cwd=ROOT, env=env(**(extra_env or {})), capture_output=True, timeout=timeout)
        return Out(p.returncode, text(p.stdout), text(p.stderr))
    except subprocess.TimeoutExpired as e:
        return Out(None, text(e.stdout), text(e.stderr))


def run_case(case, workdir, fx, fixture_ok):
    """Prepare the case's folder, run it, judge it -> a row of the table (a fault of the probe itself included)."""
    try:
        return judge_case(case, workdir, fx, fixture_ok)
    except Exception as e:  # the probe's own bug must not hide the other cases
        return {"case": case.name, "expected": case.expect, "cmd": case.cmd, "rc": None, "got": "",
                "verdict": "probe-error", "why": f"{type(e).__name__}: {e}"}


def judge_case(case, workdir, fx, fixture_ok):
    w = Path(workdir) / case.name
    shutil.rmtree(w, ignore_errors=True)
    w.mkdir(parents=True)
    row = {"case": case.name, "expected": case.expect, "cmd": case.cmd}
    missing = [n for n in case.needs if not fixture_ok.get(n)]
    if missing:
        return row | {"rc": None, "got": "", "verdict": "no-fixture", "why": f"fixture {missing} failed to build"}
    for part in case.needs:
        shutil.copytree(fx / part, w / part)
        if part == "lp":
            shutil.copytree(fx / "cache", w / "cache")
    if case.setup:
        case.setup(w)
    before = snapshot(w)
    out = case.run(case, w, fx) if case.run else execute(
        argv(case.cmd, w, fx), {k: fmt(v, w, fx) for k, v in case.env.items()})
    after = snapshot(w)
    lost = [p for p, h in before.items() if after.get(p) != h] if case.keep else out.extra.get("lost", [])
    new = [p for p in after if p not in before]
    wrote = [p for p in new if (w / p).is_relative_to(w / case.fresh)]
    out.extra["new"] = new
    why = case.check(w, out) if case.check and out.rc is not None else None
    verdict, reason = judge(case.expect, out, lost, wrote, why, case.mention and fmt(case.mention, w, fx))
    said = (last_line(out.stdout), last_line(out.stderr))
    got = f"exit {out.rc}: {(said if out.rc == 0 else said[::-1])[0] or said[1] or said[0]}"
    return row | {"rc": out.rc, "got": got, "verdict": verdict, "why": reason, "stderr": out.stderr[-2000:]}


def build_fixture(fx):
    """A finished CB LP head and a finished 1-epoch CB FT run (16/16 examples), plus hand-made heads.
    -> {part: True/False}, with the first error line of a part that failed."""
    ok, errors = {}, {}
    jobs = {"lp": f"lp.py {SMALL} --C 1 --output_dir {fx}/lp --cache_dir {fx}/cache",
            "ft": f"ft.py {SMALL} --epochs 1 --output_dir {fx}/ft"}
    done = {"lp": fx / "lp/lp_results.json", "ft": fx / "ft/results.json"}
    for part, cmd in jobs.items():
        if not (done[part].exists() and json.loads(done[part].read_text()).get("finished")):
            shutil.rmtree(fx / part, ignore_errors=True)
            out = execute(argv(cmd, fx, fx), timeout=600)
            if out.rc != 0:
                errors[part] = last_line(out.stderr) or f"exit {out.rc}"
        ok[part] = done[part].exists()
    if ok["lp"]:
        make_heads(fx / "lp/lp_head.pt", fx / "heads")
    ok["heads"] = ok["lp"]
    return ok, errors


def make_heads(src, dest):
    """Heads that are wrong in one way each, made from the fixture's good one."""
    import torch

    h = torch.load(src, weights_only=True)
    w = h["weight"].clone()
    w[0, 0] = float("nan")
    two = {"weight": h["weight"][:2].clone(), "bias": h["bias"][:2].clone()}
    heads = {
        "other_task": h | two | {"task": "rte", "labels": ["entailment", "not_entailment"]},
        "mean_pooling": h | {"pooling": "mean"},
        "len64": h | {"max_len": 64},
        "nan": h | {"weight": w},
        "list_weight": h | {"weight": h["weight"].tolist()},
        "two_labels": h | two | {"labels": h["labels"][:2]},
        "other_model": h | {"model": "bert-base-uncased"},
        "not_dict": [1, 2, 3],
    }
    dest.mkdir(parents=True, exist_ok=True)
    for name, obj in heads.items():
        torch.save(obj, dest / f"{name}.pt")
    (dest / "corrupt.pt").write_bytes(b"\x00not a torch file\xff" * 64)


# ---------------------------------------------------------------- bad files
def cb_copy(w, alter=None, name="data"):
    """A copy of the CB files under {w}/<name>; alter(train_lines) -> the train file's new bytes."""
    d = w / name / CB
    d.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(DATA / CB, d)
    if alter:
        f = d / "train.jsonl"
        f.write_bytes(alter(f.read_text().splitlines()))
    return d


def row_edit(i, fn):
    """Replace train row i (0-based) by fn(row dict) -> a JSON-able object or raw text."""
    def alter(lines):
        r = fn(json.loads(lines[i]))
        lines[i] = r if isinstance(r, str) else json.dumps(r)
        return ("\n".join(lines) + "\n").encode()
    return alter


def join(lines):
    return ("\n".join(lines) + "\n").encode()


DATA_FAULTS = {
    "malformed_jsonl": lambda ls: join(ls[:3] + ['{"premise": "cut off", "hypothesis": '] + ls[3:]),
    "empty_file": lambda ls: b"",
    "non_utf8": lambda ls: join(ls[:2]) + b'{"premise": "caf\xe9 \xff", "hypothesis": "x", "label": "entailment"}\n'
    + join(ls[2:]),
    "list_row": row_edit(2, lambda r: [r["premise"], r["hypothesis"], r["label"]]),
    "label_fraction": row_edit(2, lambda r: r | {"label": 1.7}),
    "label_7": row_edit(2, lambda r: r | {"label": 7}),
    "missing_field": row_edit(2, lambda r: {k: v for k, v in r.items() if k != "hypothesis"}),
    "text_number": row_edit(2, lambda r: r | {"premise": 12345}),
}


def swap_texts(w, name="data"):
    """The CB files with premise and hypothesis swapped in every split: same labels, other features."""
    d = cb_copy(w, name=name)
    for f in d.glob("*.jsonl"):
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        f.write_text("".join(json.dumps(r | {"premise": r["hypothesis"], "hypothesis": r["premise"]}) + "\n"
                             for r in rows))


def write(path, content):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)


def logits_file(run, drop=(), **over):
    """A logits.npz like ft.py's (CB: 3 classes) in folder `run`, with arrays replaced or splits dropped."""
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {f"{s}_{k}": v for s in ("val", "test") if s not in drop
              for k, v in (("logits", rng.normal(size=(12, 3)).astype(np.float32)),
                           ("labels", rng.integers(0, 3, 12).astype(np.int64)))}
    Path(run).mkdir(parents=True, exist_ok=True)
    with open(Path(run) / "logits.npz", "wb") as f:
        np.savez(f, **(arrays | over))


# ---------------------------------------------------------------- checks of results
def skipped(w, out):
    """A rerun that must skip: it says so and writes nothing (files before are checked byte for byte)."""
    if "already" not in out.stdout + out.stderr:
        return "exit 0 but it did not say it skipped"
    return f"a skipped rerun wrote {out.extra['new'][:3]}" if out.extra["new"] else None


def head_weight(path):
    import torch

    return torch.load(path, weights_only=True)["weight"]


def features_recomputed(w, out):
    """Other data under the same flags: the head must come from the new texts, not the cached features."""
    import torch

    new = w / "out2/lp_head.pt"
    if not new.exists():
        return "exit 0 but no lp_head.pt"
    if torch.equal(head_weight(new), head_weight(w / "lp/lp_head.pt")):
        return "the head equals the one fit on the old texts: cached features of other data were reused"
    return None


def same_head_as_fixture(w, out):
    import torch

    new = w / "out2/lp_head.pt"
    if not new.exists():
        return "exit 0 but no lp_head.pt"
    if not torch.allclose(head_weight(new), head_weight(w / "lp/lp_head.pt"), atol=1e-4):
        return "recomputed features give another head than the fixture's"
    return None


def calibrated(w, out):
    f = w / "ft/calibration.json"
    return None if f.exists() and "temperature" in json.loads(f.read_text()) else "no calibration.json written"


def names(rel):
    """A report case: exit 0, the good runs still reported, and the broken file named (stdout, stderr or
    report.md)."""
    def check(w, out):
        md = w / "root/report.md"
        text = out.stdout + out.stderr + (md.read_text() if md.exists() else "")
        if not md.exists() or "| cb |" not in md.read_text():
            return "report.md missing or without the good CB runs"
        if rel not in text and str(w / "root" / rel) not in text:
            return f"the report does not name {rel}"
        return None
    return check


def study_root(rel, content):
    """setup: a study root holding the fixture's LP and FT runs as seed 1001, plus one bad file at rel
    (content: text, or a function of the case folder)."""
    def setup(w):
        (w / "root/cb").mkdir(parents=True)
        shutil.copytree(w / "lp", w / "root/cb/lp-seed1001")
        shutil.copytree(w / "ft", w / "root/cb/ft-seed1001")
        write(w / "root" / rel, content(w) if callable(content) else content)
    return setup


def truncated_results(w):
    text = (w / "ft/results.json").read_text()
    return text[: len(text) // 2]


def report_case(name, rel, content):
    return Case(f"report_{name}", "report.py --root {w}/root", "ok", ("lp", "ft"), setup=study_root(rel, content),
                check=names(rel))


# ---------------------------------------------------------------- cases with more than one process
def start(cmd, w, fx):
    return subprocess.Popen(argv(cmd, w, fx), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def wait_for(cond, proc, limit):
    end = time.monotonic() + limit
    while time.monotonic() < end and proc.poll() is None and not cond():
        time.sleep(0.2)


def two_writers(case, w, fx):
    """Two identical runs on one folder: the second must stop with one line while the first holds it, and the
    first must finish."""
    first = start(case.cmd, w, fx)
    lock = w / "out/.lock"
    wait_for(lambda: lock.exists() and lock.read_text().strip(), first, 120)
    alive = first.poll() is None
    second = execute(argv(case.cmd, w, fx))
    try:
        out1, err1 = first.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(first.pid, signal.SIGKILL)
        out1, err1 = first.communicate()
    err1 = text(err1)
    res = w / "out/results.json"
    finished = res.exists() and json.loads(res.read_text()).get("finished")
    second.note = "" if alive else "the first had already ended when the second started"
    second.extra["first"] = (first.returncode, finished, last_line(err1))
    return second


def first_finished(w, out):
    rc, finished, err = out.extra["first"]
    return None if rc == 0 and finished else f"the first writer did not finish (exit {rc}: {err})"


def dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def kill_then_rerun(flags=""):
    """A run: kill -9 a training run after its first checkpoint, leave an orphan temp file as a write cut short
    would, then rerun it (with `flags` added). The files the kill left are the ones that must not be lost."""
    def run(case, w, fx):
        first = start(case.cmd, w, fx)
        wait_for(lambda: (w / "out/ckpt.pt").exists(), first, 240)
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
        write(w / f"out/.results.json.{dead_pid()}.tmp", '{"config": {"cut": ')
        before = snapshot(w / "out")
        out = execute(argv(f"{case.cmd} {flags}", w, fx))
        if out.rc != 0:  # a refusal keeps the interrupted run (its orphan temp file may go)
            after = snapshot(w / "out")
            out.extra["lost"] = [f"out/{p}" for p, h in before.items() if after.get(p) != h and ".tmp" not in p]
        return out
    return run


def no_orphans(w, out):
    tmps = [p.name for p in (w / "out").glob(".*.tmp")]
    res = w / "out/results.json"
    if not (res.exists() and json.loads(res.read_text()).get("finished")):
        return "the rerun did not finish the run"
    return f"orphan temp files left: {tmps}" if tmps else None


# ---------------------------------------------------------------- the cases
def flag_name(flags):
    """'--max_len 600' -> 'max_len': a refusal's line must name the flag it refuses."""
    return re.escape(flags.split()[0].lstrip("-"))


def flag_cases(script):
    """Bad flags every training script must refuse before any work (ft.py and lora.py)."""
    s = script.split(".")[0]
    bad = {"epochs0": "--epochs 0", "patience_neg": "--patience -1", "batch_size0": "--batch_size 0",
           "batch_size_neg": "--batch_size -3", "max_len2": "--max_len 2", "max_len600": "--max_len 600",
           "lr_neg": "--lr -1", "lr_nan": "--lr nan", "lr_inf": "--lr inf", "eval_batch_size0": "--eval_batch_size 0",
           "max_train_samples0": "--max_train_samples 0", "max_train_samples_neg": "--max_train_samples -1",
           "max_eval_samples0": "--max_eval_samples 0", "max_steps0": "--max_steps 0",
           "warmup_ratio_1.5": "--warmup_ratio 1.5", "warmup_ratio_neg": "--warmup_ratio -0.1",
           "head_scale_nan": "--head_scale nan", "head_scale0": "--head_scale 0", "head_scale_inf": "--head_scale inf"}
    fast = ("epochs0", "lr_nan", "max_len600") if s == "ft" else ()
    cases = [Case(f"{s}_{k}", f"{script} {TRAIN} {v}", mention=flag_name(v), fast=k in fast) for k, v in bad.items()]
    file = lambda w: write(w / "file", "x")  # noqa: E731
    cases += [
        Case(f"{s}_unknown_task", f"{script} {TRAIN} --task bogus", mention="bogus"),
        Case(f"{s}_model_missing", f"{script} {TRAIN} --model {{w}}/no_such_model", mention="no_such_model"),
        Case(f"{s}_output_is_file", f"{script} {TRAIN} --output_dir {{w}}/file", setup=file, mention="file",
             fast=s == "ft"),
        Case(f"{s}_output_under_file", f"{script} {TRAIN} --output_dir {{w}}/file/run", setup=file, mention="file"),
        Case(f"{s}_init_missing", f"{script} {TRAIN} --init {{w}}/no_head.pt", mention="no_head", fast=s == "ft"),
        Case(f"{s}_init_other_task", f"{script} {TRAIN} --init {{w}}/heads/other_task.pt", needs=("heads",),
             mention="rte"),
    ]
    return cases


def ft_cases():
    again = f"ft.py {SMALL} --epochs 1 --output_dir {{w}}/ft"  # the fixture's own command, on its copy
    heads = {"corrupt": "corrupt", "list_weight": "weight", "nan": "nan|finite", "two_labels": "label",
             "not_dict": "not_dict", "other_model": "bert-base-uncased"}
    cases = [Case(f"ft_init_{k}", f"ft.py {TRAIN} --init {{w}}/heads/{k}.pt", needs=("heads",), mention=m)
             for k, m in heads.items()]
    cases[-1].cmd += " --model all-MiniLM-L6-v2"  # the head names another model than the one asked for
    fixture = {"needs": ("ft",), "fresh": "ft"}
    cases += [
        Case("ft_init_mean_pooling_as_cls", f"ft.py {TRAIN} --init {{w}}/heads/mean_pooling.pt --pooling cls",
             needs=("heads",), mention="pooling"),
        Case("ft_init_len64_as_128", f"ft.py {TRAIN} --init {{w}}/heads/len64.pt --max_len 128", needs=("heads",),
             mention="max_len"),
        Case("ft_init_is_folder", f"ft.py {TRAIN} --init {{w}}/heads", mention="heads",
             setup=lambda w: (w / "heads").mkdir()),
        Case("ft_rerun_same_flags", again, "ok", ("ft",), check=skipped),
        Case("ft_rerun_other_epochs", f"{again} --epochs 2", mention="epochs", **fixture),
        Case("ft_rerun_other_lr", f"{again} --lr 3e-4", mention="lr", **fixture),
        Case("ft_rerun_other_max_train_samples", f"{again} --max_train_samples 8", mention="max_train_samples",
             **fixture),
        Case("ft_rerun_other_data_content", again, setup=swap_texts, env={"LPFT_DATA": "{w}/data"},
             mention="data|fingerprint|hash|content", **fixture),
        Case("ft_overwrite_bad_epochs", f"{again} --overwrite --epochs 0", mention="epochs", **fixture),
        Case("ft_overwrite_bad_lr", f"{again} --overwrite --lr nan", mention="lr", **fixture),
        Case("ft_corrupt_results", again, mention="results.json", **fixture,
             setup=lambda w: write(w / "ft/results.json", '{"config": {"task": "cb"}, "fi')),
        Case("ft_results_is_list", again, setup=lambda w: write(w / "ft/results.json", "[1, 2, 3]"),
             mention="results.json", **fixture),
        Case("ft_results_without_config", again, mention="results.json|config", **fixture,
             setup=lambda w: write(w / "ft/results.json", '{"finished": true, "best_epoch": 1, "metrics": {}}')),
        Case("ft_corrupt_checkpoint", f"ft.py {TRAIN}", setup=lambda w: write(w / "out/ckpt.pt", b"\x00garbage" * 9),
             mention="ckpt", fresh="none"),
        Case("ft_failed_before", f"ft.py {TRAIN}", mention="failed", fresh="none",
             setup=lambda w: write(w / "out/results.json", json.dumps(
                 {"config": {}, "history": [], "finished": False, "failed": "loss became nan at epoch 1"}))),
        Case("ft_two_writers", f"ft.py {SMALL} --max_train_samples 32 --epochs 2 --output_dir {{w}}/out",
             run=two_writers, check=first_finished, keep=False, fresh="none", mention="process|writ|lock|busy"),
        Case("ft_kill9_then_rerun", f"ft.py {SMALL} --epochs 3 --output_dir {{w}}/out", "ok", run=kill_then_rerun(),
             check=no_orphans, keep=False),
        Case("ft_kill9_then_resume_other_lr", f"ft.py {SMALL} --epochs 3 --output_dir {{w}}/out",
             run=kill_then_rerun("--lr 3e-4"), keep=False, fresh="none", mention="lr"),
    ]
    return cases


def lora_cases():
    bad = {"r0": "--r 0", "r_neg": "--r -1", "alpha0": "--alpha 0", "lora_dropout1": "--lora_dropout 1",
           "lora_dropout_neg": "--lora_dropout -0.5", "targets_bogus": "--targets bogus"}
    cases = [Case(f"lora_{k}", f"lora.py {TRAIN} {v}", mention=r"\br\b|rank" if k.startswith("r") else flag_name(v),
                  fast=k in ("r0", "targets_bogus")) for k, v in bad.items()]
    cases += [Case("lora_merge_to_file", f"lora.py {TRAIN} --merge_to {{w}}/file", mention="merge_to",
                   setup=lambda w: write(w / "file", "x")),
              Case("lora_merge_to_run_dir", f"lora.py {TRAIN} --merge_to {{w}}/out", mention="merge_to")]
    return cases


def data_cases():
    cases = []
    for k, alter in DATA_FAULTS.items():
        for script, flags in (("lp", LP), ("ft", TRAIN)):
            cases.append(Case(f"data_{k}_{script}", f"{script}.py {flags} --data_dir {{w}}/data",
                              setup=lambda w, a=alter: cb_copy(w, a), mention="train.jsonl",
                              fast=(k, script) == ("malformed_jsonl", "ft")))
    one_class = lambda ls: join(json.dumps(json.loads(x) | {"label": "entailment"}) for x in ls)  # noqa: E731
    cases += [
        Case("data_missing_val_file_ft", f"ft.py {TRAIN} --data_dir {{w}}/data", mention="val.jsonl",
             setup=lambda w: (cb_copy(w) / "val.jsonl").unlink()),
        Case("data_dir_missing_lp", f"lp.py {LP} --data_dir {{w}}/no_such_dir", mention="no_such_dir"),
        Case("data_dir_is_file_ft", f"ft.py {TRAIN} --data_dir {{w}}/file", mention="file",
             setup=lambda w: write(w / "file", "x")),
        Case("data_one_class_lp", f"lp.py {LP} --data_dir {{w}}/data", mention="class",
             setup=lambda w: cb_copy(w, one_class)),
    ]
    return cases


def lp_cases():
    again = f"lp.py {SMALL} --C 1 --output_dir {{w}}/lp --cache_dir {{w}}/cache"  # the fixture's command
    bad = {"C0": "--C 0", "C_neg": "--C -1", "C_nan": "--C nan", "C_inf": "--C inf", "max_len600": "--max_len 600",
           "max_len2": "--max_len 2", "norm_curve_neg": "--norm_curve -1",
           "max_train_samples0": "--max_train_samples 0", "max_eval_samples0": "--max_eval_samples 0",
           "eval_batch_size0": "--eval_batch_size 0"}
    cases = [Case(f"lp_{k}", f"lp.py {LP} {v}", mention=flag_name(v), fast=k == "C0") for k, v in bad.items()]
    file = lambda w: write(w / "file", "x")  # noqa: E731
    fixture = {"needs": ("lp",), "fresh": "lp"}
    other_dir = f"lp.py {SMALL} --C 1 --output_dir {{w}}/out2 --cache_dir {{w}}/cache"
    cases += [
        Case("lp_unknown_task", f"lp.py {LP} --task bogus", mention="bogus"),
        Case("lp_output_is_file", f"lp.py {LP} --output_dir {{w}}/file", setup=file, mention="file"),
        Case("lp_output_under_file", f"lp.py {LP} --output_dir {{w}}/file/lp", setup=file, mention="file"),
        Case("lp_cache_dir_is_file", f"lp.py {LP} --cache_dir {{w}}/file", setup=file, mention="file"),
        Case("lp_too_few_for_cv", f"lp.py {SMALL} --max_train_samples 8 --output_dir {{w}}/out --cache_dir {{w}}/cache",
             "either"),
        Case("lp_rerun_same_flags", again, "ok", ("lp",), check=skipped),
        Case("lp_rerun_other_C", f"{again} --C 0.5", mention=r"\bC\b", **fixture),
        Case("lp_corrupt_results", again, setup=lambda w: write(w / "lp/lp_results.json", '{"config": '),
             mention="lp_results.json", **fixture),
        Case("lp_results_is_list", again, setup=lambda w: write(w / "lp/lp_results.json", "[]"),
             mention="lp_results.json", **fixture),
        Case("lp_overwrite_bad_C", f"{again} --overwrite --C 0", mention=r"\bC\b", **fixture),
        Case("lp_rerun_other_data_content", again, setup=swap_texts, env={"LPFT_DATA": "{w}/data"},
             mention="data|fingerprint|hash|content", **fixture),
        Case("lp_new_dir_stale_cache_other_data", other_dir, "either", ("lp",), setup=swap_texts,
             env={"LPFT_DATA": "{w}/data"}, check=features_recomputed, fresh="out2", keep=False),
        Case("lp_corrupt_feature_cache", other_dir, "either", ("lp",), check=same_head_as_fixture, keep=False,
             setup=lambda w: [write(f, b"\x93NUMPY garbage") for f in (w / "cache").rglob("*.npy")], fresh="out2"),
    ]
    return cases


def ntk_cases():
    bad = {"n0": "--n 0", "n_test0": "--n_test 0", "batch_size0": "--batch_size 0",
           "max_memory_gb0": "--max_memory_gb 0", "ridge_neg": "--ridge -1", "max_len600": "--max_len 600",
           "k_shot0": "--k_shot 0", "head_scale_nan": "--head_scale nan"}
    cases = [Case(f"ntk_{k}", f"ntk.py {NTK} {v}", mention=flag_name(v), fast=k == "n0") for k, v in bad.items()]
    cases += [
        Case("ntk_lora_r0", f"ntk.py {NTK} --lora --r 0", mention=r"\br\b|rank"),
        Case("ntk_unknown_task", f"ntk.py {NTK} --task bogus", mention="bogus"),
        Case("ntk_output_is_file", f"ntk.py {NTK} --output_dir {{w}}/file", mention="file",
             setup=lambda w: write(w / "file", "x")),
        Case("ntk_corrupt_results", f"ntk.py {NTK}", setup=lambda w: write(w / "out/ntk_results.json", "{{{"),
             mention="ntk_results.json"),
        Case("ntk_init_other_task", f"ntk.py {NTK} --init {{w}}/heads/other_task.pt", needs=("heads",), mention="rte"),
        Case("ntk_init_missing", f"ntk.py {NTK} --init {{w}}/no_head.pt", mention="no_head"),
    ]
    return cases


def calibrate_cases():
    import numpy as np

    run = "calibrate.py {w}/run --no_plots"
    bad = {  # name -> (setup, the problem the line must name)
        "no_logits": (lambda w: (w / "run").mkdir(), "logits.npz"),
        "corrupt_logits": (lambda w: write(w / "run/logits.npz", b"PK\x03\x04 garbage"), "logits.npz"),
        "nan_logits": (lambda w: logits_file(w / "run", val_logits=np.full((12, 3), np.nan, np.float32)),
                       "nan|finite"),
        "labels_out_of_range": (lambda w: logits_file(w / "run", val_labels=np.full(12, 5, np.int64)), "label"),
        "no_val_split": (lambda w: logits_file(w / "run", drop=("val",)), "val"),
        "length_mismatch": (lambda w: logits_file(w / "run", test_labels=np.zeros(8, np.int64)), "test"),
        "logits_1d": (lambda w: logits_file(w / "run", val_logits=np.zeros(12, np.float32)), "val_logits"),
    }
    cases = [Case(f"cal_{k}", run, setup=s, mention=m, fresh="run", fast=k in ("no_logits", "nan_logits"))
             for k, (s, m) in bad.items()]
    cases += [
        Case("cal_missing_dir", "calibrate.py {w}/no_such_run --no_plots", fresh="no_such_run", mention="no_such_run"),
        Case("cal_bins0", "calibrate.py {w}/run --bins 0", fresh="run", setup=lambda w: logits_file(w / "run"),
             mention="bins"),
        Case("cal_bins_neg", "calibrate.py {w}/run --bins -5", fresh="run", setup=lambda w: logits_file(w / "run"),
             mention="bins"),
        Case("cal_finished_run", "calibrate.py {w}/ft", "ok", ("ft",), check=calibrated),
    ]
    return cases


def report_cases():
    results = "cb/ft-seed2002/results.json"
    return [
        report_case("corrupt_results", results, "{not json"),
        report_case("truncated_seed", results, truncated_results),
        report_case("results_is_list", results, "[]"),
        report_case("results_strings", results, json.dumps(
            {"config": {"task": "cb", "method": "ft", "seed": 2002, "lr": "fast"}, "finished": True, "best_epoch": 1,
             "metrics": {"val": {"accuracy": "high"}, "test": {"accuracy": "high"}}, "history": "long"})),
        report_case("calibration_wrong_shape", "cb/ft-seed1001/calibration.json",
                    json.dumps({"splits": {"test": [1, 2]}, "temperature": "hot", "converged": "maybe"})),
        report_case("ntk_strings", "cb/ntk-ft-seed1001/ntk_results.json", json.dumps(
            {"config": {"task": "cb", "n_train": "four"}, "ft_ratio": "high",
             "kernels": {"P": {"fro": "big", "rank": "full"}, "P+F": "n/a"}})),
        Case("report_no_root", "report.py --root {w}/no_such_root", fresh="no_such_root", mention="no_such_root",
             fast=True),
        Case("report_root_is_file", "report.py --root {w}/file", setup=lambda w: write(w / "file", "x"),
             mention="file"),
    ]


def run_all_cases():
    ra = "run_all.sh --out {w}/out"
    return [
        Case("run_all_unknown_option", f"{ra} --bogus", mention="bogus", fast=True),
        Case("run_all_bad_ntk_method", f"{ra} --ntk_method bogus", mention="ntk_method"),
        Case("run_all_missing_value", f"{ra} --tasks", mention="tasks"),
        Case("run_all_epochs0", f"{ra} --epochs 0 --print_jobs", mention="epochs"),
        Case("run_all_bad_number", f"{ra} --max_train_samples lots --print_jobs", mention="max_train_samples"),
        Case("run_all_unknown_task", f"{ra} --tasks bogus --print_jobs", mention="bogus"),
        Case("run_all_unknown_method", f"{ra} --methods bogus --print_jobs", mention="bogus"),
        Case("run_all_bad_scale", f"{ra} --scales 'x 10' --print_jobs", mention="scales"),
    ]


def all_cases():
    cases = (flag_cases("ft.py") + flag_cases("lora.py") + ft_cases() + lora_cases() + data_cases() + lp_cases()
             + ntk_cases() + calibrate_cases() + report_cases() + run_all_cases())
    assert len({c.name for c in cases}) == len(cases), "duplicate case names"
    return cases


# ---------------------------------------------------------------- main
def main(argv_=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="run the cases whose name matches this regular expression")
    p.add_argument("--fast", action="store_true", help="only the fast cases (no fixture, no training)")
    p.add_argument("--json", help="also write the table and totals here")
    p.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2)")
    p.add_argument("--workdir", help="keep all files here (default: a temporary folder, removed at the end)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    args = p.parse_args(argv_)
    cases = [c for c in all_cases() if (not args.only or re.search(args.only, c.name)) and (c.fast or not args.fast)]
    if args.list:
        print("\n".join(f"{c.name:<40} {c.expect:<7} {c.cmd}" for c in cases))
        return 0
    if not cases:
        sys.exit(f"error: no case matches --only {args.only!r} (see --list)")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lpft-probe-"))
    work.mkdir(parents=True, exist_ok=True)
    fx = work / "fixture"
    fixture_ok, errors = {}, {}
    if any(c.needs for c in cases):
        print(f"building the fixture in {fx} ...", flush=True)
        fixture_ok, errors = build_fixture(fx)
        for part, e in errors.items():
            print(f"fixture {part} failed: {e}", flush=True)
    rows = []
    solo = [c for c in cases if c.run]  # multi-process cases run alone
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for row in pool.map(lambda c: run_case(c, work / "cases", fx, fixture_ok), [c for c in cases if not c.run]):
            rows.append(row)
            print_row(row)
    for c in solo:
        rows.append(run_case(c, work / "cases", fx, fixture_ok))
        print_row(rows[-1])
    totals = {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}
    print(f"\n{len(rows)} cases: " + ", ".join(f"{v} {n}" for v, n in totals.items() if n or v in (
        "ok", "traceback", "silent-wrong", "multi-line")))
    if args.json:
        Path(args.json).write_text(json.dumps({"totals": {"cases": len(rows)} | totals, "fixture_errors": errors,
                                               "rows": rows}, indent=2))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if totals["ok"] == len(rows) else 1


def print_row(row):
    got = row["got"] if len(row["got"]) <= 90 else row["got"][:87] + "..."
    why = f"  [{row['why'][:100]}]" if row["verdict"] != "ok" and row.get("why") else ""
    print(f"{row['case']:<38} {row['expected']:<7} {got:<90} {row['verdict']}{why}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
