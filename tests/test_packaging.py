"""What `flwr run` ships to a SuperLink: the app package, never outputs or secrets."""

import shutil
import subprocess
import zipfile

from harness.flower_processes import REPO, VENV_BIN


def test_the_fab_holds_the_app_package_only(tmp_path):
    project = tmp_path / "project"
    shutil.copytree(
        REPO, project, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "*.fab")
    )
    # What a user's folder accumulates: runs, W&B files, a credentials file, a cache.
    (project / "outputs" / "2026-01-01" / "10-00-00").mkdir(parents=True)
    (project / "outputs" / "2026-01-01" / "10-00-00" / "results.json").write_text("[]")
    (project / "wandb").mkdir()
    (project / "wandb" / "settings.yaml").write_text("api_key: secret")
    (project / "credentials.json").write_text('{"token": "secret"}')
    (project / ".cache").mkdir()
    (project / ".cache" / "partitions.json").write_text("{}")

    built = subprocess.run(
        [str(VENV_BIN / "flwr"), "build", "--app", str(project)],
        cwd=tmp_path,
        env={"PATH": str(VENV_BIN), "FLWR_HOME": str(tmp_path / "flwr-home"), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    [fab] = list(tmp_path.glob("*.fab")) or list(project.glob("*.fab"))
    names = set(zipfile.ZipFile(fab).namelist()) - {".info/CONTENT", "pyproject.toml"}
    app_files = {f"pytorch_example/{path.name}" for path in (REPO / "pytorch_example").glob("*.py")}
    assert names == app_files


def test_readme_reads_in_one_sitting():
    """README is the first hour's guide; the depth lives in docs/."""
    assert len((REPO / "README.md").read_text().splitlines()) <= 250


def test_every_torch_load_refuses_pickled_code():
    """A run folder, a head or a checkpoint is read with `weights_only=True` everywhere,
    benchmarks and tests included: a crafted file runs no code."""
    loads = [
        f"{path.relative_to(REPO)}:{number}"
        for folder in ("pytorch_example", "harness", "benchmarks", "deploy", "tests")
        for path in sorted((REPO / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if "torch.load(" in line and "weights_only=True" not in line
    ]
    assert loads == []
