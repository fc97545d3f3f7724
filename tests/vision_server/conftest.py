"""Vision-side fixtures: in-process VisionWorkers on the tiny model and its Flash variant."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.config import DvDConfig, load_config
from tests.conftest import TINY_CONFIG


def vision_config(**overrides: Any) -> DvDConfig:
    """configs/tiny.yaml in float32 with the feature cache off, plus dotted-key overrides."""
    base = {"vision.dtype": "float32", "vision.feature_cache_bytes": 0, "vision.preprocess_workers": 2}
    return load_config(TINY_CONFIG, {**base, **overrides})


@pytest.fixture(scope="session")
def worker(tiny_dirs):
    from vision_server.worker import VisionWorker

    worker = VisionWorker(vision_config())
    yield worker
    worker.close()


@pytest.fixture(scope="session")
def flash_dir(tiny_dirs):
    from pipeline.model.tiny_model import tiny_model_dir

    return tiny_model_dir("flash")


@pytest.fixture(scope="session")
def flash_worker(flash_dir):
    from vision_server.worker import VisionWorker

    worker = VisionWorker(vision_config(**{"model.path": str(flash_dir)}))
    yield worker
    worker.close()
