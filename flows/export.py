"""`tokenclean export`: find a variant's selection or model in a run, then write it (``tasks/export.py``).

A name is resolved through the outputs of the latest finished run of each flow, so an export
is of the configuration that last ran to the end, never of a killed run's half-made outputs.
"""
from __future__ import annotations

from pathlib import Path

from tokenclean.summary import names_of, outputs_named
from tokenclean.tasks import storage, store
from tokenclean.tasks.export import export_model, write_dataset
from tokenclean.tasks.names import label


def verified_base(con, base_key: str) -> tuple[str, str]:
    """(path, weights hash) of the base model a run recorded under ``base_key``, after checking its weights are
    still the ones hashed into that key: a model directory rewritten in place since the run would otherwise be
    merged (or evaluated) under the old key. Whoever loads it from object storage checks its copy against the
    hash again (``storage.open_model``)."""
    inputs = store.model_inputs(con, base_key)
    path = inputs["path"]
    now = storage.weights_hash(path)
    if now != inputs["weights"]:
        raise ValueError(f"the base model at {path} is not the one this run used: its weights hash {now[:12]}, "
                         f"the run's {inputs['weights'][:12]}. Restore those weights, or re-run the pipeline")
    return path, now


def open_run(run: Path):
    """The run's database, read-only; a clear error where the directory holds none."""
    db = Path(run) / store.DB_FILE
    if not db.exists():
        raise FileNotFoundError(f"no tokenclean database at {db}")
    return store.connect(db, read_only=True)


def _outputs(con, name: str, kind: str) -> list[tuple[int, str]]:
    """(iteration, key) of the current outputs called ``name`` (``self-evolving``: every iteration)."""
    return [(o["iteration"], o["key"]) for o in outputs_named(con, name, kind)]


def export_run_selection(run: Path, name: str, fmt: str, out: Path | None = None, *, overwrite: bool = False) -> dict:
    """The current selection ``name`` of a run as a dataset (``self-evolving``: D1..DT, each by its iteration)."""
    run = Path(run)
    con = open_run(run)
    try:
        found = _outputs(con, name, "selection")
        if not found or name in ("reference", "reference-d0", "base"):
            raise ValueError(f"no selection named {name!r} in the latest runs of {run} "
                             f"(names: {names_of(con, 'selection')}; self-evolving names every iteration)")
        records = [store.selection_record(con, key) for _, key in found]
        suffix = {"parquet": ".parquet", "jsonl": ".jsonl", "hf": ""}[fmt]
        out = Path(out) if out else run / "export" / "data" / f"{name}{suffix}"
        missing = store.samples_without_text(con, [r["selection"] for r in records])
        # one cursor per streamed result: a DuckDB connection serves one open result at a time
        readers = (store.selection_reader(con.cursor(), r["selection"], r["scores"]) for r in records)
        about = {"selection": name, "selections": [r["selection"] for r in records],
                 "method": records[0]["method"], "k": records[0]["k"],
                 "pool_tokens": sum(r["n_candidates"] for r in records), "samples_without_text": missing}
        res = write_dataset(readers, out, fmt, overwrite=overwrite, manifest=about)
    finally:
        con.close()
    return about | res


def export_run_model(run: Path, name: str, out: Path | None = None, *, adapter_only: bool = False,
                     overwrite: bool = False) -> dict:
    """The model of variant ``name``: its adapter (``self-evolving``: the last iteration's) merged into the base."""
    run = Path(run)
    con = open_run(run)
    try:
        found = _outputs(con, name, "adapter")
        if not found:
            raise ValueError(f"no model named {name!r} in the latest runs of {run} "
                             f"(names: {names_of(con, 'adapter')}; self-evolving names the last iteration)")
        iteration, train_key = found[-1]
        rec = store.adapter_record(con, train_key)
        base_key = rec["inputs"]["base_model"]
        base_path, base_weights = verified_base(con, base_key)
        # the template and tokenizer of the data this adapter was trained on (not of whichever run came last)
        trained_on = store.selection_record(con, rec["inputs"]["selection"])["dataset"]
        dataset = store.artifact_inputs(con, "dataset", trained_on)["inputs"]
    finally:
        con.close()
    variant = label(name.split("@")[0], iteration)
    out = Path(out) if out else run / "export" / ("adapter" if adapter_only else "model") / variant
    provenance = {"variant": variant, "adapter": train_key, "model": rec["model"], "base_model": base_key,
                  "base_path": base_path, "template": dataset.get("template", "tulu"),
                  "tokenizer": dataset["tokenizer"], "train": rec["inputs"].get("train")}
    adapter = storage.open_adapter(storage.under(run, rec["path"]), rec["model"], base_key)
    res = export_model(base_path, adapter, dataset["tokenizer"], out, template=dataset.get("template", "tulu"),
                       adapter_only=adapter_only, provenance=provenance, overwrite=overwrite, base_weights=base_weights,
                       tokenizer_fingerprint=dataset.get("tokenizer_fingerprint"))
    return res | {"variant": variant, "adapter": train_key}
