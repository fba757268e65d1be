"""Shared fixtures: the bundled demo, small configs written to tmp dirs."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import settings

# `pytest --hypothesis-profile=long`: a longer fuzzing run for developers (tests/test_fuzz.py).
settings.register_profile("long", max_examples=5000, derandomize=False, deadline=None)

ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     help="also run the tests marked slow (the larger ImageNet architectures: "
                          "about 3 CPU-minutes more, 7 GB peak)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: pytest --run-slow runs it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
EXAMPLES = ROOT / "examples"


@pytest.fixture
def digits_config():
    """A dict config for the digits MLP (paths absolute), to adjust per test."""
    def make(**over):
        cfg = {
            "model": str(EXAMPLES / "digits_mlp.onnx"),
            "output": "out/model.onnx",
            "device": "cpu",
            "data": {"train": {"path": str(EXAMPLES / "digits.npz"), "inputs": {"x": "x_train"},
                               "targets": {"label": "y_train"}},
                     "eval": {"path": str(EXAMPLES / "digits.npz"), "inputs": {"x": "x_test"},
                              "targets": {"label": "y_test"}},
                     "batch_size": 32},
            "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
            "optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9},
            "steps": 20,
            "log": {"every_steps": 1},
        }
        for key, value in over.items():
            node = cfg
            parts = key.split("__")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = value
        return cfg
    return make


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """Every model family of tests/families.py: {name: directory with model.onnx, data.npz}."""
    from tests.families import build_zoo
    return build_zoo(tmp_path_factory)
