"""Shared fixtures. Environment first: nothing may reach outside 127.0.0.1, and no dev-run state
(Prefect database, result storage, HF cache) may leak into tests."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_TMP = Path(tempfile.mkdtemp(prefix="kdflow-tests-"))
os.environ.update(
    DO_NOT_TRACK="1",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW="ignore",
    PREFECT_HOME=str(_TMP / "prefect-home"),
    PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(_TMP / "prefect-results"),
    HF_HUB_DISABLE_TELEMETRY="1",
    HF_HUB_DISABLE_XET="1",
    HF_HOME=str(_TMP / "hf-home"),
    TOKENIZERS_PARALLELISM="false",
)
# No test-only speed-ups: the OpenMP wait policy the tests run with is the product's own default,
# set by `import kd` (kd/__init__.py) before anything loads torch, as for every user entry point.
import kd  # noqa: E402,F401
# Configure Prefect's logging now, against the session's streams: configured lazily inside a
# test using capsys, its console handler would keep writing to a closed capture stream.
from prefect.logging.configuration import setup_logging  # noqa: E402

setup_logging()

# Property tests draw the same examples on every run (derandomize): a red CI must mean the code changed,
# not that this run's random draw found an example earlier runs never tried. Explore new examples
# locally with a profile of your own (hypothesis settings.register_profile).
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("kdflow", derandomize=True, deadline=None, database=None)
_hypothesis_settings.load_profile("kdflow")

# The tiny models are deterministic and take ~15 s to make: share one copy across test runs.
os.environ.setdefault("KDFLOW_HOME", str(REPO / ".kdflow"))


@pytest.fixture(scope="session")
def tiny_pair() -> tuple[Path, Path]:
    """(teacher_dir, student_dir) of the deterministic tiny models."""
    from kd.tiny import ensure_tiny

    return ensure_tiny()


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect server (SQLite, random 127.0.0.1 port) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):  # a busy 2-core machine can take minutes
        yield


# For a test whose subject is not learning (orchestration, lineage, caching, artifacts, sweeps): the KL gate
# asks whether a few steps lowered held-out KL, which they do by ~1.5% (bench/results/gate_margins-*.json),
# a margin another CPU's rounding or a changed step count can flip. Such a test must not pass or fail on it
# (issue 26.2); the tests that are about learning keep it on, with margins measured under several CPU paths.
NOT_ABOUT_LEARNING = ["eval.require_kl_improvement=false"]


def smoke_overrides(tmp: Path, steps: int = 8) -> list[str]:
    """A quick smoke config writing into `tmp`, for tests whose subject is not learning (see NOT_ABOUT_LEARNING)."""
    return [f"evidence_dir={tmp / 'evidence'}", f"work_dir={tmp / 'runs'}", f"train.steps={steps}",
            "train.checkpoint_every=3", "train.warmup_steps=1", "train.lr=1e-3", *NOT_ABOUT_LEARNING]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A loopback hub server (tests/hubserver.py) that huggingface_hub and transformers talk to.

    huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE / the cache path into `constants` at import,
    so those are patched there as well as in the environment. Each test gets an empty HF cache,
    no HF_TOKEN, and fast kd.hubclient retries.
    """
    import sys

    from huggingface_hub import constants

    import kd.hubclient

    if str(Path(__file__).parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).parent))
    from hubserver import HubServer

    server = HubServer().start()
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))
    monkeypatch.setattr(kd.hubclient, "RETRY_BASE_DELAY_S", 0.01)
    try:
        yield server
    finally:
        server.stop()
