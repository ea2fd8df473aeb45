"""Streaming multipart parsing with limits, and image validation.

Limits are enforced while the body streams in (count, per-file size, total size), so an oversized
upload is refused after reading at most one limit's worth of bytes, never spooled whole first.
Images are checked by size *before* decoding (decompression bombs), then fully decoded (truncated
files) and re-encoded as PNG, so the worker only ever reads images known to be good.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import python_multipart
from fastapi import Request
from starlette.requests import ClientDisconnect
from PIL import Image
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartState, parse_options_header

from service.errors import Problem, invalid
from service.scratch import remove, scratch_dir  # noqa: F401  (the routes' scratch, from here as before)
from service.settings import Settings

MAX_FIELD_BYTES = 64 * 1024
MAX_FIELDS = 20_000
# Text fields are kept in memory, so their sum has its own limit (labels and class names of the
# largest task are well under a megabyte); files stream to disk under UPT_MAX_UPLOAD_BYTES.
MAX_FIELDS_TOTAL_BYTES = 128 * MAX_FIELD_BYTES


@dataclass
class UploadedFile:
    field: str
    filename: str
    path: Path
    size: int = 0
    digest: Any = field(default_factory=hashlib.sha256, repr=False)  # of the bytes as uploaded


@dataclass
class ParsedForm:
    fields: dict[str, list[str]] = field(default_factory=dict)
    files: list[UploadedFile] = field(default_factory=list)

    def one(self, name: str) -> str | None:
        values = [v for v in self.fields.get(name, []) if v.strip() != ""]
        if len(values) > 1:
            raise invalid(name, "give this field once.")
        return values[0].strip() if values else None

    def many(self, name: str) -> list[str]:
        return self.fields.get(name, [])

    def files_of(self, name: str) -> list[UploadedFile]:
        return [f for f in self.files if f.field == name]


def request_fingerprint(form: ParsedForm) -> str:
    """What makes two POST /tasks requests the same one (the IETF Idempotency-Key draft's fingerprint):
    every text field in order within its name, and every file's field and content; not the multipart
    boundary or the file names a client happens to send."""
    canonical = {"fields": sorted((name, values) for name, values in form.fields.items()),
                 "files": [(f.field, f.digest.hexdigest()) for f in form.files]}
    return hashlib.sha256(json.dumps(canonical, ensure_ascii=False).encode("utf-8", "surrogatepass")).hexdigest()


ARCHIVE_FIELD = "archive"


def too_large(detail: str) -> Problem:
    return Problem(413, "Upload too large", detail, type="upload-too-large")


class _FormCollector:
    """python-multipart callbacks that write file parts straight to disk, checking limits."""

    def __init__(self, folder: Path, max_files: int, max_file_bytes: int,
                 max_files_setting: str = "UPT_MAX_FILES") -> None:
        self.folder = folder
        self.max_files = max_files
        self.max_files_setting = max_files_setting
        self.max_file_bytes = max_file_bytes
        self.form = ParsedForm()
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._field: str | None = None
        self._data = bytearray()
        self._file: UploadedFile | None = None
        self._handle = None
        self._field_count = 0
        self._field_bytes = 0

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": lambda d, s, e: setattr(self, "_header_name", self._header_name + d[s:e]),
            "on_header_value": lambda d, s, e: setattr(self, "_header_value", self._header_value + d[s:e]),
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
        }

    def on_part_begin(self) -> None:
        self._disposition, self._data, self._file = b"", bytearray(), None

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise Problem(400, "Bad request", "A multipart part has no field name.", type="bad-multipart")
        self._field = options[b"name"].decode("utf-8", "replace")
        if b"filename" not in options:
            self._field_count += 1
            if self._field_count > MAX_FIELDS:
                raise Problem(400, "Bad request", f"More than {MAX_FIELDS} form fields.", type="bad-multipart")
            return
        if len(self.form.files) >= self.max_files:
            raise too_large(f"Too many files: at most {self.max_files} per request "
                            f"({self.max_files_setting}).")
        index = len(self.form.files)
        self._file = UploadedFile(self._field, options[b"filename"].decode("utf-8", "replace"),
                                  self.folder / f"{index:06d}.upload")
        self._handle = open(self._file.path, "wb")
        self.form.files.append(self._file)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._file is None:
            if len(self._data) + len(chunk) > MAX_FIELD_BYTES:
                raise invalid(self._field or "form", f"a form field is longer than {MAX_FIELD_BYTES} bytes.")
            self._field_bytes += len(chunk)
            if self._field_bytes > MAX_FIELDS_TOTAL_BYTES:
                raise too_large(f"The form's text fields hold more than {MAX_FIELDS_TOTAL_BYTES} bytes.")
            self._data.extend(chunk)
            return
        self._file.size += len(chunk)
        # A zip of class folders holds many images: the request limit bounds it, and each of its
        # members is held to the per-file limit when it is unpacked.
        if self._file.field != ARCHIVE_FIELD and self._file.size > self.max_file_bytes:
            raise too_large(f"File {self._file.filename!r} is larger than {self.max_file_bytes} bytes "
                            "(UPT_MAX_FILE_BYTES).")
        self._file.digest.update(chunk)
        self._handle.write(chunk)

    def on_part_end(self) -> None:
        if self._file is None:
            self.form.fields.setdefault(self._field or "", []).append(self._data.decode("utf-8", "replace"))
        else:
            self._handle.close()
            self._handle = None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


def declared_length(request: Request) -> int:
    """The body's size as its Content-Length header declares it (0 without one); 5,000 digits are not
    parsed (int() refuses them), they are simply more than any limit."""
    declared = request.headers.get("content-length", "").strip()
    if not (declared.isascii() and declared.isdigit()):
        return 0
    return int(declared) if len(declared) <= 18 else 10**18


def check_declared_length(request: Request, max_total_bytes: int) -> None:
    """A 413 for a body declared larger than UPT_MAX_UPLOAD_BYTES, before anything else is asked of it."""
    if declared_length(request) > max_total_bytes:
        raise too_large(f"The request is larger than {max_total_bytes} bytes (UPT_MAX_UPLOAD_BYTES).")


async def parse_form(request: Request, folder: Path, *, max_files: int, max_file_bytes: int,
                     max_total_bytes: int, max_files_setting: str = "UPT_MAX_FILES") -> ParsedForm:
    """Parse a multipart/form-data body into fields and files written under `folder`."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type == b"application/x-www-form-urlencoded":
        return await _parse_urlencoded(request)  # a form without files: answered with what is missing
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise Problem(415, "Unsupported media type", "Send the request as multipart/form-data.",
                      type="unsupported-media-type")
    check_declared_length(request, max_total_bytes)
    folder.mkdir(parents=True, exist_ok=True)
    collector = _FormCollector(folder, max_files, max_file_bytes, max_files_setting)
    total = 0
    try:
        # Inside the try: the parser refuses a boundary over 256 bytes with a FormParserError.
        parser = python_multipart.MultipartParser(params[b"boundary"], collector.callbacks())
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_total_bytes:
                raise too_large(f"The request is larger than {max_total_bytes} bytes (UPT_MAX_UPLOAD_BYTES).")
            parser.write(chunk)
        parser.finalize()
        # The parser hands over a part only at its closing boundary: a body cut before it (a dropped
        # connection, a proxy's limit) would silently lose its last field, e.g. train 200 epochs for `epochs=1`.
        if parser.state != MultipartState.END:
            raise Problem(400, "Bad request", "The multipart body is incomplete: it ends before its closing "
                          "boundary. Send the whole request again.", type="bad-multipart")
    except FormParserError as error:
        raise Problem(400, "Bad request", f"The multipart body is malformed: {error}", type="bad-multipart")
    except ClientDisconnect:  # nobody is left to read an answer; nothing was stored
        raise Problem(400, "Bad request", "The client went away during the upload.", type="client-disconnected")
    finally:
        collector.close()
    return collector.form


async def _parse_urlencoded(request: Request) -> ParsedForm:
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > MAX_FIELD_BYTES * 16:
            raise too_large(f"A form without files is limited to {MAX_FIELD_BYTES * 16} bytes.")
    form = ParsedForm()
    try:
        pairs = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=MAX_FIELDS)
    except ValueError:
        raise Problem(400, "Bad request", f"More than {MAX_FIELDS} form fields.", type="bad-multipart")
    for name, value in pairs:
        form.fields.setdefault(name, []).append(value)
    return form


# JPEGs are decoded at a reduced scale (1/2, 1/4, 1/8 in the decoder itself) while both sides stay at least
# this large: well above any CLIP input (224-448 pixels), at a fraction of a 6000x6000 photo's decoding cost.
DRAFT_SIDE = 512


@dataclass(frozen=True)
class ImageLimits:
    """What one request's images may cost, each checked from an image's header before it is decoded."""

    pixels: int  # per image (UPT_MAX_IMAGE_PIXELS)
    request_pixels: int  # per request, decoded and preprocessed (UPT_MAX_REQUEST_PIXELS)
    aspect: float  # the long side over the short (UPT_MAX_IMAGE_ASPECT)
    # The model's input side: preprocessing scales an image's short side to it, so a 4000x200 image
    # becomes 4480x224 before its centre crop. None where the backbone is not known yet (POST /tasks).
    input_side: int | None = None

    @classmethod
    def of(cls, settings: Settings, input_side: int | None = None) -> "ImageLimits":
        return cls(settings.max_image_pixels, settings.max_request_pixels, settings.max_image_aspect, input_side)

    def resized_pixels(self, width: int, height: int) -> int:
        """The pixels of the image after its short side is scaled to the model's input."""
        if self.input_side is None:
            return 0
        short, long = sorted((width, height))
        return self.input_side * int(self.input_side * long / short)


def _header(data: bytes | Path, name: str, field_name: str, limits: ImageLimits) -> Image.Image:
    """The image with only its header read (and a JPEG's decoding scale set), after the pixel checks."""
    try:
        image = Image.open(data if isinstance(data, Path) else io.BytesIO(data))
    except Image.DecompressionBombError:
        raise too_large(f"{name}: the image has more than {limits.pixels} pixels (UPT_MAX_IMAGE_PIXELS).")
    except Exception:  # UnidentifiedImageError, OSError, ... and whatever a Pillow plugin raises on junk
        raise invalid(field_name, f"{name} is not an image Pillow can read (PNG, JPEG, WebP, ...).")
    width, height = image.size
    # Checked on the header's size, before any pixel is decoded.
    if width * height > limits.pixels:
        image.close()
        raise too_large(f"{name}: {width}x{height} pixels is more than {limits.pixels} (UPT_MAX_IMAGE_PIXELS).")
    if width < 1 or height < 1:
        image.close()
        raise invalid(field_name, f"{name} has no pixels.")
    if max(width, height) > limits.aspect * min(width, height):
        image.close()
        raise invalid(field_name, f"{name} is {width}x{height} pixels: its long side is more than "
                      f"{limits.aspect:g} times its short side (UPT_MAX_IMAGE_ASPECT); preprocessing scales the "
                      "short side to the model's input, so crop or pad it first.")
    if image.format == "JPEG":
        image.draft("RGB", (DRAFT_SIDE, DRAFT_SIDE))
    return image


def check_request_pixels(uploads: list[tuple[bytes | Path, str, str]], limits: ImageLimits) -> None:
    """Refuse a request whose images would decode and preprocess to more than UPT_MAX_REQUEST_PIXELS in
    all, from their headers alone: twenty 6000x6000 PNGs of 35 KB each are small to send and minutes to
    decode."""
    total = 0
    for data, name, field_name in uploads:
        with _header(data, name, field_name, limits) as image:
            width, height = image.size  # after a JPEG's draft: the pixels that will really be decoded
        total += width * height + limits.resized_pixels(width, height)
        if total > limits.request_pixels:
            raise too_large(f"The images of this request decode to more than {limits.request_pixels} pixels in "
                            "all, counted as decoded and as scaled to the model's input (UPT_MAX_REQUEST_PIXELS); "
                            "send fewer or smaller images per request.")


def decode_upload(data: bytes, name: str, field_name: str, limits: ImageLimits) -> Image.Image:
    """Decode one upload into an RGB image, or a 4xx that names the file and the problem."""
    image = _header(data, name, field_name, limits)
    try:
        image.load()
        return image.convert("RGB")
    except Image.DecompressionBombError:
        raise too_large(f"{name}: the image has more than {limits.pixels} pixels (UPT_MAX_IMAGE_PIXELS).")
    except Exception:  # OSError, EOFError, and e.g. NotImplementedError from a DDS with unknown flags
        raise invalid(field_name, f"{name} is truncated or corrupt; upload the whole file again.")


def configure_pillow(max_pixels: int) -> None:
    # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; our own check above is the
    # strict one, this is the backstop for any other code path that opens an image.
    Image.MAX_IMAGE_PIXELS = max_pixels


