"""Every loader on generated files in its on-disk format."""

import gzip

import pytest
import torch

from bpcnn.config import RunConfig
from bpcnn.data import DatasetNotFoundError, build_data, random_translate, read_idx
from conftest import make_cifar_folder, make_image_folder, make_mnist_folder


def _config(**kwargs):
    defaults = dict(batch_size=16, n_epochs=1)
    defaults.update(kwargs)
    return RunConfig(**defaults)


def _first_batch(loader):
    return next(iter(loader))


@pytest.mark.parametrize("dataset", ["FashionMNIST", "MNIST"])
def test_idx_loader(tmp_path, dataset):
    root = make_mnist_folder(tmp_path / dataset, n_train=50, n_test=30)
    bundle = build_data(_config(dataset=dataset, data_root=str(root)))
    assert bundle.num_classes == 10
    assert bundle.in_channels == 1
    assert bundle.image_size == (28, 28)
    assert bundle.train.num_samples == 50
    assert bundle.evaluation.num_samples == 30
    images, labels = _first_batch(bundle.train)
    assert images.shape == (16, 1, 28, 28)
    assert images.dtype == torch.float32
    assert labels.dtype == torch.long
    assert labels.max() < 10


def test_idx_loader_torchvision_layout(tmp_path):
    make_mnist_folder(tmp_path / "MNIST" / "raw")
    bundle = build_data(_config(dataset="MNIST", data_root=str(tmp_path)))
    assert bundle.train.num_samples == 96


@pytest.mark.parametrize("dataset, classes", [("CIFAR10", 10), ("CIFAR100", 100)])
def test_cifar_loader(tmp_path, dataset, classes):
    make_cifar_folder(tmp_path, classes=classes, n_per_batch=20)
    bundle = build_data(_config(dataset=dataset, data_root=str(tmp_path)))
    assert bundle.num_classes == classes
    assert bundle.in_channels == 3
    assert bundle.image_size == (32, 32)
    assert bundle.train.num_samples == (100 if classes == 10 else 20)
    assert bundle.evaluation.num_samples == 20
    images, _ = _first_batch(bundle.train)
    assert images.shape == (16, 3, 32, 32)


def test_tiny_imagenet_loader_with_annotation_file(tmp_path):
    root = make_image_folder(tmp_path / "tiny", size=64, classes=3, per_class=4, tiny_val=True)
    bundle = build_data(_config(dataset="TinyImageNet", imagenet_path=str(root), batch_size=4))
    assert bundle.num_classes == 3
    assert bundle.image_size == (64, 64)
    assert bundle.evaluation.num_samples == 12
    images, labels = _first_batch(bundle.evaluation)
    assert images.shape == (4, 3, 64, 64)
    assert sorted(set(torch.cat([l for _, l in bundle.evaluation]).tolist())) == [0, 1, 2]


def test_imagenet_loader(tmp_path):
    root = make_image_folder(tmp_path / "imagenet", size=40, classes=2, per_class=3)
    bundle = build_data(_config(dataset="ImageNet", imagenet_path=str(root), batch_size=2, input_scale=32))
    assert bundle.num_classes == 2
    assert bundle.image_size == (32, 32)
    images, _ = _first_batch(bundle.train)
    assert images.shape == (2, 3, 32, 32)


def test_missing_fashion_mnist_says_where_and_how(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        build_data(_config(dataset="FashionMNIST", data_root=str(tmp_path / "nowhere")))
    message = str(info.value)
    assert str(tmp_path / "nowhere") in message
    assert "does not exist: check --data-root" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--download" in message


def test_missing_imagenet_folder(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="train"):
        build_data(_config(dataset="ImageNet", imagenet_path=str(tmp_path)))


def test_truncated_idx_file(tmp_path):
    root = make_mnist_folder(tmp_path / "m")
    path = root / "train-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:1000]))
    with pytest.raises(ValueError, match="header expects"):
        read_idx(path)


def test_validation_split_is_seeded_and_disjoint(tmp_path):
    root = make_mnist_folder(tmp_path / "m", n_train=80)
    config = _config(data_root=str(root), training_mode="validation", validation_size=20)
    first, second = build_data(config), build_data(config)
    assert first.evaluation_split == "validation"
    assert first.train.num_samples == 60
    assert first.evaluation.num_samples == 20
    torch.testing.assert_close(first.evaluation.images, second.evaluation.images)
    train_rows = {tuple(x.flatten().tolist()) for x in first.train.images}
    assert not any(tuple(x.flatten().tolist()) in train_rows for x in first.evaluation.images)


def test_subset_limits_training_and_evaluation(tmp_path):
    root = make_mnist_folder(tmp_path / "m")
    bundle = build_data(_config(data_root=str(root), subset=10))
    assert bundle.train.num_samples == 10
    assert bundle.evaluation.num_samples == 10
    bundle = build_data(_config(data_root=str(root), subset=10, subset_evaluation=False))
    assert bundle.evaluation.num_samples == 40


def test_repetitions_translate_copies_independently(tmp_path):
    root = make_mnist_folder(tmp_path / "m")
    bundle = build_data(_config(data_root=str(root), n_repetitions=4, batch_size=16, image_padding=4))
    images, labels = _first_batch(bundle.train)
    assert images.shape[0] == 16
    groups = labels.view(4, 4)
    assert (groups == groups[:, :1]).all()  # 4 distinct images, each 4 times in a row
    copies = images.view(4, 4, 1, 28, 28)[0]
    assert any(not torch.equal(copies[0], copies[i]) for i in range(1, 4))
    assert len(bundle.train) == 96 // 4


def test_epoch_order_depends_only_on_seed_and_epoch(tmp_path):
    root = make_mnist_folder(tmp_path / "m")
    a, b = build_data(_config(data_root=str(root))), build_data(_config(data_root=str(root)))
    a.train.set_epoch(3)
    b.train.set_epoch(3)
    torch.testing.assert_close(_first_batch(a.train)[0], _first_batch(b.train)[0])
    b.train.set_epoch(4)
    assert not torch.equal(_first_batch(a.train)[0], _first_batch(b.train)[0])


def test_random_translate_keeps_content_shifted():
    images = torch.zeros(1, 1, 6, 6, dtype=torch.uint8)
    images[0, 0, 2, 3] = 255
    out = random_translate(images, 2, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    assert int(out.sum()) in (0, 255)


def test_shards_cover_evaluation_once(tmp_path):
    root = make_mnist_folder(tmp_path / "m", n_test=41)
    config = _config(data_root=str(root), batch_size=8)
    shards = [build_data(config, rank=r, world_size=2).evaluation for r in range(2)]
    seen = sum(len(labels) for shard in shards for _, labels in shard)
    assert seen == 41
