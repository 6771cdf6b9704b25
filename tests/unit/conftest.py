import pytest
import torch

from tests.tiny import build_model, build_tokenizer

# Tiny models run fastest on one thread; more threads only contend on a busy 2-core machine.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run only where there is a CUDA device (benchmarks/gpu_check.py runs them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    return build_model(tiny_tokenizer)


@pytest.fixture()
def tiny_engine(tiny_model, tiny_tokenizer):
    from engines.hf import HFEngine

    return HFEngine(tiny_model, tiny_tokenizer, model_name="tiny", batch_size=4)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tiny_tokenizer) -> str:
    """The tiny model and tokenizer saved as a model directory (what `--model DIR` takes)."""
    path = tmp_path_factory.mktemp("tiny-model")
    build_model(tiny_tokenizer).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)
