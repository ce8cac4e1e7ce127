"""The structured eNTK engine of ntk.py (--method structured): F = V J J'^T V^T layer by layer, from each layer's
recorded inputs and output gradients, without ever forming the Jacobian J.

    python ntk.py --task cb --n 250 --method structured               # the engine inside ntk.py
    python bench_ntk.py --task cb --model_config embedded --paper_n 0  # against --method func

A linear layer y_t = W a_t (t: tokens) gives output c of example x the gradient sum_t g_ct a_t^T, so
  <dW f_c(x), dW f_c'(x')> = sum_{t,s} (a_t . a'_s) (g_ct . g'_c's),
a the layer's inputs and g the gradients at its outputs, recorded in one forward and C backward passes per
batch (the backward of output c summed over the batch: the examples are independent). Per layer and block
pair the cheaper of two exact contractions: "gram" (token Gram matrices; per pair L L' (in + C out)) or
"explicit" (the per-example gradients A^T G_c, formed a chunk of outputs at a time, then one GEMM; per pair
C^2 in out, plus L C in out per example to form them). LoRA factors are linear layers too, embeddings are
matched by token id (a weight row's gradient is the sum of the output gradients at the positions holding
that id), biases and LayerNorms use their explicit per-example gradients; any other trainable parameter stops
it. Imports data, rundir and lora only (ntk.py imports this module, never the other way round).
"""

from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
from lora import LoRALinear
from rundir import die

STRUCTURED_KINDS = "nn.Linear, nn.Embedding, nn.LayerNorm and lora.LoRALinear"


def structured_modules(enc):
    """-> [(name, module, kind)] for every module that owns a trainable parameter; dies on any parameter this
    engine has no exact rule for (none is ever dropped)."""
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
                # i, t: example and token of batch p; j, s: example and token of batch q; o: output unit
                Bq, Lq = Aq[s:s + step].shape[:2]
                # Ka[(i, t), j, s] = a_it . a'_js: every token pair's input dot product
                Ka = (Ap.reshape(Bp * Lp, d_in) @ Aq[s:s + step].reshape(Bq * Lq, d_in).T).view(Bp * Lp, Bq, Lq)
                R = torch.empty(Bp, C, Bq, C, dtype=Ap.dtype, device=Ap.device)
                for c, g in enumerate(Gq):  # c: q's output (c' in the formula)
                    # M[j, (i, t), o] = sum_s (a_it . a'_js) g'_jso: q's gradients weighted by the input products
                    M = torch.bmm(Ka.transpose(0, 1), g[s:s + step])
                    # R[i, c_p, j, c] = sum_{t, o} g_{i c_p t o} M[j, (i, t), o]
                    #                 = sum_{t,s} (a_it . a'_js)(g_{i c_p t} . g'_{j c s}); x runs over (t, o)
                    R[..., c] = torch.einsum("icx,jix->icj", Gp, M.view(Bq, Bp, Lp * d_out))
                R = R.double()
                K4[lo_p:lo_p + Bp, :, lo_q + s:lo_q + s + Bq] += R
                if same and q != p:
                    K4[lo_q + s:lo_q + s + Bq, :, lo_p:lo_p + Bp] += R.permute(2, 3, 0, 1)


def emb_pairs(K4, ea, eb, budget):
    """K4 [na, C, nb, C] += sum over token pairs with equal ids of g_ct . g'_c's, over the pairs of
    (example, id) rows with equal ids, in chunks of pairs."""
    # A row of either side is one (example, token id): S [rows, C, d] the output gradients summed over the
    # example's positions holding that id, ids [rows] the id, r [rows] the example. The embedding row of id v
    # gets gradient S from each row with id v, so K(x, c, x', c') = sum over row pairs (i, j) with equal ids,
    # ra[i] = x and rb[j] = x', of S_a[i, c] . S_b[j, c'].
    (Sa, ida, ra), (Sb, idb, rb) = ea, eb
    na, C, nb = K4.shape[:3]
    ob = torch.argsort(idb)  # b's rows sorted by id: each id's rows are one run ob[left:left + cnt]
    left = torch.searchsorted(idb[ob], ida)  # per a-row i: where its id's run starts among b's sorted rows
    cnt = torch.searchsorted(idb[ob], ida, right=True) - left  # ... and its length (b-rows matching a-row i)
    pairs = int(cnt.sum())
    Kp = torch.zeros(na * nb, C, C, dtype=torch.float64, device=K4.device)
    # the pairs, numbered k = 0 .. pairs-1 a-row by a-row: pa_all[k] the a-row of pair k, first[i] the number of
    # a-row i's first pair, so pair k's b-row is the (k - first[i])-th of the run: ob[left[i] + k - first[i]]
    pa_all = torch.repeat_interleave(torch.arange(len(ida), device=ida.device), cnt)
    first = torch.cumsum(cnt, 0) - cnt
    step = max(1, int(budget // (2 * C * Sa.shape[2] * Sa.element_size())))
    for s in range(0, pairs, step):  # a chunk of pairs at a time: gathering S for all pairs would not fit
        pa = pa_all[s:s + step]
        pb = ob[torch.arange(s, s + len(pa), device=pa.device) - first[pa] + left[pa]]
        # each pair's [C, C] block S_a[i] S_b[j]^T, summed into the (example_a, example_b) entry ra * nb + rb
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
def matmul_precision(name):
    """torch's float32 matmul precision ("highest": full float32; "high": TF32 on CUDA) while inside."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(name)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def f_structured(model, xs_a, xs_b, pad_id, batch_size=8, max_memory_gb=4.0, progress=False):
    """F [Na, C, Nb, C] float64 (xs_b None: a x a). Memory: half of max_memory_gb for the recorded factors, a
    quarter for the contractions' buffers. When the factors of all examples do not fit, the examples are split
    into blocks of similar length (a quarter each), and every block pair is contracted: the first block held,
    the second recorded anew (the forward and backward passes are repeated, the kernel is not)."""
    dev = model.head.weight.device
    # TF32 where the caller allows it (ntk.py --precision bf16 on CUDA), in the contractions only (sums of many
    # rounding errors of either sign); the forward and backward passes stay full float32, as their errors would
    # change the factors themselves
    fast = "high" if dev.type == "cuda" and torch.get_float32_matmul_precision() != "highest" else "highest"
    with matmul_precision("highest"):
        return structured_kernel(model, xs_a, xs_b, pad_id, batch_size, max_memory_gb, progress, fast)


def structured_kernel(model, xs_a, xs_b, pad_id, batch_size, max_memory_gb, progress, fast):
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
        with matmul_precision(fast):
            contract(Kb, ra, rb, same, budget)
        if sym and not same:
            K4[sb[q]:sb[q + 1], :, sa[p]:sa[p + 1]] = Kb.permute(2, 3, 0, 1)
        del rb
    # rows and columns are in block order: back to the examples' order
    K = np.empty(K4.shape)
    K[np.ix_(np.concatenate(blocks_a), np.arange(C), np.concatenate(blocks_b), np.arange(C))] = K4.cpu().numpy()
    return K
