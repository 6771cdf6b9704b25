"""ChatSession with a scripted engine and an in-process Chroma memory (hashing embedding, no model)."""

import pytest

from agent.chat import ChatSession
from memory import HashingEmbedding, Memory
from tests.fakes import ScriptedEngine


def calculating(chat) -> str:
    """Calls the calculator first, answers with the result once it has seen it."""
    last = chat[-1]["content"]
    if chat[-1]["role"] == "user" and last.startswith("Result: "):
        return f"ANSWER: {last.removeprefix('Result: ')}"
    return "CALC(2+3)"


@pytest.fixture()
def memory(tmp_path):
    return Memory.open(home=tmp_path / "home", embedding=HashingEmbedding())


def session_with(memory, respond, **options) -> tuple[ChatSession, ScriptedEngine]:
    engine = ScriptedEngine(respond)
    return ChatSession(engine, memory, tools=["calc"], **options), engine


def test_tool_call_then_answer_is_shown(memory):
    session, engine = session_with(memory, calculating)
    shown = session.handle("what is 2 + 3?")
    assert "[tool] CALC(2+3) -> Result: 5" in shown
    assert "agent> 5" in shown
    assert shown.index("[tool] CALC(2+3) -> Result: 5") < shown.index("agent> 5")
    assert shown[-1] == "(rate it with /good or /bad)"
    assert engine.batches == [1, 1]  # one generation per turn
    assert memory.count_trajectories() == 0  # nothing is stored before the person rates it


def test_good_stores_the_trajectory_and_an_exemplar(memory):
    session, _ = session_with(memory, calculating)
    session.handle("what is 2 + 3?")
    shown = session.handle("/good")
    assert shown[0].startswith("stored trajectory ") and shown[0].endswith("with reward 1")
    [trajectory] = memory.list_trajectories()
    assert shown[0] == f"stored trajectory {trajectory.id} with reward 1"
    assert trajectory.success is True and trajectory.reward == 1.0
    assert trajectory.env == "chat" and trajectory.info["rated_by"] == "person"
    assert [turn.action for turn in trajectory.turns] == ["CALC(2+3)", "ANSWER: 5"]
    assert [m.content for m in trajectory.turns[0].observation] == ["Result: 5"]
    assert trajectory.turns[-1].done and trajectory.turns[-1].reward == 1.0
    assert [m.content for m in trajectory.prompt if m.role == "user"] == ["what is 2 + 3?"]
    [skill] = memory.list_skills(family="chat")
    assert shown[1] == f"stored exemplar skill {skill.id}"
    assert skill.kind == "exemplar" and skill.provenance == [trajectory.id]
    assert "CALC(2+3)" in skill.text and "Result: 5" in skill.text
    assert session.handle("/good") == ["nothing to rate yet: type a task first"]  # rated once only


def test_bad_stores_reward_zero_and_no_skill(memory):
    session, _ = session_with(memory, calculating)
    session.handle("what is 2 + 3?")
    shown = session.handle("/bad")
    [trajectory] = memory.list_trajectories()
    assert shown == [f"stored trajectory {trajectory.id} with reward 0"]
    assert trajectory.success is False and trajectory.reward == 0.0
    assert trajectory.turns[-1].reward == 0.0
    assert memory.list_skills() == []


def test_taught_skill_is_retrieved_by_the_next_answer(memory):
    session, engine = session_with(memory, calculating)
    assert session.handle("/skills") == ["the last answer used no skills"]
    shown = session.handle("/teach use CALC for any sum before you answer")
    [skill] = memory.list_skills(family="chat")
    assert skill.kind == "taught" and skill.text == "use CALC for any sum before you answer"
    assert shown == [f"stored skill {skill.id} for chat"]
    prompts = []
    engine.respond = lambda chat: prompts.append(chat) or calculating(chat)
    shown = session.handle("what is 2 + 3?")
    assert shown[0] == f"[skill {skill.id}] use CALC for any sum before you answer"
    assert any("use CALC for any sum" in message["content"] for message in prompts[0])  # it is in the prompt
    assert session.handle("/skills") == [f"{skill.id} (taught) use CALC for any sum before you answer"]
    session.handle("/good")
    [trajectory] = memory.list_trajectories()
    assert trajectory.skill_ids == [skill.id]
    assert memory.get_skill(skill.id).successes_with == 1  # the rated episode counts as a use


def test_teach_without_text_and_unknown_command(memory):
    session, _ = session_with(memory, calculating)
    assert session.handle("/teach") == ["usage: /teach TEXT"]
    [message] = session.handle("/frobnicate")
    assert message.startswith("unknown command /frobnicate")
    assert memory.list_skills() == []
    assert session.handle("/family arithmetic") == ["family is now arithmetic"]
    session.handle("/teach add carefully")
    assert [skill.family for skill in memory.list_skills()] == ["arithmetic"]


def test_malformed_call_shows_an_error_and_continues(memory):
    replies = iter(["CALC(2+", "ANSWER: 5"])
    session, _ = session_with(memory, lambda chat: next(replies))
    shown = session.handle("what is 2 + 3?")
    malformed = [line for line in shown if line.startswith("[tool] malformed call:")]
    assert len(malformed) == 1
    assert "agent> 5" in shown
    session.handle("/bad")
    [trajectory] = memory.list_trajectories()
    assert len(trajectory.turns) == 2
    assert trajectory.turns[0].observation[0].content.startswith("Error: ")


def test_tool_error_is_shown_as_the_result(memory):
    replies = iter(["CALC(1/0)", "ANSWER: undefined"])
    session, _ = session_with(memory, lambda chat: next(replies))
    shown = session.handle("what is 1 / 0?")
    assert "[tool] CALC(1/0) -> Error: division by zero" in shown
    assert "agent> undefined" in shown


def test_tool_calls_stop_at_the_budget(memory):
    session, engine = session_with(memory, lambda chat: "CALC(1+1)", max_tool_calls=2)
    shown = session.handle("keep calculating")
    assert [line for line in shown if line.startswith("[tool]")] == ["[tool] CALC(1+1) -> Result: 2"] * 2
    assert "agent> (no answer: it asked for more than 2 tool calls)" in shown
    assert len(engine.batches) == 3  # two calls run, the third is refused
    session.handle("/bad")
    [trajectory] = memory.list_trajectories()
    assert len(trajectory.turns) == 3 and trajectory.turns[-1].observation == []


def test_no_answer_is_reported(memory):
    session, _ = session_with(memory, lambda chat: "CALC(", max_tool_calls=1)
    shown = session.handle("say something")
    assert len([line for line in shown if line.startswith("[tool] malformed call:")]) == 2
    assert "agent> (no answer after 2 turns)" in shown


def test_rating_with_nothing_to_rate_says_so(memory):
    session, _ = session_with(memory, calculating)
    assert session.handle("/good") == ["nothing to rate yet: type a task first"]
    assert session.handle("/bad") == ["nothing to rate yet: type a task first"]
    assert memory.count_trajectories() == 0 and memory.list_skills() == []


def test_unknown_tool_is_refused(memory):
    with pytest.raises(ValueError, match="unknown chat tools"):
        ChatSession(ScriptedEngine(calculating), memory, tools=["teleport"])
