"""--prompt (Malladi et al.'s prompt-based fine-tuning): templates and label words, the PromptEncoder against the
masked LM's own scores, its eNTK against the reference engines, and ft.py / lp.py / lora.py runs, on tiny random
masked LMs saved to disk."""

import json
import re
import unicodedata

import numpy as np
import pytest
import torch
from conftest import snapshot
from test_ntk import brute_force
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM

import data
import ft
import lora
import lp
import ntk
import prompts
import rundir

TOK = AutoTokenizer.from_pretrained(data.resolve_model(data.EMBEDDED))  # BERT WordPiece, uncased
MLM = {"bert": BertForMaskedLM, "roberta": RobertaForMaskedLM}


def tiny_mlm(kind, seed=0):
    """A random 2-layer, width-32 masked LM on the embedded model's vocabulary, its MLM head perturbed so that the
    transform's dense, LayerNorm and the decoder bias all matter."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=len(TOK), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
              max_position_embeddings=130, pad_token_id=TOK.pad_token_id)
    m = BertForMaskedLM(BertConfig(**kw)) if kind == "bert" else RobertaForMaskedLM(RobertaConfig(**kw))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.startswith(("cls.", "lm_head.")) and "decoder.weight" not in n:
                p.add_(torch.randn_like(p) * 0.5)
    return m.eval()


@pytest.fixture(scope="module", params=["bert", "roberta"])
def mlm_dir(request, tmp_path_factory):
    """A saved tiny masked LM. The RoBERTa one uses the BERT tokenizer's files: no RoBERTa (BPE) tokenizer is
    available offline; the model does not care which tokenizer made its ids."""
    d = tmp_path_factory.mktemp(f"mlm_{request.param}")
    tiny_mlm(request.param).save_pretrained(d)
    TOK.save_pretrained(d)
    return request.param, d


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlm_bert_run")
    tiny_mlm("bert", seed=1).save_pretrained(d)
    TOK.save_pretrained(d)
    return d


def split(task, idx, data_dir):
    return data.load_task(task, data_dir)["val"].subset(idx)


def one_line_error(fn, argv, match):
    with pytest.raises(SystemExit, match=match) as e:
        fn(argv)
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value)


# ---------------------------------------------------------------- templates and label words
def test_template_parts_follow_lm_bff_spacing():
    # a space before a sentence is encoded with it (RoBERTa's " word" tokens), one before the mask belongs to the
    # label word: "{a_nopunct}? {mask}, {b_lower}" is LM-BFF's *sent-_0*?*mask*,*+sentl_1*
    assert prompts.template_parts("{a_nopunct}? {mask}, {b_lower}") == [
        ["sent", "a_nopunct", False], ["text", "?", False], ["mask", None, True], ["text", ",", False],
        ["sent", "b_lower", True]]
    assert prompts.template_parts("{a} It was {mask}.") == [
        ["sent", "a", False], ["text", " It was", False], ["mask", None, True], ["text", ".", False]]


def test_every_task_has_a_template_and_one_token_label_words():
    for task, t in data.TASKS.items():
        p = prompts.PROMPTS[task]
        assert set(p.words) == set(t.labels), task
        kinds = [k for k, _, _ in prompts.template_parts(p.template)]
        assert kinds.count("mask") == 1, task
        sents = {v for k, v, _ in prompts.template_parts(p.template) if k == "sent"}
        assert sents <= {"a", "b", "a_nopunct", "b_lower"}
        ids = prompts.label_word_ids(TOK, task)
        assert TOK.convert_ids_to_tokens(ids) == [p.words[label].lower() for label in t.labels]  # uncased vocab
    assert TOK.convert_ids_to_tokens(prompts.label_word_ids(TOK, "sst2")) == ["terrible", "great"]  # class 0, 1


def test_sst2_template_keeps_mask_and_template_under_a_short_max_len(data_dir):
    sp = split("sst2", range(40), data_dir)
    full = prompts.tokenize(TOK, sp, 128, "sst2")
    short = prompts.tokenize(TOK, sp, 12, "sst2")
    tail = TOK.convert_tokens_to_ids(["it", "was", "[MASK]", ".", "[SEP]"])
    for x, y, (a, _) in zip(full, short, sp.texts):
        for e in (x, y):
            assert e["input_ids"].count(TOK.mask_token_id) == 1
            assert e["input_ids"][0] == TOK.cls_token_id and e["input_ids"][-5:] == tail
            assert e["token_type_ids"] == [0] * len(e["input_ids"])  # one segment, as LM-BFF
        assert x["input_ids"] == [TOK.cls_token_id] + TOK(a, add_special_tokens=False)["input_ids"] + tail
        assert len(y["input_ids"]) == min(12, len(x["input_ids"]))
        assert y["input_ids"][:-5] == x["input_ids"][:len(y["input_ids"]) - 5]  # the sentence's head kept
    assert any(len(x["input_ids"]) > 12 for x in full)  # some were cut


def test_rte_template_drops_final_punctuation_and_lowercases_the_hypothesis(data_dir):
    sp = split("rte", range(30), data_dir)
    enc = lambda s: TOK(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    full = prompts.tokenize(TOK, sp, 512, "rte")
    for x, (a, b) in zip(full, sp.texts):
        a = a.rstrip()
        a = a[:-1] if unicodedata.category(a[-1]).startswith("P") else a
        want = [TOK.cls_token_id] + enc(a) + enc("?") + [TOK.mask_token_id] + enc(",") + enc(
            " " + b[:1].lower() + b[1:]) + [TOK.sep_token_id]
        assert x["input_ids"] == want
    for x in prompts.tokenize(TOK, sp, 24, "rte"):  # both sentences cut, the template whole
        ids = x["input_ids"]
        assert len(ids) <= 24 and ids.count(TOK.mask_token_id) == 1
        m = ids.index(TOK.mask_token_id)
        assert ids[m - 1] == enc("?")[0] and ids[m + 1] == enc(",")[0] and ids[-1] == TOK.sep_token_id
        assert m > 2 and len(ids) - m > 3  # text on both sides of the template survives


def test_longest_first_cuts_the_longer_sentence():
    assert prompts.longest_first([10, 3], 8) == [5, 3]
    assert prompts.longest_first([10, 10], 9) == [5, 4]
    assert prompts.longest_first([2, 3], 9) == [2, 3]
    assert prompts.longest_first([7], 4) == [4]


def test_bad_prompt_inputs_stop_with_one_line(monkeypatch, data_dir):
    sp = split("sst2", range(3), data_dir)
    with pytest.raises(rundir.KitError, match="cannot hold sst2's prompt") as e:
        prompts.tokenize(TOK, sp, 6, "sst2")
    assert "\n" not in str(e.value)
    bad = data.Split([("it has [MASK] in it", None)], np.array([0]))
    with pytest.raises(rundir.KitError, match="exactly one mask per input"):
        prompts.tokenize(TOK, bad, 32, "sst2")
    assert len(TOK.tokenize(" greatishly")) > 1
    monkeypatch.setitem(prompts.PROMPTS, "sst2", prompts.Prompt("{a} It was {mask}.",
                                                          {"positive": "greatishly", "negative": "terrible"}))
    with pytest.raises(rundir.KitError, match="label word 'greatishly' of task sst2 .* not one known token") as e:
        prompts.label_word_ids(TOK, "sst2", data.EMBEDDED)
    assert "all-MiniLM-L6-v2" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- the model
@pytest.mark.parametrize("task", ["sst2", "cb"])
def test_prompt_logits_are_the_mlms_label_word_scores(mlm_dir, task, data_dir):
    kind, d = mlm_dir
    model, tok = ft.build_model(str(d), len(data.TASKS[task].labels), prompt_task=task)
    model.eval()
    ref = MLM[kind].from_pretrained(d).eval()  # loaded on its own: the untied copy in the head is checked too
    xs = prompts.tokenize(tok, split(task, range(6), data_dir), 64, task)
    assert len({len(x["input_ids"]) for x in xs}) > 1  # padded batches
    b = data.collate(xs, list(range(6)), tok.pad_token_id)
    with torch.no_grad():
        got = model(**b)
        full = ref(**b).logits  # [B, L, vocab]
    rows, cols = (b["input_ids"] == tok.mask_token_id).nonzero(as_tuple=True)
    assert rows.tolist() == list(range(6))
    want = full[rows, cols][:, prompts.label_word_ids(tok, task)]
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    # untied: the head is a copy of the decoder rows, the word embeddings stay the encoder's own
    assert model.head.weight.data_ptr() != model.encoder.get_input_embeddings().weight.data_ptr()


def test_prompt_entk_engines_match_the_autograd_reference(mlm_dir, data_dir):
    kind, d = mlm_dir
    model, tok = ft.build_model(str(d), 3, prompt_task="cb")
    model = model.double().eval()
    sp = split("cb", range(25), data_dir)
    xs = prompts.tokenize(tok, sp, 128, "cb")
    pick = sorted(range(len(xs)), key=lambda i: len(xs[i]["input_ids"]))[:3]
    xs = [xs[i] for i in pick]
    assert len({len(x["input_ids"]) for x in xs}) > 1
    _, Fn = ntk.kernels(model, xs, pad_id=tok.pad_token_id, method="naive")  # autograd, each example alone
    assert np.abs(Fn).max() > 0
    Ph, _ = brute_force(model, xs, tok.pad_token_id, list(model.head.parameters()))  # P: the head's gradients
    for method in ("func", "structured"):  # torch.func (vmap over padded batches) and the per-layer engine
        P, F = ntk.kernels(model, xs, pad_id=tok.pad_token_id, method=method, batch_size=2)
        assert np.abs(F - Fn).max() <= 1e-9 * np.abs(Fn).max(), method
        assert np.abs(P - Ph).max() <= 1e-9 * np.abs(Ph).max(), method


# ---------------------------------------------------------------- runs
def run_flags(d, data_dir, out, *more):
    return ["--task", "sst2", "--model", str(d), "--data_dir", str(data_dir), "--max_len", "32", "--epochs", "1",
            "--max_steps", "2", "--max_train_samples", "16", "--max_eval_samples", "12", "--eval_batch_size", "8",
            "--output_dir", str(out), *more]


def test_ft_prompt_run_is_recorded_and_refuses_the_plain_setting(bert_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    res = ft.main(run_flags(bert_dir, data_dir, out, "--prompt"))
    assert res["config"]["prompt"] is True and res["config"]["method"] == "prompt_ft"
    assert res["config"]["lr"] == ft.TABLE6["sst2"]["ft"][1]  # the tables stay keyed by the plain method
    record = json.loads((out / "run.json").read_text())
    assert record["prompt"] is True and record["prompt_template"] == prompts.prompt_record("sst2")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["prompt"] is True and meta["method"] == "prompt_ft"
    # epoch 0 is the masked LM's own choice between the label words
    ref = BertForMaskedLM.from_pretrained(bert_dir).eval()
    val = data.study_splits("sst2", data_dir, 16, 12, data.SEED)["val"]
    xs = prompts.tokenize(TOK, val, 32, "sst2")
    b = data.collate(xs, list(range(len(xs))), TOK.pad_token_id)
    with torch.no_grad():
        full = ref(**b).logits
    rows, cols = (b["input_ids"] == TOK.mask_token_id).nonzero(as_tuple=True)
    zero_shot = full[rows, cols][:, prompts.label_word_ids(TOK, "sst2")].numpy()
    assert res["history"][0]["val"] == data.metrics("sst2", zero_shot, val.labels)
    before = snapshot(out)
    one_line_error(ft.main, run_flags(bert_dir, data_dir, out), "another configuration .*prompt")
    assert snapshot(out) == before


def test_default_run_directory_names_prompt_runs(bert_dir, data_dir):
    args = ft.make_parser().parse_args(["--task", "sst2", "--model", str(bert_dir), "--prompt"])
    ft.resolve(args, "ft", ft.TABLE6, ft.MINILM_LR)
    assert args.output_dir == f"runs/sst2/prompt_ft-seed{data.SEED}"
    args = ft.make_parser().parse_args(["--task", "sst2", "--model", str(bert_dir)])
    ft.resolve(args, "ft", ft.TABLE6, ft.MINILM_LR)
    assert args.output_dir == f"runs/sst2/ft-seed{data.SEED}" and args.prompt is None


def test_prompt_lp_head_starts_prompt_lp_ft_and_a_plain_head_is_refused(bert_dir, data_dir, tmp_path):
    lp_flags = ["--task", "sst2", "--model", str(bert_dir), "--data_dir", str(data_dir), "--max_len", "32",
                "--max_train_samples", "24", "--max_eval_samples", "12", "--C", "1.0",
                "--cache_dir", str(tmp_path / "cache")]
    lp_res = lp.main([*lp_flags, "--prompt", "--output_dir", str(tmp_path / "lp")])
    head = torch.load(tmp_path / "lp" / "lp_head.pt", weights_only=True)
    assert head["prompt"] is True and head["weight"].shape == (2, 32)
    cached = [p.name for p in (tmp_path / "cache" / "sst2").iterdir()]  # its own features, keyed by the template
    assert len(cached) == 1 and re.search(r"_prompt[0-9a-f]{8}_L32_fp32$", cached[0])
    assert lp_res["fingerprint"]["prompt_template"] == "{a} It was {mask}. | terrible great"
    res = ft.main(["--init", str(tmp_path / "lp" / "lp_head.pt"), "--data_dir", str(data_dir), "--epochs", "1",
                   "--max_steps", "1", "--max_train_samples", "24", "--max_eval_samples", "12",
                   "--output_dir", str(tmp_path / "lpft")])  # --prompt and the model from the head
    assert res["config"]["prompt"] is True and res["config"]["method"] == "prompt_lp_ft"
    for s in ("val", "test"):  # LP-FT starts at the LP model
        assert res["history"][0][s]["accuracy"] == lp_res["metrics"][s]["accuracy"]
    assert res["history"][0]["head_norm"] == pytest.approx(lp_res["head_norm"], rel=1e-6)
    lp.main([*lp_flags, "--output_dir", str(tmp_path / "lp_plain")])
    one_line_error(ft.main, ["--init", str(tmp_path / "lp_plain" / "lp_head.pt"), "--prompt",
                             "--output_dir", str(tmp_path / "x")], "fit without --prompt")
    assert not (tmp_path / "x").exists()


def test_prompt_without_a_masked_lm_stops_before_writing(tmp_path):
    msg = r"--prompt needs a masked-language model .*all-MiniLM-L6-v2 has no MLM head \(its config names BertModel\)"
    one_line_error(ft.main, ["--task", "sst2", "--prompt", "--output_dir", str(tmp_path / "ft")], msg)
    one_line_error(lora.main, ["--task", "sst2", "--prompt", "--output_dir", str(tmp_path / "lora")], msg)
    one_line_error(lp.main, ["--task", "sst2", "--prompt", "--output_dir", str(tmp_path / "lp"),
                             "--cache_dir", str(tmp_path / "cache")], msg)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(rundir.KitError, match="its weights lack cls.predictions"):  # the check on the weights
        prompts.load_mlm(data.EMBEDDED)


def test_lora_prompt_run_trains_adapters_and_head_and_reloads(bert_dir, data_dir, tmp_path):
    one_line_error(lora.main, run_flags(bert_dir, data_dir, tmp_path / "r", "--prompt", "--merge_to",
                                        str(tmp_path / "m")), "--merge_to exports a plain encoder")
    assert list(tmp_path.iterdir()) == []
    out = tmp_path / "run"
    res = lora.main(run_flags(bert_dir, data_dir, out, "--prompt", "--max_steps", "1"))
    assert res["config"]["method"] == "prompt_lora" and res["config"]["prompt"] is True
    assert res["config"]["lr"] == lora.TABLE6["sst2"]["lora"][1]
    assert res["config"]["trainable_params"] == 2 * 2 * (8 * 32 + 32 * 8) + 2 * 32 + 2  # q, v in 2 layers + head
    model, tok = lora.load_adapter(out, with_tokenizer=True)
    assert isinstance(model.encoder, prompts.PromptEncoder)
    val = data.study_splits("sst2", data_dir, 16, 12, data.SEED)["val"]
    logits = ft.evaluate(model, {"val": prompts.tokenize(tok, val, 32, "sst2")}, tok.pad_token_id, 8)["val"][0]
    assert np.array_equal(logits, np.load(out / "logits.npz")["val_logits"])
    # --prompt_params kit names this run (reused); authors is another configuration
    before = snapshot(out)
    assert lora.main(run_flags(bert_dir, data_dir, out, "--prompt", "--max_steps", "1", "--prompt_params", "kit"))[
        "history"] == res["history"]
    one_line_error(lora.main, run_flags(bert_dir, data_dir, out, "--prompt", "--max_steps", "1", "--prompt_params",
                                        "authors"), "another configuration .*prompt_params")
    assert snapshot(out) == before


def test_lora_prompt_params_authors_trains_the_mlm_transform(bert_dir, data_dir, tmp_path):
    """Malladi et al.'s prompt LoRA: A, B, the head and the MLM head's transform (dense, LayerNorm) train; the run
    saves and reloads them."""
    for more, words in ((["--prompt_params", "authors"], "add --prompt"),
                        (["--prompt", "--bitfit", "--prompt_params", "authors"], "BitFit trains the biases")):
        one_line_error(lora.main, run_flags(bert_dir, data_dir, tmp_path / "x", *more), words)
    out = tmp_path / "run"
    res = lora.main(run_flags(bert_dir, data_dir, out, "--prompt", "--max_steps", "1", "--prompt_params", "authors"))
    kit = 2 * 2 * (8 * 32 + 32 * 8) + 2 * 32 + 2  # q, v in 2 layers + head
    assert res["config"]["trainable_params"] == kit + (32 * 32 + 32) + 2 * 32  # + dense, LayerNorm
    assert res["config"]["prompt_params"] == "authors"
    assert json.loads((out / "meta.json").read_text())["lora"]["prompt_params"] == "authors"
    model, tok = lora.load_adapter(out, with_tokenizer=True)
    ref = BertForMaskedLM.from_pretrained(bert_dir).cls.predictions.transform
    assert not torch.equal(model.encoder.dense.weight, ref.dense.weight)  # trained, saved and reloaded
    assert model.encoder.dense.weight.requires_grad and model.encoder.norm.bias.requires_grad  # its trainable set
    val = data.study_splits("sst2", data_dir, 16, 12, data.SEED)["val"]
    logits = ft.evaluate(model, {"val": prompts.tokenize(tok, val, 32, "sst2")}, tok.pad_token_id, 8)["val"][0]
    assert np.array_equal(logits, np.load(out / "logits.npz")["val_logits"])


def test_prompt_lora_kernel_with_the_authors_parameters(bert_dir, data_dir, tmp_path):
    """ntk.py --lora --prompt_params authors: F gains exactly the MLM transform's share, by autograd; the choice is
    in the run record (only with --lora: FT trains the transform either way)."""
    base = ["--task", "cb", "--model", str(bert_dir), "--prompt", "--data_dir", str(data_dir), "--output_dir",
            str(tmp_path / "ntk")]
    authors = ["--prompt_params", "authors"]
    for more, recorded, trains in (([*authors, "--lora"], "authors", True), (["--lora"], None, False),
                                   (authors, None, True)):  # FT trains the transform either way
        args = ntk.parse(base + more)
        head, method = ntk.resolve(args)
        assert ntk.run_record(args, method).get("prompt_params") == recorded
        assert ntk.build(args, head, 3)[0].encoder.dense.weight.requires_grad is trains
    sp = split("cb", range(3), data_dir)
    F = {}
    for transform in (False, True):
        model, tok = ft.build_model(str(bert_dir), 3, prompt_task="cb")
        lora.inject_lora(model.double().eval(), transform=transform)
        xs = prompts.tokenize(tok, sp, 64, "cb")
        _, F[transform] = ntk.kernels(model, xs, pad_id=tok.pad_token_id)
    share, _ = brute_force(model, xs, tok.pad_token_id, [*model.encoder.dense.parameters(),
                                                          *model.encoder.norm.parameters()])
    assert np.abs(share).max() > 0
    assert np.abs(F[True] - F[False] - share).max() <= 1e-9 * np.abs(share).max()


def test_ntk_prompt_kernel_is_the_label_word_heads(bert_dir, data_dir, tmp_path):
    """ntk.py --prompt: the eNTK (and an asymmetric SignGD kernel) of the prompt model on k-shot data; P's features
    are phi at the mask, the head starts at the label words' decoder rows, the directory is prompt_ft's."""
    import ntk

    out = tmp_path / "ntk"
    res = ntk.main(["--task", "sst2", "--model", str(bert_dir), "--prompt", "--k_shot", "2", "--n_test", "3",
                    "--max_len", "32", "--kernel", "asym_signgd", "--binary_logit", "--data_dir", str(data_dir),
                    "--output_dir", str(out), "--max_memory_gb", "1"])
    assert res["config"]["ntk_method"] == "prompt_ft" and res["config"]["prompt"] is True
    model, tok = ft.build_model(str(bert_dir), 2, prompt_task="sst2")
    assert res["head_norm"] == pytest.approx(float(model.head.weight.detach().double().norm()))
    z = np.load(out / "kernels.npz")
    assert z["F_train"].shape == (4, 1, 4, 1) and z["F_flip"].shape == (3, 1, 4, 1)
    assert all(0 <= r["test"] <= 1 for r in res["solvers"].values())
