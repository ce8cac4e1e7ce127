"""Malladi et al.'s kernel view (ICML 2023) for ntk.py: the SignGD and asymmetric SignGD kernels, their solvers
and ntk.py --solve.

    python ntk.py --task sst2 --k_shot 16 --data_seed 13 --seed 13 --kernel asym_signgd --binary_logit  # its kernel
    python ntk.py --solve runs/sst2/ntk-ft-k16-data13-seed13 --ridge 0                                # solvers again

The kernels are of D f: the logits (D = I_C) or, with --binary_logit, their difference f_1 - f_0. sgd is the
eNTK (ntk.py's P + F); signgd and asym_signgd are their SignGD kernels, which stand in for Adam's early steps. The
solvers are theirs: least squares (also fitted to y - f0), logistic regression, SVC and the asymmetric solver.
Imports rundir only. ntk.py imports this module and never the other way round: f_sign and view_kernels, which need
its engines (kernels, features, jacobian_chunks, accumulate), take the ntk module as their first argument, and
ntk.py's P/F split takes head_part (P is its sgd case) and flat from here.
"""

import itertools
import math
import warnings
from pathlib import Path

import numpy as np
import torch

import rundir
from rundir import die

KINDS = ("sgd", "signgd", "asym_signgd")


# ---------------------------------------------------------------- flags
def view_flags(a):
    """ntk.py's flags for the kernel view."""
    a("--kernel", choices=KINDS, default="sgd", help="sgd: the eNTK; signgd / asym_signgd: Malladi et al.'s "
      "SignGD kernels (their Adam approximation; explicit Jacobians, --method func)")
    a("--binary_logit", action="store_true", help="two classes: the kernel of the logit difference f_1 - f_0 "
      "(labels +-1), as their --binary_classification; needed by the svc and asym solvers")
    a("--asym_gamma", type=float, default=1.0, help="the asymmetric solver's gamma")
    a("--asym_lambda", type=float, default=0.5, help="the asymmetric solver's mix of its two predictions, in [0, 1]")
    a("--solver_settings", choices=("dev", "fixed"), help="dev (the default with --k_shot): every solver's settings "
      "chosen per run on the k-shot val split from GRID, as their gather_result.py (the val x train kernel is "
      "computed too); fixed: --ridge, --asym_gamma, --asym_lambda only (the only choice without --k_shot)")
    a("--test_block", type=int, help="test (and val) examples per pass beside the train set: the test side is "
      "computed in blocks, so its time and memory grow with the number of test examples, not its square "
      "(default: the train set's size, at least 64)")
    a("--solve", metavar="KERNELS", help="only run the solvers again on a saved kernels.npz (or its folder), with "
      "this --ridge / --asym_gamma / --asym_lambda; writes solvers.json beside it")


def check_flags(args, n_classes):
    """The view's flags against each other, the task's class count and ntk.py's --method."""
    if args.binary_logit and n_classes != 2:
        die(f"--binary_logit needs two classes; {args.task} has {n_classes}: drop it")
    if args.kernel != "sgd" and args.method != "func":
        die(f"--kernel {args.kernel} needs the explicit Jacobians of --method func (not {args.method})")
    if not (0 <= args.asym_lambda <= 1 and args.asym_gamma > 0 and math.isfinite(args.asym_gamma)):
        die(f"--asym_lambda {args.asym_lambda} / --asym_gamma {args.asym_gamma}: lambda in [0, 1], gamma > 0")
    if args.solver_settings == "dev" and not args.k_shot:
        die("--solver_settings dev chooses on the k-shot val split: add --k_shot K --data_seed S, or pass "
            "--solver_settings fixed")
    args.solver_settings = args.solver_settings or ("dev" if args.k_shot else "fixed")
    if args.test_block is not None and args.test_block < 1:
        die(f"--test_block {args.test_block}: must be >= 1 (test examples per pass)")


# ---------------------------------------------------------------- the kernels
def logit_map(C, binary):
    """D: the outputs the kernel is of, as rows over the head's C logits: the logits themselves (I_C), or with
    --binary_logit their difference f_1 - f_0 (D = [[-1, 1]], labels +-1), as Malladi et al.'s binary option."""
    return np.array([[-1.0, 1.0]]) if binary else np.eye(C)


def head_part(phi_a, phi_b, D, kind):
    """P: the head's (V, b) share of the kernel of D f. d(Df)_o / dV = D[o]^T phi(x) and d(Df)_o / db = D[o]; D's
    entries are 0 or +-1, so sign(D[o, c] phi_k) = D[o, c] sign(phi_k) and every kind is DD^T times
    (<phi_a, phi_b> + 1) with the signs its kind takes: sgd none, signgd both, asym_signgd the first (a) only."""
    sa = phi_a if kind == "sgd" else np.sign(phi_a)
    sb = np.sign(phi_b) if kind == "signgd" else phi_b
    return np.einsum("ij,ck->icjk", sa @ sb.T + 1.0, D @ D.T)


def blocks_of(xs, block):
    """xs in consecutive blocks of at most `block` examples (None: one block); at least one block, maybe empty."""
    block = block or max(len(xs), 1)
    return [xs[i:i + block] for i in range(0, len(xs), block)] or [xs[:0]]


def f_sign(ntk, model, xs_tr, xs_te, kind, D, pad_id, batch_size=8, max_memory_gb=4.0, progress=False, block=None):
    """The backbone's share of the SignGD kernels, from explicit Jacobians of D f (ntk.jacobian_chunks; the
    structured engine never forms them), the attention key biases left out (their gradient is zero).
    -> F_train [n,O,n,O], F_test [m,O,n,O], F_flip (asym_signgd) or None.
    signgd: <sign g_a, sign g_b>. asym_signgd (their approximation of Adam's early steps): F_train[i, j] =
    <sign g_i, g_j> and F_test[t, i] = <sign g_i, g_t> (the train gradient signed: their eval kernel),
    F_flip[t, i] = <sign g_t, g_i> (their 'flipped' kernel). The test examples go `block` at a time beside the
    train set (blocks_of), the train x train kernel taken with the first block: the Jacobians held are of
    n + block examples, so the cost grows with m, not m^2 (each pass splits the parameters into chunks that fit
    --max_memory_gb, fewer the fewer its rows)."""
    W = model.head.weight.detach()
    V = torch.as_tensor(D, dtype=W.dtype, device=W.device) @ W
    # a bias added to every key shifts all of a query's scores alike, and softmax ignores that: its gradient is
    # exactly zero, computed as rounding noise of either sign, whose signs would add noise to the kernel
    skip = {n for n, _ in model.encoder.named_parameters() if n.endswith("attention.self.key.bias")}
    n_out, n = len(D), len(xs_tr) * len(D)
    zeros = lambda r: torch.zeros(r, n, dtype=torch.float64, device=W.device)
    Ktr, Kte, Kfl = zeros(n), [], []
    for b, xs_b in enumerate(blocks_of(xs_te, block)):
        Kb, Kf = zeros(len(xs_b) * n_out), zeros(len(xs_b) * n_out) if kind == "asym_signgd" else None
        for J in ntk.jacobian_chunks(model, xs_tr + xs_b, pad_id, V, batch_size, max_memory_gb, progress, skip):
            Jtr, Jte = J[:n], J[n:]
            if kind == "signgd":
                J.sign_()
                Str = Jtr
            else:
                Str = Jtr.sign()
                ntk.accumulate(Kf, Jte, Jtr, op=torch.sign)
            if b == 0:
                ntk.accumulate(Ktr, Str, Jtr)
            ntk.accumulate(Kb, Jte, Str)
        Kte.append(Kb.cpu())
        Kfl.append(None if Kf is None else Kf.cpu())
    shape = lambda K, a: K.cpu().numpy().reshape(a, n_out, len(xs_tr), n_out)
    flip = None if kind != "asym_signgd" else shape(torch.cat(Kfl), len(xs_te))
    return shape(Ktr, len(xs_tr)), shape(torch.cat(Kte), len(xs_te)), flip


def view_kernels(ntk, model, xs_tr, xs_te, kind, D, pad_id=0, method="func", batch_size=8, max_memory_gb=4.0,
                 progress=False, block=None):
    """-> {'train': (P, F) [n,O,n,O], 'test': (P, F) [m,O,n,O], and for asym_signgd 'flip': (P, F)} for outputs
    D f. sgd: the eNTK by any engine, train x train, then each block of test examples x train, then D K D^T over
    the classes (exact: the SGD kernel is bilinear in the outputs); the SignGD kinds by f_sign. `block`: test
    examples per pass (None: all at once); time and memory grow with their number, never with its square. ntk: the
    ntk module (its kernels, features, jacobian_chunks and accumulate)."""
    was = model.training
    model.eval()
    try:
        if kind == "sgd":
            kw = dict(pad_id=pad_id, method=method, batch_size=batch_size, max_memory_gb=max_memory_gb,
                      progress=progress)
            dk = lambda PF: tuple(np.einsum("icjk,oc,pk->iojp", K, D, D) for K in PF)
            tr = dk(ntk.kernels(model, xs_tr, None, **kw))
            te = [dk(ntk.kernels(model, xs_b, xs_tr, **kw)) for xs_b in blocks_of(xs_te, block) if xs_b]
            empty = np.zeros((0,) + tr[0].shape[1:])
            te = tuple(np.concatenate([t[i] for t in te]) if te else empty for i in range(2))
            return {"train": tr, "test": te}
        F_tr, F_te, F_fl = f_sign(ntk, model, xs_tr, xs_te, kind, D, pad_id, batch_size, max_memory_gb, progress,
                                  block)
        phi_tr, phi_te = ntk.features(model, xs_tr, pad_id), ntk.features(model, xs_te, pad_id)
        out = {"train": (head_part(phi_tr, phi_tr, D, kind), F_tr),
               "test": (head_part(phi_tr, phi_te, D, kind).transpose(2, 3, 0, 1), F_te)}  # train side signed
        if F_fl is not None:
            out["flip"] = (head_part(phi_te, phi_tr, D, kind), F_fl)
        return out
    finally:
        model.train(was)


# ---------------------------------------------------------------- solvers
# What --ridge reaches, in ntk.py's run record: a result made when it reached least squares, SVC and the asymmetric
# solver only (logistic regression on the raw kernel, the asymmetric train scores on K + ridge) is not reused.
RIDGE_ON = "every solver's train kernel"


def flat(K):
    """[A, O, B, O] -> the [A*O, B*O] matrix (ntk.py's spectrum too)."""
    a, c, b, d = K.shape
    return K.reshape(a * c, b * d)


def targets(y, n_out):
    """Their regression targets: one-hot over the C logits, or +-1 for the single logit (O = 1)."""
    return (2.0 * np.asarray(y) - 1)[:, None] if n_out == 1 else np.eye(n_out)[y]


def pair_targets(y, n_out):
    """Their classifiers' 0/1 targets, one per (example, output) pair in flat's order: the labels themselves on a
    single logit, else 1 where the output is the example's label (their code flattens the kernel to pairs)."""
    return np.asarray(y) if n_out == 1 else np.eye(n_out)[y].ravel()


def classes(scores):
    """[N, O] scores -> classes: the sign of the single logit, else the argmax (the first on a tie, as theirs)."""
    return (scores[:, 0] > 0).astype(int) if scores.shape[1] == 1 else scores.argmax(1)


def regularized(M, ridge):
    """Their get_regularized_kernel: M + ridge * ||M||_2 I, the train matrix every solver of theirs fits to
    (predictions, on the train set too, use the kernels as they are) -> (that matrix, the amount added)."""
    lam = float(ridge * np.linalg.norm(M, 2)) if ridge else 0.0
    return M + lam * np.eye(len(M)), lam


def lstsq_scores(K, y_tr, ridge, f0=None, scale=0.0):
    """Their least-squares solver on {'train': K_tr, split: K_split, ...} -> ({split: scores [N, O]}, the ridge
    added): (K_tr + ridge * ||K_tr||_2 I) alpha = Y on the [N*O, N*O] train kernel (minimum-norm least squares, so
    ridge 0 works too), scores K_split alpha. f0 ({split: [N, O]}) with scale s > 0 is their --adjust_for_init with
    --f0_scaling s: fitted to Y - f0/s, f0/s added back to every split's scores (s = 0: off, as theirs)."""
    n_out = K["train"].shape[1]
    M, lam = regularized(flat(K["train"]), ridge)
    shift = (lambda sp: f0[sp] / scale) if f0 is not None and scale > 0 else (lambda sp: 0.0)
    alpha = np.linalg.lstsq(M, (targets(y_tr, n_out) - shift("train")).ravel(), rcond=None)[0]
    return {sp: (flat(Ks) @ alpha).reshape(len(Ks), n_out) + shift(sp) for sp, Ks in K.items()}, lam


def accuracy(scores, y):
    return float((classes(scores) == np.asarray(y)).mean())


def kernel_regression(K_tr, K_te, y_tr, y_te, ridge, f0_tr=None, f0_te=None):
    """lstsq_scores on train and test with a fixed ridge; with f0 fitted to Y - f0 and f0 added back (their
    --adjust_for_init at --f0_scaling 1). Class accuracy (argmax, or the sign of a single logit)."""
    f0 = None if f0_tr is None else {"train": f0_tr, "test": f0_te}
    sc, lam = lstsq_scores({"train": K_tr, "test": K_te}, y_tr, ridge, f0, 1.0)
    return {"train": accuracy(sc["train"], y_tr), "test": accuracy(sc["test"], y_te), "ridge": lam}


def logistic_fit(X_tr, t_tr, ridge):
    """Their logistic solver's fit: LogisticRegressionCV(max_iter=10000, random_state=0) on the train kernel's rows +
    ridge * ||K||_2 on the diagonal (fewer than 5 folds only when the rarer target has fewer than 5 pairs)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV

    folds = int(min(5, np.bincount(np.asarray(t_tr).astype(int)).min()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)  # sklearn 1.9's notices about its attributes
        clf = LogisticRegressionCV(max_iter=10000, cv=max(folds, 2), random_state=0)
        return clf.fit(regularized(X_tr, ridge)[0], t_tr)


def pair_logreg(K_tr, K_te, y_tr, y_te, ridge):
    """The paper's metric (its kernel_solvers 'logistic'): one sample per (example, class) pair, features its
    kernel row, target 1 if the class is the example's label. Accuracy is over PAIRS, not examples (with C
    classes, 'never the label' alone scores 1 - 1/C); argmax of the pair scores gives a class accuracy too. On a
    single-logit kernel (O = 1) a pair is an example and both accuracies are the class accuracy.
    Fit as the authors' code does (Malladi et al.'s and Tomihari and Sato's alike): LogisticRegressionCV(
    max_iter=10000, random_state=0) on the train kernel's rows plus ridge * ||K||_2 on the diagonal (their
    --kernel_regularization; 0 gives the raw rows), scored on the kernels as they are (scikit-learn's default grid
    of 10 Cs and 5 stratified folds; fewer folds only when the rarer target has fewer than 5 pairs)."""
    n_out = K_tr.shape[1]
    X_tr, X_te = flat(K_tr), flat(K_te)
    t_tr, t_te = pair_targets(y_tr, n_out), pair_targets(y_te, n_out)
    if len(np.unique(t_tr)) < 2:
        return {"train": None, "test": None, "train_class": None, "test_class": None}
    clf = logistic_fit(X_tr, t_tr, ridge)
    cls = lambda X, y: float((classes(clf.decision_function(X).reshape(len(y), n_out)) == y).mean())
    return {"train": float(clf.score(X_tr, t_tr)), "test": float(clf.score(X_te, t_te)),
            "train_class": cls(X_tr, y_tr), "test_class": cls(X_te, y_te)}


def svc_scores(K, y_tr, ridge):
    """Their SVC solver on {'train': K_tr, split: K_split, ...}: scikit-learn's SVC (precomputed kernel, its default
    C = 1) fit to the train kernel + ridge * ||K||_2 I, one sample per (example, output) pair as their code flattens
    the kernel (pair_targets); each pair's 0/1 prediction mapped to -1/+1 -> {split: scores [N, O]}, or None when
    the train pairs have one target only (nothing to separate)."""
    from sklearn.svm import SVC

    n_out = K["train"].shape[1]
    t = pair_targets(y_tr, n_out)
    if len(np.unique(t)) < 2:
        return None
    clf = SVC(kernel="precomputed").fit(regularized(flat(K["train"]), ridge)[0], t)
    return {sp: 2.0 * clf.predict(flat(Ks)).reshape(len(Ks), n_out) - 1 for sp, Ks in K.items()}


def svc(K_tr, K_te, y_tr, y_te, ridge):
    """svc_scores as class accuracy: an example's class is the sign of its single logit, or on C logits the argmax
    over its pairs (the first class on a tie, e.g. when no pair is predicted 1, as their np.argmax)."""
    sc = svc_scores({"train": K_tr, "test": K_te}, y_tr, ridge)
    if sc is None:
        return {"skipped": "one class in the train set"}
    return {"train": accuracy(sc["train"], y_tr), "test": accuracy(sc["test"], y_te)}


def asym_fit(K_tr, y_tr, ridge, gamma=1.0, f0_tr=None, scale=0.0):
    """Their solver for the asymmetric SignGD kernel (single logit; their system without biases) -> the weights
    (alpha_i y_i, beta_i y_i) of the two predictions. With H_ij = y_i K_ij y_j (K + ridge ||K||_2 I: K_ij =
    <sign g_i, g_j>), solve [[I/gamma, H], [H^T, I/gamma]] [alpha; beta] = 1 (least squares). Their
    --adjust_for_init with --f0_scaling s > 0 replaces y by y - f0/s, in H and in the weights alike, as theirs."""
    M = regularized(K_tr[:, 0, :, 0], ridge)[0]
    Y = 2.0 * np.asarray(y_tr) - 1
    if f0_tr is not None and scale > 0:
        Y = Y - f0_tr[:, 0] / scale
    N = len(Y)
    H = Y[:, None] * M * Y[None, :]
    A = np.block([[np.eye(N) / gamma, H], [H.T, np.eye(N) / gamma]])
    sol = np.linalg.lstsq(A, np.ones(2 * N), rcond=None)[0]
    return sol[:N] * Y, sol[N:] * Y


def asym_score(K_ev, K_fl, w, lam=0.5, f0=None, scale=0.0):
    """lam * sum_i <sign g_i, g_x> alpha_i y_i + (1 - lam) * sum_i <sign g_x, g_i> beta_i y_i (+ f0/s): the first
    from K_ev [M, 1, N, 1] (rows: the examples scored, the train gradient signed), the second from K_fl (the
    scored example's gradient signed); w: asym_fit's weights. -> scores [M]."""
    a, b = w
    s = lam * K_ev[:, 0, :, 0] @ a + (1 - lam) * K_fl[:, 0, :, 0] @ b
    return s + f0[:, 0] / scale if f0 is not None and scale > 0 else s


def train_views(K_tr):
    """The train examples scored by the asymmetric solver: their eval kernel <sign g_i, g_x> is K_tr's transpose,
    their flipped one K_tr itself (both unregularised)."""
    return K_tr.transpose(2, 3, 0, 1), K_tr


def asym_scores(K_tr, K_te, K_fl, y_tr, ridge, gamma=1.0, lam=0.5):
    """asym_fit then asym_score -> the scores of the train and the test examples (no f0)."""
    w = asym_fit(K_tr, y_tr, ridge, gamma)
    return asym_score(*train_views(K_tr), w, lam), asym_score(K_te, K_fl, w, lam)


def asym_solver(K_tr, K_te, K_fl, y_tr, y_te, ridge, gamma=1.0, lam=0.5):
    """asym_scores as class accuracy (class 1 where the score is positive)."""
    s_tr, s_te = asym_scores(K_tr, K_te, K_fl, y_tr, ridge, gamma, lam)
    acc = lambda s, y: float(((s > 0).astype(int) == y).mean())
    return {"train": acc(s_tr, y_tr), "test": acc(s_te, y_te), "gamma": gamma, "lambda": lam}


def solve_all(K, y_tr, y_te, f0_tr, f0_te, kind, ridge, gamma=1.0, lam=0.5):
    """Every solver of theirs that applies to this kernel (K: {'train', 'test'[, 'flip']} -> [.., O, N, O]), each
    fit to the train kernel + ridge * ||K||_2 I as theirs: lstsq (their default), lstsq_init (fitted to y - f0,
    their --adjust_for_init), logistic and svc (on C logits pair-level, as their code flattens every kernel),
    asym (asym_signgd, single logit). -> {solver: {train, test, ...} or {'skipped': why}}; class accuracy."""
    tr, te = K["train"], K["test"]
    lr = pair_logreg(tr, te, y_tr, y_te, ridge)
    out = {"lstsq": kernel_regression(tr, te, y_tr, y_te, ridge),
           "lstsq_init": kernel_regression(tr, te, y_tr, y_te, ridge, f0_tr, f0_te),
           "logistic": ({"skipped": "one class in the train set"} if lr["train_class"] is None
                        else {"train": lr["train_class"], "test": lr["test_class"]}),
           "svc": svc(tr, te, y_tr, y_te, ridge)}
    single = "needs a single-logit kernel (--binary_logit, two classes)"
    out["asym"] = (asym_solver(tr, te, K["flip"], y_tr, y_te, ridge, gamma, lam)
                   if kind == "asym_signgd" and tr.shape[1] == 1
                   else {"skipped": single if kind == "asym_signgd" else "only for --kernel asym_signgd"})
    return out


# ---------------------------------------------------------------- solver settings chosen on the dev split
# Malladi et al. sweep their solvers' flags and keep, per data seed, the run with the best dev accuracy
# (tools/gather_result.py: the max of the dev metric over a seed's runs, ties to the first in output_dir order).
# The flags are run.py's: --kernel_regularization (ridge * ||K||_2 on the diagonal), --adjust_for_init with
# --f0_scaling s (fit y - f0/s, add f0/s back; their f0 term is off for s <= 0), --kernel_gamma and the asymmetric
# solver's lambda. Their code does not hold the values they swept: these are the kit's, a small grid.
GRID = {"ridge": (0.0, 1e-3, 1e-2, 1e-1), "f0_scaling": (0.0, 1.0, 10.0), "asym_gamma": (0.1, 1.0, 10.0),
        "asym_lambda": (0.0, 0.5, 1.0)}
# each solver's settings, in the order tried (a tie on val goes to the first); logistic and SVC take no f0 (their
# LogisticKernelSolver ignores the logits, their SVCKernelSolver refuses them)
SETTINGS = {"lstsq": ("ridge", "f0_scaling"), "logistic": ("ridge",), "svc": ("ridge",),
            "asym": ("ridge", "asym_gamma", "f0_scaling", "asym_lambda")}
SPLITS = ("train", "val", "test")
FLIP = {"val": "val_flip", "test": "flip"}  # the asymmetric kernels' flipped side of each split (ntk.py's names)


def grid_of(solver, grid):
    keys = SETTINGS[solver]
    return [dict(zip(keys, v)) for v in itertools.product(*(grid[k] for k in keys))]


def trials(solver, K, y, f0, grid):
    """(setting, {split: scores}) for every setting of one solver's grid, in grid order, on K {'train', 'val',
    'test'[, 'val_flip', 'flip']}; nothing when the solver cannot fit this train set."""
    ks, fits = {sp: K[sp] for sp in SPLITS}, {}
    for st in grid_of(solver, grid):
        if solver == "lstsq":
            yield st, lstsq_scores(ks, y["train"], st["ridge"], f0, st["f0_scaling"])[0]
        elif solver in ("logistic", "svc"):
            sc = (logistic_scores if solver == "logistic" else svc_scores)(ks, y["train"], st["ridge"])
            if sc is None:
                return
            yield st, sc
        else:  # asym: lambda only mixes the two predictions, so one fit serves every lambda
            fit = (st["ridge"], st["asym_gamma"], st["f0_scaling"])
            if fit not in fits:
                fits[fit] = asym_fit(K["train"], y["train"], *fit[:2], f0["train"], fit[2])
            w = fits[fit]
            views = {"train": train_views(K["train"])} | {sp: (K[sp], K[FLIP[sp]]) for sp in ("val", "test")}
            yield st, {sp: asym_score(*v, w, st["asym_lambda"], f0[sp], st["f0_scaling"])[:, None]
                       for sp, v in views.items()}


def logistic_scores(K, y_tr, ridge):
    """Their logistic solver on {'train': K_tr, split: K_split, ...}: one sample per (example, output) pair
    (logistic_fit) -> {split: decision scores [N, O]}, or None when the train pairs have one target only."""
    n_out = K["train"].shape[1]
    t = pair_targets(y_tr, n_out)
    if len(np.unique(t)) < 2:
        return None
    clf = logistic_fit(flat(K["train"]), t, ridge)
    return {sp: clf.decision_function(flat(Ks)).reshape(len(Ks), n_out) for sp, Ks in K.items()}


def applies(solver, kind, n_out):
    """None, or why the solver does not apply to this kernel."""
    if solver == "asym" and kind != "asym_signgd":
        return "only for --kernel asym_signgd"
    if solver == "asym" and n_out != 1:
        return "needs a single-logit kernel (--binary_logit, two classes)"
    return None


def best(rows):
    """The first row with the highest val accuracy (gather_result's choice; ties to the first tried) and how many
    rows share that accuracy."""
    top = max(r["val"] for r in rows)
    return next(r for r in rows if r["val"] == top), sum(r["val"] == top for r in rows)


def tune(K, y, f0, kind, grid=GRID):
    """Every solver's settings chosen on the k-shot dev split, as Malladi et al.'s gather_result.py: each setting of
    GRID fit to the train kernel and scored on val and test; per solver the best on val (ties: the first in grid
    order), and over all solvers the best of those (ties: lstsq, logistic, svc, asym in that order). K: {'train',
    'val', 'test'[, 'val_flip', 'flip']} [.., O, N, O]; y, f0: {split: labels / logits of D f at the start}.
    -> {'grid', 'solvers': {solver: {'setting', 'train', 'val', 'test', 'ties', 'trials'} or {'skipped'}},
        'chosen': {'solver', 'setting', 'train', 'val', 'test', 'ties'}}; class accuracy; ties: how many settings
    share the chosen one's val accuracy (the choice among them is by order, not by the data)."""
    n_out = K["train"].shape[1]
    out, pool = {}, []
    for solver in SETTINGS:
        why = applies(solver, kind, n_out)
        rows = [] if why else [st | {sp: accuracy(sc[sp], y[sp]) for sp in SPLITS}
                               for st, sc in trials(solver, K, y, f0, grid)]
        if not rows:
            out[solver] = {"skipped": why or "one class in the train set"}
            continue
        top, ties = best(rows)
        keys = SETTINGS[solver]
        out[solver] = {"setting": {k: top[k] for k in keys}, **{sp: top[sp] for sp in SPLITS}, "ties": ties,
                       "trials": [{k: r[k] for k in keys + ("val", "test")} for r in rows]}
        pool += [r | {"solver": solver} for r in rows]
    top, ties = best(pool)
    chosen = {"solver": top["solver"], "setting": {k: top[k] for k in SETTINGS[top["solver"]]},
              **{sp: top[sp] for sp in SPLITS}, "ties": ties}
    return {"grid": {k: list(v) for k, v in grid.items()}, "solvers": out, "chosen": chosen}


# ---------------------------------------------------------------- --solve
def solve_saved(args):
    """--solve: their solvers again on a saved kernels.npz (with this run's --ridge / --asym_gamma / --asym_lambda),
    and, where it holds the val kernels, their settings chosen on val again (unless --solver_settings fixed);
    prints them and writes solvers.json beside it."""
    path = Path(args.solve)
    path = path / "kernels.npz" if path.is_dir() else path
    try:
        z = dict(np.load(path, allow_pickle=False))
        kind = str(z["kind"])
        names = [k[2:] for k in z if k.startswith("P_")]  # train, test, flip and val, val_flip where saved
        K = {k: z[f"P_{k}"] + z[f"F_{k}"] for k in names}
        y = {sp: z[f"{sp}_labels"] for sp in SPLITS if f"{sp}_labels" in z}
        f0 = {sp: z[f"{sp}_logits"] for sp in y}
        if not {"train", "test"} <= set(K) or "test" not in f0:
            raise KeyError("P_train, P_test or test_logits")
    except (OSError, ValueError, KeyError) as e:
        die(f"cannot read {path} as an ntk.py kernels.npz ({type(e).__name__}: {e}); make it with ntk.py "
            f"(this kit's, which saves the kernel kind and test logits)")
    res = {"kernels": str(path), "kind": kind, "ridge": args.ridge, "asym_gamma": args.asym_gamma,
           "asym_lambda": args.asym_lambda,
           "solvers": solve_all(K, y["train"], y["test"], f0["train"], f0["test"], kind, args.ridge,
                                args.asym_gamma, args.asym_lambda)}
    if "val" in K and args.solver_settings != "fixed":
        res["tuned"] = tune(K, y, f0, kind)
    rundir.save_json(path.parent / "solvers.json", res)
    print_solvers(res["solvers"])
    if "tuned" in res:
        print_tuned(res["tuned"])
    print(f"  wrote {path.parent / 'solvers.json'}")
    return res


def print_solvers(sol):
    print(f"  {'solver':<12}{'train':>8}{'test':>8}")
    for name, r in sol.items():
        if "skipped" in r:
            print(f"  {name:<12}  skipped: {r['skipped']}")
        else:
            print(f"  {name:<12}{r['train']:>8.4f}{r['test']:>8.4f}")


def print_tuned(tuned):
    fmt = lambda st: ", ".join(f"{k} {v:g}" for k, v in st.items())
    print(f"  settings chosen on val      {'val':>8}{'test':>8}  ties  setting")
    for name, r in tuned["solvers"].items():
        if "skipped" not in r:
            print(f"  {name:<27}{r['val']:>8.4f}{r['test']:>8.4f}{r['ties']:>6}  {fmt(r['setting'])}")
    c = tuned["chosen"]
    print(f"  {'chosen: ' + c['solver']:<27}{c['val']:>8.4f}{c['test']:>8.4f}{c['ties']:>6}  {fmt(c['setting'])}")
