"""Prompt-based fine-tuning (--prompt; Malladi et al. 2023, after LM-BFF): each task's template and label words,
tokenising around the template, the masked-LM checks and the prompt encoder (phi(x) at the mask token).

    python -c "import prompts; print(prompts.prompt_record('rte'))"
    python ft.py --task rte --prompt --model roberta-base

ft.py, lp.py, lora.py and ntk.py use it for --prompt. It needs data.py and rundir.py, and no stage script.
"""

import re
import unicodedata
from dataclasses import dataclass

import torch
import torch.nn as nn

import data
from rundir import die


@dataclass(frozen=True)
class Prompt:
    """A task as masked word prediction (--prompt): the input is `template` filled in, and class c's logit is the
    masked LM's score of label word `words[label c]` at the mask. Placeholders: {a}, {b} the example's text_a /
    text_b (see data.example for SuperGLUE's), {a_nopunct} text_a without its final punctuation mark,
    {b_lower} text_b with its first letter lower-cased, {mask} the tokenizer's mask token. As LM-BFF's templates
    (whose spaces matter to RoBERTa's BPE): a space before a sentence is encoded with it, a space before {mask}
    belongs to the label word (encoded " word"), any other text is encoded as written."""
    template: str
    words: dict  # label name -> label word


YES_NO = {"True": "Yes", "False": "No"}
PROMPTS = {
    # LM-BFF / Malladi et al.'s run_fewshot.sh (CB is their MNLI: the same classes)
    "sst2": Prompt("{a} It was {mask}.", {"positive": "great", "negative": "terrible"}),
    "cola": Prompt("{a} This is {mask}.", {"acceptable": "correct", "unacceptable": "incorrect"}),
    "mrpc": Prompt("{a} {mask}, {b_lower}", {"equivalent": "Yes", "not_equivalent": "No"}),
    "rte": Prompt("{a_nopunct}? {mask}, {b_lower}", {"entailment": "Yes", "not_entailment": "No"}),
    "cb": Prompt("{a_nopunct}? {mask}, {b_lower}", {"entailment": "Yes", "contradiction": "No", "neutral": "Maybe"}),
    # the kit's own (tasks they did not prompt)
    "boolq": Prompt("{b} Question: {a}? Answer: {mask}.", YES_NO),  # a = question, b = passage
    "wic": Prompt("{a} {mask}.", YES_NO),  # a already ends "Does <word> have the same meaning in both sentences?"
    "wsc": Prompt("{a} Does the pronoun refer to {b}? {mask}.", YES_NO),  # a = "<pronoun>: <text>", b = the noun
    "amazon": Prompt("{a} It was {mask}.", {"positive": "great", "negative": "terrible", "neutral": "okay"}),
    "pubmed": Prompt("{mask}: {a}", {"BACKGROUND": "Background", "OBJECTIVE": "Objective", "METHODS": "Methods",
                                     "RESULTS": "Results", "CONCLUSIONS": "Conclusions"}),  # as their TREC's
}


# ---------------------------------------------------------------- a template around the text
def prompt_record(task):
    """A task's template and label words (class order) as one readable string: what run records hold, so that a run
    or cached features made with an earlier prompts.PROMPTS entry are never reused under an edited one."""
    p = PROMPTS[task]
    return f"{p.template} | {' '.join(p.words[label] for label in data.TASKS[task].labels)}"


def template_parts(template):
    """A Prompt's template -> [[kind, value, spaced]]: ["text", literal], ["sent", placeholder] or ["mask", None];
    spaced: a space stood right before it (taken out of the literal: see Prompt)."""
    parts = []
    for piece in re.split(r"(\{\w+\})", template):
        if not piece:
            continue
        if not piece.startswith("{"):
            parts.append(["text", piece, False])
            continue
        spaced = bool(parts) and parts[-1][0] == "text" and parts[-1][1].endswith(" ")
        if spaced:
            parts[-1][1] = parts[-1][1][:-1]
            if not parts[-1][1]:
                parts.pop()
        name = piece[1:-1]
        parts.append(["mask", None, spaced] if name == "mask" else ["sent", name, spaced])
    return parts


def fill(name, x):
    """A sentence placeholder ({a}, {b}, {a_nopunct}, {b_lower}) of one example's (text_a, text_b)."""
    which, _, how = name.partition("_")
    text = x[0] if which == "a" else x[1]
    if text is None:
        die(f"the prompt template uses {{{name}}} but an example has no text_{which}")
    if how == "nopunct":  # LM-BFF's sent-: drops the last character; here only a final punctuation mark
        text = text.rstrip()
        text = text[:-1] if text and unicodedata.category(text[-1]).startswith("P") else text
    elif how == "lower":
        text = text[:1].lower() + text[1:]
    return text


def prompt_specials(tok, model=None):
    """The special tokens a prompt needs: the tokenizer's own mask, cls and sep tokens."""
    for n in ("mask", "cls", "sep"):
        if getattr(tok, f"{n}_token_id") is None:
            die(f"the tokenizer of model '{data.model_id(model or tok.name_or_path)}' has no {n} token; --prompt needs "
                f"a masked-language model's tokenizer (e.g. roberta-base's)")


def label_word_ids(tok, task, model=None):
    """The token ids of a task's label words in class order, each encoded " word" (RoBERTa's BPE marks the space
    before a word; BERT's WordPiece ignores it), as LM-BFF does. A word that is not ONE known token stops."""
    t = data.get_task(task)
    if task not in PROMPTS:
        die(f"no prompt template for task {task}; add one to prompts.PROMPTS")
    name = data.model_id(model or tok.name_or_path)
    ids = []
    for label in t.labels:
        word = PROMPTS[task].words[label]
        pieces = tok.tokenize(" " + word)
        i = tok.convert_tokens_to_ids(pieces[0]) if len(pieces) == 1 else None
        if i is None or i == tok.unk_token_id:
            die(f"label word '{word}' of task {task} is {pieces} in model '{name}''s tokenizer, not one known token; "
                f"--prompt needs one-token label words (change prompts.PROMPTS['{task}'])")
        ids.append(i)
    if len(set(ids)) < len(ids):
        die(f"task {task}'s label words {list(PROMPTS[task].words.values())} share a token in model '{name}''s "
            f"tokenizer; change prompts.PROMPTS['{task}']")
    return ids


def prompt_layout(tok, task):
    """-> (template parts with each literal's token ids, the tokens every input has: cls, sep, mask and the
    template's text)."""
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    parts = [[k, enc(v) if k == "text" else v, sp] for k, v, sp in template_parts(PROMPTS[task].template)]
    return parts, 3 + sum(len(v) for k, v, _ in parts if k == "text")


def prompt_min_len(tok, task):
    """The shortest --max_len that holds the template, the mask, the special tokens and one token per sentence."""
    parts, fixed = prompt_layout(tok, task)
    return fixed + sum(k == "sent" for k, _, _ in parts)


def longest_first(lens, room):
    """Lengths cut to a total of at most `room` by shortening the longest first (as the tokenizers' longest_first:
    on a tie the later sequence gives a token first)."""
    if sum(lens) <= room:
        return list(lens)
    lo, hi = 0, max(lens)  # the largest level T with sum(min(n, T)) <= room
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if sum(min(n, mid) for n in lens) <= room else (lo, mid - 1)
    out = [min(n, lo) for n in lens]
    extra = room - sum(out)
    for j, n in enumerate(lens):
        if n > lo and extra:
            out[j], extra = out[j] + 1, extra - 1
    return out


def prompt_tokenize(tok, split, max_len, task):
    """tokenize for --prompt: cls + the template filled in + sep, one segment (as LM-BFF), exactly one mask token.
    Only the sentences are truncated (longest first), never the template, so the mask survives any max_len."""
    prompt_specials(tok)
    parts, fixed = prompt_layout(tok, task)
    sents = [(name, spaced) for k, name, spaced in parts if k == "sent"]
    room = max_len - fixed
    if room < len(sents):
        die(f"--max_len {max_len} cannot hold {task}'s prompt template and its text; use at least "
            f"{fixed + len(sents)}")
    filled = [tok([" " * spaced + fill(name, x) for x in split.texts], add_special_tokens=False)["input_ids"]
              for name, spaced in sents]
    mask, types = tok.mask_token_id, "token_type_ids" in tok.model_input_names
    out = []
    for i in range(len(split)):
        keep = iter(longest_first([len(f[i]) for f in filled], room))
        sent = iter(f[i] for f in filled)
        ids = [tok.cls_token_id]
        for kind, v, _ in parts:
            ids += v if kind == "text" else [mask] if kind == "mask" else next(sent)[:next(keep)]
        ids.append(tok.sep_token_id)
        if ids.count(mask) != 1:
            die(f"example {i + 1} of this {task} split contains the mask token {tok.mask_token!r} in its text; "
                f"--prompt needs exactly one mask per input: remove it from the data")
        out.append({"input_ids": ids} | ({"token_type_ids": [0] * len(ids)} if types else {}))
    return out


def tokenize(tok, split, max_len, task=None):
    """data.tokenize, or with task (--prompt) the task's template around the text (prompt_tokenize)."""
    return data.tokenize(tok, split, max_len) if task is None else prompt_tokenize(tok, split, max_len, task)


# ---------------------------------------------------------------- the masked LM and the prompt encoder
MLM_HEADS = ("ForMaskedLM", "ForPreTraining")  # architectures whose checkpoints carry the masked-LM head


def no_mlm_head(name, why):
    return (f"--prompt needs a masked-language model (a *ForMaskedLM checkpoint such as roberta-base); "
            f"{data.model_id(name)} has no MLM head ({why})")


def check_prompt(name, task, max_len=None, pooling=data.POOLING):
    """--prompt, from the flags, config and tokenizer alone (no weights loaded, no file written): phi is taken at
    the mask (cls pooling), the checkpoint is a masked LM, its tokenizer has mask/cls/sep tokens and the task's label
    words as single tokens, and --max_len holds the template with room for the text."""
    if pooling != "cls":
        die(f"--prompt takes phi(x) at the mask token; drop --pooling {pooling}")
    from transformers import AutoConfig, AutoTokenizer

    path = data.resolve_model(name)
    try:
        cfg = AutoConfig.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        die(f"cannot load model '{name}': {str(e).splitlines()[0]} (a hub name needs internet; or pass a local "
            f"directory)")
    archs = getattr(cfg, "architectures", None) or []  # none recorded: load_mlm checks the weights themselves
    if archs and not any(a.endswith(MLM_HEADS) for a in archs):
        die(no_mlm_head(name, f"its config names {', '.join(archs)}"))
    prompt_specials(tok, name)
    label_word_ids(tok, task, name)
    need = prompt_min_len(tok, task)
    if max_len is not None and max_len < need:
        die(f"--max_len {max_len} cannot hold {task}'s prompt template, mask and special tokens with any text; "
            f"use at least {need}")


def load_mlm(name):
    """-> (AutoModelForMaskedLM, tokenizer), fp32, sdpa attention; a checkpoint without the MLM head's weights (they
    would be random) stops with one line."""
    import transformers
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = data.resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        mlm, info = AutoModelForMaskedLM.from_pretrained(path, attn_implementation="sdpa", output_loading_info=True)
    except ValueError as e:  # a model type without a masked-LM class
        die(no_mlm_head(name, str(e).splitlines()[0]))
    except OSError as e:
        die(f"cannot load model '{name}': {str(e).splitlines()[0]} "
            "(a hub name needs internet; or pass a local directory)")
    lost = sorted(k for k in info["missing_keys"] if not k.startswith(mlm.base_model_prefix + "."))
    if lost:
        die(no_mlm_head(name, f"its weights lack {lost[0]}"))
    return mlm, tok


class PromptEncoder(nn.Module):
    """The encoder of prompt-based fine-tuning (--prompt; Malladi et al. 2023, after LM-BFF): phi(x) is the masked
    LM head's transform (dense, activation, LayerNorm) of the last hidden state at the mask token, returned as
    `last_hidden_state` [B, 1, d] so that ft.Classifier's cls pooling takes it unchanged. With the head V, b set to
    the decoder's label-word rows (ft.build_model), V phi(x) + b are the MLM's label-word scores at the mask. Exposes
    what ntk.py and ntk_structured.py use of a transformers model: config, get_input_embeddings, named_parameters."""

    def __init__(self, body, dense, act, norm, mask_id):
        super().__init__()
        self.body, self.dense, self.act, self.norm = body, dense, act, norm
        self.mask_id = mask_id
        self.config = body.config  # shared with every layer: ntk.py's switch to eager attention reaches them

    def get_input_embeddings(self):
        return self.body.get_input_embeddings()

    def forward(self, input_ids, attention_mask, token_type_ids=None, **kw):
        from transformers.modeling_outputs import BaseModelOutput

        h = self.body(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                      **kw).last_hidden_state
        # the transform acts token by token, so at the mask it is the MLM head's; applied to every token (about 1%
        # of the encoder's work) its layers' outputs stay [batch, tokens, ...], as ntk_structured records them
        t = self.norm(self.act(self.dense(h)))
        at = (input_ids == self.mask_id).unsqueeze(-1).to(t.dtype)  # one-hot, no data-dependent index: vmap works
        return BaseModelOutput(last_hidden_state=(t * at).sum(1, keepdim=True))


def mlm_parts(mlm, name):
    """A BERT- or RoBERTa-style masked LM -> (dense, activation, LayerNorm) of its head's transform."""
    if hasattr(mlm, "cls") and hasattr(getattr(mlm.cls, "predictions", None), "transform"):  # BERT
        t = mlm.cls.predictions.transform
        return t.dense, t.transform_act_fn, t.LayerNorm
    head = getattr(mlm, "lm_head", None)
    if head is not None and hasattr(head, "dense") and hasattr(head, "layer_norm"):  # RoBERTa: gelu whatever the
        from transformers.activations import get_activation  # config's hidden_act, as RobertaLMHead.forward

        return head.dense, get_activation("gelu"), head.layer_norm
    die(f"--prompt takes BERT- or RoBERTa-style masked LMs (cls.predictions or lm_head); model '{name}' is a "
        f"{type(mlm).__name__}")


def load_prompt_encoder(model_name):
    """-> (PromptEncoder, tokenizer, decoder weight [vocab, d], decoder bias [vocab]) of a masked-LM checkpoint."""
    mlm, tok = load_mlm(model_name)
    prompt_specials(tok, model_name)
    dense, act, norm = mlm_parts(mlm, model_name)
    dec = mlm.get_output_embeddings()
    W = dec.weight.detach().clone()
    b = dec.bias.detach().clone() if dec.bias is not None else torch.zeros(len(W))
    return PromptEncoder(mlm.base_model, dense, act, norm, tok.mask_token_id), tok, W, b
