"""What every export to a Hugging Face directory shares: the config.json, the tokenizer files
jquant's HF reader takes back, and writing the directory whole or not at all."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._packed_writer import _commit, _fsync_dir, check_output_directory

#: ``architectures`` of the config.json written for each jquant model type.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                 "gemma3_text": "Gemma3ForCausalLM"}  # fmt: skip


def config_json(config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A `Checkpoint.config` as an HF config.json (unset keys left out), with ``extra``."""
    raw = {k: v for k, v in config.items() if v is not None}
    raw["architectures"] = [ARCHITECTURES[config["model_type"]]]
    raw.update(extra)
    return raw


def write_tokenizer(directory: Path, tokenizer) -> None:
    """tokenizer.json, tokenizer_config.json (the special tokens, ``add_bos_token``) and
    chat_template.jinja: what `jquant.io.tokenizer.tokenizer_from_hf_dir` reads back."""
    tokenizer.backend.save(str(directory / "tokenizer.json"))
    tok_config: dict[str, Any] = {"add_bos_token": tokenizer.add_bos_token}
    for key in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{key}_token_id")
        if token_id is not None:
            tok_config[f"{key}_token"] = tokenizer.backend.id_to_token(token_id)
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    if tokenizer.chat_template is not None:
        (directory / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")


def refuse_rotated(config: dict[str, Any], writer: str) -> None:
    """ValueError naming ``writer`` when ``config`` is a rotated model's (`jquant.rotate`):
    its online Hadamard transforms are jquant's, not part of the format written."""
    from jquant.arch import ROTATION_KEY

    if config.get(ROTATION_KEY) is not None:
        raise ValueError(
            f"{writer}: the model is rotated ({ROTATION_KEY}: {config[ROTATION_KEY]}); its "
            "forward runs online Hadamard transforms the format cannot express. Export a "
            "model quantized without a recipe rotation"
        )


def model_params(params, config: dict[str, Any], writer: str):
    """``({jquant path: value}, {jquant path: shape})`` of a parameter tree and the shapes
    ``config`` implies; ValueError naming ``writer`` when their paths differ or the model
    is rotated (`refuse_rotated`)."""
    from jquant.arch import LlamaConfig, param_shapes
    from jquant.tree import leaves

    refuse_rotated(config, writer)

    flat = dict(leaves(params))
    shapes = param_shapes(LlamaConfig.from_hf(config))
    if set(flat) != set(shapes):
        missing, extra = sorted(set(shapes) - set(flat)), sorted(set(flat) - set(shapes))
        raise ValueError(f"{writer}: params do not match the config: missing {missing[:3]}, "
                         f"not in the model {extra[:3]}")  # fmt: skip
    return flat, shapes


def refusal(target: str, problems: list[tuple[str, str]]) -> ValueError:
    """One error for what ``target`` cannot hold: each ``(tensor, reason)`` reason once, with
    how many tensors it concerns and the first three (a model's 200 kernels share a few
    reasons)."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in problems:
        by_reason.setdefault(reason, []).append(name)
    parts = [f"{reason}: {', '.join(names[:3])}"
             + (f" and {len(names) - 3} more" if len(names) > 3 else "")
             for reason, names in by_reason.items()]  # fmt: skip
    return ValueError(f"{target} cannot hold {len(problems)} tensor(s): " + "; ".join(parts))


@contextlib.contextmanager
def staged(directory, *, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling of ``directory`` to write into, renamed into place when the block
    ends without an error and removed when it raises: an interrupted export leaves nothing
    that loads. ``directory`` must not exist or be empty unless ``overwrite``."""
    target = check_output_directory(directory, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        _fsync_dir(tmp)
        _commit(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
