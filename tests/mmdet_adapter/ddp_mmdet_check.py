"""Two-process gloo run of an mmdet GradAug detector under GradAugDistributedDataParallel.

Run by tests/mmdet_adapter/test_mmdet_ddp.py as a script (spawned workers must import
this file): ``python ddp_mmdet_check.py OUT_DIR DATA_ROOT``. Each worker trains one
iteration on its own two images and saves, per setting, what the test checks: the
backbone's width and input size per pass, DDP all-reduces per pass, and the gradients
the optimizer steps on; the same iteration run without DDP on each worker's images gives
the reference. With mmengine's default wrapper it records the error a GradAug detector
raises.
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
# a port no other test holds (tests run in parallel under `make test`'s xdist workers)
from torch.distributed.elastic.utils.distributed import get_free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(ROOT, "configs", "mmdet", "quickstart", "mask-rcnn_r18_fpn_gradaug_shapes.py")
SETTINGS = {"soft_width": dict(subnet_loss="soft", sampling="width", seed=7),
            "gt_depth": dict(subnet_loss="gt", sampling="depth", seed=7)}


def _setup():
    from mmdet.utils import register_all_modules

    import gradaug_det.mmdet  # noqa: F401

    register_all_modules(init_default_scope=True)


def _model(gradaug):
    from mmengine.config import Config
    from mmdet.registry import MODELS

    cfg = Config.fromfile(QUICKSTART).model
    cfg.gradaug = gradaug
    torch.manual_seed(0)
    model = MODELS.build(cfg)
    model.init_weights()
    return model.train()


def _batch(data_root, indices):
    from mmdet.datasets import CocoDataset
    from mmengine.dataset import pseudo_collate

    ds = CocoDataset(data_root=data_root, ann_file="annotations/instances_train.json",
                     data_prefix=dict(img="train/"), metainfo=dict(classes=("circle", "rectangle", "triangle")),
                     pipeline=[dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True,
                                                                     with_mask=True),
                               dict(type="Resize", scale=(128, 128), keep_ratio=True), dict(type="PackDetInputs")])
    return pseudo_collate([ds[i] for i in indices])


def _one_iteration(model, outer, batch):
    """train_step once; returns (per-pass backbone (width, H, W), gradients at the step)."""
    from mmengine.optim import OptimWrapper

    from gradaug_det.slim import get_width

    passes = []
    handle = model.backbone.register_forward_pre_hook(
        lambda m, args: passes.append((get_width(m), *args[0].shape[-2:])))
    ow = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.0))
    grads = {}
    real_step = ow.step

    def step(**kwargs):
        grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        real_step(**kwargs)

    ow.step = step
    torch.manual_seed(123)
    outer.train_step(batch, ow)
    handle.remove()
    return passes, grads


def worker(rank, world, port, out_dir, data_root):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    _setup()
    from mmengine.model import MMDistributedDataParallel
    from mmengine.optim import OptimWrapper

    from gradaug_det.mmdet import GradAugDistributedDataParallel

    batch = _batch(data_root, (2 * rank, 2 * rank + 1))
    result = {}
    for name, gradaug in SETTINGS.items():
        model = _model(gradaug)
        ddp = GradAugDistributedDataParallel(module=model)
        reduces = []
        ddp.register_comm_hook(None, _counting_allreduce(reduces))
        passes, grads = _one_iteration(model, _CountPasses(ddp, reduces), batch)
        result[name] = {"passes": passes, "grads": grads, "reduces": reduces,
                        "find_unused": ddp.find_unused_parameters}
        # the reference: the same iteration without DDP on each worker's images
        refs = []
        for r in range(world):
            ref = _model(gradaug)
            refs.append(_one_iteration(ref, ref, _batch(data_root, (2 * r, 2 * r + 1)))[1])
        result[name]["ref"] = {n: sum(g[n] for g in refs) / world for n in refs[0]}
    # mmengine's default wrapper bypasses train_step: the GradAug detector must refuse
    model = _model(SETTINGS["soft_width"])
    stock = MMDistributedDataParallel(module=model, device_ids=None)
    try:
        stock.train_step(batch, OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.0)))
        result["stock_error"] = None
    except RuntimeError as e:
        result["stock_error"] = str(e)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    # gloo's run-loop thread can still be dropping its last work object (it holds a Python
    # reference) while the interpreter finalizes: std::terminate at exit, ~1 run in 10 on
    # torch 2.14. Everything is written, so leave without finalizing.
    sys.stdout.flush()
    os._exit(0)


def _counting_allreduce(reduces):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        reduces[-1] += 1
        return allreduce_hook(state, bucket)

    return hook


class _CountPasses:
    """Forwards ``train_step`` to the DDP model, opening a new all-reduce counter per pass."""

    def __init__(self, ddp, reduces):
        self.ddp, self.reduces = ddp, reduces
        ddp.module.backbone.register_forward_pre_hook(lambda m, a: reduces.append(0))

    def train_step(self, batch, ow):
        return self.ddp.train_step(batch, ow)


def main(out_dir, data_root):
    mp.spawn(worker, args=(2, get_free_port(), out_dir, data_root), nprocs=2, join=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
