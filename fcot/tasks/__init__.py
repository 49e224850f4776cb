"""Tasks: the paper's 12 reasoning tasks, their splits, synthetic generators and user tasks.

    from fcot.tasks import load_split
    train = load_split("multiarith", "train")          # list[Sample], the paper's split
"""

from fcot.tasks.custom import UserTask, jsonl_task, read_task_file, split_user_tasks
from fcot.tasks.loading import (
    DataDir,
    TaskNames,
    data_dir,
    data_file,
    get_task,
    load_records,
    load_split,
    require_gold,
    split_indices,
    task_names,
    task_sizes,
)
from fcot.tasks.registry import TASKS, Sample, TaskSpec
from fcot.tasks.synthetic import generate_coin_flip, generate_last_letters

__all__ = [
    "TASKS", "DataDir", "Sample", "TaskNames", "TaskSpec", "UserTask", "data_dir", "data_file", "get_task",
    "load_records", "load_split", "require_gold", "split_indices", "task_names", "task_sizes", "jsonl_task",
    "read_task_file", "split_user_tasks",
    "generate_coin_flip", "generate_last_letters",
]
