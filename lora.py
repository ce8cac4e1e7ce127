"""LoRA (from a fresh head) and LP-LoRA (from the linear-probing head), with a hand-written LoRA layer.

    python lora.py --task rte                                   # LoRA
    python lp.py --task rte && python lora.py --init lp_head.pt --merge_to runs/rte/merged   # LP-LoRA

--bitfit: BitFit (Ben Zaken et al. 2022) instead: every bias term of the encoder and the head train, nothing else
(runs bitfit / lp_bitfit; model.safetensors holds those tensors). A finished LoRA or BitFit run is EH-FT's first
stage: python ft.py --init runs/<task>/lora-seed<seed> fine-tunes from its head (Yang et al. 2022).

LoRA (Hu et al. 2021) in the spirit of microsoft/LoRA's loralib `Linear`: each attention block's
query and value projections W0 become W0 x + (B A x) * alpha/r with A [r,in] kaiming-uniform, B [out,r]
zero, so training starts exactly at the pretrained function; only A, B and the classification head
train. Training is ft.py's one loop (ft.run), so the outputs are the same: runs/<task>/<method>-seed<seed>/
results.json, logits.npz, features.npz, model.safetensors (LoRA + head tensors only) + meta.json (with the LoRA config);
results.json records trainable_params / total_params and, on CUDA, peak_train_memory_gb (training steps only).

Unlike loralib, model.eval() never merges: merge() / unmerge() are explicit, so gradients through the
LoRA path (ntk.py's kernels) never vanish. load_adapter(run_dir) rebuilds a trained model. --prompt works as in
ft.py (runs named prompt_lora / prompt_lp_lora), but not with --merge_to; --prompt_params chooses what trains beside
A and B: kit (default) the head, the MLM head's transform frozen; authors the transform (dense, LayerNorm) too, as
Malladi et al.'s code (docs/kernel_view.md).

--merge_to DIR exports a plain model that loads without this kit:
    DIR/config.json, model.safetensors, tokenizer files  the encoder with B A * alpha/r merged into W0
                                                        (transformers.AutoModel.from_pretrained(DIR))
    DIR/head.safetensors                                `weight` [C,d], `bias` [C]; its metadata holds
                                                        task, labels (JSON), pooling, max_len
    logits = last_hidden_state[:, 0] @ weight.T + bias  (pooling cls; mean: the mean over real tokens)
DIR is written whole under a temporary name beside it and then swapped in (rundir.atomic), so a crash leaves the
earlier export or none, and the next export removes a killed one's leftovers.
lora.py needs ft.py (and what ft.py needs: data.py, rundir.py, prompts.py, heads.py).
"""

import json
import math
from pathlib import Path

import torch
import torch.nn as nn

import ft
import prompts
import rundir
from rundir import die

# Paper Table 6 (LoRA / LP-LoRA rows, r = alpha = 8): task -> method -> (batch size, learning rate)
TABLE6 = {
    "cb": {"lora": (16, 1e-3), "lp_lora": (8, 1e-4)},
    "rte": {"lora": (16, 1e-3), "lp_lora": (8, 5e-4)},
    "boolq": {"lora": (32, 5e-4), "lp_lora": (8, 5e-4)},
    "wic": {"lora": (16, 1e-3), "lp_lora": (8, 1e-3)},
    "wsc": {"lora": (16, 1e-4), "lp_lora": (8, 1e-4)},
    "cola": {"lora": (16, 1e-3), "lp_lora": (8, 1e-3)},
    "sst2": {"lora": (32, 5e-4), "lp_lora": (8, 1e-3)},
    "mrpc": {"lora": (32, 5e-4), "lp_lora": (8, 1e-3)},
    "amazon": {"lora": (16, 1e-3), "lp_lora": (8, 5e-4)},
    "pubmed": {"lora": (8, 5e-4), "lp_lora": (8, 1e-3)},
}
# BitFit (Ben Zaken et al. 2022) has no Table 6 row: it takes LoRA's, the other parameter-efficient method's
for _row in TABLE6.values():
    _row["bitfit"], _row["lp_bitfit"] = _row["lora"], _row["lp_lora"]

# The embedded all-MiniLM-L6-v2: the kit's grid choice on validation (ft.MINILM_LR says by which command).
MINILM_LR = {
    "cb": {"lora": 1e-2, "lp_lora": 3e-3, "bitfit": 1e-2},
    "sst2": {"lora": 3e-3, "lp_lora": 3e-3, "bitfit": 3e-3},
}


# --merge_to's layout is a plain encoder + a head on its last hidden state: a --prompt model's phi (the MLM head's
# transform at the mask token of a template) does not fit it
NO_PROMPT_EXPORT = ("--merge_to exports a plain encoder and a head on its pooled output; a --prompt model's phi is the "
                    "MLM transform at the template's mask, which that layout cannot hold: drop --merge_to and load the "
                    "run with lora.load_adapter")


def lora_flags(a):
    """The LoRA flags lora.py and ntk.py share (the paper's r = alpha = 8 on query and value)."""
    a("--r", type=int, default=8, help="LoRA rank")
    a("--alpha", type=float, default=8, help="LoRA scaling is alpha / r")
    a("--targets", nargs="+", default=["query", "value"], help="attention.self.<name> linears to adapt")
    a("--prompt_params", choices=["kit", "authors"], help="with --prompt, what trains beside A and B: kit (the "
      "default) the head V, b, as every LoRA run of the kit; authors also the MLM head's transform (dense, "
      "LayerNorm), as Malladi et al.'s code, whose freeze leaves every parameter outside 'roberta.*' trainable")


def check_prompt_params(args):
    """--prompt_params, for lora.py and ntk.py: only with --prompt. 'kit' is recorded as unset, as in the runs made
    before the flag existed: they trained the same parameters, so a rerun reuses them."""
    if args.prompt_params and not getattr(args, "prompt", None):
        die(f"--prompt_params {args.prompt_params} chooses what prompt-based LoRA trains; add --prompt or drop it")
    if args.prompt_params == "kit":
        args.prompt_params = None


def trains_transform(args):
    return args.prompt_params == "authors"


def check_targets(targets):
    """--targets, for lora.py and ntk.py --lora: the attention.self linears LoRA can adapt."""
    if set(targets) - {"query", "key", "value"}:
        die(f"--targets {' '.join(targets)}: pick from query, key, value (the attention.self linears)")


def make_parser():
    p = ft.make_parser(__doc__)
    a = p.add_argument
    lora_flags(a)
    a("--lora_dropout", type=float, default=0.0, help="dropout on the LoRA path's input")
    a("--merge_to", help="also export a merged plain model (encoder via save_pretrained + head.safetensors)")
    a("--bitfit", action="store_true", help="BitFit instead of LoRA: train every bias term of the encoder and the "
      "head, nothing else (methods bitfit, lp_bitfit; the LoRA flags do not apply)")
    return p


def check_lora_args(args):
    """lora.py's own flags, before ft.run builds the model or touches a file: the LoRA config and --merge_to, a
    folder that is new or an earlier export (it is replaced whole, so it must not hold anything else)."""
    if args.bitfit:
        if args.prompt_params:
            die(f"--prompt_params {args.prompt_params} chooses what prompt-based LoRA trains; BitFit trains the biases "
                f"and the head: drop it")
        if args.merge_to:
            die("--merge_to exports a LoRA model merged into its encoder; a BitFit run's model.safetensors holds its "
                "biases and head: load it with ft.build_model + ft.load_weights, and drop --merge_to")
        args.r = args.alpha = args.lora_dropout = args.targets = None  # recorded as unused
        return
    rundir.check_positive(args, ["r", "alpha"])
    check_prompt_params(args)
    if not 0 <= args.lora_dropout < 1:
        die(f"--lora_dropout {args.lora_dropout}: must be in [0, 1)")
    check_targets(args.targets)
    if getattr(args, "merge_to", None) and getattr(args, "prompt", None):
        die(NO_PROMPT_EXPORT)
    if getattr(args, "merge_to", None):
        dest = rundir.check_output_dir(Path(args.merge_to), "--merge_to").resolve()
        run_dir = Path(args.output_dir).resolve()
        if dest == run_dir or dest in run_dir.parents:
            die(f"--merge_to {args.merge_to} holds the run directory {args.output_dir}; pass a folder of its own")
        if dest.is_dir() and any(dest.iterdir()) and not (dest / "head.safetensors").exists():
            die(f"--merge_to {args.merge_to} is a folder with other files (no head.safetensors of an earlier "
                f"export); pass a new folder")


# ---------------------------------------------------------------- the layer
class LoRALinear(nn.Module):
    """base(x) + dropout(x) @ A.T @ B.T * alpha/r around a frozen nn.Linear `base`."""

    def __init__(self, base, r=8, alpha=8, dropout=0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            die(f"LoRA wraps nn.Linear layers, not {type(base).__name__}")
        if r < 1 or alpha <= 0 or not 0 <= dropout < 1:
            die(f"LoRA needs r >= 1, alpha > 0 and 0 <= dropout < 1 (got r={r}, alpha={alpha}, dropout={dropout})")
        self.base, self.r, self.alpha, self.scaling = base, r, alpha, alpha / r
        for p in base.parameters():
            p.requires_grad_(False)
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and loralib
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._w0 = None  # W0, kept while merged so unmerge restores it exactly

    def delta(self):
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merge(self):
        """W0 -> W0 + B A * scaling (inference only: the LoRA path is then skipped); a no-op if merged."""
        if not self.merged:
            self._w0 = self.base.weight.detach().clone()
            self.base.weight.add_(self.delta().to(self.base.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Restore W0 bit for bit (copied, not subtracted, so cycles never drift); a no-op if unmerged."""
        if self.merged:
            self.base.weight.copy_(self._w0)
            self._w0, self.merged = None, False

    def forward(self, x):
        if self.merged:
            return self.base(x)
        return self.base(x) + (self.drop(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def inject_lora(model, targets=("query", "value"), r=8, alpha=8, dropout=0.0, transform=False):
    """Wrap every `...attention.self.<target>` linear in LoRALinear, freeze all but LoRA and `model.head` (with
    transform, --prompt_params authors: the prompt encoder's MLM transform too); -> the number of trainable
    parameters."""
    if lora_layers(model):
        die("this model already has LoRA layers; inject_lora once per model")
    found = {t: 0 for t in targets}
    for name, mod in list(model.named_modules()):
        parts = name.split(".")
        if len(parts) >= 3 and parts[-3:-1] == ["attention", "self"] and parts[-1] in found:
            if not isinstance(mod, nn.Linear):
                die(f"{name} is a {type(mod).__name__}, not nn.Linear; LoRA cannot wrap it")
            parent = model.get_submodule(".".join(parts[:-1]))
            setattr(parent, parts[-1], LoRALinear(mod, r, alpha, dropout))
            found[parts[-1]] += 1
    missing = [t for t, n in found.items() if n == 0]
    if missing:
        die(f"no attention.self.{missing[0]} linear in this model (BERT/RoBERTa naming); "
            f"pick --targets from query, key, value")
    for p in model.parameters():
        p.requires_grad_(False)
    for m in lora_layers(model):
        m.lora_A.requires_grad_(True)
        m.lora_B.requires_grad_(True)
    if hasattr(model, "head"):
        model.head.requires_grad_(True)
    if transform:
        train_transform(model)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_transform(model):
    """Malladi et al.'s prompt LoRA: their freeze (names starting 'roberta' without 'lora') leaves the MLM head's
    dense and LayerNorm trainable, with its decoder (the head's V, b here)."""
    enc = getattr(model, "encoder", None)
    if not isinstance(enc, prompts.PromptEncoder):
        die("--prompt_params authors trains the MLM head's transform of a --prompt model; this model has none")
    enc.dense.requires_grad_(True)
    enc.norm.requires_grad_(True)


def inject_bitfit(model):
    """BitFit (Ben Zaken et al. 2022): freeze all but every bias term and `model.head`; -> the trainable count."""
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith("bias") or n.startswith("head."))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge(model):
    for m in lora_layers(model):
        m.merge()


def unmerge(model):
    for m in lora_layers(model):
        m.unmerge()


def unwrap(model):
    """Merge and replace every LoRALinear by its plain nn.Linear (for export; not reversible)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoRALinear):
            mod.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, mod.base)
    return model


# ---------------------------------------------------------------- adapters on disk
def lora_config(args):
    """meta.json's LoRA: what load_adapter needs to rebuild the trained parameters; a --prompt run's prompt_params
    too (an older prompt run has none: the kit's)."""
    c = {"r": args.r, "alpha": args.alpha, "dropout": args.lora_dropout, "targets": list(args.targets)}
    if getattr(args, "prompt", None):
        c["prompt_params"] = "authors" if trains_transform(args) else "kit"
    return c


def load_adapter(run_dir, with_tokenizer=False):
    """A trained LoRA / LP-LoRA run dir -> its model (base rebuilt from meta.json, LoRA injected, adapter
    and head loaded; eval mode, unmerged); (model, tokenizer) with with_tokenizer=True."""
    run_dir = Path(run_dir)
    meta = rundir.read_json(run_dir / "meta.json", "meta.json")
    if meta is None:
        die(f"no {run_dir / 'meta.json'}; is {run_dir} a finished lora.py run?")
    if "lora" not in meta:
        die(f"{run_dir} holds no LoRA adapter (method {meta.get('method')}); load it with ft.py's tools")
    try:
        prompt_task = meta["task"] if meta.get("prompt") else None
        model, tok = ft.build_model(meta["model"], len(meta["labels"]), meta["pooling"], prompt_task=prompt_task)
        c = meta["lora"]
        inject_lora(model, c["targets"], c["r"], c["alpha"], c["dropout"], c.get("prompt_params") == "authors")
    except (KeyError, TypeError) as e:
        die(f"{run_dir / 'meta.json'} lacks or garbles field {e}; rerun lora.py with --overwrite")
    from safetensors import safe_open

    with safe_open(str(run_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    need = {n for n, p in model.named_parameters() if p.requires_grad}
    if need - keys:
        die(f"{run_dir}/model.safetensors lacks {sorted(need - keys)[:3]}...; wrong LoRA config in meta.json?")
    ft.load_weights(run_dir, model)
    model.eval()
    return (model, tok) if with_tokenizer else model


def export_merged(run_dir, dest):
    """Write a plain merged model to dest (see the module docstring for the layout)."""
    from safetensors.torch import save_file

    meta = rundir.read_json(Path(run_dir) / "meta.json", "meta.json")
    if meta is not None and meta.get("prompt"):
        die(NO_PROMPT_EXPORT)
    model, tok = load_adapter(run_dir, with_tokenizer=True)
    unwrap(model)
    dest = Path(dest)
    head = {"weight": model.head.weight.detach().contiguous(), "bias": model.head.bias.detach().contiguous()}
    info = {"task": meta["task"], "labels": json.dumps(meta["labels"]), "pooling": meta["pooling"],
            "max_len": str(meta["max_len"]), "model": meta["model"]}

    def write(tmp):  # a whole folder under the kit's temporary name, swapped in by rundir.atomic
        model.encoder.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        save_file(head, str(Path(tmp) / "head.safetensors"), metadata=info)

    if dest.parent.is_dir():  # the leftovers of an export killed mid-write (its temporary folders beside dest)
        rundir.clean_orphans(dest.parent, dest.name)
    rundir.atomic(dest, write)
    print(f"wrote merged model to {dest} (AutoModel.from_pretrained + head.safetensors)")


# ---------------------------------------------------------------- main
@rundir.cli
def main(argv=None):
    args = make_parser().parse_args(argv)
    if args.init and Path(args.init).is_dir():
        die(f"--init {args.init} is a run directory: EH-FT starts from its head in ft.py (python ft.py --init "
            f"{args.init}); lora.py starts from an lp_head.pt")

    def add_lora(model):  # ft.run's setup hook: after the initial head, before the move to the device
        inject_lora(model, args.targets, args.r, args.alpha, args.lora_dropout, trains_transform(args))

    method = ("lp_" if args.init else "") + ("bitfit" if args.bitfit else "lora")
    res = ft.run(args, method, TABLE6, MINILM_LR, setup=inject_bitfit if args.bitfit else add_lora,
                 extra_meta=None if args.bitfit else {"lora": lora_config(args)}, check=check_lora_args)
    if args.merge_to:
        with rundir.RunLock(args.output_dir):  # no --overwrite of this run may delete what is being exported
            export_merged(args.output_dir, args.merge_to)
    return res


if __name__ == "__main__":
    main()
