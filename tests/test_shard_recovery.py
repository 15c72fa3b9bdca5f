"""Shard files that a killed run left behind and a power loss or a bad disk damaged: each is removed with a
warning naming it and its samples are scored again, so the losses equal an undisturbed run's; and the
atomic writes of shard and ingest-part files are fsynced before their rename.

The scoring is the real one (a Prefect flow around ``flows.scoring.score_model``, the tiny model, a DuckDB
file), on Prefect's thread runner: recovery happens in the driver, so a Ray cluster adds nothing here.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from prefect import flow

from tests.conftest import tiny_config
from tests.store_reads import losses_by_uid
from tokenclean.config import RunConfig
from tokenclean.tasks import storage, store


@flow(name="score-base")
def _score_base(config: dict) -> dict:
    """What a flow does to have the base model's losses of the pool: prepare the run, then ``score_model``."""
    from tokenclean.flows import artifacts
    from tokenclean.flows.prepare import prepare
    from tokenclean.flows.scoring import score_model

    cfg = RunConfig.model_validate(config)
    ctx = prepare(cfg, progress=False)
    try:
        key = artifacts.scorer(ctx, artifacts.base(ctx))
        since = store.last_stage_time(ctx.con)
        stats = score_model(ctx, "base", key, None, ctx.pool_parts, progress=False)
        return {"key": key, "dataset": ctx.dataset, "shard_dir": ctx.shard_dir(key), "stats": stats,
                "stages": store.stages_since(ctx.con, since),
                "integrity": store.check_integrity(ctx.con, key, ctx.dataset, ctx.pool_parts),
                "losses": losses_by_uid(ctx.con, key, ctx.dataset)}
    finally:
        ctx.con.close()


def _score(config: dict) -> dict:
    from tokenclean.flows.runtime import task_runner

    # the runner a run without Ray gets: one scoring thread, as `tokenclean run` has it
    return _score_base.with_options(task_runner=task_runner(RunConfig.model_validate(config).ray))(config)


def _cfg(workdir: Path, name: str) -> dict:
    return tiny_config(workdir, name=name, ray={"enabled": False})


@pytest.fixture(scope="module")
def undisturbed(tiny, tmp_path_factory):
    return _score(_cfg(tmp_path_factory.mktemp("calm"), "calm"))


def _flip_a_loss_byte(path: Path) -> None:
    """One byte in the middle of the loss column's pages, as a bad disk returns it; the footer stays intact."""
    meta = pq.ParquetFile(path).metadata.row_group(0)
    col = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == "loss")
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    at = start + col.total_compressed_size // 2
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_orphan_shards_are_removed_with_a_warning_and_rescored(undisturbed, tmp_path, caplog):
    """A new run finds the shard files a killed run wrote under the same scorer key (copies of the undisturbed
    run's real files): one torn (truncated to half, as a rename without fsync leaves it after a power loss), one
    with a byte of its loss pages flipped, one garbage under a shard's name, one intact. The intact one is loaded;
    each damaged one is removed, named in the flow log and the stage log with its reason, and its samples are
    scored again: every loss equals the undisturbed run's, integrity is clean. A file that is not a shard,
    in the same directory, is left alone."""
    calm_files = sorted(Path(p) for p in storage.shard_files(undisturbed["shard_dir"]))
    assert len(calm_files) >= 4, calm_files
    cfg = _cfg(tmp_path, "damaged")
    shard_dir = Path(RunConfig.model_validate(cfg).run_dir) / "shards" / undisturbed["key"]
    shard_dir.mkdir(parents=True)
    orphans = [shard_dir / f.name for f in calm_files[:4]]
    for src, dst in zip(calm_files, orphans):
        shutil.copyfile(src, dst)
    torn, flipped, garbage, intact = orphans
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
    _flip_a_loss_byte(flipped)
    garbage.write_bytes(os.urandom(garbage.stat().st_size))
    foreign = shard_dir / "notes.txt"
    foreign.write_text("not tokenclean's")

    got = _score(cfg)

    assert got["key"] == undisturbed["key"]
    assert got["integrity"]["ok"], got["integrity"]
    assert got["losses"] == undisturbed["losses"]  # by (uid, pos); rescored samples equal, damaged rows never loaded
    stats = got["stats"]
    n_intact = len(set(pq.read_table(intact).column("sample_id").to_pylist()))
    assert stats["shards_recovered"] == 1 and stats["samples_recovered"] == n_intact
    damaged = {str(p): r for p, r in ((d["path"], d["reason"]) for d in stats["shards_unreadable"])}
    assert set(damaged) == {str(torn), str(flipped), str(garbage)}
    assert "magic bytes" in damaged[str(torn)] and "checksum" in damaged[str(flipped)].lower()
    logged = [s for s in got["stages"] if s["stage"] == "score"][-1]["detail"]["shards_unreadable"]
    assert {d["path"] for d in logged} == set(damaged)
    # in the flow run's log (Prefect's API and the terminal)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "prefect.flow_runs"]
    for path in damaged:
        assert sum(f"shard file {path} is unreadable" in w for w in warned) == 1, warned
    assert foreign.read_text() == "not tokenclean's"
    # the damaged files are gone; the numbers in use now hold the rescored samples, whole
    for f in storage.shard_files(str(shard_dir)):
        storage.read_table(f)


def _spy_fsync(monkeypatch, final: Path) -> list[tuple[str, bool]]:
    """Record each ``os.fsync``: the path its descriptor is open on, and whether ``final`` existed then."""
    calls, real = [], os.fsync

    def spy(fd):
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), final.exists()))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return calls


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads descriptors' paths from /proc")
def test_shard_and_part_files_are_fsynced_before_the_rename_and_their_directory_after(tmp_path, monkeypatch):
    """Durability itself (a power cut) cannot be observed in a test; what can is the order: the file's data is
    flushed while it still has its temporary name, the directory after the file has its final one."""
    import pyarrow as pa

    table = pa.table({"sample_id": [1, 2], "loss": [0.5, 0.25]})
    final = tmp_path.resolve() / "shards" / "k" / "shard-00000000.parquet"
    calls = _spy_fsync(monkeypatch, final)
    storage.write_parquet(table, str(final))
    assert len(calls) == 2, calls
    assert calls[0][0].startswith(f"{final}.tmp-") and not calls[0][1]  # the data, under its temporary name
    assert calls[1] == (str(final.parent), True)  # the directory, holding the final name
    assert pq.read_table(final).equals(table)

    fetched = tmp_path.resolve() / "local" / "part-0.parquet"  # an ingest part copied from the run's storage
    calls = _spy_fsync(monkeypatch, fetched)
    storage.fetch(str(final), str(fetched))
    assert len(calls) == 2, calls
    assert calls[0][0].startswith(f"{fetched}.tmp-") and not calls[0][1]
    assert calls[1] == (str(fetched.parent), True)
    assert pq.read_table(fetched).equals(table)
