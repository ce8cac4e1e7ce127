"""How often does LP's choice of C move when the features move by rounding? Each scoring of the cross-validation
(lp.py --cv_scoring) on each task and seed: the C chosen on the features, then on R copies perturbed by
`--rel` relative noise (x * (1 + rel * N(0, 1)), about what another processor's float32 sums change), counting the
copies whose C differs. The kit's default scoring is the one that moves least (docs/results.md).

    python tools/cv_stability.py --tasks "cb rte sst2 mrpc" --seeds "1001 2002 3003" --out runs/cv_stability
    python tools/cv_stability.py --tasks cb --seeds 1001 --repeats 2      # a quick look

Features come from lp.py's cache (--cache_dir, as run_all.sh's runs/cache), computed once when absent.
Writes <out>/cv_stability.json and prints the table.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import lp  # noqa: E402
import rundir  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--tasks", default="cb rte sst2 mrpc")
    a("--seeds", default="1001 2002 3003")
    a("--repeats", type=int, default=5, help="perturbed copies per task, seed and scoring")
    a("--rel", type=float, default=1e-6, help="relative size of the perturbation")
    a("--max_train_samples", type=int, default=1000, help="train subset, as the default study's SST-2")
    a("--data_dir")
    a("--cache_dir", default="runs/cache")
    a("--out", default="runs/cv_stability")
    args = p.parse_args(argv)
    for t in args.tasks.split():
        data.get_task(t)
    rundir.check_positive(args, ["repeats", "rel", "max_train_samples"])
    rundir.check_output_dir(args.out, "--out")
    return args


def train_features(args, task, seed):
    """lp.py's train features and labels for (task, seed), through its cache."""
    la = lp.parse(["--task", task, "--seed", str(seed), "--max_train_samples", str(args.max_train_samples),
                   "--cache_dir", args.cache_dir] + (["--data_dir", args.data_dir] if args.data_dir else []))
    splits = {"train": data.load_splits(la)["train"]}
    return lp.features(la, splits, lp.fingerprint(la))["train"], splits["train"].labels


def choices(x, y, task, scoring, args, seed):
    """-> (C on x, [C on each perturbed copy], the cross-validation's margin on x)."""
    folds, n_classes = lp.cv_folds(y, task, None), len(data.get_task(task).labels)
    first = lp.fit(x, y, None, n_classes, folds, scoring=scoring)
    rng = np.random.default_rng(seed)
    moved = [lp.fit(x * (1 + args.rel * rng.standard_normal(x.shape)).astype(x.dtype), y, None, n_classes, folds,
                    scoring=scoring)[2] for _ in range(args.repeats)]
    return first[2], moved, first[5]


@rundir.cli
def main(argv=None):
    args = parse(argv)
    rows, t0 = [], time.time()
    cases = [(t, int(s)) for t in args.tasks.split() for s in args.seeds.split()]
    for i, (task, seed) in enumerate(cases):
        x, y = train_features(args, task, seed)
        for scoring in lp.CV_SCORINGS:
            C, moved, cv = choices(x, y, task, scoring, args, seed)
            rows.append({"task": task, "seed": seed, "scoring": scoring, "C": C, "perturbed_C": moved,
                         "moved": sum(c != C for c in moved), "margin": cv["margin"]})
        left = (time.time() - t0) / (i + 1) * (len(cases) - i - 1)
        print(f"[{i + 1}/{len(cases)}] {task} seed {seed}: "
              + ", ".join(f"{r['scoring']} C={r['C']:.3g} moved {r['moved']}/{args.repeats}" for r in rows[-2:])
              + f"; about {left / 60:.1f} min left", flush=True)
    total = {s: sum(r["moved"] for r in rows if r["scoring"] == s) for s in lp.CV_SCORINGS}
    res = {"config": vars(args), "rows": rows,
           "moved": total, "of": len(cases) * args.repeats}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rundir.save_json(out / "cv_stability.json", res)
    print(f"\n{'task':<7}{'seed':>6}  " + "".join(f"{s + ': C, moved, margin':>32}" for s in lp.CV_SCORINGS))
    for task, seed in cases:
        r = {x["scoring"]: x for x in rows if x["task"] == task and x["seed"] == seed}
        print(f"{task:<7}{seed:>6}  " + "".join(f"{r[s]['C']:>12.3g}{r[s]['moved']:>8}/{args.repeats}"
                                                f"{r[s]['margin']:>10.2g}" for s in lp.CV_SCORINGS))
    print("moved in total: " + ", ".join(f"{s} {n} of {res['of']}" for s, n in total.items()))
    print(f"wrote {out / 'cv_stability.json'}")
    return res


if __name__ == "__main__":
    main()
