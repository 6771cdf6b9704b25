"""Tools and tool use: the calculator, the lookup, the call syntax, the tool environment, facts."""

from __future__ import annotations

import sys
import time

import pytest

from envs.base import Environment, EnvSpecError, Message, StepResult, TaskFamily
from envs.tool_use import (
    MALFORMED_HINT,
    TOOL_INSTRUCTION,
    FactsFamily,
    ToolEnvironment,
    ToolFamily,
    system_prompt,
    with_tools,
)
from envs.tools import FinalAnswer, Malformed, ToolCall, ToolError, calculator, make_lookup, parse_action

TOOLS = ["calc", "lookup"]


# ---------------------------------------------------------------- calculator


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("2 + 3 * 4", "14"),
        ("(2 + 3) * 4", "20"),
        ("2 ** 3 ** 2", "512"),
        ("10 - 4 - 3", "3"),
        ("-3 ** 2", "-9"),
        ("(-3) ** 2", "9"),
        ("-(2 - 5)", "3"),
        ("--4", "4"),
        ("7 / 2", "3.5"),
        ("6 / 3", "2"),
        ("0.1 + 0.2", "0.3"),
        ("1 / 3", "0.333333333333"),
        ("2.5 * 4", "10"),
        ("-7 // 2", "-4"),
        ("17 % 5", "2"),
        ("2 ** -2", "0.25"),
        ("  12 * (3 + 4)  ", "84"),
    ],
)
def test_calculator_evaluates_arithmetic(expression, expected):
    assert calculator.run(expression) == expected


@pytest.mark.parametrize("expression", ["1 / 0", "1 // 0", "5 % 0", "0 ** -1", "1.5 / 0.0"])
def test_calculator_division_by_zero_is_a_tool_error(expression):
    with pytest.raises(ToolError, match="division by zero"):
        calculator.run(expression)


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("x + 1", "unknown name 'x'"),
        ("abs(-2)", "function calls are not allowed"),
        ("(1).real", "only numbers"),
        ("'a' * 3", "only numbers"),
        ("True + 1", "only numbers"),
        ("[1, 2]", "only numbers"),
        ("2 ^ 3", r"use \*\* for powers"),
        ("1 < 2", "only numbers"),
        ("2 +", "cannot parse"),
        ("", "empty expression"),
        ("1" * 150 + " + 1", "more than 100 digits"),
        ("1 + " * 60 + "1", "longer than 200 characters"),
        ("(-8) ** 0.5", "not a real number"),
        ("1e308 * 10", "too large"),
    ],
)
def test_calculator_rejects_everything_but_arithmetic(expression, message):
    with pytest.raises(ToolError, match=message):
        calculator.run(expression)


@pytest.mark.parametrize(
    "expression", ["9**9**9", "2**100000", "10**100", "(10**50) * (10**50)", "99**99**99"]
)
def test_calculator_refuses_huge_numbers_quickly(expression):
    started = time.perf_counter()
    with pytest.raises(ToolError, match="digits"):
        calculator.run(expression)
    assert time.perf_counter() - started < 1.0


def test_calculator_never_runs_code(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    had_this = "this" in sys.modules
    for expression in [
        "__import__('this')",
        "open('written.txt', 'w')",
        "exec('x = 1')",
        "(lambda: 1)()",
        "[c for c in ().__class__.__base__.__subclasses__()]",
    ]:
        with pytest.raises(ToolError):
            calculator.run(expression)
    assert ("this" in sys.modules) == had_this  # importing `this` would also print the Zen
    assert capsys.readouterr().out == ""
    assert not (tmp_path / "written.txt").exists()


# ---------------------------------------------------------------- lookup


def test_lookup_is_case_and_whitespace_insensitive():
    lookup = make_lookup({"Zorvalin color": "teal", "Zorvalin code": "4821"})
    assert lookup.name == "lookup"
    assert lookup.usage == "LOOKUP(Zorvalin color)"
    assert lookup.run("  zorvalin   COLOR ") == "teal"
    assert lookup.run("Zorvalin code") == "4821"


def test_lookup_unknown_key_lists_at_most_five_close_keys():
    table = {f"Zorvalin attribute{number}": str(number) for number in range(9)}
    table["Brelka city"] = "Nimport"
    lookup = make_lookup(table)
    with pytest.raises(ToolError, match="unknown key 'Zorvalin atribute1'; close keys: ") as caught:
        lookup.run("Zorvalin atribute1")
    listed = str(caught.value).split("close keys: ")[1].split(", ")
    assert 1 <= len(listed) <= 5
    assert listed[0] == "Zorvalin attribute1"
    assert "Brelka city" not in listed
    with pytest.raises(ToolError, match="no close keys"):
        lookup.run("qqqqqqqqqqqqqqqqqqqqqq")


def test_lookup_rejects_keys_that_collide_after_normalising():
    with pytest.raises(ValueError, match="same up to case"):
        make_lookup({"A b": "1", "a  B": "2"})


# ---------------------------------------------------------------- parse_action


def test_parse_action_reads_a_call():
    assert parse_action("CALC(2 + 3)", TOOLS) == ToolCall(tool="calc", argument="2 + 3")
    assert parse_action("  CALC( (2+3)*(4-1) )  ", TOOLS) == ToolCall(tool="calc", argument="(2+3)*(4-1)")
    assert parse_action("I need the color.\nLOOKUP(Zorvalin color)", TOOLS) == ToolCall(
        tool="lookup", argument="Zorvalin color"
    )


def test_parse_action_reads_an_answer():
    assert parse_action("ANSWER: 42", TOOLS) == FinalAnswer(text="42")
    assert parse_action("Let me think.\nANSWER:  the red fox ", TOOLS) == FinalAnswer(text="the red fox")
    assert parse_action("ANSWER:\n42\n", TOOLS) == FinalAnswer(text="42")


def test_parse_action_first_of_call_and_answer_wins():
    assert parse_action("CALC(2 + 3)\nResult: 5\nANSWER: 5", TOOLS) == ToolCall(tool="calc", argument="2 + 3")
    assert parse_action("ANSWER: 5\nCALC(2 + 3)", TOOLS) == FinalAnswer(text="5")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("CALC(2 +", "unbalanced parentheses"),
        ("CALC((2 + 3)", "unbalanced parentheses"),
        ("CALC(2 +\n3)", "unbalanced parentheses"),
        ("CALC(2 + 3))", "text after the call"),
        ("CALC(2 + 3) = 5", "text after the call"),
        ("calc(2 + 3)", "upper case"),
        ("CALC (2 + 3)", "no space"),
        ("FOO(1)", "unknown tool FOO; the tools are: CALC, LOOKUP"),
    ],
)
def test_parse_action_is_strict_about_calls(text, message):
    parsed = parse_action(text, TOOLS)
    assert isinstance(parsed, Malformed)
    assert message in parsed.message


def test_parse_action_only_knows_the_tools_it_is_given():
    parsed = parse_action("LOOKUP(x)", ["calc"])
    assert isinstance(parsed, Malformed) and "unknown tool LOOKUP" in parsed.message


@pytest.mark.parametrize("text", ["The answer is 7.", "7", "f(x) = 3, so 7", "Use CALC(3 + 4) here", ""])
def test_parse_action_plain_text_is_the_final_answer(text):
    assert parse_action(text, TOOLS) == FinalAnswer(text=text)


# ---------------------------------------------------------------- ToolEnvironment


class FakeEnvironment:
    """A single-turn environment whose answer is 7; remembers what it was asked to score."""

    def __init__(self, item_id: str = "item-1", messages: list[Message] | None = None) -> None:
        self.family = "fake"
        self.item_id = item_id
        self.messages = messages or [
            Message(role="user", content="What is 3 + 4? Respond with only the final answer.")
        ]
        self.scored: list[str] = []

    def initial_observation(self) -> list[Message]:
        return list(self.messages)

    def step(self, action: str) -> StepResult:
        self.scored.append(action)
        return StepResult(reward=1.0 if action.strip() == "7" else 0.0, done=True, info={"scored": action})


def test_tool_environment_prompt_describes_the_tools_and_the_syntax():
    environment = ToolEnvironment(FakeEnvironment(), [calculator], max_tool_calls=3)
    assert isinstance(environment, Environment)
    system, user = environment.initial_observation()
    assert system.role == "system"
    assert system.content == system_prompt([calculator], 3)
    for part in [
        "NAME(argument)",
        "CALC(<expression>)",
        "CALC(12 * (3 + 4))",
        "Result: <value>",
        "ANSWER: <answer>",
        "at most 3 times",
    ]:
        assert part in system.content
    assert user == Message(role="user", content=f"What is 3 + 4? {TOOL_INSTRUCTION}")


def test_tool_environment_merges_a_system_message_and_appends_a_missing_instruction():
    inner = FakeEnvironment(
        messages=[Message(role="system", content="Be brief."), Message(role="user", content="What is 3 + 4?")]
    )
    system, user = ToolEnvironment(inner, [calculator]).initial_observation()
    assert system.content.startswith(system_prompt([calculator], 4)) and system.content.endswith("Be brief.")
    assert user.content == f"What is 3 + 4?\n\n{TOOL_INSTRUCTION}"


def test_tool_environment_call_result_then_answer_is_scored_by_the_inner_environment():
    inner = FakeEnvironment()
    environment = ToolEnvironment(inner, [calculator])
    environment.initial_observation()
    first = environment.step("I will compute it.\nCALC(3 + 4)")
    assert first.observation == [Message(role="user", content="Result: 7")]
    assert (first.reward, first.done) == (0.0, False)
    assert inner.scored == []
    second = environment.step("ANSWER: 7")
    assert (second.reward, second.done) == (1.0, True)
    assert inner.scored == ["7"]
    assert second.info == {"scored": "7", "tool_calls": 1, "malformed_calls": 0}
    with pytest.raises(RuntimeError, match="over"):
        environment.step("ANSWER: 7")


def test_tool_environment_shows_tool_errors_and_malformed_calls_as_observations():
    inner = FakeEnvironment()
    environment = ToolEnvironment(inner, [calculator])
    failed = environment.step("CALC(1 / 0)")
    assert failed.observation == [Message(role="user", content="Error: division by zero")]
    assert not failed.done and failed.info["tool_error"] is True
    malformed = environment.step("CALC(3 + 4")
    assert malformed.observation[0].content.startswith("Error: unbalanced parentheses in CALC(3 + 4")
    assert malformed.observation[0].content.endswith(f". {MALFORMED_HINT}")
    assert not malformed.done and malformed.reward == 0.0
    final = environment.step("ANSWER: 8")
    assert (final.reward, final.done) == (0.0, True)
    assert final.info["tool_calls"] == 1 and final.info["malformed_calls"] == 1


def test_tool_environment_plain_answer_is_scored():
    inner = FakeEnvironment()
    result = ToolEnvironment(inner, [calculator]).step("7")
    assert (result.reward, result.done) == (1.0, True)
    assert inner.scored == ["7"]


def test_tool_environment_ends_the_episode_past_the_tool_budget():
    inner = FakeEnvironment()
    environment = ToolEnvironment(inner, [calculator], max_tool_calls=2)
    assert not environment.step("CALC(1 + 1)").done
    assert not environment.step("CALC(2 + 2)").done
    over = environment.step("CALC(3 + 4)")
    assert (over.reward, over.done) == (0.0, True)
    assert over.info == {"reason": "tool budget exhausted", "tool_calls": 2, "malformed_calls": 0}
    assert over.observation == [] and inner.scored == []
    with pytest.raises(RuntimeError):
        environment.step("ANSWER: 7")


def test_tool_environment_names_its_family_after_the_tools():
    lookup = make_lookup({"k": "v"})
    environment = ToolEnvironment(FakeEnvironment(item_id="eval-3"), [lookup, calculator])
    assert environment.family == "fake+calc+lookup"
    assert environment.item_id == "eval-3"
    with pytest.raises(ValueError, match="distinct"):
        ToolEnvironment(FakeEnvironment(), [calculator, calculator])


# ---------------------------------------------------------------- ToolFamily and with_tools


class FakeFamily:
    name = "fake"
    success_threshold = 0.5

    def make(self, split, index):
        return FakeEnvironment(item_id=f"{split}-{index}")

    def split_size(self, split):
        return {"eval": 3, "train": 5}[split]


class PlainFamily:
    name = "plain"
    success_threshold = 1.0

    def make(self, split, index):
        return FakeEnvironment(item_id=f"{split}-{index}")

    def split_size(self, split):
        return 2


class PerItemTableFamily(PlainFamily):
    name = "tabled"

    def fact_table(self, split, index):
        return {f"{split} {index}": f"value {index}"}


def test_tool_family_delegates_to_the_wrapped_family():
    family = with_tools(FakeFamily(), ["calc"])
    assert isinstance(family, ToolFamily) and isinstance(family, TaskFamily)
    assert family.name == "fake+calc"
    assert (family.split_size("eval"), family.split_size("train")) == (3, 5)
    assert family.success_threshold == 0.5
    assert with_tools(PlainFamily(), ["calc"]).success_threshold == 1.0
    environment = family.make("train", 4)
    assert isinstance(environment, ToolEnvironment)
    assert (environment.family, environment.item_id) == ("fake+calc", "train-4")
    assert environment.step("CALC(6 * 7)").observation[0].content == "Result: 42"


def test_tool_family_builds_a_lookup_per_item_from_a_fact_table_method():
    family = with_tools(PerItemTableFamily(), ["lookup", "calc"])
    assert family.name == "tabled+calc+lookup"
    environment = family.make("eval", 1)
    assert environment.step("LOOKUP(eval 1)").observation[0].content == "Result: value 1"
    assert environment.step("LOOKUP(eval 0)").observation[0].content.startswith("Error: unknown key 'eval 0'")


@pytest.mark.parametrize(
    ("family", "tools", "message"),
    [
        (FakeFamily(), ["search"], "unknown tool search; available tools: calc, lookup"),
        (FakeFamily(), [], "name at least one tool"),
        (FakeFamily(), ["lookup"], "needs a family with a fact table"),
        (with_tools(FakeFamily(), ["calc"]), ["calc"], "already has tools"),
    ],
)
def test_with_tools_rejects_bad_requests(family, tools, message):
    with pytest.raises(EnvSpecError, match=message):
        with_tools(family, tools)


# ---------------------------------------------------------------- facts


@pytest.fixture(scope="module")
def facts():
    return FactsFamily(eval_size=30, entities=20, seed=3)


def _items(family, split):
    return [family.make(split, index) for index in range(family.split_size(split))]


def test_facts_splits_are_disjoint_and_cover_every_fact(facts):
    eval_ids = {environment.item_id for environment in _items(facts, "eval")}
    train_ids = {environment.item_id for environment in _items(facts, "train")}
    assert (len(eval_ids), len(train_ids)) == (30, 20 * 4 - 30)
    assert not eval_ids & train_ids
    assert {" of ".join(reversed(item.split("/"))) for item in eval_ids | train_ids} == set(facts.fact_table)
    assert len(set(facts.entities)) == 20 and all(
        name.isalpha() and name.istitle() for name in facts.entities
    )


def test_facts_is_seeded(facts):
    again = FactsFamily(eval_size=30, entities=20, seed=3)
    other = FactsFamily(eval_size=30, entities=20, seed=4)
    assert again.fact_table == facts.fact_table
    assert [again.make("eval", i).item_id for i in range(5)] == [
        facts.make("eval", i).item_id for i in range(5)
    ]
    assert other.fact_table != facts.fact_table


def test_facts_scores_the_gold_answer_only(facts):
    for environment in _items(facts, "eval")[:8]:
        entity, attribute = environment.item_id.split("/")
        gold = facts.fact_table[f"{attribute} of {entity}"]
        (message,) = environment.initial_observation()
        assert message.content == f"What is the {attribute} of {entity}? Respond with only the final answer."
        result = environment.step(f"The answer is {gold.upper()}.")
        assert (result.reward, result.done) == (1.0, True)
        assert result.info == {"extracted": gold.upper(), "gold": gold}
        with pytest.raises(RuntimeError):
            environment.step(gold)
    environment = facts.make("eval", 0)
    assert environment.step("I do not know").reward == 0.0


def test_facts_code_answers_must_match_exactly():
    family = FactsFamily(eval_size=5, entities=6, attributes=["code"])
    environment = family.make("eval", 0)
    gold = environment.gold
    wrong = str(int(gold) + 1)
    assert environment.step(wrong).reward == 0.0
    assert family.make("eval", 0).step(f"ANSWER: {gold}").reward == 1.0


def test_facts_with_lookup_is_answerable_through_the_tool():
    family = with_tools(FactsFamily(eval_size=10, entities=10), ["lookup"])
    assert family.name == "facts+lookup"
    environment = family.make("eval", 2)
    system, user = environment.initial_observation()
    assert "LOOKUP(<key>)" in system.content and user.content.endswith(TOOL_INSTRUCTION)
    entity, attribute = environment.item_id.split("/")
    result = environment.step(f"LOOKUP({attribute} of {entity.lower()})")
    value = result.observation[0].content.removeprefix("Result: ")
    assert value == environment.inner.gold
    final = environment.step(f"ANSWER: {value}")
    assert (final.reward, final.done) == (1.0, True)
    assert final.info["tool_calls"] == 1


def test_facts_default_size_and_options():
    family = FactsFamily()
    assert (family.split_size("eval"), family.split_size("train")) == (500, 300)
    assert FactsFamily(eval_size=3, entities=4, attributes="code, city").attributes == ["code", "city"]
    with pytest.raises(EnvSpecError, match="eval_size must be an integer from 1 to 7"):
        FactsFamily(eval_size=8, entities=4, attributes=["code", "city"])
    with pytest.raises(EnvSpecError, match="attributes must be one or more of"):
        FactsFamily(attributes=["height"])
    with pytest.raises(EnvSpecError, match="entities must be"):
        FactsFamily(entities=0)
