"""The examples and notebooks run against the session's runtime (short generations)."""

import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py"))
NOTEBOOKS = sorted(p.name for p in EXAMPLES.glob("*.ipynb"))
EXPECT = {"quickstart.py": "Paris", "few_shot_qa.py": "cached", "chat.py": "assistant",
          "select_classifier.py": "positive", "streaming.py": "async:",
          "fork_skeleton_of_thought.py": "summary:"}


@pytest.fixture
def example_env(runtime_process, monkeypatch):
    monkeypatch.setenv("SGLITE_RUNTIME_ADDRESS", runtime_process.address)
    monkeypatch.setenv("SGLITE_EXAMPLE_MAX_TOKENS", "8")
    root = str(EXAMPLES.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    return dict(os.environ)


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_script(script, example_env):
    assert script in EXPECT, f"add an expected output line for {script}"
    if script == "quickstart.py":  # the demo prints a real answer: give it room to say Paris
        example_env["SGLITE_EXAMPLE_MAX_TOKENS"] = "16"
    proc = subprocess.run([sys.executable, str(EXAMPLES / script)], env=example_env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert EXPECT[script] in proc.stdout, proc.stdout


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_notebook(notebook, example_env):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(EXAMPLES / notebook, as_version=4)
    NotebookClient(nb, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(EXAMPLES)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any(o.get("output_type") == "stream" for o in outputs)
