"""The package imports with neither torch nor a GPU, and does not load torch by itself."""
import os
import subprocess
import sys

from conftest import REPO


def test_import_does_not_pull_torch():
    code = ("import sys, nccl_moe; "
            "assert 'torch' not in sys.modules, 'nccl_moe imported torch'; "
            "assert nccl_moe.HEADER_VERSION == 100; print('ok')")
    env = dict(os.environ, PYTHONPATH=str(REPO / "python"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_missing_library_names_the_remedy(monkeypatch, tmp_path):
    from nccl_moe import _library
    monkeypatch.setenv(_library.ENV_VAR, str(tmp_path / "nope.so"))
    monkeypatch.setattr(_library, "_loaded", None)
    try:
        _library.load()
    except _library.LibraryNotFoundError as e:
        assert "make python" in str(e) and "nope.so (missing)" in str(e)
    else:
        raise AssertionError("loading a missing library did not fail")
