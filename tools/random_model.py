"""A model directory with random weights, built from a config, and a real tokenizer copied in: how the kit runs
where the embedded model's weights are not installed (tools/gpu_check.sh on a GPU machine), or where a test needs
a small model that loads through `--model DIR` like any checkpoint.

    python tools/random_model.py /tmp/minilm --shape minilm           # all-MiniLM-L6-v2's shape, random weights
    python tools/random_model.py /tmp/tiny --shape tiny --tokenizer .gpu/tokenizer

Shapes: minilm (BERT, 6 layers, width 384, 12 heads, 22.7M parameters: the embedded model's), tiny (BERT, 2 layers,
width 64: seconds per epoch on a CPU). The vocabulary is the tokenizer's (the embedded model's uncased WordPiece by
default, or --tokenizer DIR / $KIT_TOKENIZER: any folder AutoTokenizer loads).
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import rundir  # noqa: E402

SHAPES = {"minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
          "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256)}


def write(out, shape="tiny", tokenizer=None, seed=0):
    """-> out: config.json, model.safetensors (seeded random init), the tokenizer's files."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    src = tokenizer or os.environ.get("KIT_TOKENIZER") or data.resolve_model(None)
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except OSError as e:
        rundir.die(f"cannot load a tokenizer from {src}: {str(e).splitlines()[0]}; pass --tokenizer DIR")
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), max_position_embeddings=512, **SHAPES[shape])
    BertModel(cfg, add_pooling_layer=False).save_pretrained(out)
    tok.save_pretrained(out)
    return Path(out)


@rundir.cli
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the folder to write (created; its files are replaced)")
    p.add_argument("--shape", choices=list(SHAPES), default="tiny")
    p.add_argument("--tokenizer", help="a folder AutoTokenizer loads (default: $KIT_TOKENIZER, else the embedded "
                   "model's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rundir.check_output_dir(Path(args.out), "out")
    print(f"wrote {write(args.out, args.shape, args.tokenizer, args.seed)} ({args.shape}, random weights)")


if __name__ == "__main__":
    main()
