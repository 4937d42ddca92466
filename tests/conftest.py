"""Shared fixtures: generated Fashion-MNIST-format data and a real local SuperLink."""

import os
import shutil
import tempfile
from pathlib import Path

# The Hub is out of reach here; say so before `datasets` is imported, and give it an
# empty cache so that no copy left on this machine answers for the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
HF_HOME = tempfile.mkdtemp(prefix="pytorch-example-hf-")
os.environ["HF_HOME"] = HF_HOME

import pytest  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from harness.flower_processes import LocalFederation, copy_app  # noqa: E402
from harness.synthetic_fmnist import write_idx_dataset  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(HF_HOME, ignore_errors=True)


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch):
    """What Flower sets in a ServerApp process before a strategy creates messages."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture(scope="session")
def idx_dataset(tmp_path_factory) -> Path:
    """A small data set in the four Zalando .gz files."""
    return write_idx_dataset(tmp_path_factory.mktemp("fmnist-idx"), num_train=3000, num_test=1000)


@pytest.fixture
def base_run_config(idx_dataset, tmp_path) -> dict:
    """What every end-to-end run sets: the generated data, its own cache and outputs
    under `tmp_path`, and W&B off."""
    return {
        "dataset-path": str(idx_dataset),
        "data-cache-dir": str(tmp_path / "cache"),
        "output-dir": str(tmp_path / "outputs"),
        "use-wandb": False,
    }


@pytest.fixture(scope="session")
def superlink(tmp_path_factory):
    """A SuperLink with the Simulation Engine, shared by the simulation tests."""
    federation = LocalFederation(tmp_path_factory.mktemp("simulation"))
    yield federation
    federation.stop()


@pytest.fixture(scope="session")
def app_dir(tmp_path_factory) -> Path:
    return copy_app(tmp_path_factory.mktemp("app") / "pytorch-example")
