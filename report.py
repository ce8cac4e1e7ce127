"""Gather every run under an output root into the paper's tables and figures.

    python report.py                      # reads runs/, writes runs/report.md, runs/report.csv, runs/*.png
    python report.py --root runs_paper

Reads results.json (ft.py, lora.py), lp_results.json (lp.py), calibration.json (calibrate.py) and
ntk_results.json (ntk.py). Learning rates are chosen per task and method by the best mean validation
metric over seeds (CoLA: MCC; ties: the lowest learning rate); test scores are never used to choose.
A run that diverged counts as a failed point. Missing runs show as "–". Every file the report could not use
(corrupt, truncated, unfinished, of another shape) and every (task, method, lr) with fewer seeds than the
study are listed under "Runs not used" at the top of report.md and on stderr; a mean over fewer seeds than
the study says so with (n=k).
"""

import argparse
import csv
import io
import json
import math
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

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
        curve = r.get("norm_curve")
        return None if curve is None or isinstance(curve, list) and all(num(x) for x in curve) \
            else "norm_curve is not a list of numbers"
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
    ntk: dict = field(default_factory=dict)  # run dir -> ntk_results.json
    problems: list = field(default_factory=list)  # (path under root, why it was not used)
    seeds: list = field(default_factory=list)  # every seed of the study (head scale 1)
    short: list = field(default_factory=list)  # "task method lr: seeds ... (missing ...)"
    # filled by build: runs at the chosen lr per (task, method), the lr grids and choices, what is present
    chosen: dict = field(default_factory=dict)
    grids: dict = field(default_factory=dict)
    lrs: dict = field(default_factory=dict)
    tasks: list = field(default_factory=list)
    methods: list = field(default_factory=list)


def collect(root):
    s = Study(Path(root))
    s.rows = load_runs(root, s.problems)
    for f in result_files(root, "ntk_results.json"):
        k, why = read(f)
        why = why or ntk_problem(k)
        if why:
            s.problems.append((rel(f, root), why))
        else:
            s.ntk[str(f.parent)] = k
    s.problems += unfinished(root)
    s.seeds, s.short = seed_gaps(s.rows)
    return s


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
        key = (row["task"], row["method"], row["lr"], row["scale"], row["seed"])
        if key in seen:
            problems.append((rel(f, root), f"the same task, method, lr, head scale and seed as {seen[key]}; "
                                           f"not counted twice"))
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
           "scale": c.get("head_scale", 1.0), "failed": r.get("failed"), "sel": sel}
    if row["failed"]:
        return row
    m = r["metrics"]
    row |= {"metrics": m, "val": m["val"][sel], "test": m["test"][sel], "head_norm": r["head_norm"]}
    if method == "lp":
        row["norm_curve"] = r.get("norm_curve")
    else:
        hist = r["history"]
        best = next(h for h in hist if h["epoch"] == r["best_epoch"])
        row |= {k: best[k] for k in ("diff_f", "cs_f", "fdr_f")}
        row |= {"head_norm0": hist[0]["head_norm"], "history": hist}
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
def mean_std(xs, expect=0):
    """'mean ± std' in percent over seeds; '(n=k)' when fewer than `expect` seeds (or one) are left."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return DASH
    if len(xs) == 1:
        return f"{100 * xs[0]:.1f} (n=1)"
    n = f" (n={len(xs)})" if len(xs) < expect else ""
    return f"{100 * np.mean(xs):.1f} ± {100 * float(np.std(xs, ddof=1)):.1f}{n}"


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


# ---------------------------------------------------------------- tables: each returns (title, header, body, note)
def table(header, body):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(x) for x in row) + " |" for row in body]
    return "\n".join(out)


def test_table(s):  # Table 8: test accuracy (CoLA: MCC)
    body = [[t] + [mean_std([r["test"] for r in s.chosen.get((t, m), [])], len(s.seeds)) for m in s.methods]
            for t in s.tasks]
    return ("Test performance (mean ± std over seeds; Table 8)", ["task"] + [NAMES[m] for m in s.methods], body,
            "Accuracy in percent, CoLA Matthews correlation x100; learning rate chosen on validation; (n=k): only "
            "k seeds (see Runs not used).")


def amazon_table(s):  # Table 10: Amazon in- and out-of-distribution
    if "amazon" not in s.tasks:
        return "Amazon: ID and OOD accuracy (Table 10)", None, None, "Missing: no Amazon runs (run_all.sh --paper)."
    ood = ["test"] + list(data.TASKS["amazon"].ood)
    body = [[NAMES[m]] + [mean_std([r["metrics"].get(sp, {}).get("accuracy") for r in s.chosen.get(("amazon", m), [])],
                                   len(s.seeds)) for sp in ood] for m in s.methods]
    return "Amazon: ID and OOD accuracy (Table 10)", ["method", "Amazon (ID)"] + ood[1:], body, ""


def norm_table(s):  # Table 13: head norms
    body = []
    for t in s.tasks:
        for m in s.methods:
            rs = s.chosen.get((t, m), [])
            if rs:
                n0 = [r.get("head_norm0") for r in rs if r.get("head_norm0") is not None]
                body.append([f"{t} {NAMES[m]}", f"{np.mean(n0):.3f}" if n0 else DASH,
                             f"{np.mean([r['head_norm'] for r in rs]):.3f}"])
    return "Head norm ||V||_F (Table 13)", ["run", "at start of FT", "at best epoch (LP: fitted)"], body, ""


def feature_table(s):  # Tables 1 and 12: feature change
    body = []
    for t in s.tasks:
        for m in [m for m in s.methods if m != "lp"]:
            rs = s.chosen.get((t, m), [])
            body.append([f"{t} {NAMES[m]}"] + [f"{np.mean([r[k] for r in rs]):.4f}" if rs else DASH
                                              for k in ("diff_f", "cs_f", "fdr_f")])
    return ("Feature change on test examples (Tables 1, 12)", ["run", "Diff(F)", "CS(F)", "FDR"], body,
            "Diff(F): mean ||phi_t(x) - phi_0(x)||; CS(F): mean pairwise cosine similarity; "
            "FDR (the kit's definition): tr(S_B)/tr(S_W).")


def calibration_table(s):  # Table 3: calibration on test
    body = []
    for t in s.tasks:
        for m in s.methods:
            cals = [r["calibration"] for r in s.chosen.get((t, m), []) if r.get("calibration")]
            if not cals:
                continue
            vals = [[c_split(c, k) for c in cals] for k in (("before", "ece"), ("after", "ece"),
                                                             ("before", "mce"), ("after", "mce"))]
            body.append([f"{t} {NAMES[m]}"] + [f"{np.mean(v):.2f}" if None not in v else DASH for v in vals]
                        + [f"{np.mean([c['temperature'] for c in cals]):.3f}"
                           + ("" if all(c["converged"] for c in cals) else "*"),
                           "/".join(sorted({c.get("optimizer", "lbfgs") for c in cals}))])
    return ("Calibration on test, percent (Table 3)", ["run", "ECE", "ECE (TS)", "MCE", "MCE (TS)", "T", "fit"], body,
            "T: mean fitted temperature over seeds, fit by the optimizer named (lbfgs: the kit's default; adam: the "
            "paper's, run_all.sh --paper); * a fit did not converge (T not identified, e.g. chance-level "
            "logits on val, whose NLL keeps falling as T grows; see calibration.json).")


def ntk_table(s):  # Table 2: kernel statistics
    body = [ntk_row(Path(d).name, k) for d, k in sorted(s.ntk.items())]
    if not body:
        return "eNTK at the start of fine-tuning (Table 2)", None, None, "Missing: no usable ntk_results.json."
    return ("eNTK at the start of fine-tuning (Table 2)",
            ["run", "N", "rank P+F", "||P||_F", "||F||_F", "FT ratio", "||V||", "kernel reg.", "pair logreg"], body,
            "Test accuracy of kernel regression on P+F (classes) and of the paper's pair-level logistic "
            "regression (pairs); FT ratio = mean ||F delta|| / ||(P+F) delta||.")


def scaling_groups(rows):
    """Norm scaling: {(task, method): {scale: [runs over seeds]}} for the methods with head-scaled runs (scale 1 =
    the study's own runs at that method's learning rate)."""
    scaled = {(r["task"], r["method"], r["lr"]) for r in rows if r["scale"] != 1.0 and not r["failed"]}
    out = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if (r["task"], r["method"], r["lr"]) in scaled and not r["failed"] and r["method"] != "lp":
            out[(r["task"], r["method"])][r["scale"]].append(r)
    return out


def scaling_table(s):  # Figure 3: norm scaling, mean +- std over seeds
    groups = scaling_groups(s.rows)
    body = [[f"{t} {NAMES[m]}", f"{sc:g}", f"{np.mean([r['head_norm0'] for r in rs]):.3f}",
             f"{np.mean([r['diff_f'] for r in rs]):.3f} ± {np.std([r['diff_f'] for r in rs], ddof=1):.3f}"
             if len(rs) > 1 else f"{rs[0]['diff_f']:.3f} (n=1)", mean_std([r["test"] for r in rs], len(s.seeds))]
            for (t, m), by in sorted(groups.items()) for sc, rs in sorted(by.items())]
    if not body:
        return ("Norm scaling: initial head norm vs feature change (Figure 3)", None, None,
                "Missing: no runs with --head_scale other than 1.")
    return ("Norm scaling: initial head norm vs feature change (Figure 3)",
            ["run", "head scale", "||V|| at start", "Diff(F) (mean ± std over seeds)", "test"], body,
            "Scale 1 is the study's own run; feature change on test examples.")


def lr_table(s):  # the learning-rate grid
    body = []
    for (t, m), summ in sorted(s.grids.items()):
        if m == "lp":
            continue
        for lr, g in sorted(summ.items(), key=lambda x: x[0] or 0):
            mark = "**chosen**" if lr == s.lrs[(t, m)] else ("failed" if g["failed"] else "")
            body.append([f"{t} {NAMES[m]}", f"{lr:g}", f"{100 * g['val']:.1f}" if g["val"] is not None else DASH,
                         mean_std(g["test"], len(s.seeds)), f"{g['seeds'] - g['failed']}/{g['seeds']}", mark])
    return ("Learning rates: mean val and test over seeds (chosen on val)",
            ["run", "lr", "val", "test", "seeds ok", ""], body, "")


def paired_table(s):  # paired differences by seed
    body = []
    for t in s.tasks:
        for a, b in (("lp_ft", "ft"), ("lp_lora", "lora")):
            A = {r["seed"]: r["test"] for r in s.chosen.get((t, a), [])}
            B = {r["seed"]: r["test"] for r in s.chosen.get((t, b), [])}
            if A or B:
                body.append([t, f"{NAMES[a]} − {NAMES[b]}", fmt_pair(paired(A, B))])
        for m in s.methods:
            cal = {r["seed"]: r["calibration"] for r in s.chosen.get((t, m), []) if r.get("calibration")}
            after = {sd: c_split(c, ("after", "ece")) for sd, c in cal.items()}
            before = {sd: c_split(c, ("before", "ece")) for sd, c in cal.items()}
            if cal and None not in after.values() and None not in before.values():
                body.append([t, f"{NAMES[m]} ECE after − before TS", fmt_pair(paired(after, before), 1)])
    return ("Paired differences by seed (mean [95% t interval])", ["task", "comparison", "difference"], body,
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
    """-> (report.md text, report.csv rows): the title, what was not used, each table, the claims."""
    s.chosen, s.grids, s.lrs = chosen_runs(s.rows)
    s.tasks = [t for t in data.TASKS if any(r["task"] == t for r in s.rows)]
    s.methods = [m for m in METHODS if any(r["method"] == m for r in s.rows)]
    md, csvrows = [f"# LP-FT kit report ({s.root})", ""] + not_used(s), []
    for make in TABLES:
        t = make(s)
        if t is None:
            continue
        title, header, body, note = t
        if body is None:  # its runs are missing: one line says so, the table does not vanish
            md.extend([f"## {title}", "", note, ""])
            continue
        md.extend([f"## {title}", "", table(header, body), ""] + ([note, ""] if note else []))
        csvrows += [[title, row[0], h, v] for row in body for h, v in zip(header[1:], row[1:])]
    return "\n".join(md) + "\n", csvrows


def c_split(cal, key, split="test"):
    """calibration.json value for (before|after, metric) on a split, or None."""
    sp = cal["splits"].get(split)
    return None if sp is None else sp[key[0]][key[1]]


def ntk_row(name, k):
    """One row of Table 2 from ntk_results.json: kernels.{P,F,P+F}.{rank, fro, kernel_regression, ...}."""
    kern = k["kernels"]
    kr, pl = kern["P+F"].get("kernel_regression") or {}, kern["P+F"].get("pair_logreg") or {}
    f = lambda x, p=3: DASH if x is None else (f"{x:.{p}g}" if isinstance(x, float) else str(x))  # noqa: E731
    cfg = k["config"]
    return [f"{cfg['task']} {name}", f(cfg.get("n_train")), f(kern["P+F"].get("rank")), f(kern["P"].get("fro")),
            f(kern["F"].get("fro")), f(k.get("ft_ratio")), f(k.get("head_norm")), f(kr.get("test")),
            f(pl.get("test"))]


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
    """{seed: FT ratio} of the NTK runs ntk-<method>-seed<seed> of a task."""
    return {k["config"]["seed"]: k["ft_ratio"] for d, k in s.ntk.items()
            if Path(d).name.startswith(f"ntk-{method}-seed") and k["config"]["task"] == task
            and isinstance(k["config"].get("seed"), int) and k.get("ft_ratio") is not None}


def ece_by_seed(runs, when):
    return {r["seed"]: c_split(r["calibration"], (when, "ece")) for r in runs if r.get("calibration")
            and c_split(r["calibration"], (when, "ece")) is not None}


def scaling_pairs(s, task):
    """c6: for each method with head-scaled runs, Diff(F) at the smallest minus at the largest initial head scale
    (scale 1 = the study's own runs), paired by seed. -> [(method, small, large, paired)]"""
    out = []
    for (t, m), by in sorted(scaling_groups(s.rows).items()):
        if t == task:
            lo, hi = ({r["seed"]: r["diff_f"] for r in by[sc]} for sc in (min(by), max(by)))
            out.append((m, min(by), max(by), paired(lo, hi)))
    return out


def claim_rows(s, t):
    """(claim, what is compared, paired difference, side) for one task; side: the sign the paper claims."""
    ch = lambda m: s.chosen.get((t, m), [])  # noqa: E731
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
    for m, lo, hi, p in scaling_pairs(s, t) or [("ft", None, None, (None, None, 0))]:
        what = f"Diff(F) at head scale {lo:g} − at {hi:g}, {NAMES[m]}" if lo is not None else "Diff(F), head scaled"
        rows.append(("c6 larger initial head norm, less feature change", what, p, 1, 1))
    return rows


def claims_table(s):  # the paper's claims, each decided by its paired 95% interval
    body = []
    for t in s.tasks:
        for claim, what, p, side, unit in claim_rows(s, t):
            body.append([t, claim, what, fmt_pair(p, unit, "+.1f" if unit == 100 else "+.3g"), verdict(p, side)])
    return ("The paper's claims on these runs", ["task", "claim", "difference", "mean [95% interval] (n seeds)",
                                                  "verdict"], body,
            "Each claim is a paired difference by seed with its 95% t interval: **holds** when the interval lies "
            "on the paper's side of 0, **does not hold** when it lies on the other, **inside the noise** when it "
            "contains 0. Learning rates as chosen on val (above); c5 needs ntk.py runs per seed, c6 head-scaled "
            "runs (run_all.sh's norm scaling).")


TABLES = [claims_table, test_table, amazon_table, norm_table, feature_table, calibration_table, ntk_table,
          scaling_table, lr_table, paired_table]


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
    groups = scaling_groups(rows)
    if groups:
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        for (t, m), by in sorted(groups.items()):
            sc = sorted(by)
            d = [[r["diff_f"] for r in by[x]] for x in sc]
            ax.errorbar([np.mean([r["head_norm0"] for r in by[x]]) for x in sc], [np.mean(v) for v in d],
                        yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for v in d], fmt="o-", capsize=3,
                        label=f"{t} {NAMES[m]} (n={min(len(v) for v in d)})")
        ax.set(xscale="log", xlabel="||V||_F at the start of FT", ylabel="Diff(F), mean ± std over seeds",
               title="norm scaling")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decades only: minor labels overlap
        ax.legend(fontsize=7)
        made.append(save(fig, root / "feature_change_vs_norm.png"))
    return made


def save(fig, path):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    data.atomic(path, lambda t: fig.savefig(t, format="png", dpi=120))
    plt.close(fig)
    return path


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
    figs = plots(s.rows, root)
    pngs = sorted(root.rglob("reliability_test.png"))[:2] + sorted(root.rglob("spectrum.png"))[:1]
    md += "\n## Figures\n\n" + "\n".join(f"![{p.stem}]({os.path.relpath(p, root)})" for p in figs + pngs) + "\n"
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
