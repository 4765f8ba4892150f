"""Tiny models built from configs, offline, seeded: the fixtures every unit test uses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Tests never reach a model hub; an unknown name must fail fast with our message. Set before the HF
# libraries are imported: they read it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.overrides import TorchFunctionMode
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dylora_moe import DyLoRAConfig, DyLoRAMoE, ExpertConfig, RouterConfig

VOCAB = 128


class HostReads(TorchFunctionMode):
    """Counts reads of a tensor's value on the host (``bool``, ``item``, ``tolist``, ``int``, ``float``: on an
    accelerator each waits for every queued kernel) made directly by code in a file whose path ends with
    ``filename``; or calls of the tensor methods ``calls`` instead."""

    READS = frozenset({torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__,
                       torch.Tensor.__float__})

    def __init__(self, filename: str, calls: frozenset | set | None = None) -> None:
        super().__init__()
        self.filename, self.count, self.calls = filename, 0, self.READS if calls is None else calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.calls and sys._getframe(1).f_code.co_filename.endswith(self.filename):
            self.count += 1
        return func(*args, **(kwargs or {}))


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character; ids 0-2 are pad/bos/eos."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({chr(c): c - 28 for c in range(32, 127)})  # ids 4..98
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def build(backbone=None, **router) -> DyLoRAMoE:
    """A DyLoRA-MoE on a tiny Llama; ``router`` overrides RouterConfig fields."""
    config = DyLoRAConfig(model="tiny", expert=ExpertConfig(rank=4, alpha=8, dropout=0.0),
                          router=RouterConfig(**router))
    return DyLoRAMoE(backbone if backbone is not None else tiny_llama(), char_tokenizer(), config)


def decide_by_cosine(model: DyLoRAMoE, threshold: float) -> None:
    """Switch ``model`` to the spec's cosine novelty rule at ``threshold``: 1.0 makes every skill new, -1.0
    recognises everything (tests that need a given pool shape)."""
    model.config.novelty.method = "cosine"
    model.config.novelty.similarity_threshold = threshold


def randomise_experts(model: DyLoRAMoE, seed: int = 0) -> None:
    """Give every expert non-zero B so that experts differ (peft starts B at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.experts.layers():
            for name in layer.lora_B:
                for mod in (layer.lora_A[name], layer.lora_B[name]):
                    mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * 0.3)
    model.experts.touch()


def batch(bsz: int = 3, t: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (bsz, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def model() -> DyLoRAMoE:
    return build()


TINY_STREAM = """
name: tiny
system:
  novelty: {{similarity_threshold: 0.9}}
  expert: {{rank: 4, dropout: 0.0}}
training: {{seed_steps: {steps}, consolidation_steps: {steps}, batch_size: 4, max_length: 32, report_to: [none]}}
skills:
  - {{name: digits, source: {{type: file, path: digits.jsonl}}, format: {{chat: false}}}}
  - {{name: letters, source: {{type: file, path: letters.jsonl}}, format: {{chat: false}}}}
  - {{name: digits-again, source: {{type: file, path: digits2.jsonl}}, format: {{chat: false}}}}
"""


def write_tiny_run(root, n: int = 30, steps: int = 2):
    """A tiny model folder and a 3-step file stream (the last step repeats the first skill with other
    prompts) in ``root``; returns the stream file. Used by the CLI tests and the crash-resume benchmark."""
    import json

    tiny_llama().save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    rows = {"digits": [{"prompt": f"{i}+{i}=", "response": f"{2 * i}"} for i in range(n)],
            "digits2": [{"prompt": f"{i} + {i} =", "response": f"{2 * i}"} for i in range(n)],
            "letters": [{"prompt": f"up {chr(97 + i % 26)}{chr(97 + i // 26)}:",
                         "response": f"{chr(65 + i % 26)}{chr(65 + i // 26)}!"} for i in range(n)]}
    for name, items in rows.items():
        (root / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in items))
    (root / "stream.yaml").write_text(TINY_STREAM.format(steps=steps))
    return root / "stream.yaml"


def postgres_bindir() -> Path | None:
    """The binaries of Debian's PostgreSQL package, if it is installed."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return bins[-1].parent if bins else None


@pytest.fixture(scope="module")
def postgres_server():
    """One throwaway PostgreSQL server for the module: a URL template with ``{db}``, or a skip with the reason."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server: install Debian's postgresql package (.ci/run does) to run these")
    pytest.importorskip("psycopg", reason="psycopg is needed for PostgreSQL")
    data = Path(tempfile.mkdtemp(prefix="pg-"))
    sock = Path(tempfile.mkdtemp(prefix="pgsock-"))
    user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if user:
        shutil.chown(data, "postgres")
        shutil.chown(sock, "postgres")
    subprocess.run([*user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"],
                   check=True, capture_output=True, timeout=120)
    port = "55433"
    # -l: the server logs to a file, so it holds no pipe of ours open
    subprocess.run([*user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(data / "server.log"),
                    "-o", f"-k {sock} -p {port} -h ''", "-w", "start"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    try:
        yield f"postgresql+psycopg://postgres@/{{db}}?host={sock}&port={port}"
    finally:
        subprocess.run([*user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(sock, ignore_errors=True)


SUPERNI_TASKS = {  # a tiny folder in the SuperNI continual-learning layout: two tasks of invented instances
    "task001_double": ("Double the number.", lambda i: (f"{i}", [f"{2 * i}"])),
    "task002_shout": ("Repeat the word in capitals.",
                      lambda i: (f"w{chr(97 + i % 26)}", [f"W{chr(65 + i % 26)}!", "?"])),
}


def write_superni(root, n_train: int = 12, n_test: int = 6) -> Path:
    """``root/superni-cl/TASK.json.gz`` files and ``orders.json`` as the shared data folder has them (invented
    instances, a list of references for the second task); returns ``root``."""
    import gzip
    import json

    folder = Path(root) / "superni-cl"
    folder.mkdir(parents=True, exist_ok=True)
    for task, (definition, make) in SUPERNI_TASKS.items():
        def rows(start, count, make=make, task=task):
            out = []
            for i in range(start, start + count):
                text, outputs = make(i)
                out.append({"id": f"{task}-{i}", "input": text, "output": outputs})
            return out

        data = {"task": task, "definition": definition, "train": rows(0, n_train), "test": rows(n_train, n_test)}
        with gzip.open(folder / f"{task}.json.gz", "wt", encoding="utf-8") as fh:
            json.dump(data, fh)
    orders = {"order1": list(SUPERNI_TASKS), "order2": list(reversed(SUPERNI_TASKS))}
    (folder / "orders.json").write_text(json.dumps(orders))
    return Path(root)
