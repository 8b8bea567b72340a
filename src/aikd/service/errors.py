"""Errors the service answers with: a code a client can branch on, a message a person can read, never a traceback.

Request errors (the whole request is refused) are answered ``{"error": {"code", "message"}}`` with their HTTP
status; image errors (one image of a request cannot be scored) go into that image's result, and the other images
are still scored.
"""

from __future__ import annotations

from aikd.images import ImageError

__all__ = ["IMAGE_ERRORS", "REQUEST_ERRORS", "ServiceError", "error_body", "image_error_code"]

# code -> HTTP status of an error that refuses the whole request.
REQUEST_ERRORS: dict[str, int] = {
    "bad_request": 400,
    "bad_option": 400,
    "bad_json": 400,
    "bad_multipart": 400,
    "no_images": 400,
    "client_disconnected": 400,
    "detection_unavailable": 400,
    "unauthorized": 401,
    "not_found": 404,
    "method_not_allowed": 405,
    "body_too_large": 413,
    "too_many_images": 413,
    "unsupported_media_type": 415,
    "no_usable_image": 422,
    "queue_full": 429,
    "internal": 500,
    "not_ready": 503,
    "shutting_down": 503,
    "timeout": 503,
}

# What can be wrong with one image (in its result's ``error``).
IMAGE_ERRORS = ("bad_base64", "empty_image", "not_an_image", "bad_image", "image_too_large", "no_face",
                "bad_landmarks", "non_finite")


class ServiceError(Exception):
    """An error with a code of :data:`REQUEST_ERRORS` (or, for one image, of :data:`IMAGE_ERRORS`).

    Args:
        code: what went wrong, for programs.
        message: what went wrong, for people (never a path of the server, a key or a traceback).
        headers: extra response headers (``Retry-After``, ``WWW-Authenticate``).
    """

    def __init__(self, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.headers = code, message, dict(headers or {})

    @property
    def status(self) -> int:
        """The HTTP status of a request error (400 for an image error raised as one)."""
        return REQUEST_ERRORS.get(self.code, 400)

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    """The JSON body of a refused request."""
    return {"error": {"code": code, "message": message}}


def image_error_code(error: ImageError) -> str:
    """The code of an image that :func:`aikd.images.decode_image` refused, from its reason."""
    reason = str(error)
    if reason.startswith("image too large"):
        return "image_too_large"
    if reason.startswith("empty image") or reason == "image has no pixels":
        return "empty_image"
    if reason.startswith("not an image"):
        return "not_an_image"
    return "bad_image"
