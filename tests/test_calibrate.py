"""calibrate.py: ECE/MCE by hand, temperature recovery with both optimisers, end to end on a synthetic run dir."""

import json

import numpy as np
import pytest

import calibrate as cal


def sample(rng, logits, T=1.0):
    """Labels drawn from softmax(logits / T)."""
    p = cal.softmax(logits, T)
    return (p.cumsum(1) < rng.random((len(p), 1))).sum(1)


def write_run(path, splits):
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "logits.npz", "wb") as f:
        np.savez(f, **{f"{s}_{k}": v for s, (z, y) in splits.items() for k, v in (("logits", z), ("labels", y))})
    return path


def synthetic_run(path, rng, n=3000, C=3, T_star=3.0, ood=("sst5",)):
    """Overconfident run: labels drawn from softmax(z / T_star), logits z as saved."""
    splits = {}
    for s in ("train", "val", "test", *ood):
        z = rng.normal(0, 2, (n, C)).astype(np.float32)
        splits[s] = (z, sample(rng, z, T_star).astype(np.int64))
    return write_run(path, splits)


# ---------------------------------------------------------------- ECE / MCE by hand
def test_ece_mce_binary_by_hand_with_the_edge_rule():
    # bins=4 -> edges 0, .25, .5, .75, 1 (exact in binary); a bin holds lower < conf <= upper.
    probs = np.array([[0.5, 0.5],     # pred 0 (first of a tie), conf .5  -> bin (.25,.5]  (edge: lower bin); y 0 right
                      [0.25, 0.75],   # pred 1, conf .75                 -> bin (.5,.75]  (edge: lower bin); y 0 wrong
                      [0.8, 0.2],     # pred 0, conf .8                  -> bin (.75,1];  y 0 right
                      [0.1, 0.9]])    # pred 1, conf .9                  -> bin (.75,1];  y 1 right
    labels = np.array([0, 0, 0, 1])
    # bin (0,.25] empty (skipped); (.25,.5]: n 1, acc 1, conf .5 -> gap .5; (.5,.75]: n 1, acc 0, conf .75 -> gap .75;
    # (.75,1]: n 2, acc 1, conf .85 -> gap .15.  ECE = (.5 + .75 + 2 * .15) / 4 = .3875; MCE = .75.
    # (Edges in the upper bin instead would give ECE (.5 + 3 * .15) / 4 = 23.75% and MCE 50%.)
    ece, mce = cal.ece_mce(probs, labels, bins=4)
    assert ece == pytest.approx(38.75)
    assert mce == pytest.approx(75.0)
    n, acc, conf = cal.bin_stats(probs, labels, bins=4)
    assert n.tolist() == [0, 1, 1, 2] and np.isnan(acc[0]) and np.isnan(conf[0])


def test_ece_mce_multiclass_by_hand_with_empty_bins():
    probs = np.array([[0.4, 0.3, 0.3],     # conf .4 -> bin (.25,.5]; pred 0, y 1 wrong
                      [0.25, 0.25, 0.5],   # conf .5 -> bin (.25,.5] (upper edge); pred 2, y 2 right
                      [1.0, 0.0, 0.0]])    # conf 1  -> bin (.75,1] (upper edge of the last bin); y 0 right
    labels = np.array([1, 2, 0])
    # bins (0,.25] and (.5,.75] empty, skipped; (.25,.5]: n 2, acc .5, conf .45 -> gap .05; (.75,1]: gap 0.
    # ECE = 2 * .05 / 3 = 3.333%; MCE = 5% (empty bins do not count).
    ece, mce = cal.ece_mce(probs, labels, bins=4)
    assert ece == pytest.approx(100 / 30)
    assert mce == pytest.approx(5.0)
    # NLL = -(log .3 + log .5 + log 1) / 3; Brier = ((.4^2 + .7^2 + .3^2) + (.25^2 * 2 + .5^2) + 0) / 3
    assert cal.nll(probs, labels) == pytest.approx(-(np.log(0.3) + np.log(0.5)) / 3)
    assert cal.brier(probs, labels) == pytest.approx((0.16 + 0.49 + 0.09 + 0.125 + 0.25) / 3)


def test_perfectly_calibrated_sample_has_ece_near_zero():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (200_000, 3))
    ece, mce = cal.ece_mce(cal.softmax(z), sample(rng, z), 15)
    assert ece < 0.5
    over = cal.ece_mce(cal.softmax(z), sample(rng, z, 3.0), 15)[0]  # the same logits, labels from softmax(z / 3)
    assert over > 10


# ---------------------------------------------------------------- temperature scaling
@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
@pytest.mark.parametrize("T_star", [0.5, 2.0])
def test_fit_recovers_the_temperature(optimizer, T_star):
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, (20_000, 3))
    y = sample(rng, z, T_star)
    T, info = cal.fit_temperature(z, y, optimizer)
    assert T == pytest.approx(T_star, rel=0.05)
    assert info["converged"] and info["optimizer"] == optimizer and info["steps"] > 0
    assert info["nll_after"] < info["nll_before"]


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_temperature_positive_and_val_nll_never_rises(optimizer):
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 500)
    separated = np.eye(3)[y] * 5  # every val example right with margin: NLL falls all the way to T -> 0
    wrong = np.eye(3)[(y + 1) % 3] * 5  # every one wrong: NLL falls towards T -> infinity
    calibrated = rng.normal(0, 2, (500, 3))
    for z in (separated, wrong, calibrated, sample_logits(rng, y)):
        for max_steps in (3, 2000):
            T, info = cal.fit_temperature(z, y, optimizer, max_steps=max_steps)
            assert 0 < T < np.inf
            assert info["nll_after"] <= info["nll_before"] + 1e-12
            after = cal.nll(cal.softmax(z, T), y)
            assert after <= cal.nll(cal.softmax(z), y) + 1e-12
    T, info = cal.fit_temperature(separated, y, optimizer)
    assert T < 0.3 and not info["converged"] and "T -> 0" in info["note"]
    T, info = cal.fit_temperature(wrong, y, optimizer, max_steps=2000)
    assert T > 1 and not info["converged"] and "T -> inf" in info["note"]


def sample_logits(rng, y):
    """Noisy logits favouring the right class (a typical trained classifier)."""
    return rng.normal(0, 1, (len(y), 3)) + 3 * np.eye(3)[y]


def test_adam_says_when_it_did_not_converge():
    rng = np.random.default_rng(3)
    z = rng.normal(0, 2, (1000, 3))
    T, info = cal.fit_temperature(z, sample(rng, z, 3.0), "adam", max_steps=5)
    assert not info["converged"] and info["steps"] == 5 and "max_steps" in info["note"]
    assert T > 1  # moved the right way


# ---------------------------------------------------------------- end to end
def test_main_end_to_end(tmp_path, capsys):
    rng = np.random.default_rng(4)
    a = synthetic_run(tmp_path / "rte" / "lp-seed1", rng, C=3, T_star=3.0)
    b = synthetic_run(tmp_path / "sst2" / "ft-seed1", rng, C=2, T_star=0.7, ood=())
    res = cal.main([str(a), str(b)])
    assert list(res) == [str(a), str(b)]
    for run, T_star, splits in ((a, 3.0, ["val", "test", "sst5"]), (b, 0.7, ["val", "test"])):
        saved = json.loads((run / "calibration.json").read_text())
        assert saved == json.loads(json.dumps(res[str(run)]))
        assert list(saved["splits"]) == splits  # train is not reported
        assert saved["temperature"] == pytest.approx(T_star, rel=0.1) and saved["converged"]
        assert saved["optimizer"] == "lbfgs" and saved["steps"] > 0
        for s in splits:
            m = saved["splits"][s]
            assert set(m["before"]) == set(m["after"]) == {"accuracy", "nll", "brier", "ece", "mce"}
            assert m["after"]["accuracy"] == m["before"]["accuracy"]  # dividing by T keeps the argmax
            if s != "val":
                assert m["after"]["ece"] < m["before"]["ece"] and m["after"]["nll"] < m["before"]["nll"]
                png = (run / f"reliability_{s}.png").read_bytes()
                assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
        assert not (run / "reliability_val.png").exists() and not list(run.glob(".*tmp"))
    out = capsys.readouterr().out
    assert "rte/lp-seed1" in out and "sst2/ft-seed1" in out and "sst5" in out


def test_main_adam_no_plots_and_warning(tmp_path, capsys):
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 200)
    run = write_run(tmp_path / "run", {"val": (np.eye(2)[y].astype(np.float32) * 4, y),
                                       "test": (rng.normal(0, 1, (50, 2)).astype(np.float32), y[:50])})
    res = cal.main([str(run), "--optimizer", "adam", "--no_plots", "--bins", "10"])[str(run)]
    assert res["optimizer"] == "adam" and res["bins"] == 10 and not res["converged"]
    assert not list(run.glob("*.png"))
    out = capsys.readouterr().out
    assert "did not converge" in out and "*" in out


def test_rerun_skips_up_to_date_runs_and_refits_new_logits(tmp_path, capsys):
    rng = np.random.default_rng(6)
    run = synthetic_run(tmp_path / "run", rng, n=500, T_star=2.0, ood=())
    first = cal.main([str(run), "--no_plots"])[str(run)]
    stamp = (run / "calibration.json").stat().st_mtime_ns
    assert cal.main([str(run), "--no_plots"])[str(run)] == json.loads(json.dumps(first))
    assert (run / "calibration.json").stat().st_mtime_ns == stamp and "up to date" in capsys.readouterr().out
    assert cal.main([str(run), "--no_plots", "--bins", "10"])[str(run)]["bins"] == 10  # other settings: refit
    synthetic_run(run, rng, n=500, T_star=0.5, ood=())  # retrained run: new logits.npz
    assert cal.main([str(run), "--no_plots", "--bins", "10"])[str(run)]["temperature"] == pytest.approx(0.5, rel=0.2)
    stamp = (run / "calibration.json").stat().st_mtime_ns
    cal.main([str(run), "--no_plots", "--bins", "10", "--overwrite"])
    assert (run / "calibration.json").stat().st_mtime_ns > stamp
    assert "up to date" not in capsys.readouterr().out


# ---------------------------------------------------------------- bad input
def bad_runs(rng):
    z, y = rng.normal(0, 1, (20, 3)).astype(np.float32), rng.integers(0, 3, 20)
    nan, inf = z.copy(), z.copy()
    nan[3, 1], inf[0, 0] = np.nan, np.inf
    return {
        "mismatch": {"val": (z, y), "test": (z, y[:19])},
        "NaN or infinite": {"val": (z, y), "test": (nan, y)},
        "NaN or infinite ": {"val": (inf, y), "test": (z, y)},
        "empty": {"val": (z, y), "test": (z[:0], y[:0])},
        "out of range": {"val": (z, y), "test": (z, np.where(y == 0, 3, y))},
        "out of range ": {"val": (z, np.where(y == 0, -1, y)), "test": (z, y)},
        "no val_logits": {"test": (z, y)},
    }


@pytest.mark.parametrize("problem", list(bad_runs(np.random.default_rng(0))))
def test_bad_input_is_a_one_line_error(tmp_path, problem):
    run = write_run(tmp_path / "run", bad_runs(np.random.default_rng(0))[problem])
    with pytest.raises(SystemExit) as e:
        cal.main([str(run), "--no_plots"])
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg
    assert str(run / "logits.npz") in msg and problem.strip() in msg


def test_missing_or_unreadable_logits(tmp_path):
    with pytest.raises(SystemExit, match="logits.npz: not found"):
        cal.main([str(tmp_path)])
    (tmp_path / "logits.npz").write_text("not a zip")
    with pytest.raises(SystemExit, match="logits.npz: cannot read"):
        cal.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="--bins 0"):
        cal.main([str(tmp_path), "--bins", "0"])


@pytest.mark.parametrize("saved", ["[]", '{"splits": 5}', "{truncated",
                                   '{"temperature": 1, "converged": true, "splits": {"test": 1}}'])
def test_malformed_calibration_json_is_refit(tmp_path, saved):
    run = synthetic_run(tmp_path / "run", np.random.default_rng(7), n=300, ood=())
    (run / "calibration.json").write_text(saved)  # newer than logits.npz, so only its shape can say it is stale
    res = cal.main([str(run), "--no_plots"])[str(run)]
    assert json.loads((run / "calibration.json").read_text())["temperature"] == res["temperature"]


def test_every_run_is_checked_before_any_is_written(tmp_path):
    rng = np.random.default_rng(8)
    good = synthetic_run(tmp_path / "good", rng, n=300, ood=())
    bad = write_run(tmp_path / "bad", {"test": (rng.normal(0, 1, (20, 3)), rng.integers(0, 3, 20))})  # no val
    with pytest.raises(SystemExit, match="no val_logits"):
        cal.main([str(good), str(bad), "--no_plots"])
    assert not (good / "calibration.json").exists()
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit, match="is a file"):
        cal.main([str(good), str(f), "--no_plots"])
    assert not (good / "calibration.json").exists() and f.read_text() == "x"
