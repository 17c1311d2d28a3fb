"""What can go wrong with a request, in the service's own terms.

The work (preprocessing, inference, artifact lookup) raises these and knows nothing of
HTTP; `app/errors.py` is the one place that turns each kind into a status code. A class
carries the short `error` title a client can switch on; the instance carries a `detail`
that says what to fix.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    error = "error"

    def __init__(self, detail: Any = None, error: str | None = None) -> None:
        super().__init__(error or self.error)
        self.detail = detail
        if error is not None:
            self.error = error


class MalformedRequest(ServiceError):
    """The body or a parameter cannot be parsed at all (broken JSON, broken multipart)."""

    error = "malformed request"


class InvalidInput(ServiceError):
    """Parsed, but the values or shapes are not what the model takes."""

    error = "invalid request"


class EmptyImage(InvalidInput):
    error = "empty image"


class WrongImageSize(InvalidInput):
    error = "wrong image size"


class WrongLatentSize(InvalidInput):
    error = "wrong latent size"


class UnknownScoreMethod(InvalidInput):
    """A `method` the model does not serve (GET /models lists each model's)."""

    error = "unknown score method"


class NotCarried(InvalidInput):
    """The model's artifact lacks what the request needs (per-digit Gaussians, a neighbour index)."""

    error = "not available for this model"


class LimitExceeded(ServiceError):
    """Over one of the VAE_MAX_* limits: the same request, smaller, would be served."""

    error = "over a limit"


class BodyTooLarge(LimitExceeded):
    error = "request body too large"


class ImageTooLarge(LimitExceeded):
    error = "image too large"


class BatchTooLarge(LimitExceeded):
    error = "batch too large"


class TooManySamples(LimitExceeded):
    error = "too many samples"


class MisdirectedHost(MalformedRequest):
    """The Host header names a server this is not (VAE_ALLOWED_HOSTS): DNS rebinding, or a wrong address."""

    error = "host not allowed"


class Unauthorized(ServiceError):
    """No API key, or not a valid one (VAE_API_KEYS)."""

    error = "API key needed"


class Forbidden(ServiceError):
    """A browser request from a web page this service does not trust (VAE_ALLOWED_ORIGINS)."""

    error = "origin not allowed"


class UnsupportedMediaType(ServiceError):
    error = "unsupported media type"


class UndecodableImage(ServiceError):
    error = "cannot decode image"


class UnknownModel(ServiceError):
    error = "unknown model"


class ArtifactRefused(ServiceError):
    """A model file that fails the checks every artifact passes before it takes traffic (repository load)."""

    error = "model file refused"


class NoLatentMap(ServiceError):
    """The model carries no latent map: its latents are not 2-D, or it was exported without one."""

    error = "no latent map"


class FormatNotAvailable(ServiceError):
    error = "format not available"


class Unavailable(ServiceError):
    """Try again shortly (Retry-After): the models are loading, or the service is full."""

    error = "not ready"


class Overloaded(Unavailable):
    error = "overloaded"


class RequestTimeout(ServiceError):
    """The client did not send its request within the time allowed (VAE_BODY_TIMEOUT_S)."""

    error = "request timeout"


class ComputeTimeout(ServiceError):
    """The forward pass did not finish within the request's time budget."""

    error = "compute timeout"
