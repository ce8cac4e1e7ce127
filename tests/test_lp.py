"""lp.py faults: every bad flag, folder or subset stops with one line before any model or file is touched, the
feature cache and the skip check follow the data's content, and parallel jobs wait for one head."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, snapshot

import data
import lp
import rundir

T = ["--task", "cb", "--max_train_samples", "16", "--max_eval_samples", "16"]



def lp_cli(*argv, cwd=ROOT):
    """`python lp.py ...` -> (exit code, stdout, stderr)."""
    r = subprocess.run([sys.executable, "lp.py", *argv], cwd=cwd, capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


@pytest.fixture
def no_model(monkeypatch):
    """Faults must be found before the encoder is loaded."""
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(data, "load_encoder", boom)


@pytest.fixture
def old_run(tmp_path):
    """An output folder that already holds files (they must survive every failure, --overwrite included)."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("lp_head.pt", "logits.npz", "lp_results.json"):
        (out / name).write_bytes(b"earlier run's " + name.encode())
    return out


def one_line_error(argv, match):
    with pytest.raises(SystemExit) as e:
        lp.main(argv)
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg and match in msg, msg
    return msg


# ---------------------------------------------------------------- flags and folders, checked first
@pytest.mark.parametrize("flags,match", [
    (["--C", "0"], "--C 0.0: must be > 0"),
    (["--C", "-1"], "--C -1.0: must be > 0"),
    (["--C", "nan"], "--C nan: must be > 0 and finite"),
    (["--C", "inf"], "--C inf"),
    (["--max_train_samples", "0"], "--max_train_samples 0"),
    (["--max_train_samples", "-1"], "--max_train_samples -1"),
    (["--max_eval_samples", "0"], "--max_eval_samples 0"),
    (["--eval_batch_size", "0"], "--eval_batch_size 0"),
    (["--norm_curve", "-1"], "--norm_curve -1: must be >= 0"),
    (["--max_len", "600"], "exceeds the 512 positions"),
    (["--max_len", "2"], "--max_len 2: too short"),
    (["--task", "xyz"], "unknown task 'xyz'"),
])
def test_bad_flag_stops_before_anything(old_run, tmp_path, no_model, flags, match):
    before = snapshot(tmp_path, lock=True)
    one_line_error([*T, "--output_dir", str(old_run), "--cache_dir", str(tmp_path / "c"), "--overwrite", *flags],
                   match)
    assert snapshot(tmp_path, lock=True) == before and not (tmp_path / "c").exists()


def test_output_dir_that_is_a_file_or_under_one(tmp_path, no_model):
    f = tmp_path / "file"
    f.write_text("mine")
    one_line_error([*T, "--output_dir", str(f), "--cache_dir", str(tmp_path / "c")], "is a file")
    one_line_error([*T, "--output_dir", str(f / "sub"), "--cache_dir", str(tmp_path / "c")], "lies under the file")
    one_line_error([*T, "--output_dir", str(tmp_path / "o"), "--cache_dir", str(f)], "--cache_dir")
    assert f.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_corrupt_lp_results_is_one_line(old_run, tmp_path, no_model):
    (old_run / "lp_results.json").write_text('{"config": {"task": "cb"')  # truncated
    before = snapshot(tmp_path, lock=True)
    one_line_error([*T, "--output_dir", str(old_run), "--cache_dir", str(tmp_path / "c")], "corrupt")
    (old_run / "lp_results.json").write_text("[1, 2]")
    before = snapshot(tmp_path, lock=True)
    one_line_error([*T, "--output_dir", str(old_run), "--cache_dir", str(tmp_path / "c")], "not the lp_results.json")
    assert snapshot(tmp_path, lock=True) == before


def test_output_dir_of_another_script_is_refused(tmp_path, no_model):
    (tmp_path / "results.json").write_text("{}")  # an ft.py run: its logits.npz must not be replaced
    before = snapshot(tmp_path, lock=True)
    one_line_error([*T, "--output_dir", str(tmp_path), "--cache_dir", str(tmp_path / "c")], "holds a run of ft.py")
    assert snapshot(tmp_path, lock=True) == before


@pytest.mark.parametrize("flags,match", [
    (["--C", "0"], "--C 0.0: must be > 0"),
    (["--max_len", "600"], "exceeds the 512 positions"),
    (["--max_train_samples", "1"], "has only class 'contradiction', no 'entailment', 'neutral'"),
])
def test_cli_prints_one_line_and_keeps_files(old_run, tmp_path, flags, match):
    before = snapshot(tmp_path, lock=True)
    rc, out, err = lp_cli(*T, "--output_dir", str(old_run), "--cache_dir", str(tmp_path / "c"), "--overwrite", *flags)
    assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1 and match in err, err
    assert snapshot(tmp_path, lock=True) == before


# ---------------------------------------------------------------- train subsets the head cannot be fit on
def test_one_class_names_the_missing_ones(tmp_path, no_model):
    one_line_error([*T, "--max_train_samples", "1", "--output_dir", str(tmp_path), "--cache_dir", str(tmp_path)],
                   "has only class 'contradiction', no 'entailment', 'neutral'; a cb head needs all 3 classes: "
                   "pass a larger --max_train_samples")
    one_line_error([*T, "--max_train_samples", "4", "--output_dir", str(tmp_path), "--cache_dir", str(tmp_path)],
                   "no 'neutral'")  # 2 classes of 3: the head would lack a row
    assert list(tmp_path.iterdir()) == []


def test_too_few_for_cross_validation(tmp_path, no_model):
    # 8 examples: 3 / 4 / 1 per class; a fold split needs >= 2 of each
    one_line_error([*T, "--max_train_samples", "8", "--output_dir", str(tmp_path), "--cache_dir", str(tmp_path)],
                   "class 'neutral' has 1 example in the train subset; choosing C by cross-validation needs at "
                   "least 2 per class")
    assert list(tmp_path.iterdir()) == []
    assert lp.cv_folds(np.array([0, 0, 1, 1, 2, 2, 2]), "cb", None) == 2  # as many folds as the smallest class
    assert lp.cv_folds(np.array([0] * 9 + [1] * 9 + [2] * 9), "cb", None) == lp.MAX_FOLDS
    assert lp.cv_folds(np.array([0, 1, 2]), "cb", 1.0) is None  # a fixed C needs one of each only


# ---------------------------------------------------------------- the data's content decides reuse
@pytest.fixture
def two_data_dirs(tmp_path, data_dir):
    """A: the official CB files; B: the same names with other text and labels; A2: a copy of A elsewhere."""
    dirs = {}
    for name in ("A", "B", "A2"):
        d = tmp_path / name / "superglue/CB"
        shutil.copytree(data_dir / "superglue/CB", d)
        dirs[name] = tmp_path / name
    swap = {"entailment": "contradiction", "contradiction": "entailment", "neutral": "neutral"}
    f = dirs["B"] / "superglue/CB/train.jsonl"
    rows = [json.loads(line) for line in f.read_text().splitlines()]
    f.write_text("".join(json.dumps(r | {"premise": "Indeed, " + r["premise"], "label": swap[r["label"]]}) + "\n"
                         for r in rows))
    return dirs


def test_other_data_same_task_is_never_reused(two_data_dirs, tmp_path, monkeypatch, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    a = lp.main([*T, "--data_dir", str(two_data_dirs["A"]), "--output_dir", str(out), "--cache_dir", str(cache)])
    assert a["cv_folds"] == 2 and "2-fold" in a["cv_note"]  # 2 'neutral' of 16: fewer folds, and it says so
    train = two_data_dirs["A"] / "superglue/CB/train.jsonl"
    assert a["fingerprint"]["data_sha256"]["train"] == rundir.file_sha256(train)
    cached = sorted(cache.rglob("*.npy"))
    assert len(cached) == 3

    # B into the same folder: the fingerprint differs, nothing is loaded or written
    before = snapshot(tmp_path / "out", lock=True) | snapshot(cache, lock=True)
    with monkeypatch.context() as m:
        m.setattr(data, "load_encoder", lambda *a: pytest.fail("the model was loaded"))
        msg = one_line_error([*T, "--data_dir", str(two_data_dirs["B"]), "--output_dir", str(out), "--cache_dir",
                              str(cache)], "holds a head for another setting (data_sha256.train: ")
        assert "--overwrite" in msg and "data_sha256.test" not in msg  # only the file that differs is named
        # the same content under another path is the same data: skipped
        again = lp.main([*T, "--data_dir", str(two_data_dirs["A2"]), "--output_dir", str(out), "--cache_dir",
                         str(cache)])
    assert again == a and "already fit" in capsys.readouterr().out
    assert snapshot(tmp_path / "out", lock=True) | snapshot(cache, lock=True) == before

    # B into a fresh folder with the same cache: train/val features are computed again, test (same file) reused
    b = lp.main([*T, "--data_dir", str(two_data_dirs["B"]), "--output_dir", str(tmp_path / "outB"),
                 "--cache_dir", str(cache)])
    new = sorted(set(cache.rglob("*.npy")) - set(cached))
    assert sorted(p.name.split("_")[0] for p in new) == ["train", "val"]
    assert b["fingerprint"]["data_sha256"]["test"] == a["fingerprint"]["data_sha256"]["test"]
    xa = np.load([p for p in cached if p.name.startswith("train")][0])
    xb = np.load([p for p in new if p.name.startswith("train")][0])
    assert xa.shape == xb.shape and not np.allclose(xa, xb)  # B's text, not A's features


def test_parallel_jobs_fit_one_head(tmp_path):
    """Two lp.py for the same head at once (run_all --print_jobs under xargs -P): both succeed, one fits."""
    argv = [sys.executable, "lp.py", *T, "--C", "1", "--output_dir", str(tmp_path / "lp"),
            "--cache_dir", str(tmp_path / "cache")]
    jobs = [subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outs = [j.communicate() for j in jobs]
    assert [j.returncode for j in jobs] == [0, 0], outs
    fitted = [o for o, e in outs if "fitting logistic regression" in o]
    assert len(fitted) == 1, outs
    other = next(o for o, e in outs if "fitting logistic regression" not in o)
    assert "already fit" in other or "fit by another process while this one waited" in other
    assert all("Traceback" not in e for o, e in outs)
    res = json.loads((tmp_path / "lp" / "lp_results.json").read_text())
    assert res["finished"] and (tmp_path / "lp" / "lp_head.pt").exists()
    assert not list((tmp_path / "lp").glob(".*.tmp")) and not list((tmp_path / "cache").rglob(".*.tmp"))


# ---------------------------------------------------------------- the binary head: the kit's exact one and the paper's
def test_paper_binary_head_is_the_authors_symmetric_softmax_fit(tmp_path):
    """--binary_head paper at C: the rows +-u/2 of the symmetric two-row softmax fit at C (the authors' scikit-learn
    1.0.1 multinomial head), which is exactly half of the exact head at 2C."""
    T = ["--task", "sst2", "--max_train_samples", "64", "--max_eval_samples", "16", "--cache_dir", str(tmp_path / "c")]
    lp.main(T + ["--C", "0.5", "--binary_head", "paper", "--output_dir", str(tmp_path / "paper")])
    lp.main(T + ["--C", "1.0", "--output_dir", str(tmp_path / "exact")])
    load = lambda d: torch.load(tmp_path / d / "lp_head.pt", weights_only=True)  # noqa: E731
    paper, exact = load("paper"), load("exact")
    assert paper["binary_head"] == "paper" and paper["C"] == 0.5
    torch.testing.assert_close(paper["weight"], exact["weight"] / 2, rtol=0, atol=1e-7)
    torch.testing.assert_close(paper["bias"], exact["bias"] / 2, rtol=0, atol=1e-7)
    assert json.loads((tmp_path / "paper/lp_results.json").read_text())["logit_scale"] == 2.0

    # an independent fit of the authors' objective: two softmax rows, 0.5 |W|^2 + C sum CE, float64 LBFGS
    x = torch.from_numpy(np.load(next((tmp_path / "c").rglob("train_*.npy")))).double()
    y = torch.from_numpy(data.study_splits("sst2", None, 64, 16, data.SEED)["train"].labels)
    W = torch.zeros(2, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=5000, tolerance_grad=1e-12, tolerance_change=1e-15,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = 0.5 * W.square().sum() + 0.5 * torch.nn.functional.cross_entropy(x @ W.T + b, y, reduction="sum")
        loss.backward()
        return loss
    opt.step(closure)
    u, c = (W[1] - W[0]).detach() / 2, (b[1] - b[0]).detach() / 2  # the class-1 row of the symmetric solution
    want = torch.stack([-u / 2, u / 2]).float()
    # scikit-learn stops at its own tolerance (1e-4 on its scaled gradient), which leaves its head 1e-3 to 2e-3
    # (relative) from this tight fit depending on the processor's floating-point path (1.4e-3 here, 2.1e-3 on
    # another machine of the same kind): 1e-2 is what that stopping rule can promise. A head of another objective
    # is far outside it: the exact head at C (not 2C) is about 30% away on these features.
    assert torch.linalg.norm(paper["weight"] - want) < 1e-2 * torch.linalg.norm(want)
    # the bias has no penalty: the stopping rule bounds the whole parameter vector's error, so its tolerance is on
    # the head's scale, not the (small) bias's own (measured here: 3.5e-3 absolute, 0.25% of ||want|| = 1.37)
    torch.testing.assert_close(paper["bias"], torch.stack([-c / 2, c / 2]).float(), rtol=0,
                               atol=1e-2 * float(torch.linalg.norm(want)))


def test_norm_curve_moves_and_reaches_the_minimiser_on_features_with_a_common_direction():
    """Features dominated by one shared direction (as MiniLM's CLS features of SST-2): the line search needs more
    than one evaluation per step; with torch's default max_eval for max_iter=1 the head never left 0."""
    g = np.random.default_rng(0)
    y = (g.random(400) < 0.58).astype(np.int64)
    x = 1.5 + 0.3 * g.standard_normal((400, 16)) + 0.2 * (2 * y[:, None] - 1) * g.random(16)
    yt = (g.random(100) < 0.58).astype(np.int64)
    xt = 1.5 + 0.3 * g.standard_normal((100, 16)) + 0.2 * (2 * yt[:, None] - 1) * g.random(16)
    curve, acc = lp.norm_curve(x, y, 2, 0.5, 100, test=(xt, yt))
    assert len(acc) == len(curve) == 101 and acc[0] == np.mean(yt == 0)  # a zero head predicts class 0
    W = torch.zeros(2, 16, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=1000, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")
    xtr, ytr = torch.from_numpy(x), torch.from_numpy(y)

    def closure():  # the same objective, solved to convergence in one call
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xtr @ W.T + b, ytr) + W.square().sum() / (2 * 0.5 * len(x))
        loss.backward()
        return loss

    opt.step(closure)
    assert curve[1] > 0 and curve[-1] == pytest.approx(float(W.detach().norm()), rel=1e-4)
    with torch.no_grad():  # ... and the last iterate's test accuracy is the minimiser's
        assert acc[-1] == np.mean((torch.from_numpy(xt) @ W.T + b).argmax(1).numpy() == yt)
    assert lp.norm_curve(x, y, 2, 0.5, 3)[1] == []  # no test set: no accuracies


# ---------------------------------------------------------------- LP's choice of C under rounding (issue 26)
@pytest.mark.slow
def test_log_loss_choice_of_c_does_not_move_where_accuracys_does(tmp_path):
    """Real SST-2, seed 1001's 1,000 training sentences: the case whose accuracy-scored C differed between two
    machines of one kind. Features perturbed by 1e-6 relative (about what another processor's float32 sums change)
    move the accuracy-scored choice in some of five copies and the log-loss-scored one in none. 14 s alone on two
    cores, kept out of the suite's 8 minutes: `python -m pytest -m slow tests/test_lp.py`."""
    sys.path.insert(0, str(ROOT / "tools"))
    import cv_stability

    res = cv_stability.main(["--tasks", "sst2", "--seeds", "1001", "--repeats", "5", "--cache_dir",
                             str(tmp_path / "cache"), "--out", str(tmp_path / "out")])
    rows = {r["scoring"]: r for r in res["rows"]}
    assert len(set(rows["accuracy"]["perturbed_C"]) | {rows["accuracy"]["C"]}) > 1, rows["accuracy"]
    assert rows["log_loss"]["moved"] == 0 and rows["log_loss"]["margin"] > 0, rows["log_loss"]
