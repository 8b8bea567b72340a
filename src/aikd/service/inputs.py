"""What a request brings: its images (as encoded bytes, in memory) and its options, read within the limits.

Three ways to send images to ``POST /v1/quality`` and ``POST /v1/select``:

- ``multipart/form-data``: one or more files in the field ``file`` (``curl -F file=@a.jpg -F file=@b.jpg``);
- a raw body with an image content type (``curl --data-binary @a.jpg -H 'Content-Type: image/jpeg'``), named by
  the query's ``name``;
- ``application/json``: ``{"images": [{"name": "a.jpg", "data": "<base64>"}], "detect": true}`` (``data`` may be a
  ``data:`` URL).

Options come from the query string, multipart text fields or JSON keys: ``detect`` (find and align faces),
``faces`` (``best``, ``largest`` or ``all``), ``crops`` (return each face as the model sees it, a PNG data URL)
and, for ``/v1/select``, ``k``. An unknown option is an error, not ignored.

Everything stays in memory: the body is read up to ``max_body_bytes`` (refused from its ``Content-Length``
before it is read), multipart parts are never spooled to temporary files, and names are only labels: nothing a
client sends is ever used as a path on the server's disk.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from aikd.pipeline.crops import FACE_CHOICES
from aikd.service.errors import ServiceError
from aikd.service.options import Limits

__all__ = ["OPTION_NAMES", "RequestOptions", "Upload", "check_length", "parse_images", "read_body"]

OPTION_NAMES = ("detect", "faces", "crops", "k", "name")
MAX_NAME = 256  # characters of a name kept (names are only echoed back)
MAX_K = 1000
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class Upload:
    """One image of a request: encoded bytes, or the error that kept them from being read."""

    name: str
    data: bytes = b""
    error: ServiceError | None = None


@dataclass(frozen=True)
class RequestOptions:
    """A request's options (see the module docstring); ``detect=None``: the server's default."""

    detect: bool | None = None
    faces: str = "best"
    crops: bool = False
    k: int = 1
    name: str = "image"

    @classmethod
    def parse(cls, values: Mapping[str, Any]) -> RequestOptions:
        """From query parameters, form fields or JSON keys (strings or JSON values).

        Raises:
            ServiceError: ``bad_option``, naming the option.
        """
        unknown = sorted(set(values) - set(OPTION_NAMES))
        if unknown:
            raise ServiceError("bad_option", f"unknown option {unknown[0]!r}; options are {', '.join(OPTION_NAMES)}")
        faces = str(values.get("faces", "best"))
        if faces not in FACE_CHOICES:
            raise ServiceError("bad_option", f"faces must be one of {', '.join(FACE_CHOICES)}, got {faces[:40]!r}")
        k = _integer(values.get("k", 1), "k")
        if not 1 <= k <= MAX_K:
            raise ServiceError("bad_option", f"k must be in 1..{MAX_K}, got {k}")
        detect = values.get("detect")
        return cls(None if detect is None else _boolean(detect, "detect"), faces,
                   _boolean(values.get("crops", False), "crops"), k, _name(values.get("name", "image")))


def _boolean(value: Any, option: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE or text in FALSE:
        return text in TRUE
    raise ServiceError("bad_option", f"{option} must be true or false, got {str(value)[:40]!r}")


def _integer(value: Any, option: str) -> int:
    if isinstance(value, bool):
        raise ServiceError("bad_option", f"{option} must be an integer, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ServiceError("bad_option", f"{option} must be an integer, got {str(value)[:40]!r}") from None


def _name(value: Any) -> str:
    return str(value)[:MAX_NAME]


# ------------------------------------------------------------------------------------------------ body
def check_length(content_length: str | None, limit: int) -> None:
    """Refuse a body whose declared length passes ``limit``, before reading any of it.

    Raises:
        ServiceError: ``body_too_large`` (with ``Connection: close``: the rest of the body is not read), or
            ``bad_request`` for a ``Content-Length`` that is no number.
    """
    if content_length is None:
        return
    try:
        declared = int(content_length)
    except ValueError:
        raise ServiceError("bad_request", "Content-Length is not a number") from None
    if declared > limit:
        raise _too_large(f"the body has {declared} bytes; the limit is {limit}")


def _too_large(message: str) -> ServiceError:
    return ServiceError("body_too_large", message, {"Connection": "close"})


async def read_body(stream: AsyncIterator[bytes], content_length: str | None, limit: int) -> bytes:
    """The request body, read up to ``limit`` bytes.

    Raises:
        ServiceError: ``body_too_large`` (from ``Content-Length`` before reading, or once the stream passes the
            limit), ``bad_request`` (an unreadable ``Content-Length``).
    """
    check_length(content_length, limit)
    body = bytearray()
    async for chunk in stream:
        body += chunk
        if len(body) > limit:
            raise _too_large(f"the body passes the limit of {limit} bytes")
    return bytes(body)


def parse_images(body: bytes, content_type: str, query: Mapping[str, str], limits: Limits
                 ) -> tuple[list[Upload], RequestOptions]:
    """The images and options of a request body.

    Raises:
        ServiceError: ``unsupported_media_type``, ``bad_multipart``, ``bad_json``, ``bad_option``, ``no_images``
            or ``too_many_images``.
    """
    kind, params = parse_options_header(content_type or "")
    kind = kind.decode("latin-1").lower()
    values: dict[str, Any] = dict(query)
    if kind == "multipart/form-data":
        boundary = params.get(b"boundary")
        if not boundary:
            raise ServiceError("bad_multipart", "multipart/form-data without a boundary")
        uploads, fields = _multipart(body, boundary, limits)
        values.update(fields)
    elif kind == "application/json":
        uploads, fields = _json_images(body, limits.max_images)
        values.update(fields)
    elif kind.startswith("image/") or kind == "application/octet-stream":
        uploads = [Upload(_name(values.get("name", "image")), body)] if body else []
    else:
        shown = kind or "none"
        raise ServiceError("unsupported_media_type", f"content type {shown[:60]!r}: send multipart/form-data (field "
                           "'file'), application/json ({'images': [{'name', 'data'}]}) or an image/* body")
    options = RequestOptions.parse(values)
    if not uploads:
        raise ServiceError("no_images", "the request holds no image")
    if len(uploads) > limits.max_images:
        raise ServiceError("too_many_images", f"{len(uploads)} images; the limit is {limits.max_images} a request")
    return uploads, options


class _Parts:
    """The parts of a multipart body, collected by :class:`MultipartParser`'s callbacks."""

    def __init__(self, most: int) -> None:
        self.most, self.parts, self.ended = most, [], False
        self._field, self._value, self._headers, self._data = b"", b"", {}, bytearray()

    def callbacks(self) -> dict[str, Any]:
        return {"on_part_begin": self._begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_part_data": self._part_data, "on_part_end": self._end_part, "on_end": self._end}

    def _begin(self) -> None:
        if len(self.parts) >= self.most:
            raise ServiceError("too_many_images", f"more than {self.most} parts in the body")
        self._headers, self._data = {}, bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").lower()] = self._value
        self._field, self._value = b"", b""

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._data += data[start:end]

    def _end_part(self) -> None:
        self.parts.append((self._headers, bytes(self._data)))

    def _end(self) -> None:
        self.ended = True


def _multipart(body: bytes, boundary: bytes, limits: Limits) -> tuple[list[Upload], dict[str, str]]:
    collected = _Parts(limits.max_images + len(OPTION_NAMES))
    parser = MultipartParser(boundary, collected.callbacks(), max_size=len(body))
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as err:
        raise ServiceError("bad_multipart", f"malformed multipart body: {str(err)[:120]}") from None
    if not collected.ended:
        raise ServiceError("bad_multipart", "malformed multipart body: it ends before the closing boundary")
    uploads, fields = [], {}
    for headers, data in collected.parts:
        disposition, params = parse_options_header(headers.get("content-disposition", b""))
        field = params.get(b"name", b"").decode("utf-8", "replace")
        if disposition.lower() != b"form-data" or not field:
            raise ServiceError("bad_multipart", "a part without Content-Disposition: form-data; name=...")
        if field == "file":
            filename = params.get(b"filename", b"").decode("utf-8", "replace") or f"file{len(uploads)}"
            uploads.append(Upload(_name(filename), data))
        elif field in OPTION_NAMES:
            fields[field] = data.decode("utf-8", "replace")[:MAX_NAME]
        else:
            raise ServiceError("bad_option", f"unknown field {field[:40]!r}: images go in 'file', options are "
                               f"{', '.join(OPTION_NAMES)}")
    return uploads, fields


def _json_images(body: bytes, most: int) -> tuple[list[Upload], dict[str, Any]]:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError) as err:
        raise ServiceError("bad_json", f"the body is not JSON: {str(err)[:120]}") from None
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        raise ServiceError("bad_json", "expected {\"images\": [{\"name\": ..., \"data\": base64}, ...]}")
    images = document.pop("images")
    if len(images) > most:  # before any is decoded
        raise ServiceError("too_many_images", f"{len(images)} images; the limit is {most} a request")
    uploads = []
    for index, image in enumerate(images):
        if not isinstance(image, dict) or not isinstance(image.get("data"), str):
            raise ServiceError("bad_json", f"images[{index}] must be an object with a base64 string 'data'")
        name = _name(image.get("name") or f"image{index}")
        uploads.append(_decoded(name, image["data"]))
    return uploads, document


def _decoded(name: str, data: str) -> Upload:
    """An upload from base64 text (or a ``data:`` URL); bad base64 is this image's error, not the request's."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:  # line breaks (base64's 76-character lines) are allowed, any other character is not
        return Upload(name, base64.b64decode("".join(data.split()), validate=True))
    except (binascii.Error, ValueError):
        return Upload(name, error=ServiceError("bad_base64", "data is not valid base64"))
