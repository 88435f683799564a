"""Property-based fuzzing of the decode/transform path (hypothesis, a bounded and derandomised number of cases):
whatever the bytes and the augmentation drawn, preprocessing returns a (size, size, 3) uint8 image or raises
`BadImage`, which the pipeline counts and skips; nothing else escapes to crash a decoding worker."""

import numpy as np
from PIL import Image
from hypothesis import given, settings
from hypothesis import strategies as st

from artnet.config import AugmentConfig
from artnet.data import transforms
from conftest import jpeg_bytes, odd_but_good_files, painting, png_bytes

SIZE, LIMIT = 32, 4_000_000
SOURCES = [jpeg_bytes(painting(5)), png_bytes(Image.fromarray(painting(6))), *odd_but_good_files().values()]
FUZZ = settings(max_examples=400, deadline=None, derandomize=True)


def decoded_or_bad(data: bytes, augment: AugmentConfig, seed: int | None) -> np.ndarray | None:
    rng = None if seed is None else np.random.default_rng(seed)
    try:
        out = transforms.preprocess(data, SIZE, LIMIT, augment, rng)
    except transforms.BadImage as e:
        assert e.reason in {"empty", "not_an_image", "corrupt", "too_large", "unsupported_mode"}
        return None
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    return out


@FUZZ
@given(source=st.sampled_from(range(len(SOURCES))),
       edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=24),
       cut=st.one_of(st.none(), st.integers(0, 1 << 20)), seed=st.one_of(st.none(), st.integers(0, 1000)))
def test_damaged_images_decode_or_are_reported_bad(source, edits, cut, seed):
    data = bytearray(SOURCES[source])
    for position, value in edits:
        data[position % len(data)] = value
    if cut is not None:
        data = data[:cut % (len(data) + 1)]
    decoded_or_bad(bytes(data), AugmentConfig(), seed)


@FUZZ
@given(data=st.binary(max_size=2048))
def test_arbitrary_bytes_are_reported_bad_or_decoded(data):
    decoded_or_bad(data, AugmentConfig(), None)


@FUZZ
@given(source=st.sampled_from(range(len(SOURCES))), seed=st.integers(0, 10_000),
       rotation=st.floats(0, 180), shift=st.floats(0, 0.49), shear=st.floats(0, 45), zoom=st.floats(0, 0.9),
       jitter=st.floats(0, 1), hflip=st.booleans(), standardize=st.booleans())
def test_any_augmentation_in_range_gives_a_valid_image(source, seed, rotation, shift, shear, zoom, jitter, hflip,
                                                        standardize):
    augment = AugmentConfig(rotation=rotation, shift=shift, shear=shear, zoom=zoom, hflip=hflip, brightness=jitter,
                            contrast=jitter, saturation=jitter, standardize=standardize)
    augment.validate()
    out = decoded_or_bad(SOURCES[source], augment, seed)
    assert out is not None, "a good image never becomes a bad one under augmentation"
