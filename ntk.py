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
(small models only). --method structured runs one forward and C backward passes per batch (func: per
parameter chunk), recording each linear layer's inputs a_t and output gradients g_t (real tokens only); a
layer's kernel term is sum_{t,s} (a_t . a'_s)(g_t . g'_s), contracted layer by layer as token Gram matrices
or as per-example gradients and one GEMM, whichever is cheaper. LoRA factors are linear layers too,
embeddings are matched by token id, biases and LayerNorms use their per-example gradients; any other
trainable parameter stops it. The same kernels to rounding (float64 ~1e-14, float32 ~1e-6 relative), about
twice as fast as func on a 2-core CPU (bench_ntk.py --task cb); on CUDA a float32 model contracts in TF32.
Outputs in runs/<task>/ntk-<ft|lp_ft|lora|lp_lora>-seed<seed>/:
  kernels.npz       P_train, F_train [N,C,N,C]; P_test, F_test [M,C,N,C]; train_idx, test_idx (rows of
                    the train / test split), train_labels, test_labels, train_logits (f at the start)
  ntk_results.json  per kernel (P, F, P+F): Frobenius norm, numerical rank (numpy's tolerance
                    S.max() * N*C * eps on the [N*C, N*C] train kernel), singular values / largest;
                    the FT ratio; kernel regression and the paper's pair-level logistic regression
  spectrum.png      normalised singular values of the three train kernels
"""

import argparse
import itertools
import json
import random
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import ft
from data import die

HOW = ("method", "batch_size", "max_memory_gb", "output_dir", "overwrite", "data_dir")  # do not change results


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ft.common_flags(p)
    a("--seed", type=int, default=1001, help="seeds the fresh head and the example subsets")
    a("--output_dir", help="default runs/<task>/ntk-<method>-seed<seed>")
    a("--overwrite", action="store_true", help="recompute even if ntk_results.json exists for this config")
    a("--init", help="lp_head.pt from lp.py (LP-FT / LP-LoRA); default a fresh normal(0, 0.02) head")
    a("--head_scale", type=float, default=1.0, help="multiply V (F scales by its square, P does not change)")
    a("--lora", action="store_true", help="inject LoRA (B = 0); F is then over the LoRA parameters only")
    a("--r", type=int, default=8, help="LoRA rank")
    a("--alpha", type=float, default=8, help="LoRA scaling is alpha / r")
    a("--targets", nargs="+", default=["query", "value"], help="attention.self.<name> linears to adapt")
    a("--n", type=int, default=250, help="at most this many train examples (seeded random subset)")
    a("--n_test", type=int, help="at most this many test examples (default: --n)")
    a("--k_shot", type=int, help="instead of --n: K train examples per class (data.k_shot)")
    a("--method", choices=list(ENGINES), default="func",
      help="func (torch.func Jacobians), structured (per-layer factors, faster) or naive (autograd loop)")
    a("--batch_size", type=int, default=8, help="examples per vmapped Jacobian (func) / forward-backward batch")
    a("--max_memory_gb", type=float, help="most Jacobian (func) or recorded factors and buffers (structured) held "
      "at once (default: 30%% of the GPU's memory, 4 on CPU)")
    a("--ridge", type=float, default=1e-3, help="kernel regression ridge, times the kernel's largest singular value")
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


def accumulate(K, J, na, sym, cols=1 << 18):
    """K += J_a J_b^T over column blocks: each block's product in J's dtype (a float32 Jacobian is itself only
    good to ~1e-7), the blocks summed into the float64 K."""
    for s in range(0, J.shape[1], cols):
        Jb = J[:, s:s + cols]
        K += (Jb @ Jb.T if sym else Jb[:na] @ Jb[na:].T).double()


def f_func(model, xs_a, xs_b, pad_id, batch_size=8, max_memory_gb=4.0, progress=False):
    from torch.func import functional_call, jacrev, vmap

    enc, pooling = model.encoder, model.pooling
    V = model.head.weight.detach()
    dev, dtype, C = V.device, V.dtype, V.shape[0]
    sym = xs_b is None
    xs = xs_a if sym else xs_a + xs_b
    na, R = len(xs_a) * C, len(xs) * C
    K = torch.zeros(R if sym else na, R if sym else R - na, dtype=torch.float64, device=dev)
    with eager_attention(enc), compact_word_embeddings(enc, xs, pad_id):
        consts = {n: t.detach() for n, t in itertools.chain(enc.named_parameters(), enc.named_buffers())}
        shapes = [(n, tuple(p.shape)) for n, p in enc.named_parameters() if p.requires_grad]
        if not shapes:
            return np.zeros((len(xs_a), C, len(xs_b or xs_a), C))
        itemsize = torch.empty((), dtype=dtype).element_size()
        # the held Jacobian J [R, width] plus one batch's [batch * C, width] on its way into J
        held = (R + min(batch_size, len(xs)) * C) * itemsize
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
                rows = (torch.as_tensor(idx, device=dev)[:, None] * C + torch.arange(C, device=dev)).reshape(-1)
                off = 0
                for jt in jac(prims, b):
                    w = jt[0, 0].numel()
                    J[rows, off:off + w] = jt.reshape(len(idx) * C, w)
                    off += w
                bar.update()
            accumulate(K, J, na, sym)
            del J
        bar.close()
    nb = len(xs) if sym else len(xs_b)
    return K.cpu().numpy().reshape(len(xs_a), C, nb, C)


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


# ---------------------------------------------------------------- the structured engine
# A linear layer y_t = W a_t (t: tokens) gives output c of example x the gradient sum_t g_ct a_t^T, so
#   <dW f_c(x), dW f_c'(x')> = sum_{t,s} (a_t . a'_s) (g_ct . g'_c's),
# a the layer's inputs and g the gradients at its outputs, recorded in one forward and C backward passes per
# batch (the backward of output c summed over the batch: the examples are independent). Per layer and block
# pair the cheaper of two exact contractions: "gram" (token Gram matrices; per pair L L' (in + C out)) or
# "explicit" (the per-example gradients A^T G_c, formed a chunk of outputs at a time, then one GEMM; per pair
# C^2 in out, plus L C in out per example to form them).
STRUCTURED_KINDS = "nn.Linear, nn.Embedding, nn.LayerNorm and lora.LoRALinear"


def structured_modules(enc):
    """-> [(name, module, kind)] for every module that owns a trainable parameter; dies on any parameter this
    engine has no exact rule for (none is ever dropped)."""
    from lora import LoRALinear

    out, seen = [], set()
    for name, m in enc.named_modules():
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if any(id(p) in seen for p in own):
            die(f"{name} shares a trainable parameter with another module; use --method func")
        seen.update(id(p) for p in own)
        if isinstance(m, LoRALinear):
            if m.merged:
                die(f"{name} is merged; unmerge LoRA before computing the eNTK")
            kind = "lora"
        elif isinstance(m, nn.Linear):
            kind = "linear"
        elif isinstance(m, nn.Embedding):
            if m.max_norm is not None or m.scale_grad_by_freq:
                die(f"{name}: an embedding with max_norm or scale_grad_by_freq; use --method func")
            kind = "embedding"
        elif isinstance(m, nn.LayerNorm):
            kind = "layernorm"
        else:
            die(f"--method structured has no rule for the trainable parameters of {name} ({type(m).__name__}; "
                f"it handles {STRUCTURED_KINDS}); use --method func")
        out.append((name, m, kind))
    if len(seen) != sum(1 for p in enc.parameters() if p.requires_grad):
        die("--method structured: some trainable parameter has no owning module")
    return out


class Recording:
    """One block of examples (rows in the block's order, batch after batch), as the contractions need it:
    lin[key] = [(first row, A [B, L, in], (G_c [B, L, out] for each output c))] per batch, padded positions of A
    zeroed, positions without gradient dropped; emb[name] = (S [R, C, d], ids [R], rows [R]): the output gradient
    summed per (example, token id); exp [n, C, D]: the small per-example gradients (biases, LayerNorm)."""

    def __init__(self):
        self.lin, self.emb, self.exp = {}, {}, None


def add_factor(lin, key, lo, A, Gs):
    # only positions with some nonzero gradient (with cls pooling the last layer's query, output and
    # feed-forward layers see the first token alone)
    keep = torch.stack([(g.amax(dim=(0, 2)) != 0) | (g.amin(dim=(0, 2)) != 0) for g in Gs]).any(0)
    if keep.any():
        if not keep.all():
            A, Gs = A[:, keep], [g[:, keep] for g in Gs]
        lin.setdefault(key, []).append((lo, A.contiguous(), tuple(g.contiguous() for g in Gs)))


def group_by_id(ids, Gs, keep, lo, vocab):
    b, t = keep.nonzero(as_tuple=True)
    key, inv = torch.unique(b * vocab + ids[b, t], return_inverse=True)
    G = torch.stack([g[b, t] for g in Gs], 1)
    S = torch.zeros(len(key), *G.shape[1:], dtype=G.dtype, device=G.device).index_add_(0, inv, G)
    return S, key % vocab, key // vocab + lo


def token_sum(w, g):
    return torch.einsum("bt,bt...->b...", w, g)  # over the real tokens (w: the 0/1 mask)


def record(model, mods, xs, idx, pad_id, batch_size):
    """Forward + C backward passes over the examples idx (in this order) in batches -> Recording."""
    V = model.head.weight.detach()
    C = V.shape[0]
    store, batch = {}, {}

    def hook(m, args, out, name):
        if name in store:
            die(f"{name} runs more than once per forward; --method structured needs one call per module")
        if not args or not torch.is_tensor(args[0]):
            die(f"{name} was called without a positional input tensor")
        x, B = args[0], batch["B"]
        if isinstance(m, nn.Embedding) and out.shape[0] == 1 < B:
            # one lookup broadcast over the batch (BERT's positions): expanded, so its gradient is per example
            x, out = x.expand(B, *x.shape[1:]), out.expand(B, *out.shape[1:])
        store[name] = (x, out)
        return out  # the module's output, or its per-example expansion

    handles = [m.register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name)) for name, m, _ in mods]
    rec, embs, exps = Recording(), {}, []
    try:
        for lo in range(0, len(idx), batch_size):
            b = data.to_device(data.collate(xs, idx[lo:lo + batch_size], pad_id), V.device)
            B, L = b["input_ids"].shape
            store.clear()
            batch["B"] = B
            with torch.enable_grad():
                scores = model.features(**b) @ V.T
                used = [(n, m, k) for n, m, k in mods if n in store]
                outs = [store[n][1] for n, _, _ in used]
                grads = [torch.autograd.grad(scores[:, c].sum(), outs, retain_graph=c < C - 1, allow_unused=True)
                         for c in range(C)]
            mask = b["attention_mask"].bool()
            w = mask.to(V.dtype)
            masked = {}  # layer inputs with padded positions zeroed, once per input tensor (query, key, value)
            exp = []
            for j, (name, m, kind) in enumerate(used):
                x, y = store[name]
                if tuple(y.shape[:2]) != (B, L):
                    die(f"{name}'s output has shape {tuple(y.shape)}, not [batch, tokens, ...]")
                Gs = [g[j] if g[j] is not None else torch.zeros_like(y) for g in grads]
                key, x = id(x), x.detach()  # store holds x: its id is unique in this batch
                if kind == "embedding":
                    keep = mask if m.padding_idx is None else mask & (x != m.padding_idx)  # never has gradient
                    embs.setdefault(name, []).append(group_by_id(x, Gs, keep, lo, m.num_embeddings))
                    continue
                if kind == "layernorm":
                    if m.weight is not None and m.weight.requires_grad:
                        xhat = F.layer_norm(x, m.normalized_shape, eps=m.eps)
                        exp.append(torch.stack([token_sum(w, g * xhat).flatten(1) for g in Gs], 1))
                    if m.bias is not None and m.bias.requires_grad:
                        exp.append(torch.stack([token_sum(w, g).flatten(1) for g in Gs], 1))
                    continue
                if key not in masked:
                    masked[key] = x * w[:, :, None]
                x = masked[key]
                if kind == "linear":
                    if m.weight.requires_grad:
                        add_factor(rec.lin, f"{name}.weight", lo, x, Gs)
                    if m.bias is not None and m.bias.requires_grad:
                        exp.append(torch.stack([token_sum(w, g) for g in Gs], 1))
                else:  # LoRA: y = base(x) + (x A^T) B^T s, so A and B are linear layers of their own
                    A, Bw, s = m.lora_A.detach(), m.lora_B.detach(), m.scaling
                    x = m.drop(x)
                    if m.lora_A.requires_grad:
                        add_factor(rec.lin, f"{name}.lora_A", lo, x, [(g @ Bw) * s for g in Gs])
                    if m.lora_B.requires_grad:
                        add_factor(rec.lin, f"{name}.lora_B", lo, (x @ A.T) * s, Gs)
            if exp:
                exps.append(torch.cat(exp, 2))
            del grads, outs, scores, masked
            store.clear()
    finally:
        for h in handles:
            h.remove()
    rec.exp = torch.cat(exps) if exps else None
    rec.emb = {n: tuple(torch.cat(t) for t in zip(*parts)) for n, parts in embs.items()}
    return rec


def explicit_plan(K4, la, lb, same, budget):
    """-> (out rows per chunk, buffer elements) for lin_explicit."""
    na, C, nb = K4.shape[:3]
    d_in, d_out = la[0][1].shape[2], la[0][2][0].shape[2]
    per_row = (na + (0 if same else nb)) * C * d_in
    chunk = max(1, min(d_out, int(budget // (per_row * la[0][1].element_size()))))
    return chunk, per_row * chunk


def lin_explicit(K4, la, lb, same, budget, buf=None):
    """K4 [na, C, nb, C] += J_a J_b^T, J = the per-example weight gradients A^T G_c (rows output-major), an
    out-column chunk at a time (in `buf`, reused across layers)."""
    na, C, nb = K4.shape[:3]
    A0 = la[0][1]
    d_in, d_out = A0.shape[2], la[0][2][0].shape[2]
    chunk, size = explicit_plan(K4, la, lb, same, budget)
    if buf is None or buf.numel() < size:
        buf = torch.empty(size, dtype=A0.dtype, device=A0.device)

    def form(parts, n, off, o0, o1):
        w = (o1 - o0) * d_in
        J = buf[off * C * w:(off + n) * C * w].view(C, n, w)
        if sum(A.shape[0] for _, A, _ in parts) < n:  # batches without gradient here: zero rows
            J.zero_()
        for lo, A, Gs in parts:
            B = A.shape[0]
            for c, g in enumerate(Gs):
                torch.bmm(A.transpose(1, 2), g[:, :, o0:o1], out=J[c, lo:lo + B].view(B, d_in, o1 - o0))
        return J.view(C * n, w)

    for o0 in range(0, d_out, chunk):
        o1 = min(o0 + chunk, d_out)
        Ja = form(la, na, 0, o0, o1)
        Jb = Ja if same else form(lb, nb, na, o0, o1)
        K4 += (Ja @ Jb.T).double().view(C, na, C, nb).permute(1, 0, 3, 2)


def lin_gram(K4, la, lb, same, budget):
    """K4 [na, C, nb, C] += sum_{t,s} (a_t . a'_s)(g_ct . g'_c's), batch pair by batch pair (each pair once
    when a and b are one recording)."""
    C = K4.shape[1]
    for p, (lo_p, Ap, Gp) in enumerate(la):
        Bp, Lp, d_in = Ap.shape
        d_out = Gp[0].shape[2]
        Gp = torch.stack(Gp, 1).reshape(Bp, C, Lp * d_out)
        step = max(1, int(budget // max(1, 2 * Bp * Lp * d_out * Ap.element_size())))
        for q, (lo_q, Aq, Gq) in enumerate(lb):
            if same and q < p:
                continue
            for s in range(0, Aq.shape[0], step):
                Bq, Lq = Aq[s:s + step].shape[:2]
                Ka = (Ap.reshape(Bp * Lp, d_in) @ Aq[s:s + step].reshape(Bq * Lq, d_in).T).view(Bp * Lp, Bq, Lq)
                R = torch.empty(Bp, C, Bq, C, dtype=Ap.dtype, device=Ap.device)
                for c, g in enumerate(Gq):
                    M = torch.bmm(Ka.transpose(0, 1), g[s:s + step])  # [Bq, Bp Lp, out]
                    R[..., c] = torch.einsum("icx,jix->icj", Gp, M.view(Bq, Bp, Lp * d_out))
                R = R.double()
                K4[lo_p:lo_p + Bp, :, lo_q + s:lo_q + s + Bq] += R
                if same and q != p:
                    K4[lo_q + s:lo_q + s + Bq, :, lo_p:lo_p + Bp] += R.permute(2, 3, 0, 1)


def emb_pairs(K4, ea, eb, budget):
    """K4 [na, C, nb, C] += sum over token pairs with equal ids of g_ct . g'_c's, over the pairs of
    (example, id) rows with equal ids, in chunks of pairs."""
    (Sa, ida, ra), (Sb, idb, rb) = ea, eb
    na, C, nb = K4.shape[:3]
    ob = torch.argsort(idb)
    left = torch.searchsorted(idb[ob], ida)
    cnt = torch.searchsorted(idb[ob], ida, right=True) - left
    pairs = int(cnt.sum())
    Kp = torch.zeros(na * nb, C, C, dtype=torch.float64, device=K4.device)
    pa_all = torch.repeat_interleave(torch.arange(len(ida), device=ida.device), cnt)
    first = torch.cumsum(cnt, 0) - cnt  # each a-row's first pair
    step = max(1, int(budget // (2 * C * Sa.shape[2] * Sa.element_size())))
    for s in range(0, pairs, step):
        pa = pa_all[s:s + step]
        pb = ob[torch.arange(s, s + len(pa), device=pa.device) - first[pa] + left[pa]]
        Kp.index_add_(0, ra[pa] * nb + rb[pb], torch.bmm(Sa[pa], Sb[pb].transpose(1, 2)).double())
    K4 += Kp.view(na, nb, C, C).permute(0, 2, 1, 3)


def emb_dense(K4, ea, eb, shared):
    """The same as emb_pairs for the ids in `shared` (sorted), as a GEMM of the explicit gradient rows."""
    na, C, nb = K4.shape[:3]

    def rows(S, ids, ex, n):
        col = torch.searchsorted(shared, ids).clamp(max=len(shared) - 1)
        ok = shared[col] == ids
        E = torch.zeros(n, len(shared), C, S.shape[2], dtype=S.dtype, device=S.device)
        E[ex[ok], col[ok]] = S[ok]  # (example, id) rows are unique
        return E.transpose(1, 2).reshape(n * C, -1)

    K4 += (rows(*ea, na) @ rows(*eb, nb).T).double().view(na, C, nb, C)


def emb_kernel(K4, ea, eb, budget):
    """Word, position and token-type embeddings: the ids that many example pairs share ([CLS], 'the', the first
    positions) by GEMMs (a chunk of ids at a time), the rest by their pairs."""
    na, C, nb = K4.shape[:3]
    Sa, ida, idb = ea[0], ea[1], eb[1]
    u, inv = torch.unique(torch.cat([ida, idb]), return_inverse=True)
    ca = torch.bincount(inv[:len(ida)], minlength=len(u))
    cb = torch.bincount(inv[len(ida):], minlength=len(u))
    both = ca * cb
    by_gemm = 8 * both >= na * nb  # a GEMM costs na nb per id, pairs cost `both` (with more overhead each)
    dense = u[by_gemm]
    step = max(1, int(budget // ((na + nb) * C * Sa.shape[2] * Sa.element_size())))
    for s in range(0, len(dense), step):
        emb_dense(K4, ea, eb, dense[s:s + step])
    if int(both[~by_gemm].sum()) > 0:
        sub = lambda e, ids: tuple(t[~torch.isin(ids, dense)] for t in e)
        emb_pairs(K4, sub(ea, ida), sub(eb, idb), budget)


def contract(K4, ra, rb, same, budget):
    """K4 [na, C, nb, C] += the kernel between two recordings (one and the same when `same`)."""
    na, C, nb = K4.shape[:3]
    if ra.exp is not None:
        K4 += (ra.exp.reshape(na * C, -1) @ rb.exp.reshape(nb * C, -1).T).double().view(na, C, nb, C)
    for name, ea in ra.emb.items():
        if name in rb.emb:
            emb_kernel(K4, ea, rb.emb[name], budget)
    toks = lambda parts: sum(A.shape[0] * A.shape[1] for _, A, _ in parts)
    plan = []
    for key, la in ra.lin.items():
        lb = rb.lin.get(key)
        if lb:
            d_in, d_out = la[0][1].shape[2], la[0][2][0].shape[2]
            gram = toks(la) * toks(lb) * (d_in + C * d_out) // (2 if same else 1)
            explicit = na * nb * C * C * d_in * d_out + (toks(la) + (0 if same else toks(lb))) * C * d_in * d_out
            plan.append((gram < explicit, la, lb))
    sizes = [explicit_plan(K4, la, lb, same, budget)[1] for gram, la, lb in plan if not gram]
    A0 = next(iter(ra.lin.values()))[0][1] if ra.lin else None
    buf = torch.empty(max(sizes), dtype=A0.dtype, device=A0.device) if sizes else None  # one for all layers
    for gram, la, lb in plan:
        if gram:
            lin_gram(K4, la, lb, same, budget)
        else:
            lin_explicit(K4, la, lb, same, budget, buf)


@contextmanager
def tf32(on):
    """TF32 matmuls (float32 accumulation) while on."""
    old = torch.get_float32_matmul_precision()
    if on:
        torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def f_structured(model, xs_a, xs_b, pad_id, batch_size=8, max_memory_gb=4.0, progress=False):
    """The structured eNTK (see above). Memory: half of max_memory_gb for the recorded factors, a quarter for the
    contractions' buffers. When the factors of all examples do not fit, the examples are split into blocks of
    similar length (a quarter each), and every block pair is contracted: the first block held, the second
    recorded anew (the forward and backward passes are repeated, the kernel is not)."""
    V = model.head.weight.detach()
    dev, dtype, C = V.device, V.dtype, V.shape[0]
    sym = xs_b is None
    xs_b = xs_a if sym else xs_b
    mods = structured_modules(model.encoder)
    K4 = torch.zeros(len(xs_a), C, len(xs_b), C, dtype=torch.float64, device=dev)
    if not mods:
        return K4.cpu().numpy()
    budget = max_memory_gb * 2**30 / 4
    per_tok = 0  # recorded values per token
    for _, m, kind in mods:
        if kind == "linear":
            per_tok += m.in_features + C * m.out_features
        elif kind == "lora":
            per_tok += 2 * (m.base.in_features + m.r) + C * (m.base.out_features + m.r)
        elif kind == "embedding":
            per_tok += C * m.embedding_dim
    tok_budget = 2 * budget / (max(1, per_tok) * torch.empty((), dtype=dtype).element_size())
    total = sum(len(x["input_ids"]) for x in xs_a) + (0 if sym else sum(len(x["input_ids"]) for x in xs_b))
    tok_budget = float("inf") if total <= tok_budget else tok_budget / 2

    def blocks(xs):
        out, toks = [[]], 0
        for i in data.batches(xs, len(xs))[0]:  # longest first: batches pad little
            n = len(xs[i]["input_ids"])
            if out[-1] and toks + n > tok_budget:
                out.append([])
                toks = 0
            out[-1].append(i)
            toks += n
        return out

    blocks_a = blocks(xs_a)
    blocks_b = blocks_a if sym else blocks(xs_b)
    sa = np.cumsum([0] + [len(b) for b in blocks_a])
    sb = np.cumsum([0] + [len(b) for b in blocks_b])
    todo = [(p, q) for p in range(len(blocks_a)) for q in range(len(blocks_b)) if not (sym and q < p)]
    ra, held = None, None
    for p, q in tqdm(todo, desc=f"eNTK structured ({len(blocks_a)} x {len(blocks_b)} blocks)",
                     disable=not progress, leave=False):
        if held != p:
            ra, held = record(model, mods, xs_a, blocks_a[p], pad_id, batch_size), p
        same = sym and p == q
        rb = ra if same else record(model, mods, xs_b, blocks_b[q], pad_id, batch_size)
        Kb = K4[sa[p]:sa[p + 1], :, sb[q]:sb[q + 1]]
        # float32 on CUDA: the contractions (sums of many rounding errors of either sign) in TF32; the forward
        # and backward passes stay float32, as their errors would change the factors themselves
        with tf32(dev.type == "cuda" and dtype == torch.float32):
            contract(Kb, ra, rb, same, budget)
        if sym and not same:
            K4[sb[q]:sb[q + 1], :, sa[p]:sa[p + 1]] = Kb.permute(2, 3, 0, 1)
        del rb
    # rows and columns are in block order: back to the examples' order
    K = np.empty(K4.shape)
    K[np.ix_(np.concatenate(blocks_a), np.arange(C), np.concatenate(blocks_b), np.arange(C))] = K4.cpu().numpy()
    return K


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
        C = model.head.out_features
        P = np.einsum("ij,ck->icjk", phi_a @ phi_b.T + 1.0, np.eye(C))
        Fk = ENGINES[method](model, batch_a, batch_b, pad_id, batch_size=batch_size, max_memory_gb=max_memory_gb,
                             progress=progress)
    finally:
        model.train(was)
    return P, Fk


# ---------------------------------------------------------------- statistics and solvers
def flat(K):
    a, c, b, d = K.shape
    return K.reshape(a * c, b * d)


def spectrum(K):
    """Frobenius norm, numerical rank (numpy's default tolerance), singular values / largest."""
    M = flat(K)
    S = np.linalg.svd(M, compute_uv=False)
    tol = S.max() * max(M.shape) * np.finfo(np.float64).eps
    return {"fro": float(np.linalg.norm(M)), "rank": int((S > tol).sum()), "size": M.shape[0],
            "rank_tol": float(tol), "sv_max": float(S.max()), "sv_normalised": (S / max(S.max(), 1e-300)).tolist()}


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ft_ratio(F_tr, K_tr, logits, labels):
    """mean_x ||sum_i F(x, x_i) delta_i|| / ||sum_i K(x, x_i) delta_i||, delta_i = onehot(y_i) - softmax(f(x_i)):
    the share of the function's first gradient-flow step that comes from the FT-effective component."""
    delta = np.eye(logits.shape[1])[labels] - softmax(logits)
    num = np.linalg.norm(np.einsum("icjk,jk->ic", F_tr, delta), axis=1)
    den = np.linalg.norm(np.einsum("icjk,jk->ic", K_tr, delta), axis=1)
    return float(np.mean(num / np.maximum(den, 1e-300)))


def kernel_regression(K_tr, K_te, y_tr, y_te, ridge):
    """(K + ridge * ||K||_2 I)^-1 onehot(y) on the [N*C, N*C] train kernel; argmax over classes."""
    n, C = K_tr.shape[:2]
    M = flat(K_tr)
    lam = ridge * np.linalg.norm(M, 2)
    alpha = np.linalg.solve(M + max(lam, 1e-300) * np.eye(n * C), np.eye(C)[y_tr].ravel())
    acc = lambda K, y: float(((flat(K) @ alpha).reshape(len(y), C).argmax(1) == y).mean())
    return {"train": acc(K_tr, y_tr), "test": acc(K_te, y_te), "ridge": float(lam)}


def pair_logreg(K_tr, K_te, y_tr, y_te):
    """The paper's metric (its kernel_solvers 'logistic'): one sample per (example, class) pair, features its
    kernel row, target 1 if the class is the example's label. Accuracy is over PAIRS, not examples (with C
    classes, 'never the label' alone scores 1 - 1/C); argmax of the pair scores gives a class accuracy too.
    Rows are divided by the train kernel's largest |entry| (units only; the C grid is cross-validated)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV

    n, C = K_tr.shape[:2]
    s = max(np.abs(K_tr).max(), 1e-300)
    X_tr, X_te = flat(K_tr) / s, flat(K_te) / s
    t_tr, t_te = np.eye(C)[y_tr].ravel(), np.eye(C)[y_te].ravel()
    if len(np.unique(t_tr)) < 2:
        return {"train": None, "test": None, "train_class": None, "test_class": None}
    folds = int(min(5, np.bincount(t_tr.astype(int)).min()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)  # sklearn 1.9's notices about its attributes
        clf = LogisticRegressionCV(max_iter=10000, cv=max(folds, 2), scoring="accuracy", random_state=0)
        clf.fit(X_tr, t_tr)
    cls = lambda X, y: float((clf.decision_function(X).reshape(len(y), C).argmax(1) == y).mean())
    return {"train": float(clf.score(X_tr, t_tr)), "test": float(clf.score(X_te, t_te)),
            "train_class": cls(X_tr, y_tr), "test_class": cls(X_te, y_te)}


def plot_spectrum(path, stats, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, st in stats.items():
        sv = np.asarray(st["sv_normalised"])
        ax.semilogy(np.arange(1, len(sv) + 1), np.maximum(sv, 1e-18), label=f"{name} (rank {st['rank']})")
    ax.set_xlabel("index")
    ax.set_ylabel("singular value / largest")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    ft.atomic(path, lambda t: fig.savefig(t, format="png", dpi=120))
    plt.close(fig)


# ---------------------------------------------------------------- main
def subset_idx(n_total, n, seed):
    """The rows data.first_n picks (seeded, sorted)."""
    if n is None or n >= n_total:
        return list(range(n_total))
    return sorted(random.Random(seed).sample(range(n_total), n))


def default_memory_gb():
    if torch.cuda.is_available():
        return round(0.3 * torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return 4.0


def resolve(args):
    head = ft.load_head(args.init) if args.init else None
    if head is not None:
        args.task = args.task or head["task"]
        args.model = args.model or head["model"]
        args.max_len = args.max_len or head.get("max_len", 128)
        args.pooling = args.pooling or head.get("pooling", "cls")
    if not args.task:
        die("no task: pass --task (e.g. --task cb) or --init lp_head.pt")
    data.get_task(args.task)
    if args.n < 1 or (args.n_test is not None and args.n_test < 1) or (args.k_shot is not None and args.k_shot < 1):
        die("--n, --n_test and --k_shot must be at least 1")
    args.max_memory_gb = default_memory_gb() if args.max_memory_gb is None else args.max_memory_gb
    if args.batch_size < 1 or args.max_memory_gb <= 0 or args.ridge < 0:
        die("need --batch_size >= 1, --max_memory_gb > 0 and --ridge >= 0")
    args.max_len, args.pooling = args.max_len or 128, args.pooling or "cls"
    args.model = data.model_id(args.model)
    method = ("lp_" if args.init else "") + ("lora" if args.lora else "ft")
    args.output_dir = args.output_dir or f"runs/{args.task}/ntk-{method}-seed{args.seed}"
    return head, method


def build(args, head, C):
    model, tok = ft.build_model(args.model, C, args.pooling, args.seed)
    if head is not None:
        ft.check_head(head, args.init, args.task, args.model, model.head.in_features)
        with torch.no_grad():
            model.head.weight.copy_(head["weight"])
            model.head.bias.copy_(head["bias"])
    with torch.no_grad():
        model.head.weight.mul_(args.head_scale)
    if args.lora:
        from lora import inject_lora

        inject_lora(model, args.targets, args.r, args.alpha, 0.0)
    return model.to(data.device()).eval(), tok


def print_table(res):
    print(f"  {'kernel':<7}{'||K||_F':>12}{'rank':>11}{'KR train':>10}{'KR test':>9}{'pair tr':>9}{'pair te':>9}")
    fmt = lambda v: f"{v:.4f}" if v is not None else "-"
    for k, st in res["kernels"].items():
        kr, lr = st["kernel_regression"], st["pair_logreg"]
        print(f"  {k:<7}{st['fro']:>12.4g}{st['rank']:>6}/{st['size']:<4}{kr['train']:>10.4f}{kr['test']:>9.4f}"
              f"{fmt(lr['train']):>9}{fmt(lr['test']):>9}")
    print(f"  FT ratio {res['ft_ratio']:.4f}   ||F||_F / ||P+F||_F {res['fro_ratio']:.4f}   "
          f"|V| {res['head_norm']:.4f}   rank tolerance S.max*N*C*eps; pair = (example, class) accuracy")


def main(argv=None):
    args = parse(argv)
    head, method = resolve(args)
    out = Path(args.output_dir)
    cfg = {k: v for k, v in vars(args).items() if k not in HOW}
    res_path = out / "ntk_results.json"
    if res_path.exists() and not args.overwrite:
        old = json.loads(res_path.read_text())
        if {k: old.get("config", {}).get(k) for k in cfg} == cfg:
            print(f"{out}: ntk_results.json already holds this config; skipping (--overwrite to redo)")
            return old
        die(f"{res_path} was made with another config; pass --overwrite or another --output_dir")
    task = data.get_task(args.task)
    C = len(task.labels)
    splits = data.load_task(args.task, args.data_dir)
    tr, te = splits["train"], splits["test"]
    tr_idx = data.k_shot(tr.labels, args.k_shot, args.seed) if args.k_shot else subset_idx(len(tr), args.n, args.seed)
    te_idx = subset_idx(len(te), args.n_test or args.n, args.seed)
    tr, te = tr.subset(tr_idx), te.subset(te_idx)
    model, tok = build(args, head, C)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    xs_tr, xs_te = data.tokenize(tok, tr, args.max_len), data.tokenize(tok, te, args.max_len)
    n_par = sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)
    print(f"{out}: eNTK ({method}, --method {args.method}) on {args.task}: {len(tr)} train x {len(tr)} train and "
          f"{len(te)} test x train, C={C}, {n_par:,} backbone parameters in F, {data.device()}")

    t0 = time.time()
    P, Fk = kernels(model, xs_tr + xs_te, pad_id=pad, method=args.method, batch_size=args.batch_size,
                    max_memory_gb=args.max_memory_gb, progress=True)
    secs = time.time() - t0
    n = len(tr)
    P_tr, F_tr, P_te, F_te = P[:n, :, :n], Fk[:n, :, :n], P[n:, :, :n], Fk[n:, :, :n]
    logits = logits_of(model, features(model, xs_tr, pad))
    ft.save_npz(out / "kernels.npz", P_train=P_tr, F_train=F_tr, P_test=P_te, F_test=F_te,
                train_idx=np.asarray(tr_idx, np.int64), test_idx=np.asarray(te_idx, np.int64),
                train_labels=tr.labels, test_labels=te.labels, train_logits=logits)

    stats = {}
    for name, K_tr, K_te in (("P", P_tr, P_te), ("F", F_tr, F_te), ("P+F", P_tr + F_tr, P_te + F_te)):
        st = spectrum(K_tr)
        st["kernel_regression"] = kernel_regression(K_tr, K_te, tr.labels, te.labels, args.ridge)
        st["pair_logreg"] = pair_logreg(K_tr, K_te, tr.labels, te.labels)
        stats[name] = st
    res = {"config": vars(args) | {"ntk_method": method, "device": str(data.device()), "C": C, "n_train": n,
                                   "n_test_used": len(te), "backbone_params": n_par},
           "seconds": round(secs, 2), "kernels": stats,
           "ft_ratio": ft_ratio(F_tr, P_tr + F_tr, logits, tr.labels),
           "fro_ratio": stats["F"]["fro"] / max(stats["P+F"]["fro"], 1e-300),
           "head_norm": float(model.head.weight.detach().double().norm()),
           "notes": {"rank": "numpy default tolerance S.max() * N*C * eps(float64) on the [N*C, N*C] train kernel",
                     "kernel_regression": "class accuracy (argmax over classes), ridge * largest singular value",
                     "pair_logreg": "the paper's metric: accuracy over (example, class) pairs, not class accuracy; "
                                    "*_class: argmax of its pair scores per example"}}
    plot_spectrum(out / "spectrum.png", stats, f"eNTK spectrum: {args.task} {method}, N={n}, C={C}")
    ft.save_json(res_path, res)
    print(f"  {secs:.1f}s; wrote {out}/kernels.npz, ntk_results.json, spectrum.png")
    print_table(res)
    return res


if __name__ == "__main__":
    main()
