import json

import numpy as np
import pytest

from tests.template_helpers import tokenize_rendered
from tokenclean.tasks.template import render_tulu, tokenizer_fingerprint


def test_tulu_rendering_is_open_instruct_format():
    r = render_tulu([{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi\n"},
                     {"role": "assistant", "content": "Hello. "}, {"role": "user", "content": "Bye"},
                     {"role": "assistant", "content": "\n\nBye!"}], eos="</s>")
    assert r.text == ("<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello.</s>\n"
                      "<|user|>\nBye\n<|assistant|>\nBye!</s>")
    assert [r.text[s:e] for s, e in r.response_spans] == ["Hello.</s>\n", "Bye!</s>"]


def _open_instruct(tokenizer, messages, max_length=512):
    """open-instruct's ``encode_with_messages_format`` (the paper's code), re-stated: the text, then a
    mask over every non-assistant message and the assistant header, by tokenising prefixes."""
    def concat(msgs):
        out = ""
        for m in msgs:
            if m["role"] == "assistant":
                out += "<|assistant|>\n" + m["content"].strip() + tokenizer.eos_token + "\n"
            else:
                out += f"<|{m['role']}|>\n" + m["content"].strip() + "\n"
        return out

    def n_tokens(text):
        return len(tokenizer(text, add_special_tokens=True)["input_ids"][:max_length])

    ids = tokenizer(concat(messages).strip(), add_special_tokens=True)["input_ids"][:max_length]
    target = [True] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            start = 0 if i == 0 else n_tokens(concat(messages[:i]))
            head = "<|assistant|>\n" if i + 1 < len(messages) and messages[i + 1]["role"] == "assistant" else ""
            for j in range(start, min(n_tokens(concat(messages[: i + 1]) + head), len(ids))):
                target[j] = False
    return ids, target


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Where does Ada live?"}, {"role": "assistant", "content": "Ada lives in Port Velo."}],
    [{"role": "system", "content": "  Be brief. "}, {"role": "user", "content": "\nA?\n"},
     {"role": "assistant", "content": " one \n"}, {"role": "user", "content": "B?"},
     {"role": "assistant", "content": "\n\ntwo, three"}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": "z"},
     {"role": "assistant", "content": "w"}, {"role": "user", "content": "v"}, {"role": "assistant", "content": "u"}],
])
def test_tulu_tokens_and_targets_are_open_instructs(tokenizer, messages):
    """Ids and targets equal the paper's code's (past the BOS this module adds and open-instruct adds only
    where the tokenizer does): stripped contents, no final newline, the newline after a non-final EOS learned."""
    ids, target = _open_instruct(tokenizer, messages)
    t = tokenize_rendered(tokenizer, render_tulu(messages, tokenizer.eos_token), max_length=512)
    skip = int(t.input_ids[0] == tokenizer.bos_token_id and ids[0] != tokenizer.bos_token_id)
    assert t.input_ids[skip:].tolist() == ids
    assert t.response_mask[skip:].tolist() == target


def _targets(tok, t):
    return tok.decode(t.input_ids[t.response_mask].tolist())


@pytest.mark.parametrize("response", ["Port Velo.", " leading space", "\nnewline first", "a, b and c!", "x"])
def test_mask_covers_exactly_the_response(tokenizer, response):
    r = render_tulu([{"role": "user", "content": "Where?"}, {"role": "assistant", "content": response}],
                    tokenizer.eos_token)
    t = tokenize_rendered(tokenizer, r, max_length=512)
    # One tokenisation of the whole text: ids equal a fresh encode (BOS aside).
    assert t.input_ids[1:].tolist() == tokenizer(r.text, add_special_tokens=False)["input_ids"]
    assert _targets(tokenizer, t).strip() == (response + tokenizer.eos_token).strip()
    prompt_part = tokenizer.decode(t.input_ids[~t.response_mask].tolist())
    assert "Where?" in prompt_part and "<|assistant|>" in prompt_part
    assert not t.response_mask[0]


def test_multi_turn_every_assistant_turn_is_a_target(tokenizer):
    msgs = [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "one"},
            {"role": "user", "content": "B?"}, {"role": "assistant", "content": "two"}]
    t = tokenize_rendered(tokenizer, render_tulu(msgs, tokenizer.eos_token), max_length=512)
    assert _targets(tokenizer, t).replace(" ", "") == f"one{tokenizer.eos_token}\ntwo{tokenizer.eos_token}"


def test_truth_labels_follow_word_anchors(tokenizer):
    """' Velo' carries a leading space that lies outside the span; its anchor 'V' is inside."""
    resp = "Sure! Port Velo."
    r = render_tulu([{"role": "user", "content": "Where?"}, {"role": "assistant", "content": resp}],
                    tokenizer.eos_token, truth=[(6, 15, 1)])
    t = tokenize_rendered(tokenizer, r, max_length=512)
    labelled = tokenizer.decode(t.input_ids[t.truth == 1].tolist())
    assert labelled.strip() == "Port Velo"


def test_truncation_keeps_prefix(tokenizer):
    r = render_tulu([{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 200}],
                    tokenizer.eos_token)
    t = tokenize_rendered(tokenizer, r, max_length=32)
    assert t.truncated and len(t.input_ids) == 32 and len(t.response_mask) == 32
    assert t.response_mask.sum() > 0


def test_fingerprint_changes_with_vocabulary(tokenizer):
    from tokenclean.embedded import train_tokenizer

    other = train_tokenizer(["completely different text " * 20], 300)
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(tokenizer)
    assert tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(other)


def test_a_tokenizer_changed_since_the_run_is_refused_where_it_is_loaded_again(tiny, tmp_path):
    """Evaluation's generation and the model export load the run's tokenizer by path again: one whose special
    tokens changed since the samples were tokenized is refused, the same one passes."""
    import shutil

    from tokenclean.tasks.template import load_tokenizer

    path = tmp_path / "tok"
    shutil.copytree(tiny.model, path)
    recorded = tokenizer_fingerprint(load_tokenizer(str(path)))
    assert tokenizer_fingerprint(load_tokenizer(str(path), recorded)) == recorded
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["eos_token"] = config.get("bos_token") or "<s>"  # generation would stop at another token
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not the one this run's samples were tokenized with"):
        load_tokenizer(str(path), recorded)


# ---- the model's own chat template (data.template: model) ---------------------------------------------------

# Written in the style of each family's template (local files, no hub). Mistral's puts the system prompt into
# the *last* user turn, so rendering a prefix of the conversation is not a prefix of the whole: not prefix-stable.
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN25 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MISTRAL = ("{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
           "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
           "{%- set ns = namespace(last_user=-1) %}{%- for m in loop_messages %}{%- if m['role'] == 'user' %}"
           "{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}{{- bos_token }}"
           "{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
           "{%- if loop.index0 == ns.last_user and system_message is defined %}"
           "{{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}"
           "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
           "{%- else %}{{- ' ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}")
# A template with generation markers (as SmolLM3 / OLMo ship): the spans come from the template itself.
MARKED = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
          "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
          "{% endgeneration %}{{ '\n' }}{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}")
TEMPLATES = {"llama3": (LLAMA3, "<|eot_id|>"), "qwen2.5": (QWEN25, "<|im_end|>"), "mistral": (MISTRAL, "</s>"),
             "marked": (MARKED, "<|im_end|>")}
SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>", "[INST]",
            "[/INST]"]
CONVERSATION = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Where is Ana?"},
                {"role": "assistant", "content": "Ana lives in Port Velo."},
                {"role": "user", "content": "And her pet?"},
                {"role": "assistant", "content": " Her pet is a heron named Dot. "}]


def model_tokenizer(tmp_path, tiny, template: str):
    """The embedded tokenizer with extra special tokens and a chat template, saved and re-loaded from disk."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny.model)
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok.chat_template = template
    path = tmp_path / f"tok-{abs(hash(template))}"
    tok.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_model_template_masks_exactly_the_assistant_turns(tmp_path, tiny, name):
    from tests.template_helpers import render_model_template

    template, terminator = TEMPLATES[name]
    tok = model_tokenizer(tmp_path, tiny, template)
    r = render_model_template(tok, CONVERSATION)
    assert r.text == tok.apply_chat_template(CONVERSATION, tokenize=False)  # the model's own text, verbatim
    t = tokenize_rendered(tok, r, max_length=512)
    ids = t.input_ids.tolist()
    # one tokenisation of the whole text as the template writes it, BOS only where it renders one (as served)
    assert ids == tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    # the targets are the assistant contents (as rendered: the template may trim) and each turn's terminator
    runs, cur = [], []
    for i, m in enumerate(t.response_mask):
        if m:
            cur.append(ids[i])
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    got = [tok.decode(run).strip() for run in runs]
    want = [m["content"].strip() + terminator for m in CONVERSATION if m["role"] == "assistant"]
    assert [g.replace(" ", "") for g in got] == [w.replace(" ", "") for w in want]  # byte-level BPE spacing aside
    prompt = tok.decode([i for i, m in zip(ids, t.response_mask) if not m])
    for m in CONVERSATION:
        if m["role"] != "assistant":
            assert m["content"] in prompt
    assert "Port Velo" not in prompt and "heron" not in prompt


def test_model_template_need_not_be_prefix_stable(tmp_path, tiny):
    """Mistral's template: the first turn rendered alone is not a prefix of the whole conversation."""
    from tests.template_helpers import render_model_template

    tok = model_tokenizer(tmp_path, tiny, MISTRAL)
    whole = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert not whole.startswith(tok.apply_chat_template(CONVERSATION[:3], tokenize=False))
    r = render_model_template(tok, CONVERSATION)
    assert [r.text[s:e] for s, e in r.response_spans] == ["Ana lives in Port Velo.</s>",
                                                          " Her pet is a heron named Dot. </s>"]


def test_truth_spans_follow_the_last_response_through_trimming(tmp_path, tiny):
    """Ground-truth spans are offsets into the raw content; Llama-3's template trims it."""
    from tests.template_helpers import render_model_template

    tok = model_tokenizer(tmp_path, tiny, LLAMA3)
    content = CONVERSATION[-1]["content"]
    s = content.index("heron")
    r = render_model_template(tok, CONVERSATION, truth=[(s, s + len("heron"), 2)])
    (a, b, lab), = r.truth_spans
    assert r.text[a:b] == "heron" and lab == 2


def test_template_that_rewrites_content_is_quarantined(tmp_path, tiny):
    from tests.ingest_helpers import ingest

    upper = LLAMA3.replace("message['content'] | trim", "message['content'] | upper")
    tok = model_tokenizer(tmp_path, tiny, upper)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATION[1:3]}) + "\n"
                    + json.dumps({"prompt": "Hi", "response": "YES"}) + "\n")
    res = ingest([str(data)], [], tok, max_length=256, eval_fraction=0.0, n_parts=1, seed=0, template="model")
    # "YES" survives | upper unchanged; the mixed-case response cannot be located and is refused, with the reason
    assert res.samples.num_rows == 1
    assert [q["reason"] for q in res.quarantine] == ["the chat template rewrites the content of assistant turn 1 "
                                                     "(beyond trimming whitespace); cannot locate it"]


def test_tokenization_key_covers_the_template_text(tmp_path, tiny):
    from tokenclean.tasks.ingest import tokenization_of

    llama, qwen = model_tokenizer(tmp_path, tiny, LLAMA3), model_tokenizer(tmp_path, tiny, QWEN25)
    keys = {tokenization_of(llama, 512, "tulu"), tokenization_of(llama, 512, "model"),
            tokenization_of(qwen, 512, "model")}
    assert len(keys) == 3
    assert tokenization_of(qwen, 512, "tulu") == tokenization_of(llama, 512, "tulu")  # same vocab, Tulu: unchanged
    with pytest.raises(ValueError, match="no chat template"):
        from transformers import AutoTokenizer

        tokenization_of(AutoTokenizer.from_pretrained(tiny.model), 512, "model")


def test_tulu_jinja_renders_what_render_tulu_renders(tokenizer):
    """Exported Tulu-trained models carry this template: serving must see the training text."""
    from tokenclean.tasks.template import TULU_JINJA

    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = TULU_JINJA
    trained = render_tulu(CONVERSATION, tokenizer.eos_token)
    bos = tokenizer.bos_token
    # a conversation: BOS (ingest prepends it), the training text, and the final newline open-instruct strips
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == bos + trained.text + "\n"
    # a generation prompt: exactly the training text before the last response
    prompt = tokenizer.apply_chat_template(CONVERSATION[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt == bos + trained.text[: trained.response_spans[-1][0]]
    # as token ids (how a chat server tokenises it): the ids the model was trained and evaluated on
    ids = tokenizer.apply_chat_template(CONVERSATION[:-1], tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    full = tokenize_rendered(tokenizer, trained, max_length=512)
    last = int(np.flatnonzero(np.diff(np.flatnonzero(full.response_mask)) > 1)[-1]) + 1
    assert list(ids) == full.input_ids[: np.flatnonzero(full.response_mask)[last]].tolist()


# ---- the chunk-level tokenisation against the rule written out per token -------------------------------------

def _rule(tokenizer, r, max_length):
    """The module's rule, token by token in plain Python, through transformers' own tokenizer call."""
    enc = tokenizer(r.text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offs = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    bos = tokenizer.bos_token_id
    if bos is not None and not (ids and ids[0] == bos):
        ids, offs = [bos] + ids, [(-1, -1)] + offs
    anchors = []
    for s, e in offs:
        a = s
        while 0 <= a < e and r.text[a].isspace():
            a += 1
        anchors.append(a if 0 <= a < e else s)
    mask = [any(s <= a < e for s, e in r.response_spans) for a in anchors]
    truth = None
    if r.truth_spans:
        truth = []
        for a, m in zip(anchors, mask):
            label = 0
            for s, e, lab in r.truth_spans:  # a later span overrides an earlier one
                if s <= a < e:
                    label = lab
            truth.append(label if m else 0)
    n = min(len(ids), max_length)
    if n:
        mask[0] = False
    return (ids[:n], mask[:n], None if truth is None else truth[:n], len(ids) > max_length, anchors[:n],
            [e for _, e in offs][:n])


def _random_conversations(tokenizer, n, seed):
    import random

    from tokenclean.tasks.template import Rendered

    rng = random.Random(seed)
    pieces = ["Sure", "!", " ", "  ", "\n", "\t", "\u00a0", "\u2003", "\u3000", "Port", " Velo", ".", "é", "日本", "🙂",
              "x", tokenizer.eos_token, "<|user|>", "word ", "\r\n"]

    def text(k):
        return "".join(rng.choice(pieces) for _ in range(k))

    out = []
    for _ in range(n):
        msgs = []
        for _ in range(rng.randint(1, 3)):
            msgs.append({"role": "user", "content": text(rng.randint(0, 8))})
            msgs.append({"role": "assistant", "content": text(rng.randint(0, 30))})
        last, truth = msgs[-1]["content"], []
        if last and rng.random() < 0.6:
            for _ in range(rng.randint(1, 3)):
                s = rng.randrange(len(last))
                truth.append((s, rng.randint(s + 1, len(last)), rng.choice([1, 2])))
        r = render_tulu(msgs, tokenizer.eos_token, truth)
        if rng.random() < 0.3:  # texts that bring their own BOS (as templates rendering {{ bos_token }} do)
            pre = rng.choice([tokenizer.bos_token, tokenizer.bos_token + " ", " " + tokenizer.bos_token])
            k = len(pre)
            r = Rendered(pre + r.text, [(a + k, b + k) for a, b in r.response_spans],
                         [(a + k, b + k, lab) for a, b, lab in r.truth_spans])
        if rng.random() < 0.05:  # the text opens with its BOS and a response: position 0 is a span's first token
            body = text(rng.randint(1, 10))
            r = Rendered(tokenizer.bos_token + body, [(0, len(tokenizer.bos_token) + len(body))])
        out.append(r if rng.random() > 0.02 else Rendered("", [], []))
    return out


@pytest.mark.parametrize("max_length", [6, 4096])
def test_batch_tokenisation_follows_the_rule_token_by_token(tokenizer, max_length):
    """Every row of a chunk (any chunk size) equals the rule computed alone, token by token: Unicode
    whitespace, multi-turn spans, overlapping truth spans, texts with their own BOS, empty texts, truncation."""
    from tokenclean.tasks.template import tokenize_batch

    convs = _random_conversations(tokenizer, 400, seed=max_length)
    for size in (1, 37, 400):
        for a in range(0, len(convs), size):
            batch = tokenize_batch(tokenizer, convs[a:a + size], max_length)
            assert len(batch) == len(convs[a:a + size])
            for i, r in enumerate(convs[a:a + size]):
                ids, mask, truth, truncated, anchors, ends = _rule(tokenizer, r, max_length)
                t = batch.row(i)
                assert t.input_ids.tolist() == ids and t.response_mask.tolist() == mask, r.text
                assert (t.truth is None) == (truth is None) and (truth is None or t.truth.tolist() == truth)
                assert t.truncated == truncated
                assert t.char_starts.tolist() == anchors and t.char_ends.tolist() == ends
                assert batch.n_response[i] == sum(mask)


def test_tokenisation_ignores_truncation_and_padding_set_in_the_tokenizer_file(tokenizer):
    """A tokenizer.json may enable truncation or padding; ids and offsets are the whole text's, as
    transformers' own call gives them (it switches both off before every call, and so do we)."""
    import copy

    from tokenclean.tasks.template import tokenize_batch

    tok = copy.deepcopy(tokenizer)
    tok.backend_tokenizer.enable_truncation(4)
    tok.backend_tokenizer.enable_padding(length=300, pad_id=tok.pad_token_id, pad_token=tok.pad_token)
    r = render_tulu([{"role": "user", "content": "Where does Gia live?"},
                     {"role": "assistant", "content": "Gia lives in Oakhollow."}], tok.eos_token)
    got = tokenize_batch(tok, [r], 512).row(0)
    assert got.input_ids.tolist() == _rule(tokenizer, r, 512)[0]


def test_a_template_that_prints_the_date_renders_the_same_every_day(tmp_path, tiny):
    """Llama-3.1/3.2 templates print today's date: rendered with a fixed one, a sample is the same whatever
    day it is ingested (its key cannot say the day)."""
    from tests.template_helpers import render_model_template
    from tokenclean.tasks.template import FIXED_DATE

    dated = ("{% if not date_string is defined %}{% set date_string = strftime_now('%d %b %Y') %}{% endif %}"
             "{{ 'Today: ' + date_string + ' / ' + strftime_now('%Y-%m-%d') + '\\n' }}"
             "{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] + eos_token + '\\n' }}{% endfor %}")
    tok = model_tokenizer(tmp_path, tiny, dated)
    text = render_model_template(tok, CONVERSATION).text
    assert text.startswith(f"Today: {FIXED_DATE:%d %b %Y} / {FIXED_DATE:%Y-%m-%d}\n")


def test_marking_a_token_special_changes_the_tokenizer_fingerprint(tmp_path, tiny):
    """tokenizer_config.json can make a token special without touching tokenizer.json; that changes the
    end-of-turn targets, so it must change the key."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny.model)
    before = tokenizer_fingerprint(tok)
    word = next(t for t in tok.get_vocab() if t.isalpha() and len(t) > 3)  # in the vocabulary, not special
    tok.add_special_tokens({"additional_special_tokens": [word]})
    assert tokenizer_fingerprint(tok) != before
