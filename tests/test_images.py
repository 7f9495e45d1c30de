"""renoise.images: files, PIL and [-1, 1] tensors; fitting to multiples of 8."""
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from PIL import Image

from renoise import images


def random_pil(h, w, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray(rng.integers(0, 256, (h, w, channels), dtype=np.uint8), mode)


@given(h=st.integers(1, 40), w=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_pil_tensor_round_trip_is_exact(h, w, seed):
    im = random_pil(h, w, seed)
    t = images.to_tensor(im)
    assert t.shape == (1, 3, h, w) and t.dtype == torch.float32
    assert t.min() >= -1 and t.max() <= 1
    assert np.array_equal(np.asarray(images.to_pil(t)[0]), np.asarray(im))


def test_tensor_values_and_layout():
    arr = np.zeros((2, 3, 3), np.uint8)
    arr[0, 1] = (255, 0, 128)
    t = images.to_tensor(Image.fromarray(arr))
    assert t[0, :, 0, 1].tolist() == pytest.approx([1.0, -1.0, 128 / 127.5 - 1], abs=1e-6)
    assert t[0, :, 1, 2].tolist() == [-1.0, -1.0, -1.0]


def test_to_pil_clamps_out_of_range():
    t = torch.tensor([-3.0, 0.0, 5.0]).view(1, 3, 1, 1)
    assert np.asarray(images.to_pil(t)[0])[0, 0].tolist() == [0, 128, 255]


@given(h=st.integers(8, 90), w=st.integers(8, 90))
def test_crop_is_centred_and_multiple_of_8(h, w):
    im = random_pil(h, w)
    out = images.fit(im, mode="crop")
    ow, oh = out.size
    assert (oh, ow) == (h // 8 * 8, w // 8 * 8)
    top, left = (h - oh) // 2, (w - ow) // 2
    assert np.array_equal(np.asarray(out), np.asarray(im)[top:top + oh, left:left + ow])


@given(h=st.integers(4, 90), w=st.integers(4, 90))
def test_resize_goes_to_nearest_multiple(h, w):
    out = images.fit(random_pil(h, w), mode="resize")
    ow, oh = out.size
    assert oh % 8 == 0 and ow % 8 == 0
    assert abs(oh - h) <= 4 or oh == 8
    assert abs(ow - w) <= 4 or ow == 8


def test_size_covers_then_crops_keeping_aspect():
    im = random_pil(30, 60)                     # 1:2, landscape
    out = images.fit(im, size=(48, 64), mode="none")
    assert out.size == (64, 48)
    # the 1:2 image is scaled to 48 rows (96 columns) and the centre 64 columns kept
    ref = np.asarray(im.resize((96, 48), Image.Resampling.LANCZOS))[:, 16:80]
    assert np.array_equal(np.asarray(out), ref)


@pytest.mark.parametrize("h,w", [(64, 48), (48, 64), (32, 32), (8, 128)])
def test_any_aspect_ratio_kept_when_already_fitting(h, w):
    im = random_pil(h, w)
    for mode in images.MODES:
        assert np.array_equal(np.asarray(images.fit(im, mode=mode)), np.asarray(im))


def test_mode_none_refuses_wrong_size():
    with pytest.raises(images.ImageError, match="not a multiple of 8"):
        images.fit(random_pil(33, 32), mode="none")


def test_unknown_mode_and_tiny_image():
    with pytest.raises(images.ImageError, match="unknown image fit mode"):
        images.fit(random_pil(8, 8), mode="stretch")
    with pytest.raises(images.ImageError, match="smaller than 8"):
        images.fit(random_pil(5, 20), mode="crop")


def test_rgba_composited_on_white():
    arr = np.zeros((8, 8, 4), np.uint8)           # fully transparent black
    out = images.fit(Image.fromarray(arr, "RGBA"))
    assert out.mode == "RGB" and np.asarray(out).min() == 255


def test_file_round_trip_and_batches(tmp_path):
    a, b = random_pil(40, 24, 1), random_pil(40, 24, 2)
    for im, name in ((a, "a.png"), (b, "b.png")):
        images.save_image(images.to_tensor(im)[0], tmp_path / name)
    t = images.load_images([tmp_path / "a.png", tmp_path / "b.png"])
    assert t.shape == (2, 3, 40, 24)
    assert torch.equal(t, images.to_tensor([a, b]))


def test_batch_of_different_sizes_refused(tmp_path):
    random_pil(16, 16).save(tmp_path / "a.png")
    random_pil(24, 16).save(tmp_path / "b.png")
    with pytest.raises(images.ImageError, match="share a size"):
        images.load_images([tmp_path / "a.png", tmp_path / "b.png"])
    assert images.load_images([tmp_path / "a.png", tmp_path / "b.png"], size=16).shape == (2, 3, 16, 16)


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(images.ImageError, match="cannot read image"):
        images.load_image(bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        images.load_image(tmp_path / "missing.png")
    with pytest.raises(images.ImageError, match="unknown image file type"):
        images.save_image(random_pil(8, 8), tmp_path / "x.unknownext")


def test_exif_orientation_applied(tmp_path):
    im = random_pil(16, 24)
    exif = Image.Exif()
    exif[0x0112] = 6                                  # "rotate 90° clockwise to display"
    im.save(tmp_path / "phone.jpg", exif=exif, quality=100)
    loaded = images.load_image(tmp_path / "phone.jpg", mode="none")
    assert loaded.size == (16, 24)                    # displayed upright: 24 rows, 16 columns
