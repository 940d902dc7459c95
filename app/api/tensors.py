"""The Open Inference Protocol's wire forms around the JSON: compressed bodies and binary tensor data.

What real clients send and expect besides plain JSON (tritonclient, the KServe SDK):

- ``Content-Encoding: gzip`` or ``deflate`` request bodies, decompressed here up to the body limit
  (the limit holds after decompression: a small bomb is a 413, never the memory it unpacks to), and
  compressed responses when ``Accept-Encoding`` asks for them;
- Triton's binary tensor data extension: the JSON header is the first
  ``Inference-Header-Content-Length`` bytes of the body, followed by the raw little-endian tensors of
  the inputs whose parameters give a ``binary_data_size``, in input order; outputs asked for with
  ``binary_data`` (or the request's ``binary_data_output``) come back the same way. A BYTES element
  is a 4-byte little-endian length and then its bytes.
  Reference: https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_binary_data.md
"""

from __future__ import annotations

import re
import struct
import zlib
from typing import Any

import numpy as np

from app.errors import APIError

HEADER_LENGTH = "inference-header-content-length"
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration"]

# Element types of the binary form, little-endian (BYTES is length-prefixed, handled apart).
NUMPY_TYPES: dict[str, str] = {
    "BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}


class BodyTooLargeAfterDecompression(APIError):
    def __init__(self, limit: int) -> None:
        super().__init__(
            413, f"the decompressed request body is larger than {limit} bytes; send fewer instances per request"
        )


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body as sent before ``Content-Encoding``; at most ``limit`` bytes are ever unpacked."""
    codings = [c.strip().lower() for c in (encoding or "").split(",") if c.strip() and c.strip().lower() != "identity"]
    # One coding at most: each layer may unpack up to the limit, so a stack of them would cost a worker
    # many times the body limit in CPU before the API key or the rate limit is even looked at.
    if len(codings) > 1:
        raise APIError(415, f"Content-Encoding {encoding!r} stacks {len(codings)} codings; send the body with one, "
                            "gzip or deflate")
    for coding in codings:
        if coding in ("gzip", "x-gzip"):
            body = _inflate(body, zlib.MAX_WBITS | 16, limit, coding)
        elif coding == "deflate":
            # RFC 9110's deflate is the zlib format; some clients send the raw stream: both are read.
            try:
                body = _inflate(body, zlib.MAX_WBITS, limit, coding)
            except APIError as exc:
                if exc.status == 413:
                    raise
                body = _inflate(body, -zlib.MAX_WBITS, limit, coding)
        else:
            raise APIError(
                415, f"Content-Encoding {coding!r} is not supported; send the body as is, gzip or deflate"
            )
    return body


def _inflate(body: bytes, wbits: int, limit: int, coding: str) -> bytes:
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise APIError(400, f"the request body is not valid {coding} data ({exc})") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise BodyTooLargeAfterDecompression(limit)
    if not inflater.eof:
        raise APIError(400, f"the request body is truncated {coding} data; send the whole compressed body")
    return out


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary tensor data) of a request body."""
    if header_length is None:
        return body, b""
    if not re.fullmatch(r"[0-9]+", header_length.strip()):
        raise APIError(400, f"Inference-Header-Content-Length must be a byte count, got {header_length!r}")
    n = int(header_length)
    if n > len(body):
        raise APIError(
            400, f"Inference-Header-Content-Length is {n} but the body holds only {len(body)} bytes"
        )
    return body[:n], body[n:]


def binary_size(parameters: dict[str, Any] | None) -> int | None:
    size = (parameters or {}).get("binary_data_size")
    if size is None:
        return None
    if type(size) is not int or size < 0:
        raise APIError(400, f"binary_data_size must be a non-negative integer, got {size!r}")
    return size


def read_binary(name: str, datatype: str, shape: list[int], chunk: bytes) -> list[Any]:
    """One input tensor's values, flat, from its binary form."""
    count = 1
    for d in shape:
        count *= max(d, 0)
    if datatype == "BYTES":
        values, offset = [], 0
        while offset < len(chunk):
            if offset + 4 > len(chunk):
                raise APIError(400, f"input {name!r}: a BYTES element's 4-byte length is cut short")
            (length,) = struct.unpack_from("<I", chunk, offset)
            offset += 4
            if offset + length > len(chunk):
                raise APIError(400, f"input {name!r}: a BYTES element says {length} bytes, fewer follow")
            raw = chunk[offset : offset + length]
            offset += length
            try:
                values.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise APIError(400, f"input {name!r}: a BYTES element is not UTF-8 text") from None
        if len(values) != count:
            raise APIError(400, f"input {name!r}: shape {shape} needs {count} values, got {len(values)}")
        return values
    dtype = np.dtype(NUMPY_TYPES[datatype])
    if len(chunk) != count * dtype.itemsize:
        raise APIError(
            400,
            f"input {name!r}: shape {shape} of {datatype} needs {count * dtype.itemsize} bytes of binary data, "
            f"got {len(chunk)}",
        )
    array = np.frombuffer(chunk, dtype=dtype)
    if datatype == "FP16":
        array = array.astype(np.float64)
    return array.tolist()


def to_binary(values: np.ndarray, datatype: str) -> bytes:
    """A tensor's binary form: raw little-endian elements, or length-prefixed UTF-8 for BYTES."""
    if datatype == "BYTES":
        parts = []
        for value in values.reshape(-1).tolist():
            raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
            parts.append(struct.pack("<I", len(raw)))
            parts.append(raw)
        return b"".join(parts)
    return np.ascontiguousarray(values, dtype=np.dtype(NUMPY_TYPES[datatype])).tobytes()


def response_encoding(accept_encoding: str | None) -> str | None:
    """gzip or deflate when the client accepts it (a q of 0 refuses), gzip first; None for identity."""
    accepted: dict[str, float] = {}
    for item in (accept_encoding or "").split(","):
        coding, _, params = item.strip().partition(";")
        q = 1.0
        if params.strip().startswith("q="):
            try:
                q = float(params.strip()[2:])
            except ValueError:
                q = 0.0
        accepted[coding.strip().lower()] = q
    for coding in ("gzip", "deflate"):
        if accepted.get(coding, accepted.get("*", 0.0)) > 0:
            return coding
    return None


def compress(body: bytes, coding: str) -> bytes:
    if coding == "gzip":
        packer = zlib.compressobj(6, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    else:
        packer = zlib.compressobj(6, zlib.DEFLATED, zlib.MAX_WBITS)
    return packer.compress(body) + packer.flush()
