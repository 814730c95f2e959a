"""The lm-eval adapter on custom tasks over a local fixture (no network): multiple choice,
generate_until and rolling log-likelihood, through lm_eval.simple_evaluate."""

from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "lm_eval" / "tiny_qa.jsonl"

TASKS = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
doc_to_text: "{{{{question}}}}"
doc_to_target: {target}
{extra}
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    specs = {
        "tiny_mc": ("multiple_choice", "answer", 'doc_to_choice: "{{choices}}"\nmetric_list:\n  - metric: acc'),
        "tiny_gen": ("generate_until", '"{{target}}"',
                     "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 4\nmetric_list:\n  - metric: exact_match"),
        "tiny_ppl": ("loglikelihood_rolling", '"{{question}}"', "metric_list:\n  - metric: word_perplexity"),
    }
    for name, (otype, target, extra) in specs.items():
        (d / f"{name}.yaml").write_text(TASKS.format(name=name, data=FIXTURE, output_type=otype, target=target,
                                                     extra=extra))
    return d


def test_simple_evaluate_runs_custom_tasks(tiny_lm, task_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from eval.lm_eval_adapter import NSALM

    model = NSALM(lm=tiny_lm, batch_size=4)
    res = lm_eval.simple_evaluate(model=model, tasks=["tiny_mc", "tiny_gen", "tiny_ppl"],
                                  task_manager=TaskManager(include_path=str(task_dir)), bootstrap_iters=0)
    r = res["results"]
    assert 0.0 <= r["tiny_mc"]["acc,none"] <= 1.0
    assert r["tiny_gen"]["exact_match,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert r["tiny_ppl"]["word_perplexity,none"] > 1.0


def test_adapter_requests_match_evallm(tiny_lm):
    from lm_eval.api.instance import Instance

    from eval.lm_eval_adapter import NSALM

    model = NSALM(lm=tiny_lm)
    req = Instance(request_type="loglikelihood", doc={}, arguments=("def f(x):", " return x"), idx=0)
    (ll, _), = model.loglikelihood([req], disable_tqdm=True)
    ctx = tiny_lm.encode("def f(x):")
    whole = tiny_lm.encode("def f(x): return x")
    (ref, _), = tiny_lm.loglikelihood([(ctx, whole[len(ctx):])])
    assert abs(ll - ref) <= 1e-6 * abs(ref)  # same ids, same forward: equal up to batching order
    roll = Instance(request_type="loglikelihood_rolling", doc={}, arguments=("import os\n" * 40,), idx=0)
    (total,) = model.loglikelihood_rolling([roll], disable_tqdm=True)
    assert total < 0.0
    gen = Instance(request_type="generate_until", doc={}, arguments=("class A:", {"until": ["\n"], "max_gen_toks": 3}),
                   idx=0)
    (text,) = model.generate_until([gen], disable_tqdm=True)
    assert "\n" not in text
    with pytest.raises(ValueError, match="pretrained"):
        NSALM()


def test_registered_by_name():
    from lm_eval.api.registry import get_model

    import eval.lm_eval_adapter as adapter

    assert get_model("nsa") is adapter.NSALM
