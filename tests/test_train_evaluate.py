"""LoRA training on selected tokens and held-out evaluation, on the tiny real model."""

import json
import numpy as np
import pytest
import torch

from tokenclean.tasks.evaluate import evaluate_model
from tokenclean.tasks.ingest import ingest
from tokenclean.tasks.score import ShardSample, process_model
from tokenclean.tasks.train import TrainSample, train_lora
from tokenclean.config import LoraConfig, TrainConfig


@pytest.fixture(scope="module")
def data(tiny, tokenizer):
    res = ingest([str(tiny.train)], [str(tiny.eval)], tokenizer, max_length=256, eval_fraction=0.0, n_parts=2, seed=0)
    rows = res.samples.to_pylist()
    train = [r for r in rows if r["part"] >= 0]
    evals = [r for r in rows if r["part"] == -1]
    return train, evals


def _cfg(**kw):
    return TrainConfig(lr=5e-3, batch_tokens=2048, lora=LoraConfig(r=8, alpha=16, dropout=0.0), **kw)


def test_training_uses_only_selected_tokens_and_drops_empty_samples(tiny, data, tmp_path):
    train, _ = data
    samples = []
    for i, r in enumerate(train[:80]):
        mask = np.array(r["response_mask"])
        if i % 4 == 0:
            mask[:] = False  # a sample that lost every token
        samples.append(TrainSample(np.array(r["input_ids"], dtype=np.int32), mask))
    stats = train_lora(str(tiny.model), samples, _cfg(), tmp_path / "a", progress=False, key="k1")
    assert stats["samples"] == 60
    assert stats["label_tokens"] == sum(int(s.label_mask.sum()) for s in samples)
    assert stats["final_loss"] < stats["first_loss"]
    assert (tmp_path / "a" / "adapter_config.json").exists()
    assert json.loads((tmp_path / "a" / "train.json").read_text())["key"] == "k1"  # the directory names its key


def test_training_on_nothing_is_a_clear_error(tiny, data, tmp_path):
    train, _ = data
    s = [TrainSample(np.array(train[0]["input_ids"], dtype=np.int32), np.zeros(len(train[0]["input_ids"]), bool))]
    with pytest.raises(ValueError, match="no sample has a selected token"):
        train_lora(str(tiny.model), s, _cfg(), tmp_path / "b", progress=False)


def test_continued_training_starts_from_previous_adapter(tiny, data, tmp_path):
    """theta_{t+1} = theta_t fine-tuned: the second run starts at the first run's loss, not the base's."""
    train, _ = data
    samples = [TrainSample(np.array(r["input_ids"], dtype=np.int32), np.array(r["response_mask"])) for r in train[:120]]
    first = train_lora(str(tiny.model), samples, _cfg(epochs=2), tmp_path / "t1", progress=False)
    second = train_lora(str(tiny.model), samples, _cfg(), tmp_path / "t2", init_adapter=str(tmp_path / "t1"),
                        progress=False)
    assert second["init_adapter"] == str(tmp_path / "t1")
    assert second["first_loss"] < first["first_loss"] - 0.05


def test_exact_match_equals_greedy_decoding(tiny, data):
    """The teacher-forced metric must agree with real greedy generation, sample by sample."""
    from transformers import AutoModelForCausalLM

    _, evals = data
    evals = [r for r in evals if r["answer_start"] >= 0][:25]
    samples = [ShardSample(r["sample_id"], np.array(r["input_ids"], np.int32), np.array(r["response_mask"]))
               for r in evals]
    meta = {r["sample_id"]: {"task": r["task"], "answer": (r["answer_start"], r["answer_end"])} for r in evals}
    sm = process_model(str(tiny.model))
    table = sm.losses(samples, adapter=None, batch_tokens=4096, chunk=64, with_correct=True).to_pylist()
    model = AutoModelForCausalLM.from_pretrained(tiny.model).eval()
    n_match = 0
    for r in evals:
        a0, a1 = r["answer_start"], r["answer_end"]
        ok = all(t["correct"] for t in table if t["sample_id"] == r["sample_id"] and a0 <= t["pos"] < a1)
        with torch.no_grad():
            gen = model.generate(torch.tensor([r["input_ids"][:a0]]), max_new_tokens=a1 - a0, do_sample=False,
                                 pad_token_id=0)
        greedy = gen[0, a0:].tolist() == r["input_ids"][a0:a1]
        assert ok == greedy, r["sample_id"]
        n_match += greedy
    res = evaluate_model(str(tiny.model), None, samples, meta, batch_tokens=4096)
    assert res["overall"]["answer_exact_match"] == pytest.approx(n_match / len(evals))
    assert set(res["by_task"]) <= {"city", "job", "pet", "hobby"}
    assert res["overall"]["response_loss"] > 0
