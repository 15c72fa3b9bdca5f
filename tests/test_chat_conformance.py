"""Conformance of ``data.template: model`` with the ecosystem's oracle, family by family, on real tokenizers.

For each family (real ``tokenizer.json`` + chat template, fetched once into a cache by
``tests/real_tokenizers.py``) a generated set of conversation shapes is ingested by
``tests.ingest_helpers.ingest``, and each sample is compared with:

* ids: the model's own template, ``apply_chat_template(tokenize=True)``, exactly;
* targets: TRL's training template for the family (``trl/chat_templates/<family>_training.jinja``,
  whose ``{% generation %}`` blocks are its statement of what is trained) through transformers'
  ``return_assistant_tokens_mask``, exactly, after the conventions of ``CONVENTIONS`` (README,
  "Tokenisation rule"), each applied explicitly to the oracle and counted.

The same shapes then run the ``{% generation %}`` path, with TRL's training template as the
tokenizer's own: ids and targets equal the oracle's with no convention at all, multi-turn included.

Llama-2 has no TRL training template. Its target oracle is the incremental prefix rendering of
the model's own template: an assistant turn's targets are the tokens that rendering the
conversation up to that turn adds to rendering the conversation before it with the generation
prompt, i.e. exactly what a server would have the model continue with. It uses nothing but the
model's template and tokenizer (a hand-marked training template would be our own reading of the
template, checked against itself), and it is exact for Llama-2, whose template appends each
message to the text before it (asserted, token by token, on every row).

A shape a family's template cannot render is refused, and ``_expected_refusals`` states the true
reason for each family and path.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import json
from datetime import datetime
from importlib.resources import files

import pytest
import real_tokenizers

# family -> TRL's training template (the lenml llama3_1 package carries the Llama-3 template, TRL's llama3.jinja);
# None: TRL has none (Llama-2), the prefix oracle stands in
TRAINING = {"qwen3": "qwen3_training.jinja", "llama3_1": "llama3_training.jinja", "gemma3": "gemma3_training.jinja",
            "deepseek_v3": "deepseekv3_training.jinja", "gptoss": "gptoss_training.jinja", "llama2": None}
# Where tokenclean's default differs from TRL's training template, by family: what the oracle's mask becomes.
CONVENTIONS = {
    # eot-newline: the newline a template writes after the end-of-turn token is never generated (generation
    # stops at the token); header: the generation prompt (DeepSeek's <｜Assistant｜>, gpt-oss's <|start|>assistant)
    # is written by the server, not generated; earlier-turn-think: Qwen3 renders no think block before the last query
    "qwen3": ("eot-newline", "earlier-turn-think"),
    "llama3_1": (),
    "gemma3": ("eot-newline",),
    "deepseek_v3": ("header",),
    "gptoss": ("header",),
    "llama2": (),
}
EOT = {"qwen3": "<|im_end|>", "llama3_1": "<|eot_id|>", "gemma3": "<end_of_turn>",
       "deepseek_v3": "<｜end▁of▁sentence｜>", "gptoss": "<|return|>", "llama2": "</s>"}
HEADER = {"deepseek_v3": "<｜Assistant｜>", "gptoss": "<|start|>assistant"}
# the reasoning field each template reads (gpt-oss: its analysis channel); the others read reasoning_content or none
READS = {"gptoss": "thinking"}
TOOL_CALL = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]


@contextlib.contextmanager
def _fixed_date():
    """The oracle renders on the day ingest renders every template (``template.FIXED_DATE``): Llama-3.1's template
    prints ``date_string`` (its default is that day), gpt-oss's ``strftime_now``, which reads transformers' clock."""
    from transformers.utils import chat_template_utils as ctu

    class Fixed(datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2024, 7, 26, tzinfo=tz)

    saved, ctu.datetime = ctu.datetime, Fixed
    try:
        yield
    finally:
        ctu.datetime = saved


def _shapes():
    """(id, messages as a row gives them, messages as the template reads them): every shape of the issue."""
    u = [{"role": "user", "content": "Where does Ana live?"}]
    sys_ = [{"role": "system", "content": "Answer briefly."}]
    answers = ["Ana lives in Port Velo.", "Zwei Wörter: 日本 🙂.", "x"]
    rows = []

    def add(name, msgs):
        rows.append((name, msgs))

    for k, a in enumerate(answers):
        add(f"single-{k}", u + [{"role": "assistant", "content": a}])
        add(f"system-{k}", sys_ + u + [{"role": "assistant", "content": a}])
        add(f"multi-{k}", sys_ + u + [{"role": "assistant", "content": a}, {"role": "user", "content": "And Bo?"},
                                      {"role": "assistant", "content": "Bo too."}, {"role": "user", "content": "Why?"},
                                      {"role": "assistant", "content": a[::-1]}])
        add(f"whitespace-{k}", [{"role": "user", "content": " \n Where? \n"},
                                {"role": "assistant", "content": f" \n {a} \n "}])
        add(f"newline-first-{k}", u + [{"role": "assistant", "content": f"\n  {a}"}])
        add(f"special-text-{k}", u + [{"role": "assistant", "content": f"{a} <|im_end|>"}])
        add(f"special-eot-{k}", u + [{"role": "assistant", "content": f"{a} <|eot_id|>"}])
        add(f"special-mid-{k}", u + [{"role": "assistant", "content": f"<|im_start|>{a}<|eot_id|> end"}])
        add(f"think-inline-{k}", u + [{"role": "assistant", "content": f"<think>\nStep 1. Step {k}.\n</think>\n\n{a}"}])
        add(f"think-empty-{k}", u + [{"role": "assistant", "content": f"<think>\n\n</think>\n\n{a}"}])
        for field in ("reasoning_content", "reasoning", "thinking"):
            add(f"think-field-{field}-{k}", u + [{"role": "assistant", "content": a, field: f"Step 1, step {k}."}])
        add(f"think-multi-{k}", u + [{"role": "assistant", "content": "A1.", "reasoning_content": "r1"},
                                     {"role": "user", "content": "Q2?"},
                                     {"role": "assistant", "content": f"<think>r2</think>{a}"}])
        add(f"tools-{k}", u + [{"role": "assistant", "content": "", "tool_calls": TOOL_CALL},
                               {"role": "tool", "content": '{"sky": "clear"}'},
                               {"role": "assistant", "content": a}])
        add(f"tools-content-{k}", u + [{"role": "assistant", "content": "Let me check.", "tool_calls": TOOL_CALL,
                                        "reasoning_content": "I need the weather."},
                                       {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "warm"},
                                       {"role": "assistant", "content": a}])
    # once each: a call with its reasoning, answered and not (gpt-oss: analysis then commentary); each family's
    # end-of-turn token as text
    think_call = {"role": "assistant", "content": "", "tool_calls": TOOL_CALL, "reasoning_content": "I need it."}
    add("tools-thinking", u + [think_call, {"role": "tool", "content": "sunny"},
                               {"role": "assistant", "content": answers[0]}])
    add("tools-last", u + [think_call])
    for eot in ("</s>", "<｜end▁of▁sentence｜>", "<|return|>", "<|end|>", "<end_of_turn>"):
        add(f"special-{eot}", u + [{"role": "assistant", "content": f"{answers[0]} {eot}"}])
    return rows


def _as_template_reads(family, msgs):
    """The reasoning under the field name the family's template reads."""
    field = READS.get(family, "reasoning_content")
    out = []
    for m in msgs:
        m = dict(m)
        for f in ("reasoning_content", "reasoning", "thinking"):
            if f in m and f != field:
                m[field] = m.pop(f)
        out.append(m)
    return out


LONG = [(f"truncated-{k}", [{"role": "user", "content": "Tell me about Port Velo."},
                            {"role": "assistant", "content": ("<think>\nLong thought.\n</think>\n\n" if k else "")
                             + "Port Velo is a harbour town. " * 30}]) for k in range(2)]


def _truncate_at(tok):
    """A length that cuts the long answers after a few dozen tokens (gpt-oss's template writes a long system prompt)."""
    with _fixed_date():
        prompt = tok.apply_chat_template(LONG[0][1][:1], add_generation_prompt=True, tokenize=True, return_dict=True)
    return 32 + len(prompt["input_ids"])


@pytest.fixture(scope="module", params=sorted(TRAINING))
def family(request):
    name = request.param
    try:
        real_tokenizers.fetch(name)
    except real_tokenizers.Unavailable as e:
        pytest.skip(str(e))
    tok = real_tokenizers.load(name)
    if TRAINING[name] is None:
        return name, tok, None, None
    trl = (files("trl") / "chat_templates" / TRAINING[name]).read_text()
    marked = copy.copy(tok)  # the same vocabulary (shared, read-only), TRL's template as its own
    marked.chat_template = trl
    assert tok.chat_template != trl
    return name, tok, trl, marked


def _ingest(tmp_path, tok, rows, max_length):
    from tests.ingest_helpers import ingest

    path = tmp_path / f"rows-{max_length}.jsonl"
    path.write_text("".join(json.dumps({"id": name, "messages": msgs}) + "\n" for name, msgs in rows))
    return ingest([str(path)], [], tok, max_length=max_length, eval_fraction=0.0, n_parts=1, seed=0,
                  template="model")


def _runs(ids, mask):
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def _oracle(tok, trl, msgs):
    """The model template's ids, and TRL's training-template ids and assistant mask (the prefix oracle's
    where TRL has no training template)."""
    def ids_of(m, **kw):
        with _fixed_date():
            return list(tok.apply_chat_template(m, tokenize=True, return_dict=True, **kw)["input_ids"])

    ids = ids_of(msgs)
    if trl is None:
        mask = [False] * len(ids)
        for j, m in enumerate(msgs):
            if m["role"] == "assistant":
                prompt, upto = ids_of(msgs[:j], add_generation_prompt=True), ids_of(msgs[:j + 1])
                assert upto[:len(prompt)] == prompt and ids[:len(upto)] == upto  # prefix-stable: the oracle holds
                mask[len(prompt):len(upto)] = [True] * (len(upto) - len(prompt))
        return ids, ids, mask
    with _fixed_date():
        out = tok.apply_chat_template(msgs, chat_template=trl, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
    return ids, list(out["input_ids"]), [bool(x) for x in out["assistant_masks"]]


def _apply_conventions(family, tok, ids_t, mask_t, our_runs, counts):
    """TRL's target runs, with each of the family's listed conventions applied (and counted)."""
    runs = _runs(ids_t, mask_t)
    conv = CONVENTIONS[family]
    if "header" in conv:  # TRL's block opens with the generation prompt, which the server writes
        head = tok.encode(HEADER[family], add_special_tokens=False)
        for k, r in enumerate(runs):
            if r[:len(head)] == head:
                runs[k] = r[len(head):]
                counts["header"] += 1
    if "eot-newline" in conv:  # "<|im_end|>\n": the "\n" is the template's, not generated
        eot, nl = tok.convert_tokens_to_ids(EOT[family]), tok.encode("\n", add_special_tokens=False)
        for r in runs:
            if r[-len(nl):] == nl and r[-len(nl) - 1] == eot:
                del r[-len(nl):]
                counts["eot-newline"] += 1
    if "earlier-turn-think" in conv:  # Qwen3 renders no think block in turns before the last query
        think, end_think = tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")
        sep = tok.encode("\n\n", add_special_tokens=False)
        for k, r in enumerate(runs):
            if r[0] == think and k < len(our_runs) and our_runs[k][0] != think:
                cut = r.index(end_think) + 1
                assert r[cut:cut + len(sep)] == sep
                empty = cut == 3  # <think> "\n\n" </think>: the empty scaffold
                counts["earlier-turn-think (empty)" if empty else "earlier-turn-think (reasoning dropped)"] += 1
                runs[k] = r[cut + len(sep):]
    return runs


def _check(family, tok, trl, samples, shapes, max_length, counts, marked):
    by_id = {s["uid"]: s for s in samples.to_pylist()}
    for name, msgs in shapes:
        s = by_id[name]
        ids, ids_t, mask_t = _oracle(tok, trl, _as_template_reads(family, msgs))
        if marked:  # the generation path: the template's own blocks, exactly
            assert ids == ids_t
            assert s["input_ids"] == ids[:max_length], name
            assert s["response_mask"] == mask_t[:max_length], name
            counts["equal"] += 1
            continue
        assert s["input_ids"] == ids[:max_length], name  # the model's own template, verbatim
        ours = _runs(s["input_ids"], s["response_mask"])
        want = _apply_conventions(family, tok, ids_t, mask_t, ours, counts)
        if s["truncated"]:  # the kept prefix: the runs up to the cut, the last one cut short
            assert ours[:-1] == want[:len(ours) - 1] and want[len(ours) - 1][:len(ours[-1])] == ours[-1], name
        else:
            assert ours == want, name
        if ids_t == ids:  # the same text: position by position too
            flat = [t for r in want for t in r]
            assert [t for t, m in zip(s["input_ids"], s["response_mask"]) if m] == flat[:sum(s["response_mask"])]
        counts["equal"] += 1


ALTERNATE = ("the chat template refuses the conversation: Conversation roles must alternate "
             "user/assistant/user/assistant/...")


def _expected_refusal(family, path, msgs):
    """Why the family's template cannot render a conversation (None: it can), read off its template: Llama-3's
    and Llama-2's and Gemma-3's have no tool calls (the last two no tool messages either); DeepSeek-V3's writes
    the call's arguments as a string (its training template, as JSON); gpt-oss's takes a call's analysis from
    its content or its thinking, not both."""
    calls = any(m.get("tool_calls") for m in msgs)
    tool_msg = any(m["role"] == "tool" for m in msgs)
    if family == "llama3_1" and calls:
        return "the chat template drops the tool calls of assistant turn 1"
    if family in ("gemma3", "llama2") and (tool_msg or calls):
        return ALTERNATE if tool_msg else "the chat template drops the tool calls of assistant turn 1"
    if family == "deepseek_v3" and path == "model-template" and calls:
        return 'the chat template fails on this conversation (TypeError: can only concatenate str (not "dict") to str)'
    if family == "gptoss" and any(m.get("tool_calls") and m["content"] and m.get("reasoning_content") for m in msgs):
        return ("the chat template refuses the conversation: Cannot pass both content and thinking in an assistant "
                "message with tool calls! Put the analysis message in one or the other, but not both.")
    return None


def _expected_refusals(family, path, shapes):
    return {name: r for name, m in shapes if (r := _expected_refusal(family, path, m))}


@pytest.mark.parametrize("path", ["model-template", "generation-blocks"])
def test_targets_and_ids_equal_the_oracle(tmp_path, family, path):
    name, tok, trl, marked_tok = family
    if path == "generation-blocks" and trl is None:
        pytest.skip(f"TRL has no {name} training template")
    use = marked_tok if path == "generation-blocks" else tok
    shapes = _shapes()
    counts = collections.Counter()
    truncate_at = _truncate_at(tok)
    for rows, max_length in ((shapes, 4096), (LONG, truncate_at)):
        res = _ingest(tmp_path, use, rows, max_length)
        refused = {q["raw"] and json.loads(q["raw"])["id"]: q["reason"] for q in res.quarantine}
        want = _expected_refusals(name, path, rows)
        assert refused == want
        kept = [(n, m) for n, m in rows if n not in want]
        _check(name, use, trl, res.samples, kept, max_length, counts, path == "generation-blocks")
        if max_length == truncate_at:
            assert all(res.samples.column("truncated").to_pylist())
        counts["compared"] += len(kept)
    assert counts["equal"] == counts["compared"]
    print(f"\n{name} {path}: {dict(counts)}")


def test_reasoning_a_template_drops_is_counted(tmp_path, family):
    """Qwen3 renders no reasoning in turns before the last user query; Llama-3's renders none: counted."""
    name, tok, _, _ = family
    rows = [("a", [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1", "reasoning": "r1"},
                   {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "<think>r2</think>A2"}]),
            ("b", [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "reasoning_content": "r"}])]
    res = _ingest(tmp_path, tok, rows, 4096)
    assert res.samples.num_rows == 2
    # DeepSeek-V3's drops inline reasoning too; gpt-oss renders the last turn's thinking as its analysis channel
    assert res.reasoning_dropped == {"qwen3": 1, "llama3_1": 2, "gemma3": 2, "deepseek_v3": 3, "gptoss": 1,
                                     "llama2": 2}[name]


def test_tulu_refuses_what_it_cannot_render(tmp_path, family):
    """Reasoning fields, tool calls and tool messages have no place in the Tulu format: refused, saying so."""
    from tests.ingest_helpers import ingest

    _, tok, _, _ = family
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"id": n, "messages": m}) for n, m in [
        ("r", [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "reasoning_content": "r"}]),
        ("t", [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "", "tool_calls": TOOL_CALL},
               {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]),
        ("ok", [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>r</think>A"}])]) + "\n")
    res = ingest([str(path)], [], tok, max_length=512, eval_fraction=0.0, n_parts=1, seed=0)
    assert res.samples.column("uid").to_pylist() == ["ok"]
    assert sorted(q["reason"] for q in res.quarantine) == [
        "messages[1] has reasoning, which the Tulu template cannot render; use data.template: model with a "
        "template that does",
        "messages[1] has tool_calls, which the Tulu template cannot render; use data.template: model with a "
        "template that does"]


def test_empty_think_convention_is_explicit_and_keyed(tmp_path, family):
    """Qwen3's empty think block is a target by default (the model generates it when served with thinking on);
    ``data.empty_think: prompt`` makes it context, and changes the tokenization key and so the sample ids."""
    from tests.ingest_helpers import ingest
    from tokenclean.config import DataConfig
    from tokenclean.tasks.ingest import tokenization_of

    name, tok, _, _ = family
    if name != "qwen3":
        pytest.skip("only Qwen3's template writes an empty think block")
    assert DataConfig().empty_think == "target"
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "Q?"},
                                                        {"role": "assistant", "content": "Answer."}]}) + "\n"
                    + json.dumps({"id": "r", "messages": [{"role": "user", "content": "Q?"},
                                                          {"role": "assistant", "content": "Answer.",
                                                           "reasoning": "r"}]}) + "\n")

    def targets(setting):
        res = ingest([str(path)], [], tok, max_length=512, eval_fraction=0.0, n_parts=1, seed=0, template="model",
                     empty_think=DataConfig(empty_think=setting).empty_think)
        rows = res.samples.to_pylist()
        return ({s["uid"]: tok.decode([t for t, m in zip(s["input_ids"], s["response_mask"]) if m]) for s in rows},
                {s["sample_id"] for s in rows})

    (default, ids_target), (prompt, ids_prompt) = targets("target"), targets("prompt")
    assert default == {"a": "<think>\n\n</think>\n\nAnswer.<|im_end|>",
                       "r": "<think>\nr\n</think>\n\nAnswer.<|im_end|>"}
    assert prompt == {"a": "Answer.<|im_end|>", "r": default["r"]}  # reasoning is generated either way
    assert tokenization_of(tok, 512, "model", "prompt") != tokenization_of(tok, 512, "model")
    assert not ids_target & ids_prompt


def test_a_turn_not_closed_by_its_end_of_turn_token_is_refused_saying_so(family):
    """Text the template writes between an answer and its end-of-turn token is neither the row's nor known to be
    generated: the row is refused with that reason, not trained with a guessed end."""
    from tests.template_helpers import render_model_template
    from tokenclean.tasks.template import TemplateError

    name, tok, _, _ = family
    if name != "llama3_1":
        pytest.skip("one family suffices")
    signed = copy.copy(tok)
    signed.chat_template = tok.chat_template.replace("| trim + '<|eot_id|>'", "| trim + ' (signed)<|eot_id|>'")
    assert signed.chat_template != tok.chat_template
    with pytest.raises(TemplateError, match="no end-of-turn token right after assistant turn 1"):
        render_model_template(signed, [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}])


def test_reasoning_dropped_count_survives_a_resumed_ingest(tmp_path, family):
    """The count is written with each part, so an ingest resumed from finished parts reports it too."""
    import duckdb

    from tokenclean.flows.ingest import stage_inputs
    from tokenclean.tasks.ingest import IngestSpec, tokenization_of

    name, tok, _, _ = family
    if name != "qwen3":
        pytest.skip("one family suffices")
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"messages": [
        {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1", "reasoning": "r1"},
        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]}) + "\n")
    spec = IngestSpec(tokenization_of(tok, 512, "model"), 512, 0.0, 1, 0, "model")
    reads = []
    for _ in range(2):
        con = duckdb.connect()
        reads.append(stage_inputs(con, [str(path)], [], tok, spec, parts_dir=str(tmp_path / "parts")))
        con.close()
    assert [r["splits_reused"] for r in reads] == [0, 1]
    assert [r["reasoning_dropped"] for r in reads] == [1, 1]


def test_truth_spans_follow_the_content_through_reasoning(family):
    """Ground-truth spans are offsets into the raw content; with inline reasoning the template re-renders
    around them (Qwen3 strips the newlines inside <think>, Llama-3 trims the whole); a span in reasoning the
    template drops (DeepSeek-V3's) is dropped with it."""
    from tests.template_helpers import render_model_template

    name, tok, _, _ = family
    content = "<think>\n\nLook it up.\n</think>\n\nAna lives in Port Velo."
    spans = [(content.index(w), content.index(w) + len(w), lab) for w, lab in (("Look it", 1), ("Port Velo", 2))]
    r = render_model_template(tok, [{"role": "user", "content": "Where?"}, {"role": "assistant", "content": content}],
                              truth=spans)
    assert [(r.text[a:b], lab) for a, b, lab in r.truth_spans] == [("Look it", 1)] * (name != "deepseek_v3") + [
        ("Port Velo", 2)]


def test_gptoss_channels_are_rendered_and_trained_as_the_model_generates_them(family):
    """gpt-oss: reasoning is its analysis channel, an earlier turn ends with <|end|> and the last with <|return|>,
    a tool call (commentary) with <|call|>, the call's name comes back in the tool's header (context), and the ids
    are the template's: no BOS (the tokenizer has one; the template writes none, and the model is served so)."""
    from tests.template_helpers import render_model_template, tokenize_rendered

    name, tok, _, _ = family
    if name != "gptoss":
        pytest.skip("gpt-oss's harmony format")
    msgs = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "tool_calls": TOOL_CALL, "reasoning": "I need it."},
            {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."},
            {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Physics.", "reasoning": "Sun."}]
    r = render_model_template(tok, msgs)
    assert [r.text[s:e] for s, e in r.response_spans] == [
        ' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>',
        "<|channel|>final<|message|>Sunny.<|end|>",
        "<|channel|>analysis<|message|>Sun.<|end|><|start|>assistant<|channel|>final<|message|>Physics.<|return|>"]
    assert r.reasoning_dropped == 1  # the call's analysis: the template drops it once a final answer follows
    with _fixed_date():
        want = tok.apply_chat_template(_as_template_reads(name, msgs), tokenize=True, return_dict=True)["input_ids"]
    assert tokenize_rendered(tok, r, 4096).input_ids.tolist() == want


def test_without_a_generation_prompt_a_turn_starts_where_its_content_does(family):
    """Llama-2's template has no generation prompt: a turn's targets start at its content as rendered, the inline
    think tags that open it included (the prefix oracle's targets)."""
    from tests.template_helpers import render_model_template

    name, tok, _, _ = family
    if name != "llama2":
        pytest.skip("Llama-2's template has no generation prompt")
    msgs = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": " <think>r</think>A1"},
            {"role": "user", "content": "Q2?"}, {"role": "assistant", "content": "<think>\n\n</think>\n\nA2"}]
    r = render_model_template(tok, msgs)
    assert [r.text[s:e] for s, e in r.response_spans] == ["<think>r</think>A1 </s>", "<think>\n\n</think>\n\nA2 </s>"]


def test_reasoning_targets_are_recorded_and_the_report_counts_their_kept_share(tmp_path, family):
    """Each sample records which targets are the model's reasoning: exactly the tokens of the reasoning the
    template renders (inline <think> text or a reasoning field; none where the template drops it). The report's
    reasoning vs answer counts equal those masks and the kept tokens, counted here from the rows."""
    from tokenclean.report import _kept_section
    from tokenclean.tasks import store

    name, tok, _, _ = family
    u = [{"role": "user", "content": "Where does Ana live?"}]
    rows = [("inline", u + [{"role": "assistant", "content": "<think>\nPlan: look it up.\n</think>\n\nPort Velo."}]),
            ("field", u + [{"role": "assistant", "content": "Port Velo.", "reasoning_content": "Check the map."}]),
            ("none", u + [{"role": "assistant", "content": "Port Velo."}])]
    res = _ingest(tmp_path, tok, rows, 4096)
    got = {s["uid"]: tok.decode([t for t, r in zip(s["input_ids"], s["reasoning_mask"]) if r]).strip()
           for s in res.samples.to_pylist()}
    assert all(not r or m for s in res.samples.to_pylist() for r, m in zip(s["reasoning_mask"], s["response_mask"]))
    inline = "" if name == "deepseek_v3" else "Plan: look it up."  # DeepSeek-V3's template drops it
    field = "Check the map." if name in ("qwen3", "gptoss") else ""  # the others read no reasoning field
    assert got == {"inline": inline, "field": field, "none": ""}
    if name != "qwen3":
        return  # the store and report part: one family suffices
    con = store.connect(tmp_path / "run.duckdb")
    from tests.ingest_helpers import insert_dataset

    insert_dataset(con, "d", res.samples, [], {}, {})
    parts = sorted(set(res.samples.column("part").to_pylist()))
    store.write_selection(con, "s", "random", 0.5, dataset="d", parts=parts, pool=store.pool_digest(con, "d", parts),
                          scores=None, seed=3)
    kept = set(con.execute("SELECT sample_id, pos FROM selected_tokens WHERE selection = 's'").fetchall())
    samples = res.samples.to_pylist()
    reasoning = {(s["sample_id"], p) for s in samples for p, r in enumerate(s["reasoning_mask"]) if r}
    targets = sum(s["n_response"] for s in samples)
    assert store.report.kept_reasoning(con, "s", "d", parts) == {
        "reasoning": len(reasoning), "reasoning_kept": len(kept & reasoning), "answer": targets - len(reasoning),
        "answer_kept": len(kept - reasoning), "unrecorded": 0}
    assert 0 < len(kept & reasoning) < len(reasoning)  # the seed keeps some reasoning, not all: a real share
    run = store.start_flow_run(con, "fixed-model-cleaning", {}, "d")
    store.record_output(con, run, "random", 1, "selection", "s", True)
    store.finish_flow_run(con, run)
    html = _kept_section(con)
    assert f'<span class="num">{len(kept & reasoning)}</span></td><td><span class="num">{len(reasoning)}</span>' in html
    con.close()
