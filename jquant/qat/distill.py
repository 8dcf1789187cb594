"""Distillation from the float model: the loss that makes QAT of a small model converge fast."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def kl_divergence(student_logits, teacher_logits, *, temperature: float = 1.0, mask=None):
    """Mean over tokens of ``KL(teacher || student)`` on softmax(logits / temperature),
    times ``temperature**2`` (Hinton et al.), in float32.

    The teacher is held constant (``stop_gradient``). ``mask`` (broadcastable to the
    logits without their last axis) weights tokens; 0 drops one.

    >>> x = jnp.array([[0.0, 1.0, 2.0]])
    >>> float(kl_divergence(x, x))
    0.0
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"kl_divergence: student logits {tuple(student_logits.shape)} and "
                         f"teacher logits {tuple(teacher_logits.shape)} differ in shape")
    t = jnp.float32(temperature)
    teacher = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / t
    log_p = jax.nn.log_softmax(teacher, axis=-1)
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    per_token = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1) * t * t
    if mask is None:
        return jnp.mean(per_token)
    mask = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), per_token.shape)
    return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def check_loss(loss, *, step: int | None = None, what: str = "loss") -> float:
    """``float(loss)``, or a ValueError when it is NaN or infinite.

    Host-side: call it where the training loop reads the loss back anyway (to log or record
    it), never inside a jitted function, so it adds no device sync of its own.

    >>> check_loss(jnp.float32(0.5))
    0.5
    """
    value = float(loss)
    if not math.isfinite(value):
        where = "" if step is None else f" at step {step}"
        raise ValueError(
            f"{what} is {value}{where}: training diverged or the model produced non-finite "
            "logits; lower the learning rate, check the scales (jquant.qat.nonpositive_scales) "
            "and the checkpoint"
        )
    return value


def next_token_loss(logits, tokens, mask=None):
    """Mean cross-entropy of ``logits[:, :-1]`` predicting ``tokens[:, 1:]`` (float32).

    >>> float(next_token_loss(jnp.zeros((1, 3, 4)), jnp.array([[0, 1, 2]])))  # log(4)
    1.3862943649291992
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    if mask is None:
        return jnp.mean(nll)
    m = jnp.asarray(mask[:, 1:], jnp.float32)
    return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)
