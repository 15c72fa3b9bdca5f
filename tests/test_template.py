import pytest

from tokenclean.tasks.template import render_tulu, tokenize_rendered, tokenizer_fingerprint


def test_tulu_rendering_is_open_instruct_format():
    r = render_tulu([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                     {"role": "assistant", "content": "Bye!"}], eos="</s>")
    assert r.text == ("<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello.</s>\n"
                      "<|user|>\nBye\n<|assistant|>\nBye!</s>\n")
    assert [r.text[s:e] for s, e in r.response_spans] == ["Hello.</s>", "Bye!</s>"]


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
    assert _targets(tokenizer, t).replace(" ", "") == f"one{tokenizer.eos_token}two{tokenizer.eos_token}"


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
