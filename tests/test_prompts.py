import pytest

from fcot.errors import FcotError
from fcot.prompts import (
    FORMATS,
    PREDICTION_PREFIX,
    few_shot_cot,
    few_shot_excluded_indices,
    get_format,
    zero_shot_cot_step1,
    zero_shot_cot_step2,
)
from fcot.scoring import predict, score
from fcot.tasks import TASKS, get_task


def test_zero_shot_cot_two_steps():
    step1 = zero_shot_cot_step1(" What is 2 + 3? ")
    assert step1 == "Q: What is 2 + 3?\nA: Let's think step by step."
    assert zero_shot_cot_step2(step1, " 2 plus 3 is 5.") == (
        "Q: What is 2 + 3?\nA: Let's think step by step. 2 plus 3 is 5.\nTherefore, the answer is")


def test_fine_tune_cot_and_vanilla_formats():
    ft = get_format("fine_tune_cot")
    assert ft.render_prompt("What is 2 + 3?") == "What is 2 + 3? ###"
    assert ft.render_target("5", " 2 plus 3 is 5. ") == " 2 plus 3 is 5. --> 5 END"
    assert ft.render_prompt("What is 2 + 3?", encoder_decoder=True) == "What is 2 + 3?"
    assert ft.render_target("5", "2 plus 3 is 5.", encoder_decoder=True) == "2 plus 3 is 5. --> 5"
    vanilla = get_format("vanilla")
    assert (vanilla.render_prompt("Q?"), vanilla.render_target("5")) == ("Q? ###", " 5")
    with pytest.raises(FcotError, match="needs a rationale"):
        ft.render_target("5", "")
    with pytest.raises(FcotError, match="has no training target"):
        get_format("zero_shot").render_target("5")


def test_each_format_target_scores_correct_with_its_own_prefix():
    spec = get_task("multiarith")
    for name, fmt in FORMATS.items():
        if fmt.target is None:
            continue
        target = fmt.render_target("39", "32 + 42 = 74 and 74 - 35 = 39.")
        assert score(spec, target, "39", prefix=PREDICTION_PREFIX[name]).correct, name


def test_few_shot_cot_prompt_for_every_task():
    for task in TASKS:
        prompt = few_shot_cot(task, "Is it?")
        assert prompt.startswith("Q: ") and prompt.endswith("\nQ: Is it?\nA:")
        assert prompt.count("The answer is") >= 3
    assert few_shot_excluded_indices("aqua") == [18, 15, 19, 55]
    completion = " Jason had 20, gave 8. The answer is 12. Q: next"
    assert predict(get_task("gsm8k"), completion, PREDICTION_PREFIX["few_shot_cot"])[0] == "12"
    with pytest.raises(FcotError, match="no few-shot-CoT exemplars for task 'mytask'"):
        few_shot_cot("mytask", "Q?")
