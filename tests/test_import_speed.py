"""`import kvsplice` and building the CLI parser (what `kvsplice --help` does) must stay light: no
torch, transformers, hqq, quanto or dynamo at import time. Checked in a fresh interpreter (this test
process has torch loaded already); no timing assertion: the modules loaded are what makes it slow."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "hqq", "optimum", "torch._dynamo", "safetensors", "numpy", "huggingface_hub")


def _loaded_after(code: str) -> list[str]:
    probe = code + f"\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "code",
    [
        "import kvsplice",
        "import kvsplice.cli; kvsplice.cli.build_parser()",  # every verb's add_parser, as `kvsplice --help`
        "import kvsplice.cli, contextlib, io\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: kvsplice.cli.main(['--help'])\n"
        "    except SystemExit: pass",
    ],
    ids=["import", "build_parser", "help"],
)
def test_no_heavy_imports(code: str) -> None:
    assert _loaded_after(code) == []


def test_every_verb_help_is_light() -> None:
    """`kvsplice <verb> --help` for each verb: still no torch."""
    from kvsplice.cli import build_parser

    verbs = sorted(build_parser()._subparsers._group_actions[0].choices)
    assert "calibrate" in verbs and "generate" in verbs
    for verb in verbs:
        code = (
            "import kvsplice.cli, contextlib, io\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    try: kvsplice.cli.main([{verb!r}, '--help'])\n"
            "    except SystemExit: pass"
        )
        assert _loaded_after(code) == [], verb


@pytest.mark.parametrize("backend, module", [("quanto", "optimum.quanto"), ("hqq", "hqq")])
def test_missing_peer_backend_names_the_extra(backend, module, monkeypatch, tiny_llama):
    """optimum-quanto / hqq are the optional extra [peers]: without them, one line naming it."""
    import importlib.util

    from kvsplice.peers.base import PeerError
    from kvsplice.peers.hf_quantized import HFQuantized

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **kw: None if name == module else real(name, *a, **kw))
    with pytest.raises(PeerError, match=r"kvsplice\[peers\]") as e:
        HFQuantized(backend=backend, bits=4).cache_factory(tiny_llama[0])
    assert "\n" not in str(e.value)


def test_longctx_task_names_match_the_evaluator():
    """commands/longctx.py keeps its own copy of the task names (to stay torch-free): same tuple."""
    from kvsplice.commands.longctx import TASKS as cli_tasks
    from kvsplice.evaluate.longctx import TASKS

    assert cli_tasks == TASKS
