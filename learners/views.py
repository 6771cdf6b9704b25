"""Student and teacher views of one episode, token by token, with the trained tokens aligned.

The student sees the episode as it was played (no skills); the teacher sees the same episode with
the privileged context (retrieved skills, a reference solution) put after the leading system
messages. Every assistant turn is trained (NOTES.md section 10: training part of a multi-turn
episode can destroy the behaviour it teaches); environment and tool messages are context only.

Both views are tokenised message by message from the chat template's own rendering, and each
assistant message's content is tokenised on its own, so the trained tokens are the very same ids in
both views and a student position maps to exactly one teacher position. Where the episode kept the
token ids the engine sampled (`Turn.token_ids`) and they decode to the turn's text, a view trains on
those very ids instead of a re-tokenisation of the text (which can split it differently).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict

from envs.base import Message, Trajectory, Turn


class TokenView(BaseModel):
    """One rendering of an episode: `input_ids`, and which of them are trained (assistant tokens)."""

    model_config = ConfigDict(extra="forbid")

    input_ids: list[int]
    trained: list[bool]
    behaviour: list[float] | None = None  # per position: the log-prob it was sampled with (NaN: unknown)

    @property
    def trained_positions(self) -> list[int]:
        return [position for position, flag in enumerate(self.trained) if flag]


class EpisodeViews(BaseModel):
    model_config = ConfigDict(extra="forbid")

    student: TokenView
    teacher: TokenView
    context_messages_kept: int


class TemplateError(ValueError):
    """A chat template whose renderings of growing conversations are not prefixes of each other."""


def _render(tokenizer, messages: Sequence[Message], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        [message.as_dict() for message in messages], tokenize=False, add_generation_prompt=generation_prompt
    )


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def sampled_ids(trajectory: Trajectory, offset: int = 0) -> dict[int, Turn]:
    """{index in `trajectory.messages()` (+ `offset`): its turn} for every played turn that kept its
    sampled token ids (the last assistant messages of the transcript are the turns, in order)."""
    messages = trajectory.messages()
    assistant = [index for index, message in enumerate(messages) if message.role == "assistant"]
    played = assistant[len(assistant) - len(trajectory.turns):] if trajectory.turns else []
    return {index + offset: turn for index, turn in zip(played, trajectory.turns, strict=True) if turn.token_ids}


def _content_ids(tokenizer, content: str, text: str, sampled: Turn | None,
                 end_ids: set[int]) -> tuple[list[int], list[float] | None]:
    """The sampled ids of an assistant message's content when they decode to exactly its text (an end
    token they finished with left out), with the log-probs they were sampled with (one more, for that
    end token, where there was one); else the text tokenised, and None."""
    if sampled is not None:
        ids = list(sampled.token_ids)
        while ids and ids[-1] in end_ids:
            ids.pop()
        if content == text and tokenizer.decode(ids, skip_special_tokens=False) == text:
            logprobs = list(sampled.logprobs) if len(sampled.logprobs) == len(sampled.token_ids) else None
            return ids, logprobs
    return _encode(tokenizer, text), None


def token_view(
    tokenizer, messages: Sequence[Message], end_ids: set[int], untrained: range = range(0),
    sampled: dict[int, Turn] | None = None,
) -> TokenView:
    """Tokenise a conversation, marking each assistant message's content and end-of-turn token
    (except the messages whose index is in `untrained`: context such as worked examples).
    `sampled[i]`: the turn whose sampled token ids (and their log-probs: `TokenView.behaviour`) make
    assistant message i (`sampled_ids`)."""
    input_ids: list[int] = []
    trained: list[bool] = []
    behaviour: list[float] = []
    rendered = ""
    for index, message in enumerate(messages):
        if message.role == "assistant":
            with_header = _render(tokenizer, messages[:index], generation_prompt=True)
            if not with_header.startswith(rendered):
                raise TemplateError("the chat template's generation prompt does not extend the conversation")
            header = with_header[len(rendered):]
            full = _render(tokenizer, messages[: index + 1], generation_prompt=False)
            if not full.startswith(with_header):
                raise TemplateError("the chat template renders assistant turns differently from its generation prompt")
            body = full[len(with_header):]
            content_end = body.find(message.content) + len(message.content) if message.content in body else 0
            header_ids = _encode(tokenizer, header)
            content_ids, logprobs = _content_ids(tokenizer, message.content, body[:content_end],
                                                 (sampled or {}).get(index), end_ids)
            tail_ids = _encode(tokenizer, body[content_end:])
            input_ids += header_ids + content_ids + tail_ids
            behaviour += [math.nan] * len(header_ids)
            behaviour += logprobs[:len(content_ids)] if logprobs else [math.nan] * len(content_ids)
            turn = (sampled or {}).get(index)
            ended = logprobs is not None and tail_ids and len(turn.token_ids) > len(content_ids) and (
                turn.token_ids[len(content_ids)] == tail_ids[0])
            behaviour += ([logprobs[len(content_ids)]] if ended else [math.nan] * min(1, len(tail_ids)))
            behaviour += [math.nan] * max(0, len(tail_ids) - 1)
            train = index not in untrained
            trained += [False] * len(header_ids) + [train] * len(content_ids)
            # the end-of-turn token is trained too: stopping is part of the behaviour
            trained += [train and position == 0 and token in end_ids for position, token in enumerate(tail_ids)]
            rendered = full
        else:
            full = _render(tokenizer, messages[: index + 1], generation_prompt=False)
            if not full.startswith(rendered):
                raise TemplateError("the chat template's renderings are not prefixes of each other")
            piece_ids = _encode(tokenizer, full[len(rendered):])
            input_ids += piece_ids
            trained += [False] * len(piece_ids)
            behaviour += [math.nan] * len(piece_ids)
            rendered = full
    known = any(not math.isnan(value) for value in behaviour)
    return TokenView(input_ids=input_ids, trained=trained, behaviour=behaviour if known else None)


def with_context(messages: Sequence[Message], context: Sequence[Message]) -> tuple[list[Message], range]:
    """Context after the leading system messages, before the first user message; and where it sits."""
    leading = 0
    while leading < len(messages) and messages[leading].role == "system":
        leading += 1
    return [*messages[:leading], *context, *messages[leading:]], range(leading, leading + len(context))


def episode_views(
    tokenizer,
    messages: Sequence[Message],
    context: Sequence[Message],
    end_ids: set[int],
    teacher_max_tokens: int = 4096,
    sampled: dict[int, Turn] | None = None,
) -> EpisodeViews:
    """The student view (no context) and the teacher view (with as much context as fits its limit).

    The teacher's limit is its own: context messages are dropped from the front until the teacher
    view fits; the student view is never what limits the teacher. `sampled`: the student messages'
    sampled ids (`sampled_ids`).
    """
    student = token_view(tokenizer, messages, end_ids, sampled=sampled)
    kept = list(context)
    while True:
        teacher_messages, context_at = with_context(messages, kept)
        shifted = {index + (len(kept) if index >= context_at.start else 0): ids
                   for index, ids in (sampled or {}).items()}
        teacher = token_view(tokenizer, teacher_messages, end_ids, untrained=context_at, sampled=shifted)
        if len(teacher.input_ids) <= teacher_max_tokens or not kept:
            break
        kept = kept[1:]
        while kept and kept[0].role == "assistant":  # never keep half of a worked example
            kept = kept[1:]
    student_tokens = [token for token, flag in zip(student.input_ids, student.trained, strict=True) if flag]
    teacher_tokens = [token for token, flag in zip(teacher.input_ids, teacher.trained, strict=True) if flag]
    if student_tokens != teacher_tokens:
        raise TemplateError("student and teacher views disagree on the trained tokens")
    return EpisodeViews(student=student, teacher=teacher, context_messages_kept=len(kept))
