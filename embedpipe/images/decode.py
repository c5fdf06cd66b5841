"""Image files -> uint8 pixels ready for the backbone, or an error record.

The only module that knows image formats. :func:`decode_file` never raises: a file is
either decoded (formats on an allow-list, decompression bombs refused before any pixel
is decoded, EXIF orientation applied, every mode converted the way a viewer shows it)
or described by a :class:`DecodeFailure` whose ``error_type`` says why.

It runs inside decode worker processes, so it imports neither torch nor torchvision.
"""

from __future__ import annotations

import errno
import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..config import Choice, DecodeMode
from ..errors import ImageDecodeError
from ..uris import is_uri, read_bytes
from .preprocess import Preprocessing

Image.init()  # registers every plugin, so that ``Image.ID`` lists what this Pillow reads
#: Formats Pillow may decode; anything else is refused as not an image. MPO (the
#: multi-picture JPEG some cameras write) is its own plugin in older Pillows.
ALLOWED_FORMATS = tuple(
    f for f in ("JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP", "TIFF") if f in Image.ID
)
_ORIENTATION = 0x0112  # the EXIF tag


class ErrorType(Choice):
    """Why an image was not embedded. Written to the errors table as a string."""

    NOT_FOUND = "not_found"  # missing, or a broken symlink
    PERMISSION_DENIED = "permission_denied"
    UNREADABLE = "unreadable"  # any other OS error: a symlink loop, a directory, EIO
    EMPTY_FILE = "empty_file"
    NOT_AN_IMAGE = "not_an_image"  # unknown content, or a format off the allow-list
    TOO_MANY_PIXELS = "too_many_pixels"  # refused before decoding
    TRUNCATED = "truncated"
    DECODE_ERROR = "decode_error"  # the decoder rejected the data
    DECODER_CRASH = "decoder_crash"  # the worker process died decoding it
    TIMEOUT = "timeout"  # decoding exceeded the per-image time limit


@dataclass(frozen=True, slots=True)
class Decoded:
    """``pixels``: (crop, crop, channels) uint8; ``width``/``height``: the file's own
    size after EXIF rotation; ``content_hash``: blake2b-128 of the file's bytes."""

    pixels: np.ndarray
    width: int
    height: int
    content_hash: str


@dataclass(frozen=True, slots=True)
class EncodedJPEG:
    """A checked JPEG left for the device to decode (``DecodeMode.DEVICE``): the header
    was read, the pixel cap applied; ``width``/``height`` as oriented. ``orientation`` is
    the EXIF orientation tag (1-8, 1 = upright), read here on the host because nvJPEG
    ignores it: the device applies it after decoding."""

    data: bytes
    width: int
    height: int
    content_hash: str
    orientation: int = 1


@dataclass(frozen=True, slots=True)
class DecodeFailure:
    error_type: ErrorType
    message: str


def read_file(path: str) -> bytes:
    """A file's bytes (a path or URI); :class:`ImageDecodeError` says why not."""
    try:
        if is_uri(path):
            data = read_bytes(path)
        else:
            with open(path, "rb") as f:
                data = f.read()
    except FileNotFoundError:
        raise ImageDecodeError(ErrorType.NOT_FOUND, "no such file (or a broken symlink)") from None
    except PermissionError:
        raise ImageDecodeError(ErrorType.PERMISSION_DENIED, "permission denied") from None
    except IsADirectoryError:
        raise ImageDecodeError(ErrorType.UNREADABLE, "is a directory") from None
    except OSError as e:
        what = "symlink loop" if e.errno == errno.ELOOP else e.strerror or str(e)
        raise ImageDecodeError(ErrorType.UNREADABLE, what) from None
    if not data:
        raise ImageDecodeError(ErrorType.EMPTY_FILE, "file is empty (0 bytes)")
    return data


def open_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Identify ``data`` by content (never by extension) without decoding pixels."""
    with warnings.catch_warnings():
        # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; both refuse
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except UnidentifiedImageError:
            raise ImageDecodeError(
                ErrorType.NOT_AN_IMAGE,
                f"not an image in an allowed format ({', '.join(ALLOWED_FORMATS)})",
            ) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageDecodeError(ErrorType.TOO_MANY_PIXELS, str(e)) from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageDecodeError(
            ErrorType.TOO_MANY_PIXELS,
            f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} (--max-pixels)",
        )
    return img


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert any Pillow mode to ``"RGB"`` or ``"L"`` as an image viewer would show it.

    Transparency is composited over white (a plain ``convert`` would expose whatever
    colour hides under transparent pixels); 16-bit samples keep their high byte (a plain
    ``convert`` clips them to white).
    """
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img)
        if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr.astype(np.uint32) >> 8
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    ):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img if img.mode == mode else img.convert(mode)


def load_image(
    data: bytes, *, mode: str, max_pixels: int, draft_size: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Bytes -> a fully decoded, upright image in ``mode``, and the file's own
    (width, height) as oriented (not the draft-scaled size).

    ``draft_size``: for JPEGs, let libjpeg scale by 1/2..1/8 while decoding as long as
    both sides stay >= ``draft_size`` (Pillow's ``draft``), which skips most of the IDCT
    work when the image is much larger than the network's input.
    """
    img = open_image(data, max_pixels=max_pixels)
    width, height = img.size
    if img.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8):  # orientations that swap axes
        width, height = height, width
    if draft_size is not None and img.format in ("JPEG", "MPO"):
        img.draft(None, (draft_size, draft_size))
    try:
        img.load()
    except OSError as e:
        kind = ErrorType.TRUNCATED if "truncated" in str(e) else ErrorType.DECODE_ERROR
        raise ImageDecodeError(kind, str(e)) from None
    except Exception as e:  # decoders raise ValueError, SyntaxError, struct.error...
        raise ImageDecodeError(ErrorType.DECODE_ERROR, f"{type(e).__name__}: {e}") from None
    img = ImageOps.exif_transpose(img)
    return to_mode(img, mode), (width, height)


def _device_decodable(data: bytes, max_pixels: int) -> tuple[int, int, int] | None:
    """(oriented width, oriented height, EXIF orientation) of a baseline/progressive RGB or
    grayscale JPEG that the device decoder handles; ``None`` for anything else (decoded
    by the worker instead)."""
    img = open_image(data, max_pixels=max_pixels)
    if img.format != "JPEG" or img.mode not in ("RGB", "L"):
        return None
    w, h = img.size
    orientation = int(img.getexif().get(_ORIENTATION, 1))
    if orientation not in range(1, 9):
        orientation = 1  # a corrupt tag: shown upright, as Pillow's exif_transpose does
    return (h, w, orientation) if orientation in (5, 6, 7, 8) else (w, h, orientation)


def decode_file(
    source: str | bytes, preprocessing: Preprocessing, *, max_pixels: int, mode: DecodeMode
) -> Decoded | EncodedJPEG | DecodeFailure:
    """Read, decode, orient, convert, resize and crop one image: a file's path, or the
    bytes of one read from a container (a tar shard, a Parquet table). Never raises.

    With ``DecodeMode.DEVICE`` a plain JPEG is only checked and comes back encoded.
    """
    try:
        data = read_file(source) if isinstance(source, str) else source
        if not data:
            raise ImageDecodeError(ErrorType.EMPTY_FILE, "the image is empty (0 bytes)")
        if mode == DecodeMode.DEVICE and preprocessing.channels == 3:
            header = _device_decodable(data, max_pixels)
            if header is not None:
                width, height, orientation = header
                digest = hashlib.blake2b(data, digest_size=16).hexdigest()
                return EncodedJPEG(data, width, height, digest, orientation)
        img, (width, height) = load_image(
            data,
            mode=preprocessing.mode,
            max_pixels=max_pixels,
            draft_size=preprocessing.resize_size if mode == DecodeMode.DRAFT else None,
        )
        pixels = preprocessing.resize_crop(img)
    except ImageDecodeError as e:
        return DecodeFailure(ErrorType(e.error_type), e.message)
    except Exception as e:  # a decoder bug must cost one image, not the job
        return DecodeFailure(ErrorType.DECODE_ERROR, f"{type(e).__name__}: {e}")
    return Decoded(pixels, width, height, hashlib.blake2b(data, digest_size=16).hexdigest())

