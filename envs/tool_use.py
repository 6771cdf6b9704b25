"""Any task family, run with tools; and `facts`, a family only a lookup tool can answer.

`with_tools(family, ["calc"])` wraps a family whose environments score one final answer (every
single-turn family) into a multi-turn one, named `<family>+<tools>` (e.g. `rg:basic_arithmetic+calc`).
The agent may call tools (syntax in `envs.tools`) up to `max_tool_calls` times; each result comes
back as a user message "Result: <value>" (or "Error: <message>"), and the episode ends when the agent
answers with a line `ANSWER: <answer>` (or plain text), which the wrapped environment scores.

`FactsFamily` (`facts`) asks for attributes of made-up entities ("What is the color of Zorvalin?")
from a private, seeded fact table that no model can know; `facts+lookup` gives the agent that table
through LOOKUP. Without the tool the model can only guess: how to call the tool is the skill to learn.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence

from envs.base import Environment, EnvSpecError, Message, Split, StepResult, TaskFamily, close_environment
from envs.extract import extract_answer
from envs.tools import (
    FinalAnswer,
    Malformed,
    Tool,
    ToolCall,
    calculator,
    make_lookup,
    observation_text,
    parse_action,
    run_tool,
)

PLAIN_INSTRUCTION = "Respond with only the final answer."
TOOL_INSTRUCTION = "Call a tool if it helps, then give the final answer on a line ANSWER: <answer>."
MALFORMED_HINT = "Call a tool as NAME(argument) or answer as ANSWER: <answer>."
TOOL_NAMES = ("calc", "lookup")


def system_prompt(tools: Sequence[Tool], max_tool_calls: int) -> str:
    """The system message that teaches the call syntax and lists the tools (sorted by name)."""
    ordered = sorted(tools, key=lambda tool: tool.name)
    listed = [f"- {tool.syntax}: {tool.description}. Example: {tool.usage}" for tool in ordered]
    return "\n".join(
        [
            "You can use tools before you answer. To call a tool, reply with one line NAME(argument) and "
            'nothing after it; the result comes back as "Result: <value>" (or "Error: <message>"). '
            f"You may call tools at most {max_tool_calls} times. "
            "When you know the answer, reply with a line ANSWER: <answer>.",
            "",
            "Tools:",
            *listed,
        ]
    )


def _with_tool_instruction(content: str) -> str:
    """Swap a trailing "Respond with only the final answer." for the tool instruction (or append it)."""
    stripped = content.rstrip()
    if stripped.endswith(PLAIN_INSTRUCTION):
        return stripped[: -len(PLAIN_INSTRUCTION)] + TOOL_INSTRUCTION
    return f"{stripped}\n\n{TOOL_INSTRUCTION}" if stripped else TOOL_INSTRUCTION


class ToolEnvironment:
    """One episode of a wrapped single-turn environment in which the agent may call tools first."""

    def __init__(self, inner: Environment, tools: Sequence[Tool], max_tool_calls: int = 4) -> None:
        names = [tool.name for tool in tools]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"a tool environment needs one or more distinct tools, got {names}")
        if max_tool_calls < 0:
            raise ValueError(f"max_tool_calls must be >= 0, got {max_tool_calls}")
        self.inner = inner
        self.tools = {tool.name: tool for tool in tools}
        self.max_tool_calls = max_tool_calls
        self.family = f"{inner.family}+{'+'.join(sorted(names))}"
        self.item_id = inner.item_id
        self.tool_calls = 0
        self.malformed_calls = 0
        self.done = False

    def initial_observation(self) -> list[Message]:
        messages = list(self.inner.initial_observation())
        prompt = system_prompt(list(self.tools.values()), self.max_tool_calls)
        if messages and messages[-1].role == "user":
            messages[-1] = Message(role="user", content=_with_tool_instruction(messages[-1].content))
        if messages and messages[0].role == "system":
            return [Message(role="system", content=f"{prompt}\n\n{messages[0].content}"), *messages[1:]]
        return [Message(role="system", content=prompt), *messages]

    def step(self, action: str) -> StepResult:
        if self.done:
            raise RuntimeError(
                f"the episode of {self.family} item {self.item_id} is over; make a new environment"
            )
        parsed = parse_action(action, self.tools)
        if isinstance(parsed, ToolCall):
            return self._call(parsed)
        if isinstance(parsed, Malformed):
            self.malformed_calls += 1
            message = f"Error: {parsed.message.rstrip('.')}. {MALFORMED_HINT}"
            return StepResult(
                observation=[Message(role="user", content=message)], info={"malformed": parsed.message}
            )
        assert isinstance(parsed, FinalAnswer)
        result = self.inner.step(parsed.text)
        self.done = result.done
        return result.model_copy(update={"info": {**result.info, **self._counts()}})

    def _call(self, call: ToolCall) -> StepResult:
        if self.tool_calls >= self.max_tool_calls:
            self.done = True
            return StepResult(
                reward=0.0, done=True, info={"reason": "tool budget exhausted", **self._counts()}
            )
        self.tool_calls += 1
        use = run_tool(self.tools[call.tool], call.argument)
        info = {"tool": call.tool, "argument": call.argument, "tool_error": use.error is not None}
        return StepResult(observation=[Message(role="user", content=observation_text(use))], info=info,
                          tool_calls=[use])

    def _counts(self) -> dict[str, int]:
        return {"tool_calls": self.tool_calls, "malformed_calls": self.malformed_calls}

    def close(self) -> None:
        """Close the wrapped environment (its optional `close()`)."""
        problem = close_environment(self.inner)
        if problem is not None:
            raise RuntimeError(problem)


class ToolFamily:
    """A task family whose environments are wrapped in `ToolEnvironment` with the named tools.

    `tool_names` are built-in tools (TOOL_NAMES); `extra_tools` are tools made elsewhere (a user's
    functions, an MCP server's tools), the same for every item.
    """

    def __init__(self, family: TaskFamily, tool_names: Sequence[str], max_tool_calls: int = 4,
                 extra_tools: Sequence[Tool] = ()) -> None:
        if isinstance(family, ToolFamily):
            raise EnvSpecError(f"{family.name} already has tools; name all the tools in one list")
        names = sorted({name.strip().lower() for name in tool_names})
        if not names and not extra_tools:
            raise EnvSpecError(
                f"name at least one tool for {family.name}; available tools: {', '.join(TOOL_NAMES)}, "
                "module:function or file.py:function"
            )
        unknown = [name for name in names if name not in TOOL_NAMES]
        if unknown:
            raise EnvSpecError(f"unknown tool {', '.join(unknown)}; available tools: {', '.join(TOOL_NAMES)}, "
                               "module:function or file.py:function")
        every = names + [tool.name for tool in extra_tools]
        repeated = sorted({name for name in every if every.count(name) > 1})
        if repeated:
            raise EnvSpecError(f"two tools are named {', '.join(repeated)}; each tool needs its own name")
        self.family = family
        self.tool_names = names
        self.extra_tools = list(extra_tools)
        self.max_tool_calls = max_tool_calls
        self.name = f"{family.name}+{'+'.join(sorted(every))}"
        self._tables: Callable[[Split, int], Mapping[str, str]] | None = None
        self._shared_lookup: Tool | None = None
        if "lookup" in names:
            table = getattr(family, "fact_table", None)
            if isinstance(table, Mapping):
                self._shared_lookup = make_lookup(table)
            elif callable(table):
                self._tables = table
            else:
                raise EnvSpecError(
                    f"the lookup tool needs a family with a fact table, and {family.name} has none "
                    "(a family provides one as `fact_table`, e.g. facts+lookup); drop lookup or pick such a family"
                )

    @property
    def success_threshold(self) -> float:
        return self.family.success_threshold

    def split_size(self, split: Split) -> int:
        return self.family.split_size(split)

    def documentation(self) -> list[list[Message]]:
        """One worked dialogue per tool that has a documentation example, from those examples."""
        environment = self.make("train", 0)
        close_environment(environment)
        dialogues = [documentation_dialogue(tool) for tool in environment.tools.values() if tool.documented]
        return [dialogue for dialogue in dialogues if dialogue]

    def make(self, split: Split, index: int) -> ToolEnvironment:
        tools = []
        for name in self.tool_names:
            if name == "calc":
                tools.append(calculator)
            elif self._shared_lookup is not None:
                tools.append(self._shared_lookup)
            else:
                assert self._tables is not None
                tools.append(make_lookup(self._tables(split, index)))
        return ToolEnvironment(self.family.make(split, index), tools + self.extra_tools, self.max_tool_calls)


def documentation_dialogue(tool: Tool) -> list[Message]:
    """The tool's own usage examples as worked dialogues: question, call, result, answer (each).

    This is what a tool's documentation teaches, and it gives a small model its first tool call
    (without any example a 135M model never calls a tool; two worked dialogues took it to 90%,
    NOTES.md section 9).
    """
    arguments = [tool.usage[len(tool.call_name) + 1 : -1], *tool.examples]
    dialogue = []
    for number, argument in enumerate(arguments):
        use = run_tool(tool, argument)
        if use.error is not None:  # a user's example that does not run teaches nothing
            continue
        result = use.result
        if number < len(tool.questions):
            question = tool.questions[number]
        else:
            question = f"What is the {argument}?" if tool.name == "lookup" else f"What is {argument}?"
        dialogue += [
            Message(role="user", content=f"{question} {TOOL_INSTRUCTION}"),
            Message(role="assistant", content=f"{tool.call_name}({argument})"),
            Message(role="user", content=f"Result: {result}"),
            Message(role="assistant", content=f"ANSWER: {result}"),
        ]
    return dialogue


def with_tools(family: TaskFamily, tool_names: Sequence[str], max_tool_calls: int = 4,
               extra_tools: Sequence[Tool] = ()) -> ToolFamily:
    """`family` run with tools (names from TOOL_NAMES, and `extra_tools`); raises EnvSpecError naming the fix."""
    return ToolFamily(family, tool_names, max_tool_calls, extra_tools)


# ---------------------------------------------------------------- the facts family

ONSETS = "b d f g k l m n p r s t v z b d k l m n r s t v z br dr kr tr th".split()
VOWELS = "a e i o u a e i o ai".split()
CODAS = ["", "", "", "", "n", "r", "l", "s"]
CITY_ENDINGS = "port holm dale mere wick ford gard stead haven moor".split()
COLORS = "red orange yellow green blue purple pink brown black white grey teal gold silver".split()
ANIMALS = "owl fox otter heron badger lynx crane hare newt wolf moth seal".split()


def _made_up_word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables))


def _city(rng: random.Random) -> str:
    return (_made_up_word(rng, rng.randint(1, 2)) + rng.choice(CITY_ENDINGS)).capitalize()


ATTRIBUTES: dict[str, Callable[[random.Random], str]] = {
    "code": lambda rng: str(rng.randint(1000, 9999)),
    "color": lambda rng: rng.choice(COLORS),
    "city": _city,
    "year": lambda rng: str(rng.randint(1600, 2020)),
    "animal": lambda rng: rng.choice(ANIMALS),
}
DEFAULT_ATTRIBUTES = ("code", "color", "city", "year")
MAX_ENTITIES = 5000


def _normalize(text: str) -> str:
    return " ".join(text.split()).rstrip(".").strip().casefold()


class FactsEnvironment:
    """One question about one fact; scored by exact match after `extract_answer` and normalisation."""

    def __init__(self, item_id: str, question: str, gold: str) -> None:
        self.family = FactsFamily.name
        self.item_id = item_id
        self.question = question
        self.gold = gold
        self.done = False

    def initial_observation(self) -> list[Message]:
        return [Message(role="user", content=f"{self.question} {PLAIN_INSTRUCTION}")]

    def step(self, action: str) -> StepResult:
        if self.done:
            raise RuntimeError(f"the episode of facts item {self.item_id} is over; make a new environment")
        self.done = True
        extracted = extract_answer(action, self.gold)
        reward = 1.0 if _normalize(extracted) == _normalize(self.gold) else 0.0
        return StepResult(reward=reward, done=True, info={"extracted": extracted, "gold": self.gold})


class FactsFamily:
    """`facts`: questions about a seeded table of made-up entities; eval and train share no question.

    Options: `eval_size` (eval questions), `seed` (the table and the split), `entities` (how many
    made-up entities), `attributes` (a list, or a comma-separated string, from ATTRIBUTES). The
    table is keyed "<attribute> of <Entity>" (e.g. "color of Zorvalin", the phrase the question uses)
    and is the whole of `fact_table`.
    """

    name = "facts"
    success_threshold = 1.0

    def __init__(
        self,
        eval_size: int = 500,
        seed: int = 0,
        entities: int = 200,
        attributes: Sequence[str] | str = DEFAULT_ATTRIBUTES,
    ) -> None:
        if isinstance(attributes, str):
            attributes = attributes.split(",")
        chosen = list(dict.fromkeys(attribute.strip().lower() for attribute in attributes))
        unknown = [attribute for attribute in chosen if attribute not in ATTRIBUTES]
        if not chosen or unknown:
            raise EnvSpecError(
                f"facts attributes must be one or more of {', '.join(ATTRIBUTES)}; got {list(attributes)}"
            )
        if not isinstance(entities, int) or not 1 <= entities <= MAX_ENTITIES:
            raise EnvSpecError(
                f"facts entities must be an integer from 1 to {MAX_ENTITIES}, got {entities!r}"
            )
        total = entities * len(chosen)
        if not isinstance(eval_size, int) or not 1 <= eval_size < total:
            raise EnvSpecError(
                f"facts eval_size must be an integer from 1 to {total - 1} (entities x attributes = {total}, "
                f"and the train split needs at least one); got {eval_size!r}: lower eval_size or raise entities"
            )
        rng = random.Random(seed)
        names: list[str] = []
        while len(names) < entities:
            word = _made_up_word(rng, rng.choice((2, 2, 3))).capitalize()
            if 4 <= len(word) <= 11 and word not in names:
                names.append(word)
        # every entity gets every known attribute, so a value does not depend on which are chosen
        values = {
            (entity, attribute): ATTRIBUTES[attribute](rng) for entity in names for attribute in ATTRIBUTES
        }
        pairs = [(entity, attribute) for entity in names for attribute in chosen]
        rng.shuffle(pairs)
        self.seed = seed
        self.attributes = chosen
        self.entities = names
        self.fact_table = {
            f"{attribute} of {entity}": values[entity, attribute] for entity in names for attribute in chosen
        }
        self._splits: dict[str, list[tuple[str, str]]] = {
            "eval": pairs[:eval_size],
            "train": pairs[eval_size:],
        }

    def split_size(self, split: Split) -> int:
        return len(self._splits[split])

    def make(self, split: Split, index: int) -> FactsEnvironment:
        items = self._splits[split]
        if not 0 <= index < len(items):
            raise IndexError(f"facts has {len(items)} {split} items; index {index} is out of range")
        entity, attribute = items[index]
        return FactsEnvironment(
            item_id=f"{entity}/{attribute}",
            question=f"What is the {attribute} of {entity}?",
            gold=self.fact_table[f"{attribute} of {entity}"],
        )
