"""The SuperNI continual-learning benchmark: 15 Super-NaturalInstructions tasks in two published orders.

The sequence of O-LoRA, InfLoRA, SAPT and GainLoRA (summarisation, extractive QA, dialogue, relation
extraction, sentiment and emotion classification, ...). Each task is one file ``superni-cl/TASK.json.gz`` of a
data directory, ``{task, definition, train: [{id, input, output}], test: [...]}``, with up to 500 training
and 16-100 test instances; ``superni-cl/orders.json`` holds the published orders. None of it ships with this
package (Super-NaturalInstructions is Apache-2.0; each task's source dataset keeps its own terms).

Prompt template (the task definition, then the instance, as the papers combine them)::

    Definition: {definition}

    Input: {input}
    Output:

The response is the instance's first reference output, stripped of surrounding blanks; every reference is kept
in ``meta["references"]`` for scoring (ROUGE-L takes the best over references, ``evaluation/rouge.py``).
Inputs longer than ``max_input_chars`` are cut so that definition, input and output fit a 512-token sequence,
the source length the papers train with. ``cut="head"`` (the default, what the committed figures used) keeps
an input's beginning; ``cut="ends"`` keeps its first three quarters of the budget and its last quarter
(``TAIL_SHARE``), joined by `` ... ``: QuoRef's inputs are a passage followed by the question (at most 271
characters), which the head cut drops from 569 of its 600 inputs and the ends cut keeps in all of them.
The published train/test split is kept: every example carries ``meta["split"]`` and ``split_examples`` honours it.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from .sources import Example

FOLDER = "superni-cl"
TEMPLATE = "Definition: {definition}\n\nInput: {input}\nOutput:"
MAX_INPUT_CHARS = 1200  # about 300 tokens of English
CUTS = ("head", "ends")
TAIL_SHARE = 0.25  # of max_input_chars kept from an input's end by the ends cut


def superni_tasks(data_dir: str | Path) -> list[str]:
    """The task names a data directory holds (its ``superni-cl/*.json.gz`` files), sorted."""
    folder = Path(data_dir) / FOLDER
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found: pass --data-dir pointing at a folder with {FOLDER}/")
    return sorted(p.name.removesuffix(".json.gz") for p in folder.glob("*.json.gz"))


def superni_orders(data_dir: str | Path) -> dict[str, list[str]]:
    """The published task orders (``order1``, ``order2``) of ``superni-cl/orders.json``."""
    path = Path(data_dir) / FOLDER / "orders.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass --data-dir pointing at a folder with {FOLDER}/orders.json")
    return json.loads(path.read_text(encoding="utf-8"))


def cut_input(text: str, max_input_chars: int = MAX_INPUT_CHARS, cut: str = "head") -> str:
    """``text`` within ``max_input_chars`` (plus the `` ... `` marking a cut): its beginning (``head``) or its
    beginning and end (``ends``, the last ``TAIL_SHARE`` of the budget from the end)."""
    if cut not in CUTS:
        raise ValueError(f"superni `cut` is {cut!r}; choose one of {', '.join(CUTS)}")
    if len(text) <= max_input_chars:
        return text
    if cut == "head":
        return text[:max_input_chars].rstrip() + " ..."
    tail = int(max_input_chars * TAIL_SHARE)
    return text[:max_input_chars - tail].rstrip() + " ... " + text[len(text) - tail:].lstrip()


def superni_prompt(definition: str, text: str, max_input_chars: int = MAX_INPUT_CHARS, cut: str = "head") -> str:
    return TEMPLATE.format(definition=definition.strip(), input=cut_input(text, max_input_chars, cut).strip())


def superni(data_dir: str | Path, task: str | None, max_input_chars: int = MAX_INPUT_CHARS,
            cut: str | None = None) -> list[Example]:
    """One SuperNI task: its training instances, then its test instances (``meta["split"]`` says which);
    long inputs cut as ``cut`` says (``head`` when None)."""
    if not task:
        raise ValueError("the superni source needs `task`, e.g. task363_sst2_polarity_classification")
    cut = cut or "head"
    tasks = superni_tasks(data_dir)
    if task not in tasks:
        known = ", ".join(tasks) or "none"
        raise ValueError(f"SuperNI task {task!r} is not in {Path(data_dir) / FOLDER}; the tasks there are: {known}")
    path = Path(data_dir) / FOLDER / f"{task}.json.gz"
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        data = json.load(fh)
    missing = [key for key in ("definition", "train", "test") if key not in data]
    if missing:
        raise ValueError(f"{path} has no {', '.join(missing)}: a task file holds {{task, definition, train: [{{id, "
                         "input, output}], test: [...]} (an empty list for a split with no instance); put the "
                         "published file there")
    examples = []
    for split in ("train", "test"):
        for row in data[split]:
            references = row["output"] if isinstance(row["output"], list) else [row["output"]]
            if not references:
                raise ValueError(f"{path}: {split} instance {row['id']!r} has an empty `output`: give it a "
                                 "reference output or remove the instance")
            examples.append(Example(superni_prompt(data["definition"], row["input"], max_input_chars, cut),
                                    references[0].strip(),
                                    {"split": split, "id": row["id"], "task": task, "references": references}))
    return examples
