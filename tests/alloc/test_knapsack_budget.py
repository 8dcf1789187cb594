"""The allocator's choice (against brute force) and its budgets (bits, bytes, devices)."""

import itertools
import math

import numpy as np
import pytest

from jquant import alloc
from jquant.alloc import Sensitivity, allocate, budget_bytes
from jquant.alloc.knapsack import BudgetError, solve
from jquant.alloc.pricing import Option
from jquant.models.convert import EMBED_PATH, HEAD_PATH


def _brute(groups, budget):
    best = (math.inf, None)
    for picks in itertools.product(*[range(len(g)) for g in groups]):
        size = sum(groups[i][o][1] for i, o in enumerate(picks))
        cost = sum(groups[i][o][0] for i, o in enumerate(picks))
        if size <= budget and cost < best[0] - 1e-12:
            best = (cost, picks)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_solve_finds_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    groups = [[(float(rng.uniform(0, 10)), int(rng.integers(1, 9)))
               for _ in range(rng.integers(1, 5))] for _ in range(rng.integers(2, 6))]
    smallest = sum(min(b for _, b in g) for g in groups)
    largest = sum(max(b for _, b in g) for g in groups)
    budget = int(rng.integers(smallest, largest + 1))
    cost, picks = _brute(groups, budget)
    got = solve(groups, budget)
    assert got.nbytes <= budget
    assert got.cost == pytest.approx(cost, abs=1e-9)
    assert got.cost == pytest.approx(sum(groups[i][o][0] for i, o in enumerate(got.picks)))


def test_solve_rounds_sizes_up_so_the_answer_always_fits():
    rng = np.random.default_rng(0)
    groups = [[(float(rng.uniform()), int(rng.integers(10_000, 90_000))) for _ in range(4)]
              for _ in range(30)]  # fmt: skip
    budget = 1_500_000
    got = solve(groups, budget, resolution=1000)  # 1.5 kB units: rounding matters
    assert got.nbytes <= budget
    exact = solve(groups, budget, resolution=budget)
    assert exact.cost <= got.cost + 1e-12  # the finer solution is at least as good


def test_solve_below_the_smallest_choice_says_how_far():
    with pytest.raises(BudgetError, match=r"smallest model.*\(5 bytes.*1 bytes"):
        solve([[(0.0, 2), (1.0, 3)], [(0.0, 3)]], 4)


def _table(tied=True):
    """A toy priced model: two kernels and a (tied) table, with known numbers."""
    options = {
        "layers/0/mlp/up_proj/kernel": {"a": Option(cost=4.0, nbytes=10),
                                        "b": Option(cost=1.0, nbytes=20)},
        "layers/0/mlp/down_proj/kernel": {"a": Option(cost=3.0, nbytes=10),
                                          "b": Option(cost=0.5, nbytes=20)},
        EMBED_PATH: {"t4": Option(cost=2.0, nbytes=30), "t8": Option(cost=0.25, nbytes=60)},
        HEAD_PATH: {"t4": Option(cost=5.0, nbytes=30), "t8": Option(cost=0.5, nbytes=60)},
    }  # fmt: skip
    return Sensitivity(
        options=options,
        kernel_candidates={"a": {"weight": "uint4", "group_size": 64},
                           "b": {"weight": "int8"}},
        table_candidates={"t4": {"weight": "uint4", "group_size": 64}, "t8": {"weight": "int8"}},
        tied=tied, fixed_bytes=7, elements=200, config={}, loss=2.0, tokens=100, experts={},
        experts_per_token=0,
    )  # fmt: skip


def _brute_table(table, budget):
    """Every assignment of the toy model, a split head paying for its own copy."""
    best = (math.inf, None)
    k1, k2 = "layers/0/mlp/up_proj/kernel", "layers/0/mlp/down_proj/kernel"
    for a, b, e, h in itertools.product("ab", "ab", ("t4", "t8"), ("t4", "t8")):
        o = table.options
        size = o[k1][a].nbytes + o[k2][b].nbytes + o[EMBED_PATH][e].nbytes + table.fixed_bytes
        size += 0 if e == h else o[HEAD_PATH][h].nbytes
        cost = o[k1][a].cost + o[k2][b].cost + o[EMBED_PATH][e].cost + o[HEAD_PATH][h].cost
        if size <= budget and cost < best[0]:
            best = (cost, {k1: a, k2: b, EMBED_PATH: e, HEAD_PATH: h})
    return best


@pytest.mark.parametrize("budget", [57, 67, 77, 97, 107, 127, 137, 200])
def test_allocate_tied_table_against_brute_force(budget):
    table = _table()
    cost, choice = _brute_table(table, budget)
    got = allocate(table, budget)
    assert got.predicted == pytest.approx(cost)
    assert got.choice == choice
    assert got.weight_bytes <= budget


def test_allocation_writes_one_anchored_rule_per_tensor():
    got = allocate(_table(), 200)
    recipe = got.recipe("toy", awq=True)
    assert len(recipe.rules) == 4
    assert recipe.match(EMBED_PATH).weight == "int8"
    assert recipe.match("layers/0/mlp/up_proj/kernel").weight == "int8"
    assert recipe.match("layers/10/mlp/up_proj/kernel") is None  # anchored: no stray match
    assert recipe.match("layers/0/mlp/up_proj/kernel").algorithm_args == {}  # not GPTQ
    assert got.predicted_percent == pytest.approx(100 * math.expm1(1.0 + 0.5 + 0.25 + 0.5))


def test_budget_kinds():
    table = _table()
    assert budget_bytes(table, target_bits=4.0) == 100
    assert budget_bytes(table, target_size="1.5KB") == 1500
    assert budget_bytes(table, target_size="2 MiB") == 2 * 2**20
    with pytest.raises(ValueError, match="exactly one budget.*target_bits, target_size"):
        budget_bytes(table, target_bits=4.0, target_size="100MB")
    with pytest.raises(ValueError, match="exactly one budget.*none"):
        budget_bytes(table)
    with pytest.raises(ValueError, match="'H200' is not a known device; known: H100 80GB"):
        budget_bytes(table, fit="H200", context=10, batch=1)
    with pytest.raises(ValueError, match="'A100' is ambiguous"):
        budget_bytes(table, fit="A100", context=10, batch=1)
    with pytest.raises(ValueError, match="size '12 parsecs'"):
        budget_bytes(table, target_size="12 parsecs")
    with pytest.raises(ValueError, match="target_bits=-1"):
        budget_bytes(table, target_bits=-1)


def test_budget_below_the_smallest_model_is_one_clear_error():
    with pytest.raises(BudgetError, match=r"0\.00 MB \(2\.000 bits per weight\) is below the "
                       r"smallest.*\(2\.280 bits per weight\)"):  # fmt: skip
        allocate(_table(), budget_bytes(_table(), target_bits=2.0))


def test_fit_subtracts_the_kv_cache_and_overhead():
    table = _table()
    table = Sensitivity(**{**table.__dict__, "config": {
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "hidden_size": 64}})  # fmt: skip
    room = budget_bytes(table, fit="L4", context=1000, batch=2)
    kv = 2 * 2 * 2 * 1000 * 32 * 2  # K and V, layers, batch, context, width, bf16 bytes
    assert room == int(24e9 / 1.1) - kv
    with pytest.raises(BudgetError, match=r"nothing fits on L4 24GB.*GB over"):
        budget_bytes(table, fit="l4", context=10**8, batch=64)


def test_sizes_and_devices_parse():
    assert alloc.parse_size("105.5MB") == 105_500_000
    assert alloc.parse_size(12345) == 12345
    assert alloc.find_device("tpu v5e")[0] == "TPU v5e (16GB/chip)"
    assert alloc.find_device("RTX 4090")[1] == 24e9
