"""DDP: one all-reduce per iteration, and the same gradients as one process."""
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def test_two_process_gloo_matches_single_process(tmp_path):
    out = str(tmp_path / "ddp.pt")
    subprocess.run([sys.executable, os.path.join(HERE, "ddp_gradaug_check.py"), out], check=True, timeout=600)
    results = torch.load(out)
    for sampling in ("width", "depth"):
        r = results[sampling]
        # float64 model; the soft labels are float32 (ClassificationTask), and a 1-ulp flip of a
        # float32 probability (6e-8 relative) moves a gradient by about that much of its size
        scale = max(1.0, max(r["ref"][n].abs().max().item() for n in r["ref"]))
        worst = max((r["ddp"][n] - r["ref"][n]).abs().max().item() for n in r["ref"])
        assert worst < 1e-6 * scale, f"{sampling}: DDP gradients differ from one process by {worst}"
        # 1 full pass + 3 sub-networks: gradients are reduced only in the last backward
        passes = r["allreduce_per_pass"]
        assert len(passes) == 4 and passes[:3] == [0, 0, 0] and passes[3] >= 1, passes
