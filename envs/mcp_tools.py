"""Tools from an MCP server: `--mcp "command args"` starts it (stdio), lists its tools, calls them.

Each server runs as a child process for the life of this process (one per distinct command, shared
by every family and session that names it), spoken to through the `mcp` SDK from one background
thread that owns its event loop. A server tool becomes an `envs.tools.Tool`: its name in upper case
is the call name, its description what the model reads, its input schema the arguments (one bare
value for a one-parameter tool, else a JSON object, as for Python function tools). A call the server
reports as an error, a server that died, or a call past the time limit is an error the model sees.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import re
import shlex
import tempfile
import threading
from pathlib import Path
from typing import Any

from envs.base import EnvSpecError
from envs.function_tools import RESERVED_NAMES, Parameters, one_line, result_text
from envs.tools import TIME_LIMIT_S, Tool, ToolError

START_TIMEOUT_S = 60.0
_servers: dict[str, McpServer] = {}
_lock = threading.Lock()


class McpServer:
    """One stdio MCP server and its open client session."""

    def __init__(self, command: str, start_timeout_s: float = START_TIMEOUT_S) -> None:
        try:
            argv = shlex.split(command)
        except ValueError as error:
            raise EnvSpecError(f"--mcp {command!r}: cannot split it into a command and arguments ({error})") from None
        if not argv:
            raise EnvSpecError('--mcp needs the command that starts an MCP server, e.g. --mcp "python server.py"')
        from mcp import StdioServerParameters

        self.command = command
        self.parameters = StdioServerParameters(command=argv[0], args=argv[1:])
        self.log_path = Path(tempfile.mkstemp(prefix="skillfold-mcp-", suffix=".log")[1])
        self._log = self.log_path.open("w")
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._session: Any = None
        ready: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(ready),),
                                        name=f"mcp {argv[0]}", daemon=True)
        self._thread.start()
        try:
            self.tools = ready.result(start_timeout_s)
        except concurrent.futures.TimeoutError:
            self.close()
            raise EnvSpecError(f"the MCP server `{command}` did not finish starting within {start_timeout_s:g} s"
                               f"{self._log_tail()}") from None
        except Exception as error:
            self.close()
            raise EnvSpecError(f"cannot start the MCP server `{command}`: {_reason(error)}{self._log_tail()}; "
                               "check that the command runs an MCP server on stdio") from None

    def _log_tail(self) -> str:
        try:
            if not self._log.closed:
                self._log.flush()
            lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return ""
        return f" (its stderr ends: {' | '.join(lines[-3:])[:400]})" if lines else ""

    async def _main(self, ready: concurrent.futures.Future) -> None:
        from mcp import ClientSession
        from mcp.client.stdio import stdio_client

        self._stop = asyncio.Event()
        try:
            async with stdio_client(self.parameters, errlog=self._log) as (read, write):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    listed = await session.list_tools()
                    self._session = session
                    ready.set_result(list(listed.tools))
                    await self._stop.wait()
        except BaseException as error:  # the server failed to start, or died
            if not ready.done():
                ready.set_exception(error if isinstance(error, Exception) else RuntimeError(repr(error)))
        finally:
            self._session = None

    def call(self, name: str, arguments: dict[str, Any], time_limit_s: float = TIME_LIMIT_S) -> str:
        """The text a server tool returns; raises ToolError for an error result, a dead server, a timeout."""
        if self._session is None:
            raise ToolError(f"the MCP server `{self.command}` is not running{self._log_tail()}")
        future = asyncio.run_coroutine_threadsafe(self._session.call_tool(name, arguments), self._loop)
        try:
            result = future.result(time_limit_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise ToolError(f"no result within the time limit of {time_limit_s:g} seconds") from None
        except Exception as error:
            raise ToolError(f"the MCP call failed: {_reason(error)}") from None
        parts = [block.text if getattr(block, "type", "") == "text" else f"[{getattr(block, 'type', 'content')}]"
                 for block in getattr(result, "content", None) or []]
        text = "\n".join(parts)
        if not parts and getattr(result, "structured_content", None) is not None:
            text = result_text(result.structured_content)
        if getattr(result, "is_error", False):
            raise ToolError(text or "the server reported an error")
        return text

    def close(self) -> None:
        if self._stop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self._log.close()


def _reason(error: BaseException) -> str:
    if isinstance(error, BaseExceptionGroup) and error.exceptions:
        return _reason(error.exceptions[0])
    return f"{type(error).__name__}: {error}"[:300]


def server(command: str) -> McpServer:
    """The running server of `command`, started on first use (and stopped when this process exits)."""
    with _lock:
        if command not in _servers:
            _servers[command] = McpServer(command)
        return _servers[command]


@atexit.register
def close_all() -> None:
    with _lock:
        for running in list(_servers.values()):
            running.close()
        _servers.clear()


def mcp_tools(command: str) -> list[Tool]:
    """Every tool of the MCP server `command` as a `Tool`."""
    running = server(command)
    tools = []
    for listed in running.tools:
        name = re.sub(r"\W", "_", listed.name).strip("_").lower()
        if not name or name[0].isdigit() or name in RESERVED_NAMES:
            raise EnvSpecError(f"--mcp {command!r}: its tool {listed.name!r} cannot be called by that name "
                               f"(a built-in or not an identifier); rename it on the server")
        tools.append(_server_tool(running, listed.name, name, listed.description, listed.input_schema or {}))
    if not tools:
        raise EnvSpecError(f"the MCP server `{command}` lists no tools")
    return tools


def _server_tool(running: McpServer, remote_name: str, name: str, description: str | None,
                 schema: dict[str, Any]) -> Tool:
    properties = schema.get("properties") or {}
    required = [key for key in schema.get("required") or [] if key in properties]
    text_valued = {key for key, value in properties.items() if isinstance(value, dict) and value.get("type") == "string"}
    parameters = Parameters(name.upper(), list(properties), required, text_valued)

    def read(text: str) -> dict[str, Any]:
        return parameters.read(text) if properties else {}

    def run(text: str) -> str:
        return running.call(remote_name, read(text), TIME_LIMIT_S * 0.9)  # before run_tool gives up

    placeholder = (list(properties)[0] if len(properties) == 1
                   else "JSON object of " + ", ".join(properties) if properties else "nothing")
    return Tool(name=name, description=one_line(description) or f"the MCP tool {remote_name}",
                usage=parameters.form() if properties else f"{name.upper()}()", run=run, argument=placeholder,
                parse=read, documented=False)
