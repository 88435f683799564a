"""The README's commands, run as written from a directory laid out like a fresh clone (only quickening flags
appended), and `artnet demo` as `make demo` runs it. Each command starts its own local Ray, so this module runs
in the separate `cluster` pytest process."""

import os
import re
import shlex
import subprocess

import pytest

from conftest import REPO, SHARED, requires_paintings, requires_weights

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

# Appended to the README's commands so they finish in about a minute on 2 cores (later flags win).
QUICK = {"train": ["--image-size", "64", "--head-epochs", "1", "--finetune-epochs", "1"], "preview": ["--batches", "1"],
         "tune": ["--image-size", "64", "--samples", "2", "--search-epochs", "2", "--views", "1",
                  "--finetune-epochs", "1"],
         "analyze": ["--image-size", "64", "--folds", "2", "--search-epochs", "3"]}
# Lines that are Ray's, TensorFlow's or MLflow's internals: the console must not show them.
INTERNALS = ("Execution plan", "RayTrainWorker", "Reporting training result", "Checkpoint successfully created",
             "oneDNN", "cuda", "INFO mlflow", "Starting execution of Dataset", "Token authentication", "logging.cc")


def readme_commands(section: str) -> list[str]:
    """The shell commands of a README section's ```bash blocks, continuation lines joined, comments dropped."""
    text = (REPO / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", body, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def run_shell(command: str, cwd, env=None) -> subprocess.CompletedProcess:
    out = subprocess.run(["bash", "-c", command], cwd=cwd, env=env or os.environ.copy(), capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, f"{command}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def assert_readable(console: str) -> None:
    shown = [line for line in console.splitlines() if any(noise in line for noise in INTERNALS)]
    assert not shown, shown[:5]


@pytest.fixture
def fresh_clone(tmp_path):
    """<tmp>/clone with the installed .venv, and <tmp>/shared beside it: what `../shared` means in a clone.
    It is not the repository root, so the commands' relative paths are resolved elsewhere than in the repo."""
    clone = tmp_path / "clone"
    clone.mkdir()
    (clone / ".venv").symlink_to(REPO / ".venv")
    (tmp_path / "shared").symlink_to(SHARED)
    return clone


def test_readme_section_is_found():
    commands = readme_commands("Real paintings")
    assert [shlex.split(c)[1] for c in commands] == ["catalog", "preview", "train", "tune", "analyze", "promote",
                                                     "predict", "predict"]


@requires_paintings
@requires_weights
def test_real_paintings_commands_run_as_written(fresh_clone):
    for command in readme_commands("Real paintings"):
        words = shlex.split(command)
        out = run_shell(shlex.join(words + QUICK.get(words[1], [])), fresh_clone)
        if words[1] == "train":
            assert "epoch 2/2 [phase 2]" in out.stdout and "test accuracy" in out.stdout
            assert_readable(out.stdout + out.stderr)
            run_dir = fresh_clone / "work" / "ray_results" / words[words.index("--name") + 1]
            assert list(run_dir.glob("checkpoint_*")), "checkpoints where the README says (relative to the clone)"
        if words[1] == "tune":
            assert "| 3 |" in out.stdout and "summary:" in out.stdout
            assert_readable(out.stdout + out.stderr)
        if words[1] == "analyze":
            assert "cross-validated over" in out.stdout
        if words[1] == "promote":
            assert "is now champion (first champion)" in out.stdout
        if words[1] == "predict" and "--out" not in words:
            assert "Vincent_van_Gogh_1.jpg" in out.stdout and "1 answered" in out.stdout
        if words[1] == "predict" and "--out" in words:  # a painter the model never saw: some flagged unknown
            assert re.search(r"(\d+) images: \1 answered \([1-9]\d* unknown painter\), 0 unreadable", out.stdout), out.stdout
            assert_readable(out.stdout + out.stderr)
    assert (fresh_clone / "work" / "wikiart3" / "samples.png").exists()
    assert (fresh_clone / "work" / "ray_results" / "search3" / "summary.md").exists()
    assert (fresh_clone / "work" / "wikiart3" / "analysis" / "confusion_matrix.png").exists()
    assert list((fresh_clone / "work" / "predictions" / "sisley").glob("*.parquet"))


def test_demo_on_the_synthetic_set_names_its_painters(tmp_path):
    env = {**os.environ, "ARTNET_DATA": "", "ARTNET_WEIGHTS": ""}
    out = run_shell(f"{REPO / '.venv' / 'bin' / 'artnet'} demo --workdir demo", tmp_path, env)
    assert "synthetic demo set" in out.stdout and "test accuracy" in out.stdout
    predictions = out.stdout.split("a few test paintings", 1)[1].splitlines()[1:]
    assert len(predictions) == 6 and all(" -> " in line for line in predictions), predictions
    assert_readable(out.stdout + out.stderr)


def test_every_guarantee_names_a_test_that_exists():
    body = (REPO / "README.md").read_text().split("## Guarantees\n", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?", body)
    assert len(named) >= 10
    for path, test in named:
        text = (REPO / path).read_text()
        assert not test or f"def {test}(" in text, f"{path}::{test} is named in the README but does not exist"
