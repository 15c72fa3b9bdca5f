"""LoRA training on selected tokens and held-out evaluation, on the tiny real model."""

import json
import re
import numpy as np
import pytest
import torch

from tokenclean.tasks.evaluate import evaluate_model
from tokenclean.tasks.ingest import ingest
from tokenclean.tasks.score import ShardSample, process_model
from tokenclean.tasks.train import TrainJob, TrainSample, lora_shape, train_worker, training_table
from tokenclean.config import TrainConfig


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


def test_answer_metrics_equal_greedy_decoding(tiny, data):
    """Both answer metrics against an independent, unbatched ``generate`` per sample.

    Cloze: every answer token is greedy given the gold prefix. Generated: the answer
    string occurs in the greedy continuation of the prompt alone (batched, left-padded
    in the metric; one sample at a time here, so padding cannot go unnoticed).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenclean.tasks.evaluate import last_turn_start

    _, evals = data
    evals = [r for r in evals if r["answer_start"] >= 0][:25]
    samples = [ShardSample(r["sample_id"], np.array(r["input_ids"], np.int32), np.array(r["response_mask"]))
               for r in evals]
    meta = {r["sample_id"]: {"task": r["task"], "answer": (r["answer_start"], r["answer_end"]),
                             "answer_text": r["answer"]} for r in evals}
    sm = process_model(str(tiny.model))
    table = sm.losses(samples, adapter=None, batch_tokens=4096, chunk=64, with_correct=True).to_pylist()
    model = AutoModelForCausalLM.from_pretrained(tiny.model).eval()
    tok = AutoTokenizer.from_pretrained(tiny.model)
    n_cloze = n_gen = 0
    for r in evals:
        a0, a1 = r["answer_start"], r["answer_end"]
        ok = all(t["correct"] for t in table if t["sample_id"] == r["sample_id"] and a0 <= t["pos"] < a1)
        with torch.no_grad():
            gen = model.generate(torch.tensor([r["input_ids"][:a0]]), max_new_tokens=a1 - a0, do_sample=False,
                                 pad_token_id=0)
            start = last_turn_start(np.array(r["response_mask"]))
            free = model.generate(torch.tensor([r["input_ids"][:start]]), max_new_tokens=40, do_sample=False,
                                  eos_token_id=tok.eos_token_id, pad_token_id=0)
        greedy = gen[0, a0:].tolist() == r["input_ids"][a0:a1]
        assert ok == greedy, r["sample_id"]
        n_cloze += greedy
        text = tok.decode(free[0, start:].tolist(), skip_special_tokens=True)
        norm = lambda t: " ".join(t.lower().split())  # noqa: E731
        n_gen += re.search(r"(?<!\w)" + re.escape(norm(r["answer"])) + r"(?!\w)", norm(text)) is not None
    res = evaluate_model(str(tiny.model), None, samples, meta, batch_tokens=4096, max_new_tokens=40)
    assert res["overall"]["answer_cloze_match"] == pytest.approx(n_cloze / len(evals))
    assert res["overall"]["answer_match"] == pytest.approx(n_gen / len(evals))
    assert set(res["by_task"]) <= {"city", "job", "pet", "hobby"}
    assert res["overall"]["response_loss"] > 0


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

    from tokenclean.tasks.evaluate import generate_responses, last_turn_start

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
