"""A GLUE task's k-shot draws written as LM-BFF's / MeZO's tools/generate_k_shot_data.py --mode k-shot-1k-test
writes them, byte for byte from the same files: <out>/<TASK>/<K>-<SEED>/{train,dev,test}.tsv with their folder
names (SST-2, CoLA, MRPC). The examples are the ones the kit's `--k_shot K --data_seed SEED` draws, so one split
feeds both codes (their --data_dir is the folder above <TASK>: data/k-shot-1k-test/<TASK>/<K>-<SEED>).

    python tools/k_shot_export.py --task sst2 --k_shot 16 --out data/k-shot-1k-test
    python tools/k_shot_export.py --task mrpc --k_shot 64 --seeds "13 42" --out /tmp/kshot --data_dir ../shared/data

Every draw is made and checked before any file is written; each file is written atomically (an existing one is
replaced, as their script does).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import rundir  # noqa: E402
from rundir import die  # noqa: E402


def draw_files(task, k, seed, root):
    """-> {file name: text}: the three files their script writes for (task, K, seed)."""
    rows = data.their_k_shot(task, k, seed, root, data.load_file(task, "train", root),
                             data.load_file(task, "test", root))
    (head, lines), (dev_head, dev) = data.their_lines(task, "train", root), data.their_lines(task, "test", root)
    pick = lambda h, ls, r: "".join(h + [ls[i] for i in r])  # noqa: E731  their f.write of each line as read
    return {"train.tsv": pick(head, lines, rows["train"]), "dev.tsv": pick(head, lines, rows["val"]),
            "test.tsv": pick(dev_head, dev, rows["test"])}


def parse_seeds(text):
    try:
        seeds = [int(s) for s in text.split()]
    except ValueError:
        die(f"--seeds {text!r}: not whole numbers; pass them space-separated, e.g. --seeds \"13 21 42 87 100\"")
    if not seeds:
        die("--seeds is empty; pass at least one seed, e.g. --seeds 13")
    return seeds


@rundir.cli
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, help=f"one of {', '.join(data.THEIR_TASK)}")
    p.add_argument("--k_shot", "--k", type=int, required=True, help="K: train (and dev) examples per label")
    p.add_argument("--seeds", default=" ".join(map(str, data.DATA_SEEDS)), help="data seeds, space-separated")
    p.add_argument("--out", required=True, help="the folder <TASK>/<K>-<SEED>/ go into")
    p.add_argument("--data_dir", help="the kit's data folder (glue/<Task>/{train,dev}.tsv)")
    args = p.parse_args(argv)
    if args.task not in data.THEIR_TASK:
        die(f"--task {args.task}: the export is for the GLUE tsv tasks ({', '.join(data.THEIR_TASK)}); the "
            f"SuperGLUE tasks (RTE, CB, ...) keep the kit's draw, which their script does not make")
    rundir.check_positive(args, ["k_shot"])
    rundir.check_output_dir(args.out, "--out")
    root = data.data_root(args.data_dir)
    folder = Path(args.out) / data.THEIR_TASK[args.task]
    todo = {folder / f"{args.k_shot}-{s}": draw_files(args.task, args.k_shot, s, root) for s in parse_seeds(args.seeds)}
    for d, files in todo.items():
        for name, text in files.items():
            rundir.atomic(d / name, lambda t: Path(t).write_bytes(text.encode("utf-8")))  # noqa: B023 (called now)
        print(d)
    return list(todo)


if __name__ == "__main__":
    main()
