import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

# The tests live in folders that mirror the repository (core, backends, distributed, examples,
# benchmarks, docs, packaging); the shared helpers (literal transcriptions, strategies, the
# distributed and Triton cases) stay here, and the example and benchmark scripts are imported
# by module name, as they import each other.
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
for folder in (os.path.join(ROOT, "benchmarks"), os.path.join(ROOT, "examples"), TESTS):
    if folder not in sys.path:
        sys.path.insert(0, folder)

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("M3CO_HYPOTHESIS_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    derandomize=True,
)
settings.load_profile("ci")

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(params=["dense", "tiled"])
def backend(request, small_tiles):
    return request.param


@pytest.fixture
def small_tiles():
    """Tiles smaller than the test batches, so that the tiled path streams over several uneven tiles."""
    from m3co_loss import backends

    with backends.config(tile_rows=3, tile_cols=5, tile_square=3):
        yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
