"""fused_optim under torch.distributed on the real engine: 2 processes, gloo, CPU, started by
the test itself and bounded in time. The scenarios and their comparisons are in
distributed_worker.py."""
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch build has no torch.distributed with gloo")


@pytest.mark.parametrize("scenario", ["ddp", "zero", "fsdp2", "fsdp2_clip", "dcp", "ddp_low_precision",
                                      "fsdp2_state_dtype", "fsdp2_8bit", "fsdp2_modes",
                                      "fsdp2_whole_params"])
def test_distributed(scenario):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*filter(None, sys.path), ROOT]))
    out = subprocess.run([sys.executable, os.path.join(HERE, "distributed_worker.py"), scenario],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-6000:]
    assert out.stdout.strip().endswith(f"{scenario}: OK")
