"""A given reference model (``model.reference``): its tokenizer is checked before any work, it scores the fixed
pool D0..DT in place of theta_1 trained on D0, its losses are its own forward pass, and its key follows its weights.

Real components: the tiny embedded base, a second model saved with ``save_pretrained`` (the base with perturbed
weights and another chat template), a real DuckDB run directory, Prefect flows; the thread task runner instead of
Ray keeps it cheap, and puts base and reference in one process, where a model cache keyed by the wrong model
would serve one for the other (Ray scoring is covered by test_flows).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import tiny_config
from tests.store_reads import read_run
from tokenclean.config import RunConfig
from tokenclean.tasks import store

N_TRAIN, N_EVAL = 90, 12
SWAP = (300, 301)  # two ordinary tokens of the embedded vocabulary whose ids a refused reference swaps


def _write_rows(src: Path, dest: Path, n: int) -> Path:
    dest.write_text("".join(src.read_text().splitlines(keepends=True)[:n]))
    return dest


def _perturbed(tiny, out: Path, seed: int) -> Path:
    """The base with other weights, saved as a model directory of its own, with a chat template of its own."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny.model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(tiny.model)
    tok.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    tok.save_pretrained(out)
    return out


def _config(root: Path, reference: str | None, **kw) -> RunConfig:
    cfg = tiny_config(root / "runs", name="given", mode="fixed", baselines=["global"], **kw)
    cfg["data"] = {"paths": [str(root / "train.jsonl")], "eval_paths": [str(root / "eval.jsonl")], "max_length": 256}
    cfg["model"] = {"base": "embedded", "reference": reference}
    cfg["score"] = {"batch_tokens": 4096, "shard_samples": 32}
    cfg["ray"] = {"enabled": False}
    cfg["eval"] = {"max_new_tokens": 0}  # the reference's scoring is the point, not generation
    return RunConfig.model_validate(cfg)


@pytest.fixture(scope="module")
def inputs(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("given")
    _write_rows(tiny.train, root / "train.jsonl", N_TRAIN)
    _write_rows(tiny.eval, root / "eval.jsonl", N_EVAL)
    return root


# ---- the tokenizer check, before any work -------------------------------------------------------------------

def _tokenizer_dir(tiny, out: Path, edit) -> Path:
    """The base's config and tokenizer files (what the check reads), with ``edit`` applied to them."""
    out.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny.model / f, out / f)
    edit(out)
    return out


def _swap_ids(d: Path) -> None:
    tj = json.loads((d / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = (next(t for t, i in vocab.items() if i == n) for n in SWAP)
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (d / "tokenizer.json").write_text(json.dumps(tj))


def _add_token(d: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(d)


def _other_bos(d: Path) -> None:
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["bos_token"] = "<|system|>"
    (d / "tokenizer_config.json").write_text(json.dumps(tc))


def _small_embedding(d: Path) -> None:
    c = json.loads((d / "config.json").read_text())
    c["vocab_size"] -= 1
    (d / "config.json").write_text(json.dumps(c))


@pytest.mark.parametrize("edit, says", [
    (_swap_ids, "its tokenizer maps {a!r} to 301, the run's tokenizer ({base}) to 300"),
    (_add_token, "its tokenizer maps '<extra>' to {n}, a token the run's tokenizer ({base}) does not have"),
    (_other_bos, "its bos token is '<|system|>' (5), the run's tokenizer ({base}) has '<s>' (0)"),
    (_small_embedding, "its config's vocab_size {m} does not cover the {n} token ids of the run's tokenizer "
                       "({base})"),
], ids=["swapped-ids", "added-token", "other-bos", "embedding-too-small"])
def test_a_reference_that_reads_the_ids_otherwise_is_refused_before_any_work(tiny, tokenizer, inputs, tmp_path,
                                                                                edit, says):
    """One line naming both tokenizers and the first difference, said by the CLI as it is (exit 2); nothing is
    made: no run directory, no database, so no sample ingested."""
    from tokenclean.errors import describe_error
    from tokenclean.flows.prepare import prepare

    ref = _tokenizer_dir(tiny, tmp_path / "ref", edit)
    cfg = _config(tmp_path, str(ref))
    with pytest.raises(ValueError) as err:
        prepare(cfg, progress=False)
    first = tokenizer.convert_ids_to_tokens(SWAP[0])
    n = len(tokenizer)
    want = (f"model.reference {ref}: {says.format(a=first, base=tiny.model, n=n, m=n - 1)}"
            + ("" if edit is _small_embedding else "; the reference must share the base's tokenizer"))
    assert describe_error(err.value) == (2, want)
    assert not cfg.run_dir.exists()


def test_an_instruct_tokenizer_of_the_base_is_accepted(tmp_path, caplog):
    """Llama-3.1: the base's tokenizer (eos <|end_of_text|>, no chat template) and the instruct model's (eos
    <|eot_id|>, its template) are one vocabulary: accepted, the eos difference logged; the paper's Table 3 case."""
    from transformers import AutoTokenizer

    from tests.real_tokenizers import Unavailable, fetch
    from tokenclean.flows.prepare import check_reference_tokenizer

    try:
        instruct = fetch("llama3_1")
    except Unavailable as e:
        pytest.skip(str(e))
    ref = tmp_path / "instruct"
    shutil.copytree(instruct, ref)
    (ref / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 128256}))
    base_tok = AutoTokenizer.from_pretrained(instruct)
    base_tok.eos_token, base_tok.chat_template = "<|end_of_text|>", None
    check_reference_tokenizer(str(ref), ref, base_tok, "llama-3.1-base")
    assert "its eos token is '<|eot_id|>', the run's tokenizer (llama-3.1-base) has '<|end_of_text|>'" in caplog.text


# ---- a fixed-model run with a given reference ---------------------------------------------------------------

def _outputs(cfg: RunConfig) -> dict:
    from tokenclean.tasks.names import label

    return read_run(cfg, lambda con: {(label(o["variant"], o["iteration"]), o["kind"]): o["key"]
                                   for o in store.current_outputs(con)})


def _stages(cfg: RunConfig, since) -> set:
    return {(s["stage"], s["name"]) for s in read_run(cfg, lambda con: store.stages_since(con, since))}


@pytest.fixture(scope="module")
def given_run(tiny, inputs, tmp_path_factory):
    """A fixed-model run with ``model.reference`` = the base with perturbed weights, in a directory of its own."""
    from tokenclean.flows.cleaning import run

    ref = _perturbed(tiny, tmp_path_factory.mktemp("reference") / "model", seed=1)
    cfg = _config(inputs, str(ref))
    run(cfg)
    return cfg, ref


def test_the_given_reference_scores_the_whole_pool_with_its_own_forward(given_run):
    """No warm-up adapter is trained; D0..DT is the pool; the stored reference losses are a plain HF forward pass
    of the given model (fp32 log-softmax NLL at each response token); it is evaluated as ``reference``."""
    import torch
    from transformers import AutoModelForCausalLM

    from tokenclean.flows.scoring import load_shard_samples

    cfg, ref = given_run
    out = _outputs(cfg)
    dataset, ref_losses = out[("data", "dataset")], out[("reference", "losses")]
    assert ("reference", "adapter") not in out and ("reference", "selection") not in out
    assert read_run(cfg, lambda con: con.execute("SELECT count(*) FROM adapters").fetchone()[0]) == 1  # global's
    model_key = out[("reference", "model")]
    assert model_key != out[("base", "model")]
    assert read_run(cfg, lambda con: store.model_inputs(con, model_key))["path"] == str(ref.resolve())
    assert read_run(cfg, lambda con: store.artifact_inputs(con, "eval", out[("reference", "eval")]))["model"] == model_key
    assert read_run(cfg, lambda con: store.check_integrity(con, ref_losses, dataset, [0, 1, 2]))["ok"]
    sel = read_run(cfg, lambda con: store.selection_record(con, out[("global", "selection")]))
    assert sel["parts"] == "0,1,2"

    ids = read_run(cfg, lambda con: [r[0] for r in con.execute(
        "SELECT sample_id FROM dataset_samples WHERE dataset = ? AND part >= 0 ORDER BY sample_id", [dataset])
        .fetchall()])
    samples = read_run(cfg, lambda con: load_shard_samples(con, ids).samples())
    stored = dict(read_run(cfg, lambda con: [((s, p), loss) for s, p, loss in con.execute(
        "SELECT sample_id, pos, loss FROM token_losses WHERE model = ?", [ref_losses]).fetchall()]))
    hf = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
    want = {}
    with torch.no_grad():
        for s in samples:
            x = torch.from_numpy(s.input_ids.astype(np.int64))[None]
            logp = torch.log_softmax(hf(input_ids=x).logits.float(), -1)[0]
            for p in np.flatnonzero(s.target):
                if p > 0:
                    want[(s.sample_id, int(p))] = -logp[p - 1, x[0, p]].item()
    assert want and set(want) <= set(stored)
    keys = sorted(want)
    np.testing.assert_allclose([stored[k] for k in keys], [want[k] for k in keys], rtol=0, atol=1e-4)


def test_the_reference_is_keyed_by_its_weights_and_never_served_as_the_base(given_run, tiny):
    """The workers load the given model under its own key (never the base's), and new weights at the same path are
    a new key: a refresh rescores the pool with them and reuses every base loss."""
    from tokenclean.flows.artifacts import given_reference, scorer
    from tokenclean.flows.cleaning import refresh
    from tokenclean.flows.prepare import prepare
    from tokenclean.flows.scoring import score_job
    from tokenclean.tasks import keys

    cfg, ref = given_run
    ctx = prepare(cfg, progress=False)
    try:
        given = given_reference(ctx)
        job = score_job(ctx, scorer(ctx, given), given.adapter, given.weights)
        base_job = score_job(ctx, "0", None)
        assert (job.scorer.base_path, job.scorer.base_key, job.adapter) == (str(ref.resolve()), given.key, None)
        assert (base_job.scorer.base_path, base_job.scorer.base_key) == (ctx.base_path, ctx.base_model)
        assert given.key != ctx.base_model
        # like the base's: its name and weights, not where it lies (a moved model keeps its losses)
        assert given.key == keys.base_model_key({"name": str(ref), "weights": keys.weights_hash(ref)})
    finally:
        ctx.con.close()

    before = _outputs(cfg)
    since = read_run(cfg, store.last_stage_time)
    shutil.rmtree(ref)
    _perturbed(tiny, ref, seed=2)
    out = refresh(cfg)
    after = _outputs(cfg)
    assert after[("reference", "model")] != before[("reference", "model")]
    assert out["samples"]["base"]["scored"] == 0 and out["samples"]["base"]["reused"] > 0
    assert out["samples"]["reference"]["scored"] == out["samples"]["base"]["reused"]
    assert ("score", "base") not in _stages(cfg, since) and ("score", "reference") in _stages(cfg, since)
