"""Multi-process (gloo) training runs the GradAug step, reduces once, matches one process."""
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def test_two_process_gloo_runs_gradaug_step(tmp_path, shapes_root):
    subprocess.run([sys.executable, os.path.join(HERE, "ddp_mmdet_check.py"), str(tmp_path), str(shapes_root)],
                   check=True, timeout=900)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in ("soft_width", "gt_depth"):
        a, b = ranks[0][name], ranks[1][name]
        # the GradAug step ran: full network, then 3 sub-networks, identical draws on both workers
        assert len(a["passes"]) == 4 and a["passes"][0][0] == 1.0, a["passes"]
        assert [p[0] for p in a["passes"]] == [p[0] for p in b["passes"]]
        if name == "soft_width":
            assert a["passes"][-1][0] == 0.9 and all(0.9 <= p[0] < 1.0 for p in a["passes"][1:])
        assert all(p[1] <= a["passes"][0][1] and p[2] <= a["passes"][0][2] for p in a["passes"][1:])
        assert a["find_unused"] is True
        # gradients are all-reduced once per iteration, after the last pass
        assert a["reduces"][:3] == [0, 0, 0] and a["reduces"][3] >= 1, a["reduces"]
        # and equal the mean of each worker's own GradAug iteration
        for n, ref in a["ref"].items():
            torch.testing.assert_close(a["grads"][n], ref, rtol=1e-4, atol=1e-6, msg=f"{name}: {n}")
            torch.testing.assert_close(b["grads"][n], a["grads"][n], rtol=0, atol=0)
    for r in ranks:
        assert r["stock_error"] is not None and "GradAugDistributedDataParallel" in r["stock_error"]
