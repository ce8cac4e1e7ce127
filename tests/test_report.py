"""report.py on hand-made results files: selection on val, failed points, paired intervals, tables."""

import json

import pytest

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
    assert "| cb FT | 0.001 | 90.0 | 90.0 ± 0.0 | 1/2 | failed |" in md
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
    assert "LP-FT changes features less than FT (Diff(F) 0.1000 vs 0.8000): yes" in md
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
