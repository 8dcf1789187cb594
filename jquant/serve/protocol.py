"""OpenAI's request bodies, parsed and checked; its error body.

Requests are validated strictly (no ``"5"`` for 5, no ``true`` for 1) and every problem is
an `APIError`: HTTP 400 with OpenAI's error body, naming the parameter at fault (a body over
`MAX_BODY_BYTES`: HTTP 413). A body must be UTF-8 JSON nested at most `MAX_JSON_DEPTH` deep,
its strings valid Unicode (no lone surrogate such as ``"\ud800"``). The numeric limits of
the sampling fields are `jquant.serve.limits`'. Fields jquant
cannot honour are accepted only at their default value; pure metadata (``user``,
``metadata``, ``store``, ...) is accepted and ignored; any other field is rejected as
OpenAI does: ``Unrecognized request argument supplied: <name>``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from jquant.serve.limits import LimitError

#: Prompts one completions request may batch.
MAX_PROMPTS = 64
#: The largest request body read (HTTP 413 beyond).
MAX_BODY_BYTES = 16 * 2**20
#: The deepest nesting of arrays and objects a body may have.
MAX_JSON_DEPTH = 64
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SCALARS = frozenset((int, float, bool, type(None)))
#: Chat roles accepted ("developer" is rendered as "system").
ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    """A request the server refuses: HTTP ``status`` with OpenAI's error body (and HTTP
    ``headers``, e.g. ``Retry-After``)."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = (
            message, param, code, status, type
        )  # fmt: skip
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _Only:
    """Marks a field jquant cannot honour: any value but ``accepted`` (its defaults) is refused
    as unsupported, saying ``why`` (`_check_unsupported`)."""

    accepted: tuple
    why: str


_NO_LOGIT_BIAS = _Only((None, {}), "only an empty or null logit_bias is accepted.")
_NO_ECHO = _Only((None, False), "the prompt is not echoed; use false.")
_ONE_BEST = _Only((None, 1), "only 1 is accepted; use n for several choices.")
_NO_SUFFIX = _Only((None, ""), "insertion is not supported; use null.")
_TEXT_ONLY = _Only((None, ["text"]), "only ['text'] is accepted.")
_NO_TOOLS = _Only((None, []), "tool calling is not supported.")
_TOOL_NONE = _Only((None, "none"), "tool calling is not supported; use 'none'.")
_NULL = _Only((None,), "use null.")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # accepted; jquant adds no obfuscation padding


class _Common(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    n: int | None = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: Any = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # Supported only at their default value.
    logit_bias: Annotated[dict[str, Any] | None, _NO_LOGIT_BIAS] = None
    # Metadata: accepted and ignored.
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # Extensions (vLLM's names): top_k 0 or -1 = off; ignore_eos keeps going past EOS;
    # repetition_penalty (1 = off) divides positive logits of the prompt's and output's tokens.
    top_k: int | None = None
    ignore_eos: bool | None = None
    repetition_penalty: float | None = None


class CompletionRequest(_Common):
    """``POST /v1/completions``."""

    prompt: Any
    logprobs: int | None = None  # 0..20: each token's log-probability and this many others
    echo: Annotated[bool | None, _NO_ECHO] = None
    best_of: Annotated[int | None, _ONE_BEST] = None
    suffix: Annotated[str | None, _NO_SUFFIX] = None
    response_format: dict[str, Any] | None = None  # vLLM's extension: as chat's


class ChatCompletionRequest(_Common):
    """``POST /v1/chat/completions``."""

    messages: Any
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None  # 0..20, only with logprobs: true
    tools: Annotated[list[Any] | None, _NO_TOOLS] = None
    functions: Annotated[list[Any] | None, _NO_TOOLS] = None
    tool_choice: Annotated[Any, _TOOL_NONE] = None
    function_call: Annotated[Any, _TOOL_NONE] = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None  # `jquant.serve.grammar`
    modalities: Annotated[list[str] | None, _TEXT_ONLY] = None
    audio: Annotated[Any, _NULL] = None
    prediction: Annotated[Any, _NULL] = None
    web_search_options: Annotated[Any, _NULL] = None
    reasoning_effort: str | None = None  # no reasoning mode: ignored
    verbosity: str | None = None  # ignored


def parse_body(raw: bytes, cls: type[_Common]) -> _Common:
    """The request ``cls`` from a raw body; `APIError` for malformed JSON or a bad field."""
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        why = _too_deep() if isinstance(e, RecursionError) else str(e)
        raise APIError(
            f"We could not parse the JSON body of your request. ({why}) The OpenAI API "
            "expects a JSON payload.",
            code="invalid_json",
        ) from None
    if not isinstance(data, dict):
        raise APIError("The request body must be a JSON object.", code="invalid_json")
    # A lone surrogate can only come from a \\uXXXX escape (raw UTF-8 has none).
    strings = json.detect_encoding(raw) != "utf-8" or _SURROGATE_ESCAPE.search(raw) is not None
    _check_json(data, strings)
    try:
        request = cls.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None
    _check_unsupported(request)
    return request


def _too_deep() -> str:
    return f"it is nested more than {MAX_JSON_DEPTH} levels deep"


def _check_json(data: dict, strings: bool) -> None:
    """`APIError` for a body nested deeper than `MAX_JSON_DEPTH`, or (``strings``: the body
    may hold one) with a string or key holding a lone surrogate, which no tokenizer can
    encode. Iterative, so any depth is safe to check; arrays of scalars are passed over in C."""
    scalars = _SCALARS if strings else _SCALARS | {str}
    todo: list[tuple[Any, tuple, int]] = [(data, (), 1)]
    while todo:
        value, path, depth = todo.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(f"We could not parse the JSON body of your request. "
                           f"({_too_deep()}) The OpenAI API expects a JSON payload.",
                           code="invalid_json")  # fmt: skip
        if isinstance(value, dict):
            if strings and any(_SURROGATE.search(key) for key in value):
                where = _param(path) or "body"
                raise APIError(f"Invalid '{where}': a key holds a lone surrogate, which is not "
                               "valid Unicode.", param=where, code="invalid_value")  # fmt: skip
            items = value.items()
        elif set(map(type, value)) <= scalars:
            continue
        else:
            items = enumerate(value)
        for key, item in items:
            if isinstance(item, dict | list):
                todo.append((item, (*path, key), depth + 1))
            elif strings and isinstance(item, str) and (bad := _SURROGATE.search(item)):
                where = _param((*path, key))
                raise APIError(f"Invalid '{where}': the string holds a lone surrogate "
                               f"({bad.group()!a}), which is not valid Unicode (UTF-16 "
                               "surrogates must come in pairs).", param=where,
                               code="invalid_value")  # fmt: skip


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _param(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _validation_error(e: ValidationError) -> APIError:
    err = e.errors(include_url=False)[0]
    param = _param(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        if len(err["loc"]) == 1:
            return APIError(f"Unrecognized request argument supplied: {param}", param=param,
                            code="unknown_parameter")  # fmt: skip
        return APIError(f"Unrecognized argument supplied: '{param}'", param=param,
                        code="unknown_parameter")  # fmt: skip
    if kind == "missing":
        return APIError(f"Missing required parameter: '{param}'.", param=param,
                        code="missing_required_parameter")  # fmt: skip
    return APIError(f"Invalid type for '{param}': {err['msg'].lower()}, got "
                    f"{_json_type(err.get('input'))}.", param=param,
                    code="invalid_type")  # fmt: skip


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, int | float):
        text = repr(value)  # a JSON integer may have thousands of digits
        return f"a number ({text if len(text) <= 40 else text[:20] + '...' + text[-8:]})"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _unsupported(param: str, what: str) -> APIError:
    return APIError(f"'{param}' is not supported by this server: {what}", param=param,
                    code="unsupported_parameter")  # fmt: skip


def _check_unsupported(r: _Common) -> None:
    """`APIError` for an OpenAI feature jquant cannot honour, given a non-default value (a
    field marked `_Only`), or ``stream_options`` without ``stream``."""
    if r.stream_options is not None and not r.stream:
        raise APIError("The 'stream_options' parameter is only allowed when 'stream' is "
                       "enabled.", param="stream_options", code="invalid_value")  # fmt: skip
    if getattr(r, "top_logprobs", None) is not None and not r.logprobs:
        raise APIError("The 'top_logprobs' parameter is only allowed when 'logprobs' is "
                       "true.", param="top_logprobs", code="invalid_value")  # fmt: skip
    for name, field in type(r).model_fields.items():
        for only in field.metadata:
            if isinstance(only, _Only) and getattr(r, name) not in only.accepted:
                raise _unsupported(name, only.why)


def stop_strings(stop) -> tuple[str, ...]:
    """``stop`` (null, a string or a list of strings) as a tuple."""
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise APIError("Invalid type for 'stop': expected a string or an array of strings.",
                       param="stop", code="invalid_type")  # fmt: skip
    return tuple(items)  # their count and lengths: `jquant.serve.limits.check_sampling`


def prompts(prompt) -> list[str | list[int]]:
    """``prompt`` as a list of texts or token id lists (OpenAI's four forms); token ids are
    checked against the vocabulary with the rest of the limits (`jquant.serve.limits`)."""
    bad = APIError("Invalid type for 'prompt': expected a string, an array of strings, an array "
                   "of integers or an array of integer arrays.", param="prompt",
                   code="invalid_type")  # fmt: skip
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad if not isinstance(prompt, list) else APIError(
            "Invalid 'prompt': empty array.", param="prompt", code="invalid_value")
    if all(_is_int(t) for t in prompt):
        items = [prompt]
    elif all(isinstance(p, str) for p in prompt):
        items = list(prompt)
    elif all(isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt):
        items = list(prompt)
    else:
        raise bad
    if len(items) > MAX_PROMPTS:
        raise APIError(f"Invalid 'prompt': at most {MAX_PROMPTS} prompts per request, got "
                       f"{len(items)}.", param="prompt", code="array_above_max_length")  # fmt: skip
    return items


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def messages(value) -> list[dict[str, str]]:
    """``messages`` as ``[{"role", "content"}]`` with text content, for a chat template."""
    if not isinstance(value, list):
        raise APIError("Invalid type for 'messages': expected an array of objects.",
                       param="messages", code="invalid_type")  # fmt: skip
    if not value:
        raise APIError("Invalid 'messages': empty array. Expected an array with minimum length "
                       "1.", param="messages", code="empty_array")  # fmt: skip
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(f"Invalid type for '{where}': expected an object.", param=where,
                           code="invalid_type")  # fmt: skip
        known = {"role", "content", "name", "tool_call_id", "refusal", "tool_calls",
                 "function_call"}  # fmt: skip
        for key in m:
            if key not in known:
                raise APIError(f"Unrecognized argument supplied: '{where}.{key}'",
                               param=f"{where}.{key}", code="unknown_parameter")  # fmt: skip
        role = m.get("role")
        if role not in ROLES:
            raise APIError(f"Invalid value for '{where}.role': expected one of "
                           f"{', '.join(map(repr, ROLES))}, got {role!r}.",
                           param=f"{where}.role", code="invalid_value")  # fmt: skip
        if m.get("tool_calls") or m.get("function_call"):
            raise _unsupported(f"{where}.tool_calls", "tool calling is not supported.")
        if "name" in m and not isinstance(m["name"], str):
            raise APIError(f"Invalid type for '{where}.name': expected a string.",
                           param=f"{where}.name", code="invalid_type")  # fmt: skip
        out.append({"role": "system" if role == "developer" else role,
                    "content": _content(m.get("content"), role, where)})  # fmt: skip
    return out


def _content(content, role: str, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""
    if not isinstance(content, list):
        raise APIError(f"Invalid type for '{where}.content': expected a string or an array of "
                       "content parts.", param=f"{where}.content",
                       code="invalid_type")  # fmt: skip
    texts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else None
            raise APIError(f"Invalid '{at}': only text content parts are supported"
                           f"{f', got type {kind!r}' if kind else ''}.", param=at,
                           code="invalid_value")  # fmt: skip
        if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
            raise APIError(f"Invalid '{at}': a text part is {{'type': 'text', 'text': str}}.",
                           param=at, code="invalid_value")  # fmt: skip
        texts.append(part["text"])
    return "\n".join(texts)


def limit_error(e: LimitError, rename: dict[str, str] | None = None) -> APIError:
    """The HTTP 400 of a request outside `jquant.serve.limits`, its parameter named as the
    request names it (``rename``: the engine's name -> the request's, e.g. ``prompt`` ->
    ``messages``)."""
    rename = rename or {}
    param = rename.get(e.param, e.param)
    message = str(e).replace(f"'{e.param}'", f"'{param}'", 1)
    return APIError(message, param=param, code=e.code)
