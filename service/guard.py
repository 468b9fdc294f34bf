"""ASGI middleware in front of the service: every upload BentoML would fail on is refused first with a 4xx,
and a 500 from anywhere below says which request failed.

BentoML parses an API's multipart body itself and answers 500 when that fails (a missing boundary, a
part without a name, a binary part under an unexpected name, an over-long file name …). The guard
reads an API request's body (it is read whole anyway), checks its multipart envelope with
python-multipart, the parser BentoML uses too, and hands BentoML the same bytes only when they are
sound. The upload path then answers 200 or a 4xx JSON error ``{"error", "status"}``; anything else is a
bug, answered 500 ``{"error", "status", "request_id"}`` with the id also in ``X-Request-ID``; its
traceback is in the service log, never in the body.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.responses import JSONResponse

logger = logging.getLogger("bentoml.serve")
MAX_FILENAME_BYTES = 200  # BentoML keeps each file under a temporary name ending in its file name (255 bytes at most)


@dataclass(frozen=True)
class Form:
    """The multipart fields of one API: its file field, how many files it takes, its plain fields."""

    file: str
    most: int
    fields: tuple[str, ...]


def multipart_problem(body: bytes, boundary: bytes | None, form: Form) -> tuple[int, str] | None:
    """(status, message) for a multipart body BentoML could not turn into ``form``'s fields; None if sound."""
    if not boundary:
        return 400, "multipart body without a boundary in its Content-Type"
    parts: list[bytes] = []  # each part's Content-Disposition
    name, value = bytearray(), bytearray()
    ended = []

    def header_end() -> None:
        if name.strip().lower() == b"content-disposition":
            parts[-1] = bytes(value)
        name.clear()
        value.clear()

    try:
        parser = MultipartParser(boundary, {
            "on_part_begin": lambda: parts.append(b""), "on_header_field": lambda d, s, e: name.extend(d[s:e]),
            "on_header_value": lambda d, s, e: value.extend(d[s:e]), "on_header_end": header_end,
            "on_end": lambda: ended.append(True)})
        parser.write(body)
    except ValueError as e:  # python-multipart's parse errors, including its header size and count limits
        return 400, f"malformed multipart body: {e}"
    if not ended:
        return 400, "multipart body ends before its closing boundary"
    counts: dict[str, int] = {}
    for disposition in parts:
        kind, options = parse_options_header(disposition)
        if kind != b"form-data" or b"name" not in options:
            return 400, "a multipart part without Content-Disposition: form-data and a field name"
        field = options[b"name"].decode("latin-1")
        if field not in (form.file, *form.fields):
            return 400, f"unexpected field {field[:100]!r}; expected {', '.join((form.file, *form.fields))}"
        if (field == form.file) != (b"filename" in options):
            return 400, (f"{field!r} must be a file part (with a filename)" if field == form.file
                         else f"{field!r} must be a plain form field, not a file")
        if len(options.get(b"filename", b"")) > MAX_FILENAME_BYTES:
            return 400, f"file name over {MAX_FILENAME_BYTES} bytes"
        counts[field] = counts.get(field, 0) + 1
    for field, n in counts.items():
        if field == form.file and n > form.most > 1:
            return 413, f"{n} images in one request; expected 1 to {form.most}"
        if n > (form.most if field == form.file else 1):
            return 400, f"field {field!r} given {n} times; expected once"
    return None


class UploadGuard:
    """413 for a request body over ``limit`` bytes, from its Content-Length before anything is read or as
    soon as a chunked body goes over; for the API routes in ``forms`` (path → :class:`Form`), 415 for a
    media type other than multipart/form-data or JSON (which BentoML refuses with a 400 JSON answer) and
    400 or 413 for a multipart body that :func:`multipart_problem` refuses."""

    def __init__(self, app, limit: int, forms: dict[str, Form]) -> None:
        self.app, self.limit, self.forms = app, limit, forms

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and int(length) > self.limit:
            return await _error(413, f"payload of {int(length)} bytes is over the {self.limit}-byte limit",
                                scope, receive, send)
        form = self.forms.get(scope["path"]) if scope["method"] == "POST" else None
        media, params = parse_options_header(headers.get(b"content-type"))
        if form is None or media in (b"", b"application/json"):
            if length is not None:  # the HTTP server reads no more than the declared length
                return await self.app(scope, receive, send)
            return await self._counted(scope, receive, send)
        if media != b"multipart/form-data":
            return await _error(415, f"Content-Type {media.decode('latin-1')[:100]}: send multipart/form-data with "
                                f"a file field {form.file!r}", scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await _error(413, f"payload is over the {self.limit}-byte limit", scope, receive, send)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        problem = multipart_problem(body, params.get(b"boundary"), form)
        if problem:
            return await _error(*problem, scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _counted(self, scope, receive, send) -> None:
        """Pass a body without Content-Length through, answering 413 as soon as it goes over the limit."""
        received, refused = 0, False

        async def counting_receive():
            nonlocal received, refused
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit and not refused:
                refused = True
                await _error(413, f"payload is over the {self.limit}-byte limit", scope, receive, send)
            return {"type": "http.disconnect"} if refused else message  # the app stops reading

        async def guarded_send(message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counting_receive, guarded_send)


class InternalErrors:
    """Any 500 from below (a bug: BentoML logs its traceback) becomes ``{"error", "status": 500, "request_id"}``
    with the id in ``X-Request-ID`` too: BentoML's request id (the ``span=`` of its log lines) where it gave
    one, else a new one logged with the request's method and path."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        replaced = False

        async def rewriting_send(message) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start" and message["status"] == 500:
                replaced = True
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k not in (b"content-length", b"content-type")]
                rid = dict(headers).get(b"x-bentoml-request-id", b"").decode() or uuid.uuid4().hex[:16]
                logger.error("request %s (%s %s) answered 500; its traceback is in this log", rid,
                             scope["method"], scope["path"])
                body = json.dumps({"error": f"internal error; quote request id {rid} when reporting it",
                                   "status": 500, "request_id": rid}).encode()
                headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"x-request-id", rid.encode())]
                await send({**message, "headers": headers})
                await send({"type": "http.response.body", "body": body})
            elif not replaced:
                await send(message)

        await self.app(scope, receive, rewriting_send)


async def _error(status: int, message: str, scope, receive, send) -> None:
    await JSONResponse({"error": message, "status": status}, status)(scope, receive, send)
