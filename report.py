"""Gather every run under an output root into the paper's tables and figures.

    python report.py                      # reads runs/, writes runs/report.md, runs/report.csv, runs/*.png
    python report.py --root runs_paper

Reads files only: results.json (ft.py, lora.py), lp_results.json (lp.py), calibration.json (calibrate.py) and
ntk_results.json (ntk.py); for the figures (report_figs.py) also kernels.npz (ntk.py), features.npz (lp.py, ft.py,
lora.py: the test features before and after), lp_head.pt and model.safetensors (the classifier rows).
Every table and figure of Tomihari & Sato (2024) the runs can feed comes in the paper's order, each under one
line "fed by: ..." naming its runs; one whose runs are missing is one line "Missing: ..." (as is a missing part
of present runs). Learning rates are chosen per task and method
by the best mean validation metric over seeds (CoLA: MCC; ties: the lowest learning rate); test scores are never
used to choose. A run that diverged counts as a failed point. Missing values show as "–". Every file the report
could not use (corrupt, truncated, unfinished, of another shape or of an older kit's layout) and every (task,
method, lr) with fewer seeds than the study are listed under "Runs not used" at the top of report.md and on
stderr; a mean over fewer seeds than the study says so with (n=k).
"""

import argparse
import csv
import io
import json
import math
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import data
import report_figs
import rundir
from report_figs import FRESH, FT_METHODS, METHODS, NAMES, fed_by, load_arrays, missing, num, pick, rel

DASH = "–"
RESULTS = ("results.json", "lp_results.json", "ntk_results.json")
ARTIFACTS = ("ckpt.pt", "model.safetensors", "meta.json", "logits.npz", "lp_head.pt", "kernels.npz")
FEATURE_STATS = ("diff_f", "cs_f", "fdr_f")  # an epoch's record: features.<split>.<stat> (ft.py, lora.py)
FDR_PINV = "fdr_f_pinv"  # tr(S_W^+ S_B), recorded since issue 26: a run without it shows "–"
CAL_METRICS = ("accuracy", "nll", "brier", "ece", "mce")  # calibration.json: per split, before and after
PROMPT_RUN = "a prompt-based run (--prompt): not one of the paper's methods, so no table reads it"
EHFT = ("lora_ft", "bitfit_ft")  # EH-FT (Yang et al. 2022): the head of a LoRA or BitFit run, then fine-tuning


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs", help="output root of run_all.sh (default runs)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- reading and checking files
def read(path):
    """-> (object, None) or (None, why it cannot be read)."""
    try:
        return json.loads(Path(path).read_text()), None
    except (OSError, UnicodeDecodeError) as e:
        return None, f"cannot read ({type(e).__name__})"
    except ValueError as e:
        return None, f"corrupt or truncated JSON ({e.msg if hasattr(e, 'msg') else e})"


def config_problem(c, name):
    """Why a results file's config names no usable run, or None."""
    if not isinstance(c, dict):
        return "no config"
    if c.get("task") not in data.TASKS:
        return f"unknown task {c.get('task')!r}"
    method = "lp" if name == "lp_results.json" else c.get("method")
    if isinstance(method, str) and method.startswith("prompt_"):
        return PROMPT_RUN
    if method not in METHODS:
        return f"unknown method {method!r}"
    if not isinstance(c.get("seed"), int) or not (c.get("lr") is None or num(c["lr"])) \
            or not num(c.get("head_scale", 1.0)):
        return "config lacks an integer seed or has a non-numeric lr or head_scale"
    return None


def run_problem(r, name):
    """Why a results.json / lp_results.json cannot be used, or None. A failed (diverged) run is usable."""
    if not isinstance(r, dict):
        return f"a JSON {type(r).__name__}, not a results object"
    why = config_problem(r.get("config"), name)
    if why or r.get("failed"):
        return why
    if r.get("finished") is not True:
        return "unfinished run (not marked finished)"
    m, sel = r.get("metrics"), data.TASKS[r["config"]["task"]].select_metric
    if not isinstance(m, dict) or not all(isinstance(v, dict) and all(num(x) for x in v.values()) for v in m.values()):
        return "metrics are missing or not numbers"
    if not all(num((m.get(s) or {}).get(sel)) for s in ("val", "test")) or not num(r.get("head_norm")):
        return f"no val/test {sel} or head_norm"
    return lp_problem(r) if name == "lp_results.json" else history_problem(r)


def lp_problem(r):
    for k in ("norm_curve", "norm_curve_test_accuracy"):
        v = r.get(k)
        if not (v is None or isinstance(v, list) and all(num(x) for x in v)):
            return f"{k} is not a list of numbers"
    return None


def history_problem(r):
    hist = r.get("history")
    if not isinstance(hist, list) or not hist or not all(
            isinstance(h, dict) and num(h.get("epoch")) and num(h.get("head_norm")) for h in hist):
        return "history is missing or lacks epoch/head_norm numbers"
    best = next((h for h in hist if h["epoch"] == r.get("best_epoch")), None)
    if best is None or not all(pick(best, "features", "test", k) is not None for k in FEATURE_STATS):
        return "the best epoch's features.test diff_f/cs_f/fdr_f are missing"
    return None


def calibration_problem(cal):
    """Why a calibration.json is not the layout calibrate.py writes (the temperature, whether its fit converged, the
    optimizer; per split n and each metric before and after temperature scaling), or None."""
    isnum = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    split_ok = lambda m: isinstance(m, dict) and isnum(m.get("n")) and all(  # noqa: E731
        isinstance(m.get(w), dict) and all(isnum(m[w].get(k)) for k in CAL_METRICS) for w in ("before", "after"))
    ok = isinstance(cal, dict) and isnum(cal.get("temperature")) and isinstance(cal.get("converged"), bool) \
        and isinstance(cal.get("optimizer"), str) and isinstance(cal.get("splits"), dict) \
        and all(split_ok(m) for m in cal["splits"].values())
    return None if ok else "not the layout calibrate.py writes"


def ntk_problem(k):
    """Why an ntk_results.json cannot be used, or None."""
    if not isinstance(k, dict) or not isinstance(k.get("config"), dict):
        return "not an ntk.py result (no config)"
    c = k["config"]
    if c.get("task") not in data.TASKS:
        return f"unknown task {c.get('task')!r}"
    if str(c.get("ntk_method")).startswith("prompt_"):
        return PROMPT_RUN
    if c.get("ntk_method") not in FT_METHODS or not isinstance(c.get("kernel"), str):
        return "no ntk_method or kernel in its config (an older ntk.py's layout; rerun ntk.py)"
    kern = k.get("kernels")
    if not isinstance(kern, dict) or not all(isinstance(kern.get(K), dict) for K in ("P", "F", "P+F")):
        return "no kernels P, F, P+F"
    pf = kern["P+F"]
    stats = {"ft_ratio": k.get("ft_ratio"), "head_norm": k.get("head_norm"), "config.n_train": c.get("n_train"),
             "kernels.P.fro": kern["P"].get("fro"), "kernels.F.fro": kern["F"].get("fro"),
             "kernels.P+F.rank": pf.get("rank")}
    for solver in ("kernel_regression", "pair_logreg"):
        v = pf.get(solver) or {}
        stats[f"kernels.P+F.{solver}.test"] = v.get("test") if isinstance(v, dict) else v
    bad = [f"{name} = {x!r}" for name, x in stats.items() if not (x is None or num(x))]
    return f"not a number: {', '.join(bad)}" if bad else None


# ---------------------------------------------------------------- collecting runs
@dataclass
class Study:
    """Everything the tables and figures read: usable runs, NTK results, what was left out and why."""
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

    def runs_of(self, methods=METHODS, tasks=None):
        """Every run at its chosen learning rate of these methods (and tasks)."""
        return [r for t in tasks or self.tasks for m in methods for r in self.runs(t, m)]

    def paper_kernels(self):
        """The kernels the paper's tables and figures use: the eNTK (ntk.py --kernel sgd) at each method's start,
        head unscaled."""
        return [k for k in self.kernels if k["scale"] == 1.0 and k["kind"] == "sgd" and k["method"] in FT_METHODS]

    def scaling_groups(self):
        """Norm scaling: {(task, method): {scale: [runs over seeds]}} for the methods with head-scaled runs (scale 1
        = the study's own runs at that method's learning rate)."""
        rows = [r for r in self.rows if not r["failed"] and r["method"] != "lp"]
        scaled = {(r["task"], r["method"], r["lr"]) for r in rows if r["scale"] != 1.0}
        out = defaultdict(lambda: defaultdict(list))
        for r in rows:
            if (r["task"], r["method"], r["lr"]) in scaled:
                out[(r["task"], r["method"])][r["scale"]].append(r)
        return out


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
    """An ntk_results.json as the tables and figures read it."""
    c = k["config"]
    scale = c.get("head_scale", 1.0)
    return {"dir": str(d), "task": c["task"], "method": c["ntk_method"], "seed": c.get("seed"), "res": k,
            "scale": scale if num(scale) else None, "kind": c["kernel"]}


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
        cal = read_calibration(f.parent, root, problems)
        rows.append(row | ({"calibration": cal} if cal else {}))
    return rows


def read_calibration(d, root, problems):
    """A run folder's calibration.json, or None (absent, or unusable: then appended to problems)."""
    path = d / "calibration.json"
    if not path.exists():
        return None
    cal, why = read(path)
    why = why or calibration_problem(cal)
    logits = d / "logits.npz"
    if not why and logits.exists() and path.stat().st_mtime_ns < logits.stat().st_mtime_ns:
        why = "older than its logits.npz (the run was redone after calibration); rerun calibrate.py"
    if why:
        problems.append((rel(path, root), why))
        return None
    return cal


def run_row(r, f):
    c = r["config"]
    task, method = c["task"], "lp" if f.name == "lp_results.json" else c["method"]
    sel = data.TASKS[task].select_metric
    row = {"dir": str(f.parent), "task": task, "method": method, "seed": c["seed"], "lr": c.get("lr"),
           "scale": c.get("head_scale", 1.0), "failed": r.get("failed"), "sel": sel, "config": c}
    if row["failed"]:
        return row
    m = r["metrics"]
    row |= {"metrics": m, "val": m["val"][sel], "test": m["test"][sel], "head_norm": r["head_norm"]}
    if method == "lp":
        return row | {"norm_curve": r.get("norm_curve"), "norm_curve_test_accuracy": r.get("norm_curve_test_accuracy"),
                      "C": r.get("C"), "cv": r.get("cv")}
    hist = r["history"]
    best = next(h for h in hist if h["epoch"] == r["best_epoch"])
    return row | {k: best["features"]["test"][k] for k in FEATURE_STATS} | {
        "head_norm0": hist[0]["head_norm"], "test0": pick(hist[0], "test", sel), "history": hist,
        "features": best["features"]}


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


# ---------------------------------------------------------------- statistics and the learning-rate choice
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


def by_seed(runs, key):
    return {r["seed"]: r[key] for r in runs if r.get(key) is not None}


def c_split(cal, key, split="test"):
    """calibration.json value for (before|after, metric) on a split, or None."""
    sp = cal["splits"].get(split)
    return None if sp is None else sp[key[0]][key[1]]


def ece_by_seed(runs, when):
    return {r["seed"]: c_split(r["calibration"], (when, "ece")) for r in runs if r.get("calibration")
            and c_split(r["calibration"], (when, "ece")) is not None}


# ---------------------------------------------------------------- tables: each returns (title, fed, header, body, note)
# `fed` is the line under the title that names the runs and fields the table reads. A table whose runs are missing
# returns body None and the one line "Missing: ..." as its note, which stands in its place.


def table(header, body):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(x) for x in row) + " |" for row in body]
    return "\n".join(out)


def feature_rows(s, t, split="test"):
    """Table 1's rows for one task, on one evaluation split. Pre-trained: the features at epoch 0 of every
    fine-tuning run (the encoder is still the pre-trained one, whatever the head) and the fresh head (FT's and
    LoRA's start); LP: the same features (LP does not change them) and the LP head; then each fine-tuning method at
    its best epoch (a split an epoch did not record: -)."""
    tuned = s.runs_of(FT_METHODS, [t])
    if not tuned and not s.runs(t, "lp"):
        return []
    name = t if split == "test" else f"{t} ({split})"
    start = [r["history"][0] for r in tuned if r["history"][0]["epoch"] == 0]
    pre = [ms(s, [pick(h, "features", split, k) for h in start]) if k else DASH
           for k in ("cs_f", None, "fdr_f", FDR_PINV)]
    rows = [[f"{name} Pre-trained", *pre, ms(s, [r["head_norm0"] for r in s.runs_of(FRESH, [t])])]]
    if s.runs(t, "lp"):
        rows.append([f"{name} LP", *pre, ms(s, [r["head_norm"] for r in s.runs(t, "lp")])])
    for m in FT_METHODS:
        if s.runs(t, m):
            rows.append([f"{name} {NAMES[m]}"] + [ms(s, [pick(r["features"], split, k) for r in s.runs(t, m)])
                                                 for k in ("cs_f", "diff_f", "fdr_f", FDR_PINV)]
                        + [ms(s, [r["head_norm"] for r in s.runs(t, m)])])
    return rows


FEATURES_READ = ("results.json history (cs_f, diff_f, fdr_f, fdr_f_pinv, head_norm at the best epoch; epoch 0 for "
                 "Pre-trained) and lp_results.json (head_norm)")
FEATURE_HEADER = ["run", "CS(F)", "Diff(F)", "FDR(F) tr(S_B)/tr(S_W)", "FDR(F) tr(S_W⁺S_B)", "Norm(C)"]
FDR_NOTE = ("FDR(F) both ways: tr(S_B)/tr(S_W), between- over within-class scatter (the kit's), and tr(S_W⁺S_B) "
            "(pseudo-inverse, float64; – for a run made before the kit recorded it). The paper's magnitudes (CB 8e4 "
            "to 7e8 on 56 test examples, Amazon 1.3 on 38,905) are the second's: a trace ratio that large needs "
            "99.999% of the scatter between classes, and S_W⁺ pseudo-inverted in float32 with fewer examples than "
            "feature dimensions gives such values (docs/conventions.md, *FDR both ways*).")


def feature_table(s):  # Tables 1 and 12: feature change and the classifier's norm
    title = "Feature change and head norm (Tables 1, 12)"
    body = [row for t in s.tasks for row in feature_rows(s, t)]
    if not body:
        return missing(title, "no LP or fine-tuning runs (results.json, lp_results.json).")
    return (title, fed_by(s.runs_of(), FEATURES_READ), FEATURE_HEADER, body,
            "Mean ± std over seeds, on the test split. CS(F): mean cosine similarity between the features of two "
            "examples; Diff(F): mean ||phi(x) - phi_0(x)|| from the pre-trained features (Table 12 is this column); "
            "Norm(C): ||V||_F of the head. Pre-trained: the features at epoch 0 of the fine-tuning runs and the fresh "
            "head; LP: the same features and the LP head. " + FDR_NOTE)


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
    ks = s.paper_kernels()
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
            "/".join(sorted({c["optimizer"] for c in cals}))]


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
    used = [r for r in s.runs_of() if r.get("calibration") and c_split(r["calibration"], ("before", "ece")) is not None]
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
    body += [[f"{t} at the start"] + [mean_std([r.get("test0") for r in s.runs(t, m)], len(s.seeds))
                                      if m != "lp" else DASH for m in s.methods] for t in tasks]
    return (title, fed_by(s.runs_of(tasks=tasks), "results.json (metrics.test; history[0].test: the start) and "
                                                  "lp_results.json (metrics.test)"),
            ["task"] + [NAMES[m] for m in s.methods], body,
            "Accuracy in percent, CoLA Matthews correlation x100; learning rate chosen on validation; (n=k): only "
            "k seeds (see Runs not used). At the start: the model before its first step (epoch 0): FT's fresh head, "
            "LP-FT's LP head, EH-FT's (LoRA-FT, BitFit-FT) stage-1 head, each on the pre-trained encoder.")


def amazon_table(s):  # Table 10: Amazon in- and out-of-distribution
    title = "Amazon: ID and OOD accuracy (Table 10)"
    if "amazon" not in s.tasks:
        return missing(title, "no Amazon runs (run_all.sh --paper, or --tasks amazon).")
    ood = ["test"] + list(data.TASKS["amazon"].ood)
    body = [[NAMES[m]] + [mean_std([r["metrics"].get(sp, {}).get("accuracy") for r in s.runs("amazon", m)],
                                   len(s.seeds)) for sp in ood] for m in s.methods]
    return (title, fed_by(s.runs_of(tasks=["amazon"]), "results.json and lp_results.json (metrics per test set)"),
            ["method", "Amazon (ID)"] + ood[1:], body, "")


def amazon_feature_table(s):  # Table 11: feature and classifier change on Amazon, in and out of distribution
    title = "Amazon: feature and head change, ID and OOD (Table 11)"
    if "amazon" not in s.tasks:
        return missing(title, "no Amazon runs (run_all.sh --paper, or --tasks amazon).")
    body = [row for sp in ("test",) + data.TASKS["amazon"].ood for row in feature_rows(s, "amazon", sp)]
    return (title, fed_by(s.runs_of(tasks=["amazon"]), FEATURES_READ.replace("(cs_f", "(features per split: cs_f")),
            FEATURE_HEADER, body,
            "As Table 1 (above), on Amazon's ID test split and on each OOD test set (Dynasent, SemEval, SST-5), the "
            "features of the model trained on Amazon.")


def norm_table(s):  # Table 13: the classifier weight norms after training
    title = "Head norm ||V||_F after training (Table 13)"
    cols = ["ft", "lora", "lp", "lp_ft", "lp_lora"] + [m for m in FT_METHODS[4:] if m in s.methods]
    body = [[t, ms(s, [r["head_norm0"] for r in s.runs_of(FRESH, [t])])]
            + [ms(s, [r["head_norm"] for r in s.runs(t, m)]) for m in cols] for t in s.tasks]
    body += [[f"{t} at the start", DASH] + [DASH if m == "lp" else ms(s, [r["head_norm0"] for r in s.runs(t, m)])
                                            for m in cols] for t in s.tasks]
    if not body:
        return missing(title, "no LP or fine-tuning runs.")
    return (title, fed_by(s.runs_of(), "results.json (head_norm at the best epoch; epoch 0 for Pretrain) and "
                                     "lp_results.json (head_norm)"),
            ["task", "Pretrain"] + [NAMES[m] for m in cols], body,
            "Mean ± std over seeds. Pretrain: the fresh head FT and LoRA start from; LP: the fitted head "
            "(LP-FT's and LP-LoRA's start); the others at their best epoch; at the start: each method's head at "
            "epoch 0 (EH-FT's: its LoRA / BitFit run's).")


def lp_cv_table(s):  # the kit's own: how firmly cross-validation chose LP's C
    title = "LP's choice of C: the cross-validation margin"
    lp = [r for r in s.runs_of(["lp"]) if r.get("C") is not None]
    fmt = lambda cv, k: f"{cv[k]:.4f}" if cv else DASH  # noqa: E731
    how = lambda r: r["cv"]["scoring"] if r["cv"] else "fixed --C" if r["config"].get("C") else DASH  # noqa: E731
    body = [[r["task"], str(r["seed"]), how(r), f"{r['C']:.3g}",
             fmt(r["cv"], "chosen_score"), f"{r['cv']['runner_up_C']:.3g}" if r["cv"] else DASH,
             fmt(r["cv"], "runner_up_score"), fmt(r["cv"], "margin")]
            for r in sorted(lp, key=lambda r: (r["task"], r["seed"]))]
    if not body:
        return missing(title, "no LP runs (lp.py).")
    return (title, fed_by(lp, "lp_results.json (C, cv: the mean CV score of each C)"),
            ["task", "seed", "scoring", "C", "CV score", "runner-up C", "its score", "margin"], body,
            "The mean cross-validation score (accuracy: higher is better; log_loss: lower) of the chosen C and of "
            "the best other C. A margin of an example or two of accuracy is a choice that rounding on another "
            "processor can flip (docs/results.md, how LP chooses C); a fixed --C has none, an older kit's run –.")


def pubmed_table(s):  # Table 16: PubMed 20k RCT
    title = "PubMed 20k RCT: test accuracy (Table 16)"
    if "pubmed" not in s.tasks:
        return missing(title, "no PubMed runs (run_all.sh --paper, or --tasks pubmed).")
    body = [["pubmed"] + [mean_std([r["test"] for r in s.runs("pubmed", m)], len(s.seeds)) for m in s.methods]]
    return (title, fed_by(s.runs_of(tasks=["pubmed"]), "results.json and lp_results.json (metrics.test)"),
            ["task"] + [NAMES[m] for m in s.methods], body, "Accuracy in percent.")


def scaling_table(s):  # the numbers of Figures 3 and 11: norm scaling, mean +- std over seeds
    title = "Norm scaling: initial head norm vs feature change (Figures 3, 11)"
    groups = s.scaling_groups()
    on = {t: report_figs.scaling_split(t) for t, _ in groups}
    body = [[f"{t} {NAMES[m]}", f"{sc:g}", f"{np.mean([r['head_norm0'] for r in rs]):.3f}", on[t],
             mean_std([report_figs.scaling_diff(r, on[t]) for r in rs], len(s.seeds), 1, ".3f"),
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
    return (title, fed_by(s.runs_of(), "results.json and lp_results.json (metrics.test), calibration.json (test ece)"),
            ["task", "comparison", "difference"], body,
            "Test metric in points (x100); ECE in percentage points. An interval that excludes 0 is larger "
            "than the seed noise.")


EHFT_ROWS = (("test at the start", "test0", 100), ("test", "test", 100), ("Diff(F)", "diff_f", 1),
             ("‖V‖ at the start", "head_norm0", 1), ("FT ratio (eNTK at the start)", None, 1))


def ehft_table(s):  # the kit's own: EH-FT beside LP-FT and FT, paired by seed
    title = "EH-FT against LP-FT and FT (paired by seed)"
    body = []
    for t in s.tasks:
        for m in [m for m in EHFT if s.runs(t, m)]:
            for what, key, unit in EHFT_ROWS:
                v = {x: by_seed(s.runs(t, x), key) if key else ntk_by_seed(s, t, x) for x in (m, "lp_ft", "ft")}
                spec = ".1f" if unit == 100 else ".3g"
                body.append([f"{t} {NAMES[m]}", what, mean_std(list(v[m].values()), len(s.seeds), unit, spec)]
                            + [fmt_pair(paired(v[m], v[b]), unit, "+" + spec) for b in ("lp_ft", "ft")])
    if not body:
        return missing(title, "no EH-FT runs (run_all.sh --methods \"lora_ft bitfit_ft\"; ft.py --init a lora.py run).")
    runs = s.runs_of(("ft", "lp_ft") + EHFT)
    return (title, fed_by(runs, "results.json (history[0]: test and head_norm at the start; metrics.test, diff_f) "
                                "and ntk_results.json (ft_ratio)"),
            ["run", "quantity", "mean ± std", "− LP-FT", "− FT"], body,
            "EH-FT (Yang et al. 2022): the head a LoRA or BitFit run trained, on the pre-trained encoder, then "
            "fine-tuning of everything. Differences by seed, mean [95% t interval]; test in points (x100).")


# ---------------------------------------------------------------- the kernel view (run_all.sh --kernel_study)
SOLVERS = ("lstsq", "lstsq_init", "logistic", "svc", "asym")


def kshot_accuracy(run, kernel):
    """A k-shot run's test accuracy on its kernel's test examples (ntk.py's test_positions in the k-shot test split).
    None: not comparable."""
    z = load_arrays(Path(run["dir"]) / "logits.npz", ("test_logits", "test_labels"))
    keep = kernel.get("test_positions")
    if z is None or keep is None:
        return None
    lg, y, keep = z["test_logits"], z["test_labels"], np.asarray(keep, dtype=int)
    return float((lg[keep].argmax(1) == y[keep]).mean()) if keep.size and keep.max() < len(y) else None


def solver_test(res, x):
    """A solver's test accuracy in an ntk_results.json: at the settings chosen on val (tuned) where the kernel has
    them, lstsq_init then being lstsq's f0 axis (None); else at the fixed settings (solvers)."""
    tuned = res.get("tuned")
    v = ((tuned.get("solvers") or {}) if isinstance(tuned, dict) else (res.get("solvers") or {})).get(x) or {}
    return v.get("test") if isinstance(v, dict) else None


def kshot_groups(s):
    """-> ([((task, K, method, kind), [kernels over data seeds])] in task order, {(task, K, method, data seed):
    the fine-tuned run})."""
    runs = {(r["task"], r["config"]["k_shot"], r["method"], r["config"]["data_seed"]): r for r in s.kshot
            if not r["failed"]}
    groups = defaultdict(list)
    for k in s.kshot_kernels:
        c = k["res"]["config"]
        groups[(c["task"], c["k_shot"], k["method"], k["kind"])].append(k)
    return sorted(groups.items(), key=lambda g: (list(data.TASKS).index(g[0][0]),) + g[0][1:]), runs


def kernel_study_row(task, K, m, kind, ks, runs, used):
    """One (task, K, method, kernel) of the kernel view: the fine-tuned runs' accuracy and each solver's, over the
    data seeds of its kernels ks; the runs read are appended to used. -> [row]"""
    ft_acc = []
    for k in ks:
        run = runs.get((task, K, m, k["res"]["config"].get("data_seed")))
        if run is not None:
            used.append(run)
            ft_acc.append(kshot_accuracy(run, k["res"]))
    n_test = ks[-1]["res"]["config"].get("n_test_used")
    return [[task, K, NAMES.get(m, m), kind, f"{len(ks)} / {n_test}", mean_std(ft_acc, len(ks))]
            + [mean_std([solver_test(k["res"], x) for k in ks], len(ks)) for x in SOLVERS]]


def kshot_rows(s, rows_of):
    """The kernel tables' body: rows_of(task, K, start, kernel, kernels, runs, used) -> [rows] per group ->
    (rows, runs used)."""
    groups, runs = kshot_groups(s)
    used = []
    return [r for g, ks in groups for r in rows_of(*g, ks, runs, used)], used


def kernel_study_table(s):  # Malladi et al.: fine-tuning beside the kernel of its start, on the same k-shot data
    title = "Kernel view: k-shot fine-tuning against the kernel of its start (run_all.sh --kernel_study)"
    if not s.kshot_kernels:
        return missing(title, "no k-shot ntk.py runs (bash run_all.sh --kernel_study)")
    body, used = kshot_rows(s, kernel_study_row)
    fed = fed_by(used, "results.json + logits.npz of each k-shot run, ntk_results.json (tuned or solvers, "
                       f"test_positions) of {len(s.kshot_kernels)} kernels")
    return (title, fed, ["task", "K", "start", "kernel", "seeds / test", "fine-tuned"] + list(SOLVERS), body,
            "Test accuracy (%), mean ± std over data seeds, every column on the same test examples. fine-tuned: the "
            "model at its best val epoch; the solvers (ntk.py, Malladi et al.'s) on the kernel of the same start over "
            "every trainable parameter, each at its settings chosen on the k-shot val split (ridge, f0 scaling, the "
            "asymmetric solver's gamma and lambda; lstsq_init is then lstsq's f0 axis: –), or for a kernel made "
            "without them (ntk.py --solver_settings fixed, or before it) at the fixed --ridge: lstsq, lstsq_init "
            "(fitted to y − f0, their --adjust_for_init), logistic, svc, asym (asymmetric SignGD kernels only); – "
            "where a solver does not apply.")


def reach(p):
    """Fine-tuning against its kernel, judged by the 95% interval of FT − kernel (Malladi et al.'s question)."""
    m, h, n = p
    if m is None:
        return "missing runs"
    if h is None:
        return "one seed: no interval"
    if m - h > 0:
        return "above 0: FT beyond the kernel"
    return "below 0: kernel better (FT within its reach)" if m + h < 0 else "contains 0: within the kernel's reach"


def reach_rows(task, K, m, kind, ks, runs, used):
    """The verdict table's rows of one (task, K, start, kernel), one per solver: FT and the solver at its settings
    chosen on val, paired by data seed on the kernel's own test examples. One solver a row, as their
    gather_result.py, which chooses a seed's run among one tag's (the solver fixed) and never across solvers."""
    ft_acc = {}
    for k in ks:
        seed = k["res"]["config"].get("data_seed")
        run = runs.get((task, K, m, seed))
        acc = None if run is None else kshot_accuracy(run, k["res"])
        if acc is not None:
            used.append(run)
            ft_acc[seed] = acc
    n_test = ks[-1]["res"]["config"].get("n_test_used")
    head = [task, K, NAMES.get(m, m), kind, f"{len(ks)} / {n_test}", mean_std(list(ft_acc.values()), len(ks))]
    rows = []
    for x in SOLVERS:
        kern = {}  # {data seed: the solver's test accuracy at its dev-chosen settings}
        for k in ks:
            t = solver_test(k["res"], x) if isinstance(k["res"].get("tuned"), dict) else None
            if num(t):
                kern[k["res"]["config"].get("data_seed")] = t
        if kern:
            p = paired(ft_acc, kern)
            rows.append(head + [x, mean_std(list(kern.values()), len(ks)), fmt_pair(p), reach(p)])
    return rows or [head + [DASH, DASH, DASH, "missing runs"]]  # no kernel with settings chosen on val


def kernel_reach_table(s):  # Malladi et al.'s question, like for like: is fine-tuning within its kernel's reach?
    title = "Kernel view: fine-tuning minus the kernel of its start, paired by data seed (run_all.sh --kernel_study)"
    if not s.kshot_kernels:
        return missing(title, "no k-shot ntk.py runs (bash run_all.sh --kernel_study)")
    body, used = kshot_rows(s, reach_rows)
    fed = fed_by(used, "results.json + logits.npz of each k-shot run, ntk_results.json (tuned.solvers, "
                       f"test_positions) of {len(s.kshot_kernels)} kernels")
    return (title, fed, ["task", "K", "start", "kernel", "seeds / test", "fine-tuned", "solver", "kernel",
                         "FT − kernel, points", "verdict"], body,
            "Test accuracy (%), mean ± std over data seeds, on the kernel's test examples for both. fine-tuned: the "
            "model at its best val epoch; kernel: one solver a row, at its settings best on the k-shot val split "
            "(ntk.py --solver_settings dev: ridge, f0 scaling, the asymmetric solver's gamma and lambda; the solver "
            "itself is not chosen, as Malladi et al.'s gather_result.py; a kernel made without them: missing). "
            "FT − kernel: mean [95% t interval] over the data seeds both have. Verdict: an interval that contains "
            "0: fine-tuning within the kernel's reach; above 0: fine-tuning beyond the kernel; below 0: the kernel "
            "better.")


# ---------------------------------------------------------------- the paper's claims
def verdict(p, side=1):
    """The paper's claim that a difference is > 0 (side=1) or < 0 (side=-1), judged by its 95% interval."""
    m, h, n = p
    if m is None:
        return "missing runs"
    if h is None:
        return "one seed: no interval"
    lo, hi = sorted((side * (m - h), side * (m + h)))
    return "holds" if lo > 0 else "does not hold" if hi < 0 else "inside the noise"


def all_hold(verdicts):
    """One verdict for a claim made of several differences: the first that is not 'holds', in this order."""
    return next((v for v in ("missing runs", "one seed: no interval", "does not hold", "inside the noise")
                 if v in verdicts), "holds")


def ntk_by_seed(s, task, method):
    """{seed: FT ratio} of a task's ntk runs of a method (head scale 1)."""
    return {k["seed"]: k["res"]["ft_ratio"] for k in s.paper_kernels()
            if k["task"] == task and k["method"] == method and isinstance(k["seed"], int)
            and k["res"].get("ft_ratio") is not None}


def scaling_pairs(s, task):
    """c6: for each method with head-scaled runs, Diff(F) at the smallest minus at the largest initial head scale
    (scale 1 = the study's own runs), paired by seed, on the split the norm-scaling table and figure use (Amazon:
    SST-5). -> (that split, [(method, small, large, paired)])"""
    out, on = [], report_figs.scaling_split(task)
    for (t, m), by in sorted(s.scaling_groups().items()):
        if t == task:
            lo, hi = ({r["seed"]: d for r in by[sc] for d in [report_figs.scaling_diff(r, on)] if d is not None}
                      for sc in (min(by), max(by)))
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
    for m in [m for m in EHFT if ch(m)]:  # the kit's extension: EH-FT's head, accurate with a large norm
        d = by_seed(ch(m), "diff_f")
        rows.append((f"c7 Diff(F) of {NAMES[m]} (EH-FT) lies between LP-FT's and FT's",
                     f"Diff(F) {NAMES[m]} − LP-FT (> 0); {NAMES[m]} − FT (< 0)",
                     [paired(d, by_seed(ch("lp_ft"), "diff_f")), paired(d, by_seed(ch("ft"), "diff_f"))], [1, -1], 1))
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
            ps, sides = (p, side) if isinstance(p, list) else ([p], [side])  # c7: two differences, both must hold
            body.append([t, claim, what, "; ".join(fmt_pair(q, unit, "+.1f" if unit == 100 else "+.3g") for q in ps),
                         all_hold([verdict(q, sd) for q, sd in zip(ps, sides)])])
    if not body:
        return missing(title, "no runs.")
    return (title, fed_by(s.rows + s.kernels, "results.json, lp_results.json, calibration.json, ntk_results.json "
                                               "(ft_ratio) and the head-scaled runs"),
            ["task", "claim", "difference", "mean [95% interval] (n seeds)", "verdict"], body,
            "Each claim is a paired difference by seed with its 95% t interval: **holds** when the interval lies "
            "on the paper's side of 0, **does not hold** when it lies on the other, **inside the noise** when it "
            "contains 0. Learning rates as chosen on val (below); c5 needs ntk.py runs per seed, c6 head-scaled "
            "runs (run_all.sh's norm scaling). c7 (the kit's extension, with EH-FT runs: Yang et al. 2022) holds "
            "when both of its intervals do.")


# ---------------------------------------------------------------- the report
# the paper's tables in its order (a table merged with a later one sits at the first), then the kit's own
TABLES = [claims_table, feature_table, ntk_table, calibration_table, test_table, amazon_table, amazon_feature_table,
          norm_table, lp_cv_table, pubmed_table, scaling_table, ehft_table, lr_table, paired_table,
          kernel_reach_table, kernel_study_table]


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


@rundir.cli
def main(argv=None):
    args = parse(argv)
    root = rundir.check_output_dir(args.root, "--root")  # a file, or a folder we cannot write, stops here
    if not root.is_dir():
        rundir.die(f"no output root {root}; run bash run_all.sh first (or pass --root DIR)")
    s = collect(root)
    for path, why in s.problems:
        print(f"report: not used: {root / path}: {why}", file=sys.stderr)
    for line in s.short:
        print(f"report: fewer seeds: {line}", file=sys.stderr)
    md, csvrows = build(s)
    md += "\n" + report_figs.figures(s)
    buf = io.StringIO()
    csv.writer(buf).writerows([["table", "row", "column", "value"]] + csvrows)
    for name, text in (("report.md", md), ("report.csv", buf.getvalue())):
        rundir.atomic(root / name, lambda t, text=text: Path(t).write_text(text))
    print(md)
    left_out = f"; {len(s.problems)} files not used, see 'Runs not used'" if s.problems else ""
    print(f"wrote {root / 'report.md'}, {root / 'report.csv'} ({len(s.rows)} runs{left_out})")
    return md


if __name__ == "__main__":
    main()
