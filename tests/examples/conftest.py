"""Fixtures of the image-text tests: generated datasets in the released layouts, tiny encoders."""

from __future__ import annotations

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

from training.imagetext import smoke  # noqa: E402


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    pytest.importorskip("transformers")
    return smoke.make_tiny_encoders(tmp_path_factory.mktemp("encoders"))


@pytest.fixture
def food(tmp_path):
    return smoke.make_food101(tmp_path / "food101", per_class={"train": 5, "test": 3})


@pytest.fixture
def news(tmp_path):
    return smoke.make_n24news(tmp_path / "n24news", per_class={"train": 5, "dev": 2, "test": 3})
