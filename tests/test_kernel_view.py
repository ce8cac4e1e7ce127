"""The kernel view of Malladi et al. (kernel_view.py, run by ntk.py): SignGD kernels against per-example gradients,
their solvers against hand computations, k-shot draws shared by every script, --solve on a saved kernels.npz,
refusals."""

import json

import numpy as np
import pytest
import torch
from test_ntk import PAD, examples, tiny

import data
import kernel_view
import ntk


def per_example_grads(model, xs, pad_id, D):
    """Rows: the gradient of (D f)_o for each example alone (o fastest), over every parameter (head included) but
    the attention key biases (their gradient is zero in exact arithmetic, rounding noise here), by plain autograd;
    unused word-embedding rows are zero, as their gradient is."""
    params = [p for n, p in model.named_parameters() if not n.endswith("attention.self.key.bias")]
    Dt = torch.as_tensor(D, dtype=torch.float64)
    rows = []
    for i in range(len(xs)):
        out = Dt @ model(**data.collate(xs, [i], pad_id))[0]
        for o in range(len(D)):
            g = torch.autograd.grad(out[o], params, retain_graph=True, allow_unused=True)
            g = [x if x is not None else torch.zeros_like(p) for x, p in zip(g, params)]
            rows.append(torch.cat([x.reshape(-1) for x in g]))
    return torch.stack(rows).double()


@pytest.mark.parametrize("kind,binary", [("sgd", True), ("signgd", False), ("signgd", True), ("asym_signgd", False),
                                         ("asym_signgd", True)])
def test_view_kernels_equal_signs_of_per_example_gradients(kind, binary):
    model = tiny("bert")
    if binary:  # a two-class head for the logit difference
        model.head = torch.nn.Linear(32, 2).double()
        torch.nn.init.normal_(model.head.weight, 0, 0.5)
    C = model.head.out_features
    xs = examples("bert")
    tr, te = xs[:3], xs[3:]
    D = kernel_view.logit_map(C, binary)
    K = kernel_view.view_kernels(ntk, model, tr, te, kind, D, pad_id=PAD["bert"], batch_size=2)
    G_tr, G_te = per_example_grads(model, tr, PAD["bert"], D), per_example_grads(model, te, PAD["bert"], D)
    s = torch.sign
    if kind == "sgd":
        want = {"train": G_tr @ G_tr.T, "test": G_te @ G_tr.T}
    elif kind == "signgd":
        want = {"train": s(G_tr) @ s(G_tr).T, "test": s(G_te) @ s(G_tr).T}
    else:  # train side signed in 'train' and 'test'; the test side in 'flip'
        want = {"train": s(G_tr) @ G_tr.T, "test": G_te @ s(G_tr).T, "flip": s(G_te) @ G_tr.T}
    assert set(K) == set(want)
    n_out = len(D)
    for name, W in want.items():
        P, F = K[name]
        got = kernel_view.flat(P + F)
        assert got.shape == (len(te if name != "train" else tr) * n_out, len(tr) * n_out)
        assert np.abs(got - W.numpy()).max() <= 1e-8 * max(np.abs(W.numpy()).max(), 1.0), (name, kind)


def test_lstsq_by_hand():
    """K = diag(1, 2, 4) on a single logit, y = (1, 0, 1) -> targets (1, -1, 1), alpha = (1, -1/2, 1/4)."""
    K = np.diag([1.0, 2.0, 4.0])[:, None, :, None]
    K_te = np.array([[0.0, 3.0, 1.0]])[:, None, :, None]  # prediction -3/2 + 1/4 < 0 -> class 0
    y, y_te = np.array([1, 0, 1]), np.array([0])
    r = kernel_view.kernel_regression(K, K_te, y, y_te, ridge=0)
    assert r["train"] == 1.0 and r["test"] == 1.0 and r["ridge"] == 0
    # fitted to y - f0 with f0 = 0.5: alpha = (1/2, -3/4, 1/8); the test prediction -9/4 + 1/8 + f0_te
    f0 = np.full((3, 1), 0.5)
    assert kernel_view.kernel_regression(K, K_te, y, y_te, 0, f0, np.array([[2.0]]))["test"] == 1.0  # -0.125: class 0
    assert kernel_view.kernel_regression(K, K_te, y, y_te, 0, f0, np.array([[2.2]]))["test"] == 0.0  # +0.075: class 1
    # the ridge is a multiple of the operator norm (4 here): ridge 0.25 adds 1 to the diagonal
    r = kernel_view.kernel_regression(K, K_te, np.array([1, 1, 1]), np.array([1]), ridge=0.25)
    assert r["ridge"] == pytest.approx(1.0) and r["test"] == 1.0  # alpha = (1/2, 1/3, 1/5): 1 + 1/5 > 0


def test_asym_solver_by_hand():
    """K = I, y = (1, 0) -> H = I, A = [[I, I], [I, I]]: the minimum-norm solution is alpha = beta = 1/2. A test
    example with K_te = (2, 0) (their eval kernel: alpha side) and K_flip = (0, 2) (beta side): omega = 1, nu = -1,
    so lambda 0.75 predicts +0.5 (class 1) and lambda 0.25 -0.5 (class 0)."""
    K = np.eye(2)[:, None, :, None]
    K_te, K_fl = np.array([[2.0, 0.0]])[:, None, :, None], np.array([[0.0, 2.0]])[:, None, :, None]
    y = np.array([1, 0])
    assert kernel_view.asym_solver(K, K_te, K_fl, y, np.array([1]), ridge=0, lam=0.75)["test"] == 1.0
    assert kernel_view.asym_solver(K, K_te, K_fl, y, np.array([1]), ridge=0, lam=0.25)["test"] == 0.0
    assert kernel_view.asym_solver(K, K_te, K_fl, y, np.array([0]), ridge=0, lam=0.25)["test"] == 1.0


def test_svc_and_logistic_are_scikit_learns():
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.svm import SVC

    rng = np.random.default_rng(0)
    X, Xt = rng.normal(size=(20, 3)), rng.normal(size=(9, 3))
    w = np.array([1.0, -2.0, 0.5])
    y, yt = (X @ w > 0).astype(int), (Xt @ w > 0).astype(int)
    K, K_te = (X @ X.T)[:, None, :, None], (Xt @ X.T)[:, None, :, None]
    got = kernel_view.svc(K, K_te, y, yt, ridge=0)
    assert got["test"] == float((SVC(kernel="linear").fit(X, y).predict(Xt) == yt).mean())
    lr = kernel_view.pair_logreg(K, K_te, y, yt)
    clf = LogisticRegressionCV(max_iter=10000, random_state=0).fit(X @ X.T, y)
    assert lr["test"] == lr["test_class"] == float((clf.predict(Xt @ X.T) == yt).mean())


def test_k_shot_is_one_draw_for_every_script(tmp_path, data_dir):
    """lp.py, ft.py and ntk.py on (cb, K=2, seed 21) see the same train, val and test examples."""
    import ft
    import lp

    common = ["--task", "cb", "--k_shot", "2", "--data_seed", "21", "--data_dir", str(data_dir), "--max_len", "32"]
    lp.main(common + ["--output_dir", str(tmp_path / "lp")])
    ft.main(common + ["--init", str(tmp_path / "lp" / "lp_head.pt"), "--epochs", "1", "--output_dir",
                      str(tmp_path / "ft")])
    ntk.main(common + ["--n_test", "4", "--output_dir", str(tmp_path / "ntk"), "--max_memory_gb", "1"])
    full = data.load_file("cb", "train", data.data_root(data_dir))
    tr, va = data.k_shot_rows("cb", full.labels, 2, 21)
    z = np.load(tmp_path / "ntk" / "kernels.npz")
    assert z["train_idx"].tolist() == tr and np.bincount(z["train_labels"]).tolist() == [2, 2, 2]
    for run in ("lp", "ft"):
        lg = np.load(tmp_path / run / "logits.npz")
        assert lg["val_labels"].tolist() == full.labels[va].tolist()
        assert len(lg["test_labels"]) == len(data.load_file("cb", "test", data.data_root(data_dir)))  # 56 < 1,000
    res = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert res["config"]["k_shot"] == 2 and res["config"]["data_seed"] == 21


def test_solve_saved_kernels_and_refusals(tmp_path, data_dir):
    out = tmp_path / "ntk"
    argv = ["--task", "sst2", "--k_shot", "2", "--n_test", "6", "--max_len", "32", "--kernel", "asym_signgd",
            "--binary_logit", "--data_dir", str(data_dir), "--output_dir", str(out), "--max_memory_gb", "1"]
    res = ntk.main(argv)
    assert set(res["solvers"]) == {"lstsq", "lstsq_init", "logistic", "svc", "asym"}
    assert all(0 <= r["test"] <= 1 for r in res["solvers"].values())
    again = ntk.main(["--solve", str(out)])
    assert again["solvers"] == json.loads(json.dumps(res["solvers"]))  # the same kernels, the same answers
    assert json.loads((out / "solvers.json").read_text())["kind"] == "asym_signgd"
    z = np.load(out / "kernels.npz")
    assert z["F_flip"].shape == z["F_test"].shape == (6, 1, 4, 1)
    assert res["config"]["k_shot_draw"] == data.K_SHOT_DRAW  # SST-2: their script's draw, recorded
    assert z["train_idx"].tolist() == data.k_shot_splits("sst2", data_dir, 2, 13)["train"].meta["rows"]
    for bad, msg in ((["--task", "cb", "--binary_logit"], "needs two classes"),
                     (["--task", "sst2", "--kernel", "signgd", "--method", "structured"], "needs the explicit"),
                     (["--task", "sst2", "--asym_lambda", "2"], "lambda in"),
                     (["--task", "sst2", "--data_seed", "13"], "without --k_shot"),
                     (["--solve", str(tmp_path / "nothing.npz")], "cannot read")):
        with pytest.raises(SystemExit, match=msg) as e:
            ntk.main(bad + ["--output_dir", str(tmp_path / "x")])
        assert len(str(e.value).splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_kernel_study_end_to_end(tmp_path, data_dir):
    """run_all.sh --kernel_study on a tiny draw: FT and its kernel per data seed, then the report's kernel table, FT
    compared on the kernel's own test examples."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out, small = tmp_path / "ks", tmp_path / "data/glue/SST-2"  # SST-2 with its first 40 dev sentences as test:
    small.mkdir(parents=True)  # fine-tuning evaluates every test example, the kernel only --kernel_test of them
    (small / "train.tsv").write_bytes((data_dir / "glue/SST-2/train.tsv").read_bytes())
    dev = (data_dir / "glue/SST-2/dev.tsv").read_text().splitlines(keepends=True)
    (small / "dev.tsv").write_text("".join(dev[:41]))
    cmd = ["bash", str(root / "run_all.sh"), "--kernel_study", "--tasks", "sst2", "--k_shots", "2", "--data_seeds",
           "13 21", "--epochs", "1", "--kernel_test", "6", "--data_dir", str(tmp_path / "data"), "--out", str(out),
           "--jobs", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=900,
                       env=dict(os.environ, PYTHON=sys.executable))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    md = (out / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| sst2 | 2 | FT | asym_signgd"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == "2 / 6"
    accs = []
    for s in (13, 21):
        k = json.loads((out / f"sst2/ntk-ft-asym_signgd-k2-data{s}-seed{s}/ntk_results.json").read_text())
        z = np.load(out / f"sst2/ft-k2-data{s}-seed{s}/logits.npz")
        keep = k["test_positions"]
        assert len(keep) == 6 and k["config"]["k_shot"] == 2
        accs.append(100 * float((z["test_logits"][keep].argmax(1) == z["test_labels"][keep]).mean()))
    assert cells[5].startswith(f"{np.mean(accs):.1f} ± {np.std(accs, ddof=1):.1f}")
