"""Test-wide settings and fixtures.

Strict dtype promotion, so silent upcasts fail loudly; the real embedded model; and tiny
synthetic model files (GGUF with a byte-level BPE tokenizer) that any test can write.
"""

from __future__ import annotations

import gc
import hashlib
import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest

from jquant import io as jio
from jquant.io._gguf_tokenizer import _bytes_to_unicode
from jquant.io.registry import cache_dir

jax.config.update("jax_numpy_dtype_promotion", "strict")

# The `reference` extra (torch, sentencepiece, llama-cpp-python) is optional: tests that
# compare against transformers' torch models, the original SentencePiece or llama.cpp
# importorskip it. CI installs it and
# sets JQUANT_REQUIRE_REFERENCE=1, so there a missing or broken one fails the run instead of
# silently skipping those tests.
REFERENCE_MODULES = ("torch", "sentencepiece", "google.protobuf", "llama_cpp", "compressed_tensors")


def pytest_configure(config):
    if os.environ.get("JQUANT_REQUIRE_REFERENCE") != "1":
        return
    for name in REFERENCE_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise pytest.UsageError(
                f"JQUANT_REQUIRE_REFERENCE=1 but {name!r} cannot be imported ({e}); install "
                "the reference extra: pip install -e '.[test,reference]'"
            ) from e


# Shapes of the tiny synthetic model: 2 layers, 4 query heads and 2 kv heads of size 16.
TINY = dict(hidden=64, ffn=96, layers=2, heads=4, kv_heads=2, head_dim=16)
# Merges of the tiny byte-level vocabulary, in priority order.
TINY_MERGES = ["h e", "l l", "he ll", "Ġ w", "o r", "Ġw or"]
TINY_CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# Every program XLA:CPU compiles keeps its machine code in memory maps of its own (about 140
# for a small transformer) until JAX's caches let it go. One xdist worker held 14,500 maps
# after 450 of its tests, on the way to Linux's default limit of 65,530 past which mmap fails;
# in CI a worker died while compiling at 85% of the suite. Past MAX_MAPS the caches are
# cleared (programs still referenced by a fixture stay alive; the rest recompile on demand).
MAX_MAPS = 20_000


def _memory_maps() -> int:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return 0


@pytest.fixture(autouse=True)
def _bounded_compiled_code():
    yield
    if _memory_maps() > MAX_MAPS:
        jax.clear_caches()
        gc.collect()


@pytest.fixture(scope="session")
def smollm_path():
    """The embedded SmolLM2-135M-Instruct GGUF (downloaded into the cache on first use)."""
    return jio.model_path("smollm2-135m")


@pytest.fixture(scope="session")
def smollm(smollm_path):
    """The embedded model as a Checkpoint, loaded once per session."""
    return jio.load_gguf(smollm_path)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`, written independently here."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def tiny_vocab() -> list[str]:
    """Control tokens, the 256 byte-level characters, then one token per merge."""
    merged = ["".join(m.split(" ")) for m in TINY_MERGES]
    return TINY_CONTROL + sorted(_bytes_to_unicode().values()) + merged


def tiny_hf_tensors(
    *, arch: str = "llama", tied: bool = True, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random float32 tensors in HF layout for the tiny config."""
    config = tiny_config(arch=arch, tied=tied)
    rng = np.random.default_rng(seed)
    return {
        name: rng.standard_normal(shape).astype(np.float32)
        for name, shape in jio.expected_shapes(config).items()
    }


#: GGUF architectures the tiny writer knows, and the model_type each loads as.
TINY_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
              "gemma2": "gemma2", "gemma3": "gemma3_text"}  # fmt: skip
TINY_WINDOW = 8  # the sliding window of the tiny Gemma models


def tiny_config(*, arch: str = "llama", tied: bool = True) -> dict:
    """The Checkpoint.config a tiny GGUF of GGUF architecture ``arch`` loads with."""
    t = TINY
    gemma = arch.startswith("gemma")
    windowed = arch in ("gemma2", "gemma3")
    return {
        "model_type": TINY_ARCHS.get(arch, arch),
        "vocab_size": len(tiny_vocab()),
        "hidden_size": t["hidden"],
        "intermediate_size": t["ffn"],
        "num_hidden_layers": t["layers"],
        "num_attention_heads": t["heads"],
        "num_key_value_heads": t["kv_heads"],
        "head_dim": t["head_dim"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "max_position_embeddings": 256,
        "tie_word_embeddings": tied,
        "attention_bias": arch == "qwen2",
        "sliding_window": TINY_WINDOW if windowed else None,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "gelu_pytorch_tanh" if gemma else "silu",
        "query_pre_attn_scalar": t["head_dim"] if windowed else None,
        "attn_logit_softcapping": 50.0 if arch == "gemma2" else None,
        "final_logit_softcapping": 30.0 if arch == "gemma2" else None,
        # llama.cpp's patterns: gemma2 alternates, gemma3 has five sliding layers per global.
        "layer_types": (["sliding_attention", "full_attention"] if arch == "gemma2"
                        else ["sliding_attention"] * 2 if arch == "gemma3" else None),
        "rope_local_base_freq": 10000.0 if arch == "gemma3" else None,
    }


_TO_GGUF = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}
# Gemma 2/3 (llama.cpp's gemma2/gemma3 tensor names): the MLP's input norm is ffn_norm.
_TO_GGUF_SANDWICH = {
    **_TO_GGUF,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def gguf_name(hf: str, arch: str = "llama") -> str:
    """The llama.cpp name of an HF tensor name (the test's own, independent mapping)."""
    names = _TO_GGUF_SANDWICH if arch in ("gemma2", "gemma3") else _TO_GGUF
    stem, kind = hf.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, block, rest = stem.split(".", 3)
        return f"blk.{block}.{names[rest]}.{kind}"
    return f"{names[stem]}.{kind}"


def write_tiny_gguf(
    path,
    tensors: dict[str, np.ndarray],
    *,
    arch: str = "llama",
    quantize: dict[str, gguf.GGMLQuantizationType] | None = None,
    skip: tuple[str, ...] = (),
    ffn: int | None = None,
    add_bos: bool = False,
    template: str | None = TINY_TEMPLATE,
    extra: dict | None = None,
):
    """Write HF-layout `tensors` as a llama.cpp-style GGUF (names, Q/K permutation, quants).

    Args:
      quantize: `{hf_name: quant type}` for tensors to store quantized; others are F32.
      skip: HF names to leave out (to make a file with a missing tensor).
      ffn: feed_forward_length to write (to make a config that disagrees with the tensors).
      extra: more `{key: float}` metadata, written as float32 under the architecture prefix.

    Gemma files get what llama.cpp's converter writes: norms stored as ``1 + w``, the
    sliding window, gemma2's soft-caps, and head_dim as key_length.
    """
    t = TINY
    w = gguf.GGUFWriter(str(path), arch=arch)
    if arch.startswith("gemma"):
        w.add_key_length(t["head_dim"])
        w.add_value_length(t["head_dim"])
    if arch in ("gemma2", "gemma3"):
        w.add_sliding_window(TINY_WINDOW)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(50.0)
        w.add_final_logit_softcapping(30.0)
    w.add_block_count(t["layers"])
    w.add_context_length(256)
    w.add_embedding_length(t["hidden"])
    w.add_feed_forward_length(ffn or t["ffn"])
    w.add_head_count(t["heads"])
    w.add_head_count_kv(t["kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(t["head_dim"])
    for key, value in (extra or {}).items():
        w.add_float32(f"{arch}.{key}", value)
    vocab = tiny_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(vocab)
    w.add_token_types([3 if v in TINY_CONTROL else 1 for v in vocab])
    w.add_token_merges(TINY_MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(add_bos)
    if template:
        w.add_chat_template(template)
    quantize = quantize or {}
    for name, value in tensors.items():
        if name in skip:
            continue
        permuted = arch in ("llama", "mistral")  # llama.cpp permutes their Q/K rows
        if permuted and ".q_proj." in name:
            value = llama_cpp_permute(value, t["heads"])
        elif permuted and ".k_proj." in name:
            value = llama_cpp_permute(value, t["kv_heads"])
        elif arch.startswith("gemma") and name.endswith("norm.weight"):
            value = value + np.float32(1.0)
        if name in quantize:
            qtype = quantize[name]
            # uint8 block data: the writer derives the element shape from the byte shape.
            w.add_tensor(gguf_name(name, arch), gguf.quants.quantize(value, qtype),
                         raw_dtype=qtype)  # fmt: skip
        else:
            w.add_tensor(gguf_name(name, arch), value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path):
    """A tiny untied llama GGUF (F32) and the HF-layout tensors it was written from."""
    tensors = tiny_hf_tensors(tied=False)
    return write_tiny_gguf(tmp_path / "tiny.gguf", tensors), tensors


@pytest.fixture(scope="session")
def tiny():
    """The helpers above, for tests (a test directory without __init__.py cannot import them)."""
    return types.SimpleNamespace(
        shape=TINY,
        merges=TINY_MERGES,
        control=TINY_CONTROL,
        template=TINY_TEMPLATE,
        vocab=tiny_vocab,
        config=tiny_config,
        tensors=tiny_hf_tensors,
        permute=llama_cpp_permute,
        write_gguf=write_tiny_gguf,
    )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tiny):
    """Path of a tiny tied llama GGUF (what the CLI tests load)."""
    path = tmp_path_factory.mktemp("model") / "tiny.gguf"
    tiny.write_gguf(path, tiny.tensors(tied=True))
    return str(path)


@pytest.fixture
def eight_cpu_devices():
    """Environment of a subprocess that sees 8 CPU devices. XLA:CPU aborts a collective whose
    8 device threads do not all arrive within 40 s, which a loaded 2-core machine can exceed
    (seen in CI): the limits are raised so that only a real hang fails, by the test's own
    subprocess timeout."""
    flags = ("--xla_force_host_platform_device_count=8 "
             "--xla_cpu_collective_call_terminate_timeout_seconds=900 "
             "--xla_cpu_collective_timeout_seconds=900")  # fmt: skip
    return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")


# llama.cpp's vocabulary-only GGUF files of real models, with its test texts and ids, as the
# llama-cpp-python 0.3.36 source distribution ships them.
LLAMA_CPP_SDIST = "llama_cpp_python-0.3.36.tar.gz"
LLAMA_CPP_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMA_CPP_MODELS = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/"
LLAMA_CPP_VOCABS = ("llama-spm", "phi-3", "llama-bpe", "qwen2", "gpt-2")
VOCAB_SEPARATOR = "\n__ggml_vocab_test__\n"


@pytest.fixture(scope="session")
def vocab_dir():
    """llama.cpp's vocabulary files `ggml-vocab-{name}.gguf` (+ `.inp` texts, `.out` ids) of
    `LLAMA_CPP_VOCABS`, extracted once into the jquant cache (a pinned PyPI download; its
    sha256 is checked)."""
    target = cache_dir() / "llama-cpp-vocab-0.3.36"
    names = [f"ggml-vocab-{v}.gguf{ext}" for v in LLAMA_CPP_VOCABS for ext in ("", ".inp", ".out")]
    if all((target / n).is_file() for n in names):
        return target
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target, prefix=".fetch-") as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
             ":all:", "--dest", tmp, "llama-cpp-python==0.3.36"],
            check=True,
        )  # fmt: skip
        sdist = Path(tmp) / LLAMA_CPP_SDIST
        assert hashlib.sha256(sdist.read_bytes()).hexdigest() == LLAMA_CPP_SHA256
        with tarfile.open(sdist) as tar:
            for n in names:
                data = tar.extractfile(LLAMA_CPP_MODELS + n).read()
                part = target / f".{n}.part"
                part.write_bytes(data)
                part.rename(target / n)
    return target


@pytest.fixture(scope="session")
def vocab_cases(vocab_dir):
    """``vocab_cases(name)``: llama.cpp's ``[(text, ids)]`` for vocabulary ``name`` (its
    test-tokenizer-0 output, no special tokens added)."""

    def cases(name: str) -> list[tuple[str, list[int]]]:
        texts = (vocab_dir / f"ggml-vocab-{name}.gguf.inp").read_text("utf-8")
        texts = texts.split(VOCAB_SEPARATOR)
        assert texts[-1] == ""  # every text ends with the separator
        lines = (vocab_dir / f"ggml-vocab-{name}.gguf.out").read_text("utf-8").split("\n")
        assert lines[-1] == ""
        texts, lines = texts[:-1], lines[:-1]
        assert len(texts) == len(lines) > 30
        return [(t, [int(i) for i in line.split()]) for t, line in zip(texts, lines)]

    return cases
