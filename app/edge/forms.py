"""The inference routes' multipart forms, parsed and validated as FastAPI would.

* the form is parsed by ``multipart`` (the parser of Bottle; ~10x less CPU than Starlette's
  form parsing for our uploads: no SpooledTemporaryFile and UploadFile per upload, no
  per-byte callbacks), with Starlette's limits and decoding rules reproduced: at most 1000
  fields and 1000 files, 1 MB per text field, text decoded with the request's charset and read
  as latin-1 where that fails, a truncated body ends the form (its complete parts count);
* the fields are validated by pydantic models with the routes' own names and constraints
  (app/edge/routes.py declares them for the OpenAPI schema), so a 422 carries the same message
  as FastAPI's would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from multipart import MultipartError, MultipartSegment, PushMultipartParser, parse_options_header
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import ApiError

# Starlette's form-parser limits (Request.form's defaults), so both refuse the same forms.
MAX_FIELDS = 1000
MAX_FILES = 1000
MAX_PART_SIZE = 1024 * 1024  # a text field; file parts are bounded by the body limit


class FormError(Exception):
    """A body that is not a readable multipart form (400 bad_request)."""


@dataclass(frozen=True)
class UploadedFile:
    """A form part sent with a filename: its bytes, as FastAPI's UploadFile would hold them."""

    filename: str
    content_type: str | None
    data: bytes


def _decode_text(data: bytes, charset: str) -> str:
    try:
        return data.decode(charset)
    except (UnicodeDecodeError, LookupError):
        return data.decode("latin-1")


def parse_form(body: bytes, content_type: str) -> list[tuple[str, str | UploadedFile]]:
    """Multipart ``body`` -> [(field name, text or UploadedFile)] in order, as Starlette reads it."""
    _, params = parse_options_header(content_type)
    boundary = params.get("boundary")
    if not boundary:
        raise FormError("Missing boundary in multipart.")
    charset = params.get("charset") or "utf-8"
    items: list[tuple[str, str | UploadedFile]] = []
    fields = files = 0
    segment: MultipartSegment | None = None
    is_file = False
    chunks: list[bytes] = []
    size = 0
    if not body:
        return items
    try:
        parser = PushMultipartParser(boundary, max_header_count=64, header_charset="latin-1")
        if body and not body.startswith(b"--" + boundary.encode("latin-1")):
            # python-multipart (and so Starlette) wants the first boundary at the very start.
            raise FormError("Invalid multipart data.")
        for event in parser.parse(body):
            if isinstance(event, MultipartSegment):
                segment, chunks, size = event, [], 0
                # The parser read the Content-Disposition already; it reports a missing name as
                # "" (non-strict mode), so only an empty name needs a second look.
                if not event.name and "name" not in parse_options_header(
                        event.header("Content-Disposition", "") or "")[1]:
                    raise FormError('The Content-Disposition header field "name" must be provided.')
                is_file = event.filename is not None
                if is_file:
                    files += 1
                    if files > MAX_FILES:
                        raise FormError(f"Too many files. Maximum number of files is {MAX_FILES}.")
                else:
                    fields += 1
                    if fields > MAX_FIELDS:
                        raise FormError(f"Too many fields. Maximum number of fields is {MAX_FIELDS}.")
            elif event:
                size += len(event)
                if not is_file and size > MAX_PART_SIZE:
                    raise FormError(f"Part exceeded maximum size of {MAX_PART_SIZE // 1024}KB.")
                chunks.append(event)
            else:  # end of a segment
                assert segment is not None
                data = b"".join(chunks)
                name = segment.name or ""
                if is_file:
                    items.append((name, UploadedFile(segment.filename or "", segment.content_type, data)))
                else:
                    items.append((name, _decode_text(data, charset)))
                segment = None
        # A truncated stream ends the form: its complete parts count, as with Starlette's parser.
        parser.close(check_complete=False)
    except MultipartError as e:
        if "Content-Disposition" in str(e):  # a part without one has no name either
            raise FormError('The Content-Disposition header field "name" must be provided.') from None
        raise FormError("Invalid multipart data.") from None
    return items


class _Form(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    image: Any

    @field_validator("image")
    @classmethod
    def _is_file(cls, v: Any) -> UploadedFile:
        if not isinstance(v, UploadedFile):
            raise ValueError(f"Expected UploadFile, received: {type(v)}")
        return v


class AnswerForm(_Form):
    question: Annotated[str, Field(min_length=1)]
    top_k: int = 3
    explain: bool = False


class AnswersForm(_Form):
    questions: list[str]
    top_k: int = 3


def form_values(items: list[tuple[str, str | UploadedFile]], lists: frozenset[str]) -> dict:
    """FastAPI's reading of form parameters: the last value of a repeated scalar field; every
    value of a list field; an empty text value counts as missing."""
    values: dict[str, Any] = {}
    for name, value in items:
        if name in lists:
            values.setdefault(name, []).append(value)
        else:
            values[name] = value
    return {k: v for k, v in values.items() if not (isinstance(v, str) and v == "") and v != []}


def take_image(items: list[tuple[str, str | UploadedFile]], form: Any) -> bytes:
    """The validated form's image bytes, with every other reference to them dropped (the parsed
    items are cleared), so that whoever the bytes are handed to holds the only one."""
    data = form.image.data
    items.clear()
    return data


def validation_error(e: ValidationError) -> ApiError:
    """The same 422 as app.errors' RequestValidationError handler."""
    details = [{"field": ".".join(str(p) for p in err.get("loc", ())),
                "problem": err.get("msg", "invalid")} for err in e.errors()]
    summary = "; ".join(f"{d['field']}: {d['problem']}" for d in details[:5]) or "invalid request"
    err = ApiError(422, "invalid_request", summary)
    err.details = details  # type: ignore[attr-defined]
    return err
