"""Held-out evaluation: response loss and two answer metrics, overall and per task.

* ``answer_match`` (the headline): greedy generation from the prompt alone, up to
  ``max_new_tokens`` or the end of the turn; correct iff the answer string occurs in the
  generated text (case and runs of whitespace ignored). This is what a user of the
  model sees: it has to produce the boilerplate before the answer itself.
* ``answer_cloze_match``: teacher-forced. Correct iff every answer token is the model's
  argmax given the *gold* prefix (the boilerplate before the answer is given). Computed
  in the loss pass at no extra cost; a cloze test, reported beside the headline.
* ``response_loss``: mean NLL of the response tokens, teacher-forced.
"""
from __future__ import annotations

import re

import numpy as np

from tokenclean.tasks import store
from tokenclean.tasks.jobs import EvalJob
from tokenclean.tasks.score import ShardSample, process_model


def load_eval_samples(con, dataset: str, max_samples: int | None = None):
    rows = store.eval_rows(con, dataset, max_samples)
    samples = [ShardSample(r.sample_id, np.asarray(r.input_ids, dtype=np.int32),
                           np.asarray(r.response_mask, dtype=bool)) for r in rows]
    meta = {r.sample_id: {"task": r.task, "answer": (r.answer_start, r.answer_end), "answer_text": r.answer}
            for r in rows}
    return samples, meta


def last_turn_start(response_mask: np.ndarray) -> int:
    """Position of the first token of the last assistant turn: the prompt a generation starts from."""
    idx = np.flatnonzero(response_mask)
    if not len(idx):
        raise ValueError("sample has no response token")
    gaps = np.flatnonzero(np.diff(idx) > 1)
    return int(idx[gaps[-1] + 1]) if len(gaps) else int(idx[0])


def normalize_answer(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def answer_found(answer: str, generated: str) -> bool:
    """The answer occurs in the generated text as whole words (case and spacing normalised): "4" is not
    found in "14 apples", nor "B" in "Because"."""
    pattern = r"(?<!\w)" + re.escape(normalize_answer(answer)) + r"(?!\w)"
    return re.search(pattern, normalize_answer(generated)) is not None


def stop_token_ids(tokenizer, samples) -> list[int]:
    """EOS plus every special token that ends a gold response (``<|eot_id|>``, ``<|im_end|>``, ``</s>``)."""
    special = set(tokenizer.all_special_ids)
    stops = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for s in samples:
        idx = np.flatnonzero(s.target)
        if len(idx) and int(s.input_ids[idx[-1]]) in special:
            stops.add(int(s.input_ids[idx[-1]]))
    return sorted(stops)


def evaluate_model(job: EvalJob) -> dict:
    """Metrics of base (+ adapter) on the eval samples: {'overall': {...}, 'by_task': {task: {...}}}."""
    samples, meta = job.samples, job.meta
    if not samples:
        raise ValueError("no held-out samples (part = -1): set data.eval_paths or data.eval_fraction > 0")
    sm = process_model(job.base_path, job.device, job.dtype, model_key=job.base_key, weights=job.base_weights)
    table = sm.losses(samples, adapter=job.adapter, adapter_key=job.adapter_key, batch_tokens=job.batch_tokens,
                      chunk=job.chunk, with_correct=True)
    generated = _generated_matches(sm, job) if job.max_new_tokens > 0 else {}
    sid = table.column("sample_id").to_numpy()
    pos = table.column("pos").to_numpy()
    loss = table.column("loss").to_numpy()
    ok = table.column("correct").to_numpy(zero_copy_only=False)
    per_sample: dict[int, dict] = {}
    order = np.argsort(sid, kind="stable")
    sid, pos, loss, ok = sid[order], pos[order], loss[order], ok[order]
    bounds = np.flatnonzero(np.diff(sid)) + 1
    for s_idx, p, lo, c in zip(np.split(sid, bounds), np.split(pos, bounds), np.split(loss, bounds),
                              np.split(ok, bounds)):
        s = int(s_idx[0])
        a0, a1 = meta[s]["answer"]
        cloze = None
        if a0 is not None and a0 >= 0:
            in_ans = (p >= a0) & (p < a1)
            cloze = bool(c[in_ans].all()) if in_ans.any() else None
        per_sample[s] = {"loss_sum": float(lo.sum()), "n": len(lo), "cloze": cloze, "gen": generated.get(s),
                         "task": meta[s]["task"]}

    def agg(items) -> dict:
        items = list(items)
        n = sum(x["n"] for x in items)
        out = {"response_loss": sum(x["loss_sum"] for x in items) / n if n else float("nan"),
               "n_samples": len(items)}
        gen = [x["gen"] for x in items if x["gen"] is not None]
        cloze = [x["cloze"] for x in items if x["cloze"] is not None]
        if gen:
            out["answer_match"] = float(np.mean(gen))
        if cloze:
            out["answer_cloze_match"] = float(np.mean(cloze))
        return out

    by_task: dict[str, list] = {}
    for x in per_sample.values():
        if x["task"] is not None:
            by_task.setdefault(x["task"], []).append(x)
    return {"overall": agg(per_sample.values()), "by_task": {t: agg(v) for t, v in sorted(by_task.items())}}


def _generated_matches(sm, job: EvalJob) -> dict:
    """{sample_id: answer found in the greedy generation} for the samples that carry an answer."""
    from tokenclean.tasks.template import load_tokenizer

    meta = job.meta
    with_answer = [s for s in job.samples if meta[s.sample_id].get("answer_text")]
    if not with_answer:
        return {}
    tokenizer = load_tokenizer(job.tokenizer_path or job.base_path, job.tokenizer_fingerprint)
    prompts = [s.input_ids[:last_turn_start(s.target)] for s in with_answer]
    texts = sm.generate(prompts, adapter=job.adapter, adapter_key=job.adapter_key, tokenizer=tokenizer,
                        max_new_tokens=job.max_new_tokens, stop_ids=stop_token_ids(tokenizer, with_answer))
    return {s.sample_id: answer_found(meta[s.sample_id]["answer_text"], t) for s, t in zip(with_answer, texts)}


def metric_rows(result: dict) -> list[tuple[str, str | None, float]]:
    """(metric, task, value) rows of an ``evaluate_model`` result; task None is the overall figure."""
    rows = [(m, None, float(v)) for m, v in result["overall"].items()]
    rows += [(m, t, float(v)) for t, metrics in result["by_task"].items() for m, v in metrics.items()]
    return rows
