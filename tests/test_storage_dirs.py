"""Directories in object storage (adapters, checkpoints): published whole or not at all, copied once per node,
checked against their manifest. fsspec's in-memory filesystem stands in for a bucket (the same code path as s3://;
the run on isolated nodes against a real S3 endpoint is tests/test_shared_nothing.py)."""
from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenclean.tasks import keys, remote_checkpoints, storage


@pytest.fixture(autouse=True)
def node_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENCLEAN_NODE_CACHE", str(tmp_path / "node-cache"))
    return tmp_path / "node-cache"


def _adapter(root, seed: int):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    (root / "adapter_model.safetensors").write_bytes(rng.bytes(int(rng.integers(1, 5000))))
    (root / "adapter_config.json").write_text(json.dumps({"r": int(rng.integers(1, 64))}))
    (root / "train.json").write_text("{}")
    (root / "sub").mkdir()
    (root / "sub" / "extra.bin").write_bytes(rng.bytes(100))
    return root


def _bucket() -> str:
    return f"memory://bucket-{uuid.uuid4().hex[:8]}/adapters/a"


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _downloads(node_cache) -> list[dict]:
    log = node_cache / "downloads.jsonl"
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def test_a_published_directory_is_copied_once_per_node_and_a_republished_one_again(tmp_path, node_cache):
    url = _bucket()
    storage.publish_dir(_adapter(tmp_path / "one", 1), url)
    first = storage.open_dir(url)
    assert _files(Path(first)) == _files(tmp_path / "one")
    assert storage.open_dir(url) == first and len(_downloads(node_cache)) == 1  # the node's copy, by its key
    storage.publish_dir(_adapter(tmp_path / "two", 2), url)  # the same URL, other bytes: never the stale copy
    second = storage.open_dir(url)
    assert second != first and len(_downloads(node_cache)) == 2
    assert (tmp_path / "two" / "adapter_config.json").read_text() == open(f"{second}/adapter_config.json").read()


def test_a_directory_without_its_manifest_or_with_a_changed_file_is_refused(tmp_path, node_cache):
    url = _bucket()
    storage.upload_files(_adapter(tmp_path / "a", 3), url)  # a writer that died before committing
    with pytest.raises(FileNotFoundError, match="not whole"):
        storage.open_dir(url)
    storage.publish_dir(tmp_path / "a", url)
    fs, p = storage.filesystem(url)
    fs.pipe(f"{p}/adapter_model.safetensors", b"changed after the commit")
    with pytest.raises(OSError, match="does not match its manifest"):
        storage.open_dir(url)
    assert not list((node_cache / "dirs").iterdir())  # nothing half-copied is left to be taken as whole


@pytest.mark.parametrize("seed", range(5))
def test_the_weights_key_from_a_manifest_equals_the_key_of_the_local_directory(tmp_path, seed):
    local = _adapter(tmp_path / "a", seed)
    url = _bucket()
    storage.publish_dir(local, url)
    assert storage.weights_hash(url) == keys.weights_hash(local) == storage.weights_hash(str(local))


def test_the_newest_committed_checkpoint_is_resumed_and_an_uncommitted_one_is_not(tmp_path, monkeypatch):
    url = _bucket()
    for step in (2, 10):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        storage.publish_dir(d, storage.join(url, d.name))
    torn = tmp_path / "checkpoint-12"
    torn.mkdir()
    (torn / "trainer_state.json").write_text(json.dumps({"global_step": 12}))
    storage.upload_files(torn, storage.join(url, torn.name))  # killed before its commit
    resumed = remote_checkpoints.newest(url)
    assert json.loads(open(f"{resumed}/trainer_state.json").read())["global_step"] == 10
    assert remote_checkpoints.newest(_bucket()) is None
    fs, p = storage.filesystem(url)
    fs.pipe(f"{p}/checkpoint-10/trainer_state.json", b"{}")  # committed, then changed: the next older one
    monkeypatch.setenv("TOKENCLEAN_NODE_CACHE", str(tmp_path / "another-node"))
    resumed = remote_checkpoints.newest(url)
    assert json.loads(open(f"{resumed}/trainer_state.json").read())["global_step"] == 2


def test_a_rank_uploads_its_own_rng_state_and_rank_0_the_rest(tmp_path):
    """Every rank's checkpoint directory may hold other ranks' RNG states (a shared node cache); each uploads only
    what it owns and rank 0 commits: with one worker, the whole checkpoint, its ``rng_state.pth`` included."""
    from types import SimpleNamespace

    local = tmp_path / "checkpoint-3"
    local.mkdir()
    for name in ("adapter_model.safetensors", "optimizer.pt", "trainer_state.json", "rng_state.pth",
                 "rng_state_0.pth", "rng_state_1.pth"):
        (local / name).write_text(name)
    url = _bucket()
    remote_checkpoints.upload_callback(url, 0, 1).on_save(SimpleNamespace(output_dir=str(tmp_path)),
                                                          SimpleNamespace(global_step=3), None)
    assert set(storage.read_manifest(storage.join(url, "checkpoint-3"))) == {
        "adapter_model.safetensors", "optimizer.pt", "trainer_state.json", "rng_state.pth", "rng_state_0.pth"}


def test_storage_keeps_the_newest_committed_checkpoints_as_the_trainer_keeps_them_on_disk(tmp_path):
    """Saves at steps 1-5, with step 2's upload never committed (its writer killed): the newest KEEP committed
    ones stay, nothing older, and resume takes the newest."""
    from types import SimpleNamespace

    url = _bucket()
    callback = remote_checkpoints.upload_callback(url, 0, 1)
    for step in range(1, 6):
        local = tmp_path / f"checkpoint-{step}"
        local.mkdir()
        (local / "adapter_model.safetensors").write_text(f"step {step}")
        if step == 2:
            storage.upload_files(local, storage.join(url, local.name))
            continue
        callback.on_save(SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=step), None)
    fs, p = storage.filesystem(url)
    assert sorted(x.rsplit("/", 1)[-1] for x in fs.ls(p, detail=False)) == ["checkpoint-4", "checkpoint-5"]
    assert remote_checkpoints.KEEP == 2
    assert open(f"{remote_checkpoints.newest(url)}/adapter_model.safetensors").read() == "step 5"
    # a writer that resumed from step 3 (say step 4's copy was bad) and commits it again: nothing newer is touched
    callback.on_save(SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=3), None)
    assert sorted(x.rsplit("/", 1)[-1] for x in fs.ls(p, detail=False)) == [
        "checkpoint-3", "checkpoint-4", "checkpoint-5"]


def test_urls_in_logs_and_errors_carry_no_password_or_signature():
    assert storage.shown("s3://key:secret@bucket/runs/a?X-Amz-Signature=abc") == "s3://bucket/runs/a"
    assert storage.shown("https://user:pw@host:9000/b/c?sig=1&se=2") == "https://host:9000/b/c"
    assert storage.shown("s3://bucket/runs/a") == "s3://bucket/runs/a"
    with pytest.raises(FileNotFoundError) as e:
        storage.open_dir("memory://bucket-x/nothing?token=hunter2")
    assert "hunter2" not in str(e.value)


def _publish(model, url):
    from typer.testing import CliRunner

    from tokenclean.cli import app

    return CliRunner().invoke(app, ["publish-model", str(model), url])


def test_a_model_in_object_storage_loads_on_a_node_only_with_the_weights_the_run_recorded(tiny, tmp_path,
                                                                                          node_cache):
    """``tokenclean publish-model``, then what the driver and a worker do with a base model given as a URL: the
    driver hashes it from the manifest and copies only its tokenizer and configs; a node copies the whole model
    once and loads it, and refuses it once other weights are published under the URL."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    url = f"memory://bucket-{uuid.uuid4().hex[:8]}/models/tiny"
    res = _publish(tiny.model, url)
    assert res.exit_code == 0, res.output
    weights = keys.weights_hash(tiny.model)
    assert json.loads(res.output)["weights"] == weights == storage.weights_hash(url)
    meta = Path(storage.open_tokenizer(url))
    assert not any(p.suffix in keys.WEIGHT_SUFFIXES for p in meta.rglob("*"))
    assert AutoTokenizer.from_pretrained(meta).get_vocab() == AutoTokenizer.from_pretrained(tiny.model).get_vocab()
    copy = storage.open_model(url, weights)
    assert _files(Path(copy)) == _files(Path(tiny.model))
    assert storage.open_model(url, weights) == copy and len(_downloads(node_cache)) == 2  # configs, then the model
    AutoModelForCausalLM.from_pretrained(copy)
    assert storage.open_model(str(tiny.model), "anything") == str(tiny.model)  # a local model: the node's own
    with pytest.raises(ValueError, match="none was given"):  # no recorded key to check a copy against: refused
        storage.open_model(url, None)

    other = tmp_path / "other"
    shutil.copytree(tiny.model, other)
    (other / "model.safetensors").write_bytes(b"other weights")
    again = _publish(other, url)
    assert again.exit_code == 2 and "another model" in again.output
    assert _publish(tiny.model, url).exit_code == 0  # the same model again: kept as it is
    retemplated = tmp_path / "retemplated"
    shutil.copytree(tiny.model, retemplated)
    (retemplated / "tokenizer_config.json").write_text("{}")  # the same weights, another tokenizer: another model
    assert _publish(retemplated, url).exit_code == 2
    storage.publish_dir(other, url)  # replaced behind the run's back
    with pytest.raises(ValueError, match="not the model this run recorded"):
        storage.open_model(url, weights)
    assert len(_downloads(node_cache)) == 2


def test_publishing_a_model_never_replaces_files_it_did_not_write(tiny, tmp_path):
    url = f"memory://bucket-{uuid.uuid4().hex[:8]}/models/tiny"
    fs, p = storage.filesystem(url)
    fs.pipe(f"{p}/notes.txt", b"someone else's")
    res = _publish(tiny.model, url)
    assert res.exit_code == 2 and "did not publish" in res.output
    assert fs.cat(f"{p}/notes.txt") == b"someone else's" and storage.read_manifest(url) is None
    assert _publish(tmp_path, f"memory://bucket-{uuid.uuid4().hex[:8]}/m").exit_code == 2  # not a model directory
    assert _publish(tiny.model, str(tmp_path / "local")).exit_code == 2  # not object storage


def test_an_adapter_published_again_under_its_url_is_never_scored_under_the_recorded_key(tiny, tmp_path):
    """A scoring worker's copy of an adapter in object storage must be the model key the run recorded for it
    (its weights hash keyed with the base's): one republished since, say by a training attempt the run stopped
    waiting for, is refused before it is loaded, not scored under the old key."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tokenclean.tasks.score import ScoringModel, ShardSample

    def lora(seed: int, where: Path) -> Path:
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny.model),
                               LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        model.save_pretrained(where)
        return where

    url = _bucket()
    storage.publish_dir(lora(1, tmp_path / "one"), url)
    recorded = keys.adapter_model_key("BASE", storage.weights_hash(url))
    assert storage.open_adapter(url, recorded, "BASE")
    with pytest.raises(ValueError, match="not the model this run recorded"):
        storage.open_adapter(url, recorded, "ANOTHER-BASE")
    scorer = ScoringModel(str(tiny.model), device="cpu", dtype="float32", base_key="BASE")
    sample = [ShardSample(1, np.arange(1, 20, dtype=np.int32), np.arange(19) > 0)]  # position 0 is never a target
    first = scorer.losses(sample, adapter=url, adapter_key=recorded, batch_tokens=256)
    storage.publish_dir(lora(2, tmp_path / "two"), url)
    with pytest.raises(ValueError, match="not the model this run recorded"):
        ScoringModel(str(tiny.model), device="cpu", dtype="float32", base_key="BASE").losses(
            sample, adapter=url, adapter_key=recorded, batch_tokens=256)
    assert first.num_rows == 18 and np.isfinite(first.column("loss").to_numpy()).all()


def test_a_hub_id_is_keyed_from_its_snapshot_in_the_hub_cache_and_loaded_as_given(tiny, tmp_path, monkeypatch):
    """``model.base: org/name`` (a model in the Hugging Face cache, offline): its weights hash is its snapshot's,
    and workers load it by the id; it is no path relative to the working directory."""
    import huggingface_hub.constants as hub

    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(tiny.model, repo / "snapshots" / "abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # the cache only: tests reach no host
    monkeypatch.chdir(tmp_path)
    assert storage.weights_hash("org/tiny") == keys.weights_hash(tiny.model)
    assert storage.open_model("org/tiny", None) == storage.open_tokenizer("org/tiny") == "org/tiny"


def test_workers_asking_at_once_make_one_copy_per_node(tmp_path, node_cache):
    """Several workers of one node (one per GPU) open the same model at the same moment: one fetches it, the
    others wait for that copy instead of each downloading the whole model."""
    from concurrent.futures import ThreadPoolExecutor

    local = tmp_path / "model"
    local.mkdir()
    (local / "config.json").write_text("{}")
    (local / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(32 << 20))
    url = f"memory://bucket-{uuid.uuid4().hex[:8]}/models/m"
    weights = storage.publish_model(local, url)
    with ThreadPoolExecutor(4) as pool:
        copies = set(pool.map(lambda _: storage.open_model(url, weights), range(4)))
    assert len(copies) == 1 and len(_downloads(node_cache)) == 1
