"""BN calibration with SyncBN on two CPU workers (gloo): the calibrated statistics are those
of the union of both workers' batches, on every worker (hand computation, float64); a layer
that gets no sample on one worker takes the other's."""
import json
import os
import subprocess
import sys
import textwrap

WORKER = textwrap.dedent(
    '''
    import json, os, sys
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn

    rank, init_file, out_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
    from detectron2.layers import Conv2d, NaiveSyncBatchNorm
    from gradaug_det.slim import SlimConv2d
    from gradaug_det.slim.calibration import calibrate_bn

    torch.set_default_dtype(torch.float64)
    g = torch.Generator().manual_seed(0)  # identical weights and statistics on both workers
    convs = []
    for cin, cout in ((6, 16), (16, 16)):
        conv = Conv2d(cin, cout, 3, padding=1, bias=False, norm=NaiveSyncBatchNorm(cout, stats_mode="N"))
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.3)
            conv.norm.weight.copy_(torch.rand(cout, generator=g) + 0.5)
            conv.norm.bias.copy_(torch.randn(cout, generator=g))
            conv.norm.running_mean.copy_(torch.randn(cout, generator=g))
        convs.append(SlimConv2d.convert(conv, slim_in=cin != 6))
    model = nn.Sequential(convs[0], nn.ReLU(), convs[1]).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # unequal batches (2 and 3 images) and different data on the two workers
    data = [torch.randn(2 + r, 6, 5, 5, generator=torch.Generator().manual_seed(10 + r)) * (1 + r) for r in (0, 1)]
    # a plain BN "head" that gets no sample on worker 0 (as a mask head given 0 RoIs): its
    # statistics are worker 1's samples alone, on both workers
    head = nn.BatchNorm2d(4)
    with torch.no_grad():
        head.running_mean.copy_(torch.randn(4, generator=g))
    head_data = [torch.zeros(0, 4, 3, 3), torch.randn(3, 4, 3, 3, generator=torch.Generator().manual_seed(20)) + 2]
    both = nn.ModuleList([model, head])
    calibrate_bn(both, 0.5, [(data[rank], head_data[rank])], 1, forward=lambda m, b: (m[0](b[0]), m[1](b[1])))

    # by hand: one process over the union of both batches
    x = torch.cat(data)
    a = F.conv2d(x, before["0.weight"][:8], padding=1)
    m1, v1 = a.mean(dim=[0, 2, 3]), a.var(dim=[0, 2, 3], unbiased=False)
    h = F.relu(F.batch_norm(a, None, None, before["0.norm.weight"][:8], before["0.norm.bias"][:8], True, 0.0, 1e-5))
    b = F.conv2d(h, before["2.weight"][:8, :8], padding=1)
    m2, v2 = b.mean(dim=[0, 2, 3]), b.var(dim=[0, 2, 3], unbiased=False)
    s = model.state_dict()
    result = {
        "mean1": (s["0.norm.running_mean"][:8] - m1).abs().max().item(),
        "var1": (s["0.norm.running_var"][:8] - v1).abs().max().item(),
        "mean2": (s["2.norm.running_mean"][:8] - m2).abs().max().item(),
        "var2": (s["2.norm.running_var"][:8] - v2).abs().max().item(),
        "head_mean": (head.running_mean - head_data[1].mean(dim=[0, 2, 3])).abs().max().item(),
        "head_var": (head.running_var - head_data[1].var(dim=[0, 2, 3], unbiased=False)).abs().max().item(),
        "tail_kept": torch.equal(s["0.norm.running_mean"][8:], before["0.norm.running_mean"][8:]),
        "local_differs": (s["0.norm.running_mean"][:8]
                          - F.conv2d(data[rank], before["0.weight"][:8], padding=1).mean(dim=[0, 2, 3])
                          ).abs().max().item(),
    }
    with open(out_file, "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # see tests/slim/test_slim_syncbn_gloo.py: gloo's thread at interpreter exit
    '''
)


def test_sync_bn_calibration_over_both_workers(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    init_file = tmp_path / "dist_init"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    procs = [
        subprocess.Popen([sys.executable, str(script), str(rank), str(init_file), str(tmp_path / f"out{rank}.json")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        for rank in range(2)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=180)[0].decode())
        finally:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)
    for rank in range(2):
        r = json.loads((tmp_path / f"out{rank}.json").read_text())
        msg = f"rank {rank}: {r}"
        # each compared on its own: max() with a NaN operand can return a finite one
        assert all(r[k] < 1e-10 for k in ("mean1", "var1", "mean2", "var2", "head_mean", "head_var")), msg
        assert r["tail_kept"], msg
        assert r["local_differs"] > 1e-3, f"one worker's statistics would pass too: {msg}"
