import numpy as np
import pytest
from PIL import Image

from artnet.config import AugmentConfig, ConfigError, PipelineConfig
from artnet.data import transforms
import conftest
from conftest import bad_files, jpeg_bytes, odd_but_good_files, painting, png_bytes

AUG = AugmentConfig()
LIMIT = 64_000_000


@pytest.mark.parametrize("name", sorted(odd_but_good_files()))
def test_any_mode_decodes_to_rgb(name):
    out = transforms.preprocess(odd_but_good_files()[name], 64, LIMIT, AUG)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert out.std() > 5 or name == "one_pixel.png", "the picture survived decoding (not blank)"


def test_one_pixel_fills_the_crop_with_its_colour():
    img = transforms.decode(odd_but_good_files()["one_pixel.png"], 64, LIMIT)
    assert (transforms.affine_crop(img, 64) == (200, 30, 60)).all()


def test_exif_orientation_is_applied():
    """Stored 96 wide and 64 high, shown (and decoded) 64 wide and 96 high, the stored left edge on top."""
    stored = np.zeros((64, 96, 3), np.uint8)
    stored[:, :10] = (255, 0, 0)  # a red band down the stored left edge
    out = np.asarray(transforms.decode(conftest.exif_rotated_jpeg(stored), 64, LIMIT))
    assert out.shape == (96, 64, 3)
    assert out[:8].mean(axis=(0, 1))[0] > 200 and out[-8:].mean(axis=(0, 1))[0] < 50


@pytest.mark.parametrize("name", sorted(bad_files()))
def test_bad_input_raises_bad_image_with_reason(name):
    with pytest.raises(transforms.BadImage) as err:
        transforms.preprocess(bad_files()[name], 64, LIMIT, AUG)
    expected = {"zero_byte.jpg": "empty", "not_an_image.jpg": "not_an_image", "truncated.jpg": "corrupt",
                "corrupt.jpg": "corrupt", "huge.png": "too_large", "html.jpg": "not_an_image"}[name]
    assert err.value.reason == expected


def test_transparent_pixels_become_white_and_opaque_keep_colour():
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[:, :20] = (255, 0, 0, 255)  # opaque red left half
    rgba[:, 20:] = (0, 0, 255, 0)    # fully transparent right half
    out = np.asarray(transforms.decode(png_bytes(Image.fromarray(rgba, "RGBA")), 40, LIMIT))
    assert tuple(out[20, 5]) == (255, 0, 0)
    assert tuple(out[20, 35]) == (255, 255, 255)


def test_sixteen_bit_range_maps_onto_eight_bits():
    arr = np.full((40, 40), 65535, np.uint16)
    arr[:, :20] = 0
    out = np.asarray(transforms.decode(png_bytes(Image.fromarray(arr)), 40, LIMIT))
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 39].tolist() == [255, 255, 255]


def test_cmyk_jpeg_keeps_its_colours():
    red = np.zeros((64, 64, 3), np.uint8)
    red[..., 0] = 220
    out = np.asarray(transforms.decode(jpeg_bytes(red, "CMYK"), 64, LIMIT), np.int32)
    assert out[..., 0].mean() > 180 and out[..., 1].mean() < 60 and out[..., 2].mean() < 60


def test_large_jpeg_uses_draft_mode_downscale():
    big = jpeg_bytes(painting(3, size=(1600, 1200)))
    img = transforms.decode(big, 299, LIMIT)
    assert img.shape == (300, 400, 3), "decoded at 1/4 scale in the DCT domain, still >= the target"


def test_pixel_limit_is_configurable():
    data = jpeg_bytes(painting(4, size=(300, 200)))
    with pytest.raises(transforms.BadImage, match="too_large"):
        transforms.decode(data, 64, max_pixels=300 * 200 - 1)
    assert min(transforms.decode(data, 64, max_pixels=300 * 200).shape[:2]) >= 64


def test_augmentation_is_deterministic_for_a_seed_and_varies_across_seeds():
    data = jpeg_bytes(painting(5, size=(200, 160)))
    a = transforms.preprocess(data, 96, LIMIT, AUG, np.random.default_rng(7))
    b = transforms.preprocess(data, 96, LIMIT, AUG, np.random.default_rng(7))
    c = transforms.preprocess(data, 96, LIMIT, AUG, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1


def halves() -> np.ndarray:
    arr = np.zeros((100, 100, 3), np.uint8)
    arr[:, :50] = (255, 0, 0)
    arr[:, 50:] = (0, 0, 255)
    return arr


def test_identity_is_centre_crop_and_flip_mirrors():
    wide = np.zeros((100, 200, 3), np.uint8)
    wide[:, :50] = 255  # only the left quarter is white: outside the centre square
    assert transforms.affine_crop(wide, 50).max() == 0
    plain = transforms.affine_crop(halves(), 50)
    flipped = transforms.affine_crop(halves(), 50, transforms.Affine(flip=True))
    assert plain[25, 5, 0] == 255 and plain[25, 45, 2] == 255
    assert flipped[25, 5, 2] == 255 and flipped[25, 45, 0] == 255


def test_shift_moves_content_and_rotation_turns_it():
    shifted = transforms.affine_crop(halves(), 50, transforms.Affine(shift_x=0.3))
    assert shifted[25, 25, 2] == 255, "shifting right by 30% puts the blue half under the centre"
    turned = transforms.affine_crop(halves(), 50, transforms.Affine(rotation=90))
    top, bottom = turned[5, 25], turned[45, 25]
    assert {int(np.argmax(top)), int(np.argmax(bottom))} == {0, 2}, "a quarter turn makes the split horizontal"


def test_no_grey_fill_at_the_borders_under_augmentation():
    data = jpeg_bytes(np.full((120, 120, 3), (10, 200, 10), np.uint8))
    cfg = AugmentConfig(rotation=20, shift=0.15, zoom=0.2, brightness=0, contrast=0, saturation=0)
    for seed in range(10):
        out = transforms.preprocess(data, 64, LIMIT, cfg, np.random.default_rng(seed))
        assert (np.abs(out.astype(int) - (10, 200, 10)).max(axis=-1) < 30).all()


def test_standardize_whitens_each_image():
    data = jpeg_bytes(painting(6, colour=(250, 250, 250)))
    out = transforms.preprocess(data, 64, LIMIT, AugmentConfig(standardize=True)).astype(np.float32)
    assert abs(out.mean() - 127.5) < 3 and abs(out.std() - 64) < 6


@pytest.mark.parametrize("changes,field", [
    ({"image_size": 8}, "data.image_size"),
    ({"batch_size": 0}, "data.batch_size"),
    ({"augment": AugmentConfig(zoom=1.5)}, "data.augment.zoom"),
    ({"augment": AugmentConfig(rotation=-1)}, "data.augment.rotation"),
])
def test_bad_pipeline_config_names_the_field(changes, field):
    with pytest.raises(ConfigError) as err:
        PipelineConfig(**changes).validate()
    assert err.value.field == field and "Fix:" in str(err.value)


def test_colour_jitter_matrix_equals_stepwise_definition():
    img = painting(9, size=(60, 50))
    cfg = AugmentConfig(brightness=0.3, contrast=0.3, saturation=0.3)
    out = np.asarray(transforms.colour_jitter(img.copy(), np.random.default_rng(3), cfg), np.float32)
    r = np.random.default_rng(3)
    b, c, s = r.uniform(0.7, 1.3), r.uniform(0.7, 1.3), r.uniform(0.7, 1.3)
    x = np.asarray(img, np.float32) * b
    x = (x - x.mean()) * c + x.mean()
    grey = (x @ transforms.GREY_WEIGHTS)[..., None]
    expected = np.clip(grey + (x - grey) * s, 0, 255)
    assert np.abs(expected - out).max() <= 0.6  # rounding to uint8 (0.5) plus float32 arithmetic


def _reflect(i: np.ndarray, n: int) -> np.ndarray:
    """numpy's 'reflect' padding as an index map (edge pixel not repeated), any number of reflections."""
    if n == 1:
        return np.zeros_like(i)
    i = np.abs(i) % (2 * n - 2)
    return np.where(i >= n, 2 * n - 2 - i, i)


def reference_affine_crop(arr: np.ndarray, size: int, t: transforms.Affine) -> np.ndarray:
    """The definition, in float64 numpy: output pixel centre (x+0.5, y+0.5) maps through `affine_matrix` (PIL's
    pixel-edge convention) to a source point, sampled bilinearly from the mirrored source."""
    height, width = arr.shape[:2]
    a, b, c, d, e, f = transforms.affine_matrix(t, (width, height), size)
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    sx, sy = a * xs + b * ys + c - 0.5, d * xs + e * ys + f - 0.5
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    px = lambda y, x: arr.astype(np.float64)[_reflect(y, height), _reflect(x, width)]
    return (px(y0, x0) * (1 - fx) * (1 - fy) + px(y0, x0 + 1) * fx * (1 - fy)
            + px(y0 + 1, x0) * (1 - fx) * fy + px(y0 + 1, x0 + 1) * fx * fy)


@pytest.mark.parametrize("source", ["painting", "tiny"])
def test_affine_crop_equals_its_definition(source):
    """OpenCV's fixed-point warp against the float definition, under strong augmentations: within 1 level
    everywhere, 0.3 on average (measured: 0.50 and 0.24 on real paintings). A tiny source reaches several
    reflections out."""
    arr = painting(11, size=(160, 120)) if source == "painting" else painting(12, size=(7, 5))
    cfg = AugmentConfig(rotation=30, shift=0.2, shear=10, zoom=0.3, hflip=True)
    rng = np.random.default_rng(0)
    for _ in range(8):
        t = transforms.sample_affine(rng, cfg)
        diff = np.abs(transforms.affine_crop(arr, 96, t) - reference_affine_crop(arr, 96, t))
        assert diff.max() <= 1.0 and diff.mean() <= 0.3, t


def test_preprocessing_into_a_batch_slot_gives_the_same_image():
    data = jpeg_bytes(painting(13, size=(200, 160)))
    cfg = AugmentConfig(standardize=True)
    batch = np.zeros((3, 64, 64, 3), np.uint8)
    got = transforms.preprocess(data, 64, LIMIT, cfg, np.random.default_rng(2), out=batch[1])
    assert np.shares_memory(got, batch)
    np.testing.assert_array_equal(batch[1], transforms.preprocess(data, 64, LIMIT, cfg, np.random.default_rng(2)))
    assert batch[0].max() == batch[2].max() == 0, "neighbouring slots untouched"
