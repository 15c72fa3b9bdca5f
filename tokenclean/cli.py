"""`tokenclean` command line: run a config, run the demo, inspect a run."""
from __future__ import annotations

import json
import os
import time
from importlib import resources
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Token-level cleaning of SFT data.")

SET_HELP = "Override a config key, e.g. --set select.k=0.5 --set train.lr=2e-4 (repeatable)."


def _quiet_env() -> None:
    # Ray and Prefect talk a lot at INFO; keep the terminal for our own progress bars.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _report(cfg) -> None:
    from tokenclean.tasks.store import connect
    from tokenclean.summary import comparison, format_table, run_overview, stage_times

    con = connect(cfg.db_path, read_only=True)
    try:
        ov = run_overview(con)
        typer.echo(f"\nrun {cfg.run_dir}: {json.dumps(ov['ingest'])}")
        typer.echo(format_table(comparison(con)))
        typer.echo("\nstage timings (s): " + ", ".join(f"{s}:{k}={t:.1f}" for s, k, t in stage_times(con)))
    finally:
        con.close()


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg="red", err=True)
    raise typer.Exit(2)


def _load(config, overrides):
    from pydantic import ValidationError

    from tokenclean.config import load_config

    try:
        return load_config(config, overrides)
    except ValidationError as e:
        _fail(f"invalid config {config}:\n{e}")
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))


def _run(cfg) -> None:
    from tokenclean.flows.cleaning import run
    from tokenclean.tasks.store import DatabaseBusy, SchemaMismatch

    t0 = time.perf_counter()
    try:
        run(cfg)
    except (DatabaseBusy, SchemaMismatch, FileNotFoundError) as e:
        _fail(str(e))
    _report(cfg)
    typer.echo(f"total wall time: {time.perf_counter() - t0:.1f} s")


@app.command("run")
def run_cmd(config: Path = typer.Argument(..., help="YAML run config"),
            set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP)) -> None:
    """Run the flows a config asks for (fixed-model, self-evolving or both)."""
    _quiet_env()
    _run(_load(config, set_ or []))


@app.command("refresh")
def refresh_cmd(config: Path = typer.Argument(..., help="YAML run config of an existing run"),
                set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP)) -> None:
    """Re-read the inputs, score only new/changed samples (stored base losses reused), re-rank globally."""
    from tokenclean.flows.cleaning import refresh
    from tokenclean.tasks.store import DatabaseBusy, SchemaMismatch

    _quiet_env()
    cfg = _load(config, set_ or [])
    try:
        out = refresh(cfg)
    except (DatabaseBusy, SchemaMismatch, FileNotFoundError) as e:
        _fail(str(e))
    sel = out["selection"]
    typer.echo(f"refresh: {json.dumps(out['refresh'])}; kept {sel['n_kept']}/{sel['n_candidates']} tokens "
               f"(threshold {sel['threshold']})")


@app.command()
def serve(config: Path = typer.Argument(..., help="YAML run config"),
          cron: Optional[str] = typer.Option(None, help="refresh schedule, e.g. '0 3 * * 1' (Mondays 03:00)"),
          interval: Optional[int] = typer.Option(None, help="refresh every N seconds instead of cron"),
          name: Optional[str] = typer.Option(None, help="deployment name (default: the run name)")) -> None:
    """Register and serve the scheduled-refresh deployment (cron or interval) with Prefect.

    Needs a Prefect server (`prefect server start`, PREFECT_API_URL set): schedules
    live there, and its UI is the ops dashboard. Blocks until interrupted.
    """
    from prefect import serve as prefect_serve
    from prefect.deployments.runner import EntrypointType
    from prefect.settings import PREFECT_API_URL

    from tokenclean.flows.cleaning import scheduled_refresh

    _quiet_env()
    if not (os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()):
        _fail("serve needs a Prefect server: run `prefect server start` and set PREFECT_API_URL "
              "(e.g. http://127.0.0.1:4200/api)")
    if cron and interval:
        _fail("give --cron or --interval, not both")
    cfg = _load(config, [])
    params = {"config": cfg.model_dump(mode="json")}
    # Module-path entrypoint: a flow loaded from a file path lives in a module Ray
    # workers cannot import ('cleaning' instead of 'tokenclean.flows.cleaning').
    dep = scheduled_refresh.to_deployment(name=name or cfg.name, parameters=params, cron=cron, interval=interval,
                                          description=f"token-cleaning refresh of {cfg.run_dir}",
                                          entrypoint_type=EntrypointType.MODULE_PATH)
    typer.echo(f"serving deployment scheduled-refresh/{name or cfg.name} "
               f"({'cron ' + cron if cron else f'every {interval}s' if interval else 'no schedule'})")
    prefect_serve(dep)


@app.command()
def demo(workdir: Path = typer.Option(Path("runs"), help="where the run directory goes"),
         set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP)) -> None:
    """Build the embedded tiny model + data if needed, run both flows and every baseline, print the table."""
    _quiet_env()
    with resources.as_file(resources.files("tokenclean") / "configs" / "demo.yaml") as path:
        cfg = _load(path, [f"workdir={workdir}", *(set_ or [])])
    _run(cfg)


@app.command()
def inspect(run: Path = typer.Argument(..., help="run directory or its tokenclean.duckdb"),
            sample: Optional[str] = typer.Option(None, help="show one sample's tokens (its id in the input, or sample_id)"),
            selection: str = typer.Option("global", help="variant whose kept tokens --sample marks "
                                                         "(global, local, random, full, self-evolving@T)"),
            keys: bool = typer.Option(True, "--keys/--no-keys", help="list every artifact with its key and inputs")) -> None:
    """Summarise a run (ingest, quarantine, table, and every artifact's key and what it was derived from),
    or show one sample's kept tokens."""
    from tokenclean.tasks import store
    from tokenclean.summary import artifacts, comparison, format_table, run_overview

    db = run / "tokenclean.duckdb" if run.is_dir() else run
    if not db.exists():
        raise typer.BadParameter(f"no tokenclean database at {db}")
    con = store.connect(db, read_only=True)
    try:
        if sample is None:
            typer.echo(json.dumps(run_overview(con), indent=2, default=str))
            typer.echo(format_table(comparison(con)))
            if keys:
                typer.echo("\nartifacts of the latest run of each flow (key; computed by that run or reused; inputs):")
                for a in artifacts(con):
                    state = "computed" if a["computed_by_latest_run"] else "reused"
                    typer.echo(f"  {a['name']:<18} {a['kind']:<9} {a['key']}  {state:<8} "
                               f"{json.dumps(a['derived_from'], default=str)}")
            return
        _show_sample(con, sample, selection)
    finally:
        con.close()


def _show_sample(con, sample: str, selection: str) -> None:
    """One sample's tokens with the scores and KEEP/drop marks of one variant's selection (same iteration)."""
    from transformers import AutoTokenizer

    from tokenclean.tasks import store
    from tokenclean.summary import output_key

    dataset = store.latest_dataset(con)
    sid = store.sample_id_of_uid(con, dataset, sample)
    if sid is None and sample.lstrip("-").isdigit():
        sid = int(sample)
    row = store.sample_row(con, sid) if sid is not None else None
    if row is None:
        raise typer.BadParameter(f"no sample {sample!r} in the run's current dataset")
    sel_key = output_key(con, selection, "selection")
    if sel_key is None:
        raise typer.BadParameter(f"no selection named {selection!r} in the latest runs")
    rec = store.selection_record(con, sel_key)
    kept = store.kept_positions(con, sel_key, sid)
    scores = store.sample_scores(con, rec["scores"], sid) if rec["scores"] else {}
    tok = AutoTokenizer.from_pretrained(store.artifact_inputs(con, "dataset", dataset)["inputs"]["tokenizer"])
    typer.echo(f"sample {row[2]} (sample_id {sid}); selection {selection} = {sel_key}; scores {rec['scores']}")
    for pos, (tid, is_target) in enumerate(zip(row[0], row[1])):
        mark = "KEEP" if pos in kept else ("drop" if is_target else "    ")
        s = f"{scores[pos]:+.3f}" if pos in scores else ""
        typer.echo(f"{pos:5d} {mark} {s:>8} {tok.decode([tid])!r}")


@app.command()
def report(run: Path = typer.Argument(..., help="run directory or its tokenclean.duckdb"),
           out: Optional[Path] = typer.Option(None, help="HTML file to write (default RUN/report.html)"),
           selection: str = typer.Option("global", help="variant whose kept tokens the samples highlight"),
           samples: int = typer.Option(8, help="how many sample responses to show")) -> None:
    """Write a self-contained HTML report of a run (histograms, kept fractions, trends, samples)."""
    from tokenclean.tasks.store import DatabaseBusy
    from tokenclean.report import build_report

    _quiet_env()
    db = run / "tokenclean.duckdb" if run.is_dir() else run
    if not db.exists():
        raise typer.BadParameter(f"no tokenclean database at {db}")
    if out is None:
        out = (run if run.is_dir() else run.parent) / "report.html"
    try:
        path = build_report(db, out, selection=selection, n_samples=samples)
    except DatabaseBusy as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2)
    typer.echo(str(path))


@app.command()
def export(run: Path = typer.Argument(..., help="run directory"),
           selection: str = typer.Option("global", help="selection to export as a dataset: global, local, random, "
                                                        "full, self-evolving (every iteration) or self-evolving@T"),
           fmt: str = typer.Option("parquet", "--format", help="parquet, jsonl or hf (a datasets save_to_disk folder)"),
           model: Optional[str] = typer.Option(None, help="export this variant's model instead (global, local, random, "
                                                          "full, reference, self-evolving = the last iteration's)"),
           adapter_only: bool = typer.Option(False, "--adapter-only", help="with --model: the PEFT adapter alone"),
           out: Optional[Path] = typer.Option(None, help="where to write (default RUN/export/NAME[.ext]); a new path, "
                                                          "or an earlier export of the same kind with --overwrite"),
           overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier tokenclean export of the "
                                                                     "same kind at the target (nothing else is "
                                                                     "ever replaced)")) -> None:
    """Take results away: a cleaned dataset (input_ids, labels, attention_mask, kept spans, scores) or a model.

    The dataset trains as is with transformers' Trainer: labels are -100 wherever a token
    was not kept. The model is base + adapter merged (a standard transformers directory
    with its tokenizer and chat template), or with --adapter-only the PEFT adapter.
    """
    from tokenclean.tasks.export import FORMATS
    from tokenclean.tasks.store import DatabaseBusy

    _quiet_env()
    if fmt not in FORMATS:
        _fail(f"--format must be one of {', '.join(FORMATS)}")
    if adapter_only and model is None:
        _fail("--adapter-only goes with --model")
    try:
        from tokenclean.tasks.export import export_run_model, export_run_selection

        if model is not None:
            res = export_run_model(run, model, out, adapter_only=adapter_only, overwrite=overwrite)
        else:
            res = export_run_selection(run, selection, fmt, out, overwrite=overwrite)
    except (FileNotFoundError, ValueError, DatabaseBusy) as e:
        _fail(str(e))
    typer.echo(json.dumps(res, indent=2))


@app.command("lm-eval")
def lm_eval_cmd(run: Path = typer.Argument(..., help="run directory"),
                adapter: Optional[str] = typer.Option(None, help="variant whose adapter to evaluate: reference, full, "
                                                      "random, local, global, self-evolving@T (default: base)"),
                tasks: list[str] = typer.Option(["tokenclean_facts"], "--tasks", help="lm-eval task (repeatable)"),
                limit: Optional[int] = typer.Option(None, help="examples per task"),
                batch_size: int = typer.Option(8),
                device: str = typer.Option("cpu"),
                ray_address: Optional[str] = typer.Option(
                    None, help="run the harness as a Ray task on this cluster ('auto', ray://host:10001, 'local')"),
                gpus: float = typer.Option(0.0, help="GPUs the Ray task asks for (with --ray-address)")) -> None:
    """Run lm-evaluation-harness tasks on the base model or an adapter; record into the run's metrics."""
    from tokenclean.tasks.lm_eval_hook import run_lm_eval_for_run
    from tokenclean.tasks.store import DatabaseBusy

    _quiet_env()
    try:
        res = run_lm_eval_for_run(run, adapter, tasks, limit=limit, batch_size=batch_size, device=device,
                                  ray_address=ray_address, gpus=gpus)
    except (FileNotFoundError, ValueError, DatabaseBusy) as e:
        _fail(str(e))
    typer.echo(json.dumps(res, indent=2))


if __name__ == "__main__":
    app()
