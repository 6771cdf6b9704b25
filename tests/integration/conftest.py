import pytest


@pytest.fixture(scope="session")
def default_engine():
    """The real embedded default model (pulled by `make test` before the tests run)."""
    from engines.hf import HFEngine

    return HFEngine.load(batch_size=8)
