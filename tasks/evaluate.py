"""Held-out evaluation: response loss and answer exact match, overall and per task.

Exact match is teacher-forced: the answer counts as correct iff every answer token is
the model's argmax given the gold prefix. That is exactly the condition under which
greedy decoding from the gold prefix reproduces the answer, computed in one forward
pass instead of a decode loop.
"""
from __future__ import annotations

import numpy as np

from tokenclean.tasks import store
from tokenclean.tasks.score import ShardSample, process_model


def load_eval_samples(con, dataset: str, max_samples: int | None = None):
    rows = store.eval_rows(con, dataset, max_samples)
    samples = [ShardSample(r[0], np.asarray(r[2], dtype=np.int32), np.asarray(r[3], dtype=bool)) for r in rows]
    meta = {r[0]: {"task": r[1], "answer": (r[4], r[5])} for r in rows}
    return samples, meta


def evaluate_model(base_path: str, adapter: str | None, samples, meta, *, batch_tokens: int, chunk: int = 2048,
                   device: str = "auto", dtype: str = "auto", base_key: str | None = None,
                   adapter_key: str | None = None) -> dict:
    """Metrics of base (+ adapter) on the eval samples: {'overall': {...}, 'by_task': {task: {...}}}."""
    if not samples:
        raise ValueError("no held-out samples (part = -1): set data.eval_paths or data.eval_fraction > 0")
    sm = process_model(base_path, device, dtype, model_key=base_key)
    table = sm.losses(samples, adapter=adapter, adapter_key=adapter_key, batch_tokens=batch_tokens, chunk=chunk,
                      with_correct=True)
    sid = table.column("sample_id").to_numpy()
    pos = table.column("pos").to_numpy()
    loss = table.column("loss").to_numpy()
    ok = table.column("correct").to_numpy(zero_copy_only=False)
    per_sample: dict[int, dict] = {}
    order = np.argsort(sid, kind="stable")
    sid, pos, loss, ok = sid[order], pos[order], loss[order], ok[order]
    bounds = np.flatnonzero(np.diff(sid)) + 1
    for s_idx, p, l, c in zip(np.split(sid, bounds), np.split(pos, bounds), np.split(loss, bounds),
                              np.split(ok, bounds)):
        s = int(s_idx[0])
        a0, a1 = meta[s]["answer"]
        em = None
        if a0 is not None and a0 >= 0:
            in_ans = (p >= a0) & (p < a1)
            em = bool(c[in_ans].all()) if in_ans.any() else None
        per_sample[s] = {"loss_sum": float(l.sum()), "n": len(l), "em": em, "task": meta[s]["task"]}

    def agg(items) -> dict:
        items = list(items)
        n = sum(x["n"] for x in items)
        ems = [x["em"] for x in items if x["em"] is not None]
        out = {"response_loss": sum(x["loss_sum"] for x in items) / n if n else float("nan"),
               "n_samples": len(items)}
        if ems:
            out["answer_exact_match"] = float(np.mean(ems))
        return out

    by_task: dict[str, list] = {}
    for x in per_sample.values():
        if x["task"] is not None:
            by_task.setdefault(x["task"], []).append(x)
    return {"overall": agg(per_sample.values()), "by_task": {t: agg(v) for t, v in sorted(by_task.items())}}


def metric_rows(result: dict) -> list[tuple[str, str | None, float]]:
    """(metric, task, value) rows of an ``evaluate_model`` result; task None is the overall figure."""
    rows = [(m, None, float(v)) for m, v in result["overall"].items()]
    rows += [(m, t, float(v)) for t, metrics in result["by_task"].items() for m, v in metrics.items()]
    return rows
