"""The bad-input probe in CI: its fast cases (no fixture, no training, each a few seconds) against the real scripts,
and its judge on made-up outcomes. The full probe (every script, a fixture, kill -9 and two writers) is
`python tests/probe_bad_inputs.py`."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import probe_bad_inputs as probe  # noqa: E402

FAST = [c for c in probe.all_cases() if c.fast]


def test_the_probe_is_broad():
    cases = probe.all_cases()
    assert len(cases) >= 70 and 10 <= len(FAST) <= 16
    scripts = {c.cmd.split()[0] for c in cases}
    assert scripts == {"ft.py", "lora.py", "lp.py", "ntk.py", "calibrate.py", "report.py", "run_all.sh"}
    assert {c.expect for c in cases} == {"fail", "ok", "either"}  # refusals, and reruns that must succeed


@pytest.mark.parametrize("case", FAST, ids=[c.name for c in FAST])
def test_fast_case(case, tmp_path):
    row = probe.run_case(case, tmp_path, tmp_path / "fixture", {})
    assert row["verdict"] == "ok", f"{row['verdict']}: {row['why']} (got {row['got']})"


# ---------------------------------------------------------------- the judge
def out(rc, stderr="", stdout=""):
    return probe.Out(rc, stdout, stderr)


@pytest.mark.parametrize("expect, result, kw, verdict", [
    ("fail", out(1, "error: --lr nan: must be > 0 and finite\n"), {}, "ok"),
    ("fail", out(1, "Traceback (most recent call last):\n  File ...\nValueError: x\n"), {}, "traceback"),
    ("fail", out(1, "error: x\n", "Traceback (most recent call last):\n"), {}, "traceback"),
    ("fail", out(0, "", "training...\n"), {}, "silent-wrong"),
    ("fail", out(1, "UserWarning: something\nerror: x\n"), {}, "multi-line"),
    ("fail", out(1, "usage: ft.py [-h]\nft.py: error: argument --lr: invalid float value\n"), {}, "multi-line"),
    ("fail", out(1, ""), {}, "no-message"),
    ("fail", out(1, "\rfeatures:  50%|#####     |\rfeatures: 100%|##########|\r                    \rerror: x\n"), {},
     "ok"),  # a progress bar blanked by its own carriage returns is not a line
    ("fail", out(1, "error: x\n"), {"lost": ["ft/results.json"]}, "lost-files"),
    ("fail", out(1, "error: x\n"), {"wrote": ["out/results.json"]}, "wrote-files"),
    ("fail", out(1, "error: something went wrong\n"), {"mention": "epochs"}, "wrong-reason"),
    ("fail", out(1, "error: --epochs 0: must be > 0\n"), {"mention": "epochs"}, "ok"),
    ("fail", out(None), {}, "timeout"),
    ("ok", out(0, "", "already finished\n"), {}, "ok"),
    ("ok", out(1, "error: x\n"), {}, "refused"),
    ("ok", out(0), {"why_wrong": "the head equals the old one"}, "silent-wrong"),
    ("either", out(1, "error: too few examples\n"), {}, "ok"),
    ("either", out(0), {}, "ok"),
    ("either", out(0, "UserWarning: the least populated class has 1 member\n"), {}, "multi-line"),
])
def test_judge(expect, result, kw, verdict):
    assert probe.judge(expect, result, **kw)[0] == verdict


def test_run_case_sees_lost_and_new_files(tmp_path):
    """The snapshot around a case: a changed old file is lost-files, a new file in the output folder of a refusal is
    wrote-files, a lock file is neither."""
    def setup(w):
        probe.write(w / "out/old.json", "{}")

    def clobber(case, w, fx):
        probe.write(w / "out/old.json", "[]")
        return out(1, "error: x\n")

    def scribble(case, w, fx):
        probe.write(w / "out/new.json", "{}")
        return out(1, "error: x\n")

    def lock_only(case, w, fx):
        probe.write(w / "out/.lock", "123")
        return out(1, "error: x\n")

    for run, verdict in ((clobber, "lost-files"), (scribble, "wrote-files"), (lock_only, "ok")):
        case = probe.Case(f"unit_{run.__name__}", "ft.py", setup=setup, run=run)
        assert probe.run_case(case, tmp_path, tmp_path / "fixture", {})["verdict"] == verdict, run.__name__


def test_a_case_without_its_fixture_is_not_ok(tmp_path):
    case = probe.Case("unit_needs_ft", "ft.py", needs=("ft",))
    assert probe.run_case(case, tmp_path, tmp_path / "fixture", {"ft": False})["verdict"] == "no-fixture"
