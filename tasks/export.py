"""Take a run's results away: a cleaned dataset any trainer can use, a model anyone can serve.

The writers; ``flows/export.py`` is the ``tokenclean export`` command that finds what to write in a run.

* ``write_dataset``: one selection (or the self-evolving iterations together) as a
  dataset of ``input_ids``, ``attention_mask`` and ``labels`` (the token id where it was
  kept, -100 where it was not kept or is not a target), ``token_weights`` (a ``weighted``
  selection's per-token loss weights, > 0 exactly where the label is not -100, 0 elsewhere;
  the column is always there, null for an unweighted selection, so every export has one schema),
  the kept character spans of the rendered text, and the token scores. transformers causal LMs shift labels inside the
  model, and our labels sit at the token's own position, so ``Trainer`` with a collator that
  pads labels with -100 (``DataCollatorForSeq2Seq``) trains on exactly the kept tokens, unchanged.
  Formats: Parquet, JSONL, and a ``datasets`` directory (``save_to_disk``). Written as it
  streams out of DuckDB, batch by batch, then renamed into place: an interrupted export
  leaves no half file under the final name, and nothing beside it.
* Where: only a new path or, with ``overwrite``, an earlier export of the same kind; never a run
  directory's own files (``export_target``).
* ``export_model``: base + a variant's LoRA adapter merged into a standard transformers
  model directory with its tokenizer (``AutoModelForCausalLM.from_pretrained``, vLLM), or
  the PEFT adapter alone. A Tulu-trained model gets the Tulu chat template written into
  its tokenizer, so ``apply_chat_template`` at serving time reproduces training's text.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from tokenclean.tasks import storage
from tokenclean.tasks.export_target import check_target, commit, staging

FORMATS = ("parquet", "jsonl", "hf")

EXPORT_SCHEMA = pa.schema([
    ("id", pa.string()), ("sample_id", pa.int64()), ("task", pa.string()),
    ("input_ids", pa.list_(pa.int32())), ("attention_mask", pa.list_(pa.int8())), ("labels", pa.list_(pa.int32())),
    ("token_weights", pa.list_(pa.float32())), ("text", pa.string()), ("kept_spans", pa.list_(pa.list_(pa.int32()))),
    ("token_scores", pa.list_(pa.float32())), ("n_kept", pa.int32()),
])


def kept_spans(kept: np.ndarray, char_start, char_end) -> list[list[int]] | None:
    """Character spans [start, end) of the runs of consecutive kept tokens, in the rendered text.

    A run starts at its first token's anchor (a word's first character, not the space
    byte-level BPE glues to it) and ends where its last token ends.
    """
    if char_start is None or char_end is None:
        return None  # a sample ingested before the text was stored (schema 2)
    if not len(kept):
        return []
    breaks = np.flatnonzero(np.diff(kept) > 1)
    firsts = np.concatenate([[kept[0]], kept[breaks + 1]])
    lasts = np.concatenate([kept[breaks], [kept[-1]]])
    return [[int(char_start[a]), int(char_end[b])] for a, b in zip(firsts, lasts)]


def export_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Stored rows (``store.selection_reader``) -> exported rows (``EXPORT_SCHEMA``).

    Labels come from ``train.labels_of``, the one definition of the label convention that
    tokenclean's own training uses, so an exported sample trains as it did in the run.
    """
    from tokenclean.tasks.select import samples_of
    from tokenclean.tasks.train import labels_of

    cols = {f.name: [] for f in EXPORT_SCHEMA}
    for row, sample in zip(batch.to_pylist(), samples_of(batch)):
        ids, kept = sample.input_ids, np.asarray(row["kept"], dtype=np.int64)
        labels = labels_of(sample)
        scores = None
        if row["score_pos"] is not None:
            s = np.full(len(ids), np.nan, dtype=np.float32)
            s[np.asarray(row["score_pos"], dtype=np.int64)] = np.asarray(row["score"], dtype=np.float32)
            scores = [None if np.isnan(v) else float(v) for v in s]
        cols["id"].append(row["uid"])
        cols["sample_id"].append(row["sample_id"])
        cols["task"].append(row["task"])
        cols["input_ids"].append(ids.tolist())
        cols["attention_mask"].append([1] * len(ids))
        cols["labels"].append(labels.tolist())
        cols["token_weights"].append(None if sample.weights is None else sample.weights.tolist())
        cols["text"].append(row["text"])
        cols["kept_spans"].append(kept_spans(kept, row["char_start"], row["char_end"]))
        cols["token_scores"].append(scores)
        cols["n_kept"].append(len(kept))
    return pa.RecordBatch.from_pydict(cols, schema=EXPORT_SCHEMA)


def write_dataset(readers, out: Path, fmt: str, *, overwrite: bool = False, manifest: dict | None = None) -> dict:
    """Write the exported rows of ``readers`` (record-batch readers) to ``out`` in ``fmt``; returns counts.

    ``out`` must be new, or an earlier dataset export of the same format with ``overwrite``
    (``export_target.check_target``); ``manifest`` goes into the export's manifest with the counts."""
    import pyarrow.parquet as pq

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {FORMATS}")
    out, kind = Path(out), f"dataset-{fmt}"
    check_target(out, kind, overwrite=overwrite)
    n_rows = n_kept = 0
    with staging(out) as stage:
        data = stage / ("rows.jsonl" if fmt == "jsonl" else "rows.parquet")
        with (pq.ParquetWriter(data, EXPORT_SCHEMA) if fmt != "jsonl" else open(data, "w")) as sink:
            for reader in readers:
                for batch in reader:
                    rows = export_batch(batch)
                    n_rows += rows.num_rows
                    n_kept += int(pa.compute.sum(rows.column("n_kept")).as_py() or 0)
                    if fmt == "jsonl":
                        for r in rows.to_pylist():
                            sink.write(json.dumps(r) + "\n")
                    else:
                        sink.write_batch(rows)
        if fmt == "hf":
            import datasets

            staged = stage / "dataset"
            datasets.Dataset.from_parquet(str(data)).save_to_disk(str(staged))
        else:
            staged = data
        res = {"rows": n_rows, "kept_tokens": n_kept, "path": str(out), "format": fmt}
        res["manifest"] = str(commit(staged, out, kind, {**(manifest or {}), **res}))
    return res


def export_model(base_path: str, adapter_dir: str, tokenizer_path: str, out: Path, *, template: str,
                 adapter_only: bool = False, provenance: dict | None = None, overwrite: bool = False,
                 base_weights: str | None = None, tokenizer_fingerprint: str | None = None) -> dict:
    """Base + adapter merged (or the adapter alone) into ``out``, with the tokenizer and a provenance manifest.
    A base in object storage loads from this machine's copy, checked against ``base_weights``; the tokenizer is
    checked against ``tokenizer_fingerprint`` (the one the training data was tokenized with), when recorded.

    ``out`` must be new, or an earlier export of the same kind with ``overwrite`` (``export_target``)."""
    from tokenclean.tasks.template import TULU_JINJA, load_tokenizer

    out, kind = Path(out), "adapter" if adapter_only else "model"
    check_target(out, kind, overwrite=overwrite)
    tokenizer = load_tokenizer(tokenizer_path, tokenizer_fingerprint)
    if template == "tulu":
        tokenizer.chat_template = TULU_JINJA  # serve with the text the model was trained on
    with staging(out) as stage:
        staged = stage / kind
        if adapter_only:
            shutil.copytree(adapter_dir, staged, ignore=shutil.ignore_patterns("train.json", "steps.jsonl"))
            cfg_path = staged / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["base_model_name_or_path"] = str(base_path)
            cfg_path.write_text(json.dumps(cfg, indent=2))
        else:
            import torch
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(storage.open_model(base_path, base_weights), dtype="auto")
            with torch.no_grad():
                model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
            model.save_pretrained(staged, safe_serialization=True)
        tokenizer.save_pretrained(staged)
        commit(staged, out, kind, provenance or {})
    return {"path": str(out), "merged": not adapter_only}
