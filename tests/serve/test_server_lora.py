"""``jquant serve MODEL --lora NAME=PATH``, end to end with the official `openai` client:
adapter files written by `lora.save`, a request's ``model`` picking ``<model>:<name>``, its
greedy text equal to `generate` on the merged model, ``/v1/models`` listing the adapters, and
an unknown adapter refused as an unknown model."""

from __future__ import annotations

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest

from jquant import models
from jquant.qat import lora

PROMPT = [1, 40, 77, 90, 12, 101, 33]  # token ids: no tokenizer in the comparison
MAX = 8


def _adapter(params, targets, rank, seed):
    ad = lora.init(params, targets, rank=rank, key=jax.random.key(seed))
    rng = np.random.default_rng(seed)
    for v in ad.values():
        v["b"] = jnp.asarray(rng.normal(0, 0.2, v["b"].shape), jnp.float32)
    return ad


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    """The CLI serving the tiny GGUF with adapters x and y: (client, model, params,
    tokenizer, adapters)."""
    import uvicorn

    from jquant.cli import main

    model, params, tokenizer = models.load(tiny_model)
    adapters = {"x": lora.LoRA(_adapter(params, r"_proj/kernel$", 4, 1), alpha=8.0),
                "y": lora.LoRA(_adapter(params, r"(q|v)_proj/kernel$", 2, 2), alpha=None)}
    folder = tmp_path_factory.mktemp("adapters")
    for name, ad in adapters.items():
        lora.save(folder / f"{name}.safetensors", ad.adapters, alpha=ad.alpha)
    servers, status = [], []
    init = uvicorn.Server.__init__

    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        servers.append(self)

    uvicorn.Server.__init__ = record
    try:
        argv = ["serve", tiny_model, "--port", "0", "--max-slots", "2", "--max-context", "64",
                "--prefill-chunk", "16", "--prefill-rows", "1", "--served-model-name", "tiny",
                "--lora", f"x={folder / 'x.safetensors'}",
                "--lora", f"y={folder / 'y.safetensors'}"]  # fmt: skip
        thread = threading.Thread(target=lambda: status.append(main(argv)), daemon=True)
        thread.start()
        deadline = time.monotonic() + 300
        while not (servers and servers[0].started):
            assert thread.is_alive() and time.monotonic() < deadline, status
            time.sleep(0.05)
    finally:
        uvicorn.Server.__init__ = init
    host, port = servers[0].servers[0].sockets[0].getsockname()[:2]
    client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="k", max_retries=0,
                           timeout=60)  # fmt: skip
    yield client, model, params, tokenizer, adapters
    servers[0].should_exit = True
    thread.join(timeout=60)
    assert status == [0]


def _reference(served, name):
    _, model, params, tokenizer, adapters = served
    if name is not None:
        params = lora.merge(params, adapters[name].adapters, alpha=adapters[name].alpha)
    ids = models.generate(model, params, [PROMPT], max_new_tokens=MAX,
                          stop_tokens=()).sequences()[0]  # fmt: skip
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_a_request_runs_with_the_adapter_its_model_names(served):
    client = served[0]
    want = {name: _reference(served, name) for name in (None, "x", "y")}
    assert len(set(want.values())) == 3  # the adapters change the text
    for name, text in want.items():
        model = "tiny" if name is None else f"tiny:{name}"
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX,
                                      temperature=0, extra_body={"ignore_eos": True})
        assert r.model == model and r.choices[0].text == text, name
    chunks = client.completions.create(model="tiny:y", prompt=PROMPT, max_tokens=MAX,
                                       temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == want["y"]


def test_models_lists_the_adapters_and_an_unknown_one_is_refused(served):
    client = served[0]
    cards = client.models.list().data
    assert [m.id for m in cards] == ["tiny", "tiny:x", "tiny:y"]
    assert [getattr(m, "parent", None) for m in cards] == [None, "tiny", "tiny"]
    assert client.models.retrieve("tiny:x").id == "tiny:x"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("tiny:z")
    with pytest.raises(openai.BadRequestError, match="'tiny:z' does not exist") as e:
        client.completions.create(model="tiny:z", prompt=PROMPT, max_tokens=2)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.BadRequestError, match="'x' does not exist") as e:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("x", "--lora 'x': expected NAME=PATH"),
        ("a:b=f.safetensors", "the name 'a:b' must match"),
        ("x=/no/such/file", "lora.load: /no/such/file is not a file"),
    ],
)
def test_cli_lora_bad_arguments_are_one_line_errors(capsys, tmp_path, spec, expected):
    from jquant.cli import main

    assert main(["serve", str(tmp_path / "missing.gguf"), "--lora", spec]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jquant serve: error: ") and expected in err and err.count("\n") == 1
