"""2-process gloo DDP GradAug iteration vs one process on the global batch.

Run by tests/engine/test_ddp.py as a script (spawned workers must import this file):
    python tests/engine/ddp_gradaug_check.py OUT.pt
Writes {sampling: {"ref": grads, "ddp": grads, "allreduce_per_pass": [...], "buckets": n}}.
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
# a port no other test holds (tests run in parallel under `make test`'s xdist workers)
from torch.distributed.elastic.utils.distributed import get_free_port

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from toy_model import ToyClassifier, grads, toy_batch  # noqa: E402

from gradaug_det.gradaug import ClassificationTask, SubnetSampler, gradaug_step  # noqa: E402

GLOBAL_BATCH = 8


def sampler(sampling):
    return SubnetSampler(num_subnets=3, min_width=0.5, sampling=sampling, depth_min_keep=0.5,
                         scales=(1.0, 0.75, 0.5), seed=7)


def model_for(seed=0):
    """float64: DDP (two half batches, then an all-reduce) and one process sum the same terms in
    another order; in float64 the result does not depend on which CPU kernels run."""
    torch.manual_seed(seed)
    return ToyClassifier().double()


def reference(sampling):
    model = model_for()
    model.train()
    gradaug_step(model, toy_batch(GLOBAL_BATCH), sampler(sampling), ClassificationTask(model))
    return grads(model)


def worker(rank, world, port, out_path, sampling):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = model_for()
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=(sampling == "depth"))
    ddp.train()
    calls = []

    def counting_hook(state, bucket):
        calls.append(1)
        fut = dist.all_reduce(bucket.buffer().div_(world), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    ddp.register_comm_hook(None, counting_hook)
    task = ClassificationTask(ddp)
    per_pass = []
    orig_backward = torch.Tensor.backward

    def backward(loss):
        before = len(calls)
        orig_backward(loss)
        per_pass.append(len(calls) - before)

    local = toy_batch(GLOBAL_BATCH)[rank * GLOBAL_BATCH // world:(rank + 1) * GLOBAL_BATCH // world]
    gradaug_step(ddp, local, sampler(sampling), task, backward=backward)
    if rank == 0:
        torch.save({"ddp": grads(model), "allreduce_per_pass": per_pass}, out_path)
    dist.barrier()
    dist.destroy_process_group()
    # gloo's run-loop thread can still be dropping its last work object (it holds a Python
    # reference) while the interpreter finalizes: std::terminate at exit, ~1 run in 10 on
    # torch 2.14. Everything is written, so leave without finalizing.
    sys.stdout.flush()
    os._exit(0)


def main(out):
    results = {}
    for i, sampling in enumerate(["width", "depth"]):
        tmp = out + f".{sampling}"
        mp.spawn(worker, args=(2, get_free_port(), tmp, sampling), nprocs=2, join=True)
        res = torch.load(tmp)
        res["ref"] = reference(sampling)
        results[sampling] = res
        os.remove(tmp)
    torch.save(results, out)


if __name__ == "__main__":
    main(sys.argv[1])
