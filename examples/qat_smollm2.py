"""Quantization-aware training of SmolLM2-135M at W4 on pydoc-calib, then perplexity on pydoc-eval.

    python examples/qat_smollm2.py [--config configs/examples/qat_smollm2.yaml]
                                   [--steps N] [--recipe R] [--out results.json] [--tiny]

The float model is the teacher (KL on logits); the student is the same model with every
weight the recipe quantizes fake-quantized (`jquant.qat.fake_quantize`), its weights and
learned scales trained together by one optax optimizer with two learning rates. After
training, `jquant.qat.convert` packs the weights into QArrays, and perplexity is measured
on that packed model, which is what would be served. `--tiny` runs a random 2-layer Llama
over bytes in seconds (the smoke test).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

import jquant
from jquant import models, qat

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE.parent / "configs" / "examples" / "qat_smollm2.yaml"
SETTINGS = ("mode", "model", "recipe", "steps", "batch", "seq_len", "lr", "scale_lr", "warmup",
            "train_weights", "learn_scales", "distill", "temperature", "eval_tokens",
            "eval_seq_len", "log_every", "seed", "lora_rank", "lora_alpha", "lora_targets",
            "lora_lr")  # fmt: skip
MODES = ("qat", "qlora")


def load_settings(path, overrides: dict) -> dict:
    """The YAML settings with command-line overrides; unknown keys are an error."""
    settings = yaml.safe_load(pathlib.Path(path).read_text())
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {unknown}; known: {list(SETTINGS)}")
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if settings["mode"] not in MODES:
        raise ValueError(f"mode={settings['mode']!r} is not one of {MODES}")
    return settings


def tiny():
    """A 2-layer random Llama over bytes and its tokenizer (smoke tests)."""
    sys.path.insert(0, str(HERE))
    from smollm2_ptq import tiny_model

    return tiny_model()


def make_step(model, recipe, tx, *, train_weights: bool, distill: bool, temperature: float):
    """The jitted step ``(params, state, opt_state, teacher, tokens) -> (..., loss)``; the
    teacher (the float params) is an argument, never a constant baked into the program."""

    def loss_fn(params, state, teacher, tokens):
        logits, _ = models.forward(model, qat.fake_quantize(params, recipe, state), tokens)
        if not distill:
            return qat.next_token_loss(logits, tokens)
        target, _ = models.forward(model, teacher, tokens)
        return qat.kl_divergence(logits, target, temperature=temperature)

    @jax.jit
    def step(params, state, opt_state, teacher, tokens):
        args = (params, state, teacher, tokens)
        if train_weights:
            loss, grads = jax.value_and_grad(loss_fn, argnums=(0, 1))(*args)
        else:  # frozen weights: no gradient is even computed for them
            loss, gs = jax.value_and_grad(loss_fn, argnums=1)(*args)
            grads = (jax.tree.map(jnp.zeros_like, params), gs)
        updates, opt_state = tx.update(grads, opt_state, (params, state))
        params, state = optax.apply_updates((params, state), updates)
        return params, state, opt_state, loss

    return step


def schedule(lr: float, steps: int, warmup: int):
    """Linear warm-up then cosine decay to 10%."""
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(steps, warmup + 1),
                                              end_value=lr * 0.1)  # fmt: skip


def train(model, params, windows, recipe, s: dict, *, log=print):
    """Runs QAT; returns ``(params, state, curve)`` with the loss every step."""
    state = qat.init(params, recipe) if s["learn_scales"] else {}
    weights_tx = optax.adamw(schedule(s["lr"], s["steps"], s["warmup"]), weight_decay=0.0)
    tx = qat.optimizer(weights_tx if s["train_weights"] else optax.set_to_zero(),
                       scales=optax.adam(schedule(s["scale_lr"], s["steps"], s["warmup"])))
    step = make_step(model, recipe, tx, train_weights=s["train_weights"],
                     distill=s["distill"], temperature=s["temperature"])  # fmt: skip
    teacher = params
    params = jax.tree.map(lambda x: x, teacher)  # the student starts as a copy
    opt_state = tx.init((params, state))
    rng = np.random.default_rng(s["seed"])
    curve, t0 = [], time.perf_counter()
    for i in range(s["steps"]):
        batch = windows[rng.choice(len(windows), s["batch"], replace=False)]
        params, state, opt_state, loss = step(params, state, opt_state, teacher,
                                              jnp.asarray(batch))
        curve.append(qat.check_loss(loss, step=i))
        if i % s["log_every"] == 0 or i == s["steps"] - 1:
            log(f"step {i:4d}  loss {curve[-1]:.4f}  {time.perf_counter() - t0:7.1f} s")
    del teacher
    return params, state, curve


def train_qlora(model, params, windows, recipe, s: dict, *, log=print):
    """QLoRA: adapters on the frozen quantized base, distilled from the float model (or
    next-token loss); returns ``(base, adapters, curve)``."""
    base = jquant.quantize(params, recipe)
    adapters = qat.lora.init(base, s["lora_targets"], rank=s["lora_rank"],
                             key=jax.random.key(s["seed"]))  # fmt: skip
    tx = optax.adam(schedule(s["lora_lr"], s["steps"], s["warmup"]))
    alpha = s["lora_alpha"]

    def loss_fn(ad, base, teacher, tokens):
        logits, _ = models.forward(model, qat.lora.apply(base, ad, alpha=alpha), tokens)
        if not s["distill"]:
            return qat.next_token_loss(logits, tokens)
        target, _ = models.forward(model, teacher, tokens)
        return qat.kl_divergence(logits, target, temperature=s["temperature"])

    @jax.jit
    def step(ad, opt_state, base, teacher, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(ad, base, teacher, tokens)
        updates, opt_state = tx.update(grads, opt_state, ad)
        return optax.apply_updates(ad, updates), opt_state, loss

    opt_state = tx.init(adapters)
    rng = np.random.default_rng(s["seed"])
    curve, t0 = [], time.perf_counter()
    for i in range(s["steps"]):
        batch = windows[rng.choice(len(windows), s["batch"], replace=False)]
        adapters, opt_state, loss = step(adapters, opt_state, base, params, jnp.asarray(batch))
        curve.append(qat.check_loss(loss, step=i))
        if i % s["log_every"] == 0 or i == s["steps"] - 1:
            log(f"step {i:4d}  loss {curve[-1]:.4f}  {time.perf_counter() - t0:7.1f} s")
    return base, adapters, curve


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="settings YAML")
    for key in ("mode", "recipe", "model"):
        p.add_argument(f"--{key}")
    for key in ("steps", "batch", "seq_len", "eval_tokens", "seed"):
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, type=int)
    for key in ("lr", "scale_lr"):
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, type=float)
    for key in ("train_weights", "learn_scales", "distill"):
        p.add_argument(f"--{key.replace('_', '-')}", dest=key,
                       action=argparse.BooleanOptionalAction, default=None)  # fmt: skip
    p.add_argument("--out", help="write the numbers and the curve to this JSON file")
    p.add_argument("--tiny", action="store_true", help="random tiny Llama over bytes")
    args = p.parse_args(argv)
    s = load_settings(args.config, {k: getattr(args, k, None) for k in SETTINGS})
    if args.tiny:
        model, params, tokenizer = tiny()
        s.update(steps=min(s["steps"], 4), batch=2, seq_len=64, eval_tokens=512,
                 eval_seq_len=128, log_every=1, warmup=1)  # fmt: skip
    else:
        model, params, tokenizer = models.load(s["model"])
    recipe = jquant.Recipe.load(s["recipe"])
    ids = tokenizer.encode(jquant.eval.load_corpus("pydoc-calib"), add_special_tokens=False)
    windows = jquant.calib.data.windows(ids, len(ids) // s["seq_len"], s["seq_len"])
    eval_text = jquant.eval.load_corpus("pydoc-eval")
    if args.tiny:
        eval_text = eval_text[: s["eval_tokens"]]

    def ppl(p):
        return jquant.eval.perplexity(model, p, eval_text, tokenizer=tokenizer,
                                      seq_len=s["eval_seq_len"], max_tokens=s["eval_tokens"],
                                      progress=False).perplexity  # fmt: skip

    out = {"settings": s, "tokens_per_step": s["batch"] * s["seq_len"]}
    out["float"] = ppl(params)
    out["rtn"] = ppl(jquant.quantize(params, recipe))
    print(f"pydoc-eval perplexity: float {out['float']:.3f}, RTN {recipe.name} {out['rtn']:.3f}")
    t0 = time.perf_counter()
    if s["mode"] == "qlora":
        base, adapters, curve = train_qlora(model, params, windows, recipe, s)
        out["train_seconds"] = time.perf_counter() - t0
        qparams = qat.lora.apply(base, adapters, alpha=s["lora_alpha"])  # served as it is
        out["trainable"] = qat.lora.num_trainable(adapters)
        out["memory"] = qat.lora.memory(base, adapters)
        print(f"QLoRA: {out['trainable']:,} trainable parameters; bytes {out['memory']}")
    else:
        trained, state, curve = train(model, params, windows, recipe, s)
        out["train_seconds"] = time.perf_counter() - t0
        qparams = qat.convert(trained, state, recipe)
        # The packed model computes what was trained: logits against the fake-quant forward.
        probe = jnp.asarray(windows[:1, : min(128, s["seq_len"])])
        fake_logits, _ = models.forward(model, qat.fake_quantize(trained, recipe, state), probe)
        packed_logits, _ = models.forward(model, qparams, probe)
        out["convert_max_logit_diff"] = float(jnp.max(jnp.abs(fake_logits - packed_logits)))
    out["qat"] = ppl(qparams)
    out["curve"] = curve
    rise, kept = out["rtn"] - out["float"], out["qat"] - out["float"]
    out["recovered"] = 1.0 - kept / rise if rise > 0 else math.nan
    print(f"{s['mode']} {recipe.name}: perplexity {out['qat']:.3f} "
          f"({100 * kept / out['float']:+.1f}% vs float; RTN {100 * rise / out['float']:+.1f}%): "
          f"{100 * out['recovered']:.0f}% of RTN's loss recovered in {s['steps']} steps x "
          f"{out['tokens_per_step']} tokens, {out['train_seconds'] / 60:.1f} min")
    if "convert_max_logit_diff" in out:
        print(f"packed vs fake-quant logits differ by {out['convert_max_logit_diff']:.2e} at most")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
