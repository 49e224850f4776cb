"""experiments/paper_cpu/study.py: the report's first lines say plainly whether the paper's sign reproduced."""

import importlib.util

from tests.conftest import ROOT


def study():
    spec = importlib.util.spec_from_file_location("study", ROOT / "experiments" / "paper_cpu" / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def facts(task, diff, paper_diff, ftcot_ci, vanilla_ci, majority=0.55, collapsed=None):
    evals = {"fine_tune_cot": {"accuracy": sum(ftcot_ci) / 2, "accuracy_ci": ftcot_ci, "majority": majority},
             "vanilla": {"accuracy": sum(vanilla_ci) / 2, "accuracy_ci": vanilla_ci, "majority": majority},
             "zero_shot": {"accuracy": 0.0, "accuracy_ci": (0.0, 0.0), "majority": majority}}
    for method, answer in (collapsed or {}).items():
        evals[method].update(collapsed=True, top_prediction=answer)
    return {"task": task, "diff": diff, "paper_diff": paper_diff, "evals": evals}


def test_the_headline_tells_reproduced_opposite_and_within_noise_and_the_majority_floor():
    headline = study().headline
    line = headline(facts("coin_flip", (0.12, 0.04, 0.20), 17.33, (0.70, 0.82), (0.56, 0.70)))
    assert line.startswith("- **coin_flip: reproduced.** Fine-tune-CoT beats vanilla")
    assert "above always answering the majority answer (55.0%): Fine-tune-CoT, vanilla" in line
    line = headline(facts("coin_flip", (0.50, 0.413, 0.587), 17.33, (0.90, 0.98), (0.37, 0.52),
                          collapsed={"vanilla": "yes"}))
    assert line.startswith("- **coin_flip: same sign, a larger effect (the paper's +17.33 lies outside the "
                           "interval).** Fine-tune-CoT beats vanilla (vanilla fine-tune collapsed to `yes`), +50.0")
    line = headline(facts("date_understanding", (0.08, 0.01, 0.15), -2.70, (0.30, 0.48), (0.20, 0.40)))
    assert "**date_understanding: not reproduced (the opposite sign).**" in line
    assert "neither student is significantly above always answering the majority answer" in line
    line = headline(facts("last_letter_concatenation", (-0.01, -0.05, 0.03), 3.34, (0.0, 0.04), (0.0, 0.05), 0.01))
    assert "not reproduced (within noise).** no significant difference" in line
    assert "(the paper's GPT-2: Fine-tune-CoT better, +3.34)" in line
    line = headline(facts("multiarith", (-0.06, -0.10, -0.02), -3.89, (0.02, 0.06), (0.08, 0.14), 0.06))
    assert line.startswith("- **multiarith: reproduced.** Fine-tune-CoT is worse than vanilla")
    assert "majority answer (6.0%): vanilla" in line
