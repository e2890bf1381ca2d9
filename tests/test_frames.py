"""Frames as users export them: 16-bit greyscale PNG/TIFF windowed (not clipped to white), blank frames refused."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from PIL import Image
from skimage.exposure import rescale_intensity

import vesselnb.frames as frames_module
from vesselnb.errors import DataError
from vesselnb.frames import open_frame_rgb, window_to_uint8


def _angiogram_like(shape=(48, 64), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    background = np.linspace(9000, 14000, shape[1])[None, :].repeat(shape[0], axis=0)
    background[20:24, :] = 3000  # a dark "vessel"
    return (background + rng.normal(0, 200, shape)).clip(0, 65535).astype(np.uint16)


def test_doctests() -> None:
    assert doctest.testmod(frames_module).failed == 0


def test_windowing_matches_scikit_image() -> None:
    pixels = _angiogram_like()
    reference = np.rint(rescale_intensity(pixels.astype(np.float64), out_range=(0.0, 255.0))).astype(np.uint8)
    assert np.array_equal(window_to_uint8(pixels), reference)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_greyscale_is_windowed_not_white(tmp_path, suffix) -> None:
    pixels = _angiogram_like()
    path = tmp_path / f"frame{suffix}"
    Image.fromarray(pixels).save(path)
    with Image.open(path) as written:
        assert written.mode.startswith("I")  # really a 16-bit file
        assert np.asarray(written.convert("RGB")).min() == 255  # what PIL alone makes of it: all white
    rgb = np.asarray(open_frame_rgb(path))
    assert rgb.shape == (*pixels.shape, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[..., 0], window_to_uint8(pixels))
    assert rgb[21, :, 0].mean() < 60 < rgb[5, :, 0].mean()  # the vessel stays dark, the background light


@pytest.mark.parametrize(("value", "word"), [(255, "saturated"), (0, "black"), (77, "constant")])
def test_constant_frame_is_refused_naming_the_file(tmp_path, value, word) -> None:
    path = tmp_path / "blank.png"
    Image.fromarray(np.full((16, 16), value, dtype=np.uint8)).save(path)
    with pytest.raises(DataError, match=rf"blank\.png: the frame is {word}"):
        open_frame_rgb(path)


def test_8_bit_rgb_frame_is_unchanged(tmp_path) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    path = tmp_path / "rgb.png"
    Image.fromarray(rgb).save(path)
    assert np.array_equal(np.asarray(open_frame_rgb(path)), rgb)


# --- DICOM (written with pydicom, read back through vesselnb) -------------------------------------------------------
def _write_dicom(path, pixels: np.ndarray, *, window=None, patient=("Chen^Fang", "0000103366"), series=4,
                 instance=None, photometric="MONOCHROME2", slope=None, intercept=None):
    """A real DICOM file (explicit VR little endian, uncompressed); multi-frame when ``pixels`` is (frames, H, W)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, XRayAngiographicImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = XRayAngiographicImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = patient
    ds.SeriesNumber, ds.SeriesInstanceUID, ds.Modality = series, generate_uid(), "XA"
    if instance is not None:
        ds.InstanceNumber = instance
    frames = pixels if pixels.ndim == 3 else pixels[None]
    if pixels.ndim == 3:
        ds.NumberOfFrames = frames.shape[0]
    ds.Rows, ds.Columns = frames.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = frames.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def test_single_frame_dicom_uses_its_window_and_says_so(tmp_path) -> None:
    from vesselnb.frames import load_frame, window_centre_width

    pixels = _angiogram_like()
    path = _write_dicom(tmp_path / "run.dcm", pixels, window=(9000, 8000))
    frame = load_frame(path)
    assert frame.windowing == "DICOM window centre 9000 width 8000"
    grey = np.asarray(frame.image)[..., 0]
    assert np.array_equal(grey, window_centre_width(pixels, 9000, 8000))
    assert grey[21].mean() < 10 and grey[5].mean() > 100  # vessel (3000) below the window: black
    minmax = load_frame(path, windowing="minmax")
    assert minmax.windowing.startswith("min-max 2") and np.array_equal(np.asarray(minmax.image)[..., 0],
                                                                       window_to_uint8(pixels))


def test_dicom_without_window_is_min_max_after_rescale_and_monochrome1_is_inverted(tmp_path) -> None:
    from vesselnb.frames import load_frame

    pixels = _angiogram_like()
    path = _write_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1", slope=2, intercept=-100)
    frame = load_frame(path)
    assert "min-max" in frame.windowing and "MONOCHROME1 inverted" in frame.windowing
    assert f"{2 * float(pixels.min()) - 100:g}" in frame.windowing  # the rescale was applied before windowing
    assert np.array_equal(np.asarray(frame.image)[..., 0], 255 - window_to_uint8(pixels))


def test_constant_dicom_frame_is_refused(tmp_path) -> None:
    from vesselnb.frames import load_frame

    cine = np.stack([_angiogram_like(), np.full((48, 64), 4000, np.uint16)])
    path = _write_dicom(tmp_path / "cine.dcm", cine)
    assert load_frame(f"{path}#frame=0").windowing.startswith("min-max")
    with pytest.raises(DataError, match=r"cine\.dcm#frame=1: the frame is black"):
        load_frame(f"{path}#frame=1")


def test_multi_frame_dicom_is_one_sample_per_frame_from_its_tags(tmp_path) -> None:
    from vesselnb.data import list_samples
    from vesselnb.frames import frame_size, load_frame

    cine = np.stack([_angiogram_like(seed=i) for i in range(3)])
    _write_dicom(tmp_path / "export_0001.dcm", cine, series=7)
    _write_dicom(tmp_path / "single.dcm", _angiogram_like(seed=9), patient=("", ""), instance=12)
    samples = list_samples(tmp_path, image_glob="*.dcm")
    by_id = {s.sample_id: s for s in samples}
    ids = [f"export_0001_frame_{i:06d}" for i in range(3)]
    assert set(by_id) == {*ids, "single"}
    for index, sample_id in enumerate(ids):
        sample = by_id[sample_id]
        assert (sample.patient, sample.sequence, sample.frame, sample.frame_index) == \
            ("Chen_Fang_0000103366", "7", index, index)
        assert sample.reference == f"{tmp_path / 'export_0001.dcm'}#frame={index}"
        assert frame_size(sample.reference) == (48, 64)
        assert np.array_equal(np.asarray(load_frame(sample.reference).image)[..., 0], window_to_uint8(cine[index]))
    single = by_id["single"]  # no patient tags: the file-name rule names it; Instance Number is its frame
    assert (single.patient, single.frame, single.frame_index, single.reference) == \
        ("single", 12, None, str(tmp_path / "single.dcm"))
    assert len({s.video_key for s in samples}) == 2


def test_unreadable_dicom_is_one_sample_whose_decoding_names_the_file(tmp_path) -> None:
    from vesselnb.data import list_samples
    from vesselnb.frames import dicom_frames, load_frame

    (tmp_path / "broken.dcm").write_bytes(b"not a dicom file at all")
    (sample,) = list_samples(tmp_path, image_glob="*.dcm")
    assert sample.sample_id == "broken" and sample.frame_index is None
    with pytest.raises(DataError, match="broken.dcm: not a readable DICOM file"):
        dicom_frames(sample.image_path)
    with pytest.raises(DataError, match="broken.dcm: not a readable DICOM file"):
        load_frame(sample.reference)
