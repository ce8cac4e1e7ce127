"""Gather every run under an output root into the paper's tables and figures.

    python report.py                      # reads runs/, writes runs/report.md, runs/report.csv, runs/*.png
    python report.py --root runs_paper

Reads results.json (ft.py, lora.py), lp_results.json (lp.py), calibration.json (calibrate.py) and
ntk_results.json (ntk.py). Learning rates are chosen per task and method by the best mean validation
metric over seeds (CoLA: MCC; ties: the lowest learning rate); test scores are never used to choose.
A run that diverged counts as a failed point. Missing runs show as "–".
"""

import argparse
import csv
import io
import json
import math
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

import data

METHODS = ["lp", "ft", "lp_ft", "lora", "lp_lora"]
NAMES = {"lp": "LP", "ft": "FT", "lp_ft": "LP-FT", "lora": "LoRA", "lp_lora": "LP-LoRA"}
DASH = "–"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs", help="output root of run_all.sh (default runs)")
    return p.parse_args(argv)


def read(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- collecting runs
def load_runs(root):
    """-> list of dicts, one per training run (LP included), with what the tables need."""
    rows = []
    for f in sorted(Path(root).rglob("*results.json")):
        if f.name not in ("results.json", "lp_results.json") or "cache" in f.parts:
            continue
        r = read(f)
        if not r or "config" not in r:
            continue
        c = r["config"]
        task = c.get("task")
        if task not in data.TASKS:
            continue
        sel = data.TASKS[task].select_metric
        method = "lp" if f.name == "lp_results.json" else c.get("method")
        row = {"dir": str(f.parent), "task": task, "method": method, "seed": c.get("seed"),
               "lr": c.get("lr"), "scale": c.get("head_scale", 1.0), "failed": r.get("failed"), "sel": sel}
        if not row["failed"]:
            m = r.get("metrics", {})
            row |= {"metrics": m, "val": m.get("val", {}).get(sel), "test": m.get("test", {}).get(sel),
                    "head_norm": r.get("head_norm")}
            hist = r.get("history") or []
            best = next((h for h in hist if h.get("epoch") == r.get("best_epoch")), None)
            if method != "lp" and best:
                row |= {k: best.get(k) for k in ("diff_f", "cs_f", "fdr_f")}
                row |= {"head_norm0": hist[0].get("head_norm"), "history": hist}
            if method == "lp":
                row["norm_curve"] = r.get("norm_curve")
        cal = read(f.parent / "calibration.json")
        if cal:
            row["calibration"] = cal
        rows.append(row)
    return rows


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return DASH
    sd = float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0
    return f"{100 * np.mean(xs):.1f} ± {100 * sd:.1f}"


def select_lr(rows):
    """rows of one (task, method) at head scale 1 -> (chosen lr or None, {lr: summary}).
    Best mean val over seeds; ties -> lowest lr; a group with a failed (diverged) seed is not eligible."""
    by = defaultdict(list)
    for r in rows:
        by[r["lr"]].append(r)
    summary = {}
    for lr, rs in by.items():
        ok = [r for r in rs if not r["failed"] and r.get("val") is not None]
        summary[lr] = {"val": float(np.mean([r["val"] for r in ok])) if ok else None,
                       "test": [r["test"] for r in ok], "seeds": len(rs), "failed": len(rs) - len(ok)}
    eligible = [lr for lr, s in summary.items() if s["failed"] == 0 and s["val"] is not None]
    if not eligible:
        return None, summary
    key = lambda lr: (-summary[lr]["val"], lr if lr is not None else 0)  # noqa: E731
    return min(eligible, key=key), summary


def paired(a, b):
    """a, b: {seed: value}. -> (mean of a - b over shared seeds, 95% t interval half-width or None, n)."""
    from scipy import stats

    seeds = sorted(set(a) & set(b))
    d = np.array([a[s] - b[s] for s in seeds], dtype=float)
    if len(d) == 0:
        return None, None, 0
    if len(d) < 2:
        return float(d.mean()), None, 1
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return float(d.mean()), float(half), len(d)


def fmt_pair(p, scale=100):
    m, h, n = p
    if m is None:
        return DASH
    if h is None:
        return f"{scale * m:+.1f} (n={n}, no interval)"
    return f"{scale * m:+.1f} [{scale * (m - h):+.1f}, {scale * (m + h):+.1f}] (n={n})"


def chosen_runs(rows):
    """-> ({(task, method): [runs at the chosen lr]}, grid tables, {(task, method): chosen lr})."""
    groups = defaultdict(list)
    for r in rows:
        if r["scale"] == 1.0:
            groups[(r["task"], r["method"])].append(r)
    chosen, grids, lrs = {}, {}, {}
    for k, rs in groups.items():
        lr, summ = select_lr(rs)
        grids[k], lrs[k] = summ, lr
        chosen[k] = [r for r in rs if r["lr"] == lr and not r["failed"]] if lr is not None or k[1] == "lp" else []
    return chosen, grids, lrs


# ---------------------------------------------------------------- tables
def table(header, body):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(x) for x in row) + " |" for row in body]
    return "\n".join(out)


def build(rows, root):
    chosen, grids, lrs = chosen_runs(rows)
    tasks = [t for t in data.TASKS if any(r["task"] == t for r in rows)]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    md, csvrows = [f"# LP-FT kit report ({root})", ""], []

    def emit(title, header, body, note=""):
        md.extend([f"## {title}", "", table(header, body), ""] + ([note, ""] if note else []))
        for row in body:
            for h, v in zip(header[1:], row[1:]):
                csvrows.append([title, row[0], h, v])

    # Table 8: test accuracy (CoLA: MCC)
    body = [[t] + [mean_std([r["test"] for r in chosen.get((t, m), [])]) for m in methods] for t in tasks]
    emit("Test performance (mean ± std over seeds; Table 8)", ["task"] + [NAMES[m] for m in methods], body,
         "Accuracy in percent, CoLA Matthews correlation x100; learning rate chosen on validation.")

    # Table 10: Amazon in- and out-of-distribution
    if "amazon" in tasks:
        ood = ["test"] + list(data.TASKS["amazon"].ood)
        body = [[NAMES[m]] + [mean_std([r["metrics"].get(s, {}).get("accuracy") for r in chosen.get(("amazon", m), [])])
                              for s in ood] for m in methods]
        emit("Amazon: ID and OOD accuracy (Table 10)", ["method", "Amazon (ID)"] + ood[1:], body)

    # Table 13: head norms
    body = []
    for t in tasks:
        for m in methods:
            rs = chosen.get((t, m), [])
            if rs:
                n0 = [r.get("head_norm0") for r in rs if r.get("head_norm0") is not None]
                body.append([f"{t} {NAMES[m]}", f"{np.mean(n0):.3f}" if n0 else DASH,
                             f"{np.mean([r['head_norm'] for r in rs]):.3f}"])
    emit("Head norm ||V||_F (Table 13)", ["run", "at start of FT", "at best epoch (LP: fitted)"], body)

    # Tables 1 and 12: feature change
    body = []
    for t in tasks:
        for m in [m for m in methods if m != "lp"]:
            rs = chosen.get((t, m), [])
            body.append([f"{t} {NAMES[m]}"] + [f"{np.mean([r[k] for r in rs]):.4f}" if rs else DASH
                                              for k in ("diff_f", "cs_f", "fdr_f")])
    emit("Feature change on test examples (Tables 1, 12)", ["run", "Diff(F)", "CS(F)", "FDR"], body,
         "Diff(F): mean ||phi_t(x) - phi_0(x)||; CS(F): mean pairwise cosine similarity; "
         "FDR (the kit's definition): tr(S_B)/tr(S_W).")

    # Table 3: calibration on test
    body = []
    for t in tasks:
        for m in methods:
            cals = [r["calibration"] for r in chosen.get((t, m), []) if r.get("calibration")]
            vals = [[c_split(c, k) for c in cals] for k in (("before", "ece"), ("after", "ece"),
                                                             ("before", "mce"), ("after", "mce"))]
            if cals:
                body.append([f"{t} {NAMES[m]}"] + [f"{np.mean(v):.2f}" if None not in v else DASH for v in vals]
                            + [f"{np.mean([c.get('temperature', np.nan) for c in cals]):.3f}"
                               + ("" if all(c.get("converged", True) for c in cals) else "*")])
    emit("Calibration on test, percent (Table 3)", ["run", "ECE", "ECE (TS)", "MCE", "MCE (TS)", "T"], body,
         "T: mean fitted temperature over seeds; * a fit did not converge (T not identified, e.g. chance-level "
         "logits on val, whose NLL keeps falling as T grows; see calibration.json).")

    # Table 2: kernel statistics
    body = []
    for f in sorted(Path(root).rglob("ntk_results.json")):
        k = read(f)
        if k:
            body.append(ntk_row(f.parent.name, k))
    if body:
        emit("eNTK at the start of fine-tuning (Table 2)",
             ["run", "N", "rank P+F", "||P||_F", "||F||_F", "FT ratio", "||V||", "kernel reg.", "pair logreg"],
             body, "Test accuracy of kernel regression on P+F (classes) and of the paper's pair-level logistic "
             "regression (pairs); FT ratio = mean ||F delta|| / ||(P+F) delta||.")

    # norm scaling (Figure 3)
    body = [[f"{r['task']} {NAMES[r['method']]}", r["scale"], f"{r['head_norm0']:.3f}", f"{r['diff_f']:.4f}",
             f"{100 * r['test']:.1f}"]
            for r in sorted(rows, key=lambda r: (r["task"], r["method"], r["scale"]))
            if r["method"] != "lp" and not r["failed"] and r.get("diff_f") is not None
            and r["seed"] == min(x["seed"] for x in rows) and scaled_task(rows, r["task"])]
    if body:
        emit("Norm scaling: initial head norm vs feature change (Figure 3)",
             ["run", "head scale", "||V|| at start", "Diff(F)", "test"], body)

    # learning-rate grid and paired comparisons
    body = []
    for (t, m), summ in sorted(grids.items()):
        if m == "lp":
            continue
        for lr, s in sorted(summ.items(), key=lambda x: x[0] or 0):
            mark = "**chosen**" if lr == lrs[(t, m)] else ("failed" if s["failed"] else "")
            body.append([f"{t} {NAMES[m]}", f"{lr:g}", f"{100 * s['val']:.1f}" if s["val"] is not None else DASH,
                         mean_std(s["test"]), f"{s['seeds'] - s['failed']}/{s['seeds']}", mark])
    emit("Learning rates: mean val and test over seeds (chosen on val)",
         ["run", "lr", "val", "test", "seeds ok", ""], body)
    body = []
    for t in tasks:
        for a, b in (("lp_ft", "ft"), ("lp_lora", "lora")):
            A = {r["seed"]: r["test"] for r in chosen.get((t, a), [])}
            B = {r["seed"]: r["test"] for r in chosen.get((t, b), [])}
            if A or B:
                body.append([t, f"{NAMES[a]} − {NAMES[b]}", fmt_pair(paired(A, B))])
        for m in methods:
            cal = {r["seed"]: r["calibration"] for r in chosen.get((t, m), []) if r.get("calibration")}
            after = {s: c_split(c, ("after", "ece")) for s, c in cal.items()}
            before = {s: c_split(c, ("before", "ece")) for s, c in cal.items()}
            if cal and None not in after.values() and None not in before.values():
                body.append([t, f"{NAMES[m]} ECE after − before TS", fmt_pair(paired(after, before), 1)])
    emit("Paired differences by seed (mean [95% t interval])", ["task", "comparison", "difference"], body,
         "Test metric in points (x100); ECE in percentage points. An interval that excludes 0 is larger "
         "than the seed noise.")

    md += claims(rows, chosen, root)
    return "\n".join(md) + "\n", csvrows


def scaled_task(rows, task):
    return any(r["task"] == task and r["scale"] != 1.0 for r in rows)


def c_split(cal, key, split="test"):
    """calibration.json value for (before|after, metric) on a split, or None."""
    s = (cal.get("splits") or {}).get(split) or {}
    return (s.get(key[0]) or {}).get(key[1])


def ntk_row(name, k):
    """One row of Table 2 from ntk_results.json: kernels.{P,F,P+F}.{rank, fro, kernel_regression, ...}."""
    kern = lambda K: k.get("kernels", {}).get(K) or {}  # noqa: E731
    kr, pl = kern("P+F").get("kernel_regression") or {}, kern("P+F").get("pair_logreg") or {}
    f = lambda x, p=3: DASH if x is None else (f"{x:.{p}g}" if isinstance(x, float) else str(x))  # noqa: E731
    cfg = k.get("config", {})
    return [f"{cfg.get('task', '?')} {name}", f(cfg.get("n_train")), f(kern("P+F").get("rank")),
            f(kern("P").get("fro")), f(kern("F").get("fro")), f(k.get("ft_ratio")), f(k.get("head_norm")),
            f(kr.get("test")), f(pl.get("test"))]


def claims(rows, chosen, root):
    """The paper's claims, checked on these runs (yes / no / – when the runs are missing)."""
    out = ["## The paper's claims on these runs", ""]
    for t in sorted({r["task"] for r in rows}):
        ft_ = [r["diff_f"] for r in chosen.get((t, "ft"), [])]
        lpft = [r["diff_f"] for r in chosen.get((t, "lp_ft"), [])]
        if ft_ and lpft:
            out.append(f"- {t}: LP-FT changes features less than FT (Diff(F) {np.mean(lpft):.4f} vs "
                       f"{np.mean(ft_):.4f}): {'yes' if np.mean(lpft) < np.mean(ft_) else 'no'}")
        lp = chosen.get((t, "lp"), [])
        fresh = [r["head_norm0"] for r in chosen.get((t, "ft"), []) if r.get("head_norm0")]
        if lp and fresh:
            ratio = np.mean([r["head_norm"] for r in lp]) / np.mean(fresh)
            out.append(f"- {t}: the LP head norm is far larger than a fresh head's ({ratio:.1f}x): "
                       f"{'yes' if ratio > 3 else 'no'}")
        for m in ("lp", "lp_ft"):
            cals = [r["calibration"] for r in chosen.get((t, m), []) if r.get("calibration")]
            eb = [c_split(c, ("before", "ece")) for c in cals]
            ea = [c_split(c, ("after", "ece")) for c in cals]
            if cals and None not in eb + ea:
                out.append(f"- {t} {NAMES[m]}: temperature scaling lowers test ECE ({np.mean(eb):.2f} -> "
                           f"{np.mean(ea):.2f}): {'yes' if np.mean(ea) < np.mean(eb) else 'no'}")
    ntk = {p.parent.name: read(p) for p in Path(root).rglob("ntk_results.json")}
    for t in sorted({r["task"] for r in rows}):
        a, b = ([v.get("ft_ratio") for n, v in ntk.items()
                 if v and n.startswith(pre) and v.get("config", {}).get("task") == t]
                for pre in ("ntk-ft-", "ntk-lp_ft-"))
        if a and b and None not in a + b:
            out.append(f"- {t}: the FT ratio is larger after LP ({np.mean(b):.3f} vs {np.mean(a):.3f}): "
                       f"{'yes' if np.mean(b) > np.mean(a) else 'no'}")
    return out + [""]


# ---------------------------------------------------------------- figures
def plots(rows, root):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    lp = [r for r in rows if r["method"] == "lp" and r.get("norm_curve")]
    fts = [r for r in rows if r["method"] in ("ft", "lp_ft") and r.get("history") and r["scale"] == 1.0]
    if lp or fts:
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
        for r in lp:
            ax[0].plot(r["norm_curve"], label=f"{r['task']} s{r['seed']}")
        ax[0].set(xlabel="LBFGS iteration (full-batch LP)", ylabel="||V||_F", title="head norm during LP")
        for r in fts:
            h = r["history"]
            ax[1].plot([e["epoch"] for e in h], [e["head_norm"] for e in h], ls="-" if r["method"] == "ft" else "--",
                       label=f"{r['task']} {NAMES[r['method']]} s{r['seed']}")
        ax[1].set(xlabel="epoch", ylabel="||V||_F", title="head norm during FT", yscale="log")
        for a in ax:
            if a.lines:
                a.legend(fontsize=6)
        made.append(save(fig, root / "head_norm.png"))
    sc = [r for r in rows if r["method"] != "lp" and not r["failed"] and r.get("head_norm0")
          and scaled_task(rows, r["task"])]
    if sc:
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        for key in sorted({(r["task"], r["method"]) for r in sc}):
            rs = sorted([r for r in sc if (r["task"], r["method"]) == key], key=lambda r: r["head_norm0"])
            ax.plot([r["head_norm0"] for r in rs], [r["diff_f"] for r in rs], "o-", label=f"{key[0]} {NAMES[key[1]]}")
        ax.set(xscale="log", xlabel="||V||_F at the start of FT", ylabel="Diff(F)", title="norm scaling")
        ax.legend(fontsize=7)
        made.append(save(fig, root / "feature_change_vs_norm.png"))
    return made


def save(fig, path):
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def main(argv=None):
    args = parse(argv)
    root = Path(args.root)
    if not root.is_dir():
        data.die(f"no output root {root}; run bash run_all.sh first (or pass --root DIR)")
    rows = load_runs(root)
    md, csvrows = build(rows, root)
    figs = plots(rows, root)
    pngs = sorted(root.rglob("reliability_test.png"))[:2] + sorted(root.rglob("spectrum.png"))[:1]
    md += "\n## Figures\n\n" + "\n".join(f"![{p.stem}]({os.path.relpath(p, root)})" for p in figs + pngs) + "\n"
    buf = io.StringIO()
    csv.writer(buf).writerows([["table", "row", "column", "value"]] + csvrows)
    for name, text in (("report.md", md), ("report.csv", buf.getvalue())):
        tmp = root / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(text)
        os.replace(tmp, root / name)
    print(md)
    print(f"wrote {root / 'report.md'}, {root / 'report.csv'} ({len(rows)} runs)")
    return md


if __name__ == "__main__":
    main()
