"""Session fixture around the package's tiny model builders (`validator.generation.tiny_models`)."""

import pytest

from validator.generation.tiny_models import TinyModels, build_tiny_models

__all__ = ["TinyModels", "build_tiny_models", "tiny_models"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """One set of tiny models per test session."""
    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"))
