"""The head a run starts from (--init): an lp_head.pt from lp.py, or the head of a finished lora.py run (EH-FT's
stage 1, LoRA or BitFit), read safely and checked against the run that starts from it.

    python -c "import heads; h = heads.load_head('lp_head.pt'); print(h['task'], tuple(h['weight'].shape))"
    python -c "import heads; print(heads.init_kind('runs/cb/lora-seed1001'))"

ft.py, lora.py and ntk.py start from these heads; heads.py needs data.py and rundir.py.
"""

import json
from pathlib import Path

import torch

import data
import rundir
from rundir import die

# EH-FT's stage 1: the lora.py runs --init takes the head of, and what their run.json must share with this run's
SOURCES = ("lora", "bitfit")
SOURCE_RECORD = ("max_train_samples", "seed", "k_shot", "data_seed")  # and data_sha256


def load_head(path):
    """An lp_head.pt, loaded safely (tensors and plain values only), checked for its fields and values; a directory:
    the head of a finished lora.py run (head_from_run)."""
    if Path(path).is_dir():
        return head_from_run(path)
    if not Path(path).is_file():
        die(f"head file {path} not found; make it with: python lp.py --task <task>")
    h = rundir.load_torch(path, "head file", "it is corrupt or not an lp_head.pt — rerun lp.py")
    return checked_head(h, f"head file {path}", "rerun lp.py")


def checked_head(h, what, fix):
    """A head's fields: float, finite weight [C,d] and bias [C] for its list of C labels."""
    need = {"weight", "bias", "task", "model", "labels"}
    if not isinstance(h, dict) or not need <= set(h):
        die(f"{what} lacks {sorted(need - set(h) if isinstance(h, dict) else need)}; {fix}")
    w, b = h["weight"], h["bias"]
    for name, t in (("weight", w), ("bias", b)):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            die(f"{what}: its {name} is a {type(t).__name__}, not a float tensor; {fix}")
        if not torch.isfinite(t).all():
            die(f"{what}: its {name} has NaN or infinite values; {fix}")
    if not isinstance(h["labels"], (list, tuple)):
        die(f"{what}: its labels are a {type(h['labels']).__name__}, not a list; {fix}")
    if w.ndim != 2 or b.shape != (w.shape[0],) or w.shape[0] != len(h["labels"]):
        die(f"{what}: weight {tuple(w.shape)} / bias {tuple(b.shape)} do not match its {len(h['labels'])} labels; "
            f"{fix}")
    return h


def head_from_run(path):
    """EH-FT's stage 1 (Yang et al. 2022): a finished LoRA or BitFit run directory -> its head (model.safetensors'
    head.weight, head.bias; meta.json's fields) as load_head's, with its method and run record. The rest (LoRA deltas,
    biases) is dropped: stage 2 starts from the pre-trained backbone. Read from files (lora.py is not imported)."""
    from safetensors import safe_open

    d = Path(path)
    meta, rec, res = (rundir.read_json(d / f, f) for f in ("meta.json", "run.json", "results.json"))
    if meta is None or rec is None or not (d / "model.safetensors").is_file():
        die(f"--init {path}: no meta.json, run.json or model.safetensors (not a lora.py run); pass an lp_head.pt or "
            f"a finished lora.py run directory")
    method = str(meta.get("method")).removeprefix("prompt_")
    if method not in SOURCES:
        die(f"--init {path} is a {meta.get('method')} run; EH-FT starts from a lora.py run: LoRA or BitFit (--bitfit)")
    if not (res or {}).get("finished"):
        die(f"--init {path}: that run is not finished (its results.json is absent, unfinished or failed); finish it "
            f"first: rerun its lora.py command")
    try:
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            h = {k: f.get_tensor(f"head.{k}") for k in ("weight", "bias")}
    except Exception as e:
        die(f"--init {path}: cannot read head.weight / head.bias of its model.safetensors ({type(e).__name__}); "
            f"rerun its lora.py command with --overwrite")
    h |= {k: meta.get(k) for k in ("task", "model", "max_len", "pooling", "labels", "prompt")}
    return checked_head(h, f"--init {path}", "rerun its lora.py command with --overwrite") | {
        "method": method, "record": rec, "maker": "lora.py"}


def check_source(h, args):
    """EH-FT's stage 2 trains on the data its head was trained on: a source run of other data files or another
    train subset stops here with one line (its task, model, pooling and max_len: check_head)."""
    mine = {"data_sha256": data.data_fingerprint(args.task, args.data_dir)}
    mine |= {k: getattr(args, k) for k in SOURCE_RECORD if hasattr(args, k)}  # ntk.py: no max_train_samples
    for k, v in json.loads(json.dumps(mine)).items():
        theirs = h["record"].get(k)
        if theirs != v:
            fix = ("pass the --data_dir it was trained on" if k == "data_sha256" else
                   f"drop --{k}" if theirs is None else f"pass --{k} {theirs}")
            diff = rundir.describe_diff({k: theirs}, {k: v})
            die(f"--init {args.init} was trained on other data or another subset ({diff}); {fix}, or rerun its "
                f"lora.py command with this run's flags")


def init_kind(path):
    """--init -> None (a fresh head), 'lp' (an lp_head.pt) or the source run's method (lora, bitfit): <kind>_ft."""
    return None if not path else head_from_run(path)["method"] if Path(path).is_dir() else "lp"


def init_sha256(path):
    """--init by content: the head file's hash, or the source run's model.safetensors'."""
    return None if not path else rundir.file_sha256(Path(path) / "model.safetensors" if Path(path).is_dir() else path)


def check_head(h, path, task, model_name, hidden, max_len=None, pooling=None, prompt=None):
    """A head from another task, model, label count, pooling, max length or prompt setting stops with one line
    (LP-FT must start exactly at the LP model: a head fit on other features would not)."""
    t, mk = data.get_task(task), h.get("maker", "lp.py")
    if bool(h.get("prompt")) != bool(prompt):  # a head written before --prompt existed has no field: not prompted
        die(f"head {path} was fit by {mk} --prompt (phi at the mask token); pass --prompt too" if h.get("prompt")
            else f"head {path} was fit without --prompt (pooled features, not the mask token's); drop --prompt or "
                 f"rerun {mk} with --prompt")
    for flag, mine in (("pooling", pooling), ("max_len", max_len)):
        if mine is not None and h.get(flag) is not None and h[flag] != mine:
            die(f"head {path} was fit with --{flag} {h[flag]}, not {mine}; drop --{flag} (the head's is used) "
                f"or rerun {mk} with --{flag} {mine}")
    if h["task"] != task:
        die(f"head {path} was fit on task '{h['task']}', not '{task}'; drop --task or run {mk} --task {task}")
    if len(h["labels"]) != len(t.labels):
        die(f"head {path} has {len(h['labels'])} labels but {task} has {len(t.labels)}; rerun {mk} --task {task}")
    if data.model_id(model_name) != data.model_id(h["model"]):  # the embedded model by name or by its directory
        die(f"head {path} was fit on model '{h['model']}', not '{data.model_id(model_name)}'; "
            f"drop --model or rerun {mk} with this model")
    if h["weight"].shape[1] != hidden:
        die(f"head {path} has feature width {h['weight'].shape[1]} but the model's is {hidden}; rerun {mk}")
