"""Linear probing (LP): frozen encoder features -> scikit-learn logistic regression head.

    python lp.py --task rte                       # writes ./lp_head.pt, lp_results.json, logits.npz, features.npz
    python lp.py --task cb --output_dir runs/cb/lp-seed1001 --C 1.0
    python lp.py --task rte --prompt --model roberta-base  # LP on prompt features, for prompt-based LP-FT

Features (eval mode, no grad, bf16 autocast on CUDA) are cached under --cache_dir, keyed by the model, pooling (or
--prompt), max length, subset and the content hash of the split's data file, so a rerun only refits. The head is
saved as plain tensors (weight [C,d], bias [C]) for ft.py --init; features.npz holds the test features (test_phi0
= test_phi: the backbone is frozen) and test_labels, as ft.py's. lp_results.json records a fingerprint (the flags
that change the result and the data's content hashes): a rerun with the same fingerprint skips, another stops with
one line naming what differs. One process at a time writes an output folder; a second one waits for it (parallel
jobs that need the same head) and then finds the head fit.
lp.py needs data.py and rundir.py; --prompt also prompts.py (imported only then). It imports no other stage script.
"""

import argparse
import hashlib
import re
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import data
import rundir
from rundir import die

MAX_FOLDS = 5  # LogisticRegressionCV's folds when every class has that many examples
# the flags that change the head, logits or lp_results.json (not where files go, nor the batch size)
RESULT_FLAGS = ("task", "model", "max_len", "pooling", "seed", "C", "max_train_samples", "max_eval_samples",
                "norm_curve", "binary_head", "k_shot", "data_seed", "prompt", "precision", "cv_scoring")
CS = np.logspace(-4, 4, 10)  # LogisticRegressionCV's default grid (Cs=10), the authors' too
CV_SCORINGS = {"accuracy": "accuracy", "log_loss": "neg_log_loss"}  # --cv_scoring -> scikit-learn's scorer


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--task", required=True, help=", ".join(data.TASKS))
    a("--model", help="hub name or directory (default: the embedded all-MiniLM-L6-v2)")
    a("--data_dir", help="folder with the official files (default: $LPFT_DATA, else ./data)")
    a("--max_len", type=int, default=data.MAX_LEN)
    a("--pooling", choices=["cls", "mean"], default=data.POOLING)
    a("--seed", type=int, default=data.SEED, help="seeds the --max_train_samples subset")
    a("--output_dir", default=".", help="where lp_head.pt, lp_results.json, logits.npz go (default: .)")
    a("--overwrite", action="store_true", help="refit and replace an existing head")
    a("--overwrite_cache", action="store_true", help="recompute cached features")
    a("--cache_dir", default="runs/cache", help="feature cache (default runs/cache)")
    a("--C", type=float, help=f"fixed inverse L2 strength (default: LogisticRegressionCV over 10 Cs, {MAX_FOLDS} "
                              f"folds, fewer when the smallest class has fewer examples)")
    a("--max_train_samples", type=int, help="seeded random subset of the train split")
    a("--max_eval_samples", type=int, help="seeded random subset of val/test (and OOD) splits")
    data.k_shot_flags(a)
    a("--prompt", action="store_true", default=None,
      help="features of prompt-based FT (ft.py --prompt): the MLM head's transform at the mask token of the task's "
           "template; needs a *ForMaskedLM model. The head then fits ft.py --prompt --init")
    a("--eval_batch_size", type=int, default=64)
    data.precision_flag(a)
    a("--cv_scoring", choices=CV_SCORINGS, default="log_loss",
      help="how cross-validation scores a C: log_loss (the kit's default: a continuous score, so a tiny change of "
           "the features rarely moves the choice; docs/results.md measures it) or accuracy (the authors'; --paper)")
    a("--binary_head", choices=["exact", "paper"], default="exact",
      help="two classes: 'exact' writes +-w/2 of scikit-learn's binomial fit at C (the head's logit gap is the LP "
           "model's); 'paper' the authors' head: rows +-u/2 of the symmetric multinomial fit at C (gap u.x, half of "
           "their LP model's), which is half the exact head at 2C")
    a("--norm_curve", type=int, default=0, metavar="STEPS",
      help="also log ||V||_F along a full-batch gradient LP of STEPS steps (paper Fig. 1); 0: off")
    args = p.parse_args(argv)
    check_args(args)
    return args


def prompt_module():
    """prompts.py, imported only for --prompt: without that flag lp.py needs no more than data.py and rundir.py."""
    try:
        import prompts
    except ModuleNotFoundError as e:
        if e.name != "prompts":
            raise
        die("--prompt needs prompts.py beside lp.py (copy it from the kit), or drop --prompt")
    return prompts


def check_args(args):
    """Every flag and folder, before any data, model or file is touched."""
    data.get_task(args.task)
    args.model = data.model_id(args.model)
    rundir.check_positive(args, ["C", "max_train_samples", "max_eval_samples", "eval_batch_size", "norm_curve"],
                          allow_zero=("norm_curve",))
    data.check_k_shot(args)
    rundir.check_output_dir(args.output_dir)
    rundir.check_output_dir(args.cache_dir, "--cache_dir")
    data.check_max_len(args.model, args.max_len)
    args.precision = data.resolve_precision(args.precision)  # recorded as resolved: bf16 on CUDA, fp32 on a CPU
    if args.prompt:
        prompt_module().check_prompt(args.model, args.task, args.max_len, args.pooling)


# ---------------------------------------------------------------- what a run directory records
def fingerprint(args):
    """The flags that change the result plus the content hash of every data file (data_sha256 {split: sha256})."""
    files = data.data_files(args.task, args.data_dir)
    for path in files.values():
        if isinstance(path, Path) and not path.exists():
            die(f"missing data file {path}; put the official {args.task} files there (or pass --data_dir / set "
                f"LPFT_DATA to a folder with the layout of data/README.md)")
    fp = {k: getattr(args, k) for k in RESULT_FLAGS}
    if getattr(args, "k_shot_draw", None):  # a GLUE k-shot run (data.check_k_shot): which draw
        fp["k_shot_draw"] = args.k_shot_draw
    if args.prompt:
        fp["prompt_template"] = prompt_module().prompt_record(args.task)
    return fp | {"data_sha256": data.data_fingerprint(args.task, args.data_dir)}


def finished_head(out, fp, overwrite):
    """-> the saved result when `out` already holds the head for this fingerprint, else None (fit it).
    Stops with one line when `out` holds another setting's head or another script's run."""
    head_path, res_path = out / "lp_head.pt", out / "lp_results.json"
    other = [f for f in ("results.json", "run.json", "ckpt.pt") if (out / f).exists()]
    if other:
        die(f"{out} holds a run of ft.py or lora.py ({', '.join(other)}); pass lp.py its own --output_dir")
    if overwrite:
        return None
    old = rundir.read_json(res_path, "lp_results.json")
    if old is None:
        return None  # nothing fit yet (an lp_head.pt or logits.npz alone is a fit that was cut short)
    saved = old.get("fingerprint")
    if not isinstance(saved, dict):
        die(f"{res_path} holds a head for another setting (it records no data fingerprint: an older kit wrote it); "
            f"pass --output_dir DIR for this one, or --overwrite to refit")
    saved = rundir.upgrade_record(saved)  # data hashes recorded under an earlier key
    if rundir.config_diff(saved, fp):  # decided on the exact values; described with shortened hashes
        die(f"{res_path} holds a head for another setting ({rundir.describe_diff(saved, fp)}); pass --output_dir DIR "
            f"for this one, or --overwrite to replace it")
    return old if head_path.exists() and old.get("finished") else None


def fit_since(out, fp, start):
    """--overwrite: a head for this fingerprint written after `start` (by a job this one waited for) is kept."""
    res_path = out / "lp_results.json"
    if not res_path.exists() or res_path.stat().st_mtime < start:
        return None
    old = rundir.read_json(res_path, "lp_results.json")
    same = rundir.upgrade_record(old.get("fingerprint") or {}) == fp and old.get("finished")
    return old if same and (out / "lp_head.pt").exists() else None


def say_fit(old, head_path, how="already fit"):
    test = (old.get("metrics") or {}).get("test")
    print(f"{head_path}: {how} (C={old.get('C')}, test {test}); --overwrite to refit")


# ---------------------------------------------------------------- features
def cache_key(args, split, source_hash):
    """A cache file name that changes with the split's data file content and subset."""
    n = args.max_train_samples if split == "train" else args.max_eval_samples
    sub = "" if n is None else f"_n{n}" + (f"_s{args.seed}" if split == "train" else "")
    return f"{split}_{hashlib.sha256(source_hash.encode()).hexdigest()[:16]}{sub}.npy"


def source(split, fp):
    """The content hash of the data file a split comes from (val is cut from the train file unless the task ships
    one), from a fingerprint of this kit or an earlier one."""
    hashes = rundir.upgrade_record(fp)["data_sha256"]
    return hashes.get(split) or hashes["train"]


def save_npy(path, x):
    def write(t):
        with open(t, "wb") as f:  # a file object: np.save(name) would append .npy to the temporary name
            np.save(f, x)
    rundir.atomic(path, write)


def features(args, splits, fp):
    """-> {split: phi [N,d] float32}, cached per (task, model, max_len, pooling or --prompt, data file content, subset).
    Parallel jobs may compute the same file: each writes its own temporary file and renames it."""
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", args.model)
    how = args.pooling  # prompt features: keyed by the template too (an edited prompts.PROMPTS entry recomputes them)
    if args.prompt:
        how = "prompt" + hashlib.sha256(fp["prompt_template"].encode()).hexdigest()[:8]
    cache = Path(args.cache_dir) / args.task / f"{tag}_{how}_L{args.max_len}_{args.precision}"
    out, todo = {}, []
    for s, sp in splits.items():
        f = cache / cache_key(args, s, source(s, fp))
        if f.exists() and not args.overwrite_cache:
            try:
                x = np.load(f)
            except (OSError, ValueError):
                x = None  # a damaged cache file is simply recomputed
            if x is not None and x.shape[0] == len(sp):
                out[s] = x
                continue
        todo.append((s, f))
    if todo:
        if args.prompt:
            enc, tok, _, _ = prompt_module().load_prompt_encoder(args.model)
        else:
            enc, tok = data.load_encoder(args.model)
        enc.to(data.device()).eval()
        data.set_matmul_precision(args.precision)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        fn = lambda b: data.pool(enc(**b).last_hidden_state, b["attention_mask"], args.pooling)  # noqa: E731
        if cache.is_dir():
            rundir.clean_orphans(cache)
        for s, f in todo:
            e = (prompt_module().prompt_tokenize(tok, splits[s], args.max_len, args.task) if args.prompt
                 else data.tokenize(tok, splits[s], args.max_len))
            out[s] = data.extract(fn, e, pad, args.eval_batch_size, desc=f"features {s}", precision=args.precision)[0]
            save_npy(f, out[s])
        print(f"cached features in {cache}")
    return out


# ---------------------------------------------------------------- the head
def cv_folds(labels, task, C):
    """Every class must be in the train subset; cross-validation (no --C) needs >= 2 examples of each.
    -> the folds to use (None with a fixed C): MAX_FOLDS, or as many as the smallest class allows."""
    t = data.get_task(task)
    counts = np.bincount(labels, minlength=len(t.labels))
    more = "pass a larger --max_train_samples (or leave it out)"
    missing = [t.labels[c] for c in np.flatnonzero(counts == 0)]
    if missing:
        has = [f"'{t.labels[c]}'" for c in np.flatnonzero(counts)]
        die(f"the train subset ({len(labels)} examples) has only class{'es' * (len(has) > 1)} {', '.join(has)}, "
            f"no {', '.join(map(repr, missing))}; a {task} head needs all {len(t.labels)} classes: {more}")
    if C is not None:
        return None
    least = int(counts.argmin())
    if counts[least] < 2:
        die(f"class '{t.labels[least]}' has {counts[least]} example in the train subset; choosing C by "
            f"cross-validation needs at least 2 per class: {more}, or pass a fixed --C")
    return int(min(MAX_FOLDS, counts[least]))


def fit(x, y, C, n_classes, folds=MAX_FOLDS, binary_head="exact", scoring="log_loss"):
    """sklearn logistic regression -> (W [C,d], b [C], chosen C, classifier, logit_scale, cv) as a softmax head;
    softmax(logit_scale * (W phi + b)) is the fitted LP model's probability; cv: the cross-validation's margin
    (cv_margin), None with a fixed C.

    Two classes. scikit-learn fits one row w (binomial objective 0.5|w|^2 + C sum log(1 + exp(-y (w.x + b)))).
    'exact' writes the rows -w/2, +w/2: logit gap w.x + b, the LP model itself. 'paper' reproduces the authors'
    scikit-learn 1.0.1 LogisticRegressionCV(multi_class="multinomial"): the symmetric softmax fit with rows -u, +u
    (0.5 * 2|u|^2 + C sum CE, gap 2u.x) is the binomial fit at 2C with w = 2u, and their coef_to_tensor writes
    -u/2, +u/2, i.e. -w/4, +w/4 of the binomial fit at 2C: gap u.x, half their LP model's (logit_scale 2)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

    paper = n_classes == 2 and binary_head == "paper"
    k = 2.0 if paper else 1.0  # the multinomial objective at C is the binomial one at 2C (see above)
    cv = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if C is None:
            clf = LogisticRegressionCV(Cs=k * CS, cv=folds, l1_ratios=(0.0,), scoring=CV_SCORINGS[scoring],
                                       solver="lbfgs", max_iter=5000, use_legacy_attributes=False).fit(x, y)
            C, cv = float(clf.C_) / k, cv_margin(clf.scores_, scoring)
        else:
            clf = LogisticRegression(C=k * C, l1_ratio=0.0, solver="lbfgs", max_iter=5000).fit(x, y)
    W, b = clf.coef_.astype(np.float32), clf.intercept_.astype(np.float32)
    if len(clf.classes_) != n_classes:  # cv_folds checks this first; kept for callers of fit alone
        die(f"the train split has {len(clf.classes_)} classes, the task {n_classes}; use more --max_train_samples")
    if n_classes == 2:  # sklearn's one row -> two logits: +-w/2 (softmax = its sigmoid), or the authors' +-w/4
        h = 4 if paper else 2
        W, b = np.concatenate([-W / h, W / h]), np.concatenate([-b / h, b / h])
    return torch.from_numpy(W), torch.from_numpy(b), C, clf, k, cv


def cv_margin(scores, scoring):
    """How firmly cross-validation chose C: scores [folds, 1, len(CS)] (scikit-learn's scores_) -> the mean score
    of every C, the chosen one's (the first best, as scikit-learn picks) and the runner-up's (the best other C).
    A margin of one or two examples' accuracy is a choice rounding can flip (docs/results.md)."""
    mean = np.asarray(scores, np.float64).reshape(-1, len(CS)).mean(0)
    if scoring == "log_loss":
        mean = -mean  # scikit-learn's neg_log_loss: report the loss itself
    order = sorted(range(len(CS)), key=lambda i: (-mean[i] if scoring == "accuracy" else mean[i], i))
    best, second = order[0], order[1]
    return {"scoring": scoring, "Cs": CS.tolist(), "scores": mean.tolist(), "chosen_score": float(mean[best]),
            "runner_up_C": float(CS[second]), "runner_up_score": float(mean[second]),
            "margin": float(abs(mean[best] - mean[second]))}


def norm_curve(x, y, n_classes, C, steps, test=None):
    """||V||_F along full-batch LBFGS on the L2-regularised softmax loss 0.5 |V|^2 + C sum CE (scaled to the
    mean), from a zero head: scikit-learn's multinomial objective at C; with test = (features, labels) also the
    test accuracy of each iterate (Figure 1: norm and accuracy during LP). -> (norms, accuracies or [])."""
    x, y = torch.from_numpy(x).double(), torch.from_numpy(y)
    W = torch.zeros(n_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    # one iteration per step, but room for its line search: with max_iter=1 torch's default max_eval is 1, and a
    # line search that needs a second evaluation leaves W at 0 for ever (seen on SST-2's features)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=1, max_eval=25, history_size=20, line_search_fn="strong_wolfe")
    lam = 1.0 / (C * len(x))

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ W.T + b, y) + lam / 2 * W.square().sum()
        loss.backward()
        return loss

    x_test = None if test is None else torch.from_numpy(test[0]).double()

    @torch.no_grad()
    def accuracy():  # argmax of a zero head is class 0, as the untrained probe predicts
        return [] if test is None else [float(((x_test @ W.T + b).argmax(1).numpy() == test[1]).mean())]

    curve, acc = [0.0], accuracy()
    for _ in range(steps):
        opt.step(closure)
        curve.append(float(W.detach().norm()))
        acc += accuracy()
    return curve, acc


def plot_curve(curve, final, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot(range(len(curve)), curve)
    ax.axhline(final, ls="--", c="gray", label="sklearn head")
    ax.set(xlabel="LBFGS iteration", ylabel="||V||_F", title="head norm during LP")
    ax.legend()
    fig.tight_layout()
    rundir.atomic(path, lambda t: fig.savefig(t, format="png", dpi=120))
    plt.close(fig)


def fit_and_save(args, out, fp, splits, folds):
    task = data.get_task(args.task)
    y = splits["train"].labels
    feats = features(args, splits, fp)
    print(f"fitting logistic regression on {feats['train'].shape} features of {args.task}")
    W, b, C, clf, scale, cv = fit(feats["train"], y, args.C, len(task.labels), folds or MAX_FOLDS, args.binary_head,
                                  args.cv_scoring)

    logits = {s: (torch.from_numpy(f) @ W.T + b).numpy() for s, f in feats.items()}
    m = {s: data.metrics(args.task, lg, splits[s].labels) for s, lg in logits.items()}
    gap = np.abs(torch.softmax(scale * torch.from_numpy(logits["test"]), -1).numpy()
                 - clf.predict_proba(feats["test"]))
    norm = float(W.norm())
    res = {"config": {k: v for k, v in vars(args).items() if k not in ("overwrite", "overwrite_cache")},
           "fingerprint": fp, "C": C, "cv_folds": folds, "head_norm": norm, "metrics": m, "logit_scale": scale,
           "max_prob_gap_vs_sklearn": float(gap.max()), "cv": cv, "history": [], "best_epoch": 0, "finished": True}
    if folds is not None and folds < MAX_FOLDS:
        res["cv_note"] = (f"C chosen by {folds}-fold cross-validation, not {MAX_FOLDS}: the smallest class has "
                          f"{folds} examples in the train subset")
        print(f"warning: {res['cv_note']}")
    if args.norm_curve:
        # two classes: the two-row softmax objective at C' is the binomial one at 2C', so the curve runs at C/2 to
        # end at the exact head (the paper head is half of the model fit at C: its curve is halved)
        binary, paper = len(task.labels) == 2, args.binary_head == "paper"
        c_curve = C if (paper or not binary) else C / 2
        norms, acc = norm_curve(feats["train"], y, len(task.labels), c_curve, args.norm_curve,
                                (feats["test"], splits["test"].labels))
        res["norm_curve"] = [v / (scale if binary else 1.0) for v in norms]
        res["norm_curve_test_accuracy"] = acc
        plot_curve(res["norm_curve"], norm, out / "lp_norm_curve.png")

    head = {"weight": W, "bias": b, "task": args.task, "model": args.model, "max_len": args.max_len,
            "pooling": args.pooling, "labels": task.labels, "C": C, "head_norm": norm, "binary_head": args.binary_head,
            "metrics": {s: v["accuracy"] for s, v in m.items()}} | ({"prompt": True} if args.prompt else {})
    rundir.save_torch(out / "lp_head.pt", head)
    rundir.save_npz(out / "logits.npz", **{f"{s}_{k}": v for s in logits
                                            for k, v in (("logits", logits[s]), ("labels", splits[s].labels))})
    # the test features as ft.py saves them (report.py's t-SNE): before = after, the backbone is frozen
    rundir.save_npz(out / "features.npz", test_phi0=feats["test"], test_phi=feats["test"],
                    test_labels=splits["test"].labels)
    rundir.save_json(out / "lp_results.json", res)  # last: its presence means the head and logits are complete
    sel = task.select_metric
    print(f"LP {args.task}: C={C:.4g} ||V||_F={norm:.3f}  " + "  ".join(f"{s} {v[sel]:.4f}" for s, v in m.items()))
    if cv:
        print(f"  cross-validation ({cv['scoring']}): {cv['chosen_score']:.4f} at C={C:.4g}, runner-up "
              f"{cv['runner_up_score']:.4f} at C={cv['runner_up_C']:.4g} (margin {cv['margin']:.2g})")
    print(f"wrote {out / 'lp_head.pt'}")
    return res


@rundir.cli
def main(argv=None):
    args = parse(argv)
    out = Path(args.output_dir)
    fp = fingerprint(args)
    old = finished_head(out, fp, args.overwrite)
    if old is not None:
        say_fit(old, out / "lp_head.pt")
        return old
    splits = data.load_splits(args)
    folds = cv_folds(splits["train"].labels, args.task, args.C)  # a subset no head can be fit on stops here
    start = time.time()
    with rundir.RunLock(out, wait=True):  # parallel jobs needing the same head: one fits it, the others wait
        old = fit_since(out, fp, start) if args.overwrite else finished_head(out, fp, False)
        if old is not None:
            say_fit(old, out / "lp_head.pt", "fit by another process while this one waited")
            return old
        (out / "lp_results.json").unlink(missing_ok=True)  # first: never an old record beside a new head
        return fit_and_save(args, out, fp, splits, folds)


if __name__ == "__main__":
    main()
