"""An interactive session: a person types tasks, the agent answers with retrieved skills and tools.

Every answered task becomes a trajectory once the person rates it (`/good` = reward 1, `/bad` = 0),
so chat feeds the same store as `skillfold run`. A `/good` answer also becomes an exemplar skill
(the person is its verifier); `/teach TEXT` stores a skill directly.

Tools are `calc`, a user's typed functions (`module:function`, `file.py:function`) and the tools of
MCP servers; `seed_documentation` gives a family with no skills yet its tools' documentation
examples as its first skills, as `skillfold run` starts (chat has no probe items to verify them on).
"""

from __future__ import annotations

from agent.skills import dialogue_skills, exemplar_from, render_context, retrieve_for
from engines.base import Engine, SamplingParams
from envs.base import EnvSpecError, Message, Trajectory, Turn
from envs.plugins import is_object_spec
from envs.registry import tool_from_spec
from envs.tool_use import documentation_dialogue, system_prompt
from envs.tools import (
    FinalAnswer,
    Malformed,
    Tool,
    ToolCall,
    calculator,
    observation_text,
    parse_action,
    run_tool,
)
from memory import Memory, Skill

AVAILABLE_TOOLS = {"calc": calculator}


class ChatSession:
    def __init__(
        self,
        engine: Engine,
        memory: Memory,
        family: str = "chat",
        tools: list[str] | None = None,
        max_new_tokens: int = 128,
        max_tool_calls: int = 4,
        token_budget: int = 600,
        mcp: list[str] | None = None,
    ) -> None:
        unknown = [name for name in tools or [] if name not in AVAILABLE_TOOLS and not is_object_spec(name)]
        if unknown:
            raise EnvSpecError(f"unknown chat tools {unknown}; available: {sorted(AVAILABLE_TOOLS)}, "
                               "module:function or file.py:function")
        self.engine = engine
        self.memory = memory
        self.family = family
        self.tools: list[Tool] = [AVAILABLE_TOOLS[name] if name in AVAILABLE_TOOLS else tool_from_spec(name)
                                  for name in tools or []]
        if mcp:
            from envs.mcp_tools import mcp_tools

            self.tools += [tool for command in mcp for tool in mcp_tools(command)]
        names = [tool.name for tool in self.tools]
        if len(set(names)) != len(names):
            raise EnvSpecError(f"two chat tools share a name: {names}; each tool needs its own name")
        self.params = SamplingParams(max_new_tokens=max_new_tokens)
        self.max_tool_calls = max_tool_calls
        self.token_budget = token_budget
        self.last: Trajectory | None = None
        self.last_skills: list[Skill] = []

    def seed_documentation(self) -> list[Skill]:
        """On a family with no skills yet, store its tools' documentation examples as its first skills."""
        if not self.tools or self.memory.list_skills(family=self.family):
            return []
        dialogues = [documentation_dialogue(tool) for tool in self.tools if tool.documented]
        skills = dialogue_skills(self.family, [dialogue for dialogue in dialogues if dialogue])
        return self.memory.add_skills(skills) if skills else []

    def handle(self, line: str) -> list[str]:
        """React to one line from the person; returns what to show."""
        command, _, argument = line.partition(" ")
        if command in ("/good", "/bad"):
            return self.rate(command == "/good")
        if command == "/teach":
            if not argument.strip():
                return ["usage: /teach TEXT"]
            skill = self.memory.add_skill(Skill(kind="taught", family=self.family, title=argument[:80], text=argument))
            return [f"stored skill {skill.id} for {self.family}"]
        if command == "/skills":
            if not self.last_skills:
                return ["the last answer used no skills"]
            return [f"{skill.id} ({skill.kind}) {skill.title}" for skill in self.last_skills]
        if command == "/family":
            self.family = argument.strip() or self.family
            return [f"family is now {self.family}"]
        if command.startswith("/"):
            return [f"unknown command {command}; /good /bad /teach /skills /family /quit"]
        return self.answer(line)

    def answer(self, task: str) -> list[str]:
        skills = retrieve_for(self.memory, self.engine, self.family, [Message(role="user", content=task)],
                              self.token_budget, k=5)
        self.last_skills = skills
        prompt = [Message(role="user", content=task)]
        if self.tools:
            prompt.insert(0, Message(role="system", content=system_prompt(self.tools, self.max_tool_calls)))
        trajectory = Trajectory(
            env=self.family, item_id="chat", split="train", prompt=prompt, context=render_context(skills),
            skill_ids=[skill.id for skill in skills], model=self.engine.model_name, adapter=self.engine.adapter,
        )
        shown = [f"[skill {skill.id}] {skill.title}" for skill in skills]
        calls = 0
        for _ in range(self.max_tool_calls + 1):
            chat = [message.as_dict() for message in trajectory.messages(with_context=True)]
            generation = self.engine.generate([chat], self.params)[0]
            turn = Turn(action=generation.text, prompt_tokens=generation.prompt_tokens,
                        completion_tokens=len(generation.token_ids))
            trajectory.turns.append(turn)
            action = parse_action(generation.text, [tool.name for tool in self.tools]) if self.tools else None
            if isinstance(action, ToolCall) and calls >= self.max_tool_calls:
                turn.done = True
                shown.append(f"agent> (no answer: it asked for more than {self.max_tool_calls} tool calls)")
                break
            if isinstance(action, ToolCall):
                calls += 1
                tool = next(tool for tool in self.tools if tool.name == action.tool)
                use = run_tool(tool, action.argument)
                result = observation_text(use)
                turn.tool_calls = [use]
                turn.observation = [Message(role="user", content=result)]
                shown.append(f"[tool] {generation.text.strip()} -> {result}")
                continue
            if isinstance(action, Malformed):
                turn.observation = [Message(role="user", content=f"Error: {action.message}")]
                shown.append(f"[tool] malformed call: {action.message}")
                continue
            answer = action.text if isinstance(action, FinalAnswer) else generation.text
            turn.done = True
            shown.append(f"agent> {answer.strip()}")
            break
        else:
            shown.append(f"agent> (no answer after {self.max_tool_calls + 1} turns)")
        self.last = trajectory
        shown.append("(rate it with /good or /bad)")
        return shown

    def rate(self, good: bool) -> list[str]:
        if self.last is None:
            return ["nothing to rate yet: type a task first"]
        trajectory = self.last
        if trajectory.turns:
            trajectory.turns[-1].reward = 1.0 if good else 0.0
        trajectory.reward = 1.0 if good else 0.0
        trajectory.success = good
        trajectory.info["rated_by"] = "person"
        self.memory.add_trajectory(trajectory)
        self.last = None
        messages = [f"stored trajectory {trajectory.id} with reward {trajectory.reward:.0f}"]
        if good:
            skill = self.memory.add_skill(exemplar_from(trajectory))
            messages.append(f"stored exemplar skill {skill.id}")
        return messages
