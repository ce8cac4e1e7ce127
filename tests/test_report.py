"""report.py on hand-made results files: selection on val, failed points, paired intervals, tables."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, snapshot

import report
import report_figs
import rundir


def write_run(root, task, method, seed, lr, val, test, failed=None, scale=1.0, diff=0.5, norm=1.0, extra=None):
    d = root / task / f"{method}-lr{lr}-scale{scale}-seed{seed}"
    d.mkdir(parents=True)
    cfg = {"task": task, "method": method, "seed": seed, "lr": lr, "head_scale": scale}
    if failed:
        res = {"config": cfg, "history": [], "finished": False, "failed": failed}
    else:  # each epoch's feature statistics per evaluation split (features), the test split's also at the top
        st0 = {"diff_f": 0.0, "cs_f": 0.9, "fdr_f": 0.1, "fdr_f_pinv": 50.0}
        st1 = {"diff_f": diff, "cs_f": 0.8, "fdr_f": 0.2, "fdr_f_pinv": 80.0}
        splits = ("val", "test", *(extra or {}))
        h0 = {"epoch": 0, "head_norm": 0.02 * scale, **st0, "features": {sp: st0 for sp in splits}}
        h1 = {"epoch": 1, "head_norm": norm, **st1, "features": {sp: st1 for sp in splits},
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
    assert "| cola LP-FT | 0.8 ± 0 | 0.1 ± 0 | 0.2 ± 0 | 80 ± 0 | 5 ± 0 |" in md  # Table 1: CS, Diff, 2 FDRs, Norm
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
        "config": {"task": "cb", "n_train": 16, "ntk_method": "ft", "kernel": "sgd"}, "ft_ratio": "big",
        "head_norm": 1.0,
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
    assert "| cb ECE LP-FT | 8.00 (n=1) | 3.00 (n=1) | 5.00 | 1.500 | lbfgs |" in md  # the well-formed one is used
    assert "| cb MCE LP-FT | 16.00 (n=1) | 6.00 (n=1) | 10.00 | 1.500 | lbfgs |" in md
    assert "## eNTK at the start of fine-tuning: kernel statistics (Tables 2, 9)\n\nMissing: no usable " \
           "ntk_results.json" in md
    assert all(snapshot(tmp_path, lock=True)[p] == b for p, b in before.items())


def test_root_that_is_a_file_or_missing_is_one_line(tmp_path):
    f = tmp_path / "runs"
    f.write_text("x")
    for root in (f, tmp_path / "absent"):
        rc, out, err = run_report(root)
        assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


# ---------------------------------------------------------------- the claims table
def write_ratio_ntk(root, task, method, seed, ratio):
    """A minimal ntk_results.json: what the claims read (the FT ratio), with placeholder kernel statistics."""
    k = root / f"{task}/ntk-{method}-seed{seed}"
    k.mkdir()
    (k / "ntk_results.json").write_text(json.dumps({
        "config": {"task": task, "seed": seed, "n_train": 16, "ntk_method": method, "kernel": "sgd"},
        "ft_ratio": ratio, "head_norm": 1.0, "kernels": {K: {"fro": 1.0, "rank": 3} for K in ("P", "F", "P+F")}}))


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
        (d / "calibration.json").write_text(json.dumps({"temperature": 2.0, "converged": True, "optimizer": "lbfgs",
                                                        "splits": {"test": {"n": 400, **ece}}}))
        write_run(tmp_path, "sst2", "lora", seed, 1e-3, val=0.7, test=0.7, diff=0.3)
        write_run(tmp_path, "sst2", "lp_lora", seed, 1e-3, val=0.7, test=0.7, diff=[0.5, 0.55, 0.6][seed - 1])
        write_run(tmp_path, "sst2", "lp_ft", seed, 1e-4, val=0.8, test=0.8, scale=10,
                  diff=[0.0, 0.09, 0.06][seed - 1])  # 0.1 less each
        for m, ratio in (("ft", 0.2 + seed / 100), ("lp_ft", [0.9, 1.0, 0.95][seed - 1])):
            write_ratio_ntk(tmp_path, "sst2", m, seed, ratio)
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
    assert "| sst2 LP-FT | 1 | 0.020 | test | 0.150 ± 0.050 | 81.3 ± 1.5 |" in md
    assert "| sst2 LP-FT | 10 | 0.200 | test | 0.050 ± 0.046 | 80.0 ± 0.0 |" in md and "| sst2 FT | 1 |" not in md
    assert report.verdict((0.1, None, 1)) == "one seed: no interval"
    assert report.verdict((None, None, 0)) == "missing runs"
    assert report.verdict((-0.5, 0.1, 3), side=-1) == "holds"
    assert report.verdict((0.5, 0.1, 3), side=-1) == "does not hold"


def test_ehft_rows_start_accuracy_and_claim_c7(tmp_path):
    """BitFit, LoRA-FT and BitFit-FT in the tables, each method's test accuracy and head norm at the start (epoch 0),
    the EH-FT table paired against LP-FT and FT, and c7: LoRA-FT's Diff(F) lies between LP-FT's and FT's (it does),
    BitFit-FT's does not (above FT's)."""
    diffs = {"ft": [0.8, 0.9, 0.85], "lp_ft": [0.1, 0.2, 0.15], "lora_ft": [0.4, 0.5, 0.5],
             "bitfit_ft": [1.0, 1.1, 1.0], "bitfit": [0.3, 0.3, 0.3]}
    start = {"ft": (0.3, 0.02), "lp_ft": (0.7, 3.0), "lora_ft": (0.75, 2.0), "bitfit_ft": (0.6, 1.5),
             "bitfit": (0.3, 0.02)}  # test accuracy and ||V|| at epoch 0
    for seed in (1, 2, 3):
        for m, d in diffs.items():
            run = write_run(tmp_path, "cb", m, seed, 1e-4, val=0.7, test=0.8, diff=d[seed - 1]) / "results.json"
            res = json.loads(run.read_text())
            res["history"][0] |= {"test": {"accuracy": start[m][0]}, "head_norm": start[m][1] + seed / 100}
            run.write_text(json.dumps(res))
        for m, ratio in (("ft", 0.2), ("lp_ft", 0.9), ("lora_ft", 0.6 + seed / 100)):
            write_ratio_ntk(tmp_path, "cb", m, seed, ratio)
    md = report.main(["--root", str(tmp_path)])
    tables = sections(md)
    acc = tables["Test performance (mean ± std over seeds; Table 8)"]
    assert "| task | FT | LP-FT | BitFit | LoRA-FT | BitFit-FT |" in acc
    assert "| cb at the start | 30.0 ± 0.0 | 70.0 ± 0.0 | 30.0 ± 0.0 | 75.0 ± 0.0 | 60.0 ± 0.0 |" in acc
    assert "| cb LoRA-FT | 0.8 ± 0 | 0.467 ± 0.0577 | 0.2 ± 0 | 80 ± 0 | 1 ± 0 |" in tables[TABLE_TITLES[1]]
    norms = tables["Head norm ||V||_F after training (Table 13)"]
    assert "| cb at the start | – | 0.04 ± 0.01 | – | – | 3.02 ± 0.01 | – | 0.04 ± 0.01 | 2.02 ± 0.01 | 1.52 ± 0.01 |" \
        in norms
    assert any(x.startswith("| cb LoRA-FT | FT E (F) |") for x in tables[TABLE_TITLES[2]])  # the eNTK table
    eh = tables["EH-FT against LP-FT and FT (paired by seed)"]
    assert "| cb LoRA-FT | test at the start | 75.0 ± 0.0 | +5.0 [+5.0, +5.0] (n=3) | +45.0 [+45.0, +45.0] (n=3) |" \
        in eh
    assert "| cb LoRA-FT | ‖V‖ at the start | 2.02 ± 0.01 | -1 [-1, -1] (n=3) | +1.98 [+1.98, +1.98] (n=3) |" in eh
    assert any(x.startswith("| cb LoRA-FT | FT ratio (eNTK at the start) | 0.62 ± 0.01 | -0.28 [") for x in eh)
    assert any(x.startswith("| cb BitFit-FT | FT ratio (eNTK at the start) | – | – | – |") for x in eh)
    claims = {x.split(" | ")[1]: x for x in tables["The paper's claims on these runs"] if x.startswith("| cb |")}
    # LoRA-FT − LP-FT = +0.3, +0.3, +0.35; − FT = -0.4, -0.4, -0.35: both intervals on the claimed side
    assert claims["c7 Diff(F) of LoRA-FT (EH-FT) lies between LP-FT's and FT's"].endswith(
        "| +0.317 [+0.245, +0.388] (n=3); -0.383 [-0.455, -0.312] (n=3) | holds |")
    assert claims["c7 Diff(F) of BitFit-FT (EH-FT) lies between LP-FT's and FT's"].endswith("| does not hold |")
    assert report.all_hold(["holds", "inside the noise"]) == "inside the noise"
    assert report.all_hold(["holds", "missing runs"]) == "missing runs" and report.all_hold(["holds"]) == "holds"


# ---------------------------------------------------------------- every table and figure of the paper
C, D, N_TEST, N_KERNEL = 3, 8, 12, 6  # CB's classes; the tiny study's feature width, test set, kernel subset
MODEL_CFG = {"model": "tiny-model", "pooling": "cls", "max_len": 16, "max_train_samples": None,
             "max_eval_samples": None}


def write_head(d, rng, phi0=None, labels=None):
    """model.safetensors with the head after training, as ft.py and lora.py write it (t-SNE's classifier rows), and
    with phi0 features.npz: the test features before (phi0) and after (phi0 moved by one random direction) and the
    head's rows at the start (head0)."""
    from safetensors.numpy import save_file

    save_file({"head.weight": rng.normal(size=(C, D)).astype(np.float32)}, str(d / "model.safetensors"))
    if phi0 is not None:
        np.savez(d / "features.npz", test_phi=(phi0 + rng.normal(size=D)).astype(np.float32),
                 test_phi0=phi0.astype(np.float32), test_labels=labels,
                 head0=rng.normal(size=(C, D)).astype(np.float32))


def write_calibration(d, ece, mce, temperature=1.5):
    """calibration.json with the test split's (before, after) ECE and MCE."""
    split = {"n": N_TEST} | {w: {"accuracy": 0.7, "nll": 0.5, "brier": 0.3, "ece": e, "mce": m}
                             for w, e, m in zip(("before", "after"), ece, mce)}
    (d / "calibration.json").write_text(json.dumps({"temperature": temperature, "converged": True,
                                                    "optimizer": "lbfgs", "splits": {"test": split}}))


def write_lp(root, seed, norm, phi, labels, rng):
    """An LP run as lp.py writes it: lp_results.json (with a norm curve), lp_head.pt, logits.npz and features.npz
    (the pre-trained test features: test_phi0 and test_phi alike, as LP leaves them unchanged)."""
    import torch

    d = root / "cb" / f"lp-seed{seed}"
    d.mkdir(parents=True)
    cfg = {"task": "cb", "seed": seed} | MODEL_CFG
    fp = {"data:train": "train-hash", "data:test": "test-hash"}
    m = {sp: {"accuracy": 0.7, "macro_f1": 0.6} for sp in ("train", "val", "test")}
    cv = {"scoring": "log_loss", "chosen_score": 0.5, "runner_up_C": 2.0, "runner_up_score": 0.52, "margin": 0.02}
    (d / "lp_results.json").write_text(json.dumps({"config": cfg, "fingerprint": fp, "head_norm": norm, "metrics": m,
                                                   "C": 0.5, "cv": cv if seed == 1 else None,  # seed 2: no margin
                                                   "history": [], "best_epoch": 0, "finished": True,
                                                   "norm_curve": [0.0, norm / 2, norm],
                                                   "norm_curve_test_accuracy": [0.3, 0.5, 0.7]}))
    torch.save({"weight": torch.from_numpy(rng.normal(size=(C, D)))}, d / "lp_head.pt")
    np.savez(d / "logits.npz", test_logits=np.zeros((N_TEST, C), np.float32), test_labels=labels)
    np.savez(d / "features.npz", test_phi0=phi.astype(np.float32), test_phi=phi.astype(np.float32),
             test_labels=labels)


def kernels(rng, labels):
    """P = (<phi, phi'> + 1) I_C and a PSD F = J J^T, both [N, C, N, C], as ntk.py's kernels.npz holds them."""
    phi = rng.normal(size=(N_KERNEL, D))
    P = np.einsum("ij,ab->iajb", phi @ phi.T + 1, np.eye(C))
    J = rng.normal(size=(N_KERNEL * C, 5))
    return P, (J @ J.T).reshape(N_KERNEL, C, N_KERNEL, C)


def write_ntk(root, method, seed, ratio, rng, labels):
    d = root / "cb" / f"ntk-{method}-seed{seed}"
    d.mkdir(parents=True)
    P, F = kernels(rng, labels)
    stats = {}
    for name, K in (("P", P), ("F", F), ("P+F", P + F)):
        sv = np.linalg.svd(K.reshape(N_KERNEL * C, -1), compute_uv=False)
        stats[name] = {"rank": int((sv > 1e-4 * sv[0]).sum()), "rank_rtol": 1e-4, "fro": float(np.linalg.norm(sv)),
                       "effective_rank": 3.0, "sv_normalised": (sv / sv[0]).tolist(),
                       "pair_logreg": {"train": 0.9, "test": 0.6}, "kernel_regression": {"train": 1.0, "test": 0.5}}
    (d / "ntk_results.json").write_text(json.dumps({
        "config": {"task": "cb", "seed": seed, "n_train": N_KERNEL, "head_scale": 1.0, "ntk_method": method,
                   "kernel": "sgd"},
        "kernels": stats, "ft_ratio": ratio, "fro_ratio": 0.5, "head_norm": 1.0}))
    np.savez(d / "kernels.npz", P_train=P, F_train=F, train_labels=labels)
    return P, F


def tiny_study(root, seeds=(1, 2)):
    """A two-seed CB study laid out as run_all.sh writes it: LP, FT, LoRA, LP-FT and LP-LoRA (LP-FT's Diff(F) 0.1
    and 0.3, its test ECE 8 -> 3 and 10 -> 4, MCE 20 -> 6 and 30 -> 10), FT with its head x10, the eNTK of every
    method (FT ratio of LP-FT 0.9 and 1.0) and the LP heads' norms 2 and 4."""
    rng = np.random.default_rng(0)
    phi, labels = rng.normal(size=(N_TEST, D)), np.arange(N_TEST) % C
    kernel_labels = np.array([2, 0, 1, 0, 2, 1])  # unsorted on purpose: the heat maps group them by class
    for i, seed in enumerate(seeds):
        write_lp(root, seed, [2.0, 4.0][i], phi, labels, rng)
        for m, diff in (("ft", 0.8), ("lora", 0.5), ("lp_ft", [0.1, 0.3][i]), ("lp_lora", 0.2)):
            d = write_run(root, "cb", m, seed, 1e-4, val=0.7, test=0.7 + i / 10, diff=diff)
            write_head(d, rng, phi + 1e-3, labels)  # start features != the LP run's
            write_calibration(d, ([8.0, 10.0][i], [3.0, 4.0][i]), ([20.0, 30.0][i], [6.0, 10.0][i]))
            write_ntk(root, m, seed, [0.9, 1.0][i] if m == "lp_ft" else 0.3, rng, kernel_labels)
        write_run(root, "cb", "ft", seed, 1e-4, val=0.7, test=0.7, scale=10, diff=0.2)
    return kernel_labels


def sections(md, level="## "):
    """{title: its non-blank lines} for report.md's headings of one level, in order."""
    out, title = {}, None
    for line in md.splitlines():
        if line.startswith(level):
            title = line[len(level):]
            out[title] = []
        elif line.startswith("#"):
            title = None
        elif title is not None and line.strip():
            out[title].append(line)
    return out


TABLE_TITLES = ["The paper's claims on these runs", "Feature change and head norm (Tables 1, 12)",
                "eNTK at the start of fine-tuning: kernel statistics (Tables 2, 9)",
                "Calibration on test: ECE and MCE with temperature scaling (Tables 3, 14, 15)",
                "Test performance (mean ± std over seeds; Table 8)", "Amazon: ID and OOD accuracy (Table 10)",
                "Amazon: feature and head change, ID and OOD (Table 11)", "Head norm ||V||_F after training (Table 13)",
                "PubMed 20k RCT: test accuracy (Table 16)",
                "Norm scaling: initial head norm vs feature change (Figures 3, 11)"]
FIGURE_FILES = {"Figures 1 and 4": ["head_norm.png"], "Figures 2 and 7": ["ntk_spectra.png"],
                "Figures 3 and 11": ["feature_change_vs_norm.png"], "Figures 5 and 6": ["tsne_cb.png"],
                "Figures 8 and 9": ["ntk_trace_norm_cb.png"]}


def test_every_table_and_figure_of_the_paper(tmp_path):
    tiny_study(tmp_path)
    md = report.main(["--root", str(tmp_path)])
    tables = sections(md)
    titles = [t for t in tables if t in TABLE_TITLES]
    assert titles == TABLE_TITLES  # every table, in the paper's order
    for t in TABLE_TITLES:
        first = tables[t][0]
        assert first.startswith("fed by: ") or (first.startswith("Missing: ") and len(tables[t]) == 1), (t, first)
    for t in ("Amazon: ID and OOD accuracy (Table 10)", "Amazon: feature and head change, ID and OOD (Table 11)",
              "PubMed 20k RCT: test accuracy (Table 16)"):  # an OOD-free study: one line each, never vanishing
        assert tables[t] == [tables[t][0]] and tables[t][0].startswith("Missing: no ")
    assert tables[TABLE_TITLES[1]][0].startswith("fed by: 10 runs (cb; LP, FT, LP-FT, LoRA, LP-LoRA; seeds 1, 2)")

    # Table 1: Pre-trained = epoch 0 of the fine-tuning runs (CS 0.9, FDR 0.1 and 50) with the fresh head (0.02); LP:
    # the same features and the LP heads (2, 4: mean 3, std sqrt 2); LP-FT at its best epoch (Diff 0.1, 0.3)
    t1 = "\n".join(tables[TABLE_TITLES[1]])
    assert "| cb Pre-trained | 0.9 ± 0 | – | 0.1 ± 0 | 50 ± 0 | 0.02 ± 0 |" in t1
    assert "| cb LP | 0.9 ± 0 | – | 0.1 ± 0 | 50 ± 0 | 3 ± 1.41 |" in t1
    assert "| cb LP-FT | 0.8 ± 0 | 0.2 ± 0.141 | 0.2 ± 0 | 80 ± 0 | 1 ± 0 |" in t1
    # Tables 3/14: Imp. = w/o TS − w/ TS; ECE 9 ± 1.41 -> 3.5 ± 0.71 improves by 5.5, MCE 25 -> 8 by 17
    t3 = "\n".join(tables[TABLE_TITLES[3]])
    assert "| cb ECE LP-FT | 9.00 ± 1.41 | 3.50 ± 0.71 | 5.50 | 1.500 | lbfgs |" in t3
    assert "| cb MCE LP-FT | 25.00 ± 7.07 | 8.00 ± 2.83 | 17.00 | 1.500 | lbfgs |" in t3
    # Tables 2/9: Pre-train E once, then F and P+F per method; FT ratio on the F row (0.9, 1.0)
    t2 = "\n".join(tables[TABLE_TITLES[2]])
    assert "| cb | Pre-train E (P) | 6 | 18 ± 0 | 3 ± 0 |" in t2  # (G + 1) x I_3 of 6 examples: full rank
    assert "| cb LP-FT | FT E (F) | 6 | 5 ± 0 | 3 ± 0 |" in t2 and "| 90.0 ± 0.0 | 60.0 ± 0.0 | 0.95 ± 0.0707 |" in t2
    assert t2.count("NTK (P+F)") == 4
    # Table 13: the fresh head, then each method's head norm after training
    assert "| cb | 0.02 ± 0 | 1 ± 0 | 1 ± 0 | 3 ± 1.41 | 1 ± 0 | 1 ± 0 |" in "\n".join(tables[TABLE_TITLES[7]])
    # LP's C: the margin read back from lp_results.json's cv; a run without one shows –
    cv = "\n".join(tables["LP's choice of C: the cross-validation margin"])
    assert "| cb | 1 | log_loss | 0.5 | 0.5000 | 2 | 0.5200 | 0.0200 |" in cv
    assert "| cb | 2 | – | 0.5 | – | – | – | – |" in cv

    figures = sections(md.split("\n## Figures\n")[1], "### ")
    for key, files in FIGURE_FILES.items():
        (title, lines), = [(t, v) for t, v in figures.items() if t.startswith(key)]
        assert lines[0].startswith("fed by: "), title
        for f in files:
            assert f"![{f[:-4]}]({f})" in lines and (tmp_path / f).stat().st_size > 5000, f
    assert "Missing" not in next(v for t, v in figures.items() if t.startswith("Figures 1 and 4"))[-1]
    tsne = next(v for t, v in figures.items() if t.startswith("Figures 5 and 6"))
    assert "Missing" not in tsne[-1]  # every method's panel: the fine-tuned features are in features.npz
    study = report.collect(tmp_path)
    report.build(study)
    panels, gaps, used = report_figs.tsne_panels(study, "cb")
    assert [p[0] for p in panels] == [f"cb {n} (seed 1)" for n in (
        "pre-trained, LP head", "FT, after training", "LoRA, after training", "LP-FT, after training",
        "LP-LoRA, after training")]
    ft_dir = next(r["dir"] for r in used if r["method"] == "ft")
    z = np.load(f"{ft_dir}/features.npz")
    assert np.array_equal(panels[1][1], z["test_phi"])  # FT's own features
    # FT's head rows at the start (features.npz) and after training (model.safetensors), embedded with its features
    (w0_when, _, w0), (w_when, _, w) = panels[1][3]
    assert (w0_when, w_when) == ("start", "after") and np.array_equal(w0, z["head0"])
    assert np.array_equal(w, report_figs.head_rows(next(r for r in used if r["method"] == "ft")))
    x, _, spans = report_figs.tsne_points(*panels[1][1:])
    assert [(when, at, n) for when, _, at, n in spans] == [("start", N_TEST, C), ("after", N_TEST + C, C)]
    assert np.array_equal(x, np.concatenate([z["test_phi"], w0, w]))
    cached = np.random.default_rng(0).normal(size=(N_TEST, D)).astype(np.float32)  # tiny_study's phi, as LP saved it
    assert np.array_equal(panels[0][1], cached) and not gaps  # the LP panel: the LP run's pre-trained features
    for f in (tmp_path / "cb").glob("lp-seed*/features.npz"):
        f.unlink()  # an LP run without features.npz: the start features a fine-tuning run saved
    panels, gaps, _ = report_figs.tsne_panels(study, "cb")
    phi0 = np.load(f"{ft_dir}/features.npz")["test_phi0"]
    assert np.array_equal(panels[0][1], phi0) and not np.array_equal(phi0, cached) and len(panels) == 5 and not gaps

    # runs made before features.npz held head0: LP-FT's start is the lp_head.pt its run record names by content
    # (init_sha256); FT's fresh head was not saved, so its panel keeps the rows after training and says so
    lp_ft = next(r for r in used if r["method"] == "lp_ft")
    for r in (lp_ft, next(r for r in used if r["method"] == "ft")):
        z = dict(np.load(Path(r["dir"]) / "features.npz"))
        np.savez(Path(r["dir"]) / "features.npz", **{k: v for k, v in z.items() if k != "head0"})
    lp_head = tmp_path / "cb" / f"lp-seed{lp_ft['seed']}" / "lp_head.pt"
    lp_ft["config"]["init_sha256"] = rundir.file_sha256(lp_head)
    panels, gaps, _ = report_figs.tsne_panels(study, "cb")
    assert [when for when, _, _ in panels[1][3]] == ["after"]
    assert gaps == ["cb FT: its head rows at the start (features.npz has no head0: a run made before the kit saved "
                    "them); the panel shows them after training only"]
    import torch

    (_, _, w0), _ = panels[3][3]
    assert np.array_equal(w0, torch.load(lp_head, weights_only=True)["weight"].numpy())


def test_trace_norm_heat_map_is_the_nuclear_norm_of_each_block():
    rng = np.random.default_rng(1)
    labels = np.array([2, 0, 1, 0, 2, 1])
    P, F = kernels(rng, labels)
    tn, y = report_figs.trace_norms(F, labels)
    order = [1, 3, 2, 5, 0, 4]  # the samples grouped by class, in their order within a class
    assert y.tolist() == [0, 0, 1, 1, 2, 2]
    for a in range(6):
        for b in range(6):
            assert tn[a, b] == pytest.approx(np.linalg.norm(F[order[a], :, order[b], :], "nuc"))
    # P's blocks are (<phi, phi'> + 1) I_C: trace norm C |<phi, phi'> + 1|
    tp, _ = report_figs.trace_norms(P, labels)
    assert tp[0, 2] == pytest.approx(C * abs(P[1, 0, 2, 0]))
    means = report_figs.block_means(tn, y)  # the number printed in each class block: its mean over the pairs
    assert means[(0, 1)] == pytest.approx(np.mean([tn[i, j] for i in (0, 1) for j in (2, 3)]))
    assert means[(2, 2)] == pytest.approx(np.mean(tn[4:, 4:]))


def test_tables_and_figures_without_their_runs_say_so_in_one_line(tmp_path):
    for seed in (1, 2):  # fine-tuning only: no LP, eNTK, calibration or head scaling
        write_run(tmp_path, "sst2", "ft", seed, 1e-4, val=0.8, test=0.8)
    md = report.main(["--root", str(tmp_path)])
    tables = sections(md)
    for t in ("eNTK at the start of fine-tuning: kernel statistics (Tables 2, 9)",
              "Calibration on test: ECE and MCE with temperature scaling (Tables 3, 14, 15)",
              "Norm scaling: initial head norm vs feature change (Figures 3, 11)"):
        assert len(tables[t]) == 1 and tables[t][0].startswith("Missing: "), t
    figures = sections(md.split("\n## Figures\n")[1], "### ")
    for key in ("Figures 2 and 7", "Figures 3 and 11", "Figures 5 and 6", "Figures 8 and 9", "Figure 10"):
        lines = next(v for t, v in figures.items() if t.startswith(key))
        assert len(lines) == 1 and lines[0].startswith("Missing: "), key
    assert next(v for t, v in figures.items() if t.startswith("Figures 1"))[-1].endswith("Missing: LP runs (lp.py).")
    assert "Missing: sst2: no LP run; sst2 FT: features.npz missing or damaged (a run made before the kit saved " \
        "it?)." in md


def test_a_damaged_kernel_file_is_named_not_fatal(tmp_path):
    tiny_study(tmp_path, seeds=(1,))
    (tmp_path / "cb/ntk-ft-seed1/kernels.npz").write_bytes(b"not a zip")
    md = report.main(["--root", str(tmp_path)])
    heat = md.split("### Figures 8 and 9")[1]
    assert "Missing: cb/ntk-ft-seed1/kernels.npz (missing or damaged)." in heat  # the other methods still drawn
    assert (tmp_path / "ntk_trace_norm_cb.png").exists()


def amazon_run(root, seed, diff, scale=1.0, splits=("test", "val", "dynasent", "semeval", "sst5")):
    """An Amazon FT run whose feature statistics differ by split: split i (from 1) has CS 0.1 i, FDR 0.2 i and
    Diff(F) diff x i at its best epoch (0 at the start)."""
    d = write_run(root, "amazon", "ft", seed, 1e-4, val=0.8, test=0.8, diff=diff, scale=scale,
                  extra={"dynasent": 0.6, "semeval": 0.6, "sst5": 0.6})
    res = json.loads((d / "results.json").read_text())
    for h, moved in zip(res["history"], (0.0, 1.0)):
        h["features"] = {sp: {"diff_f": moved * diff * i, "cs_f": 0.1 * i, "fdr_f": 0.2 * i}
                         for i, sp in enumerate(splits, 1)}
        h |= h["features"]["test"]
    (d / "results.json").write_text(json.dumps(res))
    return d


def test_table_11_reads_the_feature_statistics_of_every_ood_set(tmp_path):
    for seed, diff in ((1, 2.0), (2, 4.0)):
        amazon_run(tmp_path, seed, diff)
    md = report.main(["--root", str(tmp_path)])
    t11 = sections(md)["Amazon: feature and head change, ID and OOD (Table 11)"]
    assert t11[0].startswith("fed by: 2 runs (amazon; FT; seeds 1, 2)")
    # SST-5 is split 5: CS 0.5, Diff(F) 5 x (2, 4) = 10 and 20 (mean 15, std 7.07), FDR 1; Pre-trained at epoch 0
    # runs made before the kit recorded tr(S_W^+ S_B): that column is –, never a crash
    assert "| amazon (sst5) Pre-trained | 0.5 ± 0 | – | 1 ± 0 | – | 0.02 ± 0 |" in t11
    assert "| amazon (sst5) FT | 0.5 ± 0 | 15 ± 7.07 | 1 ± 0 | – | 1 ± 0 |" in t11
    assert "| amazon (dynasent) FT | 0.3 ± 0 | 9 ± 4.24 | 0.6 ± 0 | – | 1 ± 0 |" in t11
    assert "| amazon FT | 0.1 ± 0 | 3 ± 1.41 | 0.2 ± 0 | – | 1 ± 0 |" in t11  # the ID test split (split 1)
    fig10 = next(v for t, v in sections(md.split("\n## Figures\n")[1], "### ").items() if t.startswith("Figure 10"))
    assert fig10[0].startswith("fed by: 2 runs (amazon; FT; seeds 1, 2)") and "Missing" not in fig10[-1]
    assert (tmp_path / "feature_change_amazon_splits.png").stat().st_size > 5000


def test_figure_10_needs_amazon_runs_with_their_ood_sets(tmp_path):
    """Figure 10's panels are Amazon's test sets: each split's own Diff(F), at the initial head norm; Amazon runs
    of an older kit (test's statistics only) give one line saying so."""
    for seed in (1, 2):
        amazon_run(tmp_path, seed, 2.0, splits=("test", "val"))
    s = report.collect(tmp_path)
    report.build(s)
    title, fed, paths, note = report_figs.fig_amazon_splits(s)
    assert paths is None and note.startswith("Missing: the Amazon runs recorded no OOD set's feature statistics")
    ax = report_figs.pyplot().figure().gca()  # one split's panel: FT's Diff(F) on it against its initial head norm
    report_figs.scaling_curve(ax, "ft", {1.0: s.runs("amazon", "ft")}, "val", mark=False)
    (line,) = ax.lines
    assert line.get_xdata().tolist() == [0.02] and line.get_ydata().tolist() == [4.0]  # val: split 2, 2 x 2.0


def test_figure_3_marks_the_head_norm_after_training(tmp_path):
    """Figure 3's dashed line: the unscaled runs' mean ||V|| after training (their best epoch), not at the start."""
    for seed, norm in ((1, 3.0), (2, 5.0)):
        write_run(tmp_path, "cb", "ft", seed, 1e-4, val=0.7, test=0.7, norm=norm)
        write_run(tmp_path, "cb", "ft", seed, 1e-4, val=0.7, test=0.7, norm=norm, scale=10)
    s = report.collect(tmp_path)
    ax = report_figs.pyplot().figure().gca()
    report_figs.scaling_curve(ax, "ft", s.scaling_groups()[("cb", "ft")], "test")
    curve, dashed = ax.lines
    assert curve.get_xdata().tolist() == pytest.approx([0.02, 0.2])  # the initial norms, scale 1 and 10
    assert dashed.get_linestyle() == "--" and list(dashed.get_xdata()) == [4.0, 4.0]  # mean of 3 and 5


def test_norm_scaling_reads_amazon_on_sst5(tmp_path):
    """The paper's Figure 3: Amazon's models measured on SST-5, in the table, the figure and claim c6 alike; a run
    without SST-5's statistics is a missing value there (n=k), never a crash."""
    for seed in (1, 2):
        amazon_run(tmp_path, seed, 2.0)  # scale 1: Diff(F) on SST-5 = 10, on test = 2
        amazon_run(tmp_path, seed, 0.5, scale=10)  # scale 10: 2.5 on SST-5, 0.5 on test
    md = report.main(["--root", str(tmp_path)])
    assert "| amazon FT | 10 | 0.200 | sst5 | 2.500 ± 0.000 |" in md
    assert "| amazon FT | 1 | 0.020 | sst5 | 10.000 ± 0.000 |" in md
    assert "Diff(F) at head scale 1 − at 10, FT (on sst5) | +7.5" in md
    shutil.rmtree(next((tmp_path / "amazon").glob("ft-*scale10*-seed2")))
    amazon_run(tmp_path, 2, 0.5, scale=10, splits=("test", "val"))  # a run without the OOD sets' statistics
    md = report.main(["--root", str(tmp_path)])
    assert "| amazon FT | 10 | 0.200 | sst5 | 2.500 (n=1) |" in md
    assert "| amazon FT | 1 | 0.020 | sst5 | 10.000 ± 0.000 |" in md
    assert "Diff(F) at head scale 1 − at 10, FT (on sst5) | +7.5 (n=1, no interval)" in md
    assert (tmp_path / "feature_change_vs_norm.png").exists()


def test_damaged_lp_curves_leave_the_run_out_instead_of_crashing(tmp_path, capsys):
    tiny_study(tmp_path)
    for seed, key in ((1, "norm_curve"), (2, "norm_curve_test_accuracy")):
        f = tmp_path / "cb" / f"lp-seed{seed}" / "lp_results.json"
        f.write_text(json.dumps(json.loads(f.read_text()) | {key: [None, "x"]}))
    md = report.main(["--root", str(tmp_path)])
    err = capsys.readouterr().err
    for seed, key in ((1, "norm_curve"), (2, "norm_curve_test_accuracy")):
        assert f"cb/lp-seed{seed}/lp_results.json: {key} is not a list of numbers" in err
    assert "## Figures" in md  # the report is still written, the figures included


# ---------------------------------------------------------------- files only; older layouts are named, not read
def test_report_and_its_figures_import_no_stage_script():
    import ast

    for name in ("report.py", "report_figs.py"):
        tree = ast.parse((ROOT / name).read_text())
        mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not mods & {"lp", "ft", "lora", "ntk", "calibrate"}, (name, mods)


def test_older_layouts_are_listed_not_used(tmp_path):
    """Files of an older kit's layout (no per-split feature statistics, no ntk_method or kernel, no calibration
    optimizer) and a prompt-based kernel are each named under Runs not used; the current runs are still reported."""
    for seed in (1, 2):
        write_run(tmp_path, "cb", "ft", seed, 1e-4, val=0.7, test=0.7)
    old = write_run(tmp_path, "cb", "lp_ft", 1, 1e-4, val=0.7, test=0.7)
    res = json.loads((old / "results.json").read_text())
    for h in res["history"]:
        del h["features"]
    (old / "results.json").write_text(json.dumps(res))
    write_calibration(tmp_path / "cb/ft-lr0.0001-scale1.0-seed1", (8.0, 3.0), (20.0, 6.0))
    cal = tmp_path / "cb/ft-lr0.0001-scale1.0-seed2/calibration.json"
    write_calibration(cal.parent, (8.0, 3.0), (20.0, 6.0))
    cal.write_text(json.dumps({k: v for k, v in json.loads(cal.read_text()).items() if k != "optimizer"}))
    rng = np.random.default_rng(0)
    for name, drop, method in (("ntk-ft-seed1", "ntk_method", "ft"), ("ntk-lp_ft-seed1", "kernel", "lp_ft"),
                               ("ntk-prompt_ft-seed1", None, "prompt_ft")):
        write_ntk(tmp_path, method, 1, 0.3, rng, np.arange(N_KERNEL) % C)
        f = tmp_path / "cb" / name / "ntk_results.json"
        k = json.loads(f.read_text())
        k["config"].pop(drop, None)
        f.write_text(json.dumps(k))
    md = report.main(["--root", str(tmp_path)])
    section = md.split("## Runs not used")[1].split("\n## ")[0]
    for path, why in (("cb/lp_ft-lr0.0001-scale1.0-seed1/results.json", "the best epoch's features.test"),
                      ("cb/ft-lr0.0001-scale1.0-seed2/calibration.json", "not the layout calibrate.py writes"),
                      ("cb/ntk-ft-seed1/ntk_results.json", "no ntk_method or kernel in its config"),
                      ("cb/ntk-lp_ft-seed1/ntk_results.json", "no ntk_method or kernel in its config"),
                      ("cb/ntk-prompt_ft-seed1/ntk_results.json", "a prompt-based run (--prompt)")):
        assert f"- `{path}`: {why}" in section, path
    assert "| cb | 70.0 ± 0.0 |" in md  # FT's two seeds are still reported
    assert "| cb ECE FT | 8.00 (n=1) | 3.00 (n=1) | 5.00 | 1.500 | lbfgs |" in md  # the current calibration.json
    assert "## eNTK at the start of fine-tuning: kernel statistics (Tables 2, 9)\n\nMissing: " in md
