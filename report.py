"""Gather every run under an output root into the paper's tables and figures.

    python report.py                      # reads runs/, writes runs/report.md, runs/report.csv, runs/*.png
    python report.py --root runs_paper

Reads results.json (ft.py, lora.py), lp_results.json (lp.py), calibration.json (calibrate.py) and
ntk_results.json (ntk.py); for the figures also kernels.npz (ntk.py), lp.py's feature cache, features.npz
(ft.py, lora.py: the test features before and after), lp_head.pt and model.safetensors (the classifier rows).
Every table and figure of Tomihari & Sato (2024) the runs can feed comes in the paper's order, each under one
line "fed by: ..." naming its runs; one whose runs are missing is one line "Missing: ..." (as is a missing part
of present runs). Learning rates are chosen per task and method
by the best mean validation metric over seeds (CoLA: MCC; ties: the lowest learning rate); test scores are never
used to choose. A run that diverged counts as a failed point. Missing values show as "–". Every file the report
could not use (corrupt, truncated, unfinished, of another shape) and every (task, method, lr) with fewer seeds than
the study are listed under "Runs not used" at the top of report.md and on stderr; a mean over fewer seeds than the
study says so with (n=k).
"""

import argparse
import csv
import io
import json
import math
import os
import re
import sys
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

import data

METHODS = ["lp", "ft", "lp_ft", "lora", "lp_lora"]
NAMES = {"lp": "LP", "ft": "FT", "lp_ft": "LP-FT", "lora": "LoRA", "lp_lora": "LP-LoRA"}
DASH = "–"
RESULTS = ("results.json", "lp_results.json", "ntk_results.json")
ARTIFACTS = ("ckpt.pt", "model.safetensors", "meta.json", "logits.npz", "lp_head.pt", "kernels.npz")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs", help="output root of run_all.sh (default runs)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- reading and checking files
def num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def read(path):
    """-> (object, None) or (None, why it cannot be read)."""
    try:
        return json.loads(Path(path).read_text()), None
    except (OSError, UnicodeDecodeError) as e:
        return None, f"cannot read ({type(e).__name__})"
    except ValueError as e:
        return None, f"corrupt or truncated JSON ({e.msg if hasattr(e, 'msg') else e})"


def run_problem(r, name):
    """Why a results.json / lp_results.json cannot be used, or None. A failed (diverged) run is usable."""
    if not isinstance(r, dict):
        return f"a JSON {type(r).__name__}, not a results object"
    c = r.get("config")
    if not isinstance(c, dict):
        return "no config"
    if c.get("task") not in data.TASKS:
        return f"unknown task {c.get('task')!r}"
    method = "lp" if name == "lp_results.json" else c.get("method")
    if isinstance(method, str) and method.startswith("prompt_"):
        return "a prompt-based run (--prompt): not one of the paper's methods, so no table reads it"
    if method not in METHODS:
        return f"unknown method {method!r}"
    if not isinstance(c.get("seed"), int) or not (c.get("lr") is None or num(c["lr"])) \
            or not num(c.get("head_scale", 1.0)):
        return "config lacks an integer seed or has a non-numeric lr or head_scale"
    if r.get("failed"):
        return None
    if r.get("finished") is not True:
        return "unfinished run (not marked finished)"
    m, sel = r.get("metrics"), data.TASKS[c["task"]].select_metric
    if not isinstance(m, dict) or not all(isinstance(v, dict) and all(num(x) for x in v.values()) for v in m.values()):
        return "metrics are missing or not numbers"
    if not all(num((m.get(s) or {}).get(sel)) for s in ("val", "test")) or not num(r.get("head_norm")):
        return f"no val/test {sel} or head_norm"
    if method == "lp":
        for k in ("norm_curve", "norm_curve_test_accuracy"):
            v = r.get(k)
            if not (v is None or isinstance(v, list) and all(num(x) for x in v)):
                return f"{k} is not a list of numbers"
        return None
    return history_problem(r)


def history_problem(r):
    hist = r.get("history")
    if not isinstance(hist, list) or not hist or not all(
            isinstance(h, dict) and num(h.get("epoch")) and num(h.get("head_norm")) for h in hist):
        return "history is missing or lacks epoch/head_norm numbers"
    best = next((h for h in hist if h["epoch"] == r.get("best_epoch")), None)
    if best is None or not all(num(best.get(k)) for k in ("diff_f", "cs_f", "fdr_f")):
        return "the best epoch's diff_f/cs_f/fdr_f are missing"
    return None


def calibration_problem(cal):
    import calibrate

    return None if calibrate.well_formed(cal) else "not the layout calibrate.py writes"


def ntk_problem(k):
    """Why an ntk_results.json cannot be used, or None."""
    if not isinstance(k, dict) or not isinstance(k.get("config"), dict):
        return "not an ntk.py result (no config)"
    if k["config"].get("task") not in data.TASKS:
        return f"unknown task {k['config'].get('task')!r}"
    kern = k.get("kernels")
    if not isinstance(kern, dict) or not all(isinstance(kern.get(K), dict) for K in ("P", "F", "P+F")):
        return "no kernels P, F, P+F"
    pf = kern["P+F"]
    stats = {"ft_ratio": k.get("ft_ratio"), "head_norm": k.get("head_norm"),
             "config.n_train": k["config"].get("n_train"), "kernels.P.fro": kern["P"].get("fro"),
             "kernels.F.fro": kern["F"].get("fro"), "kernels.P+F.rank": pf.get("rank")}
    for solver in ("kernel_regression", "pair_logreg"):
        v = pf.get(solver) or {}
        stats[f"kernels.P+F.{solver}.test"] = v.get("test") if isinstance(v, dict) else v
    bad = [f"{name} = {x!r}" for name, x in stats.items() if not (x is None or num(x))]
    return f"not a number: {', '.join(bad)}" if bad else None


# ---------------------------------------------------------------- collecting runs
@dataclass
class Study:
    """Everything the tables read: usable runs, NTK results, what was left out and why."""
    root: Path
    rows: list = field(default_factory=list)
    problems: list = field(default_factory=list)  # (path under root, why it was not used)
    seeds: list = field(default_factory=list)  # every seed of the study (head scale 1)
    short: list = field(default_factory=list)  # "task method lr: seeds ... (missing ...)"
    # filled by build: runs at the chosen lr per (task, method), the lr grids and choices, what is present
    chosen: dict = field(default_factory=dict)
    grids: dict = field(default_factory=dict)
    lrs: dict = field(default_factory=dict)
    tasks: list = field(default_factory=list)
    methods: list = field(default_factory=list)
    kernels: list = field(default_factory=list)  # one dict per usable ntk_results.json (kernel_info)
    kshot: list = field(default_factory=list)  # k-shot training runs (run_all.sh --kernel_study): their own table
    kshot_kernels: list = field(default_factory=list)  # ... and their kernels

    def runs(self, task, method):
        """The runs of a task and method at its chosen learning rate (head scale 1)."""
        return self.chosen.get((task, method), [])


def collect(root):
    s = Study(Path(root))
    rows = load_runs(root, s.problems)
    s.kshot = [r for r in rows if r["config"].get("k_shot")]  # Malladi et al.'s protocol: not the paper's study
    s.rows = [r for r in rows if not r["config"].get("k_shot")]
    for f in result_files(root, "ntk_results.json"):
        k, why = read(f)
        why = why or ntk_problem(k)
        if why:
            s.problems.append((rel(f, root), why))
        else:
            (s.kshot_kernels if k["config"].get("k_shot") else s.kernels).append(kernel_info(f.parent, k))
    s.problems += unfinished(root)
    s.seeds, s.short = seed_gaps(s.rows)
    return s


def kernel_info(d, k):
    """An ntk_results.json as the tables and figures read it. Its method: ntk.py's ntk_method, else the folder's name
    (ntk-<method>-...), else --init and --lora, as ntk.py names it."""
    c, name = k["config"], Path(d).name
    m = c.get("ntk_method")
    if m not in METHODS:
        m = next((x for x in METHODS if name.startswith(f"ntk-{x}-")), None) \
            or ("lp_" if c.get("init") else "") + ("lora" if c.get("lora") else "ft")
    scale = c.get("head_scale", 1.0)
    return {"dir": str(d), "task": c["task"], "method": m, "seed": c.get("seed"), "res": k,
            "scale": scale if num(scale) else None, "kind": c.get("kernel", "sgd")}


def paper_kernels(s):
    """The kernels the paper's tables and figures use: the eNTK (ntk.py --kernel sgd) at each method's start, head
    unscaled."""
    return [k for k in s.kernels if k["scale"] == 1.0 and k["kind"] == "sgd" and k["method"] in FT_METHODS]


def rel(path, root):
    return os.path.relpath(path, root)


def result_files(root, name):
    return [f for f in sorted(Path(root).rglob(name)) if "cache" not in f.relative_to(root).parts]


def unfinished(root):
    """Run folders with a job's files but no results file: killed or still running."""
    out = []
    for d in sorted({f.parent for a in ARTIFACTS for f in Path(root).rglob(a)}):
        if "cache" not in d.relative_to(root).parts and not any((d / n).exists() for n in RESULTS):
            out.append((rel(d, root) + "/", "unfinished run (no results file; still running or killed)"))
    return out


def load_runs(root, problems=None):
    """-> list of dicts, one per usable training run (LP included), with what the tables need. What cannot be
    used is appended to `problems` as (path, why)."""
    problems = [] if problems is None else problems
    rows, seen = [], {}
    files = result_files(root, "results.json") + result_files(root, "lp_results.json")
    for f in sorted(files):
        r, why = read(f)
        why = why or run_problem(r, f.name)
        if why:
            problems.append((rel(f, root), why))
            continue
        row = run_row(r, f)
        key = (row["task"], row["method"], row["lr"], row["scale"], row["seed"], row["config"].get("k_shot"),
               row["config"].get("data_seed"))
        if key in seen:
            problems.append((rel(f, root), f"the same task, method, lr, head scale, seed (and k-shot draw) as "
                                           f"{seen[key]}; not counted twice"))
            continue
        seen[key] = rel(f, root)
        cal_path = f.parent / "calibration.json"
        if cal_path.exists():
            cal, why = read(cal_path)
            why = why or calibration_problem(cal)
            logits = f.parent / "logits.npz"
            if not why and logits.exists() and cal_path.stat().st_mtime_ns < logits.stat().st_mtime_ns:
                why = "older than its logits.npz (the run was redone after calibration); rerun calibrate.py"
            if why:
                problems.append((rel(cal_path, root), why))
            else:
                row["calibration"] = cal
        rows.append(row)
    return rows


def run_row(r, f):
    c = r["config"]
    task, method = c["task"], "lp" if f.name == "lp_results.json" else c["method"]
    sel = data.TASKS[task].select_metric
    row = {"dir": str(f.parent), "task": task, "method": method, "seed": c["seed"], "lr": c.get("lr"),
           "scale": c.get("head_scale", 1.0), "failed": r.get("failed"), "sel": sel, "config": c,
           "fingerprint": r.get("fingerprint")}
    if row["failed"]:
        return row
    m = r["metrics"]
    row |= {"metrics": m, "val": m["val"][sel], "test": m["test"][sel], "head_norm": r["head_norm"]}
    if method == "lp":
        row |= {"norm_curve": r.get("norm_curve"), "norm_curve_test_accuracy": r.get("norm_curve_test_accuracy")}
    else:
        hist = r["history"]
        best = next(h for h in hist if h["epoch"] == r["best_epoch"])
        row |= {k: best[k] for k in ("diff_f", "cs_f", "fdr_f")}
        row |= {"head_norm0": hist[0]["head_norm"], "history": hist,
                "features": best.get("features") or {"test": {k: best[k] for k in ("diff_f", "cs_f", "fdr_f")}}}
    return row


def seed_gaps(rows):
    """-> (the study's seeds, one line per (task, method, lr) with fewer of them than the study)."""
    groups = defaultdict(set)
    for r in rows:
        if r["scale"] == 1.0:
            groups[(r["task"], r["method"], r["lr"])].add(r["seed"])
    seeds = sorted(set().union(*groups.values())) if groups else []
    short = []
    for (t, m, lr), have in sorted(groups.items(), key=lambda x: (x[0][0], x[0][1], x[0][2] or 0)):
        if len(have) < len(seeds):
            lr_txt = "" if lr is None else f" lr {lr:g}"
            short.append(f"{t} {NAMES[m]}{lr_txt}: seeds {', '.join(map(str, sorted(have)))} "
                         f"(missing {', '.join(map(str, sorted(set(seeds) - have)))})")
    return seeds, short


# ---------------------------------------------------------------- statistics
def mean_std(xs, expect=0, scale=100, spec=".1f"):
    """'mean ± std' over seeds, each value times `scale` (default: a fraction shown in percent) in format `spec`;
    '(n=k)' when fewer than `expect` values (or one) are left. Values that are not numbers are left out."""
    xs = [x for x in xs if num(x)]
    if not xs:
        return DASH
    if len(xs) == 1:
        return f"{scale * xs[0]:{spec}} (n=1)"
    n = f" (n={len(xs)})" if len(xs) < expect else ""
    m, sd = scale * np.mean(xs), scale * float(np.std(xs, ddof=1))
    sd = 0.0 if sd <= 1e-12 * abs(m) else sd  # equal values: rounding noise (9e-19) is no spread
    return f"{m:{spec}} ± {sd:{spec}}{n}"


def ms(s, xs, spec=".3g"):
    """mean ± std of plain values (norms, similarities, ratios) over the study's seeds."""
    return mean_std(xs, len(s.seeds), 1, spec)


def pick(d, *path):
    """d[path[0]][path[1]]... when every step is a dict and the end a finite number, else None."""
    for p in path:
        d = d.get(p) if isinstance(d, dict) else None
    return d if num(d) else None


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


def fmt_pair(p, scale=100, spec="+.1f"):
    """(mean, half-width, n) -> 'mean [low, high] (n=k)', each value times `scale` in format `spec`."""
    m, h, n = p
    if m is None:
        return DASH
    if h is None:
        return f"{scale * m:{spec}} (n={n}, no interval)"
    return f"{scale * m:{spec}} [{scale * (m - h):{spec}}, {scale * (m + h):{spec}}] (n={n})"


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


# ---------------------------------------------------------------- tables: each returns (title, fed, header, body, note)
# `fed` is the line under the title that names the runs and fields the table reads. A table whose runs are missing
# returns body None and the one line "Missing: ..." as its note, which stands in its place.
FT_METHODS = ["ft", "lora", "lp_ft", "lp_lora"]  # the fine-tuning methods, in the paper's row order (Tables 1, 2)


def table(header, body):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(x) for x in row) + " |" for row in body]
    return "\n".join(out)


def missing(title, why, width=5):
    """A table (width 5) or figure (width 4) whose runs are missing: its title and the one line that says so."""
    return (title,) + (None,) * (width - 2) + (f"Missing: {why}",)


def seed_key(r):
    return (not isinstance(r["seed"], int), r["seed"] if isinstance(r["seed"], int) else 0)


def fed_by(runs, reads):
    """The line under a table or figure: how many runs of which tasks, methods and seeds, and what it reads."""
    runs = list(runs)
    tasks = [t for t in data.TASKS if any(r["task"] == t for r in runs)]
    methods = [NAMES[m] for m in METHODS if any(r["method"] == m for r in runs)]
    seeds = sorted({r["seed"] for r in runs if isinstance(r["seed"], int)})
    return (f"fed by: {len(runs)} runs ({', '.join(tasks)}; {', '.join(methods)}; seeds "
            f"{', '.join(map(str, seeds))}): {reads}")


def runs_of(s, methods=METHODS, tasks=None):
    """Every run at its chosen learning rate of these methods (and tasks)."""
    return [r for t in tasks or s.tasks for m in methods for r in s.runs(t, m)]


def feature_rows(s, t, split="test"):
    """Table 1's rows for one task, on one evaluation split. Pre-trained: the features at epoch 0 of every
    fine-tuning run (the encoder is still the pre-trained one, whatever the head) and the fresh head (FT's and
    LoRA's start); LP: the same features (LP does not change them) and the LP head; then each fine-tuning method at
    its best epoch. A run made before the kit measured every split has only test's statistics (missing: -)."""
    def stat(h, k):  # from an epoch's record
        return pick(h, "features", split, k) if "features" in h else h.get(k) if split == "test" else None

    tuned = runs_of(s, FT_METHODS, [t])
    if not tuned and not s.runs(t, "lp"):
        return []
    name = t if split == "test" else f"{t} ({split})"
    start = [r["history"][0] for r in tuned if r["history"][0]["epoch"] == 0]
    pre = [ms(s, [stat(h, "cs_f") for h in start]), DASH, ms(s, [stat(h, "fdr_f") for h in start])]
    rows = [[f"{name} Pre-trained", *pre, ms(s, [r["head_norm0"] for r in runs_of(s, ("ft", "lora"), [t])])]]
    if s.runs(t, "lp"):
        rows.append([f"{name} LP", *pre, ms(s, [r["head_norm"] for r in s.runs(t, "lp")])])
    for m in FT_METHODS:
        if s.runs(t, m):
            rows.append([f"{name} {NAMES[m]}"] + [ms(s, [pick(r["features"], split, k) for r in s.runs(t, m)])
                                                 for k in ("cs_f", "diff_f", "fdr_f")]
                        + [ms(s, [r["head_norm"] for r in s.runs(t, m)])])
    return rows


FEATURES_READ = ("results.json history (cs_f, diff_f, fdr_f, head_norm at the best epoch; epoch 0 for Pre-trained) "
                 "and lp_results.json (head_norm)")


def feature_table(s):  # Tables 1 and 12: feature change and the classifier's norm
    title = "Feature change and head norm (Tables 1, 12)"
    body = [row for t in s.tasks for row in feature_rows(s, t)]
    if not body:
        return missing(title, "no LP or fine-tuning runs (results.json, lp_results.json).")
    return (title, fed_by(runs_of(s), FEATURES_READ), ["run", "CS(F)", "Diff(F)", "FDR(F)", "Norm(C)"], body,
            "Mean ± std over seeds, on the test split. CS(F): mean cosine similarity between the features of two "
            "examples; Diff(F): mean ||phi(x) - phi_0(x)|| from the pre-trained features (Table 12 is this column); "
            "FDR(F) (the kit's definition): tr(S_B)/tr(S_W); Norm(C): ||V||_F of the head. Pre-trained: the features "
            "at epoch 0 of the fine-tuning runs and the fresh head; LP: the same features and the LP head.")


def kernel_row(run, kernel, ks, K, expect, ratio=False):
    """One row of Tables 2 and 9: kernel K's statistics over the ntk runs ks, mean ± std over seeds."""
    def f(path, scale=1, spec=".3g"):
        return mean_std([pick(k["res"], *path) for k in ks], expect, scale, spec)

    n = sorted({k["res"]["config"].get("n_train") for k in ks} - {None})
    return [run, kernel, "/".join(map(str, n)) or DASH, f(("kernels", K, "rank")),
            f(("kernels", K, "effective_rank")), f(("kernels", K, "fro")),
            f(("kernels", K, "pair_logreg", "train"), 100, ".1f"), f(("kernels", K, "pair_logreg", "test"), 100, ".1f"),
            f(("ft_ratio",)) if ratio else ""]


def ntk_table(s):  # Tables 2 and 9: kernel statistics of P, F and P+F at the start of fine-tuning
    title = "eNTK at the start of fine-tuning: kernel statistics (Tables 2, 9)"
    ks = paper_kernels(s)
    if not ks:
        return missing(title, "no usable ntk_results.json (ntk.py runs; run_all.sh's eNTK phase).")
    expect = max(Counter((k["task"], k["method"]) for k in ks).values())  # the most seeds a method has
    body = []
    for t in [t for t in data.TASKS if any(k["task"] == t for k in ks)]:
        by = {m: [k for k in ks if k["task"] == t and k["method"] == m] for m in FT_METHODS}
        body.append(kernel_row(t, "Pre-train E (P)", next(v for v in by.values() if v), "P", expect))
        for m in [m for m in FT_METHODS if by[m]]:
            body += [kernel_row(f"{t} {NAMES[m]}", "FT E (F)", by[m], "F", expect, ratio=True),
                     kernel_row(f"{t} {NAMES[m]}", "NTK (P+F)", by[m], "P+F", expect)]
    rtol = sorted({f"{x:g}" for k in ks for x in [pick(k["res"], "kernels", "P+F", "rank_rtol")] if x})
    return (title, fed_by(ks, "ntk_results.json (kernels.{P,F,P+F}: rank, effective_rank, fro, pair_logreg; "
                              "ft_ratio)"),
            ["run", "kernel", "N", "rank", "eff. rank", "FN", "Acc train", "Acc test", "FT ratio"], body,
            f"Mean ± std over seeds. N: train examples in the kernel ([N·C, N·C]); rank: singular values above "
            f"{'/'.join(rtol) or 'a tolerance'} x the largest (ntk.py --rank_rtol); eff. rank: exp(entropy of "
            "S/ΣS); FN: Frobenius norm; Acc: the paper's pair-level logistic regression on the kernel rows, % of "
            "(example, class) pairs; FT ratio: mean over train x of ||Σ F δ|| / ||Σ (P+F) δ||. Pre-train E: P of "
            "the first method's kernels (P is the same for every method).")


def calibration_row(s, run, cals, metric):
    """One row of Tables 3, 14, 15: a metric before and after temperature scaling, its improvement, T and the fit."""
    before, after = ([c_split(c, (w, metric)) for c in cals] for w in ("before", "after"))
    converged = all(c["converged"] for c in cals)
    return [run, ms(s, before, ".2f"), ms(s, after, ".2f"), f"{np.mean(np.subtract(before, after)):.2f}",
            f"{np.mean([c['temperature'] for c in cals]):.3f}" + ("" if converged else "*"),
            "/".join(sorted({c.get("optimizer", "lbfgs") for c in cals}))]


def calibration_table(s):  # Tables 3, 14 (SuperGLUE) and 15 (GLUE): ECE and MCE before and after TS
    title = "Calibration on test: ECE and MCE with temperature scaling (Tables 3, 14, 15)"
    body = []
    for t in s.tasks:
        for metric in ("ece", "mce"):
            for m in s.methods:
                cals = [r["calibration"] for r in s.runs(t, m) if r.get("calibration")
                        and c_split(r["calibration"], ("before", metric)) is not None]
                if cals:
                    body.append(calibration_row(s, f"{t} {metric.upper()} {NAMES[m]}", cals, metric))
    if not body:
        return missing(title, "no calibration.json with a test split (calibrate.py on the run folders; run_all.sh "
                              "runs it).")
    used = [r for r in runs_of(s) if r.get("calibration") and c_split(r["calibration"], ("before", "ece")) is not None]
    return (title, fed_by(used, "calibration.json (test split: ece and mce before and after, temperature)"),
            ["run", "w/o TS", "w/ TS", "Imp.", "T", "fit"], body,
            "Percent, mean ± std over seeds; Imp.: the improvement, w/o TS − w/ TS (mean over seeds). T: mean fitted "
            "temperature, fit on val by the optimizer named (lbfgs: the kit's default; adam: the paper's, run_all.sh "
            "--paper); * a fit did not converge (T not identified, e.g. chance-level logits on val, whose NLL keeps "
            "falling as T grows; see calibration.json). Table 14 is SuperGLUE, 15 GLUE.")


def test_table(s):  # Table 8: test accuracy on SuperGLUE and GLUE (CoLA: MCC)
    title = "Test performance (mean ± std over seeds; Table 8)"
    tasks = [t for t in s.tasks if data.TASKS[t].format in ("superglue", "glue")]
    if not tasks:
        return missing(title, "no SuperGLUE or GLUE runs (Amazon: Table 10; PubMed: Table 16).")
    body = [[t] + [mean_std([r["test"] for r in s.runs(t, m)], len(s.seeds)) for m in s.methods] for t in tasks]
    return (title, fed_by(runs_of(s, tasks=tasks), "results.json and lp_results.json (metrics.test)"),
            ["task"] + [NAMES[m] for m in s.methods], body,
            "Accuracy in percent, CoLA Matthews correlation x100; learning rate chosen on validation; (n=k): only "
            "k seeds (see Runs not used).")


def amazon_table(s):  # Table 10: Amazon in- and out-of-distribution
    title = "Amazon: ID and OOD accuracy (Table 10)"
    if "amazon" not in s.tasks:
        return missing(title, "no Amazon runs (run_all.sh --paper, or --tasks amazon).")
    ood = ["test"] + list(data.TASKS["amazon"].ood)
    body = [[NAMES[m]] + [mean_std([r["metrics"].get(sp, {}).get("accuracy") for r in s.runs("amazon", m)],
                                   len(s.seeds)) for sp in ood] for m in s.methods]
    return (title, fed_by(runs_of(s, tasks=["amazon"]), "results.json and lp_results.json (metrics per test set)"),
            ["method", "Amazon (ID)"] + ood[1:], body, "")


def amazon_feature_table(s):  # Table 11: feature and classifier change on Amazon, in and out of distribution
    title = "Amazon: feature and head change, ID and OOD (Table 11)"
    if "amazon" not in s.tasks:
        return missing(title, "no Amazon runs (run_all.sh --paper, or --tasks amazon).")
    body = [row for sp in ("test",) + data.TASKS["amazon"].ood for row in feature_rows(s, "amazon", sp)]
    return (title, fed_by(runs_of(s, tasks=["amazon"]), FEATURES_READ.replace("(cs_f", "(features per split: cs_f")),
            ["run", "CS(F)", "Diff(F)", "FDR(F)", "Norm(C)"], body,
            "As Table 1 (above), on Amazon's ID test split and on each OOD test set (Dynasent, SemEval, SST-5), the "
            "features of the model trained on Amazon; –: a run made before the kit measured the OOD sets.")


def norm_table(s):  # Table 13: the classifier weight norms after training
    title = "Head norm ||V||_F after training (Table 13)"
    cols = ["ft", "lora", "lp", "lp_ft", "lp_lora"]
    body = [[t, ms(s, [r["head_norm0"] for r in runs_of(s, ("ft", "lora"), [t])])]
            + [ms(s, [r["head_norm"] for r in s.runs(t, m)]) for m in cols] for t in s.tasks]
    if not body:
        return missing(title, "no LP or fine-tuning runs.")
    return (title, fed_by(runs_of(s), "results.json (head_norm at the best epoch; epoch 0 for Pretrain) and "
                                     "lp_results.json (head_norm)"),
            ["task", "Pretrain"] + [NAMES[m] for m in cols], body,
            "Mean ± std over seeds. Pretrain: the fresh head FT and LoRA start from; LP: the fitted head "
            "(LP-FT's and LP-LoRA's start); the others at their best epoch.")


def pubmed_table(s):  # Table 16: PubMed 20k RCT
    title = "PubMed 20k RCT: test accuracy (Table 16)"
    if "pubmed" not in s.tasks:
        return missing(title, "no PubMed runs (run_all.sh --paper, or --tasks pubmed).")
    body = [["pubmed"] + [mean_std([r["test"] for r in s.runs("pubmed", m)], len(s.seeds)) for m in s.methods]]
    return (title, fed_by(runs_of(s, tasks=["pubmed"]), "results.json and lp_results.json (metrics.test)"),
            ["task"] + [NAMES[m] for m in s.methods], body, "Accuracy in percent.")


SCALING_SPLIT = {"amazon": "sst5"}  # the paper's Figure 3: a model trained on Amazon, its features on SST-5 (OOD)


def scaling_split(groups, task):
    """The split a task's norm-scaling Diff(F) is read on, one for all its runs: SST-5 for Amazon when every run
    recorded it (the older kit measured test only), else test."""
    split = SCALING_SPLIT.get(task, "test")
    runs = [r for (t, _), by in groups.items() if t == task for rs in by.values() for r in rs]
    return split if all(pick(r.get("features") or {}, split, "diff_f") is not None for r in runs) else "test"


def scaling_diff(r, split):
    return r["diff_f"] if split == "test" else r["features"][split]["diff_f"]


def scaling_groups(rows):
    """Norm scaling: {(task, method): {scale: [runs over seeds]}} for the methods with head-scaled runs (scale 1 =
    the study's own runs at that method's learning rate)."""
    scaled = {(r["task"], r["method"], r["lr"]) for r in rows if r["scale"] != 1.0 and not r["failed"]}
    out = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if (r["task"], r["method"], r["lr"]) in scaled and not r["failed"] and r["method"] != "lp":
            out[(r["task"], r["method"])][r["scale"]].append(r)
    return out


def scaling_table(s):  # the numbers of Figures 3, 10 and 11: norm scaling, mean +- std over seeds
    title = "Norm scaling: initial head norm vs feature change (Figures 3, 10, 11)"
    groups = scaling_groups(s.rows)
    on = {t: scaling_split(groups, t) for t, _ in groups}
    body = [[f"{t} {NAMES[m]}", f"{sc:g}", f"{np.mean([r['head_norm0'] for r in rs]):.3f}", on[t],
             mean_std([scaling_diff(r, on[t]) for r in rs], len(s.seeds), 1, ".3f"),
             mean_std([r["test"] for r in rs], len(s.seeds))]
            for (t, m), by in sorted(groups.items()) for sc, rs in sorted(by.items())]
    if not body:
        return missing(title, "no runs with --head_scale other than 1 (run_all.sh's norm scaling).")
    return (title, fed_by([r for by in groups.values() for rs in by.values() for r in rs],
                          "results.json (head_norm at epoch 0, diff_f at the best epoch, metrics.test)"),
            ["run", "head scale", "||V|| at start", "Diff(F) on", "Diff(F) (mean ± std over seeds)", "test"], body,
            "Scale 1 is the study's own run; feature change on test examples (Amazon: on SST-5, out of distribution, "
            "as the paper's Figure 3, when the runs recorded it).")


def lr_table(s):  # the learning-rate grid (the kit's own)
    title = "Learning rates: mean val and test over seeds (chosen on val)"
    body = []
    for (t, m), summ in sorted(s.grids.items()):
        if m == "lp":
            continue
        for lr, g in sorted(summ.items(), key=lambda x: x[0] or 0):
            mark = "**chosen**" if lr == s.lrs[(t, m)] else ("failed" if g["failed"] else "")
            body.append([f"{t} {NAMES[m]}", f"{lr:g}", f"{100 * g['val']:.1f}" if g["val"] is not None else DASH,
                         mean_std(g["test"], len(s.seeds)), f"{g['seeds'] - g['failed']}/{g['seeds']}", mark])
    if not body:
        return missing(title, "no fine-tuning runs (ft.py, lora.py).")
    runs = [r for r in s.rows if r["method"] != "lp" and r["scale"] == 1.0]
    return (title, fed_by(runs, "results.json of every learning rate (metrics.val, metrics.test; failed runs)"),
            ["run", "lr", "val", "test", "seeds ok", ""], body, "")


def paired_table(s):  # paired differences by seed (the kit's own)
    title = "Paired differences by seed (mean [95% t interval])"
    body = []
    for t in s.tasks:
        for a, b in (("lp_ft", "ft"), ("lp_lora", "lora")):
            A, B = by_seed(s.runs(t, a), "test"), by_seed(s.runs(t, b), "test")
            if A or B:
                body.append([t, f"{NAMES[a]} − {NAMES[b]}", fmt_pair(paired(A, B))])
        for m in s.methods:
            cal = {r["seed"]: r["calibration"] for r in s.runs(t, m) if r.get("calibration")}
            after = {sd: c_split(c, ("after", "ece")) for sd, c in cal.items()}
            before = {sd: c_split(c, ("before", "ece")) for sd, c in cal.items()}
            if cal and None not in after.values() and None not in before.values():
                body.append([t, f"{NAMES[m]} ECE after − before TS", fmt_pair(paired(after, before), 1)])
    if not body:
        return missing(title, "no fine-tuning or calibrated runs to pair by seed.")
    return (title, fed_by(runs_of(s), "results.json and lp_results.json (metrics.test), calibration.json (test ece)"),
            ["task", "comparison", "difference"], body,
            "Test metric in points (x100); ECE in percentage points. An interval that excludes 0 is larger "
            "than the seed noise.")


def not_used(s):
    """The section that says what the tables leave out, so a mean over fewer seeds never passes unnoticed."""
    if not s.problems and not s.short:
        return []
    md = ["## Runs not used", ""]
    if s.problems:
        md += ["Files that could not be used (the tables ignore them; rerun those jobs):", ""]
        md += [f"- `{path}`: {why}" for path, why in s.problems] + [""]
    if s.short:
        md += [f"Groups with fewer seeds than the study ({', '.join(map(str, s.seeds))}); their means say (n=k):",
               ""]
        md += [f"- {g}" for g in s.short] + [""]
    return md


def build(s):
    """-> (report.md text without the figures, report.csv rows): the title, what was not used, each table."""
    s.chosen, s.grids, s.lrs = chosen_runs(s.rows)
    s.tasks = [t for t in data.TASKS if any(r["task"] == t for r in s.rows)]
    s.methods = [m for m in METHODS if any(r["method"] == m for r in s.rows)]
    md, csvrows = [f"# LP-FT kit report ({s.root})", ""] + not_used(s), []
    for make in TABLES:
        title, fed, header, body, note = make(s)
        if body is None:  # its runs are missing: one line says so, the table does not vanish
            md.extend([f"## {title}", "", note, ""])
            continue
        md.extend([f"## {title}", "", fed, "", table(header, body), ""] + ([note, ""] if note else []))
        csvrows += [[title, row[0], h, v] for row in body for h, v in zip(header[1:], row[1:])]
    return "\n".join(md) + "\n", csvrows


def c_split(cal, key, split="test"):
    """calibration.json value for (before|after, metric) on a split, or None."""
    sp = cal["splits"].get(split)
    return None if sp is None else sp[key[0]][key[1]]


def verdict(p, side=1):
    """The paper's claim that a difference is > 0 (side=1) or < 0 (side=-1), judged by its 95% interval."""
    m, h, n = p
    if m is None:
        return "missing runs"
    if h is None:
        return "one seed: no interval"
    lo, hi = sorted((side * (m - h), side * (m + h)))
    return "holds" if lo > 0 else "does not hold" if hi < 0 else "inside the noise"


def by_seed(runs, key):
    return {r["seed"]: r[key] for r in runs if r.get(key) is not None}


def ntk_by_seed(s, task, method):
    """{seed: FT ratio} of a task's ntk runs of a method (head scale 1)."""
    return {k["seed"]: k["res"]["ft_ratio"] for k in paper_kernels(s)
            if k["task"] == task and k["method"] == method and isinstance(k["seed"], int)
            and k["res"].get("ft_ratio") is not None}


def ece_by_seed(runs, when):
    return {r["seed"]: c_split(r["calibration"], (when, "ece")) for r in runs if r.get("calibration")
            and c_split(r["calibration"], (when, "ece")) is not None}


def scaling_pairs(s, task):
    """c6: for each method with head-scaled runs, Diff(F) at the smallest minus at the largest initial head scale
    (scale 1 = the study's own runs), paired by seed, on the split the norm-scaling table and figure use (Amazon:
    SST-5). -> (that split, [(method, small, large, paired)])"""
    out, groups = [], scaling_groups(s.rows)
    on = scaling_split(groups, task)
    for (t, m), by in sorted(groups.items()):
        if t == task:
            lo, hi = ({r["seed"]: scaling_diff(r, on) for r in by[sc]} for sc in (min(by), max(by)))
            out.append((m, min(by), max(by), paired(lo, hi)))
    return on, out


def claim_rows(s, t):
    """(claim, what is compared, paired difference, side) for one task; side: the sign the paper claims."""
    ch = lambda m: s.runs(t, m)  # noqa: E731
    fresh = {r["seed"]: r["head_norm0"] for r in ch("ft") if r.get("head_norm0") is not None}
    rows = [("c1 LP head norm > fresh head's", "‖V‖ LP − ‖V‖ fresh (FT's start)",
             paired(by_seed(ch("lp"), "head_norm"), fresh), 1, 1)]
    for a, b in (("lp_ft", "ft"), ("lp_lora", "lora")):
        rows.append((f"c2 {NAMES[a]} changes features less than {NAMES[b]}", f"Diff(F) {NAMES[a]} − {NAMES[b]}",
                     paired(by_seed(ch(a), "diff_f"), by_seed(ch(b), "diff_f")), -1, 1))
    for a, b in (("lp_ft", "ft"), ("ft", "lp"), ("lp_ft", "lp")):
        rows.append((f"c3 {NAMES[a]} {'at least as accurate as' if b == 'ft' else 'beats'} {NAMES[b]}",
                     f"test {NAMES[a]} − {NAMES[b]}, points", paired(by_seed(ch(a), "test"), by_seed(ch(b), "test")),
                     1, 100))
    rows.append(("c4 temperature scaling lowers LP-FT's ECE", "test ECE after − before TS, % points",
                 paired(ece_by_seed(ch("lp_ft"), "after"), ece_by_seed(ch("lp_ft"), "before")), -1, 1))
    rows.append(("c5 FT ratio larger after LP", "FT ratio LP-FT − FT (eNTK at the start)",
                 paired(ntk_by_seed(s, t, "lp_ft"), ntk_by_seed(s, t, "ft")), 1, 1))
    on, pairs = scaling_pairs(s, t)
    for m, lo, hi, p in pairs or [("ft", None, None, (None, None, 0))]:
        what = f"Diff(F) at head scale {lo:g} − at {hi:g}, {NAMES[m]}" if lo is not None else "Diff(F), head scaled"
        what += f" (on {on})" if on != "test" else ""
        rows.append(("c6 larger initial head norm, less feature change", what, p, 1, 1))
    return rows


def claims_table(s):  # the paper's claims, each decided by its paired 95% interval
    title = "The paper's claims on these runs"
    body = []
    for t in s.tasks:
        for claim, what, p, side, unit in claim_rows(s, t):
            body.append([t, claim, what, fmt_pair(p, unit, "+.1f" if unit == 100 else "+.3g"), verdict(p, side)])
    if not body:
        return missing(title, "no runs.")
    return (title, fed_by(s.rows + s.kernels, "results.json, lp_results.json, calibration.json, ntk_results.json "
                                               "(ft_ratio) and the head-scaled runs"),
            ["task", "claim", "difference", "mean [95% interval] (n seeds)", "verdict"], body,
            "Each claim is a paired difference by seed with its 95% t interval: **holds** when the interval lies "
            "on the paper's side of 0, **does not hold** when it lies on the other, **inside the noise** when it "
            "contains 0. Learning rates as chosen on val (below); c5 needs ntk.py runs per seed, c6 head-scaled "
            "runs (run_all.sh's norm scaling).")


# ---------------------------------------------------------------- the kernel view (run_all.sh --kernel_study)
SOLVERS = ("lstsq", "lstsq_init", "logistic", "svc", "asym")


def kshot_accuracy(run, kernel):
    """A k-shot run's test accuracy on its kernel's test examples (ntk.py's test_positions in the k-shot test split;
    an older result without them counts only when it used the whole test split). None: not comparable."""
    z = load_arrays(Path(run["dir"]) / "logits.npz", ("test_logits", "test_labels"))
    if z is None:
        return None
    lg, y = z["test_logits"], z["test_labels"]
    keep = kernel.get("test_positions")
    if keep is None and kernel["config"].get("n_test_used") != len(y):
        return None
    keep = np.arange(len(y)) if keep is None else np.asarray(keep, dtype=int)
    return float((lg[keep].argmax(1) == y[keep]).mean()) if keep.size and keep.max() < len(y) else None


def kernel_study_table(s):  # Malladi et al.: fine-tuning beside the kernel of its start, on the same k-shot data
    title = "Kernel view: k-shot fine-tuning against the kernel of its start (run_all.sh --kernel_study)"
    if not s.kshot_kernels:
        return missing(title, "no k-shot ntk.py runs (bash run_all.sh --kernel_study)")
    runs = {(r["task"], r["config"]["k_shot"], r["method"], r["config"]["data_seed"]): r for r in s.kshot
            if not r["failed"]}
    groups = defaultdict(list)
    for k in s.kshot_kernels:
        c = k["res"]["config"]
        groups[(c["task"], c["k_shot"], k["method"], k["kind"])].append(k)
    body, used = [], []
    for (task, K, m, kind), ks in sorted(groups.items(), key=lambda g: (list(data.TASKS).index(g[0][0]),) + g[0][1:]):
        ft_acc, sol = [], {x: [] for x in SOLVERS}
        for k in ks:
            run = runs.get((task, K, m, k["res"]["config"].get("data_seed")))
            if run is not None:
                used.append(run)
                ft_acc.append(kshot_accuracy(run, k["res"]))
            for x in SOLVERS:
                v = (k["res"].get("solvers") or {}).get(x) or {}
                sol[x].append(v.get("test"))
        n_test = k["res"]["config"].get("n_test_used")
        body.append([task, K, NAMES.get(m, m), kind, f"{len(ks)} / {n_test}", mean_std(ft_acc, len(ks))]
                    + [mean_std(sol[x], len(ks)) for x in SOLVERS])
    fed = fed_by(used, "results.json + logits.npz of each k-shot run, ntk_results.json (solvers, test_positions) "
                       f"of {len(s.kshot_kernels)} kernels")
    return (title, fed, ["task", "K", "method", "kernel", "seeds / test", "fine-tuned"] + list(SOLVERS), body,
            "Test accuracy (%), mean ± std over data seeds, every column on the same test examples. fine-tuned: the "
            "model at its best val epoch; the solvers (ntk.py, Malladi et al.'s) on the kernel of the same start over "
            "every trainable parameter: lstsq (ridge · ||K||_2), lstsq_init (fitted to y − f0, their "
            "--adjust_for_init), logistic, svc, asym (asymmetric SignGD kernels only); – where a solver does not "
            "apply.")


# the paper's tables in its order (a table merged with a later one sits at the first), then the kit's own
TABLES = [claims_table, feature_table, ntk_table, calibration_table, test_table, amazon_table, amazon_feature_table,
          norm_table, pubmed_table, scaling_table, lr_table, paired_table, kernel_study_table]


# ---------------------------------------------------------------- figures: each returns (title, fed, [PNGs], note)
COLORS = {"lp": "C0", "ft": "C1", "lora": "C2", "lp_ft": "C3", "lp_lora": "C4"}
MARKERS = {"lp": "*", "ft": "X", "lora": "P", "lp_ft": "D", "lp_lora": "s"}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    data.atomic(path, lambda t: fig.savefig(t, format="png", dpi=120))
    plt.close(fig)
    return path


def load_arrays(path, keys):
    """{key: array} from an .npz file, or None when it is missing, damaged or lacks a key (the figure says so)."""
    try:
        with np.load(path) as z:
            return {k: z[k] for k in keys}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def by_epoch(runs, get):
    """(epochs, mean, std) over seeds of get(history entry); entries without a number are left out."""
    vals = defaultdict(list)
    for r in runs:
        for h in r["history"]:
            v = get(h)
            if num(v):
                vals[h["epoch"]].append(v)
    ep = sorted(vals)
    return ep, np.array([np.mean(vals[e]) for e in ep]), np.array([np.std(vals[e]) for e in ep])


def test_metric(h, sel):
    v = h.get("test")
    v = v.get(sel) if isinstance(v, dict) else None
    return 100 * v if num(v) else None


def head_norm_row(ax, s, t):
    """One task's row of Figures 1 and 4: (a) ||V|| during LP, (b) during fine-tuning, its test metric, (c) after."""
    sel = data.TASKS[t].select_metric
    acc_ax = None
    for i, r in enumerate(sorted(s.runs(t, "lp"), key=seed_key)):
        if r.get("norm_curve"):
            ax[0].plot(r["norm_curve"], lw=1, color=f"C{i}", label=f"seed {r['seed']}: test {100 * r['test']:.1f}")
        if r.get("norm_curve_test_accuracy"):  # the same iterates' test accuracy, dashed, on the right axis
            acc_ax = acc_ax or ax[0].twinx()
            acc_ax.plot(100 * np.asarray(r["norm_curve_test_accuracy"]), "--", lw=1, color=f"C{i}")
    ax[0].set(title=f"{t}: (a) LP", xlabel="LBFGS iteration (full batch)", ylabel="||V||_F (solid)")
    if acc_ax is not None:
        acc_ax.set_ylabel("test accuracy, % (dashed)")
    for m in [m for m in FT_METHODS if s.runs(t, m)]:
        for a, get in ((ax[1], lambda h: h["head_norm"]), (ax[2], lambda h: test_metric(h, sel))):
            ep, mu, sd = by_epoch(s.runs(t, m), get)
            a.plot(ep, mu, "o-", ms=3, color=COLORS[m], label=NAMES[m])
            a.fill_between(ep, np.maximum(mu - sd, mu / 10), mu + sd, color=COLORS[m], alpha=0.2)
    ax[1].set(title=f"{t}: (b) fine-tuning", xlabel="epoch", ylabel="||V||_F", yscale="log")
    ax[2].set(title=f"{t}: test {sel} during fine-tuning", xlabel="epoch", ylabel=f"test {sel}, %")
    bars = [("Pretrain", "C7", [r["head_norm0"] for r in runs_of(s, ("ft", "lora"), [t])])]
    bars += [(NAMES[m], COLORS[m], [r["head_norm"] for r in s.runs(t, m)]) for m in ("ft", "lora", "lp", "lp_ft",
                                                                                     "lp_lora")]
    bars = [b for b in bars if b[2]]
    ax[3].bar(range(len(bars)), [np.mean(v) for _, _, v in bars], yerr=[np.std(v) for _, _, v in bars],
              color=[c for _, c, _ in bars], capsize=3)
    ax[3].set_xticks(range(len(bars)), [n for n, _, _ in bars], rotation=30, fontsize=8)
    ax[3].set(title=f"{t}: (c) after training", ylabel="||V||_F", yscale="log")
    for a in ax[:3]:
        if a.lines:
            a.legend(fontsize=6)


def fig_head_norm(s):  # Figures 1 and 4
    title = "Figures 1 and 4: head norm during LP and fine-tuning, with accuracy, and after training"
    tasks = [t for t in s.tasks if runs_of(s, tasks=[t])]
    if not tasks:
        return missing(title, "no LP or fine-tuning runs.", 4)
    plt = pyplot()
    fig, axes = plt.subplots(len(tasks), 4, figsize=(15, 3.2 * len(tasks)), squeeze=False)
    for ax, t in zip(axes, tasks):
        head_norm_row(ax, s, t)
    lp = runs_of(s, ["lp"])
    gap = "" if any(r.get("norm_curve") for r in lp) else \
        " Missing: the LP norm curves (lp.py --norm_curve STEPS)." if lp else " Missing: LP runs (lp.py)."
    if any(r.get("norm_curve") for r in lp) and not any(r.get("norm_curve_test_accuracy") for r in lp):
        gap += (" Missing: the test accuracy during LP (LP runs made before lp.py recorded it: rerun lp.py with "
                "--overwrite --norm_curve STEPS).")
    return (title, fed_by(runs_of(s), "lp_results.json (norm_curve, norm_curve_test_accuracy: ||V|| and test "
                                     "accuracy per LBFGS iteration; metrics.test), "
                                     "results.json history (head_norm, test metric per epoch; epoch 0 = the start)"),
            [save(fig, s.root / "head_norm.png")],
            "(a) per seed: ||V|| (solid) and test accuracy (dashed, right axis) of each LBFGS iterate from a zero "
            "head; (b)-(c) mean over seeds, bands and bars ± std."
            + gap)


def spectrum(k, K):
    v = (k["res"]["kernels"].get(K) or {}).get("sv_normalised")
    return v if isinstance(v, list) and v and all(num(x) for x in v) else None


SV_FLOOR = 1e-10  # the spectra's lower edge: float32 sums carry ~1e-7 relative error, so smaller is rounding


def fig_spectra(s):  # Figures 2 and 7
    title = "Figures 2 and 7: normalised singular values of the eNTK components, methods overlaid"
    ks = [k for k in paper_kernels(s) if spectrum(k, "F")]
    if not ks:
        return missing(title, "no ntk_results.json with singular values (ntk.py runs).", 4)
    tasks = [t for t in data.TASKS if any(k["task"] == t for k in ks)]
    plt = pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.8 * len(tasks), 3.6), squeeze=False)
    used = []
    for ax, t in zip(axes[0], tasks):
        # per method its lowest seed (LoRA's kernels exist at the first seed only in the default study)
        first = {m: min((k for k in ks if k["task"] == t and k["method"] == m), key=seed_key, default=None)
                 for m in FT_METHODS}
        first = {m: k for m, k in first.items() if k}
        used += first.values()
        p = next(iter(first.values()))
        if spectrum(p, "P"):
            ax.plot(range(1, len(spectrum(p, "P")) + 1), spectrum(p, "P"), "k-", label="Pre-train E (P)")
        for m, k in first.items():
            sv = spectrum(k, "F")
            ax.plot(range(1, len(sv) + 1), sv, color=COLORS[m], label=f"FT E ({NAMES[m]}, seed {k['seed']})")
        rtol = pick(p["res"], "kernels", "F", "rank_rtol")
        if rtol:
            ax.axhline(rtol, ls=":", color="grey", lw=1, label=f"rank tolerance {rtol:g}")
        ax.set(yscale="log", xlabel="index", ylabel="singular value / largest", title=t)
        ax.set_ylim(max(ax.get_ylim()[0], SV_FLOOR), 2)  # below the floor: float rounding, not spectrum
        ax.legend(fontsize=6)
    return (title, fed_by(used, "ntk_results.json (kernels.P and kernels.F: sv_normalised)"),
            [save(fig, s.root / "ntk_spectra.png")],
            f"Singular values of the [N·C, N·C] train kernel divided by the largest, drawn down to {SV_FLOOR:g}; P is "
            "the same for every method. "
            "The paper's Figure 2 is CB, Figure 7 RTE, BoolQ and WiC.")


def fig_scaling(s):  # Figures 3, 10 and 11
    title = "Figures 3, 10 and 11: feature change against the initial head norm (norm scaling)"
    groups = scaling_groups(s.rows)
    if not groups:
        return missing(title, "no runs with --head_scale other than 1 (run_all.sh's norm scaling).", 4)
    tasks = [t for t in data.TASKS if any(g[0] == t for g in groups)]
    plt = pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.8 * len(tasks), 3.4), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        on = scaling_split(groups, t)
        for (_, m), by in sorted((g, by) for g, by in groups.items() if g[0] == t):
            sc = sorted(by)
            x = [np.mean([r["head_norm0"] for r in by[v]]) for v in sc]
            d = [[scaling_diff(r, on) for r in by[v]] for v in sc]
            mu = np.array([np.mean(v) for v in d])
            se = np.array([np.std(v, ddof=1) / math.sqrt(len(v)) if len(v) > 1 else 0.0 for v in d])
            ax.plot(x, mu, "o-", color=COLORS[m], label=f"{NAMES[m]} (n={min(len(v) for v in d)})")
            ax.fill_between(x, mu - se, mu + se, color=COLORS[m], alpha=0.2)
            if 1.0 in by:  # the head's own norm, unscaled
                ax.axvline(np.mean([r["head_norm0"] for r in by[1.0]]), ls="--", lw=1, color=COLORS[m])
        ax.set(xscale="log", xlabel="||V||_F at the start of fine-tuning", ylabel=f"Diff(F) on {on}", title=t)
        ax.legend(fontsize=7)
    return (title, fed_by([r for by in groups.values() for rs in by.values() for r in rs],
                          "results.json of each --head_scale (head_norm at epoch 0, diff_f at the best epoch)"),
            [save(fig, s.root / "feature_change_vs_norm.png")],
            "Mean over seeds, shaded ± standard error (as the paper); dashed: the unscaled head's norm. Diff(F) on "
            "each task's own test split, for Amazon on SST-5 (out of distribution) when recorded, as the paper's "
            "Figure 3 (Figure 10 BOSS, Figure 11 CB and RTE).")


def cached_features(root, run, split="test"):
    """(features, labels) of an LP run's split from lp.py's feature cache, named as lp.py names it (lp.cache_key,
    under <task>/<model>_<pooling>_L<max_len>), looked for under the root's cache/ and then the run's --cache_dir;
    the labels from the run's logits.npz. None when not found."""
    import lp

    c = run["config"]
    try:
        name = lp.cache_key(SimpleNamespace(**c), split, lp.source(split, run.get("fingerprint") or {}))
        sub = Path(c["task"]) / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', c['model'])}_{c['pooling']}_L{c['max_len']}"
    except (AttributeError, KeyError, TypeError):
        return None
    y = load_arrays(Path(run["dir"]) / "logits.npz", [f"{split}_labels"])
    cache = str(c.get("cache_dir") or "runs/cache")
    for base in (Path(root) / "cache", Path(cache), data.ROOT / cache):
        try:
            x = np.load(base / sub / name)
        except (OSError, ValueError):
            continue
        if y is not None and x.ndim == 2 and len(x) == len(y[f"{split}_labels"]):
            return x.astype(np.float64), y[f"{split}_labels"]
    return None


def head_rows(run):
    """A run's classifier rows [C, d]: lp_head.pt (LP) or the head in model.safetensors (after training)."""
    d = Path(run["dir"])
    try:
        if run["method"] == "lp":
            import torch

            return torch.load(d / "lp_head.pt", weights_only=True)["weight"].double().numpy()
        from safetensors import safe_open

        with safe_open(str(d / "model.safetensors"), "np") as f:
            return f.get_tensor("head.weight").astype(np.float64)
    except Exception:  # missing or damaged, whatever the loader's error: the figure names the head it lacks
        return None


TSNE_MAX = 400  # examples at most in a t-SNE: the exact method is O(n^2) per step (Barnes-Hut was slower here)


def tsne_panel(ax, title, phi, labels, heads):
    """One t-SNE (scikit-learn) of the features and the classifier rows together, as a panel of Figures 5-6."""
    from matplotlib.lines import Line2D
    from sklearn.manifold import TSNE

    if len(phi) > TSNE_MAX:
        keep = np.sort(np.random.default_rng(0).choice(len(phi), TSNE_MAX, replace=False))
        phi, labels = phi[keep], labels[keep]
    x = np.concatenate([phi] + list(heads.values()))
    # cosine: a head's rows are orders of magnitude shorter than the features, so under the Euclidean distance they
    # all land on one spot; exact: on these features Barnes-Hut took 35 s for 300 points, exact 4 s
    emb = TSNE(perplexity=min(30.0, (len(x) - 1) / 3), metric="cosine", init="pca", method="exact",
               random_state=0).fit_transform(x)
    for c in np.unique(labels):
        ax.scatter(*emb[:len(phi)][labels == c].T, s=8, alpha=0.5, color=f"C{c}", label=f"features, class {c}")
    at = len(phi)
    for m, w in heads.items():
        ax.scatter(*emb[at:at + len(w)].T, s=110, marker=MARKERS[m], color=[f"C{c}" for c in range(len(w))],
                   edgecolor="k")
        at += len(w)
    rows = [Line2D([], [], ls="", marker=MARKERS[m], color="0.6", mec="k", ms=8, label=f"{NAMES[m]} rows")
            for m in heads]
    ax.set(xticks=[], yticks=[])
    ax.set_title(title, fontsize=9)
    ax.legend(handles=ax.get_legend_handles_labels()[0] + rows, fontsize=6, loc="best")


def saved_features(run, key="test_phi"):
    """(test features, labels) from a fine-tuning run's features.npz: test_phi at the best epoch, test_phi0 at the
    start; None when absent (a run made before the kit saved them) or damaged."""
    z = load_arrays(Path(run["dir"]) / "features.npz", [key, "test_labels"])
    return None if z is None else (z[key].astype(np.float64), z["test_labels"])


def tsne_panels(s, t):
    """The panels of one task at its lowest seed with an LP run or a fine-tuning run: [(title, phi, labels,
    {method: head rows})], the gaps and the runs used. Pre-trained: the test features (lp.py's cache, else the start
    of a fine-tuning run's features.npz) with the LP head; then each method's features after fine-tuning with its
    own head."""
    first = min((r for m in ["lp", *FT_METHODS] for r in s.runs(t, m)), key=seed_key, default=None)
    if first is None:
        return [], [f"{t}: no LP or fine-tuning run"], []
    seed = first["seed"]
    runs = {m: r for m in ["lp", *FT_METHODS] for r in s.runs(t, m) if r["seed"] == seed}
    panels, gaps, used = [], [] if "lp" in runs else [f"{t}: no LP run"], []
    pre = cached_features(s.root, runs["lp"]) if "lp" in runs else None
    if pre is None and "lp" in runs:  # no feature cache: the pre-trained features a fine-tuning run started from
        pre = next((f for m, r in runs.items() if m != "lp" for f in [saved_features(r, "test_phi0")] if f), None)
    for m, r in runs.items():
        feats = pre if m == "lp" else saved_features(r)
        if feats is None:
            gaps.append(f"{t} {NAMES[m]}: " + ("no cached pre-trained features (lp.py's --cache_dir) or features.npz"
                                              if m == "lp" else "features.npz missing or damaged (a run made "
                                                                "before the kit saved it?)"))
            continue
        w = head_rows(r)
        if w is None or w.shape[1:] != feats[0].shape[1:] or len(feats[0]) < 4:
            gaps.append(f"{t} {NAMES[m]}: " + ("too few test features for a t-SNE" if len(feats[0]) < 4
                                              else "its head (lp_head.pt / model.safetensors)"))
            continue
        name = "pre-trained, LP head" if m == "lp" else f"{NAMES[m]}, after training"
        panels.append((f"{t} {name} (seed {seed})", *feats, {m: w}))
        used.append(r)
    return panels, gaps, used


def fig_tsne(s):  # Figures 5 and 6
    title = "Figures 5 and 6: t-SNE of the features and the classifier rows"
    paths, used, gaps = [], [], []
    for t in s.tasks:
        panels, g, u = tsne_panels(s, t)
        gaps, used = gaps + g, used + u
        if not panels:
            continue
        plt = pyplot()
        fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4.2), squeeze=False)
        for ax, p in zip(axes[0], panels):
            tsne_panel(ax, *p)
        paths.append(save(fig, s.root / f"tsne_{t}.png"))
    if not paths:
        return missing(title, "; ".join(gaps) + ".", 4)
    return (title, fed_by(used, "lp.py's feature cache or features.npz (test_phi0: pre-trained test features), "
                               "features.npz (test_phi at the best epoch, test_labels), lp_head.pt and "
                               "model.safetensors (head.weight after training)"), paths,
            "One panel per method at the task's lowest seed: the LP model (the pre-trained test features and the LP "
            "head, LP-FT's start), then each fine-tuning method's test features at its best epoch with its head after "
            "training (row k in class k's colour). scikit-learn TSNE, cosine metric, perplexity min(30, (n-1)/3), "
            f"PCA init, exact method, random_state 0, at most {TSNE_MAX} examples (a seeded subset), one t-SNE per "
            "panel (the panels' axes are not comparable)."
            + (f" Missing: {'; '.join(gaps)}." if gaps else ""))


def trace_norms(K, labels):
    """Figures 8-9: the trace (nuclear) norm of each C x C block K(x_i, x_j) of a [N, C, N, C] kernel, the samples
    sorted by class. -> ([N, N] map, the sorted labels)."""
    order = np.argsort(labels, kind="stable")
    tn = np.linalg.svd(K.transpose(0, 2, 1, 3), compute_uv=False).sum(-1)
    return tn[np.ix_(order, order)], labels[order]


def block_means(tn, labels):
    """{(class a, class b): mean trace norm over the sample pairs of those classes} of a sorted map."""
    cs = np.unique(labels)
    return {(a, b): float(tn[np.ix_(labels == a, labels == b)].mean()) for a in cs for b in cs}


def kernels_ok(z):
    """Whether a kernels.npz's P_train and F_train are [N, C, N, C] over its N train_labels."""
    y = z["train_labels"]
    return y.ndim == 1 and all(z[K].ndim == 4 and z[K].shape[::2] == (len(y), len(y)) and
                               z[K].shape[1] == z[K].shape[3] for K in ("P_train", "F_train"))


def heatmap_plot(path, title, panels):
    plt = pyplot()
    rows = -(-len(panels) // 3)  # three a row: P, FT's and LP-FT's F (Figure 8), then LoRA's and LP-LoRA's (9)
    fig, axes = plt.subplots(rows, 3, figsize=(11.7, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (name, tn, y) in zip(axes.flat, panels):
        im = ax.imshow(tn, cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046)
        edges = np.flatnonzero(np.diff(y)) + 0.5
        for e in edges:
            ax.axhline(e, color="w", lw=0.8)
            ax.axvline(e, color="w", lw=0.8)
        mid = {c: np.flatnonzero(y == c).mean() for c in np.unique(y)}
        for (a, b), v in block_means(tn, y).items():  # the class-pair means, at their blocks' centres
            ax.text(mid[b], mid[a], f"{v:.3g}", ha="center", va="center", fontsize=7,
                    bbox={"facecolor": "w", "alpha": 0.6, "lw": 0, "pad": 1})
        ax.set_xticks(list(mid.values()), [f"class {c}" for c in mid], fontsize=7)
        ax.set_yticks(list(mid.values()), [f"class {c}" for c in mid], fontsize=7)
        ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    return save(fig, path)


HEATMAP_ORDER = ["ft", "lp_ft", "lora", "lp_lora"]  # the paper's panels: Figure 8 (FT, LP-FT), Figure 9 (LoRA's)


def fig_trace_norm(s):  # Figures 8 and 9
    title = "Figures 8 and 9: trace norms of the kernel's C x C blocks, samples grouped by class"
    ks = paper_kernels(s)
    paths, used, gaps = [], [], []
    for t in [t for t in data.TASKS if any(k["task"] == t for k in ks)]:
        seed = min((k for k in ks if k["task"] == t), key=seed_key)["seed"]
        panels = []
        for k in [k for m in HEATMAP_ORDER for k in ks if (k["task"], k["method"], k["seed"]) == (t, m, seed)]:
            z = load_arrays(Path(k["dir"]) / "kernels.npz", ["P_train", "F_train", "train_labels"])
            if z is None or not kernels_ok(z):
                gaps.append(f"{rel(Path(k['dir']) / 'kernels.npz', s.root)} (missing or damaged)")
                continue
            if not panels:
                panels.append(("Figure 8: Pre-train E (P)", *trace_norms(z["P_train"], z["train_labels"])))
            fig_no = 9 if "lora" in k["method"] else 8
            panels.append((f"Figure {fig_no}: FT E ({NAMES[k['method']]})",
                           *trace_norms(z["F_train"], z["train_labels"])))
            used.append(k)
        if panels:
            n = len(panels[0][2])
            paths.append(heatmap_plot(s.root / f"ntk_trace_norm_{t}.png", f"{t}, seed {seed}, N = {n}", panels))
    if not paths:
        return missing(title, "no kernels.npz of an ntk.py run" + (f" ({'; '.join(gaps)})" if gaps else "") + ".", 4)
    return (title, fed_by(used, "kernels.npz (P_train, F_train, train_labels)"), paths,
            "At the lowest seed with kernels: the trace (nuclear) norm of each C x C block K(x_i, x_j) of the "
            "[N·C, N·C] train kernel, samples sorted by class (white lines); the number in each class block is its "
            "mean over the block's pairs. Each panel has its own colour scale. The paper's Figure 8 is P and FT's "
            "and LP-FT's F, Figure 9 LoRA's and LP-LoRA's F." + (f" Missing: {'; '.join(gaps)}." if gaps else ""))


FIGURES = [fig_head_norm, fig_spectra, fig_scaling, fig_tsne, fig_trace_norm]


def figures(s):
    """-> the report's figure section: each figure of the paper the runs feed, in its order, then the kit's own."""
    md = ["## Figures", ""]
    for make in FIGURES:
        title, fed, paths, note = make(s)
        md += [f"### {title}", ""]
        if paths is None:
            md += [note, ""]
            continue
        md += [fed, ""] + [f"![{p.stem}]({os.path.relpath(p, s.root)})" for p in paths] + [""]
        md += [note, ""] if note else []
    own = sorted(s.root.rglob("reliability_test.png"))[:2] + sorted(s.root.rglob("spectrum.png"))[:1]
    if own:
        md += ["### The kit's own: reliability diagrams (calibrate.py) and a spectrum (ntk.py)", ""]
        md += [f"![{p.parent.name} {p.stem}]({os.path.relpath(p, s.root)})" for p in own] + [""]
    return "\n".join(md)


@data.cli
def main(argv=None):
    args = parse(argv)
    root = data.check_output_dir(args.root, "--root")  # a file, or a folder we cannot write, stops here
    if not root.is_dir():
        data.die(f"no output root {root}; run bash run_all.sh first (or pass --root DIR)")
    s = collect(root)
    for path, why in s.problems:
        print(f"report: not used: {root / path}: {why}", file=sys.stderr)
    for line in s.short:
        print(f"report: fewer seeds: {line}", file=sys.stderr)
    md, csvrows = build(s)
    md += "\n" + figures(s)
    buf = io.StringIO()
    csv.writer(buf).writerows([["table", "row", "column", "value"]] + csvrows)
    for name, text in (("report.md", md), ("report.csv", buf.getvalue())):
        data.atomic(root / name, lambda t, text=text: Path(t).write_text(text))
    print(md)
    left_out = f"; {len(s.problems)} files not used, see 'Runs not used'" if s.problems else ""
    print(f"wrote {root / 'report.md'}, {root / 'report.csv'} ({len(s.rows)} runs{left_out})")
    return md


if __name__ == "__main__":
    main()
