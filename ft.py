"""Fine-tuning (FT, from a fresh head), LP-FT (from the linear-probing head) and EH-FT (from a LoRA / BitFit run's).

    python ft.py --task rte                            # FT
    python lp.py --task rte && python ft.py --init lp_head.pt   # LP-FT
    python lora.py --task rte && python ft.py --init runs/rte/lora-seed1001   # LoRA-FT (EH-FT, Yang et al. 2022)

Holds the kit's model (encoder + one linear head on phi(x)) and its one training loop; lora.py
and ntk.py import them. --prompt (a masked LM, e.g. --model roberta-base) is prompt-based fine-tuning: the task's
template with a mask token, phi(x) at the mask, the head from the label words (prompts.PromptEncoder, build_model).
Outputs go to runs/<task>/<method>-seed<seed>/ (prompt_<method> with --prompt): run.json (what determines the
result, written first), results.json, logits.npz, features.npz (the test features phi(x) at the start and at the
best epoch, the head's rows at the start: report.py's t-SNE), model.safetensors + meta.json, and ckpt.pt (resume
state, removed when done).
A directory is skipped or resumed only when its run.json equals this run's.
ft.py needs data.py, rundir.py, prompts.py and heads.py.
"""

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import heads
import prompts
import rundir
from rundir import die

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
# EH-FT (Yang et al. 2022: LoRA-FT, BitFit-FT) has no Table 6 row; its stage 2 is full fine-tuning: FT's row
for _row in TABLE6.values():
    _row["lora_ft"] = _row["bitfit_ft"] = _row["ft"]

# The embedded all-MiniLM-L6-v2 is not roberta-base: its learning rates are the kit's own, chosen on val by
# `bash run_all.sh --lr_grid...` at the default study's sizes (seed 1001; Table 6's batch sizes), each inside the
# values tried (docs/results.md, "Learning rates for the embedded model", has the command and val at every point).
MINILM_LR = {  # EH-FT's second stage (lora_ft, bitfit_ft) from its own grid: docs/results.md
    "cb": {"ft": 1e-4, "lp_ft": 3e-5, "lora_ft": 3e-5, "bitfit_ft": 1e-4},
    "sst2": {"ft": 1e-4, "lp_ft": 3e-5, "lora_ft": 3e-5, "bitfit_ft": 1e-4},
}

# the run directory: what its record leaves out, the files a run writes, what a checkpoint holds
NOT_RECORDED = ("output_dir", "overwrite", "merge_to", "data_dir", "init", "wait")  # where and how, never what
RESULT_FILES = ("results.json", "logits.npz", "features.npz", "model.safetensors", "meta.json", "ckpt.pt")
CKPT_KEYS = {"model", "opt", "sched", "rng", "phi0", "history", "best", "step"}


# ---------------------------------------------------------------- flags
def common_flags(p):
    """The flags every script that can start from an LP head shares (ft.py, lora.py, ntk.py)."""
    a = p.add_argument
    a("--task", help=f"one of {', '.join(data.TASKS)} (default: the --init head's task)")
    a("--model", help="hub name or directory (default: the head's model, else the embedded all-MiniLM-L6-v2)")
    a("--data_dir", help="folder with the official files (default: $LPFT_DATA, else ./data)")
    a("--max_len", type=int, help=f"max tokens (default: the head's, else {data.MAX_LEN})")
    a("--pooling", choices=["cls", "mean"], help=f"phi(x) (default: the head's, else {data.POOLING})")
    data.k_shot_flags(a)
    return a


def prompt_flag(a):
    """--prompt: unset (None, as in run records made before it existed) or True."""
    a("--prompt", action="store_true", default=None,
      help="prompt-based fine-tuning (Malladi et al.): the task's template with a mask token (prompts.PROMPTS), phi(x) "
           "= the masked-LM head's transform at the mask, the head from the decoder's label-word rows; needs a "
           "*ForMaskedLM model (default: the --init head's setting)")


def make_parser(description=__doc__):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = common_flags(p)
    a("--seed", type=int, default=data.SEED)
    a("--output_dir", help="default runs/<task>/[prompt_]<method>[-k<K>-data<S>]-seed<seed>")
    a("--overwrite", action="store_true", help="start afresh, replacing this directory's results and checkpoint")
    a("--wait", action="store_true", help="another process writing --output_dir: wait for it (then skip the run if "
      "it finished) instead of stopping (run_all.sh's printed jobs that start with EH-FT's source run)")
    a("--init", help="lp_head.pt from lp.py: start from the LP head (LP-FT, LP-LoRA) instead of a fresh one; or a "
      "finished lora.py run directory (LoRA, BitFit): its head on the pre-trained backbone (EH-FT: lora_ft, bitfit_ft)")
    a("--lr", type=float, help="default: from --lr_table for the task and method")
    a("--lr_table", choices=["minilm", "table6"],
      help="where the default --lr comes from: minilm (the kit's grid on validation for the embedded model; its "
           "default where it has the task) or table6 (the paper's Table 6, for roberta-base; default otherwise)")
    a("--batch_size", type=int, help="default: paper Table 6 for the task and method")
    a("--epochs", type=int, default=10)
    a("--max_steps", type=int, help="stop after this many optimizer steps")
    a("--max_train_samples", type=int, help="seeded random subset of the train split")
    a("--max_eval_samples", type=int, help="seeded random subset of val/test (and OOD) splits")
    a("--head_scale", type=float, default=1.0, help="multiply the initial head (norm-scaling experiment)")
    a("--warmup_ratio", type=float, default=0.0, help="share of the steps with a linear warm-up, in [0, 1)")
    a("--patience", type=int, default=0, help="stop after N epochs without a better val metric (0: off)")
    a("--eval_batch_size", type=int, default=64)
    a("--compile", action="store_true", help="torch.compile the model (pays on CUDA)")
    a("--batching", choices=data.BATCHINGS, default="length",
      help="training batches: random (a uniform permutation each epoch, the HF Trainer's and the authors'; --paper) "
           "or length (default: random buckets of at least four per epoch, each sorted by length: less padding)")
    data.precision_flag(a)
    prompt_flag(a)
    return p


def resolve(args, method, table, minilm):
    """Fill task/model/max_len/pooling from the head (only those not given), lr/batch from the tables; validate
    every flag, the head and the model's config (no weights loaded). -> the head or None."""
    rundir.check_positive(args, ["lr", "batch_size", "epochs", "max_steps", "max_train_samples", "max_eval_samples",
                                 "eval_batch_size", "head_scale", "patience"], allow_zero=["patience"])
    if not 0 <= args.warmup_ratio < 1:
        die(f"--warmup_ratio {args.warmup_ratio}: must be in [0, 1) (a share of the training steps)")
    data.check_k_shot(args)
    head = fill_from_head(args)
    if head is not None and not torch.isfinite(head["weight"] * args.head_scale).all():
        die(f"--head_scale {args.head_scale} makes the head {args.init} overflow; pass a smaller one")
    args.batch_size = table[args.task][method][0] if args.batch_size is None else args.batch_size
    if args.lr is None:
        args.lr_table, args.lr = default_lr(args, method, table, minilm)
    else:
        args.lr_table = None  # the user's --lr: no table
    args.output_dir = args.output_dir or f"runs/{args.task}/{rundir.run_name(run_method(method, args), args)}"
    args.precision = data.resolve_precision(args.precision)  # recorded as resolved: bf16 on CUDA, fp32 on a CPU
    return head


def fill_from_head(args):
    """--init's head (or None) -> task, model, max_len and pooling the user did not give come from it, the rest from
    the kit's defaults; then the head is checked against them and --max_len against the model's config (no weights
    loaded). Shared by ft.py, lora.py and ntk.py."""
    head = heads.load_head(args.init) if args.init else None
    if head is not None:
        args.task = args.task or head["task"]
        args.model = args.model or head["model"]
        args.max_len = head.get("max_len") if args.max_len is None else args.max_len
        args.pooling = args.pooling or head.get("pooling")
        if hasattr(args, "prompt") and args.prompt is None and head.get("prompt"):
            args.prompt = True  # a head of prompt features: the run prompts too (a mismatch stops in check_head)
    if not args.task:
        die("no task: pass --task (e.g. --task rte) or --init lp_head.pt")
    data.get_task(args.task)
    args.max_len = data.MAX_LEN if args.max_len is None else args.max_len
    args.pooling = args.pooling or data.POOLING
    args.model = data.model_id(args.model)
    data.check_max_len(args.model, args.max_len)
    prompt = getattr(args, "prompt", None)
    if prompt:
        prompts.check_prompt(args.model, args.task, args.max_len, args.pooling)
    if head is not None:
        width = data.model_config(args.model).hidden_size
        heads.check_head(head, args.init, args.task, args.model, width, args.max_len, args.pooling, prompt)
        if "record" in head:
            heads.check_source(head, args)
    return head


def default_lr(args, method, table, minilm):
    """-> (table name, lr) when --lr is not given: the kit's grid choice for the embedded model where it has one
    (--lr_table minilm), else the paper's Table 6 (--lr_table table6; always for other models)."""
    have = args.task in minilm and minilm[args.task].get(method) is not None
    name = args.lr_table or ("minilm" if args.model == data.EMBEDDED and have else "table6")
    if name == "minilm" and not have:
        die(f"--lr_table minilm has no {method} learning rate for {args.task} (it has "
            f"{', '.join(sorted(minilm))}); pass --lr or --lr_table table6")
    if name == "table6" and args.model == data.EMBEDDED and args.lr_table is None:
        print(f"note: no MiniLM learning rate for {method} on {args.task}: using roberta-base's Table 6 value; "
              f"choose one with bash run_all.sh --lr_grid")
    return name, minilm[args.task][method] if name == "minilm" else table[args.task][method][1]


def run_method(method, args):
    """The method a run records and is named by: prompt_<method> with --prompt, so neither its directory nor the
    reports mix it with classifier-head runs (the learning-rate tables stay keyed by the plain method)."""
    return f"prompt_{method}" if getattr(args, "prompt", None) else method


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


def build_model(model_name, num_labels, pooling=data.POOLING, seed=0, prompt_task=None):
    """-> (Classifier with a fresh normal(0, 0.02) head, tokenizer). With prompt_task (--prompt): the PromptEncoder,
    no dropout on phi (the MLM head has none there) and the head set to the MLM decoder's rows of the task's label
    words, so the untrained model is the masked LM's own prediction among them."""
    if prompt_task is None:
        encoder, tok = data.load_encoder(model_name)
        torch.manual_seed(seed)
        return Classifier(encoder, num_labels, pooling), tok
    if pooling != "cls":
        die(f"--prompt takes phi(x) at the mask token; drop --pooling {pooling}")
    encoder, tok, W, b = prompts.load_prompt_encoder(model_name)
    ids = prompts.label_word_ids(tok, prompt_task, model_name)
    if len(ids) != num_labels:
        die(f"task {prompt_task} has {len(ids)} label words but the model is built for {num_labels} classes")
    torch.manual_seed(seed)
    model = Classifier(encoder, num_labels, "cls", dropout=0.0)
    with torch.no_grad():
        # copied, hence untied: V trains as the head, the word embeddings (tied to the decoder in the MLM) as
        # the encoder's input; both start where the MLM has them
        model.head.weight.copy_(W[ids])
        model.head.bias.copy_(b[ids])
    return model, tok


def init_head(model, head, args):
    """The head FT starts from: the LP head or the one build_model made (fresh, or with --prompt the label words'
    rows: kept as they are), times --head_scale. Used by ft.py, lora.py and ntk.py."""
    with torch.no_grad():
        if head is not None:  # checked by fill_from_head against the run's flags and the model's config
            model.head.weight.copy_(head["weight"])
            model.head.bias.copy_(head["bias"])
        model.head.weight.mul_(args.head_scale)
    if not torch.isfinite(model.head.weight).all() or not torch.isfinite(model.head.bias).all():
        die(f"the initial head has NaN or infinite values ({args.init or 'fresh head'}, --head_scale "
            f"{args.head_scale}); refit it with lp.py or pass a finite --head_scale")


# ---------------------------------------------------------------- the run directory: its record and the resume state
def fingerprint(args, method):
    """What determines a run's numbers: every flag but NOT_RECORDED, the method, the data files' content hashes
    (not their folder), the --init head's hash (not its path) and with --prompt the template and label words.
    JSON-normalised, so it equals its own run.json."""
    fp = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_RECORDED}
    fp |= {"method": method, "data_sha256": data.data_fingerprint(args.task, args.data_dir),
           "init_sha256": heads.init_sha256(args.init)}
    if args.init and Path(args.init).is_dir():  # EH-FT: the source run by name (its content: init_sha256)
        fp["init_run"] = Path(args.init).resolve().name
    if getattr(args, "prompt", None):
        fp["prompt_template"] = prompts.prompt_record(args.task)
    return json.loads(json.dumps(fp))


def open_run_dir(out, fp, overwrite):
    """Under the run's lock: -> (this configuration's finished results or None, the resume state or None).
    Refuses a directory holding results of another configuration or of an unrecorded one; records fp first."""
    lp_files = [f for f in ("lp_results.json", "lp_head.pt") if (out / f).exists()]
    if lp_files:
        die(f"{out} holds lp.py's {', '.join(lp_files)}; give this run its own --output_dir")
    if overwrite:  # only now, after every check: the files this run rewrites
        for f in (*RESULT_FILES, "run.json", "calibration.json", *(p.name for p in out.glob("reliability_*.png"))):
            (out / f).unlink(missing_ok=True)  # calibration too: it described the logits being replaced
    held = [f for f in RESULT_FILES if (out / f).exists()]
    saved = rundir.read_json(out / "run.json", "run record")
    if held and saved is None:
        die(f"{out} holds {', '.join(held)} but no run.json recording their configuration (an older kit or "
            f"another script made them); pass --overwrite to replace them, or another --output_dir")
    if held and rundir.config_diff(saved, fp):  # a flag added since reads as unset (None) in an older record
        die(f"{out} holds a run of another configuration ({rundir.describe_diff(saved, fp)}); pass --overwrite to "
            f"replace it, or another --output_dir")
    if saved != fp:
        rundir.save_json(out / "run.json", fp)
    res = rundir.read_json(out / "results.json", "results file")
    if res is not None and res.get("failed"):
        die(f"{out} failed earlier ({res['failed']}); change the flags and pass --overwrite to retry")
    if res is not None and res.get("finished"):
        ok = isinstance(res.get("metrics"), dict) and isinstance(res["metrics"].get("test"), dict) and \
            isinstance(res.get("config"), dict) and "best_epoch" in res
        if not ok:
            die(f"{out / 'results.json'} says finished but lacks its config, best epoch or test metrics (damaged); "
                f"pass --overwrite to redo the run")
        return res, None
    return None, load_checkpoint(out / "ckpt.pt")


def load_checkpoint(path):
    if not path.exists():
        return None
    state = rundir.load_torch(path, "checkpoint", "delete it or pass --overwrite")
    missing = CKPT_KEYS - set(state) if isinstance(state, dict) else CKPT_KEYS
    if missing:
        die(f"checkpoint {path} lacks {sorted(missing)}; delete it or pass --overwrite")
    return state


# ---------------------------------------------------------------- the loop
@dataclass
class Setup:
    """Everything the loop uses that does not change during training."""
    out: Path
    task: str
    model: nn.Module
    fwd: nn.Module  # the model, or its torch.compile wrapper
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    params: list
    train_tokens: list
    train_labels: np.ndarray
    tokens: dict  # evaluation splits
    labels: dict
    pad: int
    mult: int
    total: int  # optimizer steps in all
    cfg: dict  # results.json's config
    meta: dict  # meta.json
    sel: str  # the val metric that picks the best epoch
    dev: torch.device


def build(args, method, head, splits, fp, setup=None, extra_meta=None):
    """Model (with its initial head and `setup`'s changes, e.g. LoRA), optimizer, schedule, tokenised splits."""
    task, dev = data.get_task(args.task), data.device()
    data.set_matmul_precision(args.precision)
    torch.manual_seed(args.seed)
    prompt_task = args.task if args.prompt else None
    model, tok = build_model(args.model, len(task.labels), args.pooling, args.seed, prompt_task)
    init_head(model, head, args)
    if setup is not None:
        setup(model)
    model.to(dev)
    tokens = {s: prompts.tokenize(tok, sp, args.max_len, prompt_task) for s, sp in splits.items()}
    train_tokens = tokens.pop("train")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, args.lr, dev)
    total = min(args.epochs * math.ceil(len(train_tokens) / args.batch_size), args.max_steps or 1 << 62)
    warm = int(args.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / max(warm, 1) if s < warm else max(0.0, (total - s) / max(total - warm, 1)))
    counts = {"trainable_params": sum(p.numel() for p in params),
              "total_params": sum(p.numel() for p in model.parameters()), "device": str(dev),
              "threads": torch.get_num_threads()}  # CPU numbers are exact for a given thread count
    meta = {"task": args.task, "model": args.model, "max_len": args.max_len, "pooling": args.pooling,
            "labels": task.labels, "method": method, "prompt": bool(args.prompt)} | (extra_meta or {})
    return Setup(out=Path(args.output_dir), task=args.task, model=model,
                 fwd=torch.compile(model) if args.compile else model, opt=opt, sched=sched, params=params,
                 train_tokens=train_tokens, train_labels=splits["train"].labels, tokens=tokens,
                 labels={s: sp.labels for s, sp in splits.items() if s != "train"},
                 pad=tok.pad_token_id if tok.pad_token_id is not None else 0, mult=16 if args.compile else 1,
                 total=total, cfg=vars(args) | fp | counts, meta=meta, sel=task.select_metric, dev=dev)


def adamw(params, lr, dev):
    """The kit's optimizer: AdamW without weight decay, fused on CPU too (its step is ~10x faster than foreach
    there: 0.03 s vs 0.3 s for 22.6M parameters)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=dev.type in ("cuda", "cpu"))


def start(s, args):
    """Epoch 0: the untrained model's record (recorded, never chosen as best). -> (history, best, step, phi0)"""
    ev = evaluate(s.fwd, s.tokens, s.pad, args.eval_batch_size, s.mult, args.precision)
    phi0 = {sp: phi for sp, (_, phi) in ev.items()}  # the pre-trained features of every evaluation split
    hist = [{"epoch": 0, "loss": None} | epoch_record(s.task, ev, s.labels, phi0, s.model.head)]
    c = s.cfg
    print(f"{s.out}: {c['method']} on {s.task}, {len(s.train_tokens)} train examples, {s.total} steps, "
          f"lr {args.lr}, batch {args.batch_size}, {c['trainable_params']:,} of {c['total_params']:,} params "
          f"trainable, {s.dev}")
    print(f"  epoch 0 (init): val {hist[0]['val'][s.sel]:.4f} test {hist[0]['test'][s.sel]:.4f} "
          f"|V| {hist[0]['head_norm']:.3f}")
    return hist, {"epoch": 0, "score": -math.inf}, 0, phi0


def resume(s, state):
    """ckpt.pt -> the model, optimizer, schedule and RNG as they were after its epoch (bit for bit)."""
    try:
        s.model.load_state_dict(state["model"], strict=False)
        s.opt.load_state_dict(state["opt"])
        s.sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["rng"])
        if s.dev.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"])
        if not isinstance(state["phi0"], dict) or set(state["phi0"]) != set(s.tokens):
            die(f"checkpoint {s.out / 'ckpt.pt'} holds the start's features of other splits (an older kit's "
                f"checkpoint?); pass --overwrite")
        hist, best, step = json.loads(state["history"]), state["best"], state["step"]
        phi0 = {sp: v.numpy() for sp, v in state["phi0"].items()}
        print(f"{s.out}: resuming after epoch {hist[-1]['epoch']} (step {step})")
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        die(f"checkpoint {s.out / 'ckpt.pt'} does not fit this model ({type(e).__name__}); pass --overwrite")
    return hist, best, step, phi0


def train_step(fwd, opt, sched, params, batch, y, precision=None):
    """One optimizer step: bf16 autocast on CUDA (precision "fp32": none), fp32 loss, clip 1.0. Returns the loss
    (no host sync)."""
    with data.autocast(y.device, precision):
        loss = F.cross_entropy(fwd(**batch).float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
    opt.step()
    sched.step()
    return loss


def evaluate(model, tokens, pad_id, bs, mult=1, precision=None):
    """-> {split: (logits [N,C], phi [N,d])} in eval mode."""
    model.eval()

    def logits_and_phi(batch):
        phi = model.features(**batch)
        return model.head(phi), phi

    return {s: data.extract(logits_and_phi, e, pad_id, bs, multiple_of=mult, precision=precision)
            for s, e in tokens.items()}


def epoch_record(task, ev, labels, phi0, head):
    """Metrics on every evaluation split, the head's norm, and the feature statistics on every evaluation split
    (val, test, the OOD sets: Table 11) against the pre-trained features phi0[split]; the test split's also at the
    top level, as Tables 1 and 12 read them."""
    rec = {s: data.metrics(task, lg, labels[s]) for s, (lg, _) in ev.items()}
    rec["head_norm"] = float(head.weight.detach().float().norm())
    rec["features"] = {s: feature_stats(phi, phi0[s], labels[s]) for s, (_, phi) in ev.items()}
    rec.update(rec["features"]["test"])
    return rec


def feature_stats(phi, phi0, labels):
    """The feature statistics of paper Tables 1 and 12. Diff(F): mean ||phi_t(x) - phi_0(x)||; CS(F): mean cosine
    similarity over pairs of different examples; FDR both ways (fdr): fdr_f = tr(S_B) / tr(S_W) (the kit's),
    fdr_f_pinv = tr(S_W^+ S_B) (the magnitudes the paper reports, docs/conventions.md)."""
    phi, phi0 = np.asarray(phi, np.float64), np.asarray(phi0, np.float64)
    n = len(phi)
    z = phi / np.linalg.norm(phi, axis=1, keepdims=True).clip(1e-12)
    cs = (np.square(z.sum(0)).sum() - n) / max(n * (n - 1), 1)
    ratio, pinv = fdr(phi, labels)
    return {"diff_f": float(np.linalg.norm(phi - phi0, axis=1).mean()), "cs_f": float(cs), "fdr_f": ratio,
            "fdr_f_pinv": pinv}


def fdr(phi, labels):
    """Fisher's discriminant ratio of features phi [N,d] (float64) -> (tr(S_B) / tr(S_W), tr(S_W^+ S_B)), with
    S_W = X_W^T X_W (X_W: each row minus its class mean) and S_B = X_B^T X_B (X_B: sqrt(n_c) (mu_c - mu), one row
    per class). S_W^+ comes from the SVD of X_W, not from S_W: with N < d, S_W has rank N - C and its null space
    is rounding noise, which a pseudo-inverse keeping it blows up (in float32, 1e5 to 3e8 on CB's features:
    docs/conventions.md). Singular values below max(N, d) x eps x the largest count as zero (numpy's matrix_rank)."""
    classes, idx, counts = np.unique(labels, return_inverse=True, return_counts=True)
    means = np.stack([phi[idx == k].mean(0) for k in range(len(classes))])
    xw = phi - means[idx]
    xb = np.sqrt(counts)[:, None] * (means - phi.mean(0))
    sw = np.square(xw).sum()
    _, s, vt = np.linalg.svd(xw, full_matrices=False)
    keep = s > (s[0] if s.size else 0.0) * max(xw.shape) * np.finfo(np.float64).eps
    proj = (xb @ vt[keep].T) / s[keep]  # X_B V S^-1: its squared norm is tr(S_W^+ S_B)
    return float(np.square(xb).sum() / max(sw, 1e-12)), float(np.square(proj).sum())


def train(args, s, state):
    """The loop: epochs of shuffled length-grouped batches; after each an evaluation and (but the last) a resume
    checkpoint; after the first the estimated total time."""
    head0 = s.model.head.weight.detach().float().cpu().numpy().copy()  # the start's rows (build's; resume loads later)
    hist, best, step, phi0 = resume(s, state) if state else start(s, args)
    since_best = hist[-1]["epoch"] - best["epoch"] if best["epoch"] else 0
    peak, first = 0.0, hist[-1]["epoch"] + 1
    for epoch in range(first, args.epochs + 1):
        if step >= s.total or (args.patience and since_best >= args.patience):
            break
        s.model.train()
        if s.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        loss_sum, n_seen = torch.zeros((), device=s.dev), 0
        order = data.batches(s.train_tokens, args.batch_size, True, args.seed * 1000 + epoch, args.batching)
        bar = tqdm(order, desc=f"epoch {epoch}", leave=False)
        for i, idx in enumerate(bar):
            b = data.to_device(data.collate(s.train_tokens, idx, s.pad, s.mult), s.dev)
            y = torch.as_tensor(s.train_labels[idx]).to(s.dev, non_blocking=True)
            loss_sum += train_step(s.fwd, s.opt, s.sched, s.params, b, y, args.precision).detach() * len(idx)
            n_seen += len(idx)
            step += 1
            if (i + 1) % 50 == 0 or step >= s.total or i + 1 == len(order):
                avg = (loss_sum / n_seen).item()  # one host sync per 50 steps
                if not math.isfinite(avg):
                    diverged(s, hist, f"loss became {avg} at epoch {epoch}, step {step}")
                bar.set_postfix(loss=f"{avg:.4f}")
            if step >= s.total:
                break
        if s.dev.type == "cuda":  # the peak of the training steps, not of evaluation
            peak = max(peak, torch.cuda.max_memory_allocated() / 2**30)
        ev = evaluate(s.fwd, s.tokens, s.pad, args.eval_batch_size, s.mult, args.precision)
        rec = {"epoch": epoch, "loss": avg, "seconds": round(time.time() - t0, 2)}
        hist.append(rec | epoch_record(s.task, ev, s.labels, phi0, s.model.head))
        if hist[-1]["val"][s.sel] > best["score"]:
            best, since_best = {"epoch": epoch, "score": hist[-1]["val"][s.sel]}, 0
            save_best(s, ev, phi0, head0)
        else:
            since_best += 1
        r = hist[-1]
        print(f"  epoch {epoch}: loss {avg:.4f} val {r['val'][s.sel]:.4f} test {r['test'][s.sel]:.4f} "
              f"|V| {r['head_norm']:.3f} Diff(F) {r['diff_f']:.4f} ({r['seconds']:.0f}s)")
        if epoch == first:
            print(estimate(s, args, r["seconds"], epoch))
        if step < s.total and epoch < args.epochs:  # after the last epoch the run finishes: no resume state
            save_checkpoint(s, hist, best, step, phi0)
    return finish(s, hist, best, peak)


def estimate(s, args, seconds, epoch):
    """After this process's first epoch: the whole run's time at that epoch's pace, and what is left of it."""
    fmt_time = lambda sec: f"{sec / 60:.1f} min" if sec >= 90 else f"{sec:.0f} s"
    epochs = min(args.epochs, math.ceil(s.total / math.ceil(len(s.train_tokens) / args.batch_size)))
    return (f"  estimated total: {fmt_time(seconds * epochs)} for {epochs} epochs of {seconds:.0f} s "
            f"(with evaluation), {fmt_time(seconds * (epochs - epoch))} left")


# ---------------------------------------------------------------- the end of the run
def save_best(s, ev, phi0, head0):
    save_weights(s.out, s.model, s.meta)
    rundir.save_npz(s.out / "logits.npz", **{f"{sp}_{k}": v for sp, (lg, _) in ev.items()
                                             for k, v in (("logits", lg), ("labels", s.labels[sp]))})
    # the test features before and after and the head's rows at the start (report.py's t-SNE, Figures 5-6, draws
    # them with the rows after training): test only, the OOD sets can be large
    rundir.save_npz(s.out / "features.npz", test_phi=ev["test"][1], test_phi0=phi0["test"],
                    test_labels=s.labels["test"], head0=head0)


def save_weights(out, model, meta):
    from safetensors.torch import save_file

    rundir.atomic(Path(out) / "model.safetensors", lambda t: save_file(trainable_state(model), str(t)))
    rundir.save_json(Path(out) / "meta.json", meta)


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


def trainable_state(model):
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(s, hist, best, step, phi0):
    cuda = {"cuda_rng": torch.cuda.get_rng_state()} if s.dev.type == "cuda" else {}
    rundir.save_torch(s.out / "ckpt.pt", {"model": trainable_state(s.model), "opt": s.opt.state_dict(),
                                          "sched": s.sched.state_dict(), "rng": torch.get_rng_state(), **cuda,
                                          "phi0": {sp: torch.from_numpy(v) for sp, v in phi0.items()},
                                          "history": json.dumps(hist), "best": best, "step": step})


def diverged(s, hist, msg):
    """A non-finite loss: results.json records the run as failed; the message says what the directory keeps."""
    rundir.save_json(s.out / "results.json", {"config": s.cfg, "history": hist, "finished": False, "failed": msg})
    kept = (f"the checkpoint after epoch {hist[-1]['epoch']} is kept in {s.out}" if (s.out / "ckpt.pt").exists()
            else "no checkpoint was written")
    die(f"{msg} (lr {s.cfg['lr']} too high?); {kept}; lower --lr and rerun with --overwrite")


def finish(s, hist, best, peak):
    be = next(h for h in hist if h["epoch"] == best["epoch"])
    res = {"config": s.cfg, "history": hist, "best_epoch": best["epoch"], "finished": True,
           "metrics": {sp: be[sp] for sp in s.tokens}, "head_norm": be["head_norm"], "diff_f": be["diff_f"],
           "features": be["features"]}
    if s.dev.type == "cuda":
        res["peak_train_memory_gb"] = peak
    rundir.save_json(s.out / "results.json", res)
    (s.out / "ckpt.pt").unlink(missing_ok=True)
    c = res["config"]
    print(f"{c['method']} {c['task']} seed {c['seed']}: best epoch {res['best_epoch']}\n  {'split':<10}{s.sel:>10}")
    print("\n".join(f"  {sp:<10}{m[s.sel]:>10.4f}" for sp, m in res["metrics"].items()))
    return res


# ---------------------------------------------------------------- main
def run(args, method, table=TABLE6, minilm=MINILM_LR, setup=None, extra_meta=None, check=None):
    """The kit's one training loop (FT, LP-FT; LoRA and LP-LoRA through `setup`, which changes the built model,
    and `check`, which validates their own flags). Every flag, the head, the data and the output directory are
    checked before the model is built or any file is touched; one process at a time writes the directory."""
    head = resolve(args, method, table, minilm)
    if check is not None:
        check(args)
    splits = data.load_splits(args)
    method = run_method(method, args)
    fp = fingerprint(args, method)
    out = rundir.check_output_dir(Path(args.output_dir))
    with rundir.RunLock(out, wait=args.wait):
        res, state = open_run_dir(out, fp, args.overwrite)
        if res is not None:
            print(f"{out}: already finished (best epoch {res['best_epoch']}, test {res['metrics']['test']}); "
                  f"--overwrite to redo")
            return res
        return train(args, build(args, method, head, splits, fp, setup, extra_meta), state)


@rundir.cli
def main(argv=None):
    args = make_parser().parse_args(argv)
    kind = heads.init_kind(args.init)
    return run(args, f"{kind}_ft" if kind else "ft")


if __name__ == "__main__":
    main()
