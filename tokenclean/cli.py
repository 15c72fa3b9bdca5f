"""`tokenclean` command line: run a config, run the demo, inspect a run."""
from __future__ import annotations

import json
import os
import time
from contextvars import ContextVar
from importlib import resources
from pathlib import Path

import typer
from typer.core import TyperGroup

from tokenclean.config import DB_FILE
from tokenclean.errors import describe_error, one_line

# What the running command reads and writes, and --debug: set by _where and the callback, read on an error.
_COMMAND: ContextVar[dict] = ContextVar("tokenclean_command")
# Usage errors, --help and deliberate exits are typer's own (its bundled click's in recent versions).
_TYPER_SIGNALS = (typer.Exit, typer.Abort, *(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"))


class _OneLineErrors(TyperGroup):
    """Every command ends an error in one line (``--debug``: the traceback): see ``describe_error``."""

    def invoke(self, ctx: typer.Context):
        token = _COMMAND.set({})
        try:
            return super().invoke(ctx)
        except _TYPER_SIGNALS:
            raise
        except Exception as e:
            if ctx.params.get("debug"):
                raise
            code, msg = describe_error(e, **_COMMAND.get().get("where", {}))
            typer.secho(f"error: {msg}" + ("" if code == 2 else " (re-run with --debug for the traceback)"),
                        fg="red", err=True)
            raise typer.Exit(code) from None
        finally:
            _COMMAND.reset(token)


app = typer.Typer(cls=_OneLineErrors, add_completion=False, no_args_is_help=True,
                  help="Token-level cleaning of SFT data.")

SET_HELP = "Override a config key, e.g. --set select.k=0.5 --set train.lr=2e-4 (repeatable)."


# Ray and Prefect talk a lot at INFO: the terminal keeps WARNING and up for our own progress bars, while the flow
# and task runs' own INFO lines (each stage: computed or reused, its key and time) still reach the Prefect UI.
QUIET_ENV = {"PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
             "PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL": "INFO",
             "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL": "INFO"}


def _quiet_env() -> None:
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", envvar="TOKENCLEAN_DEBUG",
                                     help="on an error, show the full traceback instead of one line")) -> None:
    _COMMAND.get({})["debug"] = debug


def _where(db=None, writes=()) -> None:
    """Record the command's database and where it writes: an error that lost its path (a failed write()
    or torch.save) is described from these."""
    _COMMAND.get({})["where"] = {"db": Path(db) if db else None, "writes": tuple(Path(p) for p in writes if p)}


def _debug() -> bool:
    return bool(_COMMAND.get({}).get("debug"))


def _report(cfg) -> None:
    from tokenclean.summary import comparison_text, run_overview, stage_times
    from tokenclean.tasks.store import connect

    con = connect(cfg.db_path, read_only=True)
    try:
        ov = run_overview(con)
        typer.echo(f"\nrun {cfg.run_dir}: {json.dumps(ov['ingest'])}")
        typer.echo(comparison_text(con))
        typer.echo("\nstage timings (s): " + ", ".join(f"{s}:{k}={t:.1f}" for s, k, t in stage_times(con)))
    finally:
        con.close()


def _fail(msg: str) -> None:
    typer.secho(f"error: {one_line(msg)}", fg="red", err=True)
    raise typer.Exit(2)


def _load(config, overrides):
    """The run config, every field checked against its domain before any work; refused in one line."""
    from pydantic import ValidationError

    from tokenclean.config import load_config

    try:
        cfg = load_config(config, overrides)
    except ValidationError as e:
        _fail(f"invalid config {config}: " + describe_error(e)[1])
    except (FileNotFoundError, ValueError) as e:
        _fail(one_line(e))
    _where(cfg.db_path, [cfg.run_dir, cfg.storage if cfg.storage and "://" not in cfg.storage else None])
    return cfg


def _run(cfg) -> None:
    from tokenclean.flows.cleaning import run

    t0 = time.perf_counter()
    run(cfg)
    _closing_report(cfg)
    typer.echo(f"total wall time: {time.perf_counter() - t0:.1f} s")


def _closing_report(cfg) -> None:
    """The table after the flows finished. Their results are stored by then, so a failure here (another
    process holding the database, say) is a warning: the run never exits non-zero because of it."""
    try:
        _report(cfg)
    except Exception as e:
        if _debug():
            import traceback

            traceback.print_exc()
        typer.secho(f"warning: the run finished and its results are stored in {cfg.run_dir}, but the summary could "
                    f"not be printed ({describe_error(e, cfg.db_path)[1]}); see them with "
                    f"`tokenclean inspect {cfg.run_dir}`", fg="yellow", err=True)


@app.command("run")
def run_cmd(config: Path = typer.Argument(..., help="YAML run config"),
            set_: list[str] | None = typer.Option(None, "--set", help=SET_HELP)) -> None:
    """Run the flows a config asks for (fixed-model, self-evolving or both)."""
    _quiet_env()
    _run(_load(config, set_ or []))


@app.command("refresh")
def refresh_cmd(config: Path = typer.Argument(..., help="YAML run config of an existing run"),
                set_: list[str] | None = typer.Option(None, "--set", help=SET_HELP)) -> None:
    """Re-read the inputs, score only new/changed samples (stored base losses reused), re-rank globally."""
    from tokenclean.flows.cleaning import refresh

    _quiet_env()
    out = refresh(_load(config, set_ or []))
    ref = out["reference"]
    typer.echo(f"refresh: {json.dumps(out['refresh'])}; " + "; ".join(
        f"{name} kept {sel['n_kept']}/{sel['n_candidates']} tokens (threshold {sel['threshold']})"
        for name, sel in out["selections"].items()))
    typer.echo("scored: " + "; ".join(f"{name} {s['scored']} samples, reused {s['reused']}"
                                      for name, s in out["samples"].items()))
    changed = f", D0 {json.dumps(ref['warmup_changes'])}" if ref.get("warmup_changes") else ""
    typer.echo(f"reference {ref['key']}: {'retrained' if ref['retrained'] else 'reused'} "
               f"({ref['reason']}{changed}; refresh.reference: {ref['policy']})")


@app.command()
def serve(config: Path = typer.Argument(..., help="YAML run config"),
          cron: str | None = typer.Option(None, help="refresh schedule, e.g. '0 3 * * 1' (Mondays 03:00)"),
          interval: int | None = typer.Option(None, help="refresh every N seconds instead of cron"),
          name: str | None = typer.Option(None, help="deployment name (default: the run name)")) -> None:
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
         set_: list[str] | None = typer.Option(None, "--set", help=SET_HELP)) -> None:
    """Build the embedded tiny model + data if needed, run both flows and every baseline, print the table."""
    _quiet_env()
    with resources.as_file(resources.files("tokenclean") / "configs" / "demo.yaml") as path:
        cfg = _load(path, [f"workdir={workdir}", *(set_ or [])])
    _run(cfg)


@app.command()
def inspect(run: Path = typer.Argument(..., help="run directory or its tokenclean.duckdb"),
            sample: str | None = typer.Option(
                None, help="show one sample's tokens (its id in the input, or sample_id)"),
            selection: str = typer.Option("global", help="variant whose kept tokens --sample marks "
                                                         "(global, local, random, sample, weighted, full, "
                                                         "self-evolving@T, global-k0.3 in a k sweep)"),
            keys: bool = typer.Option(True, "--keys/--no-keys", help="list every artifact with its key and inputs"),
            quarantine: bool = typer.Option(False, "--quarantine", help="list the quarantined rows of the run's "
                                                                       "current dataset: source, line, id, reason"),
            limit: int | None = typer.Option(None, min=1, help="with --quarantine: list only the first LIMIT")) -> None:
    """Summarise a run (ingest, quarantine, table, and every artifact's key and what it was derived from),
    list its quarantined rows, or show one sample's kept tokens (or why a row with that id was refused)."""
    from tokenclean.summary import artifacts, comparison_text, run_overview
    from tokenclean.tasks import store

    db = run / DB_FILE if run.is_dir() else run
    if not db.exists():
        raise typer.BadParameter(f"no tokenclean database at {db}")
    _where(db)
    con = store.connect(db, read_only=True)
    try:
        if quarantine:
            _show_quarantine(con, limit)
            return
        if sample is None:
            typer.echo(json.dumps(run_overview(con), indent=2, default=str))
            typer.echo(comparison_text(con))
            for r in store.unfinished_flow_runs(con):  # not shown above: the table is of finished runs
                typer.echo(f"{r['flow']} started {r['started_at']:%Y-%m-%d %H:%M:%S}: unfinished (running or killed)")
            if keys:
                typer.echo("\nartifacts of the latest run of each flow (key; computed by that run or reused; inputs):")
                for a in artifacts(con):
                    state = "computed" if a["computed_by_latest_run"] else "reused"
                    typer.echo(f"  {a['name']:<24} {a['kind']:<9} {a['key']}  {state:<8} "
                               f"{json.dumps(a['derived_from'], default=str)}")
            return
        _show_sample(con, sample, selection)
    finally:
        con.close()


def _quarantine_line(q: dict) -> str:
    return f"{q['source']}:{q['row_index']}\t{q['id'] if q['id'] is not None else '-'}\t{q['reason']}"


def _show_quarantine(con, limit: int | None) -> None:
    """The current dataset's quarantined rows, one a line: source:line (from 0, as the reasons count), id, reason."""
    from tokenclean.tasks import store

    dataset = store.latest_dataset(con) or store.last_ingested_dataset(con)  # a run that stopped after ingest too
    if dataset is None:
        raise typer.BadParameter("the run has no ingested dataset yet")
    rows = store.quarantined_rows(con, dataset, limit)
    total = store.count_quarantined(con, dataset)
    shown = f" (the first {len(rows)})" if len(rows) < total else ""
    typer.echo(f"{total} quarantined rows in dataset {dataset}{shown}\nsource:line\tid\treason")
    for q in rows:
        typer.echo(_quarantine_line(q))


def _show_sample(con, sample: str, selection: str) -> None:
    """One sample's tokens with the scores and KEEP/drop marks of one variant's selection (same iteration);
    for an id whose rows were all refused, where they were and why."""
    from tokenclean.summary import names_of, output_key
    from tokenclean.tasks import store
    from tokenclean.tasks.template import load_tokenizer

    dataset = store.latest_dataset(con)
    sid = store.sample_id_of_uid(con, dataset, sample)
    if sid is None and sample.lstrip("-").isdigit():
        sid = int(sample)
    row = store.sample_row(con, sid) if sid is not None else None
    if row is None:
        current = dataset or store.last_ingested_dataset(con)
        refused = store.quarantined_rows(con, current, uid=sample) if current is not None else []
        if refused:
            typer.echo(f"sample {sample!r} was quarantined (refused at ingest), not kept:")
            for q in refused:
                typer.echo(f"  {_quarantine_line(q)}")
            return
        raise typer.BadParameter(f"no sample {sample!r} in the run's current dataset")
    sel_key = output_key(con, selection, "selection")
    if sel_key is None:
        raise typer.BadParameter(f"no selection named {selection!r} in the latest runs (names: "
                                 f"{names_of(con, 'selection')})")
    rec = store.selection_record(con, sel_key)
    kept = store.kept_positions(con, sel_key, sid)
    scores = store.sample_scores(con, rec["scores"], sid) if rec["scores"] else {}
    tok = load_tokenizer(store.artifact_inputs(con, "dataset", dataset)["inputs"]["tokenizer"])
    typer.echo(f"sample {row[2]} (sample_id {sid}); selection {selection} = {sel_key}; scores {rec['scores']}")
    for pos, (tid, is_target) in enumerate(zip(row[0], row[1])):
        mark = "KEEP" if pos in kept else ("drop" if is_target else "    ")
        s = f"{scores[pos]:+.3f}" if pos in scores else ""
        typer.echo(f"{pos:5d} {mark} {s:>8} {tok.decode([tid])!r}")


@app.command()
def report(run: Path = typer.Argument(..., help="run directory or its tokenclean.duckdb"),
           out: Path | None = typer.Option(None, help="HTML file to write (default RUN/report.html)"),
           selection: str = typer.Option("global", help="variant whose kept tokens the samples highlight"),
           samples: int = typer.Option(8, help="how many sample responses to show")) -> None:
    """Write a self-contained HTML report of a run (histograms, kept fractions, trends, samples)."""
    from tokenclean.report import build_report

    _quiet_env()
    db = run / DB_FILE if run.is_dir() else run
    if not db.exists():
        raise typer.BadParameter(f"no tokenclean database at {db}")
    if out is None:
        out = (run if run.is_dir() else run.parent) / "report.html"
    _where(db, [out])
    typer.echo(str(build_report(db, out, selection=selection, n_samples=samples)))


@app.command()
def export(run: Path = typer.Argument(..., help="run directory"),
           selection: str = typer.Option("global", help="selection to export as a dataset: global, local, random, "
                                                        "sample, weighted, full, self-evolving (every iteration), "
                                                        "self-evolving@T; in a k sweep global-k0.3 ..."),
           fmt: str = typer.Option("parquet", "--format", help="parquet, jsonl or hf (a datasets save_to_disk folder)"),
           model: str | None = typer.Option(None, help="export this variant's model instead (global, local, random, "
                                                          "sample, weighted, full, reference, self-evolving = the "
                                                          "last iteration's; in a k sweep global-k0.3 ...)"),
           adapter_only: bool = typer.Option(False, "--adapter-only", help="with --model: the PEFT adapter alone"),
           out: Path | None = typer.Option(None, help="where to write (default RUN/export/NAME[.ext]); a new path, "
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
        from tokenclean.flows.export import export_run_model, export_run_selection

        if model is not None:
            res = export_run_model(run, model, out, adapter_only=adapter_only, overwrite=overwrite)
        else:
            res = export_run_selection(run, selection, fmt, out, overwrite=overwrite)
    except (FileNotFoundError, ValueError, DatabaseBusy) as e:
        _fail(str(e))
    typer.echo(json.dumps(res, indent=2))


@app.command("lm-eval")
def lm_eval_cmd(run: Path = typer.Argument(..., help="run directory"),
                adapter: str | None = typer.Option(None, help="variant whose adapter to evaluate: reference, full, "
                                                      "random, local, global, sample, weighted, self-evolving@T, "
                                                      "global-k0.3 in a k sweep (default: base)"),
                tasks: list[str] = typer.Option(["tokenclean_facts"], "--tasks", help="lm-eval task (repeatable)"),
                limit: int | None = typer.Option(None, help="examples per task"),
                batch_size: int = typer.Option(8),
                device: str = typer.Option("cpu"),
                ray_address: str | None = typer.Option(
                    None, help="run the harness as a Ray task on this cluster ('auto', ray://host:10001, 'local')"),
                gpus: float = typer.Option(0.0, help="GPUs the Ray task asks for (with --ray-address)")) -> None:
    """Run lm-evaluation-harness tasks on the base model or an adapter; record into the run's metrics."""
    from tokenclean.flows.lm_eval import run_lm_eval_for_run

    _quiet_env()
    _where(run / DB_FILE, [run])
    res = run_lm_eval_for_run(run, adapter, tasks, limit=limit, batch_size=batch_size, device=device,
                              ray_address=ray_address, gpus=gpus)
    typer.echo(json.dumps(res, indent=2))


@app.command("publish-model")
def publish_model_cmd(model: Path = typer.Argument(..., help="model directory: config.json, weights, tokenizer"),
                      url: str = typer.Argument(..., help="object storage, e.g. s3://bucket/models/NAME")) -> None:
    """Upload a model for model.base or model.reference on a cluster whose nodes share only object storage.

    Each node then fetches it once into its cache, checked file by file, and loads it only if its weights
    are the ones the run recorded. A URL holds one model for good: the same files again is a no-op, and
    anything else already there is refused, never replaced.
    """
    from tokenclean.tasks.storage import publish_model, shown

    try:
        weights = publish_model(model, url)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        _fail(str(e))
    typer.echo(json.dumps({"url": shown(url), "weights": weights}, indent=2))


if __name__ == "__main__":
    app()
