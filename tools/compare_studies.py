"""Two studies that differ in one setting (e.g. --batching random against length), paired by task, method and
seed: the test metric and Diff(F) at each run's best epoch, and their differences (B - A) with 95% t intervals.

    bash run_all.sh --tasks cb --methods "lp ft lp_ft" --no_ntk --no_scale --batching length --out runs_len
    bash run_all.sh --tasks cb --methods "lp ft lp_ft" --no_ntk --no_scale --batching random --out runs_rand
    python tools/compare_studies.py runs_len runs_rand --tasks cb --methods "ft lp_ft"

Writes B/compare_<A's name>.json and prints a markdown table.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import report  # noqa: E402
import rundir  # noqa: E402
from rundir import die  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="study A's --out (the baseline)")
    p.add_argument("b", help="study B's --out")
    p.add_argument("--tasks", default="cb")
    p.add_argument("--methods", default="ft lp_ft")
    args = p.parse_args(argv)
    for d in (args.a, args.b):
        if not Path(d).is_dir():
            die(f"{d}: no such study folder (run_all.sh --out)")
    for t in args.tasks.split():
        data.get_task(t)
    return args


def values(root, task, method):
    """{seed: (test metric, Diff(F) on test)} at the best epoch of each finished run root/task/method-seed<S>."""
    out = {}
    for f in sorted(Path(root, task).glob(f"{method}-seed*/results.json")):
        r = rundir.read_json(f, "results.json")
        seed = f.parent.name.rsplit("-seed", 1)[1]
        if not r or not seed.isdigit() or "best_epoch" not in r:
            continue
        best = next(h for h in r["history"] if h["epoch"] == r["best_epoch"])
        out[int(seed)] = (best["test"][data.get_task(task).select_metric], best["diff_f"])
    return out


@rundir.cli
def main(argv=None):
    args = parse(argv)
    rows = []
    for t in args.tasks.split():
        for m in args.methods.split():
            a, b = values(args.a, t, m), values(args.b, t, m)
            if not set(a) & set(b):
                die(f"{t} {m}: no seed finished in both {args.a} and {args.b}")
            row = {"task": t, "method": m, "seeds": sorted(set(a) & set(b))}
            for i, key in enumerate(("test", "diff_f")):
                pa, pb = ({s: v[i] for s, v in x.items()} for x in (a, b))
                row[key] = {"a": [pa[s] for s in row["seeds"]], "b": [pb[s] for s in row["seeds"]],
                            "b_minus_a": report.paired(pb, pa)}
            rows.append(row)
    na, nb = Path(args.a).name, Path(args.b).name
    print(f"| task | method | seeds | test {na} | test {nb} | test {nb} - {na} | Diff(F) {na} | Diff(F) {nb} | "
          f"Diff(F) {nb} - {na} |\n|---|---|---|---|---|---|---|---|---|")
    mean = lambda v, k=1: f"{sum(v) / len(v) * k:.{3 if k == 1 else 1}f}"  # noqa: E731
    for r in rows:
        te, df = r["test"], r["diff_f"]
        print(f"| {r['task']} | {r['method']} | {len(r['seeds'])} | {mean(te['a'], 100)} | {mean(te['b'], 100)} | "
              f"{report.fmt_pair(te['b_minus_a'])} | {mean(df['a'])} | {mean(df['b'])} | "
              f"{report.fmt_pair(df['b_minus_a'], 1, '+.3f')} |")
    rundir.save_json(Path(args.b) / f"compare_{na}.json", {"a": args.a, "b": args.b, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
