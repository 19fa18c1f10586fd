"""Two gloo workers, a Mask R-CNN whose mask head uses synchronised BN, and a rotated
sub-network batch that keeps no object on worker 0 but keeps them on worker 1.

Run by tests/gradaug/test_step_detection.py as a script (spawned workers import this file):
    python tests/gradaug/syncbn_heads_check.py NORM OUT_DIR
Each worker writes OUT_DIR/rank{r}.pt: the sub-network pass's losses and the gradients after
the synchronising backward.
"""
import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
# a port no other test holds (tests run in parallel under `make test`'s xdist workers)
from torch.distributed.elastic.utils.distributed import get_free_port

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import tiny_rcnn_cfg  # noqa: E402

from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances, PolygonMasks  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from gradaug_det.gradaug import DetectionTask, GradAugOptions, SubnetSpec  # noqa: E402

SIZE = 64


def batch(rank):
    """Worker 0: one object in the top-left corner (a 45 degree turn about the centre moves it
    out of the image); worker 1: one object in the middle (it stays)."""
    g = torch.Generator().manual_seed(rank)
    img = (torch.rand(3, SIZE, SIZE, generator=g) * 255).to(torch.uint8)
    box = [0.0, 0.0, 6.0, 6.0] if rank == 0 else [20.0, 22.0, 44.0, 40.0]
    inst = Instances((SIZE, SIZE))
    inst.gt_boxes = Boxes(torch.tensor([box]))
    inst.gt_classes = torch.tensor([1])
    b = torch.tensor(box)
    inst.gt_masks = PolygonMasks([[b[[0, 1, 2, 1, 2, 3, 0, 3]].numpy()]])
    return [{"image": img, "instances": inst, "height": SIZE, "width": SIZE}]


def worker(rank, norm, port, out_dir):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    cfg = tiny_rcnn_cfg()
    cfg.MODEL.ROI_MASK_HEAD.NORM = norm
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 16
    torch.manual_seed(0)
    model = build_model(cfg)
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    ddp.train()
    task = DetectionTask(ddp, GradAugOptions(subnet_loss="gt"))
    with EventStorage(0):
        with ddp.no_sync():
            losses, teacher = task.full_pass(ddp, batch(rank))
            sum(losses.values()).backward()
        sub = task.subnet_pass(ddp, batch(rank), teacher, SubnetSpec(angle=45.0))
        sum(sub.values()).backward()  # the synchronising backward
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.save({"losses": {k: v.item() for k, v in sub.items()}, "grads": grads,
                "heads": task.sync_norm_heads}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # see tests/engine/ddp_gradaug_check.py: gloo's run-loop thread at exit


if __name__ == "__main__":
    norm, out_dir = sys.argv[1], sys.argv[2]
    mp.spawn(worker, args=(norm, get_free_port(), out_dir), nprocs=2, join=True)
