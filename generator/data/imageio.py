"""Reading images: PNG, JPEG (and what else Pillow reads), DICOM with windowing, MedMNIST .npz refs.

Every reader returns uint8, ``(H, W)`` for grey or ``(H, W, 3)`` for colour; channel
conversion to what the modality wants happens in :mod:`generator.data.transforms`.

An image inside a MedMNIST-layout ``.npz`` is addressed as ``file.npz#<split>/<index>``,
e.g. ``retinamnist.npz#train/12``, so manifests can point at it without extracting files.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import SynthmedError

DICOM_SUFFIXES = {".dcm", ".dicom", ".ima"}
PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}  # never sniffed for DICOM
NPZ_CACHE_FILES = 4  # .npz archives kept decoded in memory at once


class ImageReadError(SynthmedError, OSError):
    pass


def is_dicom(path: str | os.PathLike) -> bool:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return True
    if suffix in PIL_SUFFIXES:
        return False
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Min-max scale anything that is not already uint8 (16-bit PNG, float TIFF) to 0..255."""
    if array.dtype == np.uint8:
        return array
    array = array.astype(np.float64)
    lo, hi = float(np.nanmin(array)), float(np.nanmax(array))
    if hi <= lo:
        return np.zeros(array.shape, np.uint8)
    return np.round((array - lo) / (hi - lo) * 255.0).astype(np.uint8)


def read_pil(path: str | os.PathLike) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("L", "RGB"):
                return np.asarray(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                return _to_uint8(np.asarray(im))
            if im.mode in ("1", "LA", "La"):
                return np.asarray(im.convert("L"))
            return np.asarray(im.convert("RGB"))  # P, RGBA, CMYK, YCbCr, ...
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageReadError(f"cannot read image {path}: {exc}") from exc


def apply_window(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 linear VOI window to 0..255."""
    width = max(float(width), 1.0)
    scaled = ((values - (centre - 0.5)) / (width - 1.0) + 0.5) * 255.0
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def _first(value) -> float:
    """WindowCenter/WindowWidth may be multi-valued; the first is the default view."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def read_dicom(path: str | os.PathLike, window: tuple[float, float] | None = None) -> np.ndarray:
    """A DICOM image as uint8: rescale slope/intercept, then the window, then MONOCHROME1 inversion.

    ``window`` (centre, width) in stored units (HU for CT) overrides the file's own; with neither,
    the image is min-max scaled. A multi-frame file gives its middle frame.
    """
    import pydicom

    try:
        from pydicom.pixels import apply_modality_lut
    except ImportError:  # pydicom < 3
        from pydicom.pixel_data_handlers.util import apply_modality_lut
    try:
        ds = pydicom.dcmread(str(path))
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for bad files
        raise ImageReadError(f"cannot read DICOM {path}: {exc}") from exc

    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[pixels.shape[0] // 2]
    if int(getattr(ds, "SamplesPerPixel", 1)) == 3:
        if str(getattr(ds, "PhotometricInterpretation", "RGB")).startswith("YBR"):
            from pydicom.pixels import convert_color_space

            pixels = convert_color_space(pixels, ds.PhotometricInterpretation, "RGB")
        return _to_uint8(pixels)

    values = apply_modality_lut(pixels, ds).astype(np.float64)
    if window is None and "WindowCenter" in ds and "WindowWidth" in ds:
        window = (_first(ds.WindowCenter), _first(ds.WindowWidth))
    image = apply_window(values, *window) if window is not None else _to_uint8(values)
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        image = 255 - image
    return image


_npz_cache: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()


def _npz_arrays(path: str) -> dict[str, np.ndarray]:
    key = os.path.abspath(path)
    if key in _npz_cache:
        _npz_cache.move_to_end(key)
        return _npz_cache[key]
    try:
        with np.load(key) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as exc:
        raise ImageReadError(f"cannot read .npz archive {path}: {exc}") from exc
    _npz_cache[key] = arrays
    while len(_npz_cache) > NPZ_CACHE_FILES:
        _npz_cache.popitem(last=False)
    return arrays


def split_ref(ref: str) -> tuple[str, str | None]:
    """``"a.npz#train/3"`` -> ``("a.npz", "train/3")``; a plain path -> ``(path, None)``."""
    if ".npz#" in ref:
        path, _, inner = ref.partition("#")
        return path, inner
    return ref, None


def read_npz_item(path: str, inner: str) -> np.ndarray:
    split, _, index = inner.partition("/")
    arrays = _npz_arrays(path)
    key = f"{split}_images"
    if key not in arrays:
        raise ImageReadError(f"{path} has no array {key!r}; arrays: {', '.join(arrays)}")
    images = arrays[key]
    try:
        i = int(index)
        image = images[i]
    except (ValueError, IndexError):
        raise ImageReadError(f"{path}: no image {index!r} in {key} (it has {len(images)})") from None
    return _to_uint8(np.asarray(image))


def probe_image(ref: str | os.PathLike) -> None:
    """Cheap check that a file is an image we can read: its header, not its pixels."""
    path, inner = split_ref(str(ref))
    if not os.path.isfile(path):
        raise ImageReadError(f"image file not found: {path}")
    if inner is not None:
        return  # .npz members are checked when the archive is indexed
    if is_dicom(path):
        import pydicom

        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            raise ImageReadError(f"cannot read DICOM {path}: {exc}") from exc
        if "Rows" not in ds or "Columns" not in ds:
            raise ImageReadError(f"DICOM {path} has no image (no Rows/Columns)")
        return
    try:
        with Image.open(path) as im:
            im.size  # noqa: B018 - the header is parsed on open
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageReadError(f"cannot read image {path}: {exc}") from exc


def load_image(ref: str | os.PathLike, window: tuple[float, float] | None = None) -> np.ndarray:
    """Read any supported image reference as uint8 (H, W) or (H, W, 3)."""
    ref = str(ref)
    path, inner = split_ref(ref)
    if not os.path.exists(path):
        raise ImageReadError(f"image file not found: {path}")
    if inner is not None:
        return read_npz_item(path, inner)
    if is_dicom(path):
        return read_dicom(path, window)
    return read_pil(path)
