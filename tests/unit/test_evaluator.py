import numpy as np
import pytest

from redi_demo import dataset, evaluator


def test_wrong_size_or_count_refused():
    with pytest.raises(ValueError, match="64 x 64 x 3"):
        evaluator.psnr(np.zeros((2, 32, 32, 3), np.uint8), np.zeros((2, 32, 32, 3), np.uint8))
    net = evaluator.EvalNet().eval()
    imgs, samples = evaluator.real_images(3, 0)
    with pytest.raises(ValueError, match="3 images for 2 prompts"):
        evaluator.accuracy(net, imgs, samples[:2])
    with pytest.raises(ValueError, match="no images"):
        evaluator.predict(net, np.zeros((0, 64, 64, 3), np.uint8))


def test_psnr_ssim_identity_and_difference():
    imgs, _ = evaluator.real_images(4, 1)
    assert np.all(evaluator.ssim(imgs, imgs) > 0.999)
    assert np.all(evaluator.psnr(imgs, imgs) > 90)
    noisy = np.clip(imgs.astype(int) + np.random.default_rng(0).integers(-40, 40, imgs.shape), 0, 255).astype(np.uint8)
    assert np.all(evaluator.ssim(noisy, imgs) < 0.9)
    assert np.all(evaluator.psnr(noisy, imgs) < 30)


def test_frechet_distance_zero_for_same_and_grows_with_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    assert evaluator.frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    assert evaluator.frechet_distance(a, a + 1.0) == pytest.approx(8.0, rel=0.05)


def test_shipped_evaluator_is_accurate_on_real_images():
    net = evaluator.load()
    imgs, samples = evaluator.real_images(300, 2024)
    acc = evaluator.accuracy(net, imgs, samples)
    assert min(acc.values()) >= 0.97, acc


def test_dataset_is_deterministic_and_covers_vocabulary():
    a = dataset.render_batch(dataset.random_samples(50, 3), jitter_seed=1)
    b = dataset.render_batch(dataset.random_samples(50, 3), jitter_seed=1)
    np.testing.assert_array_equal(a, b)
    truth = dataset.attribute_array(dataset.random_samples(2000, 5))
    for name, values in dataset.ATTRIBUTES.items():
        assert set(truth[name]) == set(range(len(values))), name
    assert len(dataset.SHAPES) >= 4 and len(dataset.COLOURS) >= 6 and len(dataset.POSITIONS) >= 5
    assert len(dataset.SIZES) >= 2 and len(dataset.BACKGROUNDS) >= 4 and len(dataset.STYLES) - 1 >= 4


def _sample(**values: str) -> dataset.Sample:
    chosen = {"shape": "square", "colour": "red", "position": "center", "size": "large", "background": "white",
              "style": "plain", **values}
    return dataset.Sample({k: dataset.ATTRIBUTES[k].index(v) for k, v in chosen.items()}, 0, 0)


def test_textures_shade_the_whole_object_on_the_latent_grid():
    # The autoencoder's 8-pixel latent cells carry a texture only when it repeats on that grid and
    # keeps the cell's colour the object's: no holes, a darker shade of the object's own colour.
    plain = dataset.render(_sample())
    on_object = (plain != dataset.BACKGROUNDS["white"]).any(-1)
    for style in ("striped", "dotted", "outlined"):
        img = dataset.render(_sample(style=style))
        assert np.array_equal((img != dataset.BACKGROUNDS["white"]).any(-1), on_object), style
        shaded = (img != plain).any(-1)
        assert shaded.any() and not shaded[~on_object].any(), style
        assert (img[shaded] == (88, 16, 16)).all(), style  # red (220, 40, 40) at 0.4
        if style != "outlined":
            inner = shaded[24:32, 24:40]
            assert np.array_equal(inner, shaded[32:40, 24:40]) and np.array_equal(inner[:, :8], inner[:, 8:]), style
