"""Shared fixtures: the tiny model built once per session, a CLI runner, random deltas."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# No test touches the network, and caches stay out of the user's home.
os.environ.setdefault("CDTOOL_CACHE", tempfile.mkdtemp(prefix="cdtool-test-cache-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
from helpers import Cli, random_delta, write_concept_folder

from cdtool.delta.file import Delta


@pytest.fixture(scope="session")
def tiny_pipe():
    """The built-in tiny pipeline; tests must not modify it (use `fresh_tiny` for that)."""
    from cdtool.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline()


@pytest.fixture
def fresh_tiny():
    from cdtool.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tiny_pipe) -> Path:
    """The tiny pipeline saved as a diffusers folder."""
    path = tmp_path_factory.mktemp("models") / "tiny-sd"
    tiny_pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_xl_pipe():
    """The built-in tiny SDXL pipeline; tests must not modify it."""
    from cdtool.models.tiny import build_tiny_xl_pipeline

    return build_tiny_xl_pipeline()


@pytest.fixture(scope="session")
def tiny_sd2_pipe():
    """The built-in tiny SD 2.x pipeline; tests must not modify it."""
    from cdtool.models.tiny import build_tiny_sd2_pipeline

    return build_tiny_sd2_pipeline()


@pytest.fixture(scope="session")
def tiny_xl_folder(tmp_path_factory, tiny_xl_pipe) -> Path:
    """The tiny SDXL pipeline saved as a diffusers folder."""
    path = tmp_path_factory.mktemp("models") / "tiny-xl"
    tiny_xl_pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture
def make_delta(tiny_pipe):
    def make(**kw) -> Delta:
        return random_delta(tiny_pipe, **kw)

    return make


@pytest.fixture
def make_xl_delta(tiny_xl_pipe):
    def make(**kw) -> Delta:
        return random_delta(tiny_xl_pipe, **kw)

    return make


@pytest.fixture
def cli() -> Cli:
    return Cli()


@pytest.fixture
def concept_dirs(tmp_path):
    """(cat folder, regularisation folder) on disk."""
    return (
        write_concept_folder(tmp_path / "cat"),
        write_concept_folder(tmp_path / "reg", n=5, size=64, colour=(40, 90, 200), captions="photo of a cat, view {i}"),
    )
