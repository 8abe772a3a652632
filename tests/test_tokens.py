"""Incremental chat rendering equals the template's own tokenization, and the mask covers exactly generated spans."""

from __future__ import annotations

import pytest

from jaxagent.local_tokenizer import train_tokenizer
from jaxagent.tokens import ChatRenderer, ChatTemplateError, TemplateNotAppendOnly

# Written here in the style of Qwen2.5's template (ChatML with a default system prompt) ...
QWEN25_STYLE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# ... and of Llama 3's (BOS, header ids, double newline, trimmed content, <|eot_id|>).
LLAMA3_STYLE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
    "'<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
CORPUS = [
    "Look up the contacts first.\n```python\nprint(apis.contacts.search(query='Alice'))\n```\n",
    "Output:\n[{'name': 'Alice', 'phone': '555-0100'}]\n\nThe phone number is 555-0100. Done!",
    "    indented code\n\tand tabs\n\n\nmany newlines, numbers 12345 and punctuation ?!.",
] * 20

CONVERSATION = [
    {"role": "system", "content": "You are an agent that writes Python."},
    {"role": "user", "content": "Find Alice's phone number."},
    {"role": "assistant", "content": "Look up the contacts first.\n```python\nprint(apis.contacts.search("
                                     "query='Alice'))\n```"},
    {"role": "user", "content": "Output:\n[{'name': 'Alice', 'phone': '555-0100'}]\n\n"},
    {"role": "assistant", "content": "The phone number is 555-0100."},
    {"role": "user", "content": "Thanks!   "},
    {"role": "assistant", "content": "Done!"},
]


@pytest.fixture(scope="module")
def qwen_tokenizer():
    return train_tokenizer(CORPUS, vocab_size=400, chat_template=QWEN25_STYLE)


@pytest.fixture(scope="module")
def llama_tokenizer():
    return train_tokenizer(CORPUS, vocab_size=400, chat_template=LLAMA3_STYLE, special_tokens=(
        "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        eos_token="<|eot_id|>", pad_token="<|end_of_text|>", bos_token="<|begin_of_text|>")


@pytest.fixture(params=["qwen", "llama"])
def tokenizer(request, qwen_tokenizer, llama_tokenizer):
    return {"qwen": qwen_tokenizer, "llama": llama_tokenizer}[request.param]


def _template_ids(tokenizer, messages, add_generation_prompt=False) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                              return_dict=True)["input_ids"])


def _expected_mask(tokenizer, ids: list[int], header: list[int], eot: int) -> list[int]:
    """Independently of the renderer: 1 from after each assistant header up to and including the next eot."""
    mask, i = [0] * len(ids), 0
    while i < len(ids):
        if ids[i:i + len(header)] == header:
            j = i + len(header)
            while ids[j] != eot:
                mask[j] = 1
                j += 1
            mask[j] = 1
            i = j
        i += 1
    return mask


def test_end_of_turn_is_detected(qwen_tokenizer, llama_tokenizer):
    assert ChatRenderer(qwen_tokenizer).end_of_turn == "<|im_end|>"
    assert ChatRenderer(llama_tokenizer).end_of_turn == "<|eot_id|>"


@pytest.mark.parametrize("upto", range(1, len(CONVERSATION) + 1))
def test_incremental_ids_equal_the_template_and_masks_cover_generated_spans(tokenizer, upto):
    messages = CONVERSATION[:upto]
    renderer = ChatRenderer(tokenizer)
    conversation = renderer.start(messages)
    conversation.finish()
    expected = _template_ids(tokenizer, messages)
    assert conversation.token_ids == expected
    header = renderer.encode(renderer.render(messages[:1], add_generation_prompt=True)[len(renderer.render(
        messages[:1])):])
    assert conversation.model_mask == _expected_mask(tokenizer, expected, header, renderer.end_of_turn_id)
    assert sum(conversation.model_mask) == (0 if upto < 3 else sum(
        len(renderer.encode(m["content"].strip())) + 1 for m in messages if m["role"] == "assistant"))


def test_generated_ids_are_kept_and_decoded_for_the_environment(tokenizer):
    renderer = ChatRenderer(tokenizer)
    conversation = renderer.start(CONVERSATION[:2])
    prompt = conversation.add_generation_prompt()
    assert conversation.token_ids == _template_ids(tokenizer, CONVERSATION[:2], add_generation_prompt=True)
    assert prompt and conversation.model_mask[-1] == 0
    sampled = renderer.encode(CONVERSATION[2]["content"]) + [renderer.end_of_turn_id]
    text = conversation.add_generated(sampled)
    assert text == CONVERSATION[2]["content"]
    assert conversation.token_ids[-len(sampled):] == sampled and conversation.model_mask[-len(sampled):] == [1] * len(
        sampled)
    conversation.add_message(CONVERSATION[3])
    assert conversation.token_ids == _template_ids(tokenizer, CONVERSATION[:4])


def test_sampled_ids_are_not_retokenized(qwen_tokenizer):
    """A model may sample a non-canonical split ('Al' + 'ice'); the conversation keeps exactly those ids."""
    renderer = ChatRenderer(qwen_tokenizer)
    conversation = renderer.start(CONVERSATION[:2])
    conversation.add_generation_prompt()
    start = len(conversation.token_ids)
    pieces = [i for ch in "Alice" for i in renderer.encode(ch)]  # one id per character
    assert pieces != renderer.encode("Alice")
    assert conversation.add_generated(pieces + [renderer.end_of_turn_id]) == "Alice"
    conversation.add_message({"role": "user", "content": "ok"})
    assert conversation.token_ids[start:start + len(pieces) + 1] == pieces + [renderer.end_of_turn_id]


def test_turn_cut_by_a_token_limit_is_closed_with_an_unsampled_end_of_turn(qwen_tokenizer):
    renderer = ChatRenderer(qwen_tokenizer)
    conversation = renderer.start(CONVERSATION[:2])
    conversation.add_generated(renderer.encode("Look up"))
    assert conversation.token_ids[-1] == renderer.end_of_turn_id and conversation.model_mask[-1] == 0
    conversation.add_message({"role": "user", "content": "go on"})
    messages = [*CONVERSATION[:2], {"role": "assistant", "content": "Look up"}, {"role": "user", "content": "go on"}]
    assert conversation.token_ids == _template_ids(qwen_tokenizer, messages)


def test_template_that_rewrites_history_fails_loudly(qwen_tokenizer):
    counting = ("{{- '<|im_start|>system\\n' + (messages|length)|string + ' messages<|im_end|>\\n' }}"
                "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    tokenizer = qwen_tokenizer.__class__(tokenizer_object=qwen_tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    tokenizer.chat_template = counting
    renderer = ChatRenderer(tokenizer, end_of_turn="<|im_end|>")
    conversation = renderer.start(CONVERSATION[:1])
    with pytest.raises(TemplateNotAppendOnly, match="not append-only: adding message 1 .* changed rendered text"):
        conversation.add_message(CONVERSATION[1])


def test_tokenizer_without_template_is_refused(qwen_tokenizer):
    tokenizer = qwen_tokenizer.__class__(tokenizer_object=qwen_tokenizer.backend_tokenizer)
    with pytest.raises(ChatTemplateError, match="has no chat_template"):
        ChatRenderer(tokenizer)


def test_a_saved_tokenizer_loads_as_autotokenizer_would_and_ours_without_torch(tmp_path, tokenizer):
    """`load_tokenizer` returns what AutoTokenizer returns; for our own tokenizers without importing torch
    (AutoTokenizer does where torch is installed: seconds per training process)."""
    import json
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from jaxagent.local_tokenizer import load_tokenizer, save_tokenizer

    ours = save_tokenizer(tokenizer, tmp_path / "ours")
    hf_style = save_tokenizer(tokenizer, tmp_path / "hf")  # the same files, but naming a model's own class
    config = json.loads((hf_style / "tokenizer_config.json").read_text())
    (hf_style / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "Qwen2Tokenizer"}))
    for folder in (ours, hf_style):
        loaded, auto = load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
        assert type(loaded) is type(auto)
        assert _template_ids(loaded, CONVERSATION, True) == _template_ids(auto, CONVERSATION, True)
        assert (loaded.eos_token_id, loaded.pad_token_id, loaded.bos_token_id, len(loaded)) == (
            auto.eos_token_id, auto.pad_token_id, auto.bos_token_id, len(auto))
    probe = ("import sys; from jaxagent.local_tokenizer import load_tokenizer; "
             f"load_tokenizer({str(ours)!r}); print('torch' in sys.modules)")
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert imported.stdout.split() == ["False"], imported.stderr[-2000:]
