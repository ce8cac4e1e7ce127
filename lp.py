"""Linear probing (LP): frozen encoder features -> scikit-learn logistic regression head.

    python lp.py --task rte                       # writes ./lp_head.pt, lp_results.json, logits.npz
    python lp.py --task cb --output_dir runs/cb/lp-seed1001 --C 1.0

Features (eval mode, no grad, bf16 autocast on CUDA) are cached under --cache_dir, so a rerun
only refits. The head is saved as plain tensors (weight [C,d], bias [C]) for ft.py --init.
"""

import argparse
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch

import data
from data import die


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--task", required=True, help=", ".join(data.TASKS))
    a("--model", help="hub name or directory (default: the embedded all-MiniLM-L6-v2)")
    a("--data_dir", help="folder with the official files (default: $LPFT_DATA, else ./data)")
    a("--max_len", type=int, default=128)
    a("--pooling", choices=["cls", "mean"], default="cls")
    a("--seed", type=int, default=1001, help="seeds the --max_train_samples subset")
    a("--output_dir", default=".", help="where lp_head.pt, lp_results.json, logits.npz go (default: .)")
    a("--overwrite", action="store_true", help="refit and replace an existing head")
    a("--overwrite_cache", action="store_true", help="recompute cached features")
    a("--cache_dir", default="runs/cache", help="feature cache (default runs/cache)")
    a("--C", type=float, help="fixed inverse L2 strength (default: LogisticRegressionCV over 10 Cs, 5 folds)")
    a("--max_train_samples", type=int, help="seeded random subset of the train split")
    a("--max_eval_samples", type=int, help="seeded random subset of val/test (and OOD) splits")
    a("--eval_batch_size", type=int, default=64)
    a("--norm_curve", type=int, default=0, metavar="STEPS",
      help="also log ||V||_F along a full-batch gradient LP of STEPS steps (paper Fig. 1); 0: off")
    return p.parse_args(argv)


def atomic(path, write):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # unique: parallel jobs may write the same file
    write(tmp)
    os.replace(tmp, path)


def save_np(path, x):
    with open(path, "wb") as f:
        (np.savez(f, **x) if isinstance(x, dict) else np.save(f, x))


def features(args, splits):
    """-> {split: phi [N,d] float32}, cached per (task, model, max_len, pooling, subset)."""
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", data.model_id(args.model))
    cache = Path(args.cache_dir) / args.task / f"{tag}_{args.pooling}_L{args.max_len}"
    sub = {"train": f"_n{args.max_train_samples}_s{args.seed}" if args.max_train_samples else ""}
    out, todo = {}, []
    for s, sp in splits.items():
        f = cache / f"{s}{sub.get(s, f'_n{args.max_eval_samples}' if args.max_eval_samples else '')}.npy"
        if f.exists() and not args.overwrite_cache:
            x = np.load(f)
            if len(x) == len(sp):
                out[s] = x
                continue
        todo.append((s, f))
    if todo:
        enc, tok = data.load_encoder(args.model)
        enc.to(data.device()).eval()
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        fn = lambda b: data.pool(enc(**b).last_hidden_state, b["attention_mask"], args.pooling)  # noqa: E731
        for s, f in todo:
            e = data.tokenize(tok, splits[s], args.max_len)
            out[s] = data.extract(fn, e, pad, args.eval_batch_size, desc=f"features {s}")[0]
            atomic(f, lambda t, x=out[s]: save_np(t, x))
        print(f"cached features in {cache}")
    return out


def fit(x, y, C, n_classes):
    """sklearn logistic regression -> (W [C,d], b [C], chosen C) as a softmax head."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if C is None:
            clf = LogisticRegressionCV(Cs=10, cv=5, l1_ratios=(0.0,), scoring="accuracy", solver="lbfgs",
                                       max_iter=5000, use_legacy_attributes=False).fit(x, y)
            C = float(clf.C_)
        else:
            clf = LogisticRegression(C=C, l1_ratio=0.0, solver="lbfgs", max_iter=5000).fit(x, y)
    W, b = clf.coef_.astype(np.float32), clf.intercept_.astype(np.float32)
    if len(clf.classes_) != n_classes:
        die(f"the train split has {len(clf.classes_)} classes, the task {n_classes}; use more --max_train_samples")
    if n_classes == 2:  # sklearn's one row -> two logits whose softmax is its sigmoid
        W, b = np.concatenate([-W / 2, W / 2]), np.concatenate([-b / 2, b / 2])
    return torch.from_numpy(W), torch.from_numpy(b), C, clf


def norm_curve(x, y, n_classes, C, steps):
    """||V||_F along full-batch gradient descent on the same L2-regularised softmax loss that
    sklearn minimises (loss = sum CE / (C n) * ... scaled to the mean), from a zero head."""
    x, y = torch.from_numpy(x).double(), torch.from_numpy(y)
    W = torch.zeros(n_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=1, history_size=20, line_search_fn="strong_wolfe")
    lam = 1.0 / (C * len(x))

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ W.T + b, y) + lam / 2 * W.square().sum()
        loss.backward()
        return loss

    curve = [0.0]
    for _ in range(steps):
        opt.step(closure)
        curve.append(float(W.detach().norm()))
    return curve


def main(argv=None):
    args = parse(argv)
    task = data.get_task(args.task)
    args.model = data.model_id(args.model)
    out = Path(args.output_dir)
    head_path, res_path = out / "lp_head.pt", out / "lp_results.json"
    cfg = {k: v for k, v in vars(args).items() if k not in ("overwrite", "overwrite_cache")}
    if res_path.exists() and head_path.exists() and not args.overwrite:
        old = json.loads(res_path.read_text())
        if old.get("config") == cfg:
            print(f"{head_path}: already fit (C={old['C']}, test {old['metrics']['test']}); --overwrite to refit")
            return old
        die(f"{head_path} holds a head for another setting (task {old['config']['task']}); "
            f"pass --output_dir DIR for this one, or --overwrite to replace it")

    splits = data.load_task(args.task, args.data_dir)
    splits["train"] = data.first_n(splits["train"], args.max_train_samples, args.seed)
    for s in [k for k in splits if k != "train"]:
        splits[s] = data.first_n(splits[s], args.max_eval_samples, 0)
    feats = features(args, splits)
    print(f"fitting logistic regression on {feats['train'].shape} features of {args.task}")
    W, b, C, clf = fit(feats["train"], splits["train"].labels, args.C, len(task.labels))

    logits = {s: (torch.from_numpy(f) @ W.T + b).numpy() for s, f in feats.items()}
    m = {s: data.metrics(args.task, lg, splits[s].labels) for s, lg in logits.items()}
    gap = np.abs(torch.softmax(torch.from_numpy(logits["test"]), -1).numpy() - clf.predict_proba(feats["test"]))
    norm = float(W.norm())
    res = {"config": cfg, "C": C, "head_norm": norm, "metrics": m, "max_prob_gap_vs_sklearn": float(gap.max()),
           "history": [], "best_epoch": 0, "finished": True}
    if args.norm_curve:
        res["norm_curve"] = norm_curve(feats["train"], splits["train"].labels, len(task.labels), C, args.norm_curve)
        plot_curve(res["norm_curve"], norm, out / "lp_norm_curve.png")

    head = {"weight": W, "bias": b, "task": args.task, "model": args.model, "max_len": args.max_len,
            "pooling": args.pooling, "labels": task.labels, "C": C, "head_norm": norm,
            "metrics": {s: v["accuracy"] for s, v in m.items()}}
    atomic(head_path, lambda t: torch.save(head, t))
    arrays = {f"{s}_{k}": v for s in logits for k, v in (("logits", logits[s]), ("labels", splits[s].labels))}
    atomic(out / "logits.npz", lambda t: save_np(t, arrays))
    atomic(res_path, lambda t: Path(t).write_text(json.dumps(res, indent=2)))
    sel = task.select_metric
    print(f"LP {args.task}: C={C:.4g} ||V||_F={norm:.3f}  " + "  ".join(f"{s} {v[sel]:.4f}" for s, v in m.items()))
    print(f"wrote {head_path}")
    return res


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
    atomic(path, lambda t: fig.savefig(t, format="png", dpi=120))
    plt.close(fig)


if __name__ == "__main__":
    main()
