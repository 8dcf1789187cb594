"""The limits of one request, defined and checked in one place.

Both the HTTP server (`jquant.serve.server`, which answers a violation with HTTP 400 naming
the parameter) and the engine (`jquant.serve.engine.Engine.check`, which raises ValueError for
Python callers) validate through these functions, so the two can never disagree. Every numeric
field is bounded above and below:

============================  ===========================================================
``max_tokens``                1 .. ``max_context - len(prompt)`` (and at most ``INT32_MAX``)
``temperature``               0 .. 2 (OpenAI's range; 0 = greedy), finite
``top_p``                     0 .. 1 (0 = only the most likely token), finite
``top_k``                     -1 .. the model's vocabulary size (-1 and 0 = off; vLLM's
                              convention); without a model, at most ``INT32_MAX`` (the
                              engine's sampling arrays are int32)
``seed``                      engine: 0 .. 2**32 - 1 (its sampling seeds are uint32);
                              HTTP: a signed 64-bit integer, reduced modulo 2**32
``presence_penalty``          -2 .. 2 (OpenAI's range; 0 = off), finite
``frequency_penalty``         -2 .. 2 (OpenAI's range; 0 = off), finite
``repetition_penalty``        above 0 .. 2 (vLLM's range; 1 = off), finite
``logprobs``                  null or 0 .. ``MAX_LOGPROBS`` (chat: ``top_logprobs``)
``n``                         1 .. the engine's slots
``stop``                      at most ``MAX_STOP`` non-empty strings of at most
                              ``MAX_STOP_CHARS`` characters each
``stop_token_ids``            at most ``MAX_STOP_TOKEN_IDS`` ids in the vocabulary
prompt                        1 .. ``max_context - 1`` tokens, every id in the vocabulary
============================  ===========================================================

The vocabulary is the model config's ``vocab_size`` (the embedding table: any id below it is a
row the model can read; a tokenizer's count may differ by padding or added tokens).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

INT32_MAX = 2**31 - 1
MAX_TEMPERATURE = 2.0
MAX_PENALTY = 2.0  # presence and frequency: OpenAI's [-2, 2]
MAX_REPETITION_PENALTY = 2.0  # vLLM's (0, 2]
#: Alternatives one position's log-probabilities may list (OpenAI's limit).
MAX_LOGPROBS = 20
#: Stop strings one request may give (OpenAI's limit), and their longest length.
MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
#: Seeds the engine takes (uint32); an HTTP request's seed is an int64 reduced modulo this.
SEED_MODULUS = 2**32
REQUEST_SEED_MIN, REQUEST_SEED_MAX = -(2**63), 2**63 - 1


class LimitError(ValueError):
    """A request outside the limits; ``param`` names the field at fault (the engine's name:
    ``prompt``, ``max_tokens``, ``temperature``, ...) and ``code`` says how (OpenAI's codes:
    ``invalid_value``, ``invalid_type``, ``context_length_exceeded``, ...)."""

    def __init__(self, param: str, message: str, code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.code = param, code


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_int(name: str, value, low: int, high: int, what: str = "") -> int:
    """``value`` as an int; `LimitError` unless it is an integer in ``[low, high]``."""
    if not _is_int(value):
        raise LimitError(name, f"Invalid type for '{name}': expected an integer, got "
                         f"{value!r}.", code="invalid_type")  # fmt: skip
    if not low <= value <= high:
        raise LimitError(name, f"Invalid '{name}': expected a value between {low} and {high}"
                         f"{what}, got {value}.")  # fmt: skip
    return int(value)


def check_number(name: str, value, low: float, high: float, what: str = "") -> float:
    """``value`` as a float; `LimitError` unless it is a finite number in ``[low, high]``."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise LimitError(name, f"Invalid type for '{name}': expected a number, got "
                         f"{value!r}.", code="invalid_type")  # fmt: skip
    if not (math.isfinite(value) and low <= value <= high):
        raise LimitError(name, f"Invalid '{name}': expected a value between {low:g} and "
                         f"{high:g}{what}, got {value!r}.")  # fmt: skip
    return float(value)


def check_sampling(params, vocab_size: int | None = None) -> None:
    """`LimitError` naming the first field of a `SamplingParams` out of its limits; with
    ``vocab_size``, ``top_k`` and ``stop_token_ids`` are also checked against the vocabulary."""
    check_int("max_tokens", params.max_tokens, 1, INT32_MAX)
    check_number("temperature", params.temperature, 0.0, MAX_TEMPERATURE)
    check_number("top_p", params.top_p, 0.0, 1.0)
    top_k_max = INT32_MAX if vocab_size is None else vocab_size
    check_int("top_k", params.top_k, -1, top_k_max,
              " (-1 or 0 = off)" if vocab_size is None else
              " (-1 or 0 = off; at most the vocabulary size)")  # fmt: skip
    if params.seed is not None:
        check_int("seed", params.seed, 0, SEED_MODULUS - 1)
    check_number("presence_penalty", params.presence_penalty, -MAX_PENALTY, MAX_PENALTY)
    check_number("frequency_penalty", params.frequency_penalty, -MAX_PENALTY, MAX_PENALTY)
    r = check_number("repetition_penalty", params.repetition_penalty, 0.0,
                     MAX_REPETITION_PENALTY, " (above 0; 1 = off)")  # fmt: skip
    if r == 0:
        raise LimitError("repetition_penalty", "Invalid 'repetition_penalty': expected a value "
                         f"above 0 and at most {MAX_REPETITION_PENALTY:g} (1 = off), got 0.0.")
    if params.logprobs is not None:
        check_int("logprobs", params.logprobs, 0, MAX_LOGPROBS)
    stop = params.stop
    if isinstance(stop, str) or not isinstance(stop, Sequence):
        raise LimitError("stop", f"Invalid type for 'stop': expected a sequence of strings, got "
                         f"{stop!r}.", code="invalid_type")  # fmt: skip
    if len(stop) > MAX_STOP:
        raise LimitError("stop", f"Invalid 'stop': array too long. Expected an array with "
                         f"maximum length {MAX_STOP}, but got an array with length {len(stop)} "
                         "instead.", code="array_above_max_length")  # fmt: skip
    for s in stop:
        if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
            raise LimitError("stop", f"Invalid 'stop': stop strings must be non-empty strings "
                             f"of at most {MAX_STOP_CHARS} characters, got {s!r:.80}.")  # fmt: skip
    ids = params.stop_token_ids
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise LimitError("stop_token_ids", f"Invalid 'stop_token_ids': at most "
                         f"{MAX_STOP_TOKEN_IDS} ids, got {len(ids)}.",
                         code="array_above_max_length")  # fmt: skip
    for t in ids:
        check_int("stop_token_ids", t, 0, INT32_MAX if vocab_size is None else vocab_size - 1)


def check_prompt(prompt_ids: Sequence[int], vocab_size: int) -> None:
    """`LimitError` unless the prompt is non-empty and every id is in ``[0, vocab_size)``."""
    if len(prompt_ids) == 0:
        raise LimitError("prompt", "Invalid 'prompt': the prompt is empty (0 tokens).")
    for t in prompt_ids:
        if not _is_int(t) or not 0 <= t < vocab_size:
            raise LimitError("prompt", f"Invalid 'prompt': token ids must be integers in "
                             f"[0, {vocab_size}) (the model's vocabulary), got {t!r}.")  # fmt: skip


def check_context(prompt_tokens: int, max_tokens: int, max_context: int) -> None:
    """`LimitError` unless the prompt and ``max_tokens`` fit the context."""
    if prompt_tokens >= max_context:
        raise LimitError("prompt", f"This model's maximum context length is {max_context} "
                         f"tokens. However, you requested {prompt_tokens} tokens in the prompt, "
                         "leaving none to generate. Please reduce the length of the prompt.",
                         code="context_length_exceeded")  # fmt: skip
    if prompt_tokens + max_tokens > max_context:
        raise LimitError("max_tokens", f"This model's maximum context length is {max_context} "
                         f"tokens. However, you requested {prompt_tokens + max_tokens} tokens "
                         f"({prompt_tokens} in the prompt, {max_tokens} for the completion). "
                         "Please reduce the length of the prompt or the completion (ask for at "
                         f"most {max_context - prompt_tokens} tokens).",
                         code="context_length_exceeded")  # fmt: skip


def check_request(prompt_ids: Sequence[int], params, *, vocab_size: int,
                  max_context: int) -> None:  # fmt: skip
    """Everything one engine request must satisfy: the prompt, its fields, the context."""
    check_prompt(prompt_ids, vocab_size)
    check_context(len(prompt_ids), 1, max_context)  # a prompt too long, whatever max_tokens
    check_sampling(params, vocab_size)
    check_context(len(prompt_ids), params.max_tokens, max_context)
