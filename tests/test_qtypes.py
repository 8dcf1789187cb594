"""Formats: codebook facts and the per-value error bound ``half_step``."""

import numpy as np
import pytest

from jquant import qtypes

# QLoRA's NF4 levels as published (bitsandbytes), written out independently of the code.
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])  # fmt: skip


def test_nf4_codebook_is_qloras():
    np.testing.assert_array_equal(np.asarray(qtypes.get("nf4").codebook, np.float64), NF4)


def test_nf4_half_step_is_half_the_gap_of_its_own_interval():
    x = np.random.default_rng(0).uniform(-1.0, 1.0, 2000)
    i = np.clip(np.searchsorted(NF4, x, side="right") - 1, 0, len(NF4) - 2)
    expected = (NF4[i + 1] - NF4[i]) / 2
    np.testing.assert_allclose(qtypes.half_step("nf4", x), expected, rtol=1e-12)
    # Between 0 and the first positive level the bound is ~0.040, not the largest gap ~0.152.
    assert qtypes.half_step("nf4", np.array([0.02]))[0] == pytest.approx(0.0398, abs=1e-4)


def test_nf4_bound_catches_a_neighbouring_code():
    # Encoding a value to the second-nearest level must break the bound.
    mids = (NF4[1:] + NF4[:-1]) / 2
    x = np.concatenate([(NF4[:-1] + mids) / 2, (mids + NF4[1:]) / 2])  # quarter points
    nearest = NF4[np.abs(x[:, None] - NF4).argmin(axis=1)]
    second = NF4[np.argsort(np.abs(x[:, None] - NF4), axis=1)[:, 1]]
    bound = qtypes.half_step("nf4", x)
    assert (np.abs(x - nearest) <= bound).all()
    assert (np.abs(x - second) > bound).all()


@pytest.mark.parametrize("name", ["int8", "int4", "uint4"])
def test_integer_half_step_is_half(name):
    np.testing.assert_array_equal(qtypes.half_step(name, np.array([-3.0, 0.0, 2.4])), 0.5)
