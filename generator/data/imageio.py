"""Reading images: PNG, JPEG (and what else Pillow reads), DICOM with windowing, MedMNIST .npz refs.

Every reader returns uint8, ``(H, W)`` for grey or ``(H, W, 3)`` for colour; channel
conversion to what the modality wants happens in :mod:`generator.data.transforms`.

An image inside a MedMNIST-layout ``.npz`` is addressed as ``file.npz#<split>/<index>``,
e.g. ``retinamnist.npz#train/12``, so manifests can point at it without extracting files.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import SynthmedError

DICOM_SUFFIXES = {".dcm", ".dicom", ".ima"}
PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}  # never sniffed for DICOM
NPZ_CACHE_FILES = 4  # .npz archives kept decoded in memory at once
# Decompression bombs: a small file claiming a huge image is refused from its header, before any pixel is decoded.
MAX_PIXELS = 8192 * 8192  # pixels of one image (one DICOM frame); Pillow's own limit only warns below ~89 M
MAX_DECODED_BYTES = 2 * 1024**3  # bytes of a whole decoded DICOM pixel array (all frames)
# What Pillow raises for a damaged file besides OSError (truncated PNG chunks, broken TIFF tags, bad JPEG markers).
PIL_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, TypeError,
              ZeroDivisionError, OverflowError, Image.DecompressionBombError)


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
    """Min-max scale anything that is not already uint8 (16-bit PNG, float TIFF) to 0..255; NaN reads as the
    minimum, +-inf as the extremes."""
    if array.dtype == np.uint8:
        return array
    array = array.astype(np.float64)
    finite = np.isfinite(array)
    if not finite.any():
        return np.zeros(array.shape, np.uint8)
    lo, hi = float(array[finite].min()), float(array[finite].max())
    if hi <= lo:
        return np.zeros(array.shape, np.uint8)
    array = np.nan_to_num(array, nan=lo, posinf=hi, neginf=lo)
    return np.round((array - lo) / (hi - lo) * 255.0).astype(np.uint8)


def _too_large(path, width: int, height: int, what: str = "image") -> ImageReadError:
    return ImageReadError(f"{what} {path} is {width} x {height} pixels, more than the {MAX_PIXELS:,} pixels read per "
                          "image (a decompression bomb?); downscale it, or raise generator.data.imageio.MAX_PIXELS")


def _open_pil(path: str | os.PathLike) -> Image.Image:
    """Image.open with the project's size limit checked from the header, before any pixel is decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with our own message
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as exc:
            raise ImageReadError(f"image {path} is larger than {MAX_PIXELS:,} pixels (a decompression bomb?): {exc}") from None
    width, height = im.size
    if width * height > MAX_PIXELS:
        im.close()
        raise _too_large(path, width, height)
    return im


def read_pil(path: str | os.PathLike) -> np.ndarray:
    try:
        with _open_pil(path) as im:
            im.load()
            if im.mode in ("L", "RGB"):
                return np.asarray(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                return _to_uint8(np.asarray(im))
            if im.mode in ("1", "LA", "La"):
                return np.asarray(im.convert("L"))
            return np.asarray(im.convert("RGB"))  # P, RGBA, CMYK, YCbCr, ...
    except ImageReadError:
        raise
    except PIL_ERRORS as exc:
        raise ImageReadError(f"cannot read image {path}: {exc or type(exc).__name__}; is it a complete image file?") from exc


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


def _dicom_size(ds, path) -> None:
    """Refuse from the header a DICOM whose pixel array would be absurdly large (65535 x 65535 with a compressed
    transfer syntax decodes into gigabytes), or whose uncompressed pixel data is shorter than its size says."""
    if "Rows" not in ds or "Columns" not in ds:
        raise ImageReadError(f"DICOM {path} has no image (no Rows/Columns)")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 8) or 8)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ImageReadError(f"DICOM {path}: unreadable Rows/Columns/NumberOfFrames/SamplesPerPixel/BitsAllocated ({exc})") from None
    if min(rows, cols, frames, samples, bits) < 1:
        raise ImageReadError(f"DICOM {path}: no pixels (Rows {rows}, Columns {cols}, NumberOfFrames {frames}, "
                             f"SamplesPerPixel {samples}, BitsAllocated {bits})")
    if rows * cols > MAX_PIXELS:
        raise _too_large(path, cols, rows, "DICOM")
    expected = rows * cols * frames * samples * -(-bits // 8)
    if expected > MAX_DECODED_BYTES:
        raise ImageReadError(f"DICOM {path}: {frames} frame(s) of {rows} x {cols} x {samples} would decode into "
                             f"{expected / 1024**3:.1f} GiB, more than generator.data.imageio.MAX_DECODED_BYTES")
    if "PixelData" not in ds:
        raise ImageReadError(f"DICOM {path} has no PixelData: it holds no image")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and not getattr(syntax, "is_encapsulated", True):  # uncompressed: the length is known
        try:
            from pydicom.pixels.utils import get_expected_length
        except ImportError:  # pydicom < 3
            from pydicom.pixel_data_handlers.util import get_expected_length
        needed, stored = get_expected_length(ds, "bytes"), len(ds.PixelData or b"")
        if stored < needed:
            raise ImageReadError(f"DICOM {path}: PixelData holds {stored} bytes but its Rows, Columns, frames and samples "
                                 f"need {needed}; the file is truncated or damaged")


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
        _dicom_size(ds, path)
        pixels = ds.pixel_array
    except ImageReadError:
        raise
    except Exception as exc:  # pydicom raises many types for bad files
        raise ImageReadError(f"cannot read DICOM {path}: {exc}") from exc

    # The header's values are the file's: a damaged or unusual one is the file's error, not a crash.
    try:
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            pixels = pixels[pixels.shape[0] // 2]
        if int(getattr(ds, "SamplesPerPixel", 1)) == 3:
            if str(getattr(ds, "PhotometricInterpretation", "RGB")).startswith("YBR"):
                from pydicom.pixels import convert_color_space

                pixels = convert_color_space(pixels, ds.PhotometricInterpretation, "RGB")
            image = _to_uint8(pixels)
            if image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"3 samples per pixel but a pixel array of shape {image.shape}")
            return image

        values = apply_modality_lut(pixels, ds).astype(np.float64)
        if window is None and "WindowCenter" in ds and "WindowWidth" in ds:
            window = (_first(ds.WindowCenter), _first(ds.WindowWidth))
        if window is not None and not all(np.isfinite(window)):
            window = None  # a NaN or infinite window shows nothing: min-max scale instead
        image = apply_window(values, *window) if window is not None else _to_uint8(values)
        if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
            image = 255 - image
        if image.ndim != 2:
            raise ValueError(f"1 sample per pixel but a pixel array of shape {image.shape}")
        return image
    except Exception as exc:  # noqa: BLE001 - pydicom's LUT and colour code raise many types for odd headers
        raise ImageReadError(f"cannot read DICOM {path}: {exc or type(exc).__name__}") from exc


_npz_cache: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()


def _npz_arrays(path: str) -> dict[str, np.ndarray]:
    key = os.path.abspath(path)
    if key in _npz_cache:
        _npz_cache.move_to_end(key)
        return _npz_cache[key]
    try:
        with np.load(key, allow_pickle=False) as archive:
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
        with _open_pil(path):
            pass  # the header is parsed (and the size checked) on open
    except ImageReadError:
        raise
    except PIL_ERRORS as exc:
        raise ImageReadError(f"cannot read image {path}: {exc or type(exc).__name__}; is it a complete image file?") from exc


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
