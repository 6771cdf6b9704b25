"""Every bad input gets a clear error: exit 2, one `error:` line naming the fix, no traceback, nothing stored changed.

A table of bad inputs (paths that are files, unwritable or missing; corrupt model and adapter files;
malformed configs and overrides; bad options; a dead or malformed Chroma server address), each run
through the CLI against a home that holds a memory store and a run. The home's files are hashed
before and after: a refused command writes nothing. Then Ctrl-C (a real SIGINT) and `--verbose`.

The unwritable home is under /sys: tests run as root here, where a chmod does not stop a write,
while sysfs refuses a new directory to root too (EPERM), and to anyone else (EACCES).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from typer.testing import CliRunner

from agent.cli import app
from envs.base import Message, Trajectory
from memory import HashingEmbedding, Memory, Skill
from tests.tiny import build_model

runner = CliRunner()
UNWRITABLE = Path("/sys/kernel/skillfold-test-home")


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_tokenizer) -> SimpleNamespace:
    """A tiny model and a LoRA adapter for it, broken copies of both, a file, and a home to copy."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("bad-inputs")
    model = root / "model"
    build_model(tiny_tokenizer).save_pretrained(model)
    tiny_tokenizer.save_pretrained(model)
    adapter = root / "adapter"
    with warnings.catch_warnings():  # peft asks transformers a deprecated question
        warnings.simplefilter("ignore", FutureWarning)
        lora = get_peft_model(build_model(tiny_tokenizer), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(adapter)

    def broken(source: Path, name: str, damaged: str, text: str | None = None) -> Path:
        copy = root / name
        shutil.copytree(source, copy)
        target = copy / damaged
        if text is None:
            os.truncate(target, target.stat().st_size // 2)
        else:
            target.write_text(text)
        return copy

    a_file = root / "a-file"
    a_file.write_text("not a directory\n")
    home = root / "home"  # what a user's home holds: a memory with a skill and an episode, a run
    memory = Memory.open(home=home, embedding=HashingEmbedding())
    memory.add_skill(Skill(kind="rule", family="toy:1", text="Repeat the asked word exactly."))
    memory.add_trajectory(Trajectory(env="toy:1", item_id="0", split="train", success=True,
                                     prompt=[Message(role="user", content="Say the word: apple")]))
    (home / "runs" / "old-eval").mkdir(parents=True)
    (home / "runs" / "old-eval" / "config.json").write_text("{}\n")
    return SimpleNamespace(
        model=model,
        adapter=adapter,
        model_bad_config=broken(model, "model-bad-config", "config.json", '{"model_type": "llama", '),
        model_truncated=broken(model, "model-truncated", "model.safetensors"),
        adapter_truncated=broken(adapter, "adapter-truncated", "adapter_model.safetensors"),
        adapter_bad_config=broken(adapter, "adapter-bad-config", "adapter_config.json", '{"r": '),
        file=a_file,
        template=home,
    )


@pytest.fixture()
def ctx(files, tmp_path) -> SimpleNamespace:
    home = tmp_path / "home"
    shutil.copytree(files.template, home)
    return SimpleNamespace(**vars(files), home=home, tmp=tmp_path, dead=f"http://127.0.0.1:{free_port()}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def snapshot(path: Path) -> dict[str, str]:
    """Every file under `path` (or `path` itself) by its bytes' SHA-256, directories as such."""
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {
        str(item.relative_to(path)): "dir" if item.is_dir() else hashlib.sha256(item.read_bytes()).hexdigest()
        for item in sorted(path.rglob("*"))
    }


EVAL = ["eval", "--env", "toy", "--items", 2]
RUN = ["run", "--env", "toy", "--episodes", 1]

# id: (arguments from ctx, fragments the message must hold (one of them the fix), environment)
CASES = {
    # ---- paths: files, under a file, unwritable, missing
    "run home is a file": (lambda c: [*RUN, "--model", c.model, "--home", c.file],
                           ["exists but is not a directory", "--home DIR"], {}),
    "run home under a file": (lambda c: [*RUN, "--model", c.model, "--home", c.file / "home"],
                              ["a-file is a file", "--home DIR"], {}),
    "eval home under a file": (lambda c: [*EVAL, "--model", c.model, "--home", c.file / "home"],
                               ["a-file is a file", "--home DIR"], {}),
    "run home unwritable": (lambda c: [*RUN, "--model", c.model, "--home", UNWRITABLE],
                            ["skillfold-test-home", "--home"], {}),
    "eval home unwritable": (lambda c: [*EVAL, "--model", c.model, "--home", UNWRITABLE],
                             ["skillfold-test-home", "--home"], {}),
    "skills home is a file": (lambda c: ["skills", "list", "--home", c.file],
                              ["no skill memory in", "--home"], {}),
    "model cache is a file": (lambda c: [*EVAL, "--home", c.home],
                              ["cannot use the model cache", "$SKILLFOLD_CACHE"], {"SKILLFOLD_CACHE": "file"}),
    "missing model": (lambda c: [*EVAL, "--model", c.tmp / "no-model", "--home", c.home],
                      ["no-model does not exist", "leave --model out"], {}),
    "missing adapter": (lambda c: [*EVAL, "--model", c.model, "--adapter", c.tmp / "no-adapter", "--home", c.home],
                        ["not a PEFT adapter directory", "latest, or none"], {}),
    "missing config": (lambda c: [*EVAL, "--model", c.model, "--home", c.home, "--config", c.tmp / "no.toml"],
                       ["no.toml does not exist", "--config PATH"], {}),
    # ---- corrupt model and adapter files
    "model with a broken config.json": (lambda c: [*EVAL, "--model", c.model_bad_config, "--home", c.home],
                                        ["cannot be loaded", "config.json", "save_pretrained"], {}),
    "model with truncated weights": (lambda c: [*EVAL, "--model", c.model_truncated, "--home", c.home],
                                     ["cannot be loaded", "SafetensorError", "save_pretrained"], {}),
    "adapter with truncated weights": (
        lambda c: [*EVAL, "--model", c.model, "--adapter", c.adapter_truncated, "--home", c.home],
        ["adapter-truncated cannot be read", "--adapter none"], {}),
    "adapter with a broken config": (
        lambda c: [*EVAL, "--model", c.model, "--adapter", c.adapter_bad_config, "--home", c.home],
        ["adapter-bad-config cannot be read", "--adapter none"], {}),
    # ---- malformed configs and overrides
    "config of bad TOML": (lambda c: [*EVAL, "--model", c.model, "--home", c.home,
                                      "--config", write(c.tmp / "bad.toml", "items = [\n")],
                           ["bad.toml is malformed", "fix the syntax"], {}),
    "config with an unknown key": (lambda c: [*EVAL, "--model", c.model, "--home", c.home,
                                              "--config", write(c.tmp / "typo.toml", "itemz = 3\n")],
                                   ["unknown key itemz", "known here: model, envs, items"], {}),
    "override a.b=": (lambda c: [*EVAL, "--model", c.model, "--home", c.home, "a.b="],
                      ["unknown key a", "known here"], {}),
    "override of an unknown key": (lambda c: [*EVAL, "--model", c.model, "--home", c.home, "model.batchsize=4"],
                                   ["unknown key model.batchsize", "batch_size"], {}),
    "override of the wrong type": (lambda c: [*EVAL, "--model", c.model, "--home", c.home, "items=many"],
                                   ["items: Input should be a valid integer", "got 'many'"], {}),
    "override without a key": (lambda c: [*EVAL, "--model", c.model, "--home", c.home, "=3"],
                               ["'=3' is not key=value", "model.batch_size=16"], {}),
    # ---- bad options
    "negative --items": (lambda c: ["eval", "--env", "toy", "--items", -1, "--model", c.model, "--home", c.home],
                         ["items: Input should be greater than or equal to 1", "got -1"], {}),
    "zero --episodes": (lambda c: ["run", "--env", "toy", "--episodes", 0, "--model", c.model, "--home", c.home],
                        ["loop.episodes: Input should be greater than or equal to 1"], {}),
    "more --items than the family has": (
        lambda c: ["eval", "--env", "toy", "--items", 64, "--model", c.model, "--home", c.home],
        ["toy:1 has 16 distinct eval items", "--items 16 or fewer"], {}),
    "unknown --env": (lambda c: ["run", "--env", "nope", "--model", c.model, "--home", c.home],
                      ["unknown environment 'nope'", "available kinds"], {}),
    # ---- a dead or malformed Chroma server address: refused before any model loads
    "run with a dead server": (lambda c: [*RUN, "--model", c.model, "--home", c.home, "--memory-url", c.dead],
                               ["no Chroma server answers at http://127.0.0.1:", "chroma run --path"], {}),
    "skills with a dead server": (lambda c: ["skills", "list", "--home", c.home, "--memory-url", c.dead],
                                  ["no Chroma server answers at http://127.0.0.1:", "chroma run --path"], {}),
    # ---- vLLM engine: a dead server, a wrong engine kind, no server URL
    "run on a dead vLLM server": (lambda c: [*RUN, "--home", c.home, "--engine-url", c.dead],
                                  ["no vLLM server answers at http://127.0.0.1:", "skillfold serve"], {}),
    "an unknown --engine": (lambda c: [*EVAL, "--home", c.home, "--engine", "tgi"],
                            ["--engine takes hf or vllm", "'tgi'"], {}),
    "--engine vllm without a URL": (lambda c: [*EVAL, "--home", c.home, "--engine", "vllm"],
                                    ["needs server URLs", "--engine-url URL", "skillfold serve"], {}),
    "a server url that is not http": (lambda c: [*EVAL, "--model", c.model, "--home", c.home, "--memory-url", "ftp://x"],
                                      ["'ftp://x'", "http://HOST:PORT"], {}),
    "a server url with a bad port": (
        lambda c: [*RUN, "--model", c.model, "--home", c.home, "--memory-url", "http://127.0.0.1:port"],
        ["is not a number", "http://HOST:PORT"], {}),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input(case, ctx):
    arguments, fragments, environment = CASES[case]
    if "unwritable" in case and not UNWRITABLE.parent.is_dir():
        pytest.skip(f"no {UNWRITABLE.parent} here")
    environment = {key: str(ctx.file) if value == "file" else value for key, value in environment.items()}
    watched = [ctx.home, ctx.file]
    before = [snapshot(path) for path in watched]

    result = runner.invoke(app, [str(argument) for argument in arguments(ctx)], env=environment)

    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output and result.stdout == ""
    message = " ".join(result.stderr.split())  # rich wraps long lines
    assert message.startswith("error: ") and message.count("error: ") == 1, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert [snapshot(path) for path in watched] == before, "a refused command changed the home"
    assert not UNWRITABLE.exists()


def test_verbose_shows_the_traceback(ctx):
    result = runner.invoke(app, ["--verbose", *map(str, EVAL), "--model", str(ctx.model_bad_config),
                                 "--home", str(ctx.home)])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "cannot be loaded" in " ".join(result.stderr.split())


def test_ctrl_c_says_interrupted(tmp_path):
    """A real SIGINT while the CLI waits on a server that accepts and never answers: exit 130, 'interrupted'."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        silent.settimeout(60)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        command = [sys.executable, "-m", "agent.cli", "skills", "list", "--home", str(tmp_path), "--memory-url", url]
        # SIGINT at its default in the CLI, as in a terminal: a test run started in the background by a shell
        # without job control (`make test &` in a script) inherits SIGINT ignored, and the CLI rightly keeps that
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   cwd=Path(__file__).resolve().parents[2],
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            connection, _ = silent.accept()  # the CLI is inside its command, asking the server
            process.send_signal(signal.SIGINT)
            stdout, stderr = process.communicate(timeout=30)
            connection.close()
        finally:
            process.kill()
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr and stdout == ""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped interrupt, by design
def test_ctrl_c_dropped_in_a_finalizer_still_interrupts_the_probe(monkeypatch):
    """Python drops a KeyboardInterrupt raised inside ``__del__`` ("Exception ignored"); the garbage collector can
    run one anywhere in the probe's tries. The probe still stops on that Ctrl-C at once, not after its whole wait
    with the server blamed (the load flake of test_ctrl_c_says_interrupted)."""
    from memory import chroma

    class Finalized:
        def __del__(self):  # the signal's handler runs here, and Python drops what it raises
            os.kill(os.getpid(), signal.SIGINT)

    tries = []

    def silent_get(url, timeout):
        tries.append(url)
        Finalized()  # collected at once, its __del__ runs inside this try
        raise httpx.ReadTimeout("the server accepted and said nothing")

    monkeypatch.setattr(chroma.httpx, "get", silent_get)
    monkeypatch.setattr(chroma, "PROBE_TIMEOUT_S", 30.0)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in the CLI (other tests may set one)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        chroma._connect("http://127.0.0.1:9")
    assert len(tries) == 1 and time.monotonic() - started < 5
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the probe's handler is gone
    signal.signal(signal.SIGINT, previous)
