"""Image reading: DICOM windowing (files written with pydicom in the exact format), PNG depths, npz refs."""

import numpy as np
import pytest
from PIL import Image

from generator.data.imageio import ImageReadError, apply_window, load_image, read_dicom


def write_dicom(path, pixels: np.ndarray, slope=1.0, intercept=0.0, window=None, photometric="MONOCHROME2"):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def test_window_formula_matches_dicom_standard():
    # DICOM linear window: centre c, width w -> values <= c - 0.5 - (w-1)/2 are black, >= c - 0.5 + (w-1)/2 white
    values = np.array([-2000.0, -1350.5, -600.0, 149.5, 3000.0])
    out = apply_window(values, -600.0, 1500.0)
    assert out[0] == 0 and out[-1] == 255
    assert out[1] == 0 and out[3] == 255
    assert abs(int(out[2]) - 128) <= 1


def test_dicom_rescale_and_file_window(tmp_path):
    hu = np.array([[-1000, -600], [40, 1000]], dtype=np.int32)
    stored = hu + 1024  # RescaleIntercept -1024, as CT scanners store it
    path = write_dicom(tmp_path / "a.dcm", np.kron(stored, np.ones((8, 8), int)), slope=1, intercept=-1024, window=(-600, 1500))
    image = read_dicom(path)
    assert image.dtype == np.uint8 and image.shape == (16, 16)
    air, lung, soft, bone = image[0, 0], image[0, 8], image[8, 0], image[8, 8]
    assert air < lung < soft <= bone
    assert abs(int(lung) - 128) <= 1  # the window centre is mid-grey


def test_dicom_override_window_and_monochrome1(tmp_path):
    stored = np.kron(np.array([[0, 2000], [1000, 3000]]), np.ones((4, 4), int))
    path = write_dicom(tmp_path / "b.dcm", stored, window=(1500, 3000))
    narrow = read_dicom(path, window=(1000, 10))
    assert set(np.unique(narrow)) <= {0, 128, 255} or narrow[0, 0] == 0
    assert narrow[0, 4] == 255 and narrow[0, 0] == 0
    inverted = read_dicom(write_dicom(tmp_path / "c.dcm", stored, window=(1500, 3000), photometric="MONOCHROME1"))
    normal = read_dicom(path)
    assert np.array_equal(inverted, 255 - normal)


def test_dicom_detected_without_suffix(tmp_path):
    path = write_dicom(tmp_path / "noext", np.full((4, 4), 100))
    assert load_image(path).shape == (4, 4)


def test_png_depths_and_modes(tmp_path):
    grey16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    img = load_image(tmp_path / "g16.png")
    assert img.dtype == np.uint8 and img.min() == 0 and img.max() == 255
    Image.fromarray(np.zeros((4, 4, 4), np.uint8), "RGBA").save(tmp_path / "rgba.png")
    assert load_image(tmp_path / "rgba.png").shape == (4, 4, 3)
    Image.fromarray(np.full((4, 5, 3), 200, np.uint8)).save(tmp_path / "x.jpg")
    assert load_image(tmp_path / "x.jpg").shape == (4, 5, 3)


def test_npz_reference(tmp_path):
    np.savez(tmp_path / "m.npz", train_images=np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28),
             train_labels=np.array([[0], [1]]))
    assert load_image(f"{tmp_path}/m.npz#train/1").shape == (28, 28)
    with pytest.raises(ImageReadError, match="no image '5'"):
        load_image(f"{tmp_path}/m.npz#train/5")
    with pytest.raises(ImageReadError, match="has no array 'test_images'"):
        load_image(f"{tmp_path}/m.npz#test/0")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ImageReadError, match="not found"):
        load_image(tmp_path / "absent.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match="cannot read image"):
        load_image(tmp_path / "bad.png")
