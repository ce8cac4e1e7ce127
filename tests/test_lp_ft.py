"""lp.py and ft.py end to end on real data with the embedded model (small slices)."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import ft
import lp

FAST = ["--max_train_samples", "32", "--max_eval_samples", "16", "--eval_batch_size", "32"]


@pytest.fixture(scope="module")
def cb_lp(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("cb_lp")
    res = lp.main(["--task", "cb", "--output_dir", str(out), "--cache_dir", str(out / "cache"), "--norm_curve", "20",
                   *FAST])
    return out, res


def test_lp_records_norm_and_test_accuracy_along_its_curve(cb_lp):
    """Figure 1 (a): ||V|| and the test accuracy of each LBFGS iterate from a zero head, which predicts class 0."""
    out, res = cb_lp
    acc, y = res["norm_curve_test_accuracy"], np.load(out / "logits.npz")["test_labels"]
    assert len(acc) == len(res["norm_curve"]) == 21 and acc[0] == np.mean(y == 0)
    assert all(0 <= a <= 1 for a in acc) and res["norm_curve"][-1] > 0


@pytest.fixture(scope="module")
def sst2_small(tmp_path_factory, data_dir):
    """Real SST-2: the first 2,700 training sentences (train 2,430 / val 270) and the full dev set as test."""
    d = tmp_path_factory.mktemp("sst2") / "glue/SST-2"
    d.mkdir(parents=True)
    lines = (data_dir / "glue/SST-2/train.tsv").read_text().splitlines(keepends=True)
    (d / "train.tsv").write_text("".join(lines[:2701]))
    shutil.copy(data_dir / "glue/SST-2/dev.tsv", d / "dev.tsv")
    return d.parents[1]


@pytest.mark.parametrize("pooling,floor", [("cls", 0.70), ("mean", 0.75)])
def test_lp_sst2_accuracy(sst2_small, tmp_path, pooling, floor):
    res = lp.main(["--task", "sst2", "--data_dir", str(sst2_small), "--max_train_samples", "2000",
                   "--pooling", pooling, "--output_dir", str(tmp_path), "--cache_dir", str(tmp_path / "c")])
    assert res["metrics"]["test"]["accuracy"] >= floor
    assert res["max_prob_gap_vs_sklearn"] < 1e-5


def test_lp_head_file_and_torch_head_matches_sklearn(cb_lp):
    out, res = cb_lp
    h = torch.load(out / "lp_head.pt", weights_only=True)
    assert h["weight"].shape == (3, 384) and h["bias"].shape == (3,) and h["task"] == "cb"
    assert h["labels"] == ["entailment", "contradiction", "neutral"] and h["C"] == res["C"]
    assert abs(float(h["weight"].norm()) - res["head_norm"]) < 1e-5
    assert res["max_prob_gap_vs_sklearn"] < 1e-5
    z = np.load(out / "logits.npz")
    assert z["test_logits"].shape == (16, 3) and z["test_labels"].dtype == np.int64


def test_cv_margin_is_read_back_and_is_the_cross_validation(cb_lp):
    """lp_results.json's cv: the mean CV log loss of every C, the chosen C's (the least: scikit-learn's choice) and
    the runner-up's; the chosen one recomputed by hand, fold by fold, on the cached train features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedKFold

    out, _ = cb_lp
    res = json.loads((out / "lp_results.json").read_text())
    cv = res["cv"]
    assert cv["scoring"] == "log_loss" and len(cv["scores"]) == len(lp.CS) == 10
    best = int(np.argmin(cv["scores"]))
    assert cv["Cs"][best] == pytest.approx(res["C"]) and cv["chosen_score"] == cv["scores"][best]
    assert cv["runner_up_C"] != res["C"] and cv["runner_up_score"] == sorted(cv["scores"])[1]
    assert cv["margin"] == pytest.approx(cv["runner_up_score"] - cv["chosen_score"])
    x = np.load(next((out / "cache").rglob("train_*.npy")))
    y = np.load(out / "logits.npz")["train_labels"]
    losses = []
    for tr, va in StratifiedKFold(res["cv_folds"] or lp.MAX_FOLDS).split(x, y):
        clf = LogisticRegression(C=res["C"], max_iter=5000).fit(x[tr], y[tr])
        losses.append(log_loss(y[va], clf.predict_proba(x[va]), labels=[0, 1, 2]))
    assert np.mean(losses) == pytest.approx(cv["chosen_score"], rel=1e-3)  # lbfgs stops at its tolerance


def test_lp_rerun_skips_and_other_task_refuses(cb_lp, capsys):
    out, res = cb_lp
    again = lp.main(["--task", "cb", "--output_dir", str(out), "--cache_dir", str(out / "cache"), "--norm_curve", "20",
                     *FAST])
    assert again == res and "already fit" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="holds a head for another setting"):
        lp.main(["--task", "rte", "--output_dir", str(out), "--cache_dir", str(out / "cache")])


def test_lp_ft_starts_exactly_at_lp(cb_lp, tmp_path):
    out, res = cb_lp
    r = ft.main(["--init", str(out / "lp_head.pt"), "--max_steps", "1", "--output_dir", str(tmp_path), *FAST])
    assert r["config"]["method"] == "lp_ft" and r["config"]["task"] == "cb"
    for s in ("val", "test"):
        assert r["history"][0][s]["accuracy"] == res["metrics"][s]["accuracy"]
    assert r["history"][0]["head_norm"] == pytest.approx(res["head_norm"], rel=1e-6)
    assert r["history"][0]["diff_f"] == 0


def test_embedded_head_fits_its_own_directory_and_lp_saves_features(cb_lp, tmp_path):
    """The embedded model by name or by its directory (any path to it) is one model: its head is accepted either way,
    another model's directory is refused. LP and LP-FT save the same pre-trained test features (report.py's t-SNE)."""
    out, _ = cb_lp
    emb = data.resolve_model(None)
    (tmp_path / "link").symlink_to(emb)
    assert data.model_id(emb) == data.model_id(str(tmp_path / "link")) == data.model_id(emb + "/") == data.EMBEDDED
    r = ft.main(["--init", str(out / "lp_head.pt"), "--model", emb, "--max_steps", "1", "--output_dir",
                 str(tmp_path / "ft"), *FAST])
    assert r["config"]["model"] == data.EMBEDDED and r["config"]["lr_table"] == "minilm"
    a, b = np.load(out / "features.npz"), np.load(tmp_path / "ft" / "features.npz")
    assert a["test_phi0"].shape == (16, 384) and a["test_phi0"].dtype == np.float32
    assert np.array_equal(a["test_phi"], a["test_phi0"]) and a["test_labels"].dtype == np.int64
    assert np.array_equal(a["test_labels"], np.load(out / "logits.npz")["test_labels"])
    assert np.array_equal(a["test_labels"], b["test_labels"])
    np.testing.assert_allclose(a["test_phi0"], b["test_phi0"], atol=1e-5)
    lp_w = torch.load(out / "lp_head.pt", weights_only=True)["weight"].float().numpy()
    assert np.array_equal(b["head0"], lp_w)  # LP-FT's rows at the start (the t-SNE's "before"): the LP head's
    other = tmp_path / "other"  # another model: here the embedded one's config alone, in a folder of its own
    other.mkdir()
    shutil.copy(Path(emb) / "config.json", other)
    with pytest.raises(SystemExit, match=re.escape(f"fit on model 'all-MiniLM-L6-v2', not '{other}'")):
        ft.main(["--init", str(out / "lp_head.pt"), "--model", str(other), "--output_dir", str(tmp_path / "o"), *FAST])


def _bad_head(cb_lp, tmp_path, **change):
    h = torch.load(cb_lp[0] / "lp_head.pt", weights_only=True) | change
    p = tmp_path / "head.pt"
    torch.save(h, p)
    return str(p)


@pytest.mark.parametrize("change,msg", [
    ({"task": "rte"}, "fit on task 'rte'"),
    ({"model": "roberta-base"}, "fit on model 'roberta-base'"),
    ({"weight": torch.zeros(2, 384), "bias": torch.zeros(2), "labels": ["a", "b"]}, "has 2 labels but cb has 3"),
    ({"weight": torch.zeros(3, 768)}, "feature width 768"),
    ({"bias": torch.zeros(2)}, "do not match"),
])
def test_bad_heads_one_line_error(cb_lp, tmp_path, change, msg):
    p = _bad_head(cb_lp, tmp_path, **change)
    argv = ["--init", p, "--output_dir", str(tmp_path / "o"), *FAST]
    if change.get("task") == "rte":
        argv += ["--task", "cb"]
    if change.get("model"):
        argv += ["--model", "all-MiniLM-L6-v2"]
    with pytest.raises(SystemExit, match=msg) as e:
        ft.main(argv)
    assert "\n" not in str(e.value)


def test_corrupt_head_and_checkpoint(tmp_path):
    p = tmp_path / "lp_head.pt"
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="corrupt"):
        ft.main(["--init", str(p)])
    o = tmp_path / "run"
    argv = ["--task", "cb", "--max_steps", "1", "--output_dir", str(o), *FAST]
    ft.main(argv)
    (o / "results.json").unlink()  # as if killed after a checkpoint, which is then garbled
    (o / "ckpt.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(SystemExit, match="cannot read checkpoint"):
        ft.main(argv)


def test_ft_rte_lowers_loss_and_is_deterministic(tmp_path):
    argv = ["--task", "rte", "--max_train_samples", "32", "--max_eval_samples", "16", "--epochs", "2",
            "--lr", "1e-4", "--batch_size", "16", "--max_len", "64"]
    a = ft.main(argv + ["--output_dir", str(tmp_path / "a")])
    losses = [h["loss"] for h in a["history"][1:]]
    assert losses[-1] < losses[0]
    assert a["history"][1]["diff_f"] > 0
    b = ft.main(argv + ["--output_dir", str(tmp_path / "b")])
    assert [h["loss"] for h in b["history"][1:]] == losses and b["metrics"] == a["metrics"]
    files = {f.name for f in (tmp_path / "a").iterdir()}
    assert {"results.json", "logits.npz", "model.safetensors", "meta.json"} <= files and "ckpt.pt" not in files


def test_resume_after_interrupt_matches_uninterrupted(tmp_path, monkeypatch, capsys):
    argv = ["--task", "cb", "--epochs", "2", "--lr", "1e-4", "--batch_size", "16", "--max_len", "64", *FAST]
    full = ft.main(argv + ["--output_dir", str(tmp_path / "full")])
    save = ft.save_checkpoint

    def crash(*a):
        save(*a)
        raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(ft, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        ft.main(argv + ["--output_dir", str(tmp_path / "cut")])
    monkeypatch.setattr(ft, "save_checkpoint", save)
    assert not (tmp_path / "cut/results.json").exists()
    resumed = ft.main(argv + ["--output_dir", str(tmp_path / "cut")])
    assert "resuming after epoch 1" in capsys.readouterr().out
    strip = lambda r: [{k: v for k, v in h.items() if k != "seconds"} for h in r["history"]]  # noqa: E731
    assert strip(resumed) == strip(full) and resumed["metrics"] == full["metrics"]
    head0 = [np.load(tmp_path / d / "features.npz")["head0"] for d in ("full", "cut")]
    assert np.array_equal(*head0)  # the start's rows, not the checkpoint's trained ones
    again = ft.main(argv + ["--output_dir", str(tmp_path / "cut")])
    assert "already finished" in capsys.readouterr().out and again == json.loads(
        (tmp_path / "cut/results.json").read_text())


def test_nan_loss_stops_with_clear_message(tmp_path, monkeypatch):
    monkeypatch.setattr(ft.F, "cross_entropy", lambda x, y: (x.sum() * float("nan")))
    with pytest.raises(SystemExit, match="loss became nan.*no checkpoint was written; lower --lr") as e:
        ft.main(["--task", "cb", "--max_steps", "2", "--output_dir", str(tmp_path), *FAST])
    assert "\n" not in str(e.value)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["finished"] is False and "nan" in res["failed"]
    with pytest.raises(SystemExit, match="failed earlier"):  # a rerun says so instead of diverging again
        ft.main(["--task", "cb", "--max_steps", "2", "--output_dir", str(tmp_path), *FAST])


def test_patience_stops_and_keeps_best_epoch(tmp_path):
    # lr 1e-12 (0 is refused): the val metric never improves after epoch 1, so --patience 1 stops after epoch 2
    r = ft.main(["--task", "cb", "--epochs", "5", "--lr", "1e-12", "--patience", "1", "--max_len", "64",
                 "--output_dir", str(tmp_path), *FAST])
    assert [h["epoch"] for h in r["history"]] == [0, 1, 2] and r["best_epoch"] == 1
    assert r["metrics"]["test"] == r["history"][1]["test"]


def test_feature_stats_on_every_split_ood_included(tmp_path):
    """Table 11: Diff(F), CS(F), FDR(F) on val, test and each OOD set of Amazon (BOSS layout, tiny files), against
    each split's own pre-trained features; features.npz holds the test features before and after."""
    words = ["good", "bad", "fine", "awful", "great", "poor", "okay"]
    for name, n in [("amazon", 40), ("dynasent", 9), ("semeval", 10), ("sst5", 11)]:
        (tmp_path / "boss" / name).mkdir(parents=True)
        rows = "".join(f"a {words[i % 7]} {name} item number {i}\t{i % 3}\n" for i in range(n))
        for split in ("train", "test") if name == "amazon" else ("test",):
            (tmp_path / "boss" / name / f"{split}.tsv").write_text("Text\tLabel\n" + rows)
    out = tmp_path / "run"
    r = ft.main(["--task", "amazon", "--data_dir", str(tmp_path), "--epochs", "1", "--lr", "1e-3",
                 "--batch_size", "8", "--output_dir", str(out)])
    splits = {"val", "test", "dynasent", "semeval", "sst5"}
    start, best = r["history"][0], r["history"][r["best_epoch"]]
    assert set(start["features"]) == set(best["features"]) == set(r["features"]) == splits
    for sp in splits:  # each split against its own start: no change at epoch 0, a change after training
        assert start["features"][sp]["diff_f"] == 0 and best["features"][sp]["diff_f"] > 0, sp
        assert 0 < best["features"][sp]["fdr_f"] and -1 <= best["features"][sp]["cs_f"] <= 1
    assert {k: best[k] for k in ("diff_f", "cs_f", "fdr_f", "fdr_f_pinv")} == best["features"]["test"]
    z = np.load(out / "features.npz")
    assert z["test_phi"].shape == z["test_phi0"].shape == (40, 384)
    # FT's fresh head at the start: its norm is epoch 0's, and training moved it
    assert np.linalg.norm(z["head0"]) == pytest.approx(start["head_norm"], rel=1e-6)
    assert np.linalg.norm(z["head0"]) != pytest.approx(best["head_norm"], rel=1e-6)
    assert ft.feature_stats(z["test_phi"], z["test_phi0"], z["test_labels"]) == pytest.approx(
        best["features"]["test"], rel=1e-6)  # recomputed from the saved features
    assert len(np.load(out / "logits.npz")["sst5_logits"]) == 11


def scatter(phi, labels):
    """S_W and S_B summed explicitly, one outer product per example and per class."""
    mu, d = phi.mean(0), phi.shape[1]
    sw, sb = np.zeros((d, d)), np.zeros((d, d))
    for c in np.unique(labels):
        x = phi[labels == c]
        sw += sum(np.outer(v - x.mean(0), v - x.mean(0)) for v in x)
        sb += len(x) * np.outer(x.mean(0) - mu, x.mean(0) - mu)
    return sw, sb


@pytest.mark.parametrize("n,d", [(40, 5), (7, 12)])  # N > d: S_W invertible; N < d: rank N - C
def test_fdr_both_ways_against_explicit_scatter_matrices(n, d):
    rng = np.random.default_rng(n)
    phi, labels = rng.normal(size=(n, d)) * rng.uniform(0.1, 10, size=d), np.arange(n) % 3
    sw, sb = scatter(phi, labels)
    ratio, pinv = ft.fdr(phi, labels)
    assert ratio == pytest.approx(np.trace(sb) / np.trace(sw), rel=1e-9)
    inverse = np.linalg.inv(sw) if n > d else np.linalg.pinv(sw, hermitian=True)
    assert pinv == pytest.approx(np.trace(inverse @ sb), rel=1e-6)
    st = ft.feature_stats(phi, phi, labels)
    assert (st["fdr_f"], st["fdr_f_pinv"]) == (ratio, pinv)


def test_checkpoint_of_an_older_kit_is_refused_in_one_line(tmp_path, monkeypatch):
    """A checkpoint whose start features cover only test (the kit before every split was measured) cannot resume:
    the other splits' pre-trained features are gone with the untrained model."""
    argv = ["--task", "cb", "--epochs", "2", "--lr", "1e-4", "--batch_size", "16", "--max_len", "64", *FAST,
            "--output_dir", str(tmp_path)]
    save = ft.save_checkpoint

    def crash(*a):
        save(*a)
        raise KeyboardInterrupt

    monkeypatch.setattr(ft, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        ft.main(argv)
    monkeypatch.setattr(ft, "save_checkpoint", save)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    state["phi0"] = state["phi0"]["test"]  # as the older kit saved it
    torch.save(state, tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit, match="older kit's checkpoint") as e:
        ft.main(argv)
    assert "\n" not in str(e.value)
