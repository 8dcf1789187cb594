"""The one definition of the weight wrappers' shared part (`Tap`, `ActQuantized`, `LoRAWeight`).

Each is a frozen dataclass standing where a weight array was: a pytree whose array fields
are its leaves and whose ``static`` fields (``dataclasses.field(metadata=dict(static=True))``)
are metadata, with the ``shape`` / ``ndim`` / ``dtype`` of the array it wraps so shape
checks (the interceptors', Flax's) see the logical weight.
"""

from __future__ import annotations

import dataclasses

import jax


def weight_wrapper(inner: str, *, misuse: str | None = None):
    """Class decorator: a frozen dataclass, registered as a pytree, with ``shape`` (a
    tuple), ``ndim`` and ``dtype`` of its field ``inner``; with ``misuse``, turning it into
    an array (``jnp.asarray``) raises ``TypeError(misuse)``.

    >>> import jax.numpy as jnp
    >>> @weight_wrapper("w")
    ... class Box:
    ...     w: jax.Array
    ...     tag: str = dataclasses.field(metadata=dict(static=True), default="")
    >>> b = Box(jnp.ones((2, 3)), "t")
    >>> b.shape, b.ndim, jax.tree.leaves(b)[0].shape
    ((2, 3), 2, (2, 3))
    """

    def wrap(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
        cls.shape = property(lambda self: tuple(getattr(self, inner).shape),
                             doc=f"The shape of ``{inner}``.")  # fmt: skip
        cls.ndim = property(lambda self: len(getattr(self, inner).shape),
                            doc=f"The rank of ``{inner}``.")  # fmt: skip
        cls.dtype = property(lambda self: getattr(self, inner).dtype,
                             doc=f"The dtype of ``{inner}``.")  # fmt: skip
        if misuse is not None:

            def __jax_array__(self):
                raise TypeError(misuse)

            cls.__jax_array__ = __jax_array__
        jax.tree_util.register_dataclass(cls)  # data / meta fields from the static metadata
        return cls

    return wrap
