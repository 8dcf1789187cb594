"""Every command on the families beyond Llama: tiny Qwen3, Gemma 2 and Gemma 3 GGUFs.

The Gemma files' tokenizers add BOS, as Gemma's do. `eval` is checked against a perplexity
computed here in NumPy from `forward`'s logits of ``[BOS] + window`` (the whole-model
program, which tests/models/test_reference_families.py checks against transformers), so the
stage-by-stage perplexity path, its soft-capping and sliding masks are checked too; the other
commands must run and agree with the model's own numbers.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant.cli import main
from jquant.models import forward, load

ARCHS = ["qwen3", "gemma2", "gemma3"]
SEQ, MAX = 16, 64


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text(" ".join(f"hello world {i % 7}, or there" for i in range(60)))
    return str(path)


@pytest.fixture(scope="module", params=ARCHS)
def family(request, tmp_path_factory, tiny):
    arch = request.param
    path = tmp_path_factory.mktemp(arch) / f"{arch}.gguf"
    # Small weights: a random model with unit-variance weights saturates every soft-cap.
    tensors = {k: v * np.float32(0.2) for k, v in tiny.tensors(arch=arch).items()}
    tiny.write_gguf(path, tensors, arch=arch, add_bos=arch.startswith("gemma"))
    return arch, str(path)


def _numpy_perplexity(path, text):
    model, params, tok = load(path, dtype=jnp.float32)
    ids = tok.encode(text, add_special_tokens=False)
    bos = [tok.bos_token_id] if tok.add_bos_token else []
    step = SEQ - len(bos)  # text tokens per window
    total, count = 0.0, 0
    for start in range(0, MAX - len(bos) * (MAX // SEQ), step):
        window = bos + ids[start : start + step]
        if len(window) < SEQ:
            break
        logits, _ = forward(model, params, jnp.asarray([window], jnp.int32))
        logits = np.asarray(logits[0], np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                               keepdims=True)) - logits.max(-1, keepdims=True)  # fmt: skip
        total -= logp[np.arange(SEQ - 1), window[1:]].sum()
        count += SEQ - 1
    return float(np.exp(total / count)), count


def test_eval_matches_numpy_and_the_serving_cache(capsys, family, text_file):
    arch, path = family
    args = ["eval", path, "--text", text_file, "--seq-len", str(SEQ), "--max-tokens", str(MAX),
            "--json"]  # fmt: skip
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    want, count = _numpy_perplexity(path, open(text_file).read())
    assert out["tokens"] == count
    assert out["perplexity"] == pytest.approx(want, rel=1e-4)
    assert main([*args, "--kv-cache", "none"]) == 0  # the serving engine's path
    cached = json.loads(capsys.readouterr().out)
    assert cached["perplexity"] == pytest.approx(want, rel=1e-4)


def test_generate_is_greedy_argmax(capsys, family):
    arch, path = family
    assert main(["generate", path, "--prompt", "hello world", "--max-new-tokens", "4",
                 "--raw", "--json"]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    model, params, tok = load(path, dtype=jnp.float32)
    ids = tok.encode("hello world", add_special_tokens=False)
    ids = ([tok.bos_token_id] if tok.add_bos_token else []) + ids
    want = []
    for _ in range(len(out["tokens"])):  # whole-sequence recompute: no KV cache involved
        logits, _ = forward(model, params, jnp.asarray([ids + want], jnp.int32))
        want.append(int(np.argmax(np.asarray(logits[0, -1]))))
    assert out["tokens"] == want and len(want) >= 1


def test_inspect_compare_and_quantize(capsys, family, text_file, tmp_path, tiny):
    arch, path = family
    assert main(["inspect", path, "--json"]) == 0
    inspected = json.loads(capsys.readouterr().out)
    assert inspected["model_type"] == tiny.config(arch=arch)["model_type"]
    assert inspected["sliding_layers"] == {"qwen3": 0, "gemma2": 1, "gemma3": 2}[arch]
    _, params, _ = load(path, dtype=jnp.float32)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert inspected["weight_bytes"] == 4 * n
    assert main(["compare", path, "--recipes", "w8a16", "--text", text_file,
                 "--seq-len", str(SEQ), "--max-tokens", str(MAX), "--decode-tokens", "0",
                 "--json"]) == 0  # fmt: skip
    rows = json.loads(capsys.readouterr().out)
    assert [r["recipe"] for r in rows][:2] == ["float", "w8a16"]
    out = tmp_path / "q"
    # AWQ folds scales into the norms (Gemma's 1 + w, its pre-feed-forward norm), then GPTQ.
    assert main(["quantize", path, "--recipe", "w4a16-awq-gptq-uint4-g64", "--calib",
                 text_file, "--calib-samples", "4", "--calib-seq-len", str(SEQ),
                 "-o", str(out)]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["eval", str(out), "--text", text_file, "--seq-len", str(SEQ), "--max-tokens",
                 str(MAX), "--json"]) == 0  # fmt: skip
    q = json.loads(capsys.readouterr().out)
    assert np.isfinite(q["perplexity"]) and q["weight_bytes"] < inspected["weight_bytes"]
