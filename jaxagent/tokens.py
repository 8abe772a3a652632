"""Token-in/token-out chat rendering: conversations become ids incrementally, with a mask of model-generated tokens.

The tokenizer's own chat template decides the text. Each new message is rendered by the template over the whole
conversation, and only the new suffix is tokenized and appended, so ids already produced never change. A template
that rewrites earlier text when a message is added (not append-only) raises `TemplateNotAppendOnly` instead of
drifting. Ids the model sampled are appended as they are: they are never re-tokenized from decoded text.

The mask is 1 exactly on what the model generates in an assistant turn (its content and end-of-turn token) and 0
on system, user and observation text, role headers, and template text after the end-of-turn token.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from jaxagent.errors import UserError

Message = dict[str, Any]
_SENTINEL = "JAXAGENT_SENTINEL_7Q"


class TemplateNotAppendOnly(UserError):
    """The chat template changed text it had already rendered when a message was added."""


class ChatTemplateError(UserError):
    """The tokenizer has no usable chat template, or its end-of-turn token cannot be found."""


def _first_difference(a: str, b: str) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


class ChatRenderer:
    """Renders conversations with a tokenizer's chat template into ids and a model-token mask, incrementally."""

    def __init__(self, tokenizer: Any, end_of_turn: str | None = None, **template_kwargs: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError(f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no chat_template")
        self.tokenizer = tokenizer
        self.template_kwargs = template_kwargs
        self.end_of_turn = end_of_turn or self._detect_end_of_turn()
        ids = self.encode(self.end_of_turn)
        if len(ids) != 1:
            raise ChatTemplateError(f"end-of-turn {self.end_of_turn!r} is {len(ids)} tokens; expected one token")
        self.end_of_turn_id = ids[0]

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The template's text for a conversation."""
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **self.template_kwargs)

    def encode(self, text: str) -> list[int]:
        """Ids of template text (special tokens in the text are recognised; nothing is added)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of sampled ids without special tokens (what an environment receives)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def start(self, messages: Sequence[Message] = ()) -> "Conversation":
        """A conversation holding `messages` (any roles, assistant text included)."""
        conversation = Conversation(self)
        for message in messages:
            conversation.add_message(message)
        return conversation

    def _detect_end_of_turn(self) -> str:
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
        text = self.render(probe)
        after = text[text.rfind(_SENTINEL) + len(_SENTINEL):]
        ids = self.encode(after)
        special = set(getattr(self.tokenizer, "all_special_ids", []))
        special |= {i for i, tok in getattr(self.tokenizer, "added_tokens_decoder", {}).items()
                    if getattr(tok, "special", False)}
        if not ids or ids[0] not in special:
            raise ChatTemplateError(
                f"cannot find the end-of-turn token after an assistant message (template renders {after!r} after it); "
                f"pass end_of_turn= explicitly")
        return self.tokenizer.convert_ids_to_tokens(ids[0])


@dataclasses.dataclass(frozen=True)
class ConversationMark:
    """Where a conversation stood (see Conversation.mark)."""

    tokens: int
    messages: int
    rendered: str
    pending: str
    awaiting_generation: bool


@dataclasses.dataclass
class Conversation:
    """A growing conversation: its messages, ids, and mask (1 = sampled by the model in an assistant turn)."""

    renderer: ChatRenderer
    messages: list[Message] = dataclasses.field(default_factory=list)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    model_mask: list[int] = dataclasses.field(default_factory=list)
    rendered: str = ""  # the template's text for `messages`
    pending: str = ""  # template text rendered but not yet tokenized (e.g. the newline after an end-of-turn)
    awaiting_generation: bool = False  # the generation prompt has been appended; the next ids are the model's

    # ---- adding text messages -----------------------------------------------------------------------------------

    def add_message(self, message: Message) -> list[int]:
        """Append a message of any role; an assistant message's content is marked as model tokens."""
        if self.awaiting_generation:
            raise TemplateNotAppendOnly("a generation prompt is open; add the model's ids with add_generated first")
        if message.get("role") == "assistant":
            header = self.add_generation_prompt()
            new_text = self._extend(message)
            content, trailing = self._split_assistant(new_text)
            body = self.renderer.encode(content) + [self.renderer.end_of_turn_id]
            self._append(body, 1)
            self.pending, self.awaiting_generation = trailing, False
            return header + body
        new_text = self._extend(message)
        ids = self.renderer.encode(self.pending + new_text)
        self.pending = ""
        self._append(ids, 0)
        return ids

    def add_generation_prompt(self) -> list[int]:
        """Append the assistant header the model continues from (mask 0); returns its ids."""
        if self.awaiting_generation:
            return []
        with_prompt = self.renderer.render(self.messages, add_generation_prompt=True)
        self._check_prefix(self.rendered, with_prompt, "the generation prompt")
        ids = self.renderer.encode(self.pending + with_prompt[len(self.rendered):])
        self.pending = ""
        self._append(ids, 0)
        self.rendered = with_prompt
        self.awaiting_generation = True
        return ids

    # ---- adding sampled ids ------------------------------------------------------------------------------------

    def add_generated(self, ids: Sequence[int]) -> str:
        """Append ids the model sampled after the generation prompt (mask 1); returns their text for the env.

        If the model stopped without its end-of-turn token (e.g. a token limit), the token is appended with mask 0:
        the harness closed the turn, the model did not choose to.
        """
        if not self.awaiting_generation:
            self.add_generation_prompt()
        ids = [int(i) for i in ids]
        self._append(ids, 1)
        if not ids or ids[-1] != self.renderer.end_of_turn_id:
            self._append([self.renderer.end_of_turn_id], 0)
            body = ids
        else:
            body = ids[:-1]
        text = self.renderer.decode(body)
        new_text = self._extend({"role": "assistant", "content": text})
        _, self.pending = self._split_assistant(new_text)
        self.awaiting_generation = False
        return text

    def finish(self) -> list[int]:
        """Tokenize template text still pending after the last turn (mask 0), e.g. a newline after end-of-turn."""
        ids = self.renderer.encode(self.pending) if self.pending else []
        self.pending = ""
        self._append(ids, 0)
        return ids

    # ---- undo ---------------------------------------------------------------------------------------------------

    def mark(self) -> "ConversationMark":
        """The conversation's current extent, to `rollback` to (e.g. when an observation would not fit)."""
        return ConversationMark(len(self.token_ids), len(self.messages), self.rendered, self.pending,
                                self.awaiting_generation)

    def rollback(self, mark: "ConversationMark") -> None:
        """Forget everything added after `mark`: ids, mask, messages and the template state."""
        del self.token_ids[mark.tokens:], self.model_mask[mark.tokens:], self.messages[mark.messages:]
        self.rendered, self.pending, self.awaiting_generation = mark.rendered, mark.pending, mark.awaiting_generation

    # ---- internals ---------------------------------------------------------------------------------------------

    def _extend(self, message: Message) -> str:
        """Render the conversation with `message` added; returns only the new text, checking append-only-ness."""
        full = self.renderer.render([*self.messages, message])
        what = f"message {len(self.messages)} (role {message.get('role')!r})"
        self._check_prefix(self.rendered, full, what)
        self.messages.append(message)
        new_text, self.rendered = full[len(self.rendered):], full
        return new_text

    def _split_assistant(self, text_after_header: str) -> tuple[str, str]:
        """Split an assistant turn's text (after its header) into content and the template text after end-of-turn."""
        eot = self.renderer.end_of_turn
        cut = text_after_header.rfind(eot)
        if cut < 0:
            raise TemplateNotAppendOnly(
                f"the template rendered an assistant turn without {eot!r}: {text_after_header!r}")
        return text_after_header[:cut], text_after_header[cut + len(eot):]

    @staticmethod
    def _check_prefix(before: str, after: str, what: str) -> None:
        if not after.startswith(before):
            at = _first_difference(before, after)
            raise TemplateNotAppendOnly(
                f"chat template is not append-only: adding {what} changed rendered text at character {at} "
                f"({before[at:at + 40]!r} became {after[at:at + 40]!r})")

    def _append(self, ids: Sequence[int], mask: int) -> None:
        self.token_ids.extend(ids)
        self.model_mask.extend([mask] * len(ids))
