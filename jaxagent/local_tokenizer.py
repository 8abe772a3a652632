"""Train a small byte-level BPE tokenizer on local text, wrapped as a `transformers` fast tokenizer.

Nothing can be downloaded on our machines, so the tiny default job and the tests train their tokenizer here. The
pre-tokenizer splits text the way Qwen2/Llama-3 tokenizers do (newline runs and letter runs are their own pieces),
which keeps incremental chat rendering identical to rendering a whole conversation at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Pieces: English contractions, letter runs (with one leading non-letter), single digits, punctuation runs,
# newline runs, whitespace runs.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# A ChatML template (the format of Qwen2.5): a default system message, <|im_start|>role\n ... <|im_end|>\n.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, chat_template: str = CHATML_TEMPLATE,
                    special_tokens: tuple[str, ...] = CHATML_SPECIAL_TOKENS, eos_token: str = "<|im_end|>",
                    pad_token: str = "<|endoftext|>", bos_token: str | None = None) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on `texts`; special tokens get the first ids; the chat template is attached."""
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size={vocab_size} is too small; need at least {256 + len(special_tokens)} "
                         "(256 bytes plus the special tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos_token, pad_token=pad_token,
                                      bos_token=bos_token, additional_special_tokens=[
                                          t for t in special_tokens if t not in (eos_token, pad_token, bos_token)])
    wrapped.chat_template = chat_template
    return wrapped


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: str | Path) -> Path:
    """Write the tokenizer files (tokenizer.json, tokenizer_config.json, chat template) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    return folder


# What `save_tokenizer` writes as tokenizer_class (transformers 5 names the fast class TokenizersBackend).
_OWN_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}


def load_tokenizer(folder: str | Path):
    """The tokenizer saved in `folder`. One written by `save_tokenizer` loads as the plain fast class, which is what
    AutoTokenizer would return, without AutoTokenizer's import of torch where it is installed (~3 s per process);
    any other (a Hugging Face model's) goes through AutoTokenizer, which picks its class."""
    config = Path(folder) / "tokenizer_config.json"
    if config.is_file() and json.loads(config.read_text()).get("tokenizer_class") in _OWN_CLASSES:
        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))
