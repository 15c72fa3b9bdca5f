"""The README's quickstart, run as written: a user's model directory and JSONL, the model's own chat template,
then the cleaned data and the model exported and used by the libraries a user would use them with.

The user's model is the embedded tiny Llama copied to ``my-model`` with a Zephyr-style chat template (the
format of an instruct model built on the embedded tokenizer's own special tokens); the data is the embedded
synthetic set. Real components throughout: the CLI, a Prefect flow run, a local Ray cluster, DuckDB.
"""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

from tests.conftest import REPO

# Zephyr's format: every turn ends with EOS, the assistant's included.
ZEPHYR = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


def _readme_blocks() -> tuple[str, list[str]]:
    text = (REPO / "README.md").read_text()
    yaml_block = re.search(r"<!-- quickstart.yaml -->\n```yaml\n(.*?)```", text, re.S).group(1)
    commands = re.search(r"<!-- quickstart commands -->\n```bash\n(.*?)```", text, re.S).group(1)
    return yaml_block, [c for c in commands.strip().splitlines() if c.strip()]


@pytest.fixture(scope="module")
def quickstart(tiny, tmp_path_factory, monkeypatch_module):
    """Run the README's commands in a fresh directory holding my-model/ and my-data.jsonl."""
    import shlex

    from transformers import AutoTokenizer
    from typer.testing import CliRunner

    from tokenclean.cli import app

    home = tmp_path_factory.mktemp("quickstart")
    shutil.copytree(tiny.model, home / "my-model")
    tok = AutoTokenizer.from_pretrained(home / "my-model")
    tok.chat_template = ZEPHYR
    tok.save_pretrained(home / "my-model")
    rows = [json.loads(line) for line in tiny.train.read_text().splitlines()[:120]]
    (home / "my-data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    yaml_block, commands = _readme_blocks()
    (home / "quickstart.yaml").write_text(yaml_block)
    monkeypatch_module.chdir(home)
    results = []
    for line in commands:
        argv = shlex.split(line)
        assert argv[0] == "tokenclean", line
        res = CliRunner().invoke(app, argv[1:])
        assert res.exit_code == 0, f"{line}\n{res.output}\n{res.exception!r}"
        results.append(res.output)
    return home, results


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _con(home):
    from tokenclean.tasks import store

    return store.connect(home / "runs" / "my-run" / "tokenclean.duckdb", read_only=True)


def test_quickstart_uses_the_models_template_and_excludes_the_warmup_split(quickstart):
    from tokenclean.summary import comparison
    from tokenclean.tasks import store

    home, outputs = quickstart
    assert "fixed-model global top-k" in outputs[0] and "full tokens" in outputs[0]
    con = _con(home)
    try:
        dataset = store.latest_dataset(con)
        inputs = store.artifact_inputs(con, "dataset", dataset)["inputs"]
        assert inputs["template"] == "model" and inputs["tokenizer"] == str(home / "my-model")
        rows = {r["variant"]: r for r in comparison(con)}
        # select.pool: exclude_warmup (the default): the pool the selections ranked is D1..DT, not D0
        assert set(rows["fixed-model global top-k"]["kept_by_part"]) == {1, 2}
        assert rows["fixed-model global top-k"]["answer_match"] is not None
    finally:
        con.close()


def _spans_by_hand(tok, text: str, input_ids: list[int], kept: list[int]) -> list[list[int]]:
    """The README's kept spans, recomputed from the exported text alone: tokenise ``text`` again with offsets, take
    each kept token's anchor (its first non-whitespace character, or its first if it has none), and join runs of
    consecutive kept positions into [anchor of the first, end of the last)."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    lead = len(input_ids) - len(enc["input_ids"])  # a BOS before the text has no characters
    assert lead in (0, 1) and input_ids[lead:] == enc["input_ids"], "the text does not tokenise to input_ids"
    assert lead == 0 or input_ids[0] == tok.bos_token_id
    offsets = [None] * lead + enc["offset_mapping"]

    def anchor(i):
        a, b = offsets[i]
        return next((c for c in range(a, b) if not text[c].isspace()), a)

    spans, prev = [], -2
    for i in kept:
        if i == prev + 1:
            spans[-1][1] = offsets[i][1]
        else:
            spans.append([anchor(i), offsets[i][1]])
        prev = i
    return spans


def test_exported_dataset_trains_with_trainer_on_exactly_the_kept_tokens(quickstart, tmp_path):
    """Load the export with ``datasets``, train with transformers' Trainer unchanged; its loss is over the kept tokens."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from tokenclean.summary import output_key

    home, _ = quickstart
    ds = datasets.load_from_disk(str(home / "runs" / "my-run" / "export" / "data" / "global"))
    con = _con(home)
    try:
        sel = output_key(con, "global", "selection")
        kept = {(s, p) for s, p in con.execute("SELECT sample_id, pos FROM selected_tokens WHERE selection = ?",
                                                [sel]).fetchall()}
    finally:
        con.close()
    # labels are the token where kept, -100 everywhere else: exactly the stored selection
    got = {(r["sample_id"], i) for r in ds for i, lab in enumerate(r["labels"]) if lab != -100}
    assert got == kept
    tok = AutoTokenizer.from_pretrained(home / "my-model")
    assert len(ds) and all(r["kept_spans"] for r in ds)  # every exported row keeps something
    for r in ds:
        assert all(lab in (-100, t) for lab, t in zip(r["labels"], r["input_ids"]))
        pos = [i for i, lab in enumerate(r["labels"]) if lab != -100]
        assert all(r["token_scores"][i] is not None for i in pos), r["id"]
        assert r["kept_spans"] == _spans_by_hand(tok, r["text"], r["input_ids"], pos), r["id"]
    model = AutoModelForCausalLM.from_pretrained(home / "my-model")
    train = ds.select(range(8)).remove_columns([c for c in ds.column_names
                                                 if c not in ("input_ids", "attention_mask", "labels")])
    args = TrainingArguments(output_dir=str(tmp_path / "t"), per_device_train_batch_size=8, max_steps=2,
                             learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=train,
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True))
    # before any step: the Trainer's loss equals the mean NLL of exactly the kept tokens, computed here by hand
    first = trainer.evaluate()["eval_loss"]
    nll, n = 0.0, 0
    with torch.no_grad():
        for r in train:
            ids = torch.tensor([r["input_ids"]])
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            pos = [i for i, lab in enumerate(r["labels"]) if lab != -100]
            nll -= sum(float(logp[i - 1, r["input_ids"][i]]) for i in pos)
            n += len(pos)
    assert first == pytest.approx(nll / n, rel=1e-4)
    out = trainer.train()
    assert trainer.state.global_step == 2 and np.isfinite(out.training_loss)


def test_export_formats_hold_the_same_rows(quickstart):
    import datasets
    from typer.testing import CliRunner

    from tokenclean.cli import app

    home, _ = quickstart
    run = home / "runs" / "my-run"
    for fmt in ("parquet", "jsonl"):
        res = CliRunner().invoke(app, ["export", str(run), "--selection", "global", "--format", fmt])
        assert res.exit_code == 0, res.output
    hf = datasets.load_from_disk(str(run / "export" / "data" / "global"))
    pq = datasets.Dataset.from_parquet(str(run / "export" / "data" / "global.parquet"))
    js = [json.loads(line) for line in (run / "export" / "data" / "global.jsonl").read_text().splitlines()]
    assert hf["labels"] == pq["labels"] == [r["labels"] for r in js]
    assert hf["kept_spans"] == [r["kept_spans"] for r in js]
    bad = CliRunner().invoke(app, ["export", str(run), "--selection", "nonesuch"])
    assert bad.exit_code == 2 and "no selection named 'nonesuch'" in bad.output


def test_exported_model_is_the_merged_adapter(quickstart):
    """The merged directory loads with AutoModelForCausalLM and computes what base + adapter computes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from typer.testing import CliRunner

    from tokenclean.cli import app
    from tokenclean.summary import output_key
    from tokenclean.tasks import store

    home, _ = quickstart
    run = home / "runs" / "my-run"
    merged_dir = run / "export" / "model" / "global"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    tok = AutoTokenizer.from_pretrained(merged_dir)
    assert tok.chat_template == ZEPHYR  # the template it was trained with travels with it
    con = _con(home)
    try:
        rec = store.adapter_record(con, output_key(con, "global", "adapter"))
    finally:
        con.close()
    base = AutoModelForCausalLM.from_pretrained(home / "my-model")
    peft = PeftModel.from_pretrained(base, str(run / rec["path"])).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "Where does Ana live?"}], tokenize=False,
                                     add_generation_prompt=True)
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        a, b = merged(ids).logits, peft(ids).logits
    assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())
    assert json.loads((merged_dir / "tokenclean.json").read_text())["adapter"] == rec["adapter"]
    res = CliRunner().invoke(app, ["export", str(run), "--model", "global", "--adapter-only"])
    assert res.exit_code == 0, res.output
    adapter_dir = run / "export" / "adapter" / "global"
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(home / "my-model"), str(adapter_dir))
    with torch.no_grad():
        assert torch.equal(again.eval()(ids).logits, b)
    assert not np.isnan(a.numpy()).any()


def _tree(path) -> dict:
    """Every file under ``path`` (or ``path`` itself) with its bytes: what must survive a refused export."""
    from pathlib import Path

    path = Path(path)
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _staging_left(root) -> list:
    return [p for p in root.rglob("*") if ".tokenclean-staging" in p.name or ".tokenclean-old" in p.name]


def test_export_writes_only_new_paths_or_its_own_earlier_export(quickstart):
    """The export matrix: a foreign directory or file, the run directory, its database, anything else in the run,
    an export of another kind, an earlier export with a file added, and an earlier export with and without
    --overwrite. Only the last with the flag replaces anything; every other case exits 2 and leaves every byte."""
    import datasets
    from typer.testing import CliRunner

    from tokenclean.cli import app

    home, _ = quickstart
    run = home / "runs" / "my-run"
    earlier = run / "export" / "data" / "global"  # the README's first export, written by the fixture
    assert (earlier / "tokenclean.json").is_file()
    (home / "mydatasets").mkdir()
    (home / "mydatasets" / "other.txt").write_text("precious")
    (home / "notes.parquet").write_text("precious")
    (home / "notes-dir.parquet").mkdir()
    (home / "link").symlink_to(home / "mydatasets")
    refused = [  # (arguments, the path whose bytes must not change, what the error says)
        (["--format", "hf", "--out", str(home / "mydatasets")], home / "mydatasets", "not a tokenclean export"),
        (["--format", "parquet", "--out", str(home / "notes.parquet")], home / "notes.parquet", "not a tokenclean"),
        (["--format", "parquet", "--out", str(home / "notes-dir.parquet")], home / "notes-dir.parquet", "not a"),
        (["--format", "hf", "--out", str(home / "link")], home / "mydatasets", "symbolic link"),
        (["--format", "hf", "--out", str(run)], run, "inside the run directory"),
        (["--model", "global", "--adapter-only", "--out", str(run)], run, "inside the run directory"),
        (["--format", "parquet", "--out", str(run / "tokenclean.duckdb")], run, "inside the run directory"),
        (["--format", "parquet", "--out", str(run / "adapters" / "x.parquet")], run, "inside the run directory"),
        (["--format", "hf", "--out", str(run / "export")], run, "inside the run directory"),
        (["--format", "hf", "--out", str(run / "export" / "model" / "global")], run, "model export"),
        (["--model", "global", "--out", str(earlier)], run, "dataset-hf export"),
        (["--format", "hf", "--out", str(earlier)], run, "--overwrite"),
        (["--format", "hf", "--out", str(earlier), "--overwrite", "--selection", "nonesuch"], run, "no selection"),
    ]
    for args, keep, says in refused:
        before = _tree(keep)
        res = CliRunner().invoke(app, ["export", str(run), *args])
        assert res.exit_code == 2, (args, res.output)
        assert says in res.output, (args, res.output)
        assert _tree(keep) == before, args
    assert (home / "mydatasets" / "other.txt").read_text() == "precious"

    # an earlier export holding a file it did not write is not replaced, even with --overwrite
    (earlier / "mine.txt").write_text("precious")
    before = _tree(earlier)
    res = CliRunner().invoke(app, ["export", str(run), "--format", "hf", "--out", str(earlier), "--overwrite"])
    assert res.exit_code == 2 and "mine.txt" in res.output, res.output
    assert _tree(earlier) == before
    (earlier / "mine.txt").unlink()

    # the one case that replaces: an earlier export of the same kind, with --overwrite
    rows = datasets.load_from_disk(str(earlier))["labels"]
    res = CliRunner().invoke(app, ["export", str(run), "--format", "hf", "--out", str(earlier), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert datasets.load_from_disk(str(earlier))["labels"] == rows
    manifest = json.loads((earlier / "tokenclean.json").read_text())
    assert manifest["tokenclean_export"] == "dataset-hf"
    assert sorted(manifest["files"]) == sorted(_tree(earlier))  # it lists exactly what it wrote
    assert not _staging_left(home)


def test_a_failed_export_leaves_nothing_behind(tmp_path):
    """An export that fails midway (here: its reader breaks after one batch) leaves neither the target nor any
    temporary file, and an earlier export at the target stays as it was."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tokenclean.tasks.export import EXPORT_SCHEMA, write_dataset

    def reader():
        yield pa.RecordBatch.from_pylist([], schema=pa.schema([]))
        raise OSError(28, "No space left on device")

    for fmt in ("parquet", "jsonl", "hf"):
        out = tmp_path / f"data-{fmt}"
        with pytest.raises(Exception):  # noqa: B017 (any error: the writer may not make a partial export)
            write_dataset([reader()], out, fmt)
        assert list(tmp_path.iterdir()) == [], fmt
    # an earlier export survives a failed replacement of it
    out = tmp_path / "data.parquet"
    write_dataset([iter([])], out, "parquet")
    before = _tree(tmp_path)
    with pytest.raises(OSError):
        write_dataset([reader()], out, "parquet", overwrite=True)
    assert _tree(tmp_path) == before
    assert pq.read_table(out).schema == EXPORT_SCHEMA


def _kept_by_ids(home, ds) -> dict:
    """Each exported row's count of kept tokens in the stored selection (not read from the export's labels), keyed
    by its input ids (how a trainer's batch row is found again)."""
    from tokenclean.summary import output_key

    con = _con(home)
    try:
        sel = output_key(con, "global", "selection")
        n = dict(con.execute("SELECT sample_id, count(*) FROM selected_tokens WHERE selection = ? GROUP BY sample_id",
                             [sel]).fetchall())
    finally:
        con.close()
    return {tuple(r["input_ids"]): n.get(r["sample_id"], 0) for r in ds}


def test_trl_sft_trainer_trains_on_the_export_as_is(quickstart, tmp_path):
    """TRL's ``SFTTrainer`` (pinned in requirements/ci.txt) on the hf export, unchanged: at each step its loss is the
    mean NLL over the batch rows' labelled tokens (a plain forward, computed here with the weights of that step)
    and ``num_items_in_batch`` is the number of kept tokens of those rows."""
    import copy

    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    home, _ = quickstart
    ds = datasets.load_from_disk(str(home / "runs" / "my-run" / "export" / "data" / "global"))
    kept = _kept_by_ids(home, ds)
    tok = AutoTokenizer.from_pretrained(home / "my-model")
    model = AutoModelForCausalLM.from_pretrained(home / "my-model")
    seen = []  # (inputs, num_items_in_batch, weights before the step, loss) of each training step

    class Watched(SFTTrainer):  # observes compute_loss, changes nothing
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            weights = copy.deepcopy(model.state_dict())
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            seen.append(({k: v.clone() for k, v in inputs.items() if torch.is_tensor(v)}, num_items_in_batch,
                         weights, float((loss[0] if return_outputs else loss).detach())))
            return loss

    args = SFTConfig(output_dir=str(tmp_path / "t"), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                     report_to=[], use_cpu=True, bf16=False, save_strategy="no", logging_steps=1,
                     max_length=None, dataloader_drop_last=True)
    trainer = Watched(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.train()
    assert len(seen) == 2 and trainer.state.global_step == 2
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    ref = AutoModelForCausalLM.from_pretrained(home / "my-model").eval()
    for step, (inputs, n_items, weights, loss) in enumerate(seen):
        ref.load_state_dict(weights)
        ids, attn, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        rows = [tuple(r[m.bool()].tolist()) for r, m in zip(ids, attn)]
        assert int(n_items) == sum(kept[r] for r in rows) == int((labels != -100).sum()), step
        with torch.no_grad():
            logp = torch.log_softmax(ref(input_ids=ids, attention_mask=attn).logits.float(), -1)
        target = labels[:, 1:]
        mask = target != -100
        nll = -logp[:, :-1].gather(-1, target.clamp_min(0)[..., None])[..., 0][mask]
        assert loss == pytest.approx(float(nll.mean()), abs=1e-5), step
        assert logged[step] == pytest.approx(loss, abs=1e-4), step
    assert seen[0][3] != seen[1][3]  # the second step saw updated weights


def test_trl_max_length_below_data_max_length_cuts_labelled_tokens(quickstart, tmp_path):
    """The README's warning holds: ``SFTConfig.max_length`` shorter than the export's rows truncates them and drops
    labelled tokens (silently); ``max_length`` >= ``data.max_length`` keeps every one."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tokenclean.config import DataConfig

    home, _ = quickstart
    ds = datasets.load_from_disk(str(home / "runs" / "my-run" / "export" / "data" / "global"))
    tok = AutoTokenizer.from_pretrained(home / "my-model")
    model = AutoModelForCausalLM.from_pretrained(home / "my-model")
    total = sum(lab != -100 for r in ds for lab in r["labels"])
    longest = max(len(r["input_ids"]) for r in ds)

    def labelled(max_length):
        args = SFTConfig(output_dir=str(tmp_path / str(max_length)), max_length=max_length, report_to=[],
                         use_cpu=True, bf16=False)
        prepared = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok).train_dataset
        return sum(lab != -100 for r in prepared for lab in r["labels"])

    assert labelled(DataConfig().max_length) == labelled(None) == total  # the quickstart's data.max_length
    assert labelled(longest // 2) < total
