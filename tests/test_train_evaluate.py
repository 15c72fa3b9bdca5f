"""LoRA training on selected tokens and held-out evaluation, on the tiny real model."""

import json

import numpy as np
import pytest
import torch

from tests.ingest_helpers import ingest
from tokenclean.config import TrainConfig
from tokenclean.tasks.evaluate import evaluate_model
from tokenclean.tasks.jobs import EvalJob
from tokenclean.tasks.score import ShardSample
from tokenclean.tasks.train import TrainJob, TrainSample, lora_shape, train_worker, training_table


@pytest.fixture(scope="module")
def data(tiny, tokenizer):
    res = ingest([str(tiny.train)], [str(tiny.eval)], tokenizer, max_length=256, eval_fraction=0.0, n_parts=2, seed=0)
    rows = res.samples.to_pylist()
    train = [r for r in rows if r["part"] >= 0]
    evals = [r for r in rows if r["part"] == -1]
    return train, evals


def _cfg(**kw) -> dict:
    base = {"lr": 5e-3, "batch_size": 16, "per_device_batch_size": 16, "checkpoint_every": 0,
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}
    return base | kw


def _train(tiny, samples, out, **kw):
    init = kw.pop("init_adapter", None)
    job = TrainJob(str(tiny.model), _cfg(**kw), training_table(samples), str(out), str(out) + ".ckpt",
                   key=out.name, init_adapter=init, device="cpu", dtype="float32")
    return train_worker(job)


def test_training_uses_only_selected_tokens_and_drops_empty_samples(tiny, data, tmp_path):
    train, _ = data
    samples = []
    for i, r in enumerate(train[:80]):
        mask = np.array(r["response_mask"])
        if i % 4 == 0:
            mask[:] = False  # a sample that lost every token
        samples.append(TrainSample(np.array(r["input_ids"], dtype=np.int32), mask))
    stats = _train(tiny, samples, tmp_path / "a", epochs=2)
    assert stats["samples"] == 60
    assert stats["label_tokens"] == sum(int(s.label_mask.sum()) for s in samples)
    assert stats["steps"] == 2 * 4  # ceil(60 / 16) optimiser steps per epoch
    assert stats["final_loss"] < stats["first_loss"]
    assert (tmp_path / "a" / "adapter_config.json").exists()
    assert json.loads((tmp_path / "a" / "train.json").read_text())["key"] == "a"  # the directory names its key


def test_training_on_nothing_is_a_clear_error(tiny, data, tmp_path):
    train, _ = data
    s = [TrainSample(np.array(train[0]["input_ids"], dtype=np.int32), np.zeros(len(train[0]["input_ids"]), bool))]
    with pytest.raises(ValueError, match="no sample has a selected token"):
        training_table(s)


def test_effective_batch_must_divide_into_micro_batches():
    with pytest.raises(ValueError, match="not a multiple of per_device_batch_size 8 x ray.train_workers 2"):
        TrainConfig(batch_size=24, per_device_batch_size=8).accumulation(2)
    assert TrainConfig(batch_size=48, per_device_batch_size=8).accumulation(3) == 2


def test_continued_training_starts_from_previous_adapter(tiny, data, tmp_path):
    """theta_{t+1} = theta_t fine-tuned: the second run starts at the first run's loss, not the base's."""
    train, _ = data
    samples = [TrainSample(np.array(r["input_ids"], dtype=np.int32), np.array(r["response_mask"])) for r in train[:120]]
    first = _train(tiny, samples, tmp_path / "t1", epochs=2)
    second = _train(tiny, samples, tmp_path / "t2", init_adapter=str(tmp_path / "t1"))
    assert second["init_adapter"] == str(tmp_path / "t1")
    assert second["first_loss"] < first["first_loss"] - 0.05
    assert lora_shape(tmp_path / "t2") == lora_shape(tmp_path / "t1")


def test_loss_is_the_kept_token_mean_of_a_step(tiny, data, tmp_path):
    """The first step's loss equals a direct forward pass's mean NLL over the kept tokens
    of the step's samples, however the step is split into micro-batches."""
    train, _ = data
    rng = np.random.default_rng(1)
    samples = [TrainSample(np.array(r["input_ids"], dtype=np.int32),
                           np.array(r["response_mask"]) & (rng.random(len(r["input_ids"])) < 0.6)) for r in train[:16]]
    one = _train(tiny, samples, tmp_path / "one", per_device_batch_size=16)
    four = _train(tiny, samples, tmp_path / "four", per_device_batch_size=4)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny.model).eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in samples:
            if not s.label_mask.any():
                continue
            logits = model(torch.tensor(s.input_ids[None].astype(np.int64))).logits[0]
            pos = np.flatnonzero(s.label_mask)
            lp = torch.log_softmax(logits[pos - 1].float(), -1)
            nll -= float(lp[torch.arange(len(pos)), torch.tensor(s.input_ids[pos].astype(np.int64))].sum())
            n += len(pos)
    # LoRA B starts at zero, so step 1 sees the base model
    assert one["first_loss"] == pytest.approx(nll / n, rel=1e-5)
    assert four["first_loss"] == pytest.approx(nll / n, rel=1e-5)


def _forward_oracle(model, sample):
    """Per-target-position NLL and argmax == target from one plain forward pass (float64 NLL)."""
    pos = np.flatnonzero(sample.target)
    with torch.no_grad():
        logits = model(torch.tensor(sample.input_ids[None].astype(np.int64))).logits[0, pos - 1].double()
    tgt = torch.tensor(sample.input_ids[pos].astype(np.int64))
    nll = -torch.log_softmax(logits, -1)[torch.arange(len(pos)), tgt]
    return dict(zip(pos.tolist(), nll.tolist())), dict(zip(pos.tolist(), (logits.argmax(-1) == tgt).tolist()))


def _argmax_loop(model, prompt, n: int, stop: int) -> list[int]:
    """Greedy decoding written out: no cache, no batching, no padding, no generation config."""
    ids, new = torch.tensor([prompt.tolist()]), []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(ids).logits[0, -1].argmax())
            if nxt == stop:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return new


def _cloze_span(ok: dict, kind: str):
    """A span [a0, a1) of target positions whose cloze truth is known from ``ok`` and flips under any shift:
    'right' = all tokens greedy, both neighbours not; 'first' / 'last' = only the first / last token
    not greedy, the neighbour on the other side greedy (so dropping that token, or shifting away from
    it, would turn the span right)."""
    def good(p):
        return ok.get(p) is True

    def bad(p):
        return ok.get(p) is False

    for a0 in sorted(ok):
        for a1 in range(a0 + 1, a0 + 6):
            inner = range(a0, a1)
            if kind == "right" and bad(a0 - 1) and bad(a1) and all(good(p) for p in inner):
                return a0, a1, True
            if kind == "first" and a1 - a0 >= 2 and bad(a0) and good(a1) and all(good(p) for p in inner[1:]):
                return a0, a1, False
            if kind == "last" and a1 - a0 >= 2 and bad(a1 - 1) and good(a0 - 1) and all(good(p) for p in inner[:-1]):
                return a0, a1, False
    return None


def _answer_text(text: str, kind: str, gold: str):
    """An answer string whose match against the generated ``text`` is known by construction (or None):
    'word' = one of its words in upper case (found), 'phrase' = two adjacent words with the space between
    them widened (found), 'partial' = a word less its first letter (not found: not a whole word),
    'absent' = the gold answer, which the text does not contain at all (not found)."""
    words = text.split()
    plain = [w for w in words if w.isalnum()]
    lower = " ".join(words).lower()
    if kind == "word" and plain:
        return plain[0].upper(), True
    if kind == "phrase":
        pairs = [(a, b) for a, b in zip(words, words[1:]) if a.isalnum() and b.isalnum()]
        if pairs:
            return f"{pairs[0][0]} \n\t {pairs[0][1]}", True
    if kind == "partial":
        cut = [w[1:] for w in plain if len(w) >= 3 and w[1:].lower() not in {x.lower() for x in plain}]
        if cut:
            return cut[0], False
    if kind == "absent" and " ".join(gold.split()).lower() not in lower:
        return gold, False
    return None


def test_answer_metrics_and_loss_against_a_hand_computed_oracle(tiny, data):
    """Every metric of ``evaluate_model`` against truth known before it runs, on a model that gets
    some answers right and some wrong.

    The truth comes from the model written out by hand: one plain forward pass per sample (float64
    NLL, argmax == target) and greedy decoding as an argmax loop (no cache, no batching, no padding).
    Answers are then placed so that each one's outcome is known by construction:

    * cloze: answer spans over target positions that are entirely greedy with non-greedy neighbours
      (right), or have only the first / last token non-greedy (wrong); shifting any span by one, or
      dropping its first or last token, changes its outcome.
    * generated: each sample's prompt ends mid-response (a gap in the response mask starts a last turn
      there, so the tiny base model continues with words), and the answer is one of those words in upper
      case or two of them with the spacing changed (found), a word less its first letter or the gold answer
      (not found).
    * response_loss: the token mean of the forward pass's NLL over every target token, overall and per task
      (one sample has a single target token).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, evals = data
    rows = [r for r in evals if r["answer_start"] >= 0][:11]
    model = AutoModelForCausalLM.from_pretrained(tiny.model).eval()
    tok = AutoTokenizer.from_pretrained(tiny.model)
    max_new = 8
    samples, meta, truth_cloze, truth_gen, nll, tasks, placed = [], {}, {}, {}, {}, {}, set()
    gen_kinds, cloze_kinds = ["word", "partial", "phrase", "absent"], ["right", "first", "last", None]
    for i, r in enumerate(rows):
        ids, target = np.array(r["input_ids"], np.int32), np.array(r["response_mask"])
        cut = r["answer_start"] - 2
        target[cut - 1] = False  # the last turn starts at ``cut``: the prompt ends mid-response
        if i == 10:  # and a sample with a single target token
            target[:] = False
            target[cut] = True
        s = ShardSample(r["sample_id"], ids, target)
        losses, ok = _forward_oracle(model, s)
        answer = None
        if i < 8:  # 8 samples carry an answer text, two of each kind
            gen = tok.decode(_argmax_loop(model, ids[:cut], max_new, tok.eos_token_id), skip_special_tokens=True)
            answer = _answer_text(gen, gen_kinds[i % 4], r["answer"])
        span = _cloze_span(ok, cloze_kinds[i % 4]) if cloze_kinds[i % 4] else None
        sid = r["sample_id"]
        samples.append(s)
        tasks[sid] = ["t0", "t1", None][i % 3]
        no_span = (None, None) if i % 2 else (-1, -1)  # both spellings of "no answer span"
        meta[sid] = {"task": tasks[sid], "answer": span[:2] if span else no_span,
                     "answer_text": answer[0] if answer else None}
        nll[sid] = losses
        if span:
            truth_cloze[sid] = span[2]
            placed.add(cloze_kinds[i % 4])
        if answer:
            truth_gen[sid] = answer[1]
            placed.add(gen_kinds[i % 4])
    # the test has power only if every kind of span and answer was placed, so both outcomes occur
    assert placed == {"right", "first", "last", *gen_kinds}, placed

    res = evaluate_model(EvalJob(str(tiny.model), samples, meta, batch_tokens=4096, max_new_tokens=max_new,
                                 device="cpu", dtype="float32"))

    def expected(ids) -> dict:
        ids = list(ids)
        toks = [v for i in ids for v in nll[i].values()]
        out = {"response_loss": float(np.sum(toks)) / len(toks), "n_samples": len(ids)}
        if gen := [truth_gen[i] for i in ids if i in truth_gen]:
            out["answer_match"] = float(np.mean(gen))
        if cloze := [truth_cloze[i] for i in ids if i in truth_cloze]:
            out["answer_cloze_match"] = float(np.mean(cloze))
        return out

    # response_loss: the scorer's fp32 per-token NLL (packed varlen attention, chunked lm_head) differs from the
    # forward pass's float64 NLL by at most 7.5e-7 per token here (measured), so the means by no more; 5e-6 is
    # ~6x that and still catches a loss off by 3e-6 relative
    def check(got: dict, want: dict):
        assert got.keys() == want.keys()
        assert got["response_loss"] == pytest.approx(want["response_loss"], rel=0, abs=5e-6)
        assert {k: v for k, v in got.items() if k != "response_loss"} == \
            {k: v for k, v in want.items() if k != "response_loss"}

    check(res["overall"], expected(nll))
    assert set(res["by_task"]) == {"t0", "t1"}
    for t, got in res["by_task"].items():
        check(got, expected(i for i in nll if tasks[i] == t))
    # a generation budget of 0 skips the generated metric (and only it); 1 token still generates
    for budget in (0, 1):
        short = evaluate_model(EvalJob(str(tiny.model), samples, meta, batch_tokens=4096, max_new_tokens=budget,
                                       device="cpu", dtype="float32"))["overall"]
        assert ("answer_match" in short) == bool(budget)
        assert short["answer_cloze_match"] == res["overall"]["answer_cloze_match"]


def test_generation_starts_at_the_last_assistant_turn():
    from tokenclean.tasks.evaluate import last_turn_start

    assert last_turn_start(np.array([0, 0, 1, 1, 1], bool)) == 2  # one turn: its first token
    assert last_turn_start(np.array([0, 1, 1, 0, 0, 1, 1, 0], bool)) == 5  # two turns: the last one's
    assert last_turn_start(np.array([1, 0, 1, 0, 1], bool)) == 4
    with pytest.raises(ValueError, match="no response token"):
        last_turn_start(np.zeros(4, bool))


def test_answer_is_found_as_whole_words():
    from tokenclean.tasks.evaluate import answer_found

    assert answer_found("Port Velo", "Ana lives in  port velo.")
    assert answer_found("$5", "It costs $5 today") and answer_found("a heron", "A heron!")
    assert not answer_found("4", "There are 14 apples.") and not answer_found("B", "Because A")
    assert not answer_found("Dot", "a heron named Dotty")


def test_generation_is_greedy_whatever_the_checkpoint_asks_for(tiny, data, tmp_path):
    """A generation_config.json with sampling settings and a repetition penalty (Qwen2.5-Instruct ships
    one) does not change the metric's decoding: it equals a hand-written argmax loop."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenclean.tasks.evaluate import last_turn_start
    from tokenclean.tasks.generate import generate_responses

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny.model, ckpt)
    (ckpt / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.3,
         "no_repeat_ngram_size": 2}))
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    _, evals = data
    prompts = [np.array(r["input_ids"][:last_turn_start(np.array(r["response_mask"]))]) for r in evals[:12]]
    got = generate_responses(model, tok, prompts, max_new_tokens=24, stop_ids=[tok.eos_token_id], device="cpu")
    for p, text in zip(prompts, got):
        ids = torch.tensor([p.tolist()])
        new = []
        with torch.no_grad():
            for _ in range(24):
                nxt = int(model(ids).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        assert text == tok.decode(new, skip_special_tokens=True)
