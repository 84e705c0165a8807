"""Datasets for ``python -m vitkernels train``, all offline, held as in-memory tensors.

Every dataset is a :class:`Data`: uint8 images (N, C, H, W) and int64 labels for a train and a test split,
plus the per-channel mean/std of the training images and the augmentation that suits it. Batches are cut,
augmented (random crop with zero padding, horizontal flip) and normalised on the training device, all batched:
no per-image Python work, no worker processes, so a CPU keeps up with a GPU for these sizes.

Names (``load(name)``):

- ``synthetic``       random images generated on the device (for throughput; labels are random).
- ``digits``          scikit-learn's bundled 8x8 digits (1,797 images, 16 grey levels), seeded 80/20 split.
- ``mnist5k``         5,000 real MNIST digits (500 per class) shipped inside this package
                      (``vitkernels/experiments/datasets/``, CC BY-SA 3.0, provenance there), seeded 4,000/1,000 split.
- ``cifar10:<dir>``   the standard ``cifar-10-batches-py`` pickle layout (data_batch_1..5, test_batch).
- ``folder:<dir>``    ImageFolder layout ``<dir>/<class>/<image>``; or ``<dir>/train/<class>/...`` with
                      ``<dir>/val`` (or ``test``) beside it. Images are converted to RGB and resized to one size.

Data order is a pure function of (seed, epoch) and augmentation randomness of (seed, step, rank), so resuming
at a step reproduces the uninterrupted run exactly without saving any loader state.
"""

from __future__ import annotations

import glob
import math
import os
import pickle
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("synthetic", "digits", "mnist5k", "cifar10:<dir>", "folder:<dir>")
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")


@dataclass
class Data:
    """An in-memory image classification dataset.

    Attributes:
        name: as given to ``load``.
        train_x, test_x: uint8 (N, C, H, W). train_y, test_y: int64 (N,).
        num_classes: number of classes. classes: class names (folder), or None.
        mean, std: per-channel statistics of the training images in [0, 1], used to normalise.
        crop_pad: padding of the random crop (0: no crop). flip: random horizontal flip.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    crop_pad: int = 0
    flip: bool = False
    classes: list[str] | None = None
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())

    def __post_init__(self):
        if not self.mean:
            x = self.train_x.float().div_(255)
            self.mean = tuple(x.mean(dim=(0, 2, 3)).tolist())
            self.std = tuple(max(s, 1e-3) for s in x.std(dim=(0, 2, 3)).tolist())

    @property
    def in_chans(self) -> int:
        return self.train_x.shape[1]

    @property
    def img_size(self) -> int:
        return self.train_x.shape[2]

    def to(self, device: torch.device) -> "Data":
        """Move the images and labels to ``device`` (they are small: keep them there)."""
        for name in ("train_x", "train_y", "test_x", "test_y"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def __repr__(self) -> str:
        return (f"Data({self.name!r}, train {tuple(self.train_x.shape)}, test {tuple(self.test_x.shape)}, "
                f"{self.num_classes} classes)")


# -- loading ------------------------------------------------------------------------------------------------
def load(name: str, *, seed: int = 0, img_size: int | None = None, device: torch.device | str = "cpu",
         synthetic_size: tuple[int, int] = (2048, 512), workers: int = 0) -> Data:
    """Load dataset ``name`` (see the module docstring) as in-memory tensors on ``device``.

    Args:
        seed: seeds the train/test split of sets without an official one (and synthetic images).
        img_size: image size of ``synthetic`` (default 32) and ``folder`` (default: the first image's size).
        synthetic_size: (train, test) image counts of ``synthetic``.
        workers: threads decoding ``folder`` images (0: one per core, at most 8).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset must be a non-empty string; choose one of {', '.join(DATASETS)}")
    kind, _, arg = name.partition(":")
    if kind == "synthetic":
        data = _synthetic(name, seed, img_size or 32, synthetic_size, device)
    elif kind == "digits" and not arg:
        data = _digits(name, seed)
    elif kind == "mnist5k" and not arg:
        data = _mnist5k(name, seed)
    elif kind == "cifar10":
        data = _cifar10(name, _need_dir(name, arg))
    elif kind == "folder":
        data = _folder(name, _need_dir(name, arg), seed, img_size, workers)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return data.to(torch.device(device))


def _need_dir(name: str, path: str) -> str:
    if not path:
        raise ValueError(f"dataset {name!r} needs a directory: {name.split(':')[0]}:<dir>")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"dataset {name!r}: directory {path!r} does not exist")
    return path


def _split(x: torch.Tensor, y: torch.Tensor, n_test: int, seed: int) -> tuple[torch.Tensor, ...]:
    """A seeded random train/test split (the same for every run with the same seed)."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def _synthetic(name, seed, img_size, sizes, device) -> Data:
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    n_train, n_test = sizes
    x = torch.randint(0, 256, (n_train + n_test, 3, img_size, img_size), generator=g, device=device,
                      dtype=torch.uint8)
    y = torch.randint(0, 10, (n_train + n_test,), generator=g, device=device)
    return Data(name, x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes=10,
                mean=(0.5, 0.5, 0.5), std=(0.2887,) * 3)  # uniform on [0, 1]


def _digits(name, seed) -> Data:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8))[:, None]  # (1797, 1, 8, 8)
    y = torch.from_numpy(d.target.astype(np.int64))
    return Data(name, *_split(x, y, n_test=len(y) // 5, seed=seed), num_classes=10, crop_pad=1)


def mnist5k_path() -> str:
    """The 5,000 MNIST digits shipped inside this package (vitkernels/experiments/datasets/mnist5k.npz; provenance and
    licence in vitkernels/experiments/datasets/README.md)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "datasets", "mnist5k.npz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset 'mnist5k': {path} is missing from this installation of vitkernels")
    return path


def _mnist5k(name, seed) -> Data:
    with np.load(mnist5k_path()) as f:
        x = torch.from_numpy(f["images"][:, None].copy())  # (5000, 1, 28, 28) uint8
        y = torch.from_numpy(f["labels"].astype(np.int64))
    return Data(name, *_split(x, y, n_test=1000, seed=seed), num_classes=10, crop_pad=2)


def _cifar10(name, root) -> Data:
    def read(file):
        path = os.path.join(root, file)
        if not os.path.exists(path):
            raise FileNotFoundError(f"dataset {name!r}: {path} is missing (expected the cifar-10-batches-py "
                                    "layout: data_batch_1..5 and test_batch)")
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        return torch.from_numpy(x.copy()), torch.tensor(d[b"labels"], dtype=torch.int64)

    batches = sorted(glob.glob(os.path.join(root, "data_batch_*")))
    if not batches:
        raise FileNotFoundError(f"dataset {name!r}: no data_batch_* files in {root}")
    parts = [read(os.path.basename(b)) for b in batches]
    test_x, test_y = read("test_batch")
    names = None
    meta = os.path.join(root, "batches.meta")
    if os.path.exists(meta):
        with open(meta, "rb") as f:
            names = [n.decode() for n in pickle.load(f, encoding="bytes").get(b"label_names", [])] or None
    return Data(name, torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), test_x, test_y,
                num_classes=10, crop_pad=4, flip=True, classes=names)


def _folder(name, root, seed, img_size, workers) -> Data:
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def scan(d):
        classes = sorted(c for c in os.listdir(d) if os.path.isdir(os.path.join(d, c)))
        items = [(os.path.join(d, c, f), i) for i, c in enumerate(classes)
                 for f in sorted(os.listdir(os.path.join(d, c))) if f.lower().endswith(_IMAGE_EXTS)]
        return classes, items

    split_dirs = [os.path.join(root, s) for s in ("train", "val", "test")]
    if os.path.isdir(split_dirs[0]) and (os.path.isdir(split_dirs[1]) or os.path.isdir(split_dirs[2])):
        classes, train_items = scan(split_dirs[0])
        test_classes, test_items = scan(split_dirs[1] if os.path.isdir(split_dirs[1]) else split_dirs[2])
        if test_classes != classes:
            raise ValueError(f"dataset {name!r}: train classes {classes} differ from test classes {test_classes}")
    else:
        classes, train_items = scan(root)
        test_items = None
    if len(classes) < 2 or not train_items:
        raise ValueError(f"dataset {name!r}: expected <dir>/<class>/<image> with at least 2 classes, "
                         f"found classes {classes} and {len(train_items)} images in {root}")
    if img_size is None:
        with Image.open(train_items[0][0]) as im:
            img_size = im.size[0]

    def read(path):
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (img_size, img_size):
                im = im.resize((img_size, img_size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)

    def stack(items):
        with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
            x = np.stack(list(pool.map(read, [p for p, _ in items])))
        return torch.from_numpy(x), torch.tensor([c for _, c in items], dtype=torch.int64)

    x, y = stack(train_items)
    if test_items is None:
        parts = _split(x, y, n_test=max(1, len(y) // 5), seed=seed)
    else:
        parts = (x, y, *stack(test_items))
    return Data(name, *parts, num_classes=len(classes), crop_pad=max(1, img_size // 8), flip=True,
                classes=classes)


# -- batches ------------------------------------------------------------------------------------------------
def epoch_indices(n: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True
                  ) -> torch.Tensor:
    """This rank's sample order for ``epoch``, with DistributedSampler's semantics: a seeded permutation
    (the same on every rank), padded by wrapping to a multiple of ``world_size``, then every world_size-th."""
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    else:
        order = torch.arange(n)
    total = math.ceil(n / world_size) * world_size
    if total > n:
        order = torch.cat([order, order[: total - n]])
    return order[rank::world_size]


def normalize(x_uint8: torch.Tensor, mean, std, dtype=torch.float32) -> torch.Tensor:
    """uint8 (B, C, H, W) -> (x / 255 - mean) / std in ``dtype``."""
    m = torch.tensor(mean, device=x_uint8.device, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x_uint8.device, dtype=torch.float32).view(1, -1, 1, 1)
    return ((x_uint8.float() / 255.0 - m) / s).to(dtype)


def augment(x: torch.Tensor, crop_pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, batched on x's device.

    x: (B, C, H, W), any dtype. ``generator`` must live on x's device. Returns a new (B, C, H, W) tensor.
    """
    B, C, H, W = x.shape
    if crop_pad > 0:
        p = crop_pad
        padded = F.pad(x, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (B,), generator=generator, device=x.device)
        ox = torch.randint(0, 2 * p + 1, (B,), generator=generator, device=x.device)
        rows = (oy[:, None] + torch.arange(H, device=x.device))[:, :, None]  # (B, H, 1)
        cols = (ox[:, None] + torch.arange(W, device=x.device))[:, None, :]  # (B, 1, W)
        b = torch.arange(B, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[b, rows, cols].permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)
    if flip:
        mask = torch.rand(B, generator=generator, device=x.device) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x.contiguous()


def make_batch(data: Data, idx: torch.Tensor, *, train: bool, generator: torch.Generator | None = None,
               img_size: int | None = None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, C, S, S) normalised (augmented when ``train``) and labels (B,) for sample indices ``idx``.

    Augmentation runs on the uint8 pixels (zero padding = black, as torchvision pads before normalising);
    images are resized (bilinear) to ``img_size`` when it differs from the dataset's.
    """
    idx = idx.to(data.train_x.device)
    x, y = (data.train_x[idx], data.train_y[idx]) if train else (data.test_x[idx], data.test_y[idx])
    if train and (data.crop_pad or data.flip):
        x = augment(x, data.crop_pad, data.flip, generator)
    x = normalize(x, data.mean, data.std)
    if img_size is not None and img_size != x.shape[-1]:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=False)
    return x.to(dtype), y


def step_generator(device: torch.device, seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The augmentation RNG of one training step: a pure function of (seed, step, rank)."""
    return torch.Generator(device=device).manual_seed((seed * 7_919 + step) * 1_009 + rank)
