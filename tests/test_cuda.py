"""The kit's CUDA paths against a CPU float64 (or CPU float32) reference on tiny random models (issue 29).

Run where CUDA is, skipped elsewhere. KIT_TEST_DEVICE=cpu runs them on the CPU: tools/gpu_check.sh --dry does, so
the one call on a GPU machine cannot fail on a typo (the comparisons then hold trivially for the device side, but
every line runs). Each tolerance is stated where it is used, with why it is what the compared computation can promise.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

import data
import ft
import kernel_view
import lora
import ntk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import random_model  # noqa: E402

DEV = os.environ.get("KIT_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEV is None, reason="no CUDA device (KIT_TEST_DEVICE=cpu runs these on the CPU)")
dev = torch.device(DEV or "cpu")


@pytest.fixture(autouse=True)
def full_fp32():
    """Every comparison starts from true fp32 matmuls (TF32 off), whatever an earlier test or engine set."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)


def rel(a, b):
    """||a - b|| / ||b|| over all entries, in float64."""
    a, b = (torch.as_tensor(np.asarray(x, dtype=np.float64)) for x in (a, b))
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def tiny_bert(seed=0, C=3, width=64, vocab=200):
    """A 2-layer BERT Classifier, no dropout (CUDA and CPU draw different dropout masks), sdpa attention."""
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=4 * width, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     max_position_embeddings=64, attn_implementation="sdpa")
    model = ft.Classifier(BertModel(cfg, add_pooling_layer=False), C, dropout=0.0)
    with torch.no_grad():
        model.head.weight.normal_(0, 0.5)  # a head that moves the loss
    return model


def batches(n=3, bs=6, lengths=(9, 17, 30), vocab=200, seed=0):
    """Padded batches of different lengths (bucketed shapes: 16 and 32 under multiple_of=16)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = lengths[i % len(lengths)]
        enc = [{"input_ids": [2] + torch.randint(4, vocab, (int(torch.randint(3, L, (1,), generator=g)),),
                                                 generator=g).tolist()} for _ in range(bs)]
        out.append((enc, torch.randint(0, 3, (bs,), generator=g)))
    return out


def step_update(model, batch, y, precision, on):
    """One ft.train_step with SGD (lr 1: the update is the clipped gradient itself, so it is compared linearly;
    Adam's first step is lr * sign(g) and would turn rounding of near-zero gradients into full-size differences).
    -> (loss, {name: update})."""
    model = model.to(on)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    b = data.to_device(data.collate(batch, range(len(batch)), 0), on)
    loss = ft.train_step(model, opt, sched, params, b, y.to(on), precision=precision)
    return float(loss.detach()), {n: (p.detach() - w0[n]).double().cpu() for n, p in model.named_parameters()}


# ---------------------------------------------------------------- training step
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_step_against_float64(precision):
    """fp32 on the device: loss to 1e-5 and update to 1e-4 relative of a float64 step (float32 rounding, ~1e-7 per
    operation, grown through two layers and a backward pass). bf16 autocast: 8 significant bits (~4e-3 per
    operation), so loss to 2e-2 and update to 1e-1 relative, direction (cosine) above 0.99."""
    (batch, y), = batches(1)
    ref_loss, ref = step_update(tiny_bert().double(), batch, y, "fp32", torch.device("cpu"))
    loss, got = step_update(tiny_bert(), batch, y, precision, dev)
    tol_loss, tol_upd = (1e-5, 1e-4) if precision == "fp32" else (2e-2, 1e-1)
    assert abs(loss - ref_loss) <= tol_loss * abs(ref_loss), (loss, ref_loss)
    flat = lambda u: torch.cat([v.reshape(-1) for v in u.values()])
    g, r = flat(got), flat(ref)
    assert r.norm() > 1e-3  # the step moved the weights
    assert rel(g, r) <= tol_upd, rel(g, r)
    assert float(g @ r / (g.norm() * r.norm())) > 0.99


def test_fused_adamw_equals_the_cpu_step():
    """ft.adamw is fused on CUDA and on the CPU: given the same gradients, two steps land on the same weights. Each
    step rounds w + update to float32 (half an ulp of w each: 2 eps |w| over two steps) and may compute the update
    in another order (1e-5 of the step, lr = 1e-3)."""
    torch.manual_seed(0)
    w = torch.randn(1000, 64)
    grads = [torch.randn(1000, 64) * s for s in (1.0, 1e-3)]
    out = []
    for on in (torch.device("cpu"), dev):
        p = torch.nn.Parameter(w.clone().to(on))
        opt = ft.adamw([p], 1e-3, on)
        for g in grads:
            p.grad = g.to(on)
            opt.step()
        out.append(p.detach().cpu())
    assert (out[0] - w).abs().max() > 1e-4  # both steps moved it
    tol = 2 * torch.finfo(torch.float32).eps * w.abs().max() + 1e-5 * 2e-3
    assert (out[1] - out[0]).abs().max() <= tol, ((out[1] - out[0]).abs().max(), tol)


# ---------------------------------------------------------------- LP features
@pytest.mark.parametrize("precision", ["fp32", "bf16", None])
def test_lp_features_against_float64(precision):
    """lp.py's extraction (data.extract, length-sorted batches, pooled phi) on the device: fp32 to 1e-5 relative of
    float64; bf16 autocast (the default on CUDA, None) to 3e-2; the CPU's default (None) is fp32."""
    model = tiny_bert()
    xs = [x for b, _ in batches(3) for x in b]
    fn = lambda m: (lambda b: m.features(**b))
    ref = data.extract(fn(model.double().eval()), xs, 0, 8, dev=torch.device("cpu"), precision="fp32")[0]
    got = data.extract(fn(model.float().to(dev).eval()), xs, 0, 8, precision=precision, dev=dev)[0]
    bf16 = precision == "bf16" or (precision is None and dev.type == "cuda")
    assert rel(got, ref) <= (3e-2 if bf16 else 1e-5), rel(got, ref)


# ---------------------------------------------------------------- eNTK: P, F, SignGD kernels
def tiny_roberta(seed=0, C=2):
    torch.manual_seed(seed)
    kw = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              max_position_embeddings=40)
    model = ft.Classifier(RobertaModel(RobertaConfig(**kw), add_pooling_layer=False), C).eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 0.5)
        model.head.bias.normal_(0, 0.5)
    return model


def ntk_examples(n=5, seed=0):
    rng = np.random.default_rng(seed)
    return [{"input_ids": [0] + rng.integers(4, 60, int(rng.integers(3, 12))).tolist()} for _ in range(n)]


@pytest.mark.parametrize("method", ["func", "structured"])
def test_p_and_f_against_float64_brute_force(method):
    """P and F on the device against the naive engine (per-example autograd) in float64 on the CPU, train x train
    and test x train. P: float32 features, 1e-5. F: func computes in float32 (1e-4); structured contracts in TF32
    on CUDA (10 significant bits: 5e-3; on the CPU float32, 1e-4)."""
    xs, xt = ntk_examples(5), ntk_examples(3, seed=1)
    ref_model = tiny_roberta().double()
    P0, F0 = ntk.kernels(ref_model, xs, pad_id=1, method="naive")
    Pt0, Ft0 = ntk.kernels(ref_model, xt, xs, pad_id=1, method="naive")
    model = tiny_roberta().to(dev)
    P, Fk = ntk.kernels(model, xs, pad_id=1, method=method, batch_size=2)
    Pt, Ft = ntk.kernels(model, xt, xs, pad_id=1, method=method, batch_size=2)
    tol = 5e-3 if method == "structured" and dev.type == "cuda" else 1e-4
    assert max(rel(P, P0), rel(Pt, Pt0)) <= 1e-5
    assert max(rel(Fk, F0), rel(Ft, Ft0)) <= tol, (rel(Fk, F0), rel(Ft, Ft0))
    assert np.abs(F0).max() > 1e-3  # a kernel with something in it


@pytest.mark.parametrize("kind", ["signgd", "asym_signgd"])
def test_signgd_kernels_against_float64(kind):
    """Malladi et al.'s SignGD kernels on the device against float64 on the CPU. An entry sums +-1 (or +-|g|) over
    every parameter; a gradient within float32 rounding of 0 may take the other sign, so 1e-2 relative (measured:
    about 1e-4 on a CPU in float32)."""
    xs, xt = ntk_examples(4), ntk_examples(2, seed=1)
    D = kernel_view.logit_map(2, binary=True)
    ref = kernel_view.view_kernels(ntk, tiny_roberta().double(), xs, xt, kind, D, pad_id=1)
    got = kernel_view.view_kernels(ntk, tiny_roberta().to(dev), xs, xt, kind, D, pad_id=1, batch_size=2)
    assert set(got) == set(ref)
    for k in ref:
        for a, b in zip(got[k], ref[k]):
            assert rel(a, b) <= 1e-2, (k, rel(a, b))


# ---------------------------------------------------------------- LoRA
def test_lora_merge_unmerge_on_the_device():
    """LoRA on the device: merged and unmerged logits agree (float32 rounding of W0 + B A s: 1e-5 relative), unmerge
    restores W0 bit for bit, and the logits match a float64 CPU copy to 1e-5 (and differ from the model without
    LoRA: the low-rank path is live)."""
    model = tiny_bert().eval()
    xs = [x for b, _ in batches(2) for x in b]
    b = data.collate(xs, range(len(xs)), 0)
    with torch.no_grad():
        base = model.double()(**b)
        lora.inject_lora(model, ("query", "value"), r=4, alpha=8)
        for m in lora.lora_layers(model):
            m.lora_B.normal_(0, 0.1)
        ref = model(**b)
    assert rel(ref, base) > 1e-3
    model.float().to(dev)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    bd = data.to_device(b, dev)
    with torch.no_grad():
        unmerged = model(**bd).cpu()
        lora.merge(model)
        merged = model(**bd).cpu()
        lora.unmerge(model)
    assert rel(merged, unmerged) <= 1e-5 and rel(unmerged, ref) <= 1e-5
    assert all(torch.equal(p, w0[n]) for n, p in model.named_parameters())


# ---------------------------------------------------------------- torch.compile
def test_compile_keeps_training_steps_on_bucketed_lengths():
    """ft.py --compile on the device: three AdamW steps on batches padded to multiples of 16 (two shapes) give the
    eager steps' losses (fp32: 1e-4 relative; Inductor fuses and reorders float32 sums). On the CPU rehearsal
    (KIT_TEST_DEVICE=cpu) the graphs are captured and recompiled per shape as on the device, but run by aot_eager:
    Inductor's C++ build of them took a minute of the suite's 8, and Inductor on a CPU is test_bench.py's."""
    runs = []
    backend = "inductor" if dev.type == "cuda" else "aot_eager"
    for compile in (False, True):
        model = tiny_bert().to(dev).train()
        fwd = torch.compile(model, backend=backend) if compile else model
        params = list(model.parameters())
        opt = ft.adamw(params, 1e-3, dev)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        losses, shapes = [], set()
        for xs, y in batches(3):
            b = data.to_device(data.collate(xs, range(len(xs)), 0, 16), dev)
            shapes.add(tuple(b["input_ids"].shape))
            losses.append(float(ft.train_step(fwd, opt, sched, params, b, y.to(dev), precision="fp32")))
        runs.append(losses)
    assert len(shapes) == 2
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-4)


# ---------------------------------------------------------------- kill -9, then resume
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return random_model.write(tmp_path_factory.mktemp("model") / "tiny", "tiny")


def ft_argv(model_dir, out, epochs):
    return [sys.executable, str(ROOT / "ft.py"), "--task", "cb", "--model", str(model_dir), "--max_train_samples",
            "48", "--max_eval_samples", "16", "--batch_size", "8", "--lr", "1e-4", "--epochs", str(epochs),
            "--output_dir", str(out)]


def run_ft(argv, wait=True):
    env = dict(os.environ)
    if DEV == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU dry run: the script sees no GPU
    p = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
        return out
    return p


def test_killed_run_resumes_on_the_device(tiny_model_dir, tmp_path, record_property):
    """ft.py on the device, killed (SIGKILL) after its first epoch's checkpoint, resumes and ends where an
    uninterrupted run ends. The CPU promises bit-for-bit equality; CUDA's attention and embedding backward may
    add in another order between runs, so the test asserts 1e-4 on logits and records whether they were equal."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run_ft(ft_argv(tiny_model_dir, whole, 3))
    p = run_ft(ft_argv(tiny_model_dir, cut, 3), wait=False)
    try:
        while not (cut / "ckpt.pt").exists() and p.poll() is None:
            time.sleep(0.01)
    finally:
        p.send_signal(signal.SIGKILL)
        p.communicate()
    assert p.returncode == -signal.SIGKILL and not (cut / "results.json").exists()
    out = run_ft(ft_argv(tiny_model_dir, cut, 3))
    assert "resuming after epoch" in out
    a, b = (json.loads((d / "results.json").read_text()) for d in (whole, cut))
    assert a["config"]["device"] == b["config"]["device"] == ("cuda" if dev.type == "cuda" else "cpu")
    la, lb = (np.load(d / "logits.npz")["test_logits"] for d in (whole, cut))
    exact = bool(np.array_equal(la, lb))
    record_property("bit_for_bit", exact)
    np.testing.assert_allclose(lb, la, atol=1e-4, rtol=0)
    assert [h["epoch"] for h in b["history"]] == [0, 1, 2, 3]
    if dev.type == "cpu":
        assert exact
