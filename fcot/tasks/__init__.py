"""Tasks: the paper's 12 reasoning tasks, their splits, synthetic generators and user tasks.

    from fcot.tasks import load_split
    train = load_split("multiarith", "train")          # list[Sample], the paper's split
"""

from fcot.tasks.loading import (
    data_dir,
    get_task,
    load_records,
    load_split,
    split_indices,
    task_names,
    task_sizes,
)
from fcot.tasks.registry import TASKS, Sample, TaskSpec
from fcot.tasks.custom import jsonl_task
from fcot.tasks.synthetic import generate_coin_flip, generate_last_letters

__all__ = [
    "TASKS", "Sample", "TaskSpec", "data_dir", "get_task", "load_records", "load_split", "split_indices",
    "task_names", "task_sizes", "jsonl_task", "generate_coin_flip", "generate_last_letters",
]
