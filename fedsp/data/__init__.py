"""Tasks, answer checking, non-leaking feedback and client partitions.

Typical use::

    from fedsp import data

    task = data.get_task("arithmetic")
    examples = task.load("train", limit=8, seed=0)
    messages = task.messages(examples[0])  # for tokenizer.apply_chat_template
    correct = task.is_correct("47 + 38 = 85. Answer: 85", examples[0])
    feedback = data.Hint(task)(examples[0], "Answer: 12")  # never contains the gold
    clients = data.dirichlet_partition([ex.label for ex in examples], 4, alpha=0.5, seed=0)

Built-in tasks (`task_names()`): arithmetic (generated, the default), gsm8k,
arc_challenge, hellaswag, strategyqa, math, ultrachat (chat SFT data, hub only). Benchmark files are read from ``data_dir`` /
``$FEDSP_DATA_DIR``, else from the Hugging Face hub (``pip install 'fedsp[data]'``).
"""

from __future__ import annotations

from fedsp.data import (  # noqa: F401  (registers)
    arithmetic,
    competition_math,
    gsm8k,
    multiple_choice,
    strategyqa,
    ultrachat,
)
from fedsp.data.base import (
    Example,
    FileTask,
    Message,
    Task,
    get_task,
    register_task,
    subset,
    task_names,
)
from fedsp.data.feedback import (
    FEEDBACK_PROVIDERS,
    BinaryVerdict,
    Feedback,
    FeedbackProvider,
    Hint,
    NoisyRating,
    get_feedback,
    leaks,
)
from fedsp.data.partition import (
    CLIENT_SAMPLINGS,
    dirichlet_partition,
    iid_partition,
    key_partition,
    sample_clients,
)
from fedsp.data.sft import chat_messages, load_chat_prompts, sft_pairs
from fedsp.data.sources import DATA_DIR_ENV, DataNotFoundError

DEFAULT_TASK = "arithmetic"

__all__ = [
    "CLIENT_SAMPLINGS",
    "DATA_DIR_ENV",
    "DEFAULT_TASK",
    "FEEDBACK_PROVIDERS",
    "BinaryVerdict",
    "DataNotFoundError",
    "Example",
    "Feedback",
    "FeedbackProvider",
    "FileTask",
    "Hint",
    "Message",
    "NoisyRating",
    "Task",
    "chat_messages",
    "dirichlet_partition",
    "get_feedback",
    "get_task",
    "iid_partition",
    "key_partition",
    "leaks",
    "load_chat_prompts",
    "register_task",
    "sample_clients",
    "sft_pairs",
    "subset",
    "task_names",
]
