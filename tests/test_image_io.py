"""d3sr_core.image_io: every PIL mode read with its real range, EXIF orientation, atomic PNG
writes, one extension list. References: the values written into the file (hand-made 16-bit
files, tests/image_files.py) or PIL's own conversion for 8-bit modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from image_files import write_png16, write_tiff_rgb16
from PIL import Image, ImageOps

from d3sr_core import image_io
from d3sr_core.image_io import ImageReadError, load_image, read_image


def _rgb(image: torch.Tensor) -> np.ndarray:
    assert image.shape[0] == 1 and image.shape[-1] == 3 and image.dtype == torch.float32
    return image[0].numpy()


def _grey16(values: np.ndarray) -> np.ndarray:
    return np.repeat((values.astype(np.float32) / np.float32(65535))[..., None], 3, axis=-1)


RNG = np.random.default_rng(0)
U16 = RNG.integers(0, 65536, size=(13, 11, 4)).astype(np.uint16)
U16[0, 0], U16[0, 1] = 65535, 0            # both ends of the range


def test_16bit_grey_png_keeps_its_range(tmp_path):
    values = U16[..., 0]
    Image.fromarray(values).save(tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode.startswith("I;16")   # what PIL makes of it (the old reader clipped it white)
    np.testing.assert_array_equal(_rgb(load_image(tmp_path / "g.png")), _grey16(values))


@pytest.mark.parametrize("interlace", [False, True])
@pytest.mark.parametrize("channels", [2, 3, 4])
def test_16bit_colour_png_keeps_all_16_bits(tmp_path, channels, interlace):
    values = U16[..., :channels]
    write_png16(tmp_path / "c.png", values, interlace=interlace)
    expected = _grey16(values[..., 0]) if channels == 2 else values[..., :3].astype(np.float32) / np.float32(65535)
    np.testing.assert_allclose(_rgb(load_image(tmp_path / "c.png")), expected, rtol=0, atol=1e-7)
    low_bits = (values[..., :3 if channels > 2 else 1] % 256).astype(np.float32)
    assert low_bits.std() > 10   # the low bytes carry information a high-byte reader would drop


def test_16bit_rgb_tiff_keeps_all_16_bits(tmp_path):
    write_tiff_rgb16(tmp_path / "c.tif", U16[..., :3])
    expected = U16[..., :3].astype(np.float32) / np.float32(65535)
    np.testing.assert_allclose(_rgb(load_image(tmp_path / "c.tif")), expected, rtol=0, atol=1e-7)


def test_float_tiff_is_kept_as_float(tmp_path):
    values = np.linspace(-0.25, 1.5, 9 * 7, dtype=np.float32).reshape(9, 7)
    Image.fromarray(values, mode="F").save(tmp_path / "f.tif")
    out = _rgb(load_image(tmp_path / "f.tif"))
    np.testing.assert_array_equal(out, np.repeat(values[..., None], 3, axis=-1))


def test_nan_pixels_are_refused(tmp_path):
    values = np.full((5, 6), 0.5, dtype=np.float32)
    values[2, 3] = np.nan
    values[4, 0] = np.inf
    Image.fromarray(values, mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(ImageReadError, match=r"nan\.tif has 2 pixel\(s\) with NaN or infinite"):
        read_image(tmp_path / "nan.tif")


def test_32bit_integer_image(tmp_path):
    values = U16[..., 0].astype(np.int32)
    Image.fromarray(values).save(tmp_path / "i.tif")
    with Image.open(tmp_path / "i.tif") as im:
        assert im.mode == "I"
    np.testing.assert_array_equal(read_image(tmp_path / "i.tif"), _grey16(values))
    Image.fromarray(values * 4 - 7).save(tmp_path / "wide.tif")
    with pytest.raises(ImageReadError, match="outside the 16-bit range"):
        read_image(tmp_path / "wide.tif")


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr"])
def test_8bit_modes_match_pils_rgb(tmp_path, mode):
    base = Image.fromarray(RNG.integers(0, 256, size=(10, 12, 4)).astype(np.uint8), mode="RGBA")
    image = base.convert(mode) if "A" in mode else base.convert("RGB").convert(mode)
    path = tmp_path / ("x.tif" if mode in ("CMYK", "YCbCr") else "x.png")
    image.save(path)
    with Image.open(path) as im:
        expected = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    np.testing.assert_array_equal(read_image(path), expected)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_as_pil_applies_it(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    rgb = Image.fromarray(RNG.integers(0, 256, size=(5, 8, 3)).astype(np.uint8))
    rgb.save(tmp_path / "o.png", exif=exif)
    with Image.open(tmp_path / "o.png") as im:
        expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.float32) / 255.0
    np.testing.assert_array_equal(read_image(tmp_path / "o.png"), expected)
    # The same orientation on a 16-bit grey file (which exif_transpose + convert would clip).
    grey = Image.fromarray(U16[:5, :8, 0])
    grey.save(tmp_path / "g.png", exif=exif)
    with Image.open(tmp_path / "g.png") as im:
        upright = np.asarray(ImageOps.exif_transpose(im))
    np.testing.assert_array_equal(read_image(tmp_path / "g.png"), _grey16(upright))
    assert image_io.image_size(tmp_path / "g.png") == (8, 5)   # as stored


@pytest.mark.parametrize("content", [b"", b"not an image", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00"])
def test_unreadable_files_give_one_line(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(ImageReadError) as err:
        load_image(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ImageReadError):
        image_io.image_size(path)


def test_truncated_png_is_an_error(tmp_path):
    Image.fromarray(RNG.integers(0, 256, size=(64, 64, 3)).astype(np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cannot read image"):
        read_image(tmp_path / "t.png")


def test_png_writers_round_trip_and_refuse_nan(tmp_path):
    image = torch.rand(1, 6, 7, 3, generator=torch.Generator().manual_seed(1))
    image_io.save_png_atomic(image, tmp_path / "a.png")
    image_io.save_png_atomic_chw(image.permute(0, 3, 1, 2), tmp_path / "b.png")
    expected = np.round(image[0].numpy() * 255.0) / 255.0
    for name in ("a.png", "b.png"):
        np.testing.assert_allclose(read_image(tmp_path / name), expected, rtol=0, atol=1e-7)
    image[0, 2, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="1 NaN or infinite value"):
        image_io.save_png_atomic(image, tmp_path / "nan.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]   # nothing half-written


def test_training_crops_keep_16_bits(tmp_path):
    from training.data import CropDataset, list_images, scan_images

    write_png16(tmp_path / "hr.png", U16[:12, :11, :3])
    write_tiff_rgb16(tmp_path / "hr.tif", U16[:12, :11, :3])
    paths, unreadable = scan_images(list_images([str(tmp_path)]), crop=11)
    assert [p[-6:] for p in paths] == ["hr.png", "hr.tif"] and not unreadable
    expected = torch.from_numpy(U16[:11, :11, :3].astype(np.float32) / np.float32(65535)).permute(2, 0, 1)
    for index in range(2):
        crop = CropDataset(paths, crop=11)[(index, 0)]    # 12 rows: one of two row offsets
        assert crop.shape == (3, 11, 11) and crop.dtype == torch.float32
        shifted = torch.from_numpy(U16[1:12, :11, :3].astype(np.float32) / np.float32(65535)).permute(2, 0, 1)
        candidates = [e for e in (expected, shifted) for e in (e, e.flip(-1))]
        assert any(torch.allclose(crop, c, rtol=0, atol=1e-7) for c in candidates)


def test_one_extension_list():
    from d3sr_core import __main__ as cli
    from training import data, evaluate
    assert cli.IMAGE_EXTENSIONS is data.IMAGE_EXTENSIONS is evaluate.IMAGE_EXTENSIONS is image_io.IMAGE_EXTENSIONS
    assert {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"} <= set(image_io.IMAGE_EXTENSIONS)
