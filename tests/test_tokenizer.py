"""Tokenizer, chat template and the incremental detokenizer, on the default model's tokenizer."""

from __future__ import annotations

import pytest

from checkpoints.registry import resolve
from engine.tokenizer import IncrementalDetokenizer, Tokenizer

TEXT = "Héllo wörld — 你好, 🎉🎉 naïve café\n  indented"


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    # The runtime path: the tokenizer checkpoints/ writes from the GGUF's metadata.
    folder = tmp_path_factory.mktemp("tok")
    resolve("smollm2-135m-instruct").open().save_tokenizer(folder)
    return Tokenizer.from_dir(folder, {"eos_token_id": 2})


def test_encode_decode_round_trip(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert tok.decode(ids) == TEXT


def test_chat_template_is_the_models_own(tok):
    text = tok.render_chat([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == tok.hf.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(ids[0]) == 3  # system, user, assistant headers; no extra BOS


def test_eos_ids(tok):
    assert tok.eos_token_ids == {2}
    assert tok.hf.convert_ids_to_tokens(2) == "<|im_end|>"


def test_incremental_detokenizer_emits_only_whole_characters(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    # Some tokens end mid-character (the emoji spans several byte-level tokens).
    partial = [i for i in ids if tok.token_bytes(i) and not _is_utf8(tok.token_bytes(i))]
    assert partial, "the test text should contain tokens that split a character"
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == TEXT
    assert "" in deltas  # something was held back until its character completed


def test_token_bytes_concatenate_to_the_text(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert b"".join(tok.token_bytes(i) for i in ids) == TEXT.encode()


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode()
        return True
    except UnicodeDecodeError:
        return False


def test_template_variables_reach_the_template(tok):
    """chat_template_kwargs: Qwen3's templates read enable_thinking this way."""
    hf = tok.hf
    saved = hf.chat_template
    hf.chat_template = (
        "{% for m in messages %}{{ m.content }}{% endfor %}"
        "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
    )
    try:
        hi = [{"role": "user", "content": "Hi"}]
        assert tok.render_chat(hi) == "Hi"
        assert tok.render_chat(hi, options={"enable_thinking": False}) == "Hi<think></think>"
        assert tok.encode_chat(hi, options={"enable_thinking": False}) == tok.encode(
            "Hi<think></think>", add_special_tokens=False
        )
    finally:
        hf.chat_template = saved


def test_a_special_tool_call_marker_stays_in_the_text(tmp_path):
    """Mistral's [TOOL_CALLS] is a control token: skipping special tokens dropped it, and the
    reply's tool calls went unparsed. It stays (whole and incremental); other special tokens
    are still skipped."""
    from serving.tool_calls import MISTRAL, parse_reply

    resolve("smollm2-135m-instruct").open().save_tokenizer(tmp_path)
    hf = Tokenizer.from_dir(tmp_path).hf
    hf.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]"]})
    tok = Tokenizer(hf)
    reply = '[TOOL_CALLS][{"name": "weather", "arguments": {"city": "Paris"}}]'
    ids = tok.encode(reply, add_special_tokens=False) + [hf.convert_tokens_to_ids("<|im_end|>")]
    assert hf.decode(ids, skip_special_tokens=True) == reply.removeprefix("[TOOL_CALLS]")
    assert tok.decode(ids) == reply  # the marker kept, <|im_end|> skipped
    detok = IncrementalDetokenizer(tok)
    text = "".join(detok.add(t) for t in ids)
    assert text == reply
    content, [call] = parse_reply(text, MISTRAL, {"weather"})
    assert content is None and call.name == "weather"
