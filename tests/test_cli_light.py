"""`arcvit --help` loads no torch, timm or numpy: the package's API and each command's parser are imported only
when used, and arcvit's backends still register the moment their library is imported (issue 29)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from arcvit.cli import COMMANDS, build_parser

HEAVY = ("torch", "timm", "numpy", "lightning_fabric", "PIL", "safetensors", "transformers", "peft")


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_help_imports_nothing_heavy():
    out = _python("import sys\nfrom arcvit.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
                  f"print('LOADED', sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert out.splitlines()[-1] == "LOADED []"
    for command, (_, _, text) in COMMANDS.items():
        assert command in out and text.split()[0] in out


def test_import_arcvit_defers_torch_and_registers_timm_when_timm_arrives():
    out = _python("import sys\nimport arcvit\nprint('TORCH', 'torch' in sys.modules)\n"
                  "import timm\nfrom arcvit.core.specs import block_spec_for\n"
                  "model = timm.create_model('vit_pico_patch7_28', num_classes=3)\n"
                  "print('SPEC', block_spec_for(model.blocks[0]).name, arcvit.apply_arc.__module__)")
    assert out.splitlines() == ["TORCH False", "SPEC timm.vit arcvit.core.arc"]


def test_timm_imported_before_arcvit_is_registered_at_once():
    out = _python("import timm\nimport arcvit\nfrom arcvit.core.specs import block_spec_for\n"
                  "print(block_spec_for(timm.create_model('vit_pico_patch7_28').blocks[0]).name)")
    assert out.strip() == "timm.vit"


def test_a_command_builds_its_own_parser_only():
    sub = next(a for a in build_parser("report")._actions if a.dest == "command")
    assert [a.dest for a in sub.choices["report"]._actions][1:] == ["dir", "suite", "force", "allow_mixed_data"]
    assert [a.dest for a in sub.choices["train"]._actions] == ["help"]  # a help line, no options built
    assert list(sub.choices) == list(COMMANDS)


@pytest.mark.parametrize("name", ["nope", "__version__x"])
def test_the_lazy_api_names_what_is_missing(name):
    import arcvit
    with pytest.raises(AttributeError, match=f"module 'arcvit' has no attribute '{name}'"):
        getattr(arcvit, name)
