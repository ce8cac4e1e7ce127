"""bench.py on CPU with a tiny random BERT and small slices of real RTE / SST-2; the speed options change nothing
they should not (dynamic padding, length grouping, sdpa, fused AdamW, foreach clipping, torch.compile)."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

import bench
import data
import ft

SMALL = ["--model", "tiny", "--steps", "2", "--warmup", "1", "--infer_examples", "16", "--batch_size", "8",
         "--max_train_samples", "48"]


def positive(r, keys):
    for k in keys:
        assert isinstance(r[k], (int, float)) and math.isfinite(r[k]) and r[k] > 0, (k, r[k])


def test_synthetic_and_epoch_suites(tmp_path):
    out = tmp_path / "bench.json"
    res = bench.main(SMALL + ["--suite", "synthetic,epoch", "--output", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    cuda = torch.cuda.is_available()  # bench.py runs on the GPU when there is one
    assert (res["config"]["device"] == "cpu") != cuda and res["config"]["random_init"]

    train = res["synthetic"]["train"]
    assert set(train) == {"hf_fp32", "hf_bf16", "ft_step", "lora_step"}
    for r in train.values():
        positive(r, ["ms_per_step", "examples_per_s", "tokens_per_s", "tflops", "non_embedding_params"])
        if not cuda:
            assert r["mfu"] is None and r["peak_mem_gb"] is None  # CPU: no MFU, no GPU memory
        # 2 timed steps of 8 examples x 128 tokens; the rates are these counts over the same (unrounded) seconds
        assert r["examples"] == 2 * 8 and r["tokens"] == 2 * 8 * 128
        assert r["flops"] == r["flops_per_token"] * r["tokens"]
        assert r["tokens_per_s"] == pytest.approx(r["examples_per_s"] * 128, rel=1e-9)
        assert r["examples_per_s"] == pytest.approx(8 * 1000 / r["ms_per_step"], rel=1e-9)
        assert r["tflops"] == pytest.approx(r["flops"] / r["seconds"] / 1e12, rel=1e-9)
        assert len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"])
    assert train["ft_step"]["precision"] == ("bf16 autocast" if cuda else "fp32")  # ft.train_step: CUDA only
    assert train["hf_bf16"]["precision"] == "bf16 autocast"
    # FLOPs: 6 N per token for full training, less for LoRA (frozen weights get no weight gradients)
    ft_row, lo = train["ft_step"], train["lora_step"]
    assert ft_row["flops_per_token"] == 6 * ft_row["non_embedding_params"]
    assert lo["trainable_params"] < ft_row["trainable_params"]
    assert 4 * lo["non_embedding_params"] < lo["flops_per_token"] < ft_row["flops_per_token"]
    infer = res["synthetic"]["infer"]
    assert set(infer) == {"hf_fp32_infer", "lp_extract"}
    for r in infer.values():
        positive(r, ["examples_per_s", "tokens_per_s", "tflops", "seconds"])
        assert r["examples"] == 16 and r["flops_per_token"] == 2 * r["non_embedding_params"]

    assert set(res["epoch"]) == {"rte", "sst2"}
    for t in res["epoch"].values():
        kit, pad = t["kit"], t["pad_to_max_len"]
        assert t["examples"] == kit["examples"] == pad["examples"] == 48
        assert kit["steps"] == pad["steps"] == 6
        assert kit["real_tokens"] == pad["real_tokens"]
        assert pad["computed_tokens"] == 48 * 128
        assert kit["real_tokens"] <= kit["computed_tokens"] <= pad["computed_tokens"]
        assert kit["padded_tokens"] == kit["computed_tokens"] - kit["real_tokens"] < pad["padded_tokens"]
        positive(kit, ["seconds", "examples_per_s", "tflops"])
        assert kit["tokens"] == kit["computed_tokens"] and kit["flops"] == kit["flops_per_token"] * kit["tokens"]
        assert t["speedup_vs_pad_to_max_len"] == pytest.approx(pad["seconds"] / kit["seconds"], rel=1e-9)
        assert math.isfinite(kit["loss"])
    assert "ft_step_vs_hf_bf16" in res["goals"]
    assert (res["goals"]["ft_step_vs_hf_bf16"]["met"] is None) != cuda  # a GPU target: judged on a GPU only


def test_trainer_suite_counts_the_same_tokens(tmp_path):
    pytest.importorskip("accelerate")
    res = bench.main(SMALL + ["--suite", "trainer", "--tasks", "rte", "--max_train_samples", "16",
                              "--output", str(tmp_path / "b.json")])
    t = res["epoch"]["rte"]
    kit, tr = t["kit"], t["trainer"]
    assert "pad_to_max_len" not in t  # the epoch suite was not asked for
    assert tr["examples"] == 16 and tr["steps"] == 2
    assert tr["real_tokens"] == kit["real_tokens"]  # the example's tokenisation truncates as data.tokenize
    assert tr["computed_tokens"] == 16 * 128 >= kit["computed_tokens"]
    positive(tr, ["seconds", "examples_per_s"])
    assert t["speedup_vs_trainer"] == pytest.approx(tr["seconds"] / kit["seconds"], rel=1e-9)
    assert set(res["goals"]["epoch_vs_trainer"]["ratio"]) == {"rte"}


def test_bad_suite():
    with pytest.raises(SystemExit, match="error: unknown suite"):
        bench.main(["--suite", "fast"])


@pytest.mark.parametrize("flags,words", [(["--steps", "0"], "--steps"), (["--lr", "-1"], "--lr -1"),
                                         (["--max_train_samples", "0"], "--max_train_samples")])
def test_bad_flags_stop_before_timing(flags, words):
    with pytest.raises(SystemExit, match=f"error: {words}"):
        bench.main(SMALL + flags)


def test_output_that_is_a_folder(tmp_path):
    with pytest.raises(SystemExit, match="is a folder"):
        bench.main(SMALL + ["--output", str(tmp_path)])


# ---------------------------------------------------------------- the speed options change nothing they should not
def rte_slice(n=24):
    tok = bench.tokenizer("tiny", bench.tiny_config())
    split = data.random_subset(data.load_task("rte")["train"], n, 0)
    return data.tokenize(tok, split, 128), split.labels, tok.pad_token_id


def test_dynamic_padding_and_length_grouping_keep_logits():
    enc, _, pad = rte_slice()
    lengths = [len(e["input_ids"]) for e in enc]
    assert min(lengths) < max(lengths) and np.mean(lengths) < 100  # real padding differences
    model = bench.kit_model("tiny", bench.tiny_config(), 2, seed=0).eval()
    fn = lambda b: model(**b)
    grouped = data.extract(fn, enc, pad, batch_size=8)[0]  # length-sorted, padded to each batch's longest
    padded = data.extract(fn, enc, pad, batch_size=8, multiple_of=128)[0]  # every batch padded to 128
    one_by_one = np.concatenate([model(**data.collate(enc, [i], pad)).detach().numpy() for i in range(len(enc))])
    np.testing.assert_allclose(grouped, padded, atol=1e-5, rtol=0)
    np.testing.assert_allclose(grouped, one_by_one, atol=1e-5, rtol=0)


def test_dynamic_padding_keeps_training_steps():
    enc, labels, pad = rte_slice(16)
    order = data.batches(enc, 8, shuffle=True, seed=0)
    runs = []
    for mult in (1, 128):
        model = bench.kit_model("tiny", bench.tiny_config(), 2, seed=0).eval()  # eval: no dropout, same masks
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        losses = [ft.train_step(model, opt, sched, params, data.collate(enc, idx, pad, mult),
                                torch.as_tensor(labels[idx])).item() for idx in order * 2]
        runs.append((losses, model.head.weight.detach().clone()))
    np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-4, atol=1e-6)


def tiny_classifier(attn):
    cfg = bench.tiny_config(hidden_size=32, intermediate_size=64, vocab_size=200, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return ft.Classifier(AutoModel.from_config(cfg, add_pooling_layer=False, attn_implementation=attn), 2,
                         dropout=0.0).train()


def padded_batches(n=4, bs=4, L=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 200, (bs, L), generator=g)
        mask = (torch.arange(L) < torch.randint(4, L + 1, (bs, 1), generator=g)).long()
        out.append(({"input_ids": ids * mask, "attention_mask": mask}, torch.randint(0, 2, (bs,), generator=g)))
    return out


def plain_fp32_losses(batches):
    """The reference: eager attention, for-loop AdamW, plain loss / backward / clip / step."""
    model = tiny_classifier("eager")
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, foreach=False)
    losses = []
    for b, y in batches:
        loss = F.cross_entropy(model(**b), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=False)
        opt.step()
        losses.append(loss.item())
    return losses, model


def kit_losses(batches, compile=False):
    """ft.train_step with the options the CPU has: sdpa, fused AdamW, foreach clipping, optionally compile."""
    model = tiny_classifier("sdpa")
    fwd = torch.compile(model) if compile else model
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return [ft.train_step(fwd, opt, sched, params, b, y).item() for b, y in batches], model


def test_kit_step_matches_plain_fp32_step():
    batches = padded_batches()
    ref, ref_model = plain_fp32_losses(batches)
    got, model = kit_losses(batches)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    start = tiny_classifier("eager")
    moved = max((p - q).abs().max().item() for p, q in zip(ref_model.parameters(), start.parameters()))
    assert moved > 1e-4  # the steps did something
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_compile_keeps_training_steps():
    batches = padded_batches(n=3)
    ref, _ = kit_losses(batches)
    got, _ = kit_losses(batches, compile=True)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
