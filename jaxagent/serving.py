"""A chat model that answers many conversations at once: requests from any thread are batched onto one sampler.

`ChatModel(folder)` loads a Hugging Face folder or a jaxagent policy folder (LoRA adapters included) with its
tokenizer's chat template; `complete(messages, ...)` renders the conversation, waits for a place in the next batch
and returns the assistant's reply. A single thread drives the device: it takes every request waiting (up to
`max_batch`), groups those with the same sampling settings, prefills them together and decodes them together.
`jaxagent.serve` puts an OpenAI-compatible HTTP server in front of it; ColBench's `local` simulator calls it directly.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
from pathlib import Path
from typing import Sequence

from jaxagent.envs.base import Message
from jaxagent.errors import UserError

WAIT_FOR_COMPANIONS_S = 0.01  # after the first request of a batch, how long to wait for others to join it


class ServingError(UserError):
    """A request the model cannot serve (too long a prompt, bad settings) or a folder it cannot load."""


@dataclasses.dataclass(frozen=True)
class Completion:
    """One reply: its text, why it ended ("stop" or "length", as OpenAI's API says) and token counts."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclasses.dataclass
class _Request:
    ids: list[int]
    settings: tuple  # (temperature, top_p, max_tokens, stop strings): requests sharing it decode together
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: Completion | None = None
    error: BaseException | None = None


class ChatModel:
    """A model and its chat template behind a batching queue."""

    def __init__(self, folder: str | Path, max_len: int = 4096, max_batch: int = 16, seed: int = 0) -> None:
        import jax

        from jaxagent.checkpoint import is_policy_folder, load_policy
        from jaxagent.local_tokenizer import load_tokenizer
        from jaxagent.models.hf import is_hf_folder, load_hf_params
        from jaxagent.sampling import Sampler
        from jaxagent.tokens import ChatRenderer

        folder = Path(folder)
        if is_policy_folder(folder):
            policy = load_policy(folder)
            config, self.params, lora, self.lora_params = policy.config, policy.params, policy.lora, policy.lora_params
            tokenizer_dir = policy.tokenizer_dir
        elif is_hf_folder(folder):
            (config, self.params), lora, self.lora_params, tokenizer_dir = load_hf_params(folder), None, None, folder
        else:
            raise ServingError(f"{str(folder)!r} is neither a Hugging Face model folder nor a jaxagent policy folder")
        self.name = folder.name
        tokenizer = load_tokenizer(tokenizer_dir)
        self.renderer = ChatRenderer(tokenizer)
        self.stop_ids = tuple({self.renderer.end_of_turn_id} | ({tokenizer.eos_token_id} - {None}))
        self.sampler = Sampler(config, max_len, lora=lora, tokenizer=tokenizer, grow_cache=True)
        self.max_len, self.max_batch = max_len, max_batch
        self.requests_served, self.largest_batch = 0, 0
        self._key, self._counter = jax.random.key(seed), itertools.count()
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="chat-model", daemon=True)
        self._thread.start()

    def complete(self, messages: Sequence[Message], temperature: float = 1.0, top_p: float = 1.0,
                 max_tokens: int = 256, stop: Sequence[str] = ()) -> Completion:
        """The assistant's reply to `messages` (blocks until its batch has decoded)."""
        ids = self.renderer.encode(self.renderer.render(messages, add_generation_prompt=True))
        if len(ids) + 1 > self.max_len:
            raise ServingError(f"the prompt is {len(ids)} tokens; this server holds at most {self.max_len} per "
                               "conversation (--max-len)")
        request = _Request(ids, (float(temperature), float(top_p), int(max_tokens), tuple(stop)))
        self._queue.put(request)
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.result

    def close(self) -> None:
        """Stop the serving thread once the requests already queued are answered."""
        self._queue.put(None)
        self._thread.join()

    # ---- the serving thread ---------------------------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            try:
                while len(batch) < self.max_batch:
                    more = self._queue.get(timeout=WAIT_FOR_COMPANIONS_S)
                    if more is None:
                        self._queue.put(None)  # finish this batch, then stop
                        break
                    batch.append(more)
            except queue.Empty:
                pass
            for settings in dict.fromkeys(request.settings for request in batch):
                self._decode([request for request in batch if request.settings == settings])

    def _decode(self, requests: list[_Request]) -> None:
        import jax

        from jaxagent.sampling import SamplingError, SamplingParams

        try:
            temperature, top_p, max_tokens, stop = requests[0].settings
            sampling = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_tokens,
                                      stop_token_ids=self.stop_ids, stop_strings=stop)
            rng = jax.random.fold_in(self._key, next(self._counter))
            batch = self.sampler.start(self.params, [r.ids for r in requests], self.lora_params)
            _, generation = self.sampler.generate(self.params, batch, sampling, rng, lora_params=self.lora_params)
        except SamplingError as err:
            for request in requests:
                request.error = ServingError(str(err))
                request.done.set()
            return
        except BaseException as err:  # noqa: BLE001 - the caller gets it; the thread serves the next batch
            for request in requests:
                request.error = err
                request.done.set()
            return
        self.requests_served += len(requests)
        self.largest_batch = max(self.largest_batch, len(requests))
        for request, tokens, reason in zip(requests, generation.tokens, generation.stop_reasons):
            text = self.renderer.decode([t for t in tokens if t not in self.stop_ids])
            for string in stop:  # OpenAI's API leaves the stop string out of the reply
                text = text.split(string, 1)[0]
            request.result = Completion(text, "length" if reason in ("max_new_tokens", "cache_full") else "stop",
                                        len(request.ids), len(tokens))
            request.done.set()
