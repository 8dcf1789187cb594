"""Perplexity, defined once for the whole project.

Tokenize the text as it is (no special tokens), cut non-overlapping windows of ``seq_len``
tokens (the incomplete tail is dropped), and average the negative log-likelihood of tokens
``1..seq_len-1`` of every window given the tokens before it in that window; perplexity is
``exp`` of that mean. BOS is added exactly when the model's tokenizer configuration says so
(``add_bos_token``; SmolLM2's adds none, Gemma's does): then every window is ``[BOS]`` and
the next ``seq_len - 1`` text tokens, all of which are scored, each with BOS at the start of
its context. Either way a window scores ``seq_len - 1`` tokens. Every window starts from an
empty context, so windows are independent and batch freely. Reference: Hugging Face
transformers, float32, SmolLM2-135M-Instruct on `pydoc-eval`, first 16,384 tokens,
``seq_len`` 512 (32 windows): 13.413.

A jquant `Llama` runs stage by stage (`jquant.models.blocks`): the embedding, one program
per decoder layer, and one program for the final norm, the head and the NLL, so the
``(B, S, V)`` logits never leave the program that reduces them. Decoder layers of one
structure share a compilation, so a model compiles in about the time of one layer, and a
second recipe with the same layer formats (or the same recipe on another model of the same
shapes) compiles nothing new. Any other model runs as one whole-model program.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jquant.io.tokenizer import leading_bos
from jquant.models import blocks
from jquant.models.llama import Llama, graphdef_of


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """Attributes:
    perplexity: ``exp(nll)``.
    nll: mean negative log-likelihood per scored token, in nats.
    tokens: tokens scored (``windows * (seq_len - 1)``).
    windows: windows evaluated.
    seq_len: tokens per window (a leading BOS included).
    bos_token_id: the BOS id that starts every window, or None (no BOS added).
    """

    perplexity: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    bos_token_id: int | None = None

    def __post_init__(self):
        # Every path that builds a result (`perplexity`, the serving runner's
        # `cache_perplexity`) gets this check: a NaN is an error, not a number to report.
        if not math.isfinite(self.nll):
            raise ValueError(
                f"perplexity is {self.perplexity}: the mean negative log-likelihood over "
                f"{self.tokens} tokens is {self.nll}, so the model produced non-finite logits; "
                "check the checkpoint (a damaged or wrongly converted one) and its config"
            )
        if not math.isfinite(self.perplexity):
            raise ValueError(
                f"perplexity is {self.perplexity}: the mean negative log-likelihood is "
                f"{self.nll} nats per token, too large to exponentiate; the model predicts "
                "garbage, check the checkpoint and its config"
            )


def _exp(nll: float) -> float:
    """``exp(nll)``, inf (for `PerplexityResult` to refuse) where it overflows."""
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf


def cut_windows(
    ids: Sequence[int], seq_len: int, max_tokens: int | None = None, *,
    bos_token_id: int | None = None,
) -> np.ndarray:  # fmt: skip
    """Non-overlapping windows ``(n, seq_len)`` int32 of the first ``max_tokens`` ids; with
    ``bos_token_id``, each is that BOS and the next ``seq_len - 1`` ids.

    >>> cut_windows(range(10), 3).tolist()
    [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    >>> cut_windows(range(10), 3, max_tokens=7).tolist()
    [[0, 1, 2], [3, 4, 5]]
    >>> cut_windows(range(7), 3, bos_token_id=99).tolist()
    [[99, 0, 1], [99, 2, 3], [99, 4, 5]]

    Raises:
      ValueError: ``seq_len < 2``, or fewer ids to use than one window takes.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2 (a window scores seq_len - 1 tokens)")
    ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, np.int32)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    body = seq_len if bos_token_id is None else seq_len - 1  # text tokens per window
    n = len(ids) // body
    if n == 0:
        bos = "" if bos_token_id is None else f" (BOS + {body} text tokens)"
        raise ValueError(
            f"{len(ids)} tokens make no window of seq_len={seq_len}{bos}; use more text or a "
            "shorter seq_len"
        )
    windows = ids[: n * body].reshape(n, body)
    if bos_token_id is None:
        return windows
    return np.concatenate([np.full((n, 1), bos_token_id, np.int32), windows], axis=1)


def _summed_nll(logits, windows):
    """Summed NLL (float32) of tokens 1.. of each window ``(B, S)`` → ``(B,)``."""
    logits = logits[:, :-1].astype(jnp.float32)
    picked = jnp.take_along_axis(logits, windows[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(jax.nn.logsumexp(logits, axis=-1) - picked, axis=-1)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _window_nll(graphdef, params, windows):
    """The whole model and the NLL as one program (models `blocks` does not know)."""
    logits, _ = nnx.merge(graphdef, params)(windows)
    return _summed_nll(logits, windows)


@functools.partial(jax.jit, static_argnames=("norm_graphdef", "tied", "softcap"))
def _head_nll(norm_graphdef, norm_params, head_params, x, windows, *, tied, softcap):
    # blocks' head, inlined here so that its logits are reduced in this program.
    logits = blocks.apply_head(norm_graphdef, norm_params, head_params, x, tied=tied,
                               softcap=softcap)  # fmt: skip
    return _summed_nll(logits, windows)


def _nll_step(model, params: nnx.State):
    """``windows (B, S) → summed NLL (B,)`` for ``model`` with ``params``.

    Stage by stage for a jquant `Llama` (exactly, not a subclass, which may change
    ``__call__``); the whole-model program for anything else.
    """
    module = nnx.merge(model, params) if isinstance(model, nnx.GraphDef) else model
    if type(module) is not Llama:
        graphdef = graphdef_of(model)
        return lambda windows: _window_nll(graphdef, params, windows)
    layers = [(blocks.layer_graphdef(module, i), blocks.layer_params(params, i))
              for i in range(module.config.num_layers)]  # fmt: skip
    tied = module.config.tie_word_embeddings
    head_params = params["embed_tokens"] if tied else params["lm_head"]
    norm = nnx.graphdef(module.norm)

    def step(windows):
        x, ctx = blocks.embed(module, params, windows)
        for i, (graphdef, state) in enumerate(layers):  # dense and MoE layers differ
            x = blocks.run_layer(graphdef, state, x, ctx.at(module.config, i))
        return _head_nll(norm, params["norm"], head_params, x, windows, tied=tied,
                         softcap=module.config.final_logit_softcap)  # fmt: skip

    return step


def _on_every_process(y) -> np.ndarray:
    """A global array's values on the host of every process."""
    if y.is_fully_addressable:
        return np.asarray(y)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(y, tiled=True))


def perplexity(
    model,
    params: nnx.State,
    text: str | Sequence[int],
    *,
    tokenizer=None,
    seq_len: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
    bos_token_id: int | None = None,
    placement=None,
) -> PerplexityResult:
    """Perplexity of a model on a text (see the module docstring for the definition).

    Args:
      model: a `Llama` module or its GraphDef (run stage by stage), or another NNX module
        (or GraphDef) called as ``model(tokens) -> (logits, cache)`` (run as one program).
      params: its parameter State, float or quantized.
      text: the text, or its token ids already.
      tokenizer: encodes ``text`` (``encode(text, add_special_tokens=False)``), and says
        whether windows start with BOS (`jquant.io.leading_bos`: its ``add_bos_token``); not
        needed for ids.
      seq_len: tokens per window (a leading BOS included).
      max_tokens: use only the first ``max_tokens`` text tokens (None: all).
      batch_size: windows per model call; the last batch is padded to keep one compilation.
      progress: show a tqdm progress bar.
      bos_token_id: start every window with this BOS id (for ids, which carry no tokenizer;
        for a text, overrides the tokenizer's choice).
      placement: a `jquant.calib.activations.Placement` with a mesh to score the windows
        data-parallel over its devices and processes (every process passes the same text
        and gets the same result); ``params`` are replicated over it.

    Returns:
      A `PerplexityResult`.

    Raises:
      ValueError: the mean NLL is not finite (the model produced NaN or infinite logits) or
        too large for its ``exp`` to be a number.

    >>> perplexity(model, params, load_corpus("pydoc-eval"), tokenizer=tok,
    ...            max_tokens=16384)  # doctest: +SKIP
    PerplexityResult(perplexity=13.41..., nll=2.59..., tokens=16352, windows=32, seq_len=512,
                     bos_token_id=None)
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if placement is not None:
        params = placement.replicate(params)
    return score_windows(lambda rows: _nll_step(model, params), text, tokenizer=tokenizer,
                         seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size,
                         progress=progress, bos_token_id=bos_token_id,
                         placement=placement)  # fmt: skip


def score_windows(make_step, text, *, tokenizer=None, seq_len: int = 512,
                  max_tokens: int | None = None, batch_size: int = 4, progress: bool = True,
                  bos_token_id: int | None = None, placement=None) -> PerplexityResult:  # fmt: skip
    """Perplexity by the one definition, with the model call given: ``make_step(rows)``
    returns a function from ``windows (rows, seq_len)`` int32 to each window's summed NLL
    ``(rows,)``. `perplexity` runs the model stage by stage; `jquant.serve.cache_perplexity`
    runs the serving cache. The other arguments are `perplexity`'s.

    With a mesh ``placement``, each call's ``rows`` (``batch_size`` rounded up to a multiple
    of the devices) are split over the devices, every process giving its own devices' rows;
    the windows' NLLs are gathered to every process and summed on the host in window order,
    as without a mesh, so the result differs from one device's by float rounding inside the
    model at most."""
    if isinstance(text, str):
        if tokenizer is None:
            raise ValueError("perplexity of a str needs a tokenizer (or pass token ids)")
        if bos_token_id is None:
            bos_token_id = leading_bos(tokenizer)
        text = tokenizer.encode(text, add_special_tokens=False)
    windows = cut_windows(text, seq_len, max_tokens, bos_token_id=bos_token_id)
    n = len(windows)
    batch_size = max(1, min(batch_size, n))
    mesh = placement is not None and placement.mesh is not None
    if mesh:  # every device takes an equal share of each call's windows
        batch_size = -(-batch_size // placement.devices) * placement.devices
    padded = np.zeros((-(-n // batch_size) * batch_size, seq_len), np.int32)
    padded[:n] = windows
    step = make_step(batch_size)
    total = 0.0
    for start in tqdm(range(0, n, batch_size), desc="perplexity", unit="batch",
                      disable=not progress):  # fmt: skip
        rows = padded[start : start + batch_size]
        if mesh:
            share = batch_size // placement.processes
            mine = rows[placement.process * share : (placement.process + 1) * share]
            nll = _on_every_process(step(placement.batch(mine)))
        else:
            nll = step(jnp.asarray(rows))
        total += float(np.asarray(nll, np.float64)[: n - start].sum())
    scored = n * (seq_len - 1)
    mean = total / scored
    return PerplexityResult(perplexity=_exp(mean), nll=mean, tokens=scored, windows=n,
                            seq_len=seq_len, bos_token_id=bos_token_id)  # fmt: skip
