"""EH-FT (Yang et al. 2022) and BitFit: ft.py and ntk.py start from a finished lora.py run's head on the pre-trained
backbone; a source of other data is refused with every file unchanged; BitFit trains exactly the biases and the head."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import snapshot
from safetensors import safe_open
from safetensors.torch import load_file

import data
import ft
import heads
import lora
import ntk
import rundir

T = ["--task", "cb", "--max_train_samples", "16", "--max_eval_samples", "16", "--eval_batch_size", "16", "--epochs",
     "1", "--max_steps", "2"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Stage 1: a tiny finished LoRA run and BitFit run on CB (seed 1001)."""
    root = tmp_path_factory.mktemp("ehft")
    for m, flags in (("lora", []), ("bitfit", ["--bitfit"])):
        assert lora.main([*T, *flags, "--output_dir", str(root / f"{m}-seed1001")])["finished"]
    return root


def pretrained_with_head(run_dir, split):
    """Independently of ft.py: the plain pre-trained encoder (transformers) with the source run's saved head, CLS
    pooling, on a split's texts -> logits [N, C]."""
    from transformers import AutoModel, AutoTokenizer

    path = data.resolve_model(data.EMBEDDED)
    enc, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    head = load_file(str(run_dir / "model.safetensors"))
    a, b = zip(*split.texts)
    x = tok(list(a), list(b), truncation="longest_first", max_length=128, padding=True, return_tensors="pt")
    with torch.no_grad():
        phi = enc(**x).last_hidden_state[:, 0]
        return (phi @ head["head.weight"].T + head["head.bias"]).numpy()


def test_lora_ft_starts_at_the_lora_head_on_the_pretrained_backbone(sources, tmp_path):
    src = sources / "lora-seed1001"
    # lr 1e-30: AdamW moves no float32 weight, so the saved logits of epoch 1 are those of the start (epoch 0)
    res = ft.main([*T, "--init", str(src), "--lr", "1e-30", "--output_dir", str(tmp_path / "lora_ft")])
    test = data.study_splits("cb", None, 16, 16, 1001)["test"]
    want = pretrained_with_head(src, test)
    got = np.load(tmp_path / "lora_ft/logits.npz")["test_logits"]
    np.testing.assert_allclose(got, want, atol=1e-4)
    lora_logits = np.load(src / "logits.npz")["test_logits"]  # the LoRA model's own (its deltas, its head)
    assert np.abs(lora_logits - want).max() > 1e-3
    assert res["history"][0]["test"]["accuracy"] == pytest.approx(float((want.argmax(1) == test.labels).mean()))
    assert res["history"][0]["head_norm"] == pytest.approx(float(load_file(str(src / "model.safetensors"))[
        "head.weight"].norm()), rel=1e-6)
    rec = json.loads((tmp_path / "lora_ft/run.json").read_text())
    assert rec["method"] == "lora_ft" and rec["init_run"] == "lora-seed1001"
    assert rec["init_sha256"] == rundir.file_sha256(src / "model.safetensors")


def test_bitfit_trains_exactly_the_biases_and_the_head(sources):
    model, _ = ft.build_model(data.EMBEDDED, 3)
    lora.inject_bitfit(model)
    names = {n for n, _ in model.named_parameters()}
    want = {n for n in names if n.endswith("bias")} | {"head.weight", "head.bias"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == want and len(want) < len(names)
    src = sources / "bitfit-seed1001"
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == want
    res = json.loads((src / "results.json").read_text())
    assert res["config"]["method"] == "bitfit" and res["config"]["r"] is None  # LoRA's flags recorded as unused
    head = heads.load_head(str(src))  # BitFit-FT's start: the same path as LoRA's
    assert heads.init_kind(str(src)) == "bitfit" and torch.equal(head["weight"], load_file(
        str(src / "model.safetensors"))["head.weight"])


def test_ntk_takes_the_same_sources(sources):
    args = ntk.parse(["--init", str(sources / "bitfit-seed1001"), "--n", "4", "--output_dir", "unused"])
    head, method = ntk.resolve(args)
    assert method == "bitfit_ft" and head["method"] == "bitfit" and args.task == "cb"
    with pytest.raises(rundir.KitError, match="drop --lora"):
        ntk.resolve(ntk.parse(["--init", str(sources / "lora-seed1001"), "--lora"]))


def edit(path, **change):
    path.write_text(json.dumps(json.loads(path.read_text()) | change))


@pytest.mark.parametrize("flags, change, says", [
    (["--max_len", "64"], None, "was fit with --max_len 128, not 64"),
    (["--max_train_samples", "32"], None, "(max_train_samples: 16 -> 32); pass --max_train_samples 16"),
    (["--seed", "2002"], None, "(seed: 1001 -> 2002); pass --seed 1001"),
    (["--model", data.EMBEDDED], ("meta.json", {"model": "roberta-base"}), "was fit on model 'roberta-base'"),
    ([], ("run.json", {"data_sha256": {"train": "0" * 64}}), "pass the --data_dir it was trained on"),
    ([], ("results.json", {"finished": False}), "that run is not finished"),
    ([], ("meta.json", {"method": "ft"}), "is a ft run; EH-FT starts from a lora.py run"),
])
def test_refused_source_is_one_line_and_leaves_every_file_unchanged(sources, tmp_path, flags, change, says):
    src = tmp_path / "lora-seed1001"
    shutil.copytree(sources / "lora-seed1001", src)
    if change:
        edit(src / change[0], **change[1])
    out = tmp_path / "runs" / "lora_ft"
    before = snapshot(tmp_path, lock=True)
    with pytest.raises(SystemExit) as e:
        ft.main([*T, "--init", str(src), "--output_dir", str(out), *flags])
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg and says in msg, msg
    assert snapshot(tmp_path, lock=True) == before and not out.parent.exists()


def test_lora_py_refuses_a_run_directory(sources):
    with pytest.raises(SystemExit, match="EH-FT starts from its head in ft.py"):
        lora.main(["--init", str(sources / "lora-seed1001")])
