"""`pip install arcvit` carries what train/eval/predict/merge/demo need: a command that needs an extra names it in
one line, a plot without matplotlib is skipped with one warning, and `--help` needs no extra at all."""
from __future__ import annotations

import subprocess
import sys

import pytest

from arcvit.cli import main
from arcvit.errors import MissingExtraWarning

# The import names of every extra's packages (pyproject.toml's optional-dependencies).
EXTRA_MODULES = ("peft", "matplotlib", "fastapi", "uvicorn", "prometheus_client", "onnx", "onnxscript", "onnxruntime",
                 "optuna", "ray", "tensorflow_datasets", "transformers", "psycopg")


def _hide(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError


def test_lora_without_peft_names_the_extra(train_argv, tmp_path, capsys, monkeypatch):
    _hide(monkeypatch, "peft")
    code = main(train_argv(tmp_path / "run", "--method", "lora"))
    assert (code, capsys.readouterr().err) == (
        1, "arcvit train: error: lora needs the 'peft' extra: pip install 'arcvit[peft]'\n")


def test_serve_without_the_serve_extra_names_it(tmp_path, capsys, monkeypatch):
    _hide(monkeypatch, "fastapi")
    code = main(["serve", "--adapters", str(tmp_path)])
    assert (code, capsys.readouterr().err) == (
        1, "arcvit serve: error: the HTTP server needs the 'serve' extra: pip install 'arcvit[serve]'\n")


def test_tfds_source_without_the_extra_names_it(tmp_path, capsys, monkeypatch):
    _hide(monkeypatch, "tensorflow_datasets")
    code = main(["data", "prepare", "vtab1k", "--tasks", "dtd", "--source", "tfds", "--out", str(tmp_path / "d"),
                 "--quiet"])
    err = capsys.readouterr().err
    assert (code, err) == (1, "arcvit data: error: --source tfds needs the 'tfds' extra: "
                              "pip install 'arcvit[tfds]'\n"), err


def test_plot_without_matplotlib_is_skipped_with_one_warning(tmp_path, monkeypatch):
    from arcvit.bench.plots import plot_accuracy_vs_params
    from arcvit.training.tune_outputs import write_plots
    _hide(monkeypatch, "matplotlib")
    with pytest.warns(MissingExtraWarning, match=r"^skipped a\.png, which needs the 'plots' extra: "
                                                 r"pip install 'arcvit\[plots\]'$"):
        assert plot_accuracy_vs_params([("arc", 1e4, 80.0, 0.0)], tmp_path / "a.png", "t") is None
    with pytest.warns(MissingExtraWarning, match=r"^skipped the search's plots, which needs the 'plots' extra"):
        assert write_plots(study=None, out=tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_help_needs_no_extra():
    """Every command's --help with all extras' packages hidden: the parser imports none of them."""
    code = (f"import sys\nfor m in {EXTRA_MODULES!r}: sys.modules[m] = None\nfrom arcvit.cli import main\n"
            "for argv in (['--help'], ['train', '--help'], ['demo', '--help'], ['serve', '--help'], "
            "['export', '--help'], ['bench', '--help'], ['tune', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, (argv, e.code)\n"
            "print('ALL HELP OK')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.rstrip().endswith("ALL HELP OK") and out.returncode == 0, out.stderr[-2000:]
