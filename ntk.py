"""The empirical NTK at the start of fine-tuning, split into its pre-train- and FT-effective parts.

    python ntk.py --task cb --n 250                          # FT: fresh head, all backbone parameters
    python ntk.py --task cb --init lp_head.pt --lora         # LP-LoRA: LP head, LoRA (B = 0) parameters only

For f(x) = V phi(x) + b the eNTK over all trainable parameters is exactly P + F (paper Prop. 4.1):
  P(x, x') = (<phi(x), phi(x')> + 1) I_C      head weight and bias (pre-train-effective)
  F(x, x') = V J(x) J(x')^T V^T               J = d phi / d backbone parameters (FT-effective;
                                               with --lora, d phi / d LoRA parameters)
Both are [N_a, C, N_b, C], float64, on a seeded subset of at most --n train examples (train x train)
and --n test examples (test x train), in eval mode (no dropout). Word embeddings are included exactly
(only the rows of tokens that occur carry gradient, so only those rows are differentiated).

--method func (default) differentiates g(x) = V phi(x) (C outputs, not d) with torch.func
(functional_call + vmap over examples + jacrev) over chunks of the parameters, so that at most
--max_memory_gb of Jacobian is ever held; --method naive is a plain autograd loop for cross-checks
(small models only); --method structured (ntk_structured.py) contracts each layer's recorded inputs and
output gradients without forming J: the same kernels to rounding (float64 ~1e-14, float32 ~1e-6 relative),
about twice as fast as func on a 2-core CPU (bench_ntk.py --task cb); on CUDA a float32 model contracts in TF32.
A directory is reused only for the same flags (those in NOT_IN_RESULT aside), the same data file contents
and the same --init head contents; one process at a time writes it.
ntk.py needs ft.py, lora.py, ntk_structured.py and kernel_view.py (Malladi et al.'s kernels and solvers, --kernel,
--solve) and what they need: data.py, rundir.py, prompts.py, heads.py.
Outputs in runs/<task>/ntk-<ft|lp_ft|lora|lp_lora|lora_ft|bitfit_ft>-seed<seed>/ (--init RUN_DIR: EH-FT's start):
  kernels.npz       P_train, F_train [N,C,N,C]; P_test, F_test [M,C,N,C] (M test examples, computed in blocks
                    of --test_block); with --k_shot also P_val, F_val (--solver_settings dev); train_idx, test_idx
                    (rows of the official files), *_labels, *_logits (f at the start)
  ntk_results.json  per kernel (P, F, P+F): Frobenius norm, numerical rank of the [N*C, N*C] train kernel
                    (singular values above --rank_rtol times the largest; also at 1e-3, 1e-4, 1e-6) and
                    its effective rank, singular values / largest; the FT ratio; kernel regression and
                    the paper's pair-level logistic regression (raw kernel rows, as the authors' code);
                    Malladi et al.'s solvers at fixed settings (solvers) and, with --k_shot, at settings chosen
                    on the k-shot val split (tuned)
  spectrum.png      normalised singular values of the three train kernels
"""

import argparse
import itertools
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import ft
import heads
import kernel_view
import lora
import prompts
import rundir
from ntk_structured import f_structured
from rundir import die

# flags that do not change the kernels or statistics (engines agree to rounding); --init and --data_dir are
# recorded by their files' content instead (init_sha256, data_sha256)
NOT_IN_RESULT = ("method", "batch_size", "max_memory_gb", "output_dir", "overwrite", "data_dir", "init", "test_block")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ft.common_flags(p)
    ft.prompt_flag(a)
    a("--seed", type=int, default=data.SEED, help="seeds the fresh head and the example subsets")
    a("--output_dir", help="default runs/<task>/ntk-<method>-seed<seed>")
    a("--overwrite", action="store_true", help="recompute even if ntk_results.json exists for this config")
    a("--init", help="lp_head.pt from lp.py (LP-FT / LP-LoRA) or a finished lora.py run directory (EH-FT's start: "
      "its head on the pre-trained backbone); default a fresh normal(0, 0.02) head")
    a("--head_scale", type=float, default=1.0, help="multiply V (F scales by its square, P does not change)")
    a("--lora", action="store_true", help="inject LoRA (B = 0); F is then over the LoRA parameters only")
    lora.lora_flags(a)
    a("--n", type=int, default=250, help="at most this many train examples (seeded random subset; with --k_shot "
      "the whole k-shot train set)")
    a("--n_test", type=int, help="at most this many test examples (default: --n; with --k_shot all of its test set, "
      "else a subset drawn by a fixed seed, the same for every K and data seed)")
    a("--method", choices=list(ENGINES), default="func",
      help="func (torch.func Jacobians), structured (per-layer factors, faster) or naive (autograd loop)")
    a("--batch_size", type=int, default=8, help="examples per vmapped Jacobian (func) / forward-backward batch")
    a("--max_memory_gb", type=float, help="most Jacobian (func) or recorded factors and buffers (structured) held "
      "at once (default: 30%% of the GPU's memory, 4 on CPU)")
    a("--ridge", type=float, default=1e-3, help="added to the train kernel's diagonal, times its largest singular "
      "value, by every solver (their --kernel_regularization; theirs defaults to 0)")
    kernel_view.view_flags(a)
    data.precision_flag(a)
    a("--rank_rtol", type=float, help="numerical rank: singular values above this times the largest (default 1e-2 "
      "under --precision bf16 on CUDA, where the kernels' float32 matmuls run in TF32, else 1e-4: what TF32 / "
      "float32 kernel entries resolve; see default_rank_rtol). The kernels never run in bf16 autocast")
    return p.parse_args(argv)


# ---------------------------------------------------------------- forward pieces
def additive_mask(mask, dtype):
    """[B, L] 0/1 -> [B, 1, 1, L] additive mask: a prepared 4D mask, which transformers passes through
    untouched (no data-dependent checks, so vmap works) and which zeroes padded keys exactly."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


@torch.no_grad()
def features(model, xs, pad_id, batch_size=32):
    """phi(x) [N, d] float64 in the original order (model dtype, no autocast)."""
    dev = model.head.weight.device
    out = torch.empty(len(xs), model.head.in_features, dtype=torch.float64)
    for idx in data.batches(xs, batch_size):
        b = data.to_device(data.collate(xs, idx, pad_id), dev)
        out[idx] = model.features(**b).double().cpu()
    return out.numpy()


def logits_of(model, phi):
    return phi @ model.head.weight.detach().double().cpu().numpy().T + model.head.bias.detach().double().cpu().numpy()


@contextmanager
def eager_attention(enc):
    """Plain-matmul attention while differentiating: vmap has no batching rule for the fused SDPA kernels."""
    old = enc.config._attn_implementation
    enc.config._attn_implementation = "eager"
    try:
        yield
    finally:
        enc.config._attn_implementation = old


class CompactEmbedding(nn.Module):
    """The word-embedding rows of the tokens that occur (the others have zero gradient for every example):
    an exact stand-in for nn.Embedding with far fewer parameters to differentiate."""

    def __init__(self, emb, ids):
        super().__init__()
        keep = torch.unique(torch.as_tensor(ids, device=emb.weight.device))
        self.weight = nn.Parameter(emb.weight.detach()[keep].clone(), requires_grad=emb.weight.requires_grad)
        remap = torch.zeros(emb.num_embeddings, dtype=torch.long, device=keep.device)
        remap[keep] = torch.arange(len(keep), device=keep.device)
        self.register_buffer("remap", remap)
        # nn.Embedding never gives its padding row a gradient; keep that
        pi = emb.padding_idx
        self.padding_idx = int(remap[pi]) if pi is not None and bool((keep == pi).any()) else None

    def forward(self, ids):
        return F.embedding(self.remap[ids], self.weight, self.padding_idx)


@contextmanager
def compact_word_embeddings(enc, xs, pad_id):
    emb = enc.get_input_embeddings()
    if not (isinstance(emb, nn.Embedding) and emb.weight.requires_grad):
        yield
        return
    name = next(n for n, m in enc.named_modules() if m is emb)
    parent, _, child = name.rpartition(".")
    parent = enc.get_submodule(parent) if parent else enc
    ids = sorted({t for x in xs for t in x["input_ids"]} | {pad_id})
    setattr(parent, child, CompactEmbedding(emb, ids))
    try:
        yield
    finally:
        setattr(parent, child, emb)


# ---------------------------------------------------------------- engines: -> F [Na, C, Nb, C] float64
def plan_chunks(shapes, budget):
    """Split parameters (dim-0 row ranges allowed) into chunks of at most `budget` elements:
    -> [[(name, lo, hi), ...], ...]."""
    chunks, cur, space = [], [], budget
    for name, shape in shapes:
        rows = shape[0] if len(shape) else 1
        per = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        if per > budget:
            die(f"--max_memory_gb is too small to hold the Jacobian of one row of {name} {tuple(shape)}; raise it")
        lo = 0
        while lo < rows:
            take = min(rows - lo, space // per)
            if take == 0:
                chunks.append(cur)
                cur, space = [], budget
                continue
            cur.append((name, lo, lo + take))
            space -= take * per
            lo += take
    return chunks + [cur] if cur else chunks


def accumulate(K, Ja, Jb, op=None, cols=1 << 18):
    """K += op(Ja) Jb^T over column blocks (op: None, or torch.sign for the SignGD kernels): each block's product in
    J's dtype (a float32 Jacobian is itself only good to ~1e-7), the blocks summed into the float64 K."""
    for s in range(0, Ja.shape[1], cols):
        A = Ja[:, s:s + cols]
        K += ((A if op is None else op(A)) @ Jb[:, s:s + cols].T).double()


def jacobian_chunks(model, xs, pad_id, V=None, batch_size=8, max_memory_gb=4.0, progress=False, skip=()):
    """Yields J [len(xs) * O, width], the Jacobian of g(x) = V phi(x) (O = V's rows; default the head's C) over one
    chunk of the backbone's trainable parameters after another (row x * O + o), at most --max_memory_gb held;
    parameters named in `skip` left out. Nothing is yielded when the backbone has no trainable parameter."""
    from torch.func import functional_call, jacrev, vmap

    enc, pooling = model.encoder, model.pooling
    V = model.head.weight.detach() if V is None else V
    dev, dtype, n_out = V.device, V.dtype, V.shape[0]
    R = len(xs) * n_out
    with eager_attention(enc), compact_word_embeddings(enc, xs, pad_id):
        consts = {n: t.detach() for n, t in itertools.chain(enc.named_parameters(), enc.named_buffers())}
        shapes = [(n, tuple(p.shape)) for n, p in enc.named_parameters() if p.requires_grad and n not in skip]
        if not shapes:
            return
        itemsize = torch.empty((), dtype=dtype).element_size()
        # the held Jacobian J [R, width] plus one batch's [batch * O, width] on its way into J
        held = (R + min(batch_size, len(xs)) * n_out) * itemsize
        chunks = plan_chunks(shapes, max(1, int(max_memory_gb * 2**30 / held)))
        order = data.batches(xs, batch_size)
        bar = tqdm(total=len(chunks) * len(order), desc=f"eNTK ({len(chunks)} parameter chunks)",
                   disable=not progress, leave=False)
        for chunk in chunks:
            def g(prims, b, chunk=chunk):
                params = dict(consts)
                for (n, lo, hi), p in zip(chunk, prims):
                    full = consts[n]
                    params[n] = p if (lo, hi) == (0, full.shape[0]) else torch.cat([full[:lo], p, full[hi:]])
                b = {k: v[None] for k, v in b.items()}
                m = b["attention_mask"]
                h = functional_call(enc, params, (), b | {"attention_mask": additive_mask(m, dtype)})
                return data.pool(h.last_hidden_state, m, pooling)[0] @ V.T

            jac = vmap(jacrev(g), in_dims=(None, 0))
            prims = tuple(consts[n][lo:hi] for n, lo, hi in chunk)
            width = sum(p.numel() for p in prims)
            J = torch.empty(R, width, dtype=dtype, device=dev)
            for idx in order:
                b = data.to_device(data.collate(xs, idx, pad_id), dev)
                rows = (torch.as_tensor(idx, device=dev)[:, None] * n_out + torch.arange(n_out, device=dev)).reshape(-1)
                off = 0
                for jt in jac(prims, b):
                    w = jt[0, 0].numel()
                    J[rows, off:off + w] = jt.reshape(len(idx) * n_out, w)
                    off += w
                bar.update()
            yield J
            del J
        bar.close()


def f_func(model, xs_a, xs_b, pad_id, batch_size=8, max_memory_gb=4.0, progress=False):
    C = model.head.out_features
    xs = xs_a if xs_b is None else xs_a + xs_b
    na = len(xs_a) * C
    K = torch.zeros(na, (len(xs) if xs_b is None else len(xs_b)) * C, dtype=torch.float64,
                    device=model.head.weight.device)
    for J in jacobian_chunks(model, xs, pad_id, None, batch_size, max_memory_gb, progress):
        if xs_b is None:
            accumulate(K, J, J)
        else:
            accumulate(K, J[:na], J[na:])
    return K.cpu().numpy().reshape(len(xs_a), C, -1, C)


def f_naive(model, xs_a, xs_b, pad_id, max_memory_gb=4.0, progress=False, **_):
    """Each example alone (no padding), each output's gradient by autograd, flattened, dot products.
    Holds every gradient in float64 on the CPU: for cross-checks on small models."""
    params = [p for p in model.encoder.parameters() if p.requires_grad]
    V = model.head.weight.detach()
    C = V.shape[0]
    xs = xs_a if xs_b is None else xs_a + xs_b
    need = len(xs) * C * sum(p.numel() for p in params) * 8 / 2**30
    if need > max_memory_gb:
        die(f"--method naive would hold {need:.1f} GB of gradients (> --max_memory_gb {max_memory_gb:g}); "
            f"use --method func, or a smaller --n")
    rows = []
    for i in tqdm(range(len(xs)), desc="eNTK (naive)", disable=not progress, leave=False):
        b = data.to_device(data.collate(xs, [i], pad_id), V.device)
        with torch.enable_grad():
            g = model.features(**b)[0] @ V.T
            for c in range(C):
                gr = torch.autograd.grad(g[c], params, retain_graph=c < C - 1, allow_unused=True) if params else []
                rows.append(torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1).double().cpu()
                                       for x, p in zip(gr, params)] + [torch.zeros(0, dtype=torch.float64)]))
    J = torch.stack(rows)
    na = len(xs_a) * C
    K = J @ J.T if xs_b is None else J[:na] @ J[na:].T
    return K.numpy().reshape(len(xs_a), C, -1, C)


ENGINES = {"func": f_func, "naive": f_naive, "structured": f_structured}


def kernels(model, batch_a, batch_b=None, pad_id=0, method="func", batch_size=8, max_memory_gb=4.0,
            progress=False):
    """The two eNTK components on lists of encoded examples (data.tokenize) -> (P, F), each
    [Na, C, Nb, C] float64 numpy; batch_b None: a x a (each Jacobian computed once). Eval mode."""
    was = model.training
    model.eval()
    try:
        phi_a = features(model, batch_a, pad_id)
        phi_b = phi_a if batch_b is None else features(model, batch_b, pad_id)
        P = kernel_view.head_part(phi_a, phi_b, np.eye(model.head.out_features), "sgd")
        Fk = ENGINES[method](model, batch_a, batch_b, pad_id, batch_size=batch_size, max_memory_gb=max_memory_gb,
                             progress=progress)
    finally:
        model.train(was)
    return P, Fk


# ---------------------------------------------------------------- statistics
RANK_RTOLS = (1e-3, 1e-4, 1e-6)  # ranks also reported at these tolerances, for comparison


def default_rank_rtol(precision, dev_type):
    """The tolerance the kernel's own precision allows. Its entries are float32 sums, accurate to about eps = 1e-6
    relative in full float32 (func and structured agree to 4e-7 on CPU) and 1e-3 in TF32 (--precision bf16 on CUDA).
    A perturbation E moves each singular value by at most ||E||_2 <= ||E||_F ~ eps ||K||_F <= eps sqrt(NC) S_max,
    about 1e-5 S_max in float32 for the kit's N*C of a few hundred, so a singular value below 1e-4 S_max (10x that)
    is not told apart from rounding; in TF32 the same argument gives 1e-2. A CPU has no TF32."""
    return 1e-2 if dev_type == "cuda" and precision == "bf16" else 1e-4


def spectrum(K, rtol):
    """Frobenius norm, numerical rank at rtol * the largest singular value (and at RANK_RTOLS), the effective rank
    exp(entropy of S / sum S) (Roy & Vetterli 2007), singular values / largest."""
    M = kernel_view.flat(K)
    S = np.linalg.svd(M, compute_uv=False)
    smax = max(S.max(), 1e-300)
    p = S / max(S.sum(), 1e-300)
    p = p[p > 0]
    return {"fro": float(np.linalg.norm(M)), "rank": int((S > rtol * smax).sum()), "rank_rtol": rtol,
            "ranks_at": {f"{r:g}": int((S > r * smax).sum()) for r in RANK_RTOLS},
            "effective_rank": float(np.exp(-(p * np.log(p)).sum())), "size": M.shape[0], "sv_max": float(S.max()),
            "sv_normalised": (S / smax).tolist()}


def ft_ratio(F_tr, K_tr, logits, labels):
    """mean_x ||sum_i F(x, x_i) delta_i|| / ||sum_i K(x, x_i) delta_i||, delta_i = onehot(y_i) - softmax(f(x_i)):
    the share of the function's first gradient-flow step that comes from the FT-effective component."""
    delta = np.eye(logits.shape[1])[labels] - data.softmax(logits)
    num = np.linalg.norm(np.einsum("icjk,jk->ic", F_tr, delta), axis=1)
    den = np.linalg.norm(np.einsum("icjk,jk->ic", K_tr, delta), axis=1)
    return float(np.mean(num / np.maximum(den, 1e-300)))


def plot_spectrum(path, stats, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, st in stats.items():
        sv = np.asarray(st["sv_normalised"])
        ax.semilogy(np.arange(1, len(sv) + 1), np.maximum(sv, 1e-18), label=f"{name} (rank {st['rank']})")
    rtol = next(iter(stats.values()))["rank_rtol"]
    ax.axhline(rtol, color="gray", ls="--", lw=1, label=f"rank tolerance {rtol:g}")
    ax.set_xlabel("index")
    ax.set_ylabel("singular value / largest")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    rundir.atomic(path, lambda t: fig.savefig(t, format="png", dpi=120))
    plt.close(fig)


# ---------------------------------------------------------------- main
def default_memory_gb():
    if torch.cuda.is_available():
        return round(0.3 * torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return 4.0


def resolve(args):
    """Fill task/model/max_len/pooling from the --init head, then check every flag and the head, loading no model
    and touching no file -> (head or None, the NTK's method name)."""
    data.check_k_shot(args)  # first: an EH-FT source is checked against the k-shot draw
    head = ft.fill_from_head(args)
    args.max_memory_gb = default_memory_gb() if args.max_memory_gb is None else args.max_memory_gb
    kernel_view.check_flags(args, len(data.get_task(args.task).labels))
    if args.k_shot:
        args.n = None  # the whole k-shot train set
    elif args.n_test is None:
        args.n_test = args.n  # recorded as used: unset and = --n are one run
    if args.lora:
        lora.check_targets(args.targets)
    lora.check_prompt_params(args)
    args.precision = data.resolve_precision(args.precision)  # recorded as resolved: bf16 on CUDA, fp32 on a CPU
    if args.rank_rtol is None:
        args.rank_rtol = default_rank_rtol(args.precision, data.device().type)
    if not 0 < args.rank_rtol < 1:
        die(f"--rank_rtol {args.rank_rtol}: must be in (0, 1), a fraction of the largest singular value")
    rundir.check_positive(args, ("n", "n_test", "k_shot", "batch_size", "max_memory_gb", "head_scale", "ridge")
                          + (("r", "alpha") if args.lora else ()), allow_zero=("ridge",))
    kind = heads.init_kind(args.init)
    if args.lora and kind in heads.SOURCES:
        die(f"--init {args.init} is EH-FT's source, whose second stage fine-tunes everything; drop --lora")
    method = ft.run_method((f"{kind}_" if kind else "") + ("lora" if args.lora else "ft"), args)
    args.output_dir = args.output_dir or f"runs/{args.task}/ntk-{rundir.run_name(method, args)}"
    rundir.check_output_dir(args.output_dir)
    return head, method


def run_record(args, method):
    """What determines the result: every flag but NOT_IN_RESULT, the content of the data files and of the head."""
    lora_only = () if args.lora else ("r", "alpha", "targets", "prompt_params")  # no LoRA: its flags change nothing
    # fixed settings recorded unset, as every run before --solver_settings was: those runs are reused
    fixed = ("solver_settings",) if args.solver_settings == "fixed" else ()
    return {k: v for k, v in vars(args).items() if k not in NOT_IN_RESULT + lora_only + fixed} | {
        "ntk_method": method, "data_sha256": data.data_fingerprint(args.task, args.data_dir),
        "init_sha256": heads.init_sha256(args.init), "ridge_on": kernel_view.RIDGE_ON}


def earlier_result(res_path, record, overwrite):
    """-> the earlier ntk_results.json when it holds this record (nothing to do), None when there is none (or
    --overwrite); stops when it was made with another record."""
    if overwrite:
        return None
    old = rundir.read_json(res_path, "ntk_results.json")
    if old is None:
        return None
    saved = rundir.upgrade_record(old["config"]) if isinstance(old.get("config"), dict) else {}
    saved = {k: saved.get(k) for k in record}  # its config also holds what it measured
    if rundir.config_diff(saved, record):  # decided on the exact values; described with shortened hashes
        die(f"{res_path} was made with another config ({rundir.describe_diff(saved, record)}); pass --overwrite or "
            f"another --output_dir")
    return old


def build(args, head, C):
    data.set_matmul_precision(args.precision)  # TF32 kernels under bf16 on CUDA (default_rank_rtol follows)
    model, tok = ft.build_model(args.model, C, args.pooling, args.seed, args.task if args.prompt else None)
    ft.init_head(model, head, args)
    if args.lora:
        lora.inject_lora(model, args.targets, args.r, args.alpha, 0.0, lora.trains_transform(args))
    return model.to(data.device()).eval(), tok


def print_table(res):
    print(f"  {'kernel':<7}{'||K||_F':>12}{'rank':>11}{'KR train':>10}{'KR test':>9}{'pair tr':>9}{'pair te':>9}")
    fmt = lambda v: f"{v:.4f}" if v is not None else "-"
    for k, st in res["kernels"].items():
        kr, lr = st["kernel_regression"], st["pair_logreg"]
        print(f"  {k:<7}{st['fro']:>12.4g}{st['rank']:>6}/{st['size']:<4}{kr['train']:>10.4f}{kr['test']:>9.4f}"
              f"{fmt(lr['train']):>9}{fmt(lr['test']):>9}")
    if res.get("solvers"):
        kernel_view.print_solvers(res["solvers"])
    if res.get("tuned"):
        kernel_view.print_tuned(res["tuned"])
    fr = "-" if res["ft_ratio"] is None else f"{res['ft_ratio']:.4f}"
    print(f"  FT ratio {fr}   ||F||_F / ||P+F||_F {res['fro_ratio']:.4f}   "
          f"|V| {res['head_norm']:.4f}   rank: singular values > {res['config']['rank_rtol']:g} S_max; "
          f"pair = (example, class) accuracy")


def kernel_examples(args):
    """-> {split: (examples, their rows in the official files' order)}: train and test, a seeded subset of --n train
    and --n_test test examples, or with --k_shot the k-shot train set and (--n_test of) its test set, and its whole
    val split when the solvers' settings are chosen on it (--solver_settings dev)."""
    if args.k_shot:  # the test subset by a fixed seed: the same examples for every K, data seed and method
        sp = data.k_shot_splits(args.task, args.data_dir, args.k_shot, args.data_seed)
        keep = data.subset_indices(len(sp["test"]), args.n_test, 0)
        te = sp["test"].subset(keep)
        te.meta["positions"] = keep  # in the k-shot test split: the rows of a k-shot run's test logits
        out = {"train": (sp["train"], sp["train"].meta["rows"]),
               "test": (te, [sp["test"].meta["rows"][i] for i in keep])}
        if args.solver_settings == "dev":
            out["val"] = (sp["val"], sp["val"].meta["rows"])
        return out
    sp = data.load_task(args.task, args.data_dir)
    tr_idx = data.subset_indices(len(sp["train"]), args.n, args.seed)
    te_idx = data.subset_indices(len(sp["test"]), args.n_test, args.seed)
    return {"train": (sp["train"].subset(tr_idx), tr_idx), "test": (sp["test"].subset(te_idx), te_idx)}


def split_eval(K, n_val):
    """view_kernels' eval rows (val first, then test) -> 'val', 'val_flip' and 'test', 'flip' (the test side's
    names as before val existed); no val rows: K as it is."""
    if not n_val:
        return K
    out = {"train": K["train"]}
    for name, val_name in (("test", "val"), ("flip", "val_flip")):
        if name in K:
            out[val_name] = tuple(x[:n_val] for x in K[name])
            out[name] = tuple(x[n_val:] for x in K[name])
    return out


def the_kernels(args, model, xs, pad, C):
    """view_kernels on train x train and the val and test examples (one eval set, in blocks of --test_block) x
    train -> ({'train', 'val', 'test'[, 'val_flip', 'flip']}: (P, F)), f0 {split: D f at the start}, seconds."""
    t0 = time.time()
    D = kernel_view.logit_map(C, args.binary_logit)
    engines = sys.modules[__name__]  # this module: kernel_view cannot import it (it is imported here)
    block = args.test_block or max(64, len(xs["train"]))  # about the train set: each pass recomputes its Jacobians
    evals = xs.get("val", []) + xs["test"]
    K = kernel_view.view_kernels(engines, model, xs["train"], evals, args.kernel, D, pad_id=pad,
                                 method=args.method, batch_size=args.batch_size, max_memory_gb=args.max_memory_gb,
                                 progress=True, block=block)
    secs = time.time() - t0
    if not all(np.isfinite(x).all() for pf in K.values() for x in pf):  # the solvers would fail with a traceback
        die(f"the eNTK has NaN or infinite entries (--head_scale {args.head_scale}, model {args.model}); "
            f"nothing was written")
    f0 = {sp: logits_of(model, features(model, x, pad)) @ D.T for sp, x in xs.items()}
    return split_eval(K, len(xs.get("val", []))), f0, secs


def compute(args, head, method, record):
    """Kernels, statistics and plot for a checked configuration; writes kernels.npz, spectrum.png and, last,
    ntk_results.json (the record that the directory is complete)."""
    out = Path(args.output_dir)
    res_path = out / "ntk_results.json"
    C = len(data.get_task(args.task).labels)
    ex = kernel_examples(args)
    sp = {k: e for k, (e, _) in ex.items()}
    tr, te = sp["train"], sp["test"]
    y = {k: e.labels for k, e in sp.items()}
    model, tok = build(args, head, C)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    pt = args.task if args.prompt else None  # --prompt: the task's template, phi at the mask
    xs = {k: prompts.tokenize(tok, e, args.max_len, pt) for k, e in sp.items()}
    n_par = sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)
    print(f"{out}: eNTK ({method}, --method {args.method}) on {args.task}: {len(tr)} train x {len(tr)} train and "
          + (f"{len(sp['val'])} val and " if "val" in sp else "")
          + f"{len(te)} test x train, C={C}, {n_par:,} backbone parameters in F, {data.device()}")

    K, f0, secs = the_kernels(args, model, xs, pad, C)
    (P_tr, F_tr), (P_te, F_te) = K["train"], K["test"]
    stats = {}
    for name, K_tr, K_te in (("P", P_tr, P_te), ("F", F_tr, F_te), ("P+F", P_tr + F_tr, P_te + F_te)):
        st = spectrum(K_tr, args.rank_rtol)
        st["kernel_regression"] = kernel_view.kernel_regression(K_tr, K_te, tr.labels, te.labels, args.ridge)
        st["pair_logreg"] = kernel_view.pair_logreg(K_tr, K_te, tr.labels, te.labels, args.ridge)
        stats[name] = st
    total = {k: P + Fk for k, (P, Fk) in K.items()}  # the kernel over every trainable parameter
    res = {"config": vars(args) | record | {"device": str(data.device()), "C": C, "n_train": len(tr),
                                            "n_test_used": len(te), "backbone_params": n_par}
           | ({"n_val_used": len(sp["val"])} if "val" in sp else {}),
           "seconds": round(secs, 2), "kernels": stats,
           "ft_ratio": None if args.binary_logit else ft_ratio(F_tr, P_tr + F_tr, f0["train"], tr.labels),
           "fro_ratio": stats["F"]["fro"] / max(stats["P+F"]["fro"], 1e-300),
           "head_norm": float(model.head.weight.detach().double().norm()),
           "test_positions": te.meta.get("positions"),
           "solvers": kernel_view.solve_all(total, tr.labels, te.labels, f0["train"], f0["test"], args.kernel,
                                            args.ridge, args.asym_gamma, args.asym_lambda),
           "notes": NOTES}
    if "val" in sp:  # --solver_settings dev: every solver's settings chosen on val, as theirs
        res["tuned"] = kernel_view.tune(total, y, f0, args.kernel)
    # the earlier record goes first (--overwrite): it must never describe the new kernels
    res_path.unlink(missing_ok=True)
    arrays = {f"{pf}_{name}": K[name][i] for name in K for i, pf in enumerate("PF")}
    arrays |= {f"{k}_{what}": v for k in sp for what, v in
               (("idx", np.asarray(ex[k][1], np.int64)), ("labels", y[k]), ("logits", f0[k]))}
    rundir.save_npz(out / "kernels.npz", **arrays, kind=np.array(args.kernel),
                    binary_logit=np.array(args.binary_logit))
    plot_spectrum(out / "spectrum.png", stats, f"{args.kernel} kernel spectrum: {args.task} {method}, "
                                               f"N={len(tr)}, C={C}" + (", f1 - f0" if args.binary_logit else ""))
    rundir.save_json(res_path, res)
    print(f"  {secs:.1f}s; wrote {out}/kernels.npz, ntk_results.json, spectrum.png")
    print_table(res)
    return res


NOTES = {"rank": "singular values above --rank_rtol times the largest, on the [N*C, N*C] train kernel "
                 "(ranks_at: the same at other tolerances; effective_rank: exp(entropy of S / sum S))",
         "kernel_regression": "class accuracy (argmax over classes), ridge * largest singular value",
         "ridge": "ridge * largest singular value is added to the train kernel's diagonal by every solver "
                  "(kernel_regression, pair_logreg and the solvers alike); predictions use the kernels as they are",
         "pair_logreg": "the paper's metric: accuracy over (example, class) pairs, not class accuracy; "
                        "*_class: argmax of its pair scores per example",
         "solvers": "Malladi et al.'s solvers on the kernel over every trainable parameter (P + F): class accuracy",
         "tuned": "--solver_settings dev: each solver's settings chosen on the k-shot val split from its grid (the "
                  "first best on val, as their gather_result.py), 'chosen' the best of those; ties: settings "
                  "sharing the chosen one's val accuracy; class accuracy"}


@rundir.cli
def main(argv=None):
    args = parse(argv)
    if args.solve:
        return kernel_view.solve_saved(args)
    head, method = resolve(args)
    record = run_record(args, method)
    out = Path(args.output_dir)
    with rundir.RunLock(out):
        old = earlier_result(out / "ntk_results.json", record, args.overwrite)
        if old is not None:
            print(f"{out}: ntk_results.json already holds this config; skipping (--overwrite to redo)")
            return old
        return compute(args, head, method, record)


if __name__ == "__main__":
    main()
