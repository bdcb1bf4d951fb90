"""The synthetic teaching dataset (sparx_ref.data.synthetic): determinism, shapes, balance."""
import numpy as np
import pytest

from sparx_ref.data import synthetic
from sparx_ref.data.synthetic import CLASS_NAMES, NUM_CLASSES, generate, make_dataset


@pytest.fixture(scope="module")
def splits():
    return make_dataset()


def test_sizes_shapes_dtypes(splits):
    train, test = splits
    assert len(train) >= 5000 and len(test) >= 1000
    for split in (train, test):
        assert split.images.shape == (len(split), 3, 32, 32)
        assert split.images.dtype == np.float32 and split.labels.dtype == np.int64
        assert np.all(np.isfinite(split.images))
    assert len(CLASS_NAMES) == NUM_CLASSES == 10


def test_classes_balanced_and_shuffled(splits):
    for split in splits:
        counts = np.bincount(split.labels, minlength=NUM_CLASSES)
        assert np.all(counts == len(split) // NUM_CLASSES)
        # shuffled: the first 100 labels are not one class block
        assert len(np.unique(split.labels[:100])) == NUM_CLASSES


def test_deterministic_and_seed_dependent():
    a = generate(20, seed=3)
    b = generate(20, seed=3)
    c = generate(20, seed=4)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)


def test_held_out_is_not_a_copy_of_train(splits):
    train, test = splits
    # no held-out image equals any training image (compare a cheap fingerprint, then exactly)
    fp_train = {hash(im.tobytes()) for im in train.images}
    assert not any(hash(im.tobytes()) in fp_train for im in test.images)


def test_normalisation_constants_match_training_split(splits):
    train, _ = splits
    mean = train.images.mean(axis=(0, 2, 3))
    std = train.images.std(axis=(0, 2, 3))
    np.testing.assert_allclose(mean, synthetic.MEAN, atol=0.03)
    np.testing.assert_allclose(std, synthetic.STD, atol=0.03)


def test_paired_classes_share_parts_but_differ_in_arrangement():
    # "bar left of dot" mirrored left-right is a "dot left of bar" image: same ink, other class.
    d = generate(200, seed=11)
    a = d.images[d.labels == 0]
    b = d.images[d.labels == 1]
    # column-wise ink profile: class 0 has more contrast on the left half than class 1
    def left_minus_right(x):
        dev = np.abs(x - np.median(x, axis=(2, 3), keepdims=True)).mean(axis=(1, 2))  # (n, W)
        return (dev[:, :16].sum(1) - dev[:, 16:].sum(1)).mean()
    assert left_minus_right(a) * left_minus_right(b) < 0  # opposite signs
    # ink amount is similar for the two (same parts)
    ink_a = np.abs(a - np.median(a, axis=(2, 3), keepdims=True)).mean()
    ink_b = np.abs(b - np.median(b, axis=(2, 3), keepdims=True)).mean()
    assert abs(ink_a - ink_b) / ink_a < 0.1


@pytest.mark.parametrize("bad", [0, -5, 2.5])
def test_bad_arguments(bad):
    with pytest.raises(ValueError, match="n_per_class"):
        generate(bad)
    with pytest.raises(ValueError, match="n_train"):
        make_dataset(n_train=bad)
