"""The figures of report.py (a support module: report.py imports it; it imports no stage script and reads files only).

Each figure function takes report.py's Study (runs at their chosen learning rates: s.runs, s.runs_of,
s.paper_kernels, s.scaling_groups; s.root, s.tasks, s.rows) and returns (title, fed, [PNG paths], note), or with
paths None the one line "Missing: ..." in its place. The first section is what report.py's tables share with the
figures: the methods' names and order, reading numbers out of results, and the section lines.

    python report.py --root runs     # writes runs/head_norm.png, runs/ntk_spectra.png, runs/tsne_<task>.png, ...
    python -m pytest tests/test_report.py -q
"""

import math
import os
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np

import data
import rundir

# ---------------------------------------------------------------- shared with report.py's tables
# the paper's methods, then BitFit (lora.py --bitfit) and EH-FT (Yang et al. 2022: ft.py --init a LoRA / BitFit run)
METHODS = ["lp", "ft", "lp_ft", "lora", "lp_lora", "bitfit", "lp_bitfit", "lora_ft", "bitfit_ft"]
NAMES = {"lp": "LP", "ft": "FT", "lp_ft": "LP-FT", "lora": "LoRA", "lp_lora": "LP-LoRA", "bitfit": "BitFit",
         "lp_bitfit": "LP-BitFit", "lora_ft": "LoRA-FT", "bitfit_ft": "BitFit-FT"}
# the fine-tuning methods, in the paper's row order (Tables 1, 2), then the kit's additions
FT_METHODS = ["ft", "lora", "lp_ft", "lp_lora", "bitfit", "lp_bitfit", "lora_ft", "bitfit_ft"]
FRESH = ("ft", "lora", "bitfit")  # the methods that start from a fresh head
SCALING_SPLIT = {"amazon": "sst5"}  # the paper's Figure 3: a model trained on Amazon, its features on SST-5 (OOD)


def num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def pick(d, *path):
    """d[path[0]][path[1]]... when every step is a dict and the end a finite number, else None."""
    for p in path:
        d = d.get(p) if isinstance(d, dict) else None
    return d if num(d) else None


def seed_key(r):
    return (not isinstance(r["seed"], int), r["seed"] if isinstance(r["seed"], int) else 0)


def rel(path, root):
    return os.path.relpath(path, root)


def missing(title, why, width=5):
    """A table (width 5) or figure (width 4) whose runs are missing: its title and the one line that says so."""
    return (title,) + (None,) * (width - 2) + (f"Missing: {why}",)


def fed_by(runs, reads):
    """The line under a table or figure: how many runs of which tasks, methods and seeds, and what it reads."""
    runs = list(runs)
    tasks = [t for t in data.TASKS if any(r["task"] == t for r in runs)]
    methods = [NAMES[m] for m in METHODS if any(r["method"] == m for r in runs)]
    seeds = sorted({r["seed"] for r in runs if isinstance(r["seed"], int)})
    return (f"fed by: {len(runs)} runs ({', '.join(tasks)}; {', '.join(methods)}; seeds "
            f"{', '.join(map(str, seeds))}): {reads}")


def load_arrays(path, keys):
    """{key: array} from an .npz file, or None when it is missing, damaged or lacks a key (the figure says so)."""
    try:
        with np.load(path) as z:
            return {k: z[k] for k in keys}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def scaling_split(task):
    """The split a task's norm-scaling Diff(F) is read on: SST-5 for Amazon (the paper's Figure 3), else test."""
    return SCALING_SPLIT.get(task, "test")


def scaling_diff(r, split):
    """A run's Diff(F) at its best epoch on a split, or None when the run did not record that split."""
    return pick(r["features"], split, "diff_f")


# ---------------------------------------------------------------- drawing
COLORS = {"lp": "C0", "ft": "C1", "lora": "C2", "lp_ft": "C3", "lp_lora": "C4", "bitfit": "C5", "lp_bitfit": "C6",
          "lora_ft": "C8", "bitfit_ft": "C9"}
MARKERS = {"lp": "*", "ft": "X", "lora": "P", "lp_ft": "D", "lp_lora": "s", "bitfit": "v", "lp_bitfit": "^",
           "lora_ft": "<", "bitfit_ft": ">"}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    rundir.atomic(path, lambda t: fig.savefig(t, format="png", dpi=120))
    plt.close(fig)
    return path


# ---------------------------------------------------------------- Figures 1 and 4: the head norm
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


def lp_curves(ax, s, t):
    """(a): per LP seed ||V|| of each LBFGS iterate (solid) and its test accuracy (dashed, right axis)."""
    acc_ax = None
    for i, r in enumerate(sorted(s.runs(t, "lp"), key=seed_key)):
        if r.get("norm_curve"):
            ax.plot(r["norm_curve"], lw=1, color=f"C{i}", label=f"seed {r['seed']}: test {100 * r['test']:.1f}")
        if r.get("norm_curve_test_accuracy"):
            acc_ax = acc_ax or ax.twinx()
            acc_ax.plot(100 * np.asarray(r["norm_curve_test_accuracy"]), "--", lw=1, color=f"C{i}")
    ax.set(title=f"{t}: (a) LP", xlabel="LBFGS iteration (full batch)", ylabel="||V||_F (solid)")
    if acc_ax is not None:
        acc_ax.set_ylabel("test accuracy, % (dashed)")


def ft_curves(norm_ax, acc_ax, s, t):
    """(b): ||V|| per epoch of fine-tuning, and the test metric, mean over seeds with a ± std band."""
    sel = data.TASKS[t].select_metric
    for m in [m for m in FT_METHODS if s.runs(t, m)]:
        for a, get in ((norm_ax, lambda h: h["head_norm"]), (acc_ax, lambda h: test_metric(h, sel))):
            ep, mu, sd = by_epoch(s.runs(t, m), get)
            a.plot(ep, mu, "o-", ms=3, color=COLORS[m], label=NAMES[m])
            a.fill_between(ep, np.maximum(mu - sd, mu / 10), mu + sd, color=COLORS[m], alpha=0.2)
    norm_ax.set(title=f"{t}: (b) fine-tuning", xlabel="epoch", ylabel="||V||_F", yscale="log")
    acc_ax.set(title=f"{t}: test {sel} during fine-tuning", xlabel="epoch", ylabel=f"test {sel}, %")


def norm_bars(ax, s, t):
    """(c): ||V|| after training per method (and the fresh head), mean ± std over seeds."""
    bars = [("Pretrain", "C7", [r["head_norm0"] for r in s.runs_of(FRESH, [t])])]
    bars += [(NAMES[m], COLORS[m], [r["head_norm"] for r in s.runs(t, m)])
             for m in ("ft", "lora", "lp", "lp_ft", "lp_lora", *FT_METHODS[4:])]
    bars = [b for b in bars if b[2]]
    ax.bar(range(len(bars)), [np.mean(v) for _, _, v in bars], yerr=[np.std(v) for _, _, v in bars],
           color=[c for _, c, _ in bars], capsize=3)
    ax.set_xticks(range(len(bars)), [n for n, _, _ in bars], rotation=30, fontsize=8)
    ax.set(title=f"{t}: (c) after training", ylabel="||V||_F", yscale="log")


def fig_head_norm(s):  # Figures 1 and 4
    title = "Figures 1 and 4: head norm during LP and fine-tuning, with accuracy, and after training"
    tasks = [t for t in s.tasks if s.runs_of(tasks=[t])]
    if not tasks:
        return missing(title, "no LP or fine-tuning runs.", 4)
    plt = pyplot()
    fig, axes = plt.subplots(len(tasks), 4, figsize=(15, 3.2 * len(tasks)), squeeze=False)
    for ax, t in zip(axes, tasks):
        lp_curves(ax[0], s, t)
        ft_curves(ax[1], ax[2], s, t)
        norm_bars(ax[3], s, t)
        for a in ax[:3]:
            if a.lines:
                a.legend(fontsize=6)
    lp = s.runs_of(["lp"])
    gap = "" if any(r.get("norm_curve") for r in lp) else \
        " Missing: the LP norm curves (lp.py --norm_curve STEPS)." if lp else " Missing: LP runs (lp.py)."
    return (title, fed_by(s.runs_of(), "lp_results.json (norm_curve, norm_curve_test_accuracy: ||V|| and test "
                                       "accuracy per LBFGS iteration; metrics.test), "
                                       "results.json history (head_norm, test metric per epoch; epoch 0 = the start)"),
            [save(fig, s.root / "head_norm.png")],
            "(a) per seed: ||V|| (solid) and test accuracy (dashed, right axis) of each LBFGS iterate from a zero "
            "head; (b)-(c) mean over seeds, bands and bars ± std."
            + gap)


# ---------------------------------------------------------------- Figures 2 and 7: the eNTK's spectra
SV_FLOOR = 1e-10  # the spectra's lower edge: float32 sums carry ~1e-7 relative error, so smaller is rounding


def spectrum(k, K):
    v = (k["res"]["kernels"].get(K) or {}).get("sv_normalised")
    return v if isinstance(v, list) and v and all(num(x) for x in v) else None


def spectra_panel(ax, t, first):
    """One task: P once, then each method's F ({method: its kernel at the lowest seed})."""
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


def fig_spectra(s):  # Figures 2 and 7
    title = "Figures 2 and 7: normalised singular values of the eNTK components, methods overlaid"
    ks = [k for k in s.paper_kernels() if spectrum(k, "F")]
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
        spectra_panel(ax, t, first)
    return (title, fed_by(used, "ntk_results.json (kernels.P and kernels.F: sv_normalised)"),
            [save(fig, s.root / "ntk_spectra.png")],
            f"Singular values of the [N·C, N·C] train kernel divided by the largest, drawn down to {SV_FLOOR:g}; P is "
            "the same for every method. "
            "The paper's Figure 2 is CB, Figure 7 RTE, BoolQ and WiC.")


# ---------------------------------------------------------------- Figures 3, 10 and 11: feature change against norm
def scaling_curve(ax, m, by, on, mark=True):
    """One method: Diff(F) on split `on` against the mean initial head norm of each head scale, ± standard error;
    with mark, a dashed line at the unscaled runs' mean head norm after training (the paper's Figure 3)."""
    sc = [v for v in sorted(by) if any(scaling_diff(r, on) is not None for r in by[v])]
    x = [np.mean([r["head_norm0"] for r in by[v]]) for v in sc]
    d = [[y for r in by[v] for y in [scaling_diff(r, on)] if y is not None] for v in sc]
    mu = np.array([np.mean(v) for v in d])
    se = np.array([np.std(v, ddof=1) / math.sqrt(len(v)) if len(v) > 1 else 0.0 for v in d])
    ax.plot(x, mu, "o-", color=COLORS[m], label=f"{NAMES[m]} (n={min(len(v) for v in d) if d else 0})")
    ax.fill_between(x, mu - se, mu + se, color=COLORS[m], alpha=0.2)
    if mark and 1.0 in by:  # the head's norm after training (its best epoch), unscaled
        ax.axvline(np.mean([r["head_norm"] for r in by[1.0]]), ls="--", lw=1, color=COLORS[m])


def fig_scaling(s):  # Figures 3 and 11
    title = "Figures 3 and 11: feature change against the initial head norm (norm scaling)"
    groups = s.scaling_groups()
    if not groups:
        return missing(title, "no runs with --head_scale other than 1 (run_all.sh's norm scaling).", 4)
    tasks = [t for t in data.TASKS if any(g[0] == t for g in groups)]
    plt = pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.8 * len(tasks), 3.4), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        on = scaling_split(t)
        for (_, m), by in sorted((g, by) for g, by in groups.items() if g[0] == t):
            scaling_curve(ax, m, by, on)
        ax.set(xscale="log", xlabel="||V||_F at the start of fine-tuning", ylabel=f"Diff(F) on {on}", title=t)
        ax.legend(fontsize=7)
    return (title, fed_by([r for by in groups.values() for rs in by.values() for r in rs],
                          "results.json of each --head_scale (head_norm at epoch 0 and at the best epoch, diff_f at "
                          "the best epoch)"),
            [save(fig, s.root / "feature_change_vs_norm.png")],
            "Mean over seeds, shaded ± standard error (as the paper); dashed: the unscaled runs' ||V|| after "
            "training (their best epoch; as the paper's Figure 3). Diff(F) on each task's own test split, for "
            "Amazon on SST-5 (out of distribution) when recorded, as the paper's Figure 3 (Figure 11: CB and RTE; "
            "Figure 10, below: Amazon's other splits).")


def fig_amazon_splits(s):  # Figure 10
    """Figure 3 on each of Amazon's test sets: per split, each fine-tuning method's Diff(F) at its best epoch against
    its initial head norm (one point at head scale 1; a curve where head-scaled runs exist)."""
    title = "Figure 10: feature change on Amazon's ID test split and each OOD set, against the initial head norm"
    splits = ("test",) + data.TASKS["amazon"].ood
    scaled = s.scaling_groups()
    groups = {m: scaled.get(("amazon", m)) or {1.0: s.runs("amazon", m)} for m in FT_METHODS
              if s.runs("amazon", m) or ("amazon", m) in scaled}
    drawn = [sp for sp in splits if any(scaling_diff(r, sp) is not None for by in groups.values()
                                        for rs in by.values() for r in rs)]
    if not groups or drawn == ["test"]:
        why = "no Amazon fine-tuning runs (run_all.sh --paper, or --tasks amazon)" if not groups else \
            "the Amazon runs recorded no OOD set's feature statistics (made by an older kit? rerun them)"
        return missing(title, why + ".", 4)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(drawn), figsize=(4.2 * len(drawn), 3.4), squeeze=False)
    for ax, sp in zip(axes[0], drawn):
        for m, by in groups.items():
            scaling_curve(ax, m, by, sp, mark=False)
        ax.set(xscale="log", xlabel="||V||_F at the start of fine-tuning", ylabel="Diff(F)",
               title=f"amazon: {'ID test' if sp == 'test' else sp}")
        ax.legend(fontsize=7)
    gap = [sp for sp in splits if sp not in drawn]
    return (title, fed_by([r for by in groups.values() for rs in by.values() for r in rs],
                          "results.json (features.<split>.diff_f at the best epoch, head_norm at epoch 0)"),
            [save(fig, s.root / "feature_change_amazon_splits.png")],
            "The model trained on Amazon, its feature change on each test set: Amazon (ID), DynaSent, SemEval and "
            "SST-5 (SST-5 is Figure 3's panel). Per method the mean over seeds at its chosen learning rate, shaded "
            "± standard error; with head-scaled runs, one point per --head_scale. The numbers: Table 11."
            + (f" Missing: no run recorded {', '.join(gap)}." if gap else ""))


# ---------------------------------------------------------------- Figures 5 and 6: t-SNE
TSNE_MAX = 400  # examples at most in a t-SNE: the exact method is O(n^2) per step (Barnes-Hut was slower here)


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


def saved_features(run, key="test_phi"):
    """(test features, labels) from a run's features.npz (lp.py, ft.py, lora.py): test_phi at the best epoch,
    test_phi0 at the start (the pre-trained features); None when absent or damaged."""
    z = load_arrays(Path(run["dir"]) / "features.npz", [key, "test_labels"])
    return None if z is None else (z[key].astype(np.float64), z["test_labels"])


def pretrained_features(runs):
    """The LP panel's features: the pre-trained test features (test_phi0) of the LP run's features.npz, else those a
    fine-tuning run of the same seed started from. runs: {method: run}, LP first."""
    return next((f for r in runs.values() for f in [saved_features(r, "test_phi0")] if f), None)


INIT_SOURCES = ("lp", "lora", "bitfit")  # the runs an --init names: an LP head, or EH-FT's stage-1 run


def start_rows(run, runs):
    """A fine-tuning run's head rows at the start [C, d]: features.npz's head0 (ft.py and lora.py save it), else, for
    a run made before they did, the head its --init names by content (init_sha256 in its config: the LP run's
    lp_head.pt, or an EH-FT source run's model.safetensors, among runs: {method: run} of its seed) times its
    --head_scale. None: a fresh head that was not saved."""
    z = load_arrays(Path(run["dir"]) / "features.npz", ["head0"])
    if z is not None:
        return z["head0"].astype(np.float64)
    sha = run["config"].get("init_sha256")
    for src in [runs[m] for m in INIT_SOURCES if m in runs and sha]:
        f = Path(src["dir"]) / ("lp_head.pt" if src["method"] == "lp" else "model.safetensors")
        if f.exists() and rundir.file_sha256(f) == sha:
            w = head_rows(src)
            return None if w is None else w * run["config"].get("head_scale", 1.0)
    return None


def tsne_points(phi, labels, rows):
    """The points of one t-SNE panel, embedded together: the features (a seeded subset of at most TSNE_MAX) and then
    every set of head rows. rows: [(when, method, W [C, d])], when "start" or "after" training.
    -> (x [n + sum of C, d], the kept features' labels, [(when, method, first index in x, C)])."""
    if len(phi) > TSNE_MAX:
        keep = np.sort(np.random.default_rng(0).choice(len(phi), TSNE_MAX, replace=False))
        phi, labels = phi[keep], labels[keep]
    spans, at = [], len(phi)
    for when, m, w in rows:
        spans.append((when, m, at, len(w)))
        at += len(w)
    return np.concatenate([phi] + [w for _, _, w in rows]), labels, spans


def tsne_panel(ax, title, phi, labels, rows):
    """One t-SNE (scikit-learn) of the features and the head rows together, as a panel of Figures 5-6: the rows at
    the start hollow, after training filled, a grey line from each row's start to its end."""
    from matplotlib.lines import Line2D
    from sklearn.manifold import TSNE

    x, labels, spans = tsne_points(phi, labels, rows)
    # cosine: a head's rows are orders of magnitude shorter than the features, so under the Euclidean distance they
    # all land on one spot; exact: on these features Barnes-Hut took 35 s for 300 points, exact 4 s
    emb = TSNE(perplexity=min(30.0, (len(x) - 1) / 3), metric="cosine", init="pca", method="exact",
               random_state=0).fit_transform(x)
    for c in np.unique(labels):
        ax.scatter(*emb[:len(labels)][labels == c].T, s=8, alpha=0.5, color=f"C{c}", label=f"features, class {c}")
    pts = {(when, m): emb[at:at + n] for when, m, at, n in spans}
    for (when, m), e in pts.items():
        colors = [f"C{c}" for c in range(len(e))]
        ax.scatter(*e.T, s=110, marker=MARKERS[m], edgecolor=colors if when == "start" else "k",
                   facecolor="none" if when == "start" else colors, linewidths=1.5)
        if when == "after" and ("start", m) in pts:
            for a, b in zip(pts[("start", m)], e):
                ax.plot(*np.stack([a, b]).T, color="0.5", lw=0.8, zorder=0)
    keys = [Line2D([], [], ls="", marker=MARKERS[m], ms=8, color="0.6", mec="0.3" if when == "start" else "k",
                   mfc="none" if when == "start" else "0.6",
                   label=f"{NAMES[m]} rows" + (", start" if when == "start" else ", after" if m != "lp" else ""))
            for when, m, _, _ in spans]
    ax.set(xticks=[], yticks=[])
    ax.set_title(title, fontsize=9)
    ax.legend(handles=ax.get_legend_handles_labels()[0] + keys, fontsize=6, loc="best")


def tsne_gap(t, m, feats):
    """Why a method's panel cannot be drawn, given its features (None: not found)."""
    if feats is None:
        return f"{t} {NAMES[m]}: " + ("no features.npz with the pre-trained test features (test_phi0) in the LP run "
                                     "or a fine-tuning run of its seed" if m == "lp" else
                                     "features.npz missing or damaged (a run made before the kit saved it?)")
    return f"{t} {NAMES[m]}: " + ("too few test features for a t-SNE" if len(feats[0]) < 4
                                  else "its head (lp_head.pt / model.safetensors)")


def panel_rows(r, runs, w, gaps, t):
    """A panel's head rows: LP's head, or a fine-tuning run's at the start (when known) and after training."""
    if r["method"] == "lp":
        return [("after", "lp", w)]
    w0 = start_rows(r, runs)
    if w0 is None or w0.shape != w.shape:
        gaps.append(f"{t} {NAMES[r['method']]}: its head rows at the start (features.npz has no head0: a run made "
                    f"before the kit saved them); the panel shows them after training only")
        return [("after", r["method"], w)]
    return [("start", r["method"], w0), ("after", r["method"], w)]


def tsne_panels(s, t):
    """The panels of one task at its lowest seed with an LP run or a fine-tuning run: [(title, phi, labels,
    [(when, method, head rows)])], the gaps and the runs used. Pre-trained: the test features (the LP run's
    features.npz, else the start of a fine-tuning run's) with the LP head; then each method's features after
    fine-tuning with its head's rows at the start and after training."""
    first = min((r for m in ["lp", *FT_METHODS] for r in s.runs(t, m)), key=seed_key, default=None)
    if first is None:
        return [], [f"{t}: no LP or fine-tuning run"], []
    seed = first["seed"]
    runs = {m: r for m in ["lp", *FT_METHODS] for r in s.runs(t, m) if r["seed"] == seed}
    panels, gaps, used = [], [] if "lp" in runs else [f"{t}: no LP run"], []
    for m, r in runs.items():
        feats = pretrained_features(runs) if m == "lp" else saved_features(r)
        w = None if feats is None else head_rows(r)
        if w is None or w.shape[1:] != feats[0].shape[1:] or len(feats[0]) < 4:
            gaps.append(tsne_gap(t, m, feats))
            continue
        name = "pre-trained, LP head" if m == "lp" else f"{NAMES[m]}, after training"
        panels.append((f"{t} {name} (seed {seed})", *feats, panel_rows(r, runs, w, gaps, t)))
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
    return (title, fed_by(used, "features.npz (test_phi0: the pre-trained test features, the LP run's or else a "
                               "fine-tuning run's; test_phi at the best epoch, test_labels; head0: the head's rows "
                               "at the start), lp_head.pt and model.safetensors (head.weight after training)"),
            paths,
            "One panel per method at the task's lowest seed: the LP model (the pre-trained test features and the LP "
            "head, LP-FT's start), then each fine-tuning method's test features at its best epoch with its head's "
            "rows at the start (hollow) and after training (filled), a grey line joining each row's two places "
            "(row k in class k's colour), all in one embedding per panel. scikit-learn TSNE, cosine metric, "
            f"perplexity min(30, (n-1)/3), PCA init, exact method, random_state 0, at most {TSNE_MAX} examples (a "
            "seeded subset); the panels' axes are not comparable."
            + (f" Missing: {'; '.join(gaps)}." if gaps else ""))


# ---------------------------------------------------------------- Figures 8 and 9: the kernels' trace norms
HEATMAP_ORDER = ["ft", "lp_ft", "lora", "lp_lora"]  # the paper's panels: Figure 8 (FT, LP-FT), Figure 9 (LoRA's)


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


def heatmap(fig, ax, name, tn, y):
    """One panel: the trace-norm map, white lines between classes, each class block's mean written in it."""
    im = ax.imshow(tn, cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046)
    for e in np.flatnonzero(np.diff(y)) + 0.5:
        ax.axhline(e, color="w", lw=0.8)
        ax.axvline(e, color="w", lw=0.8)
    mid = {c: np.flatnonzero(y == c).mean() for c in np.unique(y)}
    for (a, b), v in block_means(tn, y).items():  # the class-pair means, at their blocks' centres
        ax.text(mid[b], mid[a], f"{v:.3g}", ha="center", va="center", fontsize=7,
                bbox={"facecolor": "w", "alpha": 0.6, "lw": 0, "pad": 1})
    ax.set_xticks(list(mid.values()), [f"class {c}" for c in mid], fontsize=7)
    ax.set_yticks(list(mid.values()), [f"class {c}" for c in mid], fontsize=7)
    ax.set_title(name, fontsize=9)


def heatmap_plot(path, title, panels):
    plt = pyplot()
    rows = -(-len(panels) // 3)  # three a row: P, FT's and LP-FT's F (Figure 8), then LoRA's and LP-LoRA's (9)
    fig, axes = plt.subplots(rows, 3, figsize=(11.7, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, panel in zip(axes.flat, panels):
        heatmap(fig, ax, *panel)
    fig.suptitle(title, fontsize=10)
    return save(fig, path)


def trace_norm_panels(s, ks, t, seed, gaps, used):
    """One task's panels at one seed: P (from the first kernel read), then each method's F."""
    panels = []
    for k in [k for m in HEATMAP_ORDER for k in ks if (k["task"], k["method"], k["seed"]) == (t, m, seed)]:
        z = load_arrays(Path(k["dir"]) / "kernels.npz", ["P_train", "F_train", "train_labels"])
        if z is None or not kernels_ok(z):
            gaps.append(f"{rel(Path(k['dir']) / 'kernels.npz', s.root)} (missing or damaged)")
            continue
        if not panels:
            panels.append(("Figure 8: Pre-train E (P)", *trace_norms(z["P_train"], z["train_labels"])))
        fig_no = 9 if "lora" in k["method"] else 8
        panels.append((f"Figure {fig_no}: FT E ({NAMES[k['method']]})", *trace_norms(z["F_train"], z["train_labels"])))
        used.append(k)
    return panels


def fig_trace_norm(s):  # Figures 8 and 9
    title = "Figures 8 and 9: trace norms of the kernel's C x C blocks, samples grouped by class"
    ks = s.paper_kernels()
    paths, used, gaps = [], [], []
    for t in [t for t in data.TASKS if any(k["task"] == t for k in ks)]:
        seed = min((k for k in ks if k["task"] == t), key=seed_key)["seed"]
        panels = trace_norm_panels(s, ks, t, seed, gaps, used)
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


# ---------------------------------------------------------------- the figure section of report.md
FIGURES = [fig_head_norm, fig_spectra, fig_scaling, fig_tsne, fig_trace_norm, fig_amazon_splits]


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
