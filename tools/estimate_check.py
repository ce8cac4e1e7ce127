"""How far run_all.sh's time-left estimates were from the truth, read back from its log.

    bash run_all.sh > study.log 2>&1; python tools/estimate_check.py study.log
    python tools/estimate_check.py study.log --total 1580   # the study's wall time, if the log lacks its last line

Each "about N min left (at T s)" line is set beside what was really left: the study's total time minus T. The total
is the --total given, else the log's last "done in ... min" line rounded up to whole minutes' precision from the
last estimate (pass --total for exact figures: run the study under `time`). The worst error counts from the first
fine-tuning job on (ft, lp_ft, lora, lp_lora, or a kernel-study job): before it the estimate rests on priors.
"""

import argparse
import re
import sys

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("log")
p.add_argument("--total", type=float, help="the study's wall time in seconds")
args = p.parse_args()

text = open(args.log, encoding="utf-8", errors="replace").read()
if args.total is None:
    m = re.search(r"^done in (\d+) min", text, re.M)
    if not m:
        sys.exit(f"error: {args.log} has no 'done in N min' line; pass --total SECONDS (the study's wall time)")
    args.total = 60 * int(m[1]) + 30  # the middle of the minute it reports
    print(f"total taken as {args.total:.0f} s from the log's 'done in {m[1]} min' (pass --total for exact figures)")

rows, trained = [], False
for line in text.splitlines():
    done = re.match(r"\s+done: (\S+)", line)
    if done and done[1] != "lp":
        trained = True  # the first fine-tuning (or kernel) job has finished: estimates count from here
    m = re.search(r"about (\d+) (min|s) left \(at (\d+) s\)", line)
    if m:
        est = int(m[1]) * (60 if m[2] == "min" else 1)
        at, truth = int(m[3]), args.total - int(m[3])
        rows.append((at, est, truth, (est - truth) / truth if truth > 0 else float("nan"), trained))
if not rows:
    sys.exit(f"error: {args.log} has no 'about N min left (at T s)' lines; is it run_all.sh's output?")
print(f"{'at (s)':>8} {'estimate (s)':>13} {'truth (s)':>10} {'error':>8}")
for at, est, truth, err, counted in rows:
    print(f"{at:>8} {est:>13} {truth:>10.0f} {err:>+8.1%}{'' if counted else '   (before the first FT job)'}")
counted = [abs(r[3]) for r in rows if r[4]]
if counted:
    print(f"worst error from the first fine-tuning job on: {max(counted):.1%} over {len(counted)} estimates")
