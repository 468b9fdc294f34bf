import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import (
    EpochBatches,
    ImageArrayDataset,
    ServingPath,
    load_cifar,
    load_dataset,
    parse_augment,
    stratified_split,
    write_synthetic,
)
from utils import UserError


def test_synthetic_is_marked_and_deterministic(tmp_path, synthetic_dir):
    data = load_cifar(synthetic_dir, "cifar10", download=False)
    assert data.synthetic and data.name == "synthetic-cifar10"
    assert data.train_x.shape == (500, 32, 32, 3) and data.train_x.dtype == np.uint8
    assert data.test_x.shape == (100, 32, 32, 3)
    assert sorted(np.bincount(data.train_y).tolist()) == [50] * 10
    write_synthetic(tmp_path, "cifar10", train_per_class=50, test_per_class=10, seed=0)
    again = load_cifar(tmp_path, "cifar10", download=False)
    np.testing.assert_array_equal(again.train_x, data.train_x)
    np.testing.assert_array_equal(again.test_y, data.test_y)


def test_synthetic_classes_differ_visibly(synthetic_dir):
    data = load_cifar(synthetic_dir, "cifar10", download=False)
    means = np.stack([data.train_x[data.train_y == k].mean(axis=(0, 1, 2)) for k in range(10)])
    # mean colours of the classes are not all alike: the set is learnable
    assert np.ptp(means, axis=0).max() > 20


def test_cifar100_layout_fine_and_coarse(tmp_path):
    write_synthetic(tmp_path, "cifar100", train_per_class=2, test_per_class=1)
    fine = load_cifar(tmp_path, "cifar100", "fine", download=False)
    coarse = load_cifar(tmp_path, "cifar100", "coarse", download=False)
    assert fine.num_classes == 100 and coarse.num_classes == 20
    assert fine.train_y.max() == 99 and coarse.train_y.max() == 19
    assert coarse.name == "synthetic-cifar100-coarse"


def test_missing_folder_names_folder_files_and_flag(tmp_path):
    with pytest.raises(UserError) as e:
        load_cifar(tmp_path / "nowhere", "cifar10", download=False)
    msg = str(e.value)
    assert "cifar-10-batches-py" in msg and "data_batch_1" in msg and "--data-dir" in msg
    assert str(tmp_path / "nowhere") in msg


def test_corrupt_batch_names_the_file(tmp_path):
    folder = write_synthetic(tmp_path, "cifar10", train_per_class=5, test_per_class=1)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="data_batch_3"):
        load_cifar(tmp_path, "cifar10", download=False)


def test_wrong_shape_batch_is_refused(tmp_path):
    folder = write_synthetic(tmp_path, "cifar10", train_per_class=5, test_per_class=1)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((3, 100), np.uint8), "labels": [0, 1, 2]}, f)
    with pytest.raises(UserError, match=r"test_batch.*\(N, 3072\)"):
        load_cifar(tmp_path, "cifar10", download=False)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(UserError, match="cifar100"):
        load_dataset("mnist")


def test_dataset_folder_itself_is_accepted(synthetic_dir):
    data = load_cifar(synthetic_dir / "cifar-10-batches-py", "cifar10", download=False)
    assert len(data.train_y) == 500


def test_shared_real_subset(shared_data):
    data = load_cifar(shared_data, "cifar10", download=False)
    assert not data.synthetic
    assert data.train_x.shape == (5 * 813, 32, 32, 3)
    assert data.test_x.shape == (1020, 32, 32, 3)
    assert data.classes[:3] == ["airplane", "automobile", "bird"]
    assert set(np.unique(data.train_y)) == set(range(10))


def test_stratified_split_is_deterministic_disjoint_and_balanced():
    y = np.repeat(np.arange(10), 30)
    tr, va = stratified_split(y, 0.3, seed=1)
    tr2, va2 = stratified_split(y, 0.3, seed=1)
    np.testing.assert_array_equal(va, va2)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(y)
    assert np.bincount(y[va]).tolist() == [9] * 10
    with pytest.raises(UserError):
        stratified_split(y, 1.0, seed=0)


def test_augmentation_parsing_and_shapes(synthetic_dir):
    assert parse_augment("none") == ()
    assert parse_augment("crop,flip,rotate,zoom") == ("crop", "flip", "rotate", "zoom")
    with pytest.raises(UserError, match="valid"):
        parse_augment("crop,blur")
    data = load_cifar(synthetic_dir, "cifar10", download=False)
    ds = ImageArrayDataset(data.train_x[:4], data.train_y[:4], (0.5,) * 3, (0.25,) * 3, ("crop", "flip", "rotate"))
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype.is_floating_point
    plain = ImageArrayDataset(data.train_x[:1], data.train_y[:1], (0.5,) * 3, (0.25,) * 3)
    expected = (data.train_x[0].transpose(2, 0, 1) / 255.0 - 0.5) / 0.25
    np.testing.assert_allclose(plain[0][0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_serving_path_augmentation_goes_through_the_service_resize(monkeypatch):
    import service.preprocessing as sp

    img = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8))
    sizes, fit = [], sp.fit_image

    def spy(im, size):
        sizes.append((im.size, size))
        return fit(im, size)

    monkeypatch.setattr(sp, "fit_image", spy)
    torch.manual_seed(0)
    out = ServingPath(resample=True, jpeg=False, p=1.0)(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    assert len(sizes) == 1 and sizes[0][1] == 32 and 48 <= sizes[0][0][0] <= 512  # an upload-sized picture
    torch.manual_seed(0)
    assert torch.equal(ServingPath(resample=True, jpeg=False, p=1.0)(img), out)  # seeded: reproducible
    jpeg = ServingPath(resample=False, jpeg=True, p=1.0)(img)
    assert len(sizes) == 2  # JPEG alone never resizes
    assert not torch.equal(jpeg, img) and (jpeg.float() - img.float()).abs().mean() < 60
    assert torch.equal(ServingPath(resample=True, jpeg=True, p=0.0)(img), img)
    # --jpeg-quality: a one-quality range is exactly Pillow's JPEG at that quality; a bad range is refused
    buf = io.BytesIO()
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=40)
    pillow = np.asarray(Image.open(buf).convert("RGB"))
    out40 = ServingPath(resample=False, jpeg=True, p=1.0, quality=(40, 40))(img)
    assert np.array_equal(out40.permute(1, 2, 0).numpy(), pillow)
    for bad in ((90, 50), (0, 50), (50, 101), (50,)):
        with pytest.raises(UserError, match="--jpeg-quality"):
            ServingPath(resample=False, jpeg=True, quality=bad)
    assert parse_augment("crop,flip,color,resample,jpeg")[-2:] == ("resample", "jpeg")
    # the run's --serving-aug-p reaches the transform: at 0 a dataset with both serves its images untouched
    x = img.permute(1, 2, 0).numpy()[None]
    ds = ImageArrayDataset(x, np.zeros(1, dtype=np.int64), (0, 0, 0), (1, 1, 1), ("resample", "jpeg"), serving_p=0.0)
    assert ds.serving.p == 0.0
    torch.testing.assert_close(ds[0][0], ImageArrayDataset(x, np.zeros(1, dtype=np.int64), (0, 0, 0), (1, 1, 1))[0][0])


@pytest.mark.parametrize("n,batch_size,sizes", [(9, 4, [4, 4]), (10, 4, [4, 4, 2]), (1, 4, [1]), (3, 1, [1, 1]),
                                                (0, 4, [])])
def test_epoch_batches_reshuffle_and_drop_a_trailing_single(n, batch_size, sizes):
    sampler = EpochBatches(n, batch_size, seed=0)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        epochs.append(list(sampler))
    for batches in epochs:
        assert [len(b) for b in batches] == sizes and len(sampler) == len(sizes)
        flat = [i for b in batches for i in b]
        assert len(set(flat)) == len(flat) and set(flat) <= set(range(n))
    if n > 3:
        assert epochs[0] != epochs[1]  # a new order every epoch
    again = EpochBatches(n, batch_size, seed=0)
    again.set_epoch(2)
    assert list(again) == epochs[2]  # the seed and the epoch alone decide the order


def test_paired_items_are_the_served_and_the_clean_view_of_one_augmented_picture():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    y = np.zeros(1, dtype=np.int64)
    paired = ImageArrayDataset(x, y, (0, 0, 0), (1, 1, 1), ("flip", "jpeg"), serving_p=1.0, paired=True)
    torch.manual_seed(0)
    (served, clean), label = paired[0]
    assert label == 0 and served.shape == clean.shape == (3, 32, 32)
    torch.manual_seed(0)  # the clean view is what the plain picture augmentation gives with the same draws
    torch.testing.assert_close(clean, ImageArrayDataset(x, y, (0, 0, 0), (1, 1, 1), ("flip",))[0][0])
    assert 0 < (served - clean).abs().mean() < 0.25  # JPEG-compressed, still the same picture
