"""ntk.py: P + F is the eNTK over all parameters, engines agree, kernel laws, LoRA, padding, end to end."""

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

import data
import ft
import kernel_view
import ntk
import ntk_structured as ns
import rundir

C = 3


def tiny(kind, pooling="cls", seed=0):
    """A random 2-layer, width-32 BERT or RoBERTa in a Classifier, float64, eval mode."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              max_position_embeddings=40)
    enc = (BertModel(BertConfig(**kw), add_pooling_layer=False) if kind == "bert"
           else RobertaModel(RobertaConfig(**kw), add_pooling_layer=False))
    model = ft.Classifier(enc, C, pooling).double().eval()
    with torch.no_grad():  # a non-trivial head: bias and a larger V
        model.head.weight.normal_(0, 0.5)
        model.head.bias.normal_(0, 0.5)
    return model


def examples(kind, lengths=(6, 11, 3, 8, 6), seed=0):
    """Encoded examples of different lengths from a small vocabulary (so tokens repeat across examples)."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        x = {"input_ids": [0 if kind == "roberta" else 2] + rng.integers(4, 40, n).tolist()}
        if kind == "bert":
            x["token_type_ids"] = [0] * (n // 2 + 1) + [1] * (n - n // 2)
        out.append(x)
    return out


PAD = {"bert": 0, "roberta": 1}


def brute_force(model, xs, pad_id, params):
    """Full per-example gradients of each logit by autograd (each example alone), flattened, dot products."""
    rows = []
    for i in range(len(xs)):
        out = model(**data.collate(xs, [i], pad_id))[0]
        for c in range(C):
            g = torch.autograd.grad(out[c], params, retain_graph=True, allow_unused=True)
            g = [x if x is not None else torch.zeros_like(p) for x, p in zip(g, params)]
            rows.append(torch.cat([x.reshape(-1) for x in g]))
    J = torch.stack(rows).double()
    return (J @ J.T).numpy().reshape(len(xs), C, len(xs), C), J


def close(a, b, tol=1e-8):
    scale = max(np.abs(b).max(), 1.0)
    assert np.abs(a - b).max() <= tol * scale, np.abs(a - b).max() / scale


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_p_plus_f_is_the_full_entk_and_engines_agree(kind):
    model, xs = tiny(kind), examples(kind)
    P, F = ntk.kernels(model, xs, pad_id=PAD[kind], batch_size=4)
    K, _ = brute_force(model, xs, PAD[kind], list(model.parameters()))
    close(P + F, K)
    _, Fn = ntk.kernels(model, xs, pad_id=PAD[kind], method="naive")
    close(F, Fn)
    # the head alone gives P: the split is exact, not just the sum
    Kh, _ = brute_force(model, xs, PAD[kind], list(model.head.parameters()))
    close(P, Kh)
    # a x b equals the matching block of the symmetric kernel
    Pab, Fab = ntk.kernels(model, xs[:2], xs[2:], pad_id=PAD[kind])
    close(Pab, P[:2, :, 2:])
    close(Fab, F[:2, :, 2:])


def test_kernels_symmetric_psd_and_word_embeddings_count():
    model, xs = tiny("bert"), examples("bert")
    P, F = ntk.kernels(model, xs, pad_id=0)
    for K in (P, F, P + F):
        M = kernel_view.flat(K)
        close(M, M.T, 1e-12)
        ev = np.linalg.eigvalsh((M + M.T) / 2)
        assert ev.min() >= -1e-10 * ev.max()
    # word embeddings are included exactly: freezing them changes F by exactly their brute-force share
    emb = model.encoder.embeddings.word_embeddings.weight
    Kw, Jw = brute_force(model, xs, 0, [emb])
    assert np.abs(Kw).max() > 1e-3 * np.abs(F).max()
    emb.requires_grad_(False)
    _, F_no_emb = ntk.kernels(model, xs, pad_id=0)
    close(F - F_no_emb, Kw)


def test_head_scale_law():
    model, xs = tiny("roberta"), examples("roberta")
    P, F = ntk.kernels(model, xs, pad_id=1)
    s = 3.0
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled.head.weight.mul_(s)
    Ps, Fs = ntk.kernels(scaled, xs, pad_id=1)
    close(Ps, P, 1e-12)
    close(Fs, s ** 2 * F, 1e-10)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_padding_is_irrelevant(pooling):
    model, xs = tiny("bert", pooling), examples("bert", lengths=(2, 12, 5, 9))
    P1, F1 = ntk.kernels(model, xs, pad_id=0, batch_size=1)  # each example alone: no padding
    P4, F4 = ntk.kernels(model, xs, pad_id=0, batch_size=4)  # one batch padded to the longest
    P7, F7 = ntk.kernels(model, xs, pad_id=7, batch_size=4)  # padded with a real token id instead
    for a, b in ((P4, P1), (F4, F1), (P7, P1), (F7, F1)):
        close(a, b, 1e-10)


def test_parameter_chunks_and_row_slices():
    shapes = [("a", (5, 4)), ("b", (7,)), ("c", (3, 2, 2))]
    chunks = ntk.plan_chunks(shapes, 9)
    seen = {n: np.zeros(s[0], int) for n, s in shapes}
    per = {"a": 4, "b": 1, "c": 4}
    for ch in chunks:
        assert sum((hi - lo) * per[n] for n, lo, hi in ch) <= 9
        for n, lo, hi in ch:
            seen[n][lo:hi] += 1
    assert all((v == 1).all() for v in seen.values())
    model, xs = tiny("bert"), examples("bert", lengths=(4, 7, 5))
    _, F = ntk.kernels(model, xs, pad_id=0)
    _, Fc = ntk.kernels(model, xs, pad_id=0, batch_size=2, max_memory_gb=3e-5)  # ~100 columns per chunk
    close(Fc, F, 1e-10)


def test_lora_at_b_zero_only_b_gradients_count():
    from lora import LoRALinear, inject_lora

    model, xs = tiny("bert"), examples("bert")
    inject_lora(model, r=2, alpha=4)
    model.double().eval()
    lora = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert lora and all((m.lora_B == 0).all() for m in lora)
    A = [m.lora_A for m in lora]
    B = [m.lora_B for m in lora]
    K_ab, J_ab = brute_force(model, xs, 0, A + B)
    n_a = sum(p.numel() for p in A)
    assert (J_ab[:, :n_a] == 0).all()  # at B = 0 the A-gradients vanish
    K_b, _ = brute_force(model, xs, 0, B)
    P, F = ntk.kernels(model, xs, pad_id=0, batch_size=3)
    assert np.abs(F).max() > 0
    close(F, K_ab)
    close(F, K_b)
    _, Fn = ntk.kernels(model, xs, pad_id=0, method="naive")
    close(F, Fn)
    K_all, _ = brute_force(model, xs, 0, [p for p in model.parameters() if p.requires_grad])
    close(P + F, K_all)  # trainable = LoRA + head


def test_solvers_and_ft_ratio():
    rng = np.random.default_rng(0)
    n, m = 12, 6
    X = rng.normal(size=(n + m, 20))
    y = rng.integers(0, C, n + m)
    K = np.einsum("ij,ck->icjk", X @ X[:n].T, np.eye(C))
    kr = kernel_view.kernel_regression(K[:n], K[n:], y[:n], y[n:], ridge=1e-12)
    assert kr["train"] == 1.0  # full-rank kernel, vanishing ridge: interpolates the train labels
    lr = kernel_view.pair_logreg(K[:n], K[n:], y[:n], y[n:], 0)
    assert 0 <= lr["test"] <= 1 and 0 <= lr["test_class"] <= 1
    logits = rng.normal(size=(n, C))
    assert ntk.ft_ratio(0 * K[:n], K[:n], logits, y[:n]) == 0
    assert ntk.ft_ratio(K[:n], K[:n], logits, y[:n]) == pytest.approx(1.0)
    st = ntk.spectrum(K[:n], 1e-10)  # a tolerance far below this kernel's conditioning
    assert st["rank"] == n * C and st["sv_normalised"][0] == 1.0


def test_end_to_end_cb(tmp_path, data_dir, capsys):
    out = tmp_path / "ntk"
    argv = ["--task", "cb", "--n", "8", "--n_test", "6", "--max_len", "64", "--output_dir", str(out),
            "--data_dir", str(data_dir), "--max_memory_gb", "1"]
    res = ntk.main(argv)
    z = np.load(out / "kernels.npz")
    assert z["P_train"].shape == (8, C, 8, C) and z["F_test"].shape == (6, C, 8, C)
    assert z["P_train"].dtype == np.float64 and len(set(z["train_idx"])) == 8
    r = json.loads((out / "ntk_results.json").read_text())
    assert set(r["kernels"]) == {"P", "F", "P+F"} and 0 < r["ft_ratio"] < 1
    assert (out / "spectrum.png").stat().st_size > 1000
    # the saved train logits are the model's, and P is their features' Gram matrix (+1) per class
    splits = data.load_task("cb", data_dir)
    assert (z["train_labels"] == splits["train"].labels[z["train_idx"]]).all()
    assert res["kernels"]["F"]["fro"] > 0
    capsys.readouterr()
    again = ntk.main(argv)
    assert "skipping" in capsys.readouterr().out and again["seconds"] == r["seconds"]
    with pytest.raises(SystemExit, match="another config"):
        ntk.main(argv[:-2] + ["--max_memory_gb", "1", "--head_scale", "2"])
    # a result made when --ridge reached fewer solvers (its record has no ridge_on) is not reused
    del r["config"]["ridge_on"]
    (out / "ntk_results.json").write_text(json.dumps(r))
    with pytest.raises(SystemExit, match="another config.*ridge_on"):
        ntk.main(argv)


def test_end_to_end_lp_lora_k_shot(tmp_path, data_dir):
    """--init (an lp_head.pt as lp.py writes it) + --lora + --k_shot: V and b come from the head, F over LoRA only."""
    torch.manual_seed(0)
    head = {"weight": torch.randn(C, 384) * 0.1, "bias": torch.randn(C), "task": "cb", "model": data.EMBEDDED,
            "max_len": 32, "pooling": "cls", "labels": data.TASKS["cb"].labels, "C": C}
    torch.save(head, tmp_path / "lp_head.pt")
    out = tmp_path / "ntk"
    res = ntk.main(["--task", "cb", "--init", str(tmp_path / "lp_head.pt"), "--lora", "--k_shot", "2", "--n_test", "3",
                    "--head_scale", "2", "--output_dir", str(out), "--data_dir", str(data_dir)])
    assert res["config"]["ntk_method"] == "lp_lora" and res["config"]["max_len"] == 32
    assert res["config"]["backbone_params"] == 6 * 2 * 8 * 384 * 2  # 6 layers x (query, value) x (A, B), r = 8
    assert res["head_norm"] == pytest.approx(2 * float(head["weight"].double().norm()))
    z = np.load(out / "kernels.npz")
    assert np.bincount(z["train_labels"]).tolist() == [2, 2, 2]
    phi_gram = z["P_train"][:, 0, :, 0] - 1
    assert np.allclose(phi_gram, phi_gram.T) and np.abs(z["F_train"]).max() > 0


# ---------------------------------------------------------------- the structured engine
@pytest.mark.parametrize("kind,pooling", [("bert", "cls"), ("roberta", "mean"), ("roberta", "cls")])
def test_structured_equals_func(kind, pooling):
    """Full FT, padded batches (examples of different lengths), train x train and a x b, one block and many."""
    model, xs = tiny(kind, pooling), examples(kind)
    F = ntk.f_func(model, xs, None, PAD[kind], batch_size=5)
    for bs in (1, 3, 5):
        close(ntk.f_structured(model, xs, None, PAD[kind], batch_size=bs), F)
    close(ntk.f_structured(model, xs[:2], xs[2:], PAD[kind], batch_size=2), F[:2, :, 2:])
    close(ntk.f_structured(model, xs[3:], xs, PAD[kind], batch_size=2), F[3:])
    # a budget of a few tokens per block: every block pair recorded apart, off-diagonal blocks mirrored
    close(ntk.f_structured(model, xs, None, PAD[kind], batch_size=2, max_memory_gb=2e-5), F)
    close(ntk.f_structured(model, xs[:2], xs[2:], PAD[kind], batch_size=2, max_memory_gb=2e-5), F[:2, :, 2:])


def test_structured_padding_and_frozen_parts():
    """Padded with a real token id, each example alone or batched; frozen word embeddings and LayerNorms."""
    model, xs = tiny("bert", "mean"), examples("bert", lengths=(2, 12, 5, 9))
    F1 = ntk.f_structured(model, xs, None, 0, batch_size=1)
    close(ntk.f_structured(model, xs, None, 7, batch_size=4), F1, 1e-10)
    close(F1, ntk.f_func(model, xs, None, 0))
    model.encoder.embeddings.word_embeddings.weight.requires_grad_(False)
    for m in model.encoder.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.bias.requires_grad_(False)
    close(ntk.f_structured(model, xs, None, 0, batch_size=4), ntk.f_func(model, xs, None, 0))


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_structured_lora(kind):
    """LoRA at B = 0 (only B's gradients count) and with B != 0 (A's count too, as factors (g B) and x)."""
    from lora import LoRALinear, inject_lora

    model, xs = tiny(kind), examples(kind)
    inject_lora(model, ("query", "value"), r=2, alpha=4)
    model.double().eval()
    F0 = ntk.f_func(model, xs, None, PAD[kind])
    close(ntk.f_structured(model, xs, None, PAD[kind], batch_size=3), F0)
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.3)
    F1 = ntk.f_func(model, xs, None, PAD[kind])
    assert np.abs(F1 - F0).max() > 1e-3 * np.abs(F0).max()
    close(ntk.f_structured(model, xs, None, PAD[kind], batch_size=3), F1)
    close(ntk.f_structured(model, xs[:2], xs[2:], PAD[kind], batch_size=2), F1[:2, :, 2:])
    K, _ = brute_force(model, xs, PAD[kind], [p for p in model.encoder.parameters() if p.requires_grad])
    close(F1, K)


def test_structured_contractions_agree():
    """Both linear-layer contractions (gram, explicit in out-row chunks) and both embedding ones (pairs of
    equal ids, GEMM over shared ids) give the same kernel on the same recordings."""
    model, xs = tiny("bert"), examples("bert", lengths=(6, 11, 3, 8, 6, 9))
    mods = ns.structured_modules(model.encoder)
    ra = ns.record(model, mods, xs, [1, 5, 3, 0], 0, 3)
    rb = ns.record(model, mods, xs, [4, 2], 0, 1)
    for r2, same, nb in ((ra, True, 4), (rb, False, 2)):
        shape = (4, C, nb, C)
        for key, la in ra.lin.items():
            K1, K2, K3 = (torch.zeros(shape, dtype=torch.float64) for _ in range(3))
            ns.lin_gram(K1, la, r2.lin[key], same, 2**30)
            ns.lin_explicit(K2, la, r2.lin[key], same, 2**30)
            ns.lin_explicit(K3, la, r2.lin[key], same, 500)  # a few out rows at a time
            assert K1.abs().max() > 0
            close(K2.numpy(), K1.numpy())
            close(K3.numpy(), K1.numpy())
        for name, ea in ra.emb.items():
            K1, K2 = (torch.zeros(shape, dtype=torch.float64) for _ in range(2))
            ns.emb_pairs(K1, ea, r2.emb[name], 100)  # a few pairs at a time
            ns.emb_dense(K2, ea, r2.emb[name], torch.unique(torch.cat([ea[1], r2.emb[name][1]])))
            assert K1.abs().max() > 0
            close(K2.numpy(), K1.numpy())


def test_structured_dies_on_unknown_parameters():
    model = tiny("bert")
    model.encoder.extra = torch.nn.Conv1d(2, 2, 1).double()
    with pytest.raises(rundir.KitError, match="no rule"):
        ntk.f_structured(model, examples("bert"), None, 0)


@pytest.mark.parametrize("lora", [False, True])
def test_end_to_end_structured_matches_func(tmp_path, data_dir, lora):
    """ntk.py --method structured writes the same kernels and statistics as --method func (float32: ~1e-6)."""
    base = ["--task", "cb", "--n", "6", "--n_test", "4", "--max_len", "48", "--data_dir", str(data_dir)]
    base += ["--lora"] * lora
    rf = ntk.main(base + ["--output_dir", str(tmp_path / "func")])
    rs = ntk.main(base + ["--method", "structured", "--output_dir", str(tmp_path / "structured")])
    zf, zs = np.load(tmp_path / "func" / "kernels.npz"), np.load(tmp_path / "structured" / "kernels.npz")
    assert set(zf.files) == set(zs.files)
    for k in zf.files:
        if k.startswith("F_"):
            assert np.abs(zf[k]).max() > 0
            close(zs[k], zf[k], 1e-5)
        else:
            assert np.array_equal(zs[k], zf[k]), k
    assert rs["config"]["method"] == "structured" and rs["config"]["ntk_method"] == rf["config"]["ntk_method"]
    assert rs["kernels"]["F"]["fro"] == pytest.approx(rf["kernels"]["F"]["fro"], rel=1e-5)
    assert rs["ft_ratio"] == pytest.approx(rf["ft_ratio"], rel=1e-4)


def test_bench_ntk_methods(tmp_path, data_dir):
    import bench_ntk

    res = bench_ntk.main(["--model_config", "tiny", "--n", "5", "--max_len", "12", "--paper_n", "1",
                          "--out", str(tmp_path / "b.json")])
    assert set(res["methods"]) == {"func", "structured"} and res["reference"] == "func"
    assert res["methods"]["func"]["rel_error"] == 0 and res["methods"]["structured"]["rel_error"] < 1e-5
    assert res["methods"]["structured"]["speedup"] > 0 and set(res["speedup_per_example"]) == set(res["methods"])
    res = bench_ntk.main(["--task", "cb", "--model_config", "embedded", "--n", "3", "--max_len", "24",
                          "--methods", "structured,func", "--paper_n", "0", "--data_dir", str(data_dir),
                          "--out", str(tmp_path / "cb.json")])
    # float32: func's own error is larger here (~4e-5 against float64; structured's ~3e-7)
    assert res["n"] == 3 and res["reference"] == "structured" and res["methods"]["func"]["rel_error"] < 1e-4
    assert json.loads((tmp_path / "cb.json").read_text())["task"] == "cb"
    with pytest.raises(SystemExit, match="embedded"):
        bench_ntk.main(["--task", "cb", "--model_config", "tiny"])
    with pytest.raises(SystemExit, match="--n 0"):  # not the default 250
        bench_ntk.main(["--n", "0"])


# ---------------------------------------------------------------- runs that cannot lie: ntk.py as a user runs it
ROOT = Path(__file__).resolve().parents[1]


def files(folder):
    return {p: p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


def refused(argv, folder, words):
    """python ntk.py argv exits 1 with ONE line naming the problem, and every file under folder is as before
    (at most the run directory's .lock is new)."""
    before = files(folder)
    r = subprocess.run([sys.executable, "ntk.py", *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("error: ") and words in lines[0], lines[0]
    after = files(folder)
    assert {p: after.get(p) for p in before} == before
    assert {p.name for p in set(after) - set(before)} <= {".lock"}


@pytest.fixture
def earlier_run(tmp_path):
    """A run directory holding earlier results, as a user's would."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "ntk_results.json").write_text(json.dumps({"config": {"task": "cb"}, "kernels": {}}))
    (out / "kernels.npz").write_bytes(b"earlier kernels")
    return out


@pytest.mark.parametrize("flags,words", [
    (["--n", "0"], "--n 0"),
    (["--n_test", "-2"], "--n_test -2"),
    (["--max_memory_gb", "nan"], "--max_memory_gb nan"),
    (["--ridge", "-1"], "--ridge -1"),
    (["--head_scale", "inf"], "--head_scale inf"),
    (["--max_len", "600"], "--max_len 600"),
])
def test_bad_flags_stop_before_anything_is_touched(tmp_path, earlier_run, flags, words):
    # --overwrite too: it replaces the earlier results only once the new ones are computed
    refused(["--task", "cb", "--output_dir", earlier_run, "--overwrite", *flags], tmp_path, words)


def test_output_dir_that_is_a_file(tmp_path):
    f = tmp_path / "ntk"
    f.write_text("a user's file")
    refused(["--task", "cb", "--output_dir", f], tmp_path, "is a file")
    refused(["--task", "cb", "--output_dir", f / "sub"], tmp_path, "lies under the file")


def test_corrupt_results_file(tmp_path, earlier_run):
    (earlier_run / "ntk_results.json").write_text('{"config": {"task": "cb"')  # a write cut short
    refused(["--task", "cb", "--output_dir", earlier_run], tmp_path, "corrupt")


def test_head_from_another_pooling_or_task(tmp_path, earlier_run):
    head = {"weight": torch.zeros(C, 384), "bias": torch.zeros(C), "task": "cb", "model": data.EMBEDDED,
            "max_len": 32, "pooling": "mean", "labels": data.TASKS["cb"].labels, "C": C}
    torch.save(head, tmp_path / "lp_head.pt")
    argv = ["--init", tmp_path / "lp_head.pt", "--output_dir", earlier_run]
    refused(argv + ["--pooling", "cls"], tmp_path, "--pooling mean")
    refused(argv + ["--task", "rte"], tmp_path, "task 'cb'")
    torch.save(head | {"weight": torch.full((C, 384), float("nan"))}, tmp_path / "lp_head.pt")
    refused(argv, tmp_path, "NaN")


def test_rerun_on_altered_data_is_refused(tmp_path, data_dir):
    """The directory records the data files' content: the same flags on other data must not reuse it."""
    mine = tmp_path / "data"
    shutil.copytree(data_dir / "superglue" / "CB", mine / "superglue" / "CB")
    out = tmp_path / "run"
    argv = ["--task", "cb", "--n", "2", "--n_test", "2", "--max_len", "16", "--data_dir", mine, "--output_dir", out]
    res = ntk.main(list(map(str, argv)))
    assert set(res["config"]["data_sha256"]) == {"train", "test"} and res["config"]["init_sha256"] is None
    test_file = mine / "superglue" / "CB" / "val.jsonl"
    rows = test_file.read_text().splitlines()
    test_file.write_text("\n".join(rows[1:] + rows[:1]) + "\n")  # the same examples in another order
    refused(argv, tmp_path, "data_sha256.test: ")


# ---------------------------------------------------------------- ranks at a tolerance
def test_ranks_at_tolerance_on_a_known_spectrum():
    rng = np.random.default_rng(0)
    n, C = 5, 2  # a [10, 10] kernel with singular values 1, 0.5, 5e-4, 5e-5, 5e-7, then 1e-9 (x5)
    S = np.array([1, 0.5, 5e-4, 5e-5, 5e-7] + [1e-9] * 5)
    U, _ = np.linalg.qr(rng.standard_normal((n * C, n * C)))
    K = (U * S) @ U.T
    st = ntk.spectrum(K.reshape(n, C, n, C), 1e-4)
    assert st["rank"] == 3 and st["rank_rtol"] == 1e-4 and st["size"] == 10
    assert st["ranks_at"] == {"0.001": 2, "0.0001": 3, "1e-06": 4}
    p = S / S.sum()
    assert st["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-9)
    np.testing.assert_allclose(st["sv_normalised"], S, rtol=1e-6, atol=1e-12)
    assert ntk.default_rank_rtol("bf16", "cuda") == 1e-2 and ntk.default_rank_rtol("fp32", "cuda") == 1e-4
    assert ntk.default_rank_rtol("bf16", "cpu") == 1e-4
