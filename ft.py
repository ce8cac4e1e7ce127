"""Fine-tuning (FT, from a fresh head) and LP-FT (from the linear-probing head).

    python ft.py --task rte                            # FT
    python lp.py --task rte && python ft.py --init lp_head.pt   # LP-FT

Holds the kit's model (encoder + one linear head on phi(x)) and its one training loop; lora.py
and ntk.py import them. Outputs go to runs/<task>/<method>-seed<seed>/: results.json,
logits.npz, model.safetensors + meta.json, and ckpt.pt (resume state, removed when done).
"""

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
from data import die

# Paper Table 6: task -> method -> (batch size, learning rate)
TABLE6 = {
    "cb": {"ft": (16, 5e-5), "lp_ft": (8, 5e-6)},
    "rte": {"ft": (16, 1e-5), "lp_ft": (8, 1e-5)},
    "boolq": {"ft": (32, 1e-5), "lp_ft": (8, 1e-5)},
    "wic": {"ft": (32, 1e-5), "lp_ft": (8, 1e-5)},
    "wsc": {"ft": (16, 1e-3), "lp_ft": (8, 1e-3)},
    "cola": {"ft": (32, 5e-5), "lp_ft": (8, 1e-5)},
    "sst2": {"ft": (32, 1e-5), "lp_ft": (8, 1e-5)},
    "mrpc": {"ft": (16, 1e-5), "lp_ft": (8, 1e-5)},
    "amazon": {"ft": (16, 1e-5), "lp_ft": (8, 1e-6)},
    "pubmed": {"ft": (8, 5e-6), "lp_ft": (8, 5e-6)},
}


# ---------------------------------------------------------------- the model
class Classifier(nn.Module):
    """f(x) = V phi(x) + b: an encoder, dropout 0.1 and ONE linear head (no dense+tanh layer)."""

    def __init__(self, encoder, num_labels, pooling="cls", dropout=0.1):
        super().__init__()
        self.encoder, self.pooling = encoder, pooling
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def features(self, input_ids, attention_mask, token_type_ids=None):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return data.pool(h.last_hidden_state, attention_mask, self.pooling)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return self.head(self.drop(self.features(input_ids, attention_mask, token_type_ids)))


def build_model(model_name, num_labels, pooling="cls", seed=0):
    """-> (Classifier with a fresh normal(0, 0.02) head, tokenizer)."""
    enc, tok = data.load_encoder(model_name)
    torch.manual_seed(seed)
    return Classifier(enc, num_labels, pooling), tok


def load_head(path):
    """An lp_head.pt, loaded safely (tensors and plain values only), checked for its fields."""
    if not Path(path).exists():
        die(f"head file {path} not found; make it with: python lp.py --task <task>")
    try:
        h = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        die(f"cannot read head file {path} ({type(e).__name__}); it is corrupt or not an lp_head.pt — rerun lp.py")
    need = {"weight", "bias", "task", "model", "labels"}
    if not isinstance(h, dict) or not need <= set(h):
        die(f"head file {path} lacks {sorted(need - set(h) if isinstance(h, dict) else need)}; rerun lp.py")
    w, b = h["weight"], h["bias"]
    if w.ndim != 2 or b.shape != (w.shape[0],) or w.shape[0] != len(h["labels"]):
        die(f"head file {path}: weight {tuple(w.shape)} / bias {tuple(b.shape)} do not match its "
            f"{len(h['labels'])} labels; rerun lp.py")
    return h


def check_head(h, path, task, model_name, hidden, max_len=None, pooling=None):
    """A head from another task, model, label count, pooling or max length stops with one line (LP-FT must
    start exactly at the LP model: a head fit on other features would not)."""
    t = data.get_task(task)
    for flag, mine in (("pooling", pooling), ("max_len", max_len)):
        if mine is not None and h.get(flag) is not None and h[flag] != mine:
            die(f"head {path} was fit with --{flag} {h[flag]}, not {mine}; drop --{flag} (the head's is used) "
                f"or rerun lp.py with --{flag} {mine}")
    if h["task"] != task:
        die(f"head {path} was fit on task '{h['task']}', not '{task}'; drop --task or run lp.py --task {task}")
    if len(h["labels"]) != len(t.labels):
        die(f"head {path} has {len(h['labels'])} labels but {task} has {len(t.labels)}; rerun lp.py --task {task}")
    if data.model_id(model_name) != h["model"]:
        die(f"head {path} was fit on model '{h['model']}', not '{data.model_id(model_name)}'; "
            f"drop --model or rerun lp.py with this model")
    if h["weight"].shape[1] != hidden:
        die(f"head {path} has feature width {h['weight'].shape[1]} but the model's is {hidden}; rerun lp.py")


def init_head(model, head, args):
    """The head FT starts from: the LP head (checked against the run's task, model, pooling and max_len) or the
    fresh one, times --head_scale. Used by ft.py, lora.py and ntk.py."""
    if head is not None:
        check_head(head, args.init, args.task, args.model, model.head.in_features, args.max_len, args.pooling)
        with torch.no_grad():
            model.head.weight.copy_(head["weight"])
            model.head.bias.copy_(head["bias"])
    with torch.no_grad():
        model.head.weight.mul_(args.head_scale)
    if not torch.isfinite(model.head.weight).all() or not torch.isfinite(model.head.bias).all():
        die(f"the initial head has NaN or infinite values ({args.init or 'fresh head'}, --head_scale "
            f"{args.head_scale}); refit it with lp.py or pass a finite --head_scale")


# ---------------------------------------------------------------- files (atomic)
def atomic(path, write):
    """write(tmp_path) then rename, so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # unique: parallel jobs may write the same file
    write(tmp)
    os.replace(tmp, path)


def save_json(path, obj):
    atomic(path, lambda t: Path(t).write_text(json.dumps(obj, indent=2)))


def save_npz(path, **arrays):
    def w(t):
        with open(t, "wb") as f:
            np.savez(f, **arrays)
    atomic(path, w)


def save_torch(path, obj):
    atomic(path, lambda t: torch.save(obj, t))


def trainable_state(model):
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_weights(out, model, meta):
    from safetensors.torch import save_file

    atomic(out / "model.safetensors", lambda t: save_file(trainable_state(model), str(t)))
    save_json(out / "meta.json", meta)


def load_weights(out, model):
    """Load model.safetensors (the trainable tensors) into a model built from meta.json."""
    from safetensors.torch import load_file

    try:
        sd = load_file(str(Path(out) / "model.safetensors"))
    except Exception as e:
        die(f"cannot read {Path(out) / 'model.safetensors'} ({type(e).__name__}); rerun the training")
    missing = set(sd) - set(dict(model.named_parameters()))
    if missing:
        die(f"{out}/model.safetensors has tensors this model lacks ({sorted(missing)[:3]}...); wrong --model?")
    model.load_state_dict(sd, strict=False)


# ---------------------------------------------------------------- feature statistics (paper Tables 1, 12)
def feature_stats(phi, phi0, labels):
    """Diff(F): mean ||phi_t(x) - phi_0(x)||; CS(F): mean cosine similarity over pairs of different
    examples; FDR (the kit's definition): tr(S_B) / tr(S_W), between- over within-class scatter."""
    phi, phi0 = np.asarray(phi, np.float64), np.asarray(phi0, np.float64)
    n = len(phi)
    z = phi / np.linalg.norm(phi, axis=1, keepdims=True).clip(1e-12)
    cs = (np.square(z.sum(0)).sum() - n) / max(n * (n - 1), 1)
    mu = phi.mean(0)
    sb = sw = 0.0
    for c in np.unique(labels):
        x = phi[labels == c]
        sb += len(x) * np.square(x.mean(0) - mu).sum()
        sw += np.square(x - x.mean(0)).sum()
    return {"diff_f": float(np.linalg.norm(phi - phi0, axis=1).mean()), "cs_f": float(cs),
            "fdr_f": float(sb / max(sw, 1e-12))}


# ---------------------------------------------------------------- args
def common_flags(p):
    """The flags every script that can start from an LP head shares (ft.py, lora.py, ntk.py)."""
    a = p.add_argument
    a("--task", help=f"one of {', '.join(data.TASKS)} (default: the --init head's task)")
    a("--model", help="hub name or directory (default: the head's model, else the embedded all-MiniLM-L6-v2)")
    a("--data_dir", help="folder with the official files (default: $LPFT_DATA, else ./data)")
    a("--max_len", type=int, help="max tokens (default: the head's, else 128)")
    a("--pooling", choices=["cls", "mean"], help="phi(x) (default: the head's, else cls)")
    return a


def make_parser(description=__doc__):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = common_flags(p)
    a("--seed", type=int, default=1001)
    a("--output_dir", help="default runs/<task>/<method>-seed<seed>")
    a("--overwrite", action="store_true", help="start afresh, discarding earlier results and checkpoints")
    a("--init", help="lp_head.pt from lp.py: start from the LP head (LP-FT, LP-LoRA) instead of a fresh one")
    a("--lr", type=float, help="default: paper Table 6 for the task and method")
    a("--batch_size", type=int, help="default: paper Table 6 for the task and method")
    a("--epochs", type=int, default=10)
    a("--max_steps", type=int, help="stop after this many optimizer steps")
    a("--max_train_samples", type=int, help="seeded random subset of the train split")
    a("--max_eval_samples", type=int, help="seeded random subset of val/test (and OOD) splits")
    a("--head_scale", type=float, default=1.0, help="multiply the initial head (norm-scaling experiment)")
    a("--warmup_ratio", type=float, default=0.0)
    a("--patience", type=int, default=0, help="stop after N epochs without a better val metric (0: off)")
    a("--eval_batch_size", type=int, default=64)
    a("--compile", action="store_true", help="torch.compile the model (pays on CUDA)")
    return p


def resolve(args, method, table):
    """Fill task/model/max_len/pooling from the head, lr/batch from the table; validate."""
    head = load_head(args.init) if args.init else None
    if head is not None:
        args.task = args.task or head["task"]
        args.model = args.model or head["model"]
        args.max_len = args.max_len or head.get("max_len", 128)
        args.pooling = args.pooling or head.get("pooling", "cls")
    if not args.task:
        die("no task: pass --task (e.g. --task rte) or --init lp_head.pt")
    data.get_task(args.task)
    args.max_len, args.pooling = args.max_len or 128, args.pooling or "cls"
    args.model = data.model_id(args.model)
    bs, lr = table[args.task][method]
    args.batch_size = args.batch_size or bs
    args.lr = lr if args.lr is None else args.lr
    args.output_dir = args.output_dir or f"runs/{args.task}/{method}-seed{args.seed}"
    return head


# ---------------------------------------------------------------- train / evaluate
def evaluate(model, enc, pad_id, bs, mult=1):
    """-> {split: (logits [N,C], phi [N,d])} in eval mode."""
    model.eval()
    fn = lambda b: (lambda f: (model.head(f), f))(model.features(**b))  # noqa: E731
    return {s: data.extract(fn, e, pad_id, bs, multiple_of=mult) for s, e in enc.items()}


def adamw(params, lr, dev):
    """The kit's optimizer: AdamW without weight decay, fused on CPU too (its step is ~10x faster than foreach
    there: 0.03 s vs 0.3 s for 22.6M parameters)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=dev.type in ("cuda", "cpu"))


def train_step(fwd, opt, sched, params, batch, y):
    """One optimizer step: bf16 autocast on CUDA, fp32 loss, clip 1.0. Returns the loss (no host sync)."""
    dev = y.device
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        loss = F.cross_entropy(fwd(**batch).float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
    opt.step()
    sched.step()
    return loss


def epoch_record(task, ev, labels, phi0, head):
    rec = {s: data.metrics(task, lg, labels[s]) for s, (lg, _) in ev.items()}
    rec["head_norm"] = float(head.weight.detach().float().norm())
    rec.update(feature_stats(ev["test"][1], phi0, labels["test"]))
    return rec


def run(args, method, table=TABLE6, setup=None, extra_meta=None):
    """The kit's one training loop (FT, LP-FT; LoRA and LP-LoRA through `setup`)."""
    head = resolve(args, method, table)
    out = Path(args.output_dir)
    res_path, ckpt_path = out / "results.json", out / "ckpt.pt"
    if args.overwrite:
        for f in ("results.json", "ckpt.pt", "logits.npz", "model.safetensors", "meta.json"):
            (out / f).unlink(missing_ok=True)
    if res_path.exists():
        res = json.loads(res_path.read_text())
        if res.get("failed"):
            die(f"{out} failed earlier ({res['failed']}); --overwrite to retry")
        if res.get("finished"):
            print(f"{out}: already finished (best epoch {res['best_epoch']}, test {res['metrics']['test']}); "
                  f"--overwrite to redo")
            return res
    task = data.get_task(args.task)
    dev = data.device()
    torch.manual_seed(args.seed)

    # data
    splits = data.load_task(args.task, args.data_dir)
    splits["train"] = data.first_n(splits["train"], args.max_train_samples, args.seed)
    for s in [k for k in splits if k != "train"]:
        splits[s] = data.first_n(splits[s], args.max_eval_samples, 0)
    model, tok = build_model(args.model, len(task.labels), args.pooling, args.seed)
    if head is not None:
        check_head(head, args.init, args.task, args.model, model.head.in_features)
        with torch.no_grad():
            model.head.weight.copy_(head["weight"])
            model.head.bias.copy_(head["bias"])
    with torch.no_grad():
        model.head.weight.mul_(args.head_scale)
    if setup is not None:
        setup(model)
    model.to(dev)
    enc = {s: data.tokenize(tok, sp, args.max_len) for s, sp in splits.items()}
    labels = {s: sp.labels for s, sp in splits.items()}
    train_enc = enc.pop("train")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    mult = 16 if args.compile else 1
    fwd = torch.compile(model) if args.compile else model

    params = [p for p in model.parameters() if p.requires_grad]
    n_train, n_total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    opt = adamw(params, args.lr, dev)
    per_epoch = math.ceil(len(train_enc) / args.batch_size)
    total = min(args.epochs * per_epoch, args.max_steps or 1 << 62)
    warm = int(args.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / max(warm, 1) if s < warm else max(0.0, (total - s) / max(total - warm, 1)))
    cfg = {k: v for k, v in vars(args).items()} | {"method": method, "trainable_params": n_train,
                                                  "total_params": n_total, "device": str(dev)}
    meta = {"task": args.task, "model": args.model, "max_len": args.max_len, "pooling": args.pooling,
            "labels": task.labels, "method": method} | (extra_meta or {})
    sel = task.select_metric

    # resume or start
    state = None
    if ckpt_path.exists():
        try:
            state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as e:
            die(f"cannot read checkpoint {ckpt_path} ({type(e).__name__}); delete it or pass --overwrite")
    if state is not None:
        model.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["rng"])
        if dev.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"])
        phi0, hist, best, step = state["phi0"].numpy(), json.loads(state["history"]), state["best"], state["step"]
        print(f"{out}: resuming after epoch {hist[-1]['epoch']} (step {step})")
    else:
        ev = evaluate(fwd, enc, pad, args.eval_batch_size, mult)
        phi0 = ev["test"][1]
        hist = [{"epoch": 0, "loss": None} | epoch_record(args.task, ev, labels, phi0, model.head)]
        best, step = {"epoch": 0, "score": -math.inf}, 0
        print(f"{out}: {method} on {args.task}, {len(train_enc)} train examples, {per_epoch} steps/epoch, "
              f"lr {args.lr}, batch {args.batch_size}, {n_train:,} of {n_total:,} params trainable, {dev}")
        print(f"  epoch 0 (init): val {hist[0]['val'][sel]:.4f} test {hist[0]['test'][sel]:.4f} "
              f"|V| {hist[0]['head_norm']:.3f}")

    # train
    peak = 0.0
    since_best = hist[-1]["epoch"] - best["epoch"] if best["epoch"] else 0
    for epoch in range(hist[-1]["epoch"] + 1, args.epochs + 1):
        if step >= total or (args.patience and since_best >= args.patience):
            break
        model.train()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        loss_sum, n_seen = torch.zeros((), device=dev), 0
        order = data.batches(train_enc, args.batch_size, shuffle=True, seed=args.seed * 1000 + epoch)
        bar = tqdm(order, desc=f"epoch {epoch}", leave=False)
        for i, idx in enumerate(bar):
            b = data.to_device(data.collate(train_enc, idx, pad, mult), dev)
            y = torch.as_tensor(splits["train"].labels[idx]).to(dev, non_blocking=True)
            loss = train_step(fwd, opt, sched, params, b, y)
            loss_sum += loss.detach() * len(idx)
            n_seen += len(idx)
            step += 1
            if (i + 1) % 50 == 0 or step >= total or i + 1 == len(order):
                avg = (loss_sum / n_seen).item()  # one host sync per 50 steps
                if not math.isfinite(avg):
                    msg = f"loss became {avg} at epoch {epoch}, step {step}"
                    save_json(res_path, {"config": cfg, "history": hist, "finished": False, "failed": msg})
                    die(f"{msg} (lr {args.lr} too high?); the last good checkpoint in {out} is kept — "
                        f"lower --lr and rerun with --overwrite")
                bar.set_postfix(loss=f"{avg:.4f}")
            if step >= total:
                break
        if dev.type == "cuda":  # the peak of the training steps, not of evaluation
            peak = max(peak, torch.cuda.max_memory_allocated() / 2**30)
        ev = evaluate(fwd, enc, pad, args.eval_batch_size, mult)
        rec = {"epoch": epoch, "loss": avg, "seconds": round(time.time() - t0, 2)}
        rec |= epoch_record(args.task, ev, labels, phi0, model.head)
        hist.append(rec)
        if rec["val"][sel] > best["score"]:
            best, since_best = {"epoch": epoch, "score": rec["val"][sel]}, 0
            save_weights(out, model, meta)
            save_npz(out / "logits.npz", **{f"{s}_{k}": v for s, (lg, _) in ev.items()
                                           for k, v in (("logits", lg), ("labels", labels[s]))})
        else:
            since_best += 1
        print(f"  epoch {epoch}: loss {avg:.4f} val {rec['val'][sel]:.4f} test {rec['test'][sel]:.4f} "
              f"|V| {rec['head_norm']:.3f} Diff(F) {rec['diff_f']:.4f} ({rec['seconds']:.0f}s)")
        save_torch(ckpt_path, {"model": trainable_state(model), "opt": opt.state_dict(),
                               "sched": sched.state_dict(), "rng": torch.get_rng_state(),
                               **({"cuda_rng": torch.cuda.get_rng_state()} if dev.type == "cuda" else {}),
                               "phi0": torch.from_numpy(phi0), "history": json.dumps(hist), "best": best,
                               "step": step})

    be = next(h for h in hist if h["epoch"] == best["epoch"])
    res = {"config": cfg, "history": hist, "best_epoch": best["epoch"], "finished": True,
           "metrics": {s: be[s] for s in enc}, "head_norm": be["head_norm"], "diff_f": be["diff_f"]}
    if dev.type == "cuda":
        res["peak_train_memory_gb"] = peak
    save_json(res_path, res)
    ckpt_path.unlink(missing_ok=True)
    print_summary(res, sel)
    return res


def print_summary(res, sel):
    print(f"{res['config']['method']} {res['config']['task']} seed {res['config']['seed']}: "
          f"best epoch {res['best_epoch']}")
    print(f"  {'split':<10}{sel:>10}")
    for s, m in res["metrics"].items():
        print(f"  {s:<10}{m[sel]:>10.4f}")


def main(argv=None):
    args = make_parser().parse_args(argv)
    return run(args, "lp_ft" if args.init else "ft")


if __name__ == "__main__":
    main()
