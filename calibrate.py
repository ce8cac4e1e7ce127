"""Calibration of a run's logits: accuracy, NLL, Brier, ECE and MCE before and after temperature scaling.

    python calibrate.py runs/rte/lp_ft-seed1001 runs/rte/ft-seed1001        # calibration.json + reliability_*.png
    python calibrate.py runs/amazon/lp-seed1001 --optimizer adam --no_plots  # the paper's Adam fit of T

Reads logits.npz (lp.py, ft.py, lora.py: `<split>_logits` [N,C], `<split>_labels` [N]), fits one temperature T > 0
on val by minimising NLL, and reports every split but train (val, test, OOD sets) before and after dividing the
logits by T (paper Tables 3, 14, 15). ECE/MCE: `--bins` equal-width bins over the top-class confidence, a bin holds
lower < conf <= upper, empty bins are skipped. ECE and MCE are in percent; accuracy is a fraction as in results.json;
Brier is the multi-class score, mean over examples of sum_c (p_c - [y = c])^2. A rerun skips a run whose
calibration.json is newer than its logits.npz and has the same settings; --overwrite refits.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import rundir
from data import softmax  # the kit's one softmax (float64, / T)

T_MIN, T_MAX = 1e-3, 1e3  # a fit that ends at a bound means val NLL keeps falling there: T is not identified
GRAD_TOL = 1e-6  # |d NLL / d log T| below this counts as converged (LBFGS)
METRICS = ("accuracy", "nll", "brier", "ece", "mce")  # per split, before and after temperature scaling


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", help="run folders holding logits.npz")
    p.add_argument("--optimizer", choices=("lbfgs", "adam"), default="lbfgs",
                   help="lbfgs on log T (default); adam: the paper's (lr 1e-3, <= 1e5 steps, patience 10, from T=1)")
    p.add_argument("--bins", type=int, default=15, help="equal-width confidence bins for ECE, MCE and the diagrams")
    p.add_argument("--no_plots", action="store_true", help="do not write reliability_<split>.png")
    p.add_argument("--overwrite", action="store_true",
                   help="refit runs whose calibration.json is newer than their logits.npz (default: skip them)")
    args = p.parse_args(argv)
    if args.bins < 1:
        rundir.die(f"--bins {args.bins}: need at least 1 bin")
    return args


# ---------------------------------------------------------------- metrics (numpy, float64)
def bin_stats(probs, labels, bins=15):
    """-> (count, accuracy, mean confidence) per equal-width bin, NaN where empty; a bin holds lower < conf <= upper."""
    conf, correct = probs.max(1), probs.argmax(1) == labels
    b = np.clip(np.searchsorted(np.linspace(0, 1, bins + 1), conf, side="left") - 1, 0, bins - 1)
    n = np.bincount(b, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return n, np.bincount(b, correct, bins) / n, np.bincount(b, conf, bins) / n


def ece_mce(probs, labels, bins=15):
    """-> (ECE, MCE) in percent: count-weighted mean and max of |accuracy - confidence| over non-empty bins."""
    n, acc, conf = bin_stats(probs, labels, bins)
    gap = np.abs(acc - conf)[n > 0]
    return float(100 * (n[n > 0] * gap).sum() / n.sum()), float(100 * gap.max())


def nll(probs, labels):
    p = probs[np.arange(len(labels)), labels]
    return float(-np.log(np.maximum(p, np.finfo(np.float64).tiny)).mean())


def brier(probs, labels):
    return float(((probs - np.eye(probs.shape[1])[labels]) ** 2).sum(1).mean())


def metrics(logits, labels, T=1.0, bins=15):
    p = softmax(logits, T)
    ece, mce = ece_mce(p, labels, bins)
    return {"accuracy": float((p.argmax(1) == labels).mean()), "nll": nll(p, labels), "brier": brier(p, labels),
            "ece": ece, "mce": mce}


# ---------------------------------------------------------------- temperature scaling (torch, float64)
def fit_temperature(val_logits, val_labels, optimizer="lbfgs", lr=1e-3, max_steps=100_000, patience=10):
    """Minimise val NLL over one T in [T_MIN, T_MAX] -> (T, info: converged, steps, optimizer, nll_before/after, note).

    lbfgs: LBFGS with a strong-Wolfe line search on log T (T stays positive), converged when |dNLL/dlogT| < GRAD_TOL.
    adam: the paper's setting, Adam on T from 1, full-batch steps, stopped when NLL has not improved for `patience`
    steps (converged) or after max_steps (not). Either way T never raises val NLL above its value at T = 1.
    """
    if optimizer not in ("lbfgs", "adam"):
        rundir.die(f"unknown optimizer '{optimizer}'; choose lbfgs or adam")
    z = torch.as_tensor(np.asarray(val_logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(val_labels), dtype=torch.long)
    zy, zmax = z[torch.arange(len(y)), y], z.max(1, keepdim=True).values  # true-class and top logits
    lo, hi = float(np.log(T_MIN)), float(np.log(T_MAX))
    loss = lambda T: F.cross_entropy(z / T, y)
    with torch.no_grad():
        nll0 = loss(torch.tensor(1.0, dtype=torch.float64)).item()
    note = None
    if optimizer == "lbfgs":
        logt = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([logt], lr=1, max_iter=min(max_steps, 200), tolerance_grad=GRAD_TOL / 100,
                                tolerance_change=1e-15, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            v = loss(logt.clamp(lo, hi).exp())
            v.backward()
            return v
        opt.step(closure)
        steps = int(opt.state[logt].get("n_iter", 0))
        lt = torch.tensor(float(np.clip(logt.item(), lo, hi)), dtype=torch.float64, requires_grad=True)
        grad = torch.autograd.grad(loss(lt.exp()), lt)[0].item()
        T, converged = float(np.exp(lt.item())), abs(grad) < GRAD_TOL
        if not converged:
            note = f"LBFGS stopped after {steps} iterations with |dNLL/dlogT| = {abs(grad):.2g}"
    else:  # adam, by hand on a scalar: torch.optim.Adam's update without its per-step overhead (1e5 steps stay quick)
        t, m, v, best, T, bad, steps = 1.0, 0.0, 0.0, float("inf"), 1.0, 0, 0
        while steps < max_steps and bad < patience:
            e = torch.exp((z - zmax) / t)  # shifted by the row max: no overflow
            zs = e.sum(1)
            f, g = torch.stack([((zmax[:, 0] - zy) / t + zs.log()).mean(),  # NLL and dNLL/dT
                                (zy - (e * z).sum(1) / zs).mean() / t**2]).tolist()
            if f < best - 1e-12:
                best, T, bad = f, t, 0
            else:
                bad += 1
            steps += 1
            m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
            t -= lr * (m / (1 - 0.9**steps)) / (np.sqrt(v / (1 - 0.999**steps)) + 1e-8)
            t = min(max(t, T_MIN), T_MAX)
        converged = bad >= patience
        if not converged:
            note = f"Adam reached max_steps={max_steps} while val NLL was still falling"
    # NLL is convex in 1/T: its minimiser is T -> 0 iff every val example is right, T -> inf iff the logits are
    # on average no better than chance on val; a fit that ends at a bound has its optimum beyond it.
    why = None
    if bool((zy >= zmax[:, 0]).all()):
        why = "every val example is right, so val NLL falls all the way to T -> 0"
    elif (zy - z.mean(1)).mean().item() <= 0:
        why = "the logits are no better than chance on val, so val NLL falls towards T -> inf"
    elif T <= T_MIN * (1 + 1e-9) or T >= T_MAX * (1 - 1e-9):
        why = "val NLL keeps falling at the bound"
    if why:
        converged, note = False, f"{why} (stopped at T = {T:.3g}): T is not identified"
    with torch.no_grad():
        nll1 = loss(torch.tensor(T, dtype=torch.float64)).item()
    if nll1 > nll0:  # cannot happen for a converged fit; keep the guarantee anyway
        T, nll1, note = 1.0, nll0, (note or "") + "; kept T = 1 (the fit raised val NLL)"
    return T, {"optimizer": optimizer, "converged": bool(converged), "steps": steps, "nll_before": nll0,
               "nll_after": nll1, "note": note}


# ---------------------------------------------------------------- files
def load_logits(run_dir):
    """-> {split: (logits [N,C], labels [N])} for val, test and the OOD sets (not train), checked."""
    f = Path(run_dir) / "logits.npz"
    if not f.is_file():
        rundir.die(f"{f}: not found; give calibrate.py a run folder written by lp.py, ft.py or lora.py")
    try:
        with np.load(f) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as e:
        rundir.die(f"{f}: cannot read ({type(e).__name__}: {e}); rerun the job that wrote it")
    names = [k[: -len("_logits")] for k in arrays if k.endswith("_logits")]
    if "val" not in names:
        rundir.die(f"{f}: no val_logits, needed to fit the temperature; rerun the job (it writes val, test and OOD)")
    out = {}
    for s in ["val"] + (["test"] if "test" in names else []) + sorted(set(names) - {"val", "test", "train"}):
        z, y = arrays[f"{s}_logits"], arrays.get(f"{s}_labels")
        if y is None:
            rundir.die(f"{f}: {s}_logits has no {s}_labels")
        if z.ndim != 2 or z.shape[1] < 2 or not np.issubdtype(z.dtype, np.number):
            rundir.die(f"{f}: {s}_logits has shape {z.shape} and dtype {z.dtype}; want numbers [N, C] with C >= 2")
        if y.ndim != 1 or len(y) != len(z):
            rundir.die(f"{f}: mismatch: {s}_logits has {len(z)} rows but {s}_labels has shape {y.shape}")
        if len(y) == 0:
            rundir.die(f"{f}: split '{s}' is empty (0 examples)")
        if not np.isfinite(z).all():
            rundir.die(f"{f}: {s}_logits has {(~np.isfinite(z)).sum()} NaN or infinite values; the run diverged, "
                       f"rerun it with a lower --lr")
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= z.shape[1]:
            rundir.die(f"{f}: {s}_labels out of range: values {y.min()}..{y.max()} ({y.dtype}) for "
                       f"{z.shape[1]} classes; want integers in 0..{z.shape[1] - 1}")
        out[s] = (z, y.astype(np.int64))
    return out


def plot_reliability(z, y, T, bins, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(9, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    mid, w = (np.arange(bins) + 0.5) / bins, 1 / bins
    for col, (name, t) in enumerate((("before", 1.0), (f"after TS (T = {T:.3g})", T))):
        p = softmax(z, t)
        n, acc, conf = bin_stats(p, y, bins)
        ece, mce = ece_mce(p, y, bins)
        acc, conf = np.nan_to_num(acc), np.nan_to_num(conf)
        ax = axes[0, col]
        ax.bar(mid, acc, width=w, edgecolor="k", label="accuracy")
        ax.bar(mid, conf - acc, bottom=acc, width=w, color="tab:red", alpha=0.3, edgecolor="tab:red", label="gap")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set(title=f"{name}: ECE {ece:.2f}%, MCE {mce:.2f}%", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
        ax.legend(loc="upper left")
        axes[1, col].bar(mid, n, width=w, color="gray", edgecolor="k")
        axes[1, col].set(xlabel="confidence", ylabel="count")
    fig.suptitle(title)
    fig.tight_layout()
    rundir.atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


# ---------------------------------------------------------------- driver
def calibrate_run(run_dir, optimizer="lbfgs", bins=15, plots=True, splits=None, **fit_kw):
    """Fit T on val, measure every split before and after, write calibration.json (+ PNGs) -> the result dict.
    splits: load_logits(run_dir) when the caller has checked it already."""
    run_dir = Path(run_dir)
    splits = splits or load_logits(run_dir)
    T, info = fit_temperature(*splits["val"], optimizer=optimizer, **fit_kw)
    res = {"run_dir": str(run_dir), "temperature": T, "converged": info["converged"], "optimizer": optimizer,
           "steps": info["steps"], "bins": bins, "fit": info, "splits": {}}
    for s, (z, y) in splits.items():
        res["splits"][s] = {"n": len(y), "before": metrics(z, y, 1.0, bins), "after": metrics(z, y, T, bins)}
        if plots and s != "val":
            plot_reliability(z, y, T, bins, run_dir / f"reliability_{s}.png",
                             f"{'/'.join(run_dir.parts[-2:])}: {s}")
    rundir.save_json(run_dir / "calibration.json", res)
    if not info["converged"]:
        print(f"warning: {run_dir}: the temperature fit did not converge: {info['note']}")
    return res


def print_table(results):
    print(f"{'run':<30} {'split':<9} {'n':>6} {'T':>8} {'acc':>6}   {'NLL':<13} {'Brier':<13} {'ECE %':<13} MCE %")
    for run, r in results.items():
        name = "/".join(Path(run).parts[-2:])
        T = f"{r['temperature']:.3f}" + ("" if r["converged"] else "*")
        for s, m in r["splits"].items():
            ba = [f"{m['before'][k]:.{p}f}->{m['after'][k]:.{p}f}" for k, p in
                  (("nll", 3), ("brier", 3), ("ece", 2), ("mce", 2))]
            print(f"{name:<30} {s:<9} {m['n']:>6} {T:>8} {100 * m['before']['accuracy']:>6.1f}   "
                  f"{ba[0]:<13} {ba[1]:<13} {ba[2]:<13} {ba[3]}")
    if not all(r["converged"] for r in results.values()):
        print("* the temperature fit did not converge (see the warning above)")


def done(run_dir, optimizer, bins, plots):
    """-> the saved result if calibration.json is up to date with logits.npz and these settings, else None."""
    f, logits = Path(run_dir) / "calibration.json", Path(run_dir) / "logits.npz"
    if not f.exists() or not logits.exists() or f.stat().st_mtime_ns < logits.stat().st_mtime_ns:
        return None
    try:
        res = json.loads(f.read_text())
    except (OSError, ValueError):
        return None  # a damaged calibration.json is derived data: it is simply refit
    if not well_formed(res) or res.get("optimizer") != optimizer or res.get("bins") != bins:
        return None
    if plots and any(not (Path(run_dir) / f"reliability_{s}.png").exists() for s in res["splits"] if s != "val"):
        return None
    return res


def well_formed(res):
    """The layout calibrate_run writes (what print_table and report.py read)."""
    num = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    if not isinstance(res, dict) or not num(res.get("temperature")) or not isinstance(res.get("converged"), bool):
        return False
    splits = res.get("splits")
    return isinstance(splits, dict) and all(
        isinstance(m, dict) and num(m.get("n")) and all(
            isinstance(m.get(w), dict) and all(num(m[w].get(k)) for k in METRICS) for w in ("before", "after"))
        for m in splits.values())


@rundir.cli
def main(argv=None):
    args = parse(argv)
    results, todo = {}, {}
    for d in args.run_dirs:  # every run is checked before any calibration.json is written
        old = None if args.overwrite else done(d, args.optimizer, args.bins, not args.no_plots)
        if old is not None:
            print(f"{d}: calibration.json is up to date (T={old['temperature']:.3f}); --overwrite to refit")
            results[d] = old
            continue
        rundir.check_output_dir(d, "run folder")
        todo[d] = load_logits(d)
    for d, splits in todo.items():
        results[d] = calibrate_run(d, args.optimizer, args.bins, not args.no_plots, splits=splits)
    print_table({d: results[d] for d in args.run_dirs})
    return {d: results[d] for d in args.run_dirs}


if __name__ == "__main__":
    main()
