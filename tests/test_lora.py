"""lora.py: the LoRA layer on tiny random BERT/RoBERTa configs; LoRA / LP-LoRA runs on the embedded model."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoModel, BertConfig, BertModel, RobertaConfig, RobertaModel

import data
import ft
import lora
import lp
import rundir

TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
            max_position_embeddings=64)


def tiny(kind="bert", seed=0, num_labels=3):
    torch.manual_seed(seed)
    if kind == "bert":
        enc = BertModel(BertConfig(**TINY), add_pooling_layer=False)
    else:
        enc = RobertaModel(RobertaConfig(**TINY, pad_token_id=1), add_pooling_layer=False)
    return ft.Classifier(enc, num_labels).eval()


def inputs(n=4, L=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (n, L), generator=g)
    mask = torch.ones(n, L, dtype=torch.long)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def randomize_B(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_layers(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base." in n}


# ---------------------------------------------------------------- the layer
@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_init_logits_equal_base_exactly(kind):
    model, x = tiny(kind), inputs()
    with torch.no_grad():
        before = model(**x)
    lora.inject_lora(model)
    layers = lora.lora_layers(model)
    assert len(layers) == 2 * TINY["num_hidden_layers"]
    assert all(not m.lora_B.detach().any() and m.lora_A.detach().abs().sum() > 0 for m in layers)
    with torch.no_grad():
        after = model(**x)
    assert torch.equal(before, after)


def test_forward_is_base_plus_scaled_low_rank():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    m = lora.LoRALinear(base, r=2, alpha=8)
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(3, 6)
    want = F.linear(x, base.weight, base.bias) + 4.0 * (x @ m.lora_A.T) @ m.lora_B.T
    assert m.scaling == 4.0
    assert torch.allclose(m(x), want, atol=1e-6)
    assert not base.weight.requires_grad and m.lora_A.requires_grad and m.lora_B.requires_grad


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_merged_and_unmerged_logits_agree(kind):
    model, x = tiny(kind), inputs()
    lora.inject_lora(model)
    randomize_B(model)
    w0 = base_weights(model)
    with torch.no_grad():
        plain = model(**x)
        lora.merge(model)
        merged = model(**x)
        lora.merge(model)  # the merged flag: a second merge adds nothing
        merged2 = model(**x)
    assert not torch.equal(plain, tiny(kind)(**x))  # B != 0 really changed the function
    assert torch.allclose(plain, merged, atol=1e-5)
    assert torch.equal(merged, merged2)
    assert any(not torch.equal(w0[n], p) for n, p in model.named_parameters() if n in w0)
    lora.unmerge(model)
    lora.unmerge(model)
    assert all(torch.equal(w0[n], p) for n, p in model.named_parameters() if n in w0)
    with torch.no_grad():
        assert torch.equal(model(**x), plain)


def test_merge_unmerge_cycles_never_drift():
    model = tiny("roberta")
    lora.inject_lora(model, r=4, alpha=16)
    randomize_B(model)
    w0 = base_weights(model)
    for _ in range(200):
        lora.merge(model)
        lora.unmerge(model)
    assert all(torch.equal(w0[n], p) for n, p in model.named_parameters() if n in w0)


def test_eval_does_not_merge_and_only_lora_and_head_get_grads():
    model, x = tiny("bert"), inputs()
    n = lora.inject_lora(model, dropout=0.1)
    randomize_B(model)  # so lora_A's gradient is not zero
    model.eval()  # loralib would merge here and the LoRA path's gradients would vanish
    assert not any(m.merged for m in lora.lora_layers(model))
    F.cross_entropy(model(**x), torch.tensor([0, 1, 2, 0])).backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    want = {n for n, _ in model.named_parameters() if n.endswith(("lora_A", "lora_B")) or n.startswith("head.")}
    assert got == want and len(want) == 2 * 2 * 2 + 2
    assert all(float(p.grad.abs().sum()) > 0 for n, p in model.named_parameters() if n in want)
    assert n == sum(p.numel() for n_, p in model.named_parameters() if n_ in want)
    model.train()  # the LoRA dropout is only active in training
    assert any(isinstance(mod, torch.nn.Dropout) and mod.training for mod in model.modules())


def lora_count(cfg, num_labels, r=8, n_targets=2):
    d = cfg.hidden_size
    return cfg.num_hidden_layers * n_targets * (r * d + d * r) + d * num_labels + num_labels


def test_trainable_count_roberta_base_shape():
    cfg = RobertaConfig()  # roberta-base: 12 layers, width 768
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (12, 768)
    with torch.device("meta"):  # exact shapes, no memory or init time
        model = ft.Classifier(RobertaModel(cfg, add_pooling_layer=False), 2)
    n = lora.inject_lora(model, r=8, alpha=8)
    assert n == 12 * 2 * (8 * 768 + 768 * 8) + 768 * 2 + 2 == lora_count(cfg, 2) == 296_450


def test_bad_input_stops_with_one_line(tmp_path):
    with pytest.raises(rundir.KitError, match="no attention.self.keys"):  # library functions raise
        lora.inject_lora(tiny(), targets=("query", "keys"))
    model = tiny()
    lora.inject_lora(model)
    with pytest.raises(rundir.KitError, match="already has LoRA"):
        lora.inject_lora(model)
    with pytest.raises(rundir.KitError, match="r >= 1"):
        lora.LoRALinear(torch.nn.Linear(3, 3), r=0)
    with pytest.raises(rundir.KitError, match="meta.json"):
        lora.load_adapter("/nonexistent/run")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    for flags, msg in [(["--r", "0"], "--r 0: must be > 0"), (["--alpha", "nan"], "--alpha nan"),
                       (["--lora_dropout", "1"], "--lora_dropout 1.0: must be in"),
                       (["--targets", "query", "keys"], "pick from query, key, value"),
                       (["--merge_to", str(tmp_path / "mine")], "a folder with other files"),
                       (["--merge_to", str(tmp_path)], "holds the run directory")]:
        with pytest.raises(SystemExit, match=msg) as e:  # main prints one line
            lora.main(["--task", "rte", "--output_dir", str(tmp_path / "o"), *flags])
        assert str(e.value).startswith("error: ") and "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["mine", "notes.txt"]  # nothing written


# ---------------------------------------------------------------- runs on the embedded model and real data
def rte_argv(tmp):
    return ["--task", "rte", "--max_train_samples", "64", "--max_eval_samples", "32", "--epochs", "3",
            "--max_len", "64", "--output_dir", str(tmp / "run"), "--merge_to", str(tmp / "merged")]


@pytest.fixture(scope="module")
def rte_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rte")
    return lora.main(rte_argv(tmp)), tmp


def val_split(n=32):
    return data.random_subset(data.load_task("rte")["val"], n, 0)


def test_lora_run_lowers_training_loss(rte_run):
    res, tmp = rte_run
    losses = [h["loss"] for h in res["history"][1:]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    enc, _ = data.load_encoder(None)
    assert res["config"]["trainable_params"] == lora_count(enc.config, 2) == 74_498
    assert res["config"]["total_params"] == sum(p.numel() for p in enc.parameters()) + 74_498  # + A, B, head
    assert res["config"]["method"] == "lora" and res["config"]["r"] == 8
    assert res["config"]["batch_size"] == 16 and res["config"]["lr"] == 1e-3  # Table 6, RTE LoRA
    meta = json.loads((tmp / "run" / "meta.json").read_text())
    assert meta["lora"] == {"r": 8, "alpha": 8, "dropout": 0.0, "targets": ["query", "value"]}
    with safe_open(str(tmp / "run" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == {n for n in keys if n.endswith(("lora_A", "lora_B")) or n.startswith("head.")}
    assert len(keys) == 6 * 2 * 2 + 2


def test_adapter_reload_reproduces_logits(rte_run):
    _, tmp = rte_run
    model, tok = lora.load_adapter(tmp / "run", with_tokenizer=True)
    assert not any(m.merged for m in lora.lora_layers(model))
    enc = {"val": data.tokenize(tok, val_split(), 64)}
    logits = ft.evaluate(model, enc, tok.pad_token_id, 64)["val"][0]
    saved = np.load(tmp / "run" / "logits.npz")
    assert np.array_equal(logits, saved["val_logits"])
    assert np.array_equal(saved["val_labels"], val_split().labels)


def test_merged_export_loads_without_the_kit(rte_run):
    _, tmp = rte_run
    enc, tok = AutoModel.from_pretrained(tmp / "merged", add_pooling_layer=False), data.load_encoder(None)[1]
    assert not any("lora" in n for n, _ in enc.named_parameters())
    with safe_open(str(tmp / "merged" / "head.safetensors"), "pt") as f:
        W, b, info = f.get_tensor("weight"), f.get_tensor("bias"), f.metadata()
    assert info["pooling"] == "cls" and json.loads(info["labels"]) == ["entailment", "not_entailment"]
    fn = lambda batch: enc(**batch).last_hidden_state[:, 0] @ W.T + b
    logits = data.extract(fn, data.tokenize(tok, val_split(), 64), tok.pad_token_id, 64)[0]
    saved = np.load(tmp / "run" / "logits.npz")["val_logits"]
    assert np.allclose(logits, saved, atol=1e-4)


def test_next_export_removes_a_killed_ones_leftovers(rte_run, capsys):
    """--merge_to is written under the kit's temporary names, so a killed export's folders are found and removed."""
    _, tmp = rte_run
    r = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(r.stdout)  # a writer's pid that has exited, as a kill -9 during the export leaves it
    left = [tmp / f".merged.{dead}@{rundir.HOST}.tmp", tmp / f".merged.old.{dead}@{rundir.HOST}.tmp"]
    for d in left:
        d.mkdir()
        (d / "config.json").write_text("{}")
    lora.main(rte_argv(tmp))  # the same run: already finished, exported again
    assert "already finished" in capsys.readouterr().out
    assert sorted(p.name for p in tmp.iterdir()) == ["merged", "run"]
    assert (tmp / "merged" / "head.safetensors").exists()


def test_lp_lora_starts_at_lp_accuracy(tmp_path):
    sub = ["--max_train_samples", "64", "--max_eval_samples", "24"]
    lp_res = lp.main(["--task", "cb", "--C", "1.0", "--output_dir", str(tmp_path), "--cache_dir", str(tmp_path),
                      *sub])
    res = lora.main(["--init", str(tmp_path / "lp_head.pt"), "--max_steps", "2", "--epochs", "1",
                     "--output_dir", str(tmp_path / "lp_lora"), *sub])
    assert res["config"]["method"] == "lp_lora" and res["config"]["task"] == "cb"
    assert (res["config"]["batch_size"], res["config"]["lr"]) == (8, lora.MINILM_LR["cb"]["lp_lora"])  # Table 6 batch
    assert res["config"]["lr_table"] == "minilm"  # the embedded model's own grid learning rate
    h0 = res["history"][0]
    for s in ("val", "test"):
        assert h0[s]["accuracy"] == lp_res["metrics"][s]["accuracy"]
    assert h0["head_norm"] == pytest.approx(lp_res["head_norm"], rel=1e-6)
