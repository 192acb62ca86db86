"""The documentation stays true: generated pages current, versions agreeing, examples that run, and no words
about how the project is developed."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "docs"))
import generate  # noqa: E402  (docs/generate.py)

# Words about how the project is made, which users have no use for. "session" alone is onnxruntime's
# InferenceSession in the code, so it is matched as a word outside that name.
PROCESS_WORDS = re.compile(r"(?<![A-Za-z])session(?!\w)|this machine|device time|earlier machine|development "
                           r"machine|lent to", re.IGNORECASE)
TEXT_FILES = ["README.md", "CHANGELOG.md", "mkdocs.yml", "docs/**/*.md", "docs/*.py", "src/**/*.py",
              "examples/*.py", "examples/*.ipynb", "benchmarks/*.py", "benchmarks/*.sh"]


def test_no_development_process_words_in_readme_docs_or_code():
    found = []
    for pattern in TEXT_FILES:
        for path in ROOT.glob(pattern):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if PROCESS_WORDS.search(line.replace("InferenceSession", "")):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_process_word_check_sees_them():
    assert PROCESS_WORDS.search("measured in a later session")
    assert PROCESS_WORDS.search("15 minutes of device time")
    assert not PROCESS_WORDS.search("ort.InferenceSession(path)".replace("InferenceSession", ""))


def test_readme_is_one_screen_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "pip install -e . && moderncnn train" in readme
    assert "pip install -e '.[dev,export]' && python -m pytest -q" in readme
    for page in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / page).is_file(), page


def test_every_docs_page_is_in_the_nav_and_every_nav_page_exists():
    nav = re.findall(r":\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.MULTILINE)
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert sorted(nav) == pages


def test_generated_cli_reference_and_changelog_are_current():
    # The models table (a forward pass of every model) is checked by `python docs/generate.py --check` in CI.
    assert (ROOT / "docs" / "cli.md").read_text() == generate.cli_reference()
    assert (ROOT / "docs" / "changelog.md").read_text() == (ROOT / "CHANGELOG.md").read_text()


def test_generate_check_reports_a_stale_page(tmp_path, monkeypatch, capsys):
    for name in ("models.md", "cli.md", "changelog.md", "training.md"):
        (tmp_path / name).write_text((ROOT / "docs" / name).read_text())
    (tmp_path.parent / "CHANGELOG.md").write_text((ROOT / "CHANGELOG.md").read_text())
    (tmp_path / "cli.md").write_text("# an old reference\n")
    monkeypatch.setattr(generate, "DOCS", tmp_path)
    monkeypatch.setattr(generate, "models_table", lambda: (ROOT / "docs" / "models.md").read_text()
                        .split(generate.BEGIN)[1].split(generate.END)[0].lstrip("\n"))
    assert generate.main(["--check"]) == 1
    out = capsys.readouterr().out
    assert "-# an old reference" in out and "+# Command-line reference" in out
    assert generate.main([]) == 0 and generate.main(["--check"]) == 0


def test_version_agrees_with_changelog_and_pyproject():
    import moderncnn
    changelog = re.search(r"^## \[(\d+\.\d+\.\d+)\]", (ROOT / "CHANGELOG.md").read_text(), re.MULTILINE).group(1)
    pyproject = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    cli = subprocess.run([sys.executable, "-m", "moderncnn", "--version"], capture_output=True, text=True)
    assert moderncnn.__version__ == changelog == pyproject
    assert cli.stdout.strip() == f"moderncnn {changelog}"


def test_adding_a_model_worked_example_runs():
    page = (ROOT / "docs" / "adding-a-model.md").read_text()
    code = re.search(r"```python\n(.*?)```", page, re.DOTALL).group(1)
    code += "\nresult = moderncnn.train(model='lenet', epochs=1, subset=64, batch_size=32, progress=False, " \
            "dataset='mnist', data_dir=DATA, out=OUT, name='run')\nprint('trained', result.final_acc)\n"
    done = subprocess.run([sys.executable, "-c", _with_data(code)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "(1, 12, 12)" in done.stdout and "torch.Size([2, 10])" in done.stdout and "trained" in done.stdout


def _with_data(code: str) -> str:
    """The worked example, preceded by a tiny MNIST-format dataset in a temporary directory."""
    return ("import sys, tempfile, pathlib\n"
            f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
            "from helpers import make_mnist\n"
            "TMP = pathlib.Path(tempfile.mkdtemp())\n"
            "make_mnist(TMP / 'data', n_train=64, n_test=32)\n"
            "DATA, OUT = str(TMP / 'data'), str(TMP / 'runs')\n" + code)


@pytest.mark.slow
def test_densenet_notebook_runs_on_a_subset(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import make_mnist
    make_mnist(tmp_path / "data", n_train=300, n_test=100, learnable=True)
    notebook = nbformat.read(ROOT / "examples" / "densenet_fashion_mnist.ipynb", as_version=4)
    parameters = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    parameters.source += (f"\nEPOCHS = 1\nSUBSET = 300\nDATA_DIR = {str(tmp_path / 'data')!r}\n"
                          f"OUT = {str(tmp_path / 'runs')!r}\n")
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    assert "transition" in text.lower() or "denseblock" in text.lower()  # the block-by-block summary
    assert "test accuracy" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3  # live curves, predictions, confusion


@pytest.mark.slow
def test_finetune_folder_example_runs(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "finetune_folder.py"), "--work", str(tmp_path),
                           "--epochs", "1"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "$ moderncnn train" in done.stdout and "$ moderncnn predict" in done.stdout
    assert re.search(r"test/(red|blue)/\d+\.jpg: (red|blue) [01]\.\d{4}", done.stdout)
    assert (tmp_path / "runs" / "finetuned" / "report.md").is_file()
