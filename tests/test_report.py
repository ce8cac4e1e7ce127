"""report.py on hand-made results files: selection on val, failed points, paired intervals, tables."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, snapshot

import report


def write_run(root, task, method, seed, lr, val, test, failed=None, scale=1.0, diff=0.5, norm=1.0, extra=None):
    d = root / task / f"{method}-lr{lr}-scale{scale}-seed{seed}"
    d.mkdir(parents=True)
    cfg = {"task": task, "method": method, "seed": seed, "lr": lr, "head_scale": scale}
    if failed:
        res = {"config": cfg, "history": [], "finished": False, "failed": failed}
    else:
        h0 = {"epoch": 0, "head_norm": 0.02 * scale, "diff_f": 0.0, "cs_f": 0.9, "fdr_f": 0.1}
        h1 = {"epoch": 1, "head_norm": norm, "diff_f": diff, "cs_f": 0.8, "fdr_f": 0.2,
              "val": {"accuracy": val}, "test": {"accuracy": test}}
        res = {"config": cfg, "history": [h0, h1], "best_epoch": 1, "finished": True, "head_norm": norm,
               "metrics": {"val": {"accuracy": val, "mcc": val}, "test": {"accuracy": test, "mcc": test}}}
        res["metrics"] |= {s: {"accuracy": a} for s, a in (extra or {}).items()}  # OOD test sets
    (d / "results.json").write_text(json.dumps(res))
    return d


def test_selection_uses_val_never_test_and_breaks_ties_low(tmp_path):
    for seed in (1, 2):
        write_run(tmp_path, "rte", "ft", seed, 1e-5, val=0.60, test=0.90)  # best test, worse val
        write_run(tmp_path, "rte", "ft", seed, 5e-5, val=0.70, test=0.50)
        write_run(tmp_path, "rte", "ft", seed, 1e-4, val=0.70, test=0.55)  # tie on val: lower lr wins
    rows = report.load_runs(tmp_path)
    lr, summ = report.select_lr(rows)
    assert lr == 5e-5 and summ[1e-5]["val"] == pytest.approx(0.60)


def test_failed_points_are_marked_not_chosen(tmp_path):
    write_run(tmp_path, "cb", "ft", 1, 1e-3, val=0.9, test=0.9)
    write_run(tmp_path, "cb", "ft", 2, 1e-3, val=0, test=0, failed="loss became nan at epoch 1, step 3")
    write_run(tmp_path, "cb", "ft", 1, 1e-5, val=0.5, test=0.5)
    write_run(tmp_path, "cb", "ft", 2, 1e-5, val=0.6, test=0.5)
    lr, summ = report.select_lr(report.load_runs(tmp_path))
    assert lr == 1e-5 and summ[1e-3]["failed"] == 1
    md = report.main(["--root", str(tmp_path)])
    assert "| cb FT | 0.001 | 90.0 | 90.0 (n=1) | 1/2 | failed |" in md  # one seed left: no spread to show
    assert "| cb FT | 1e-05 | 55.0 | 50.0 ± 0.0 | 2/2 | **chosen** |" in md


def test_paired_interval_matches_hand_computation():
    # d = [0.1, 0.0, 0.3]: mean 0.13333, sd 0.152753, t(0.975, 2) = 4.302653, half = 4.302653 * 0.152753 / sqrt 3
    m, half, n = report.paired({1: 0.8, 2: 0.7, 3: 0.9, 4: 0.5}, {1: 0.7, 2: 0.7, 3: 0.6})
    assert n == 3 and m == pytest.approx(0.133333, abs=1e-6) and half == pytest.approx(0.379456, abs=1e-5)
    assert report.paired({1: 0.5}, {1: 0.4})[1] is None


def test_report_tables_and_missing_runs(tmp_path):
    for seed in (1, 2):
        write_run(tmp_path, "cola", "ft", seed, 1e-5, val=0.3, test=0.2 + seed / 10, diff=0.8)
        write_run(tmp_path, "cola", "lp_ft", seed, 1e-5, val=0.3, test=0.4, diff=0.1, norm=5)
    write_run(tmp_path, "cola", "ft", 1, 1e-5, val=0.3, test=0.3, scale=10, diff=0.05)
    md = report.main(["--root", str(tmp_path)])
    assert "| cola | 35.0 ± 7.1 | 40.0 ± 0.0 |" in md  # FT: tests 0.3 and 0.4 (MCC), LP-FT 0.4
    assert "| cola LP-FT | 0.1000 | 0.8000 | 0.2000 |" in md
    assert "| cola | c2 LP-FT changes features less than FT | Diff(F) LP-FT − FT | -0.7 [-0.7, -0.7] (n=2) | holds |" \
        in md
    assert "| cola | LP-FT − FT | +5.0 [" in md
    assert "Norm scaling" in md and (tmp_path / "feature_change_vs_norm.png").exists()
    assert (tmp_path / "report.csv").read_text().startswith("table,row,column,value")
    assert "| cola | LP-LoRA − LoRA" not in md


def test_amazon_id_and_ood_table(tmp_path):
    for seed, (idt, dyn) in {1: (0.8, 0.4), 2: (0.9, 0.6)}.items():
        write_run(tmp_path, "amazon", "lp_ft", seed, 1e-5, val=0.8, test=idt,
                  extra={"dynasent": dyn, "semeval": 0.7, "sst5": 0.3})
        write_run(tmp_path, "amazon", "ft", seed, 1e-5, val=0.8, test=0.7, extra={"dynasent": 0.5})
    md = report.main(["--root", str(tmp_path)])
    table = md.split("## Amazon: ID and OOD accuracy (Table 10)")[1].split("##")[0]
    assert "| method | Amazon (ID) | dynasent | semeval | sst5 |" in table
    assert "| LP-FT | 85.0 ± 7.1 | 50.0 ± 14.1 | 70.0 ± 0.0 | 30.0 ± 0.0 |" in table
    assert "| FT | 70.0 ± 0.0 | 50.0 ± 0.0 | – | – |" in table  # a missing OOD set is shown as missing


# ---------------------------------------------------------------- damaged runs are named, never silently dropped

def run_report(root):
    """report.py in a subprocess: -> (exit code, stdout, stderr)."""
    r = subprocess.run([sys.executable, "report.py", "--root", str(root)], cwd=ROOT, capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


def test_damaged_runs_and_missing_seeds_are_listed(tmp_path, capsys):
    for seed in (1, 2):
        write_run(tmp_path, "rte", "ft", seed, 1e-5, val=0.6, test=0.5 + seed / 10)
        write_run(tmp_path, "rte", "lp_ft", seed, 1e-5, val=0.7, test=0.7)
    cut = tmp_path / "rte/ft-lr1e-05-scale1.0-seed2/results.json"
    cut.write_text(cut.read_text()[:40])  # one of two seeds truncated (a full disk, a killed copy)
    (write_run(tmp_path, "rte", "lp_ft", 3, 1e-4, val=0.7, test=0.7) / "results.json").write_text("{corrupt")
    d = write_run(tmp_path, "rte", "ft", 9, 1e-3, val=0.6, test=0.6)
    (d / "results.json").write_text(json.dumps({"history": []}))  # no config
    d = write_run(tmp_path, "xyz", "ft", 1, 1e-5, val=0.6, test=0.6)  # unknown task
    d = write_run(tmp_path, "rte", "lora", 1, 1e-4, val=0.6, test=0.6)
    res = json.loads((d / "results.json").read_text())
    (d / "results.json").write_text(json.dumps(res | {"finished": False}))  # neither finished nor failed
    (tmp_path / "rte/ft-lr5e-05-seed1").mkdir()
    (tmp_path / "rte/ft-lr5e-05-seed1/ckpt.pt").write_bytes(b"x")  # killed before results.json
    before = snapshot(tmp_path, lock=True)

    md = report.main(["--root", str(tmp_path)])
    err = capsys.readouterr().err
    section = md.split("## Runs not used")[1].split("\n## ")[0]
    assert md.index("## Runs not used") < md.index("## Test performance")
    for path, why in (("rte/ft-lr1e-05-scale1.0-seed2/results.json", "corrupt or truncated JSON"),
                      ("rte/lp_ft-lr0.0001-scale1.0-seed3/results.json", "corrupt or truncated JSON"),
                      ("rte/ft-lr0.001-scale1.0-seed9/results.json", "no config"),
                      ("xyz/ft-lr1e-05-scale1.0-seed1/results.json", "unknown task 'xyz'"),
                      ("rte/lora-lr0.0001-scale1.0-seed1/results.json", "unfinished run"),
                      ("rte/ft-lr5e-05-seed1/", "unfinished run")):
        assert f"- `{path}`: {why}" in section
        assert f"report: not used: {tmp_path / path}: {why}" in err
    assert "- rte FT lr 1e-05: seeds 1 (missing 2)" in section  # the truncated seed leaves a group short
    assert "report: fewer seeds: rte FT lr 1e-05: seeds 1 (missing 2)" in err
    assert "| rte | 60.0 (n=1) | 70.0 ± 0.0 |" in md  # never '± 0.0' from the one seed left
    assert "Traceback" not in err and all(line.startswith("report: ") for line in err.splitlines())
    assert all(snapshot(tmp_path, lock=True)[p] == b for p, b in before.items())  # the runs are read, never changed


def test_malformed_calibration_and_ntk_files_are_named_not_fatal(tmp_path):
    for seed in (1, 2):
        write_run(tmp_path, "cb", "lp_ft", seed, 1e-5, val=0.7, test=0.7)
    good = {"temperature": 1.5, "converged": True, "optimizer": "lbfgs",
            "splits": {"test": {"n": 5, **{w: {"accuracy": 0.7, "nll": 0.5, "brier": 0.3, "ece": e, "mce": 2 * e}
                                           for w, e in (("before", 8.0), ("after", 3.0))}}}}
    (tmp_path / "cb/lp_ft-lr1e-05-scale1.0-seed1/calibration.json").write_text(json.dumps(good))
    (tmp_path / "cb/lp_ft-lr1e-05-scale1.0-seed2/calibration.json").write_text("[]")
    d = write_run(tmp_path, "cb", "ft", 1, 1e-5, val=0.7, test=0.7)
    (d / "calibration.json").write_text(json.dumps({"splits": 5}))
    ntk = tmp_path / "cb/ntk-ft-seed1"
    ntk.mkdir()
    (ntk / "ntk_results.json").write_text(json.dumps({
        "config": {"task": "cb", "n_train": 16}, "ft_ratio": "big", "head_norm": 1.0,
        "kernels": {K: {"fro": 1.0, "rank": 3} for K in ("P", "F", "P+F")}}))
    ntk2 = tmp_path / "cb/ntk-lp_ft-seed1"
    ntk2.mkdir()
    (ntk2 / "ntk_results.json").write_text(json.dumps({"config": [], "kernels": 3}))
    before = snapshot(tmp_path, lock=True)

    rc, out, err = run_report(tmp_path)
    assert rc == 0 and "Traceback" not in err, err
    md = (tmp_path / "report.md").read_text()
    for path, why in (("cb/lp_ft-lr1e-05-scale1.0-seed2/calibration.json", "not the layout calibrate.py writes"),
                      ("cb/ft-lr1e-05-scale1.0-seed1/calibration.json", "not the layout calibrate.py writes"),
                      ("cb/ntk-ft-seed1/ntk_results.json", "not a number: ft_ratio = 'big'"),
                      ("cb/ntk-lp_ft-seed1/ntk_results.json", "not an ntk.py result")):
        assert f"- `{path}`: {why}" in md and f"report: not used: {tmp_path / path}: {why}" in err
    assert "| cb LP-FT | 8.00 | 3.00 | 16.00 | 6.00 | 1.500 | lbfgs |" in md  # the well-formed calibration is used
    assert "## eNTK at the start of fine-tuning (Table 2)\n\nMissing: no usable ntk_results.json." in md
    assert all(snapshot(tmp_path, lock=True)[p] == b for p, b in before.items())


def test_root_that_is_a_file_or_missing_is_one_line(tmp_path):
    f = tmp_path / "runs"
    f.write_text("x")
    for root in (f, tmp_path / "absent"):
        rc, out, err = run_report(root)
        assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


# ---------------------------------------------------------------- the claims table
def test_claims_are_decided_by_paired_intervals(tmp_path):
    """c1-c6 on three hand-made seeds; each verdict follows from the numbers written here (see comments)."""
    for seed in (1, 2, 3):
        write_run(tmp_path, "sst2", "lp", seed, None, val=0.6, test=0.60 + seed / 100, norm=5 + seed / 10)
        write_run(tmp_path, "sst2", "ft", seed, 1e-4, val=0.8, test=[0.80, 0.82, 0.79][seed - 1],
                  diff=0.7 + seed / 10)
        d = write_run(tmp_path, "sst2", "lp_ft", seed, 1e-4, val=0.8, test=[0.81, 0.80, 0.83][seed - 1],
                      diff=[0.1, 0.2, 0.15][seed - 1])
        ece = {w: {"accuracy": 0.8, "nll": 0.5, "brier": 0.3, "ece": e, "mce": e} for w, e in
               (("before", 7.0 + seed), ("after", [3.0, 3.5, 2.5][seed - 1]))}
        (d / "calibration.json").write_text(json.dumps({"temperature": 2.0, "converged": True,
                                                        "splits": {"test": {"n": 400, **ece}}}))
        write_run(tmp_path, "sst2", "lora", seed, 1e-3, val=0.7, test=0.7, diff=0.3)
        write_run(tmp_path, "sst2", "lp_lora", seed, 1e-3, val=0.7, test=0.7, diff=[0.5, 0.55, 0.6][seed - 1])
        write_run(tmp_path, "sst2", "lp_ft", seed, 1e-4, val=0.8, test=0.8, scale=10,
                  diff=[0.0, 0.09, 0.06][seed - 1])  # 0.1 less each
        for m, ratio in (("ft", 0.2 + seed / 100), ("lp_ft", [0.9, 1.0, 0.95][seed - 1])):
            k = tmp_path / f"sst2/ntk-{m}-seed{seed}"
            k.mkdir()
            (k / "ntk_results.json").write_text(json.dumps({
                "config": {"task": "sst2", "seed": seed, "n_train": 16}, "ft_ratio": ratio, "head_norm": 1.0,
                "kernels": {K: {"fro": 1.0, "rank": 3} for K in ("P", "F", "P+F")}}))
    md = report.main(["--root", str(tmp_path)])
    rows = {line.split(" | ")[1] + " / " + line.split(" | ")[2]: line.split(" | ")[-1].rstrip(" |")
            for line in md.split("## The paper's claims on these runs")[1].split("\n## ")[0].splitlines()
            if line.startswith("| sst2 |")}
    assert rows["c1 LP head norm > fresh head's / ‖V‖ LP − ‖V‖ fresh (FT's start)"] == "holds"  # 5.1.. vs 0.02
    assert rows["c2 LP-FT changes features less than FT / Diff(F) LP-FT − FT"] == "holds"
    # LP-LoRA − LoRA = +0.2, +0.25, +0.3: mean 0.25, half-width 4.303 * 0.05 / sqrt 3 = 0.124, all above 0
    assert rows["c2 LP-LoRA changes features less than LoRA / Diff(F) LP-LoRA − LoRA"] == "does not hold"
    # LP-FT − FT = +1, -2, +4 points: the interval contains 0
    assert rows["c3 LP-FT at least as accurate as FT / test LP-FT − FT, points"] == "inside the noise"
    assert rows["c3 FT beats LP / test FT − LP, points"] == "holds"  # +19, +20, +16
    assert rows["c4 temperature scaling lowers LP-FT's ECE / test ECE after − before TS, % points"] == "holds"
    assert rows["c5 FT ratio larger after LP / FT ratio LP-FT − FT (eNTK at the start)"] == "holds"
    assert rows["c6 larger initial head norm, less feature change / Diff(F) at head scale 1 − at 10, LP-FT"] == "holds"
    assert "| sst2 | c3 LP-FT at least as accurate as FT | test LP-FT − FT, points | +1.0 [" in md
    # norm scaling over every seed: scale 1 is the study's own LP-FT runs, x10 the scaled ones
    assert "| sst2 LP-FT | 1 | 0.020 | 0.150 ± 0.050 | 81.3 ± 1.5 |" in md
    assert "| sst2 LP-FT | 10 | 0.200 | 0.050 ± 0.046 | 80.0 ± 0.0 |" in md and "| sst2 FT | 1 |" not in md
    assert report.verdict((0.1, None, 1)) == "one seed: no interval"
    assert report.verdict((None, None, 0)) == "missing runs"
    assert report.verdict((-0.5, 0.1, 3), side=-1) == "holds"
    assert report.verdict((0.5, 0.1, 3), side=-1) == "does not hold"
