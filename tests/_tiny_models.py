"""Fixtures around the package's tiny model builders (`validator.generation.tiny_models`): the models once per
session, and one torch thread while a module runs them."""

import pytest
import torch

from validator.generation.tiny_models import TinyModels, build_tiny_models

__all__ = ["TinyModels", "build_tiny_models", "one_torch_thread", "tiny_models"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """One set of tiny models per test session."""
    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models run fastest single-threaded; several threads fight over a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
