import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import rundir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import k_shot_export  # noqa: E402

# paper Table 7 (train / val / test); train/val = official train split 9:1 without shuffling
SIZES = {"cb": (225, 25, 56), "rte": (2241, 249, 277), "sst2": (60614, 6735, 872), "wic": (4885, 543, 638),
         "wsc": (498, 56, 104), "cola": (7695, 856, 1043), "mrpc": (3301, 367, 408)}


@pytest.mark.parametrize("task", sorted(SIZES))
def test_split_sizes(task, data_dir):
    d = data.load_task(task, data_dir)
    assert (len(d["train"]), len(d["val"]), len(d["test"])) == SIZES[task]
    assert d["train"].labels.dtype == np.int64
    assert set(np.unique(d["train"].labels)) <= set(range(len(data.TASKS[task].labels)))


def test_val_is_last_tenth_unshuffled(data_dir):
    rows = data.read_jsonl(data_dir / "superglue/RTE/train.jsonl")
    d = data.load_task("rte", data_dir)
    assert d["train"].texts[0] == (rows[0]["premise"], rows[0]["hypothesis"])
    assert d["val"].texts[0] == (rows[2241]["premise"], rows[2241]["hypothesis"])
    assert d["val"].texts[-1] == (rows[-1]["premise"], rows[-1]["hypothesis"])


def test_wic_and_wsc_inputs(data_dir):
    r = data.read_jsonl(data_dir / "superglue/WiC/train.jsonl")[0]
    a, b = data.load_task("wic", data_dir)["train"].texts[0]
    assert a == f"{r['sentence1']} {r['sentence2']} Does {r['word']} have the same meaning in both sentences?"
    assert b is None
    r = data.read_jsonl(data_dir / "superglue/WSC/train.jsonl")[0]
    assert data.load_task("wsc", data_dir)["train"].texts[0] == (
        r["target"]["span2_text"] + ": " + r["text"], r["target"]["span1_text"])


def test_glue_quote_none_keeps_rows(data_dir):
    # default csv quoting loses MRPC rows and eats RTE quotes
    d = data.load_task("mrpc", data_dir)
    assert len(d["train"]) + len(d["val"]) == 3668 and len(d["test"]) == 408
    assert any(t[0].startswith('"') for t in d["train"].texts + d["test"].texts)


def test_unknown_task_lists_valid_ones():
    with pytest.raises(rundir.KitError, match="unknown task 'nope'.*rte.*pubmed"):
        data.get_task("nope")


def test_missing_file_names_path_and_both_fixes(tmp_path):
    with pytest.raises(rundir.KitError) as e:
        data.load_task("rte", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "superglue/RTE/train.jsonl") in msg and "LPFT_DATA" in msg and "hub" in msg
    assert "\n" not in msg


def test_boolq_official_format(tmp_path, data_dir):
    (tmp_path / "superglue/BoolQ").mkdir(parents=True)
    shutil.copy(data_dir / "superglue/BoolQ/val.jsonl", tmp_path / "superglue/BoolQ/val.jsonl")
    rows = [{"question": f"q{i}", "passage": f"p{i}", "idx": i, "label": i % 3 == 0} for i in range(20)]
    (tmp_path / "superglue/BoolQ/train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    d = data.load_task("boolq", tmp_path)
    assert (len(d["train"]), len(d["val"]), len(d["test"])) == (18, 2, 3270)
    assert d["train"].texts[3] == ("q3", "p3") and d["train"].labels[3] == 1 and d["train"].labels[1] == 0


def test_pubmed_official_format(tmp_path):
    text = "###24293578\nOBJECTIVE\tTo investigate @ Things.\nMETHODS\tA total of @ patients.\n\n" \
           "###24854809\nRESULTS\tIt Worked.\nCONCLUSIONS\tDone.\nBACKGROUND\tOld.\n\n"
    (tmp_path / "pubmed").mkdir()
    for f in ("train.txt", "dev.txt", "test.txt"):
        (tmp_path / "pubmed" / f).write_text(text)
    d = data.load_task("pubmed", tmp_path)
    assert len(d["train"]) == len(d["val"]) == len(d["test"]) == 5
    assert d["train"].texts[0] == ("to investigate @ things.", None)
    assert d["train"].labels.tolist() == [1, 2, 3, 4, 0]


def test_boss_official_format_with_ood_sets(tmp_path):
    for name, n in [("amazon", 30), ("dynasent", 4), ("semeval", 5), ("sst5", 6)]:
        (tmp_path / "boss" / name).mkdir(parents=True)
        rows = "".join(f"text {name} {i}\t{i % 3}\n" for i in range(n))
        for split in ("train", "test") if name == "amazon" else ("test",):
            (tmp_path / "boss" / name / f"{split}.tsv").write_text("Text\tLabel\n" + rows)
    d = data.load_task("amazon", tmp_path)
    assert {k: len(v) for k, v in d.items()} == {"train": 27, "val": 3, "test": 30, "dynasent": 4,
                                                 "semeval": 5, "sst5": 6}
    assert d["semeval"].texts[2] == ("text semeval 2", None) and d["semeval"].labels[2] == 2


def test_bad_label_is_one_line_error(tmp_path):
    (tmp_path / "boss/amazon").mkdir(parents=True)
    (tmp_path / "boss/amazon/train.tsv").write_text("Text\tLabel\nhello\t7\n")
    with pytest.raises(rundir.KitError, match="label 7 out of range"):
        data.load_task("amazon", tmp_path)


def test_k_shot_draw(data_dir):
    """The kit's draw (SuperGLUE tasks): K train + K val per label from the official train set, disjoint; one draw
    per (task, K, seed) whatever the caller; other seeds draw otherwise; test capped at K_SHOT_TEST rows of the
    official validation set. No k_shot_draw in the run record: such runs are the kit's draw as before."""
    full = data.load_file("rte", "train", data.data_root(data_dir))
    tr, va = data.k_shot_rows("rte", full.labels, 16, 13)
    assert np.bincount(full.labels[tr]).tolist() == [16, 16] and np.bincount(full.labels[va]).tolist() == [16, 16]
    assert not set(tr) & set(va) and (tr, va) == data.k_shot_rows("rte", full.labels, 16, 13)
    assert data.k_shot_rows("rte", full.labels, 16, 21)[0] != tr
    sp = data.k_shot_splits("rte", data_dir, 16, 13)
    assert sp["train"].meta["rows"] == tr and [t for t in sp["train"].texts] == [full.texts[i] for i in tr]
    test = data.load_file("rte", "test", data.data_root(data_dir))
    assert len(sp["test"]) == min(len(test), data.K_SHOT_TEST)
    args = argparse.Namespace(task="rte", data_dir=data_dir, k_shot=16, data_seed=13, seed=5)
    data.check_k_shot(args)
    assert data.load_splits(args)["val"].texts == sp["val"].texts and not hasattr(args, "k_shot_draw")
    assert rundir.run_name("ft", args) == "ft-k16-data13-seed5"


# Files their generate_k_shot_data.py wrote from the shipped GLUE files (how: tests/fixtures/kshot/README.md)
THEIRS = Path(__file__).resolve().parent / "fixtures" / "kshot"
THEIR_DRAWS = [("sst2", "SST-2/16-13"), ("mrpc", "MRPC/16-42"), ("cola", "CoLA/16-13")]


def their_draw(task, setting, data_dir):
    """-> (the kit's k-shot splits, their folder) for one of THEIR_DRAWS; CoLA is not shipped in data/."""
    if not data.file_path(task, "train", data.data_root(data_dir)).exists():
        pytest.skip(f"no {task} files in {data_dir}")
    k, seed = map(int, setting.split("/")[1].split("-"))
    return data.k_shot_splits(task, data_dir, k, seed), THEIRS / setting


@pytest.mark.parametrize("task,setting", THEIR_DRAWS)
def test_k_shot_draw_is_their_scripts(task, setting, data_dir):
    """GLUE tasks: train and val are the examples of their train.tsv and dev.tsv, in their order (SST-2 16-13 and
    MRPC 16-42; CoLA 16-13, shuffled in place after seed 100 as their README's command does); test is the whole
    dev file (SST-2, MRPC) or 1,000 of CoLA's 1,043; the run record names the draw."""
    sp, folder = their_draw(task, setting, data_dir)
    for split, name in (("train", "train.tsv"), ("val", "dev.tsv")):
        if (folder / name).exists():
            theirs = data.read_file(task, folder / name)  # their lines as the kit reads any GLUE file
            assert sp[split].texts == theirs.texts and sp[split].labels.tolist() == theirs.labels.tolist()
    first = {"sst2": "well worth revisiting as many times ", "cola": "Bill seems to be obnoxious, but I don't think "
             "that Sam tends.", "mrpc": "Tibco has used the Rendezvous name since 1994 for several of its technology "
             "products , according to the Palo Alto , California company ."}[task]
    assert sp["train"].texts[0][0] == first  # literally their train.tsv's first example
    n_dev = len(data.load_file(task, "test", data.data_root(data_dir)))
    assert len(sp["test"]) == min(n_dev, data.K_SHOT_TEST) and len(set(sp["test"].meta["rows"])) == len(sp["test"])
    args = argparse.Namespace(task=task, k_shot=16, data_seed=13)
    data.check_k_shot(args)
    assert args.k_shot_draw == data.K_SHOT_DRAW


@pytest.mark.parametrize("task,setting", THEIR_DRAWS)
def test_k_shot_export_is_their_files(task, setting, data_dir, tmp_path):
    """tools/k_shot_export.py writes their files byte for byte: train.tsv and dev.tsv against the copies kept, all
    three (test.tsv too) against the sha256 of their script's output."""
    _, folder = their_draw(task, setting, data_dir)
    sums = dict(ln.split()[::-1] for ln in (THEIRS / "SHA256SUMS").read_text().splitlines())
    k, seed = setting.split("/")[1].split("-")
    [out] = k_shot_export.main(["--task", task, "--k", k, "--seeds", seed, "--out", str(tmp_path),
                                "--data_dir", str(data_dir)])
    assert out == tmp_path / setting and sorted(p.name for p in out.iterdir()) == ["dev.tsv", "test.tsv", "train.tsv"]
    for f in out.iterdir():
        if (folder / f.name).exists():
            assert f.read_bytes() == (folder / f.name).read_bytes()
        assert hashlib.sha256(f.read_bytes()).hexdigest() == sums[f"{setting}/{f.name}"]


def test_k_shot_export_refusals(tmp_path):
    with pytest.raises(SystemExit, match="keep the kit's draw"):
        k_shot_export.main(["--task", "rte", "--k", "16", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="not whole numbers"):
        k_shot_export.main(["--task", "sst2", "--k", "16", "--seeds", "13 x", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_k_shot_refusals(data_dir):
    y = data.load_file("cb", "train", data.data_root(data_dir)).labels  # 16 'neutral' examples
    with pytest.raises(rundir.KitError, match="16 'neutral' training examples; --k_shot 9 needs 18"):
        data.k_shot_rows("cb", y, 9, 13)
    ns = lambda **kw: argparse.Namespace(**({"k_shot": None, "data_seed": None} | kw))
    with pytest.raises(rundir.KitError, match="--data_seed 13 without --k_shot"):
        data.check_k_shot(ns(data_seed=13))
    with pytest.raises(rundir.KitError, match="drop --max_train_samples"):
        data.check_k_shot(ns(k_shot=4, max_train_samples=10))
    a = ns(k_shot=4)
    data.check_k_shot(a)
    assert a.data_seed == data.DATA_SEEDS[0]


def test_batches_cover_everything_and_group_lengths():
    enc = [{"input_ids": [1] * n} for n in np.random.default_rng(0).integers(3, 100, 1000)]
    ev = data.batches(enc, 32)
    assert sorted(sum(ev, [])) == list(range(1000))
    lens = [len(enc[i]["input_ids"]) for i in sum(ev, [])]
    assert lens == sorted(lens, reverse=True)
    padded = lambda bs: sum(max(len(enc[i]["input_ids"]) for i in b) * len(b) for b in bs)  # noqa: E731
    for how in data.BATCHINGS:
        tr = data.batches(enc, 32, True, 3, how)
        assert sorted(sum(tr, [])) == list(range(1000)) and tr == data.batches(enc, 32, True, 3, how)
        assert tr != data.batches(enc, 32, True, 4, how)
    # length grouping: far fewer padded tokens than the uniform permutation's batches
    assert padded(data.batches(enc, 32, True, 3, "length")) < 0.7 * padded(data.batches(enc, 32, True, 3, "random"))


@pytest.mark.parametrize("how", data.BATCHINGS)
def test_batch_members_change_between_epochs_on_a_cb_sized_split(how):
    """CB: 225 examples in batches of 16. One length bucket per epoch (the kit's old 50-batch buckets) trained the
    same 15 batches every epoch in another order; now each epoch cuts new batches."""
    enc = [{"input_ids": [1] * n} for n in np.random.default_rng(1).integers(20, 250, 225)]
    epochs = [{frozenset(b) for b in data.batches(enc, 16, True, 1001 * 1000 + e, how)} for e in (1, 2, 3)]
    for a, b in [(0, 1), (1, 2), (0, 2)]:
        assert len(epochs[a] & epochs[b]) <= 2, f"{how}: {len(epochs[a] & epochs[b])} of 15 batches repeat"
    if how == "length":  # buckets still sort by length: each batch spans a narrower range than random batches do
        spread = lambda bs: np.mean([np.ptp([len(enc[i]["input_ids"]) for i in b]) for b in bs])  # noqa: E731
        assert spread(data.batches(enc, 16, True, 7, "length")) < 0.6 * spread(data.batches(enc, 16, True, 7, "random"))


def test_collate_pads_dynamically():
    enc = [{"input_ids": [5, 6, 7], "token_type_ids": [0, 0, 1]}, {"input_ids": [5], "token_type_ids": [0]}]
    b = data.collate(enc, [0, 1], pad_id=9)
    assert b["input_ids"].tolist() == [[5, 6, 7], [5, 9, 9]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert data.collate(enc, [1, 0], 9, multiple_of=16)["input_ids"].shape == (2, 16)


def test_metrics_per_task():
    logits = np.array([[1.0, 0], [0, 1], [0, 1], [1, 0]])
    y = np.array([0, 1, 0, 0])
    m = data.metrics("cola", logits, y)
    assert m["accuracy"] == 0.75 and -1 <= m["mcc"] <= 1 and data.TASKS["cola"].select_metric == "mcc"
    assert set(data.metrics("mrpc", logits, y)) == {"accuracy", "f1"}
    assert set(data.metrics("cb", np.eye(3), np.arange(3))) == {"accuracy", "macro_f1"}


def test_pooling():
    h = torch.arange(12.0).reshape(1, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0]])
    assert data.pool(h, mask, "cls").tolist() == [[0, 1, 2]]
    assert data.pool(h, mask, "mean").tolist() == [[1.5, 2.5, 3.5]]


# ---------------------------------------------------------------- bad data files: one line each, never a guess
def cb_copy(tmp_path, data_dir, train_text=None, train_bytes=None):
    d = tmp_path / "superglue/CB"
    d.mkdir(parents=True)
    shutil.copy(data_dir / "superglue/CB/val.jsonl", d / "val.jsonl")
    if train_bytes is not None:
        (d / "train.jsonl").write_bytes(train_bytes)
    else:
        (d / "train.jsonl").write_text(train_text)
    return tmp_path


ROW = {"premise": "p", "hypothesis": "h", "label": "neutral", "idx": 0}


@pytest.mark.parametrize("text, msg", [
    (json.dumps(ROW) + "\n{not json\n", "line 2: not valid JSON"),
    ("", "no examples"),
    ("\n\n", "no examples"),
    (json.dumps([ROW]) + "\n", "line 1: a list, not a JSON object"),
    (json.dumps(ROW | {"label": 1.7}) + "\n", "label 1.7 is not one of"),
    (json.dumps(ROW | {"label": "1.7"}) + "\n", "label '1.7' is not one of"),
    (json.dumps(ROW | {"label": None}) + "\n", "label None"),
    (json.dumps({"premise": "p", "label": 0}) + "\n", "missing or malformed field 'hypothesis'"),
    (json.dumps(ROW | {"premise": 5}) + "\n", "text is (5, 'h'), not a string"),
])
def test_bad_data_file_is_one_line_error(tmp_path, data_dir, text, msg):
    root = cb_copy(tmp_path, data_dir, text)
    with pytest.raises(rundir.KitError, match=msg.replace("(", r"\(").replace(")", r"\)")) as e:
        data.load_task("cb", root)
    assert "\n" not in str(e.value) and "train.jsonl" in str(e.value)


def test_non_utf8_data_file(tmp_path, data_dir):
    root = cb_copy(tmp_path, data_dir, train_bytes=b'{"premise": "\xff\xfe", "hypothesis": "h", "label": 0}\n')
    with pytest.raises(rundir.KitError, match="not UTF-8"):
        data.load_task("cb", root)


def test_integer_labels_still_accepted(tmp_path, data_dir):
    rows = [ROW | {"label": 2.0}, ROW | {"label": "1"}, ROW | {"label": "entailment"}]
    root = cb_copy(tmp_path, data_dir, "\n".join(json.dumps(r) for r in rows))
    assert data.load_task("cb", root)["train"].labels.tolist() + data.load_task("cb", root)["val"].labels.tolist() \
        == [2, 1, 0]


def test_subsets_and_fingerprint(tmp_path, data_dir):
    sp = data.load_task("cb", data_dir)["train"]
    a = data.random_subset(sp, 10, 3)
    assert len(a) == 10 and a.texts == data.random_subset(sp, 10, 3).texts
    assert data.random_subset(sp, 10 ** 6, 3) is sp and data.subset_indices(5, None) == [0, 1, 2, 3, 4]
    for n in (0, -1):
        with pytest.raises(rundir.KitError, match="subset of"):
            data.random_subset(sp, n, 0)
    # the same files elsewhere fingerprint the same; one changed byte does not
    root = cb_copy(tmp_path, data_dir, (data_dir / "superglue/CB/train.jsonl").read_text())
    fp = data.data_fingerprint("cb", data_dir)
    assert data.data_fingerprint("cb", root) == fp and set(fp) == {"train", "test"}
    (root / "superglue/CB/train.jsonl").write_text((root / "superglue/CB/train.jsonl").read_text()[:-2] + "\n")
    assert data.data_fingerprint("cb", root)["train"] != fp["train"]


def test_max_len_checked_from_config():
    assert data.max_positions(None) == 512
    data.check_max_len(None, 128)
    for n, msg in ((2, "too short"), (600, "exceeds the 512 positions")):
        with pytest.raises(rundir.KitError, match=msg):
            data.check_max_len(None, n)


def test_lines_split_on_newlines_only(tmp_path):
    (tmp_path / "boss/amazon").mkdir(parents=True)
    (tmp_path / "boss/amazon/train.tsv").write_text("Text\tLabel\r\nfine\u2028text \x85 here\t1\r\nok\t0\n",
                                                   encoding="utf-8")
    sp = data.read_file("amazon", tmp_path / "boss/amazon/train.tsv")
    assert sp.texts == [("fine\u2028text \x85 here", None), ("ok", None)] and sp.labels.tolist() == [1, 0]




def test_metrics_equal_scikit_learns():
    """data.metrics computes MCC, F1 and macro F1 without scikit-learn (its import costs every script a second):
    on random predictions, with classes missing from labels or predictions, they equal scikit-learn's."""
    import warnings

    from sklearn.metrics import f1_score, matthews_corrcoef

    rng = np.random.default_rng(0)
    for trial in range(600):
        task, key = [("cola", "mcc"), ("mrpc", "f1"), ("cb", "macro_f1")][trial % 3]
        C = len(data.TASKS[task].labels)
        n, k = int(rng.integers(1, 40)), int(rng.integers(1, C + 1))  # labels from the first k classes only
        y, logits = rng.integers(0, k, n), rng.normal(size=(n, C))
        logits[:, k:] -= 100 * rng.integers(0, 2)  # sometimes the missing classes are never predicted either
        pred = logits.argmax(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = (matthews_corrcoef(y, pred) if key == "mcc" else
                   f1_score(y, pred, average="binary" if key == "f1" else "macro", zero_division=0))
        m = data.metrics(task, logits, y)
        assert m[key] == pytest.approx(ref, abs=1e-12) and m["accuracy"] == pytest.approx((pred == y).mean())
