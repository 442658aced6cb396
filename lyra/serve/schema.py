"""The wire format of the API server: pydantic request models and OpenAI error objects.

Every model forbids unknown fields (`extra="forbid"`) and is strict (no "5" for 5, no
true for 1, no NaN), so a misspelt option is an error instead of being ignored. What
depends on the server's configuration (token and media caps, the served model id) is
checked by `lyra.serve.api` after this schema passed.

Validation errors become OpenAI error objects `{"error": {"message", "type", "param",
"code"}}` through `first_error`, with `param` the JSON path of the first
offending value (`messages[0].content[1].input_audio.data`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

# the `format` names clients may give -> what the decoder in `lyra.serve.media` must find in the data
AUDIO_INPUT_FORMATS = {"wav": {"WAV", "WAVEX", "RF64"}, "mp3": {"MP3", "MPEG"}, "flac": {"FLAC"}}  # soundfile's names
VIDEO_INPUT_FORMATS = {"mp4": "mp4", "webm": "webm", "mov": "mov", "mkv": "matroska", "avi": "avi"}  # PyAV demuxer
PART_TYPES = ("text", "image_url", "input_audio", "input_sound", "input_video")


# ---------------------------------------------------------------------- errors
class APIError(Exception):
    """An error answered with `status` and an OpenAI error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


# ---------------------------------------------------------------------- request models
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ImageURL(_Strict):
    url: str = Field(description="a data:image/...;base64 URL, or a path under the server's --media-root")
    detail: Literal["auto", "low", "high"] | None = Field(None, description="accepted; the pixel budget rules")


class InputAudio(_Strict):
    data: str = Field(description="base64 audio")
    format: Literal[tuple(AUDIO_INPUT_FORMATS)]


class InputVideo(_Strict):
    data: str = Field(description="base64 video")
    format: Literal[tuple(VIDEO_INPUT_FORMATS)]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class AudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio = Field(description="speech")


class SoundPart(_Strict):
    type: Literal["input_sound"]
    input_sound: InputAudio = Field(description="non-speech audio (a Lyra extension)")


class VideoPart(_Strict):
    type: Literal["input_video"]
    input_video: InputVideo = Field(description="the frames of a video (a Lyra extension)")


def _part_tag(value: Any) -> str | None:
    """Which part model applies; tags hold a ':' so `error_param` can tell them from field names."""
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return f"part:{kind}" if kind in PART_TYPES else None


def _content_tag(value: Any) -> str | None:
    if isinstance(value, str):
        return "content:string"
    return "content:parts" if isinstance(value, list) else None


ContentPart = Annotated[
    Union[Annotated[TextPart, Tag("part:text")], Annotated[ImagePart, Tag("part:image_url")],
          Annotated[AudioPart, Tag("part:input_audio")], Annotated[SoundPart, Tag("part:input_sound")],
          Annotated[VideoPart, Tag("part:input_video")]],
    Discriminator(_part_tag, custom_error_type="invalid_part_type",
                  custom_error_message=f"a content part must be an object whose 'type' is one of "
                                       f"{', '.join(PART_TYPES)}"),
]
Content = Annotated[
    Union[Annotated[str, Tag("content:string")], Annotated[list[ContentPart], Tag("content:parts")]],
    Discriminator(_content_tag, custom_error_type="invalid_content",
                  custom_error_message="must be a string or an array of content parts"),
]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"] = Field(description="developer is taken as system")
    content: Content
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool | None = None


class AudioOutput(_Strict):
    voice: str | None = Field(None, description="one voice for now; accepted and ignored")
    format: Literal["wav"] = "wav"


class ChatCompletionRequest(_Strict):
    """`POST /v1/chat/completions`: the OpenAI chat format, plus `input_sound` / `input_video` parts."""

    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="default 0: greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: Literal[1] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: AudioOutput | None = None
    user: str | None = None


# ---------------------------------------------------------------------- validation errors -> OpenAI errors
_TYPE_ERRORS = {"string_type", "int_type", "float_type", "bool_type", "list_type", "dict_type", "model_type",
                "model_attributes_type", "invalid_content", "int_from_float", "none_required"}


def error_param(loc: tuple) -> str | None:
    """A pydantic location -> the JSON path clients know: ('messages', 0, 'content', 'content:parts', 1,
    'part:text', 'text') -> 'messages[0].content[1].text'. Union tags (they hold a ':') are dropped."""
    param = ""
    for item in loc:
        if isinstance(item, int):
            param += f"[{item}]"
        elif ":" not in item:
            param += f".{item}" if param else item
    return param or None


def error_from_validation(error: dict[str, Any]) -> APIError:
    """One pydantic error (an entry of `ValidationError.errors()`) as an OpenAI error object."""
    kind, loc, message = error["type"], tuple(error["loc"]), error["msg"]
    param = error_param(loc)
    if kind == "json_invalid":
        return invalid(f"the request body is not valid JSON: {error.get('ctx', {}).get('error', message)}", None,
                       "invalid_json")
    if not loc:
        return invalid("the request body must be a JSON object", None, "invalid_json")
    if kind == "extra_forbidden":
        return invalid(f"unknown parameter '{param}'", param, "unknown_parameter")
    if kind == "missing":
        return invalid(f"missing required parameter '{param}'", param, "missing_required_parameter")
    if kind == "invalid_part_type":
        param = f"{param}.type"
        return invalid(f"'{param}': {message}", param)
    if kind in _TYPE_ERRORS:
        return invalid(f"'{param}': {message}", param, "invalid_type")
    return invalid(f"'{param}': {message.removeprefix('Value error, ')}", param)


def first_error(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """The first of a validation's errors as an OpenAI error object; FastAPI's locations start with
    'body' (where the value came from), which is dropped so that `param` is the path inside the body."""
    first = dict(errors[0])
    loc = tuple(first.get("loc", ()))
    first["loc"] = loc[1:] if loc[:1] == ("body",) else loc
    return error_from_validation(first)
