"""Speed of ntk.py's eNTK engines next to each other and next to the paper code's approach, on a random model.

    python bench_ntk.py                                                  # roberta-base shape, 250 x 250, length 128
    python bench_ntk.py --model_config embedded --n 8 --max_len 64      # CPU-sized smoke run (well under a minute)
    python bench_ntk.py --task cb --model_config embedded --paper_n 0    # 64 real CB train examples, pretrained MiniLM
    python bench_ntk.py --methods structured --n 2000 --paper_n 0       # large kernels: the structured engine alone

methods: ntk.kernels with each --method in --methods (default func,structured), the whole n x n train kernel
       (P and F, every pair) on the same inputs in the same run, timed end to end; the relative error of each
       F against the first method's, ||F - F_ref||_F / ||F_ref||_F, and the first method's time / each one's.
paper: the approach of the paper's code (Malladi et al.'s kernel trainer): a reverse-mode Jacobian of the
       d-dimensional feature phi(x) (d outputs instead of C) over all parameters (dense, the full word-embedding
       matrix included), contracted with V afterwards; timed on --paper_n examples (the d backward passes
       vmapped --paper_chunk at a time; on CPU only --paper_dims of them, scaled to d) and scaled per example;
       its J J^T product is not counted.
--task synthetic (default): random token ids, every example --max_len long; --task cb: a seeded subset of --n
(default 64) CB train examples, tokenised at most --max_len long (their real lengths), with the embedded model.
Writes a JSON (--out) and prints a table; peak GPU memory on CUDA only.
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import bench
import data
import ft
import ntk
import rundir


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model_config", choices=["tiny", "embedded", "roberta-base"], default="roberta-base",
      help="tiny: 2-layer width-32 RoBERTa; embedded: all-MiniLM-L6-v2; roberta-base: RobertaConfig() (random)")
    a("--task", choices=["synthetic", "cb"], default="synthetic",
      help="synthetic: random ids, all --max_len long; cb: real CB train examples (needs --model_config embedded)")
    a("--data_dir", help="CB's files (default: $LPFT_DATA, else ./data)")
    a("--n", type=int, help="examples in the train kernel (default 250; 64 with --task cb)")
    a("--max_len", type=int, default=128, help="tokens per example (synthetic: every example this long)")
    a("--C", type=int, default=3, help="classes")
    a("--methods", default="func,structured", help=f"comma-separated ntk.py engines ({', '.join(ntk.ENGINES)}), "
      "timed in this order on the same inputs; errors and speedups are relative to the first")
    a("--batch_size", type=int, default=8)
    a("--max_memory_gb", type=float, help="ntk.py's memory budget (default as ntk.py)")
    a("--paper_n", type=int, default=2, help="examples timed for the paper's approach (0: skip it)")
    a("--paper_chunk", type=int, default=8, help="feature dimensions per vmapped backward in the paper's approach")
    a("--paper_dims", type=int, help="time only this many of the d backward passes and scale by d / it "
      "(every pass is the same work; default: all d on CUDA, 64 on CPU)")
    a("--seed", type=int, default=0)
    a("--out", default="runs/bench_ntk.json")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in ntk.ENGINES]
    if bad or not args.methods:
        rundir.die(f"--methods: unknown engine {bad[0] if bad else '(none)'}; choose from {', '.join(ntk.ENGINES)}")
    if args.task == "cb" and args.model_config != "embedded":
        rundir.die("--task cb tokenises with the embedded model's tokenizer: use --model_config embedded")
    args.n = (64 if args.task == "cb" else 250) if args.n is None else args.n  # --n 0 is refused, not the default
    rundir.check_positive(args, ("n", "max_len", "C", "batch_size", "max_memory_gb", "paper_n", "paper_chunk",
                                 "paper_dims"), allow_zero=("paper_n",))
    bench.check_output_file(args.out, "--out")
    return args


def build(name, C, seed):
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(seed)
    tok = None
    if name == "embedded":
        enc, tok = data.load_encoder(None)
    else:
        cfg = RobertaConfig() if name == "roberta-base" else RobertaConfig(
            vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        enc = RobertaModel(cfg, add_pooling_layer=False)
    return ft.Classifier(enc, C).to(data.device()).eval(), tok


def inputs(model, n, max_len, seed):
    cfg = model.encoder.config
    if max_len > cfg.max_position_embeddings - 2:
        rundir.die(f"--max_len {max_len} exceeds this model's {cfg.max_position_embeddings - 2} positions")
    rng = np.random.default_rng(seed)
    first = cfg.bos_token_id if cfg.bos_token_id is not None else 101
    return [{"input_ids": [first] + rng.integers(5, cfg.vocab_size, max_len - 1).tolist()} for _ in range(n)]


def cb_inputs(tok, n, max_len, seed, data_dir):
    train = data.load_task("cb", data_dir)["train"]
    return data.tokenize(tok, train.subset(data.subset_indices(len(train), n, seed)), max_len)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_reset():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak():
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def paper_jacobian(model, x, pad_id, chunk, dims=None):
    """V (d phi / d theta) for one example the paper's way: d reverse-mode passes over all parameters
    (only the first `dims` of them when given) -> (seconds of the forward, of the passes, d, passes done)."""
    from torch.func import functional_call, vjp, vmap

    enc, V = model.encoder, model.head.weight.detach()
    params = {n: p.detach() for n, p in enc.named_parameters()}
    b = data.to_device(data.collate([x], [0], pad_id), V.device)

    def phi(p):
        h = functional_call(enc, p, (), b).last_hidden_state
        return data.pool(h, b["attention_mask"], model.pooling)[0]

    sync()
    t0 = time.time()
    out, fn = vjp(phi, params)
    sync()
    t1 = time.time()
    d = out.shape[0]
    dims = min(dims or d, d)
    eye = torch.eye(d, dtype=out.dtype, device=out.device)
    Jg = {n: torch.zeros((V.shape[0],) + p.shape, dtype=p.dtype, device=p.device) for n, p in params.items()}
    for s in range(0, dims, chunk):
        e = min(s + chunk, dims)
        (grads,) = vmap(fn)(eye[s:e])
        for n, g in grads.items():
            Jg[n] += torch.tensordot(V[:, s:e], g, dims=1)
    sync()
    return t1 - t0, time.time() - t1, d, dims


@rundir.cli
def main(argv=None):
    args = parse(argv)
    model, tok = build(args.model_config, args.C, args.seed)
    pad = model.encoder.config.pad_token_id or 0
    if args.task == "cb":
        xs = cb_inputs(tok, args.n, args.max_len, args.seed, args.data_dir)
        pad = tok.pad_token_id if tok.pad_token_id is not None else pad
    else:
        xs = inputs(model, args.n, args.max_len, args.seed)
    lengths = [len(x["input_ids"]) for x in xs]
    dev = data.device()
    mem = args.max_memory_gb or ntk.default_memory_gb()
    n_par = sum(p.numel() for p in model.parameters())
    print(f"bench: {args.model_config} ({n_par:,} parameters), {args.task}, C={args.C}, length {np.mean(lengths):.1f} "
          f"mean / {max(lengths)} max, {len(xs)} x {len(xs)} train kernel, {dev}")

    res = {"device": str(dev) + (f" ({torch.cuda.get_device_name()})" if dev.type == "cuda" else ""),
           "torch_threads": torch.get_num_threads(), "model_config": args.model_config, "task": args.task,
           "params": n_par, "n": len(xs), "max_len": args.max_len, "mean_len": float(np.mean(lengths)), "C": args.C,
           "batch_size": args.batch_size, "max_memory_gb": mem, "reference": args.methods[0], "methods": {}}
    F_ref = None
    for m in args.methods:
        peak_reset()
        sync()
        t0 = time.time()
        P, F = ntk.kernels(model, xs, pad_id=pad, method=m, batch_size=args.batch_size, max_memory_gb=mem,
                           progress=True)
        sync()
        secs = time.time() - t0
        F_ref = F if F_ref is None else F_ref
        r = {"seconds": secs, "per_example_s": secs / len(xs), "peak_gpu_bytes": peak(),
             "kernel_fro": float(np.linalg.norm(P + F)), "F_fro": float(np.linalg.norm(F)),
             "rel_error": float(np.linalg.norm(F - F_ref) / max(np.linalg.norm(F_ref), 1e-300))}
        r["speedup"] = res["methods"][args.methods[0]]["seconds"] / max(secs, 1e-9) if res["methods"] else 1.0
        res["methods"][m] = r
        print(f"  {m}: {secs:.2f}s")
    if args.paper_n > 0:
        k = min(args.paper_n, len(xs))
        dims = args.paper_dims or (None if dev.type == "cuda" else 64)
        peak_reset()
        per = 0.0
        with ntk.eager_attention(model.encoder):  # as func (and the paper's era): no fused-SDPA vmap fallback
            for x in xs[:k]:
                fwd, bwd, d, done = paper_jacobian(model, x, pad, args.paper_chunk, dims)
                per += (fwd + bwd * d / done) / k
        res["paper"] = {"examples_timed": k, "per_example_s": per, "projected_seconds": per * len(xs),
                        "peak_gpu_bytes": peak(), "outputs_per_example": d, "backward_passes_timed": done}
        res["speedup_per_example"] = {m: per / r["per_example_s"] for m, r in res["methods"].items()}
    rundir.save_json(Path(args.out), res)

    gib = lambda b: f"{b / 2**30:.2f}" if b is not None else "n/a (CPU)"
    print(f"  {'approach':<34}{'seconds':>10}{'s/example':>11}{'peak GiB':>11}{'speedup':>9}{'rel err':>10}")
    for m, r in res["methods"].items():
        print(f"  {'ntk.py ' + m + ' (all pairs)':<34}{r['seconds']:>10.2f}{r['per_example_s']:>11.3f}"
              f"{gib(r['peak_gpu_bytes']):>11}{r['speedup']:>8.1f}x{r['rel_error']:>10.1e}")
    if "paper" in res:
        p = res["paper"]
        label = f"paper (d={p['outputs_per_example']} outputs), x{len(xs)}"
        if p["backward_passes_timed"] < p["outputs_per_example"]:
            print(f"  (paper: {p['backward_passes_timed']} of its {p['outputs_per_example']} backward passes timed "
                  f"on {p['examples_timed']} example(s), scaled to all)")
        print(f"  {label:<34}"
              f"{p['projected_seconds']:>10.2f}{p['per_example_s']:>11.3f}{gib(p['peak_gpu_bytes']):>11}")
        sp = res["speedup_per_example"]
        print("  paper / ours per example: " + ", ".join(f"{m} {s:.1f}x" for m, s in sp.items()))
    print(f"  speedup and rel err (||F - F_{args.methods[0]}||_F / ||F_{args.methods[0]}||_F) against "
          f"{args.methods[0]}; wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
