"""Scripted stand-ins for unit tests only: an engine that answers from a function of the chat."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from engines.base import Chat, Generation, SamplingParams, TokenScores


class ScriptedEngine:
    """An `Engine` whose reply to a chat is `respond(chat)`; records every batch it was asked for."""

    def __init__(self, respond: Callable[[Chat], str], model_name: str = "scripted") -> None:
        self.respond = respond
        self.model_name = model_name
        self.batches: list[int] = []
        self._adapter: str | None = None

    def generate(
        self, prompts: Sequence[Chat], params: SamplingParams, progress: Callable[[int], None] | None = None
    ) -> list[Generation]:
        self.batches.append(len(prompts))
        outputs = []
        for prompt in prompts:
            text = self.respond(prompt)
            token_ids = [ord(character) for character in text]
            outputs.append(
                Generation(
                    text=text,
                    token_ids=token_ids,
                    logprobs=[0.0] * len(token_ids),
                    prompt_tokens=self.count_tokens(prompt),
                    finish_reason="stop",
                )
            )
        if progress:
            progress(len(prompts))
        return outputs

    def score(self, prompts: Sequence[Chat], completions: Sequence[Sequence[int]], top_k: int = 0) -> list[TokenScores]:
        return [TokenScores(token_ids=list(tokens), logprobs=[0.0] * len(tokens)) for tokens in completions]

    def count_tokens(self, prompt: Chat) -> int:
        return sum(len(message["content"].split()) + 2 for message in prompt)

    def load_adapter(self, path: str) -> None:
        self._adapter = path

    def unload_adapter(self) -> None:
        self._adapter = None

    @property
    def adapter(self) -> str | None:
        return self._adapter
