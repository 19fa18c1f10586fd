"""Classification data: the ImageNet mapper, its loaders, and CutMix.

The loaders are detectron2's own (``build_detection_train_loader`` /
``build_detection_test_loader``) with :class:`ClassificationDatasetMapper`, so
classification training gets detectron2's distributed ``TrainingSampler``, its
``InferenceSampler`` and multi-worker loading. Dataset dicts need ``"file_name"`` and
``"class_id"`` (as registered by :func:`gradaug_det.data.register_imagenet`).

Images leave the mapper as detectron2 does it: a (C, H, W) ``uint8`` tensor with 0-255
values in ``INPUT.FORMAT`` channel order; the model normalises them with
``MODEL.PIXEL_MEAN`` / ``MODEL.PIXEL_STD``.
"""
import copy
import logging
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from detectron2.config import configurable
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.data import detection_utils as utils
from detectron2.data.build import get_detection_dataset_dicts

__all__ = [
    "IMAGENET_EIGVAL",
    "IMAGENET_EIGVEC",
    "Lighting",
    "ClassificationDatasetMapper",
    "build_classification_train_loader",
    "build_classification_test_loader",
    "cutmix",
    "CutMix",
]

logger = logging.getLogger(__name__)

#: Eigenvalues of the ImageNet RGB pixel covariance ([0, 1] scale), AlexNet / fb.resnet.torch.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
#: Matching eigenvectors, one per column, rows in R, G, B order.
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)

_FORMATS = ("RGB", "BGR")


class Lighting:
    """AlexNet-style PCA lighting noise on a (3, H, W) RGB float image in [0, 1].

    Adds ``eigvec @ (alpha * eigval)`` to every pixel with ``alpha ~ N(0, alphastd)``
    per image (fb.resnet.torch's ``Lighting``; values are not clamped here). Note: the
    GradAug code applies the same eigenvalues to the 0-255 PIL image, where the shift is
    about 0.01 intensity levels before truncation to uint8, i.e. practically off; this
    is the standard [0, 1]-scale transform the paper describes.

    Args:
        alphastd: standard deviation of ``alpha`` (``INPUT.CLASSIFICATION.LIGHTING``).
        eigval, eigvec: the PCA of the pixel colours, RGB order.
    """

    def __init__(self, alphastd: float, eigval: Sequence[float] = IMAGENET_EIGVAL,
                 eigvec: Sequence[Sequence[float]] = IMAGENET_EIGVEC):
        self.alphastd = float(alphastd)
        self.eigval = torch.tensor(eigval, dtype=torch.float32)
        self.eigvec = torch.tensor(eigvec, dtype=torch.float32)

    def __call__(self, img: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.alphastd == 0:
            return img
        alpha = torch.randn(3, generator=generator) * self.alphastd
        rgb = (self.eigvec * (alpha * self.eigval).view(1, 3)).sum(1)
        return img + rgb.to(img.dtype).view(3, 1, 1)

    def __repr__(self) -> str:
        return f"Lighting(alphastd={self.alphastd})"


class ClassificationDatasetMapper:
    """Map an ImageFolder dataset dict to the classifier's input.

    Training: ``RandomResizedCrop(crop_size, scale=(min_scale, 1))``, horizontal flip,
    ``ColorJitter(color_jitter, color_jitter, color_jitter)`` and PCA lighting (the
    GradAug ImageNet recipe). Test: resize the shorter side to ``resize_size``, then a
    ``crop_size`` center crop.

    Returns ``{"image": (3, crop, crop) uint8 tensor in image_format order,
    "class_id", "file_name", "image_id"}`` (``class_id`` / ``image_id`` when the dataset
    dict has them).

    Randomness comes from torch's global generator, which detectron2 seeds per data
    loader worker (the resumable loader: per stream position).
    """

    @configurable
    def __init__(self, is_train: bool = True, *, crop_size: int, resize_size: int,
                 min_scale: float = 0.08, color_jitter: float = 0.4, lighting: float = 0.1,
                 image_format: str = "RGB"):
        """
        Args:
            is_train: training (random) or test (deterministic) transforms.
            crop_size: side of the output crop (``INPUT.CLASSIFICATION.CROP_SIZE``).
            resize_size: test-time shorter side before cropping
                (``INPUT.CLASSIFICATION.RESIZE_SIZE``).
            min_scale: smallest crop area fraction (``INPUT.CLASSIFICATION.MIN_SCALE``).
            color_jitter: brightness/contrast/saturation jitter
                (``INPUT.CLASSIFICATION.COLOR_JITTER``), 0 = off.
            lighting: PCA lighting std (``INPUT.CLASSIFICATION.LIGHTING``), 0 = off.
            image_format: output channel order, "RGB" or "BGR" (``INPUT.FORMAT``).
        """
        if image_format not in _FORMATS:
            raise ValueError(f"INPUT.FORMAT={image_format!r} is not supported for classification; "
                             f"use one of {list(_FORMATS)}")
        if crop_size < 1:
            raise ValueError(f"INPUT.CLASSIFICATION.CROP_SIZE must be >= 1, got {crop_size}")
        if not is_train and resize_size < crop_size:
            raise ValueError(
                f"INPUT.CLASSIFICATION.RESIZE_SIZE={resize_size} is smaller than "
                f"INPUT.CLASSIFICATION.CROP_SIZE={crop_size}; the center crop would not fit"
            )
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"INPUT.CLASSIFICATION.MIN_SCALE must be in (0, 1], got {min_scale}")
        if color_jitter < 0 or lighting < 0:
            raise ValueError(
                "INPUT.CLASSIFICATION.COLOR_JITTER and LIGHTING must be >= 0, got "
                f"{color_jitter} and {lighting}"
            )
        self.is_train = is_train
        self.image_format = image_format
        if is_train:
            ops = [T.RandomResizedCrop(crop_size, scale=(min_scale, 1.0)), T.RandomHorizontalFlip()]
            if color_jitter > 0:
                ops.append(T.ColorJitter(brightness=color_jitter, contrast=color_jitter,
                                         saturation=color_jitter))
            self.lighting = Lighting(lighting) if lighting > 0 else None
        else:
            ops = [T.Resize(resize_size), T.CenterCrop(crop_size)]
            self.lighting = None
        self.transform = T.Compose(ops)
        logger.info("[ClassificationDatasetMapper] %s transforms: %s%s", "train" if is_train else "test",
                    ops, f" + {self.lighting}" if self.lighting else "")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        c = cfg.INPUT.CLASSIFICATION
        return {
            "is_train": is_train,
            "crop_size": c.CROP_SIZE,
            "resize_size": c.RESIZE_SIZE,
            "min_scale": c.MIN_SCALE,
            "color_jitter": c.COLOR_JITTER,
            "lighting": c.LIGHTING,
            "image_format": cfg.INPUT.FORMAT,
        }

    def apply_image(self, image: Image.Image) -> torch.Tensor:
        """Transform an RGB PIL image into the (3, H, W) uint8 tensor in ``image_format``."""
        image = self.transform(image)
        if self.lighting is not None:
            x = self.lighting(TF.to_tensor(image))
            x = (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)
        else:
            x = TF.pil_to_tensor(image)
        if self.image_format == "BGR":
            x = x.flip(0)
        return x.contiguous()

    def __call__(self, dataset_dict: Dict) -> Dict:
        """
        Args:
            dataset_dict: one record with ``"file_name"`` and (for training)
                ``"class_id"``.

        Returns:
            dict: the classifier's input for this image.
        """
        image = utils.read_image(dataset_dict["file_name"], format="RGB")
        out = {"file_name": dataset_dict["file_name"],
               "image": self.apply_image(Image.fromarray(image))}
        for key in ("class_id", "image_id"):
            if key in dataset_dict:
                out[key] = dataset_dict[key]
        return out


def build_classification_train_loader(cfg, mapper=None, dataset=None):
    """detectron2's training loader over ``DATASETS.TRAIN`` with the classification mapper.

    Uses detectron2's ``TrainingSampler`` (infinite, sharded across workers), batches
    of ``SOLVER.IMS_PER_BATCH`` in total (divided by the number of processes) and
    ``DATALOADER.NUM_WORKERS`` workers; no aspect-ratio grouping (crops are square).
    With ``DATALOADER.RESUMABLE`` (default) it is a
    :class:`~gradaug_det.data.resumable.ResumableTrainLoader`: the stream position is
    saved in every checkpoint and each image's random crop / flip / jitter / lighting is
    seeded by its stream position, so ``--resume`` continues the same batches.

    Args:
        cfg: the config.
        mapper: defaults to ``ClassificationDatasetMapper(cfg, is_train=True)``.
        dataset: list of dataset dicts; defaults to those of ``DATASETS.TRAIN``.

    Returns:
        An infinite iterable of lists of mapped dicts.
    """
    if dataset is None:
        dataset = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=False)
    if mapper is None:
        mapper = ClassificationDatasetMapper(cfg, is_train=True)
    sampler_name = cfg.DATALOADER.SAMPLER_TRAIN
    if sampler_name not in ("TrainingSampler", "RandomSubsetTrainingSampler"):
        raise ValueError(
            f"DATALOADER.SAMPLER_TRAIN={sampler_name!r} needs detection annotations; use "
            "'TrainingSampler' for classification"
        )
    if cfg.DATALOADER.get("RESUMABLE", False):  # the stream position is checkpointed (data/resumable.py)
        from .resumable import build_resumable_train_loader

        return build_resumable_train_loader(cfg, mapper, dataset=dataset, aspect_ratio_grouping=False)
    return build_detection_train_loader(cfg, mapper=mapper, dataset=dataset, aspect_ratio_grouping=False)


def build_classification_test_loader(cfg, dataset_name: str, mapper=None, batch_size: Optional[int] = None):
    """detectron2's inference loader for ``dataset_name`` with the classification mapper.

    Every image is seen exactly once over all processes (``InferenceSampler``).

    Args:
        cfg: the config.
        dataset_name: a registered dataset, e.g. ``"imagenet_val"``.
        mapper: defaults to ``ClassificationDatasetMapper(cfg, is_train=False)``.
        batch_size: images per batch and process; default
            ``INPUT.CLASSIFICATION.TEST_IMS_PER_BATCH``.

    Returns:
        A finite iterable of lists of mapped dicts.
    """
    if mapper is None:
        mapper = ClassificationDatasetMapper(cfg, is_train=False)
    if batch_size is None:
        batch_size = cfg.INPUT.CLASSIFICATION.TEST_IMS_PER_BATCH
    if batch_size < 1:
        raise ValueError(f"INPUT.CLASSIFICATION.TEST_IMS_PER_BATCH must be >= 1, got {batch_size}")
    return build_detection_test_loader(cfg, dataset_name, mapper=mapper, batch_size=batch_size)


def _labels(d: Dict, num_classes: int) -> torch.Tensor:
    if "soft_label" in d:
        soft = torch.as_tensor(d["soft_label"], dtype=torch.float32)
        if soft.shape != (num_classes,):
            raise ValueError(f"soft_label has shape {tuple(soft.shape)}, expected ({num_classes},)")
        return soft
    class_id = int(d["class_id"])
    if not 0 <= class_id < num_classes:
        raise ValueError(f"class_id {class_id} is outside [0, {num_classes}); check "
                         "MODEL.CLASSIFIER.NUM_CLASSES")
    onehot = torch.zeros(num_classes)
    onehot[class_id] = 1.0
    return onehot


def cutmix(batch: List[Dict], alpha: float, rng: torch.Generator, *, num_classes: int,
           prob: float = 1.0) -> List[Dict]:
    """CutMix (Yun et al., ICCV 2019) a batch of classification inputs.

    Draws ``lam ~ Beta(alpha, alpha)`` and a permutation of the batch; image ``i`` gets
    the box of image ``perm[i]`` of size ``sqrt(1 - lam)`` times the image sides,
    centred at a uniform point and clipped to the image. ``lam`` is then corrected to
    the area actually kept, ``1 - box_area / image_area``, and the label becomes
    ``soft_label = lam * y_i + (1 - lam) * y_perm[i]`` with ``y`` the one-hot
    ``class_id`` (or an existing ``soft_label``). With probability ``1 - prob`` the
    images are left unmixed and ``soft_label`` is the one-hot label, so the whole
    batch always uses the soft-label loss.

    Args:
        batch: mapped dicts with same-size ``"image"`` tensors and ``"class_id"``.
        alpha: Beta parameter, > 0 (``INPUT.CUTMIX.ALPHA``).
        rng: the generator of every random draw; equal generator states give equal
            results.
        num_classes: length of the soft labels (``MODEL.CLASSIFIER.NUM_CLASSES``).
        prob: probability of mixing (``INPUT.CUTMIX.PROB``).

    Returns:
        New dicts (the input ones are not modified) with mixed ``"image"`` (same dtype),
        ``"soft_label"`` (float32, sums to 1) and ``"cutmix_lam"`` (the corrected
        ``lam``, 1.0 when not mixed).
    """
    if alpha <= 0:
        raise ValueError(f"INPUT.CUTMIX.ALPHA must be > 0, got {alpha}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"INPUT.CUTMIX.PROB must be in [0, 1], got {prob}")
    if not batch:
        return []
    labels = [_labels(d, num_classes) for d in batch]
    out = [copy.copy(d) for d in batch]
    if torch.rand(1, generator=rng).item() >= prob:
        for d, y in zip(out, labels):
            d["soft_label"], d["cutmix_lam"] = y, 1.0
        return out

    images = [d["image"] for d in batch]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1:
        raise ValueError(f"cutmix needs images of one size, got {sorted(shapes)}")
    H, W = images[0].shape[-2:]
    seed = int(torch.randint(0, 2**62, (1,), generator=rng).item())
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(len(batch), generator=rng).tolist()
    cut_rat = float(np.sqrt(1.0 - lam))
    cut_w, cut_h = int(W * cut_rat), int(H * cut_rat)
    cx = int(torch.randint(0, W, (1,), generator=rng).item())
    cy = int(torch.randint(0, H, (1,), generator=rng).item())
    x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
    y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
    lam = 1.0 - (x2 - x1) * (y2 - y1) / float(W * H)
    for i, (d, j) in enumerate(zip(out, perm)):
        image = images[i].clone()
        image[..., y1:y2, x1:x2] = images[j][..., y1:y2, x1:x2]
        d["image"] = image
        d["soft_label"] = lam * labels[i] + (1.0 - lam) * labels[j]
        d["cutmix_lam"] = lam
    return out


class CutMix:
    """Batch CutMix with its own seeded draws (``INPUT.CUTMIX.*``).

    Build it with ``CutMix(cfg)`` when ``INPUT.CUTMIX.ENABLED`` and call it on each
    training batch before the full-network pass ("GradAug+"). Call ``k`` draws from a
    generator seeded by ``(seed, k)``, so the whole state is the call count, which is the
    same on every process (one call per iteration): a checkpoint written by rank 0
    (:meth:`state_dict`) resumes every rank's own draws (:meth:`load_state_dict`).
    """

    @configurable
    def __init__(self, *, alpha: float, prob: float, num_classes: int, seed: int = 0):
        """
        Args:
            alpha, prob, num_classes: see :func:`cutmix`.
            seed: seed of the draws; give every process a different one.
        """
        self.alpha, self.prob, self.num_classes = alpha, prob, num_classes
        self.seed, self.calls = seed, 0

    @classmethod
    def from_config(cls, cfg, seed: Optional[int] = None):
        from detectron2.utils import comm

        if seed is None:
            base = cfg.SEED if cfg.SEED >= 0 else 0
            seed = base * 1000 + comm.get_rank() + 1
        return {"alpha": cfg.INPUT.CUTMIX.ALPHA, "prob": cfg.INPUT.CUTMIX.PROB,
                "num_classes": cfg.MODEL.CLASSIFIER.NUM_CLASSES, "seed": seed}

    def __call__(self, batch: List[Dict]) -> List[Dict]:
        # (seed, call) mixed into the 32 bits torch's CPU generator keeps (numpy's SeedSequence)
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence((self.seed, self.calls)).generate_state(1)[0]))
        self.calls += 1
        return cutmix(batch, self.alpha, generator, num_classes=self.num_classes, prob=self.prob)

    def state_dict(self) -> Dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: Dict) -> None:
        """Continue after ``state["calls"]`` calls with this process's own seed.

        Raises:
            ValueError: for the generator state of gradaug-det 0.1.0, which holds one
                process's draws only.
        """
        if "calls" not in state:
            raise ValueError("this checkpoint holds CutMix's generator state of gradaug-det 0.1.0 (one process's "
                             "draws); resume it with that version, or start a new run from its weights without "
                             "--resume")
        self.calls = int(state["calls"])
