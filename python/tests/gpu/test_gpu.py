"""Runs ep_check.py on 2 GPUs with torchrun (skipped without torch or without 2 GPUs)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA GPUs")
def test_ep_check_two_ranks():
    script = Path(__file__).with_name("ep_check.py")
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0 and "ALL PASSED" in out.stdout, out.stdout + out.stderr
