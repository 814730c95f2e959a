"""`make demo` and the compare_small experiment: their configs compose and validate, and the
launch scripts run the documented stages in order and skip finished ones (no training: the
scripts run against a fake interpreter that only records its command lines and writes the
outputs each stage is checked by)."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = ("demo", "demo_retrieval", "demo_retrieval_niah", "compare_small")


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from train.config import register

    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_validates_and_pairs_runs(experiment):
    """Both attention kinds validate; they differ in nothing but the attention kind (and run name)."""
    from omegaconf import OmegaConf

    from data.sources import data_config_from_dict
    from train.validate import validate

    cfgs = {kind: compose([f"experiment={experiment}", f"attention={kind}"]) for kind in ("nsa", "full")}
    plain = {}
    for kind, cfg in cfgs.items():
        validate(cfg, 1, "cpu")
        data_config_from_dict(OmegaConf.to_container(cfg.data, resolve=True))  # the data package's own check
        assert cfg.run_dir == f"outputs/runs/{experiment}-{kind}"
        assert cfg.device == "auto" and cfg.attention.backend is None  # GPU + Triton when there is one
        assert cfg.logging.wandb.mode == "offline" and (cfg.logging.wandb.group or cfg.name) == experiment
        d = OmegaConf.to_container(cfg, resolve=True)
        assert d.pop("attention")["kind"] == kind
        d.pop("run_name"), d.pop("run_dir")
        plain[kind] = d
    assert plain["nsa"] == plain["full"]  # same model, data, seed, order, budget, schedule


@pytest.mark.parametrize("experiment,max_fraction", [("demo", 0.3), ("demo_retrieval", 0.3), ("compare_small", 0.4)])
def test_nsa_is_really_sparse_at_the_training_length(experiment, max_fraction):
    """A query at the last position reads well under the full context (Table 4 counting)."""
    from nsa.cache import kv_tokens_read

    cfg = compose([f"experiment={experiment}", "attention=nsa"])
    a, T = cfg.attention, int(cfg.train.seq_len)
    read = kv_tokens_read(T, block_len=a.block_len, stride=a.stride, select_len=a.select_len,
                          num_select=a.num_select, window=a.window)["total"]
    assert read <= max_fraction * T, f"{experiment}: NSA reads {read} of {T} keys"
    assert a.window < T and a.num_select * a.select_len < T


FAKE_PYTHON = r"""#!/usr/bin/env bash
# Records each call; writes the files the calling stage is checked by.
echo "$*" >>"$FAKE_LOG"
arg() { local k=$1; shift; for x in "$@"; do [[ $x == "$k="* ]] && echo "${x#*=}"; done; }
if [[ $1 == -c ]]; then echo 0; exit 0; fi
case "$2" in
  data.tokenizer) mkdir -p outputs/tokenizers && touch outputs/tokenizers/bpe4096.model ;;
  data.prepare) mkdir -p outputs/data/pystdlib-bpe4096 && touch outputs/data/pystdlib-bpe4096/meta.json ;;
  train)
    exp=$(arg experiment "$@"); att=$(arg attention "$@"); run=$(arg run_name "$@"); run=${run:-$exp-$att}
    [[ $exp == compare_small ]] && mkdir -p outputs/data/passkey_mix-bpe4096 \
        && touch outputs/data/passkey_mix-bpe4096/meta.json
    mkdir -p "outputs/runs/$run/export" && date +%s%N >"outputs/runs/$run/export/model.safetensors"
    echo "attention: $att" >"outputs/runs/$run/config.yaml" ;;
  eval)
    ck=$(arg checkpoint "$@"); task=$(arg task "$@"); name=$(arg name "$@"); name=${name:-${ck##*/}}
    for a in "$@"; do [[ $a == +attention.*=* ]] && a=${a#+attention.} && name+="-${a%%=*}${a#*=}"; done
    mkdir -p "outputs/eval/$name/$task" && date +%s%N >"outputs/eval/$name/$task/results.json" ;;
  eval.compare)
    summary=""
    for ((i = 1; i < $#; i++)); do if [[ ${!i} == --summary ]]; then j=$((i + 1)); summary=${!j}; fi; done
    while [[ $# -gt 0 && $1 != --out ]]; do shift; done
    mkdir -p "$2" && echo "# report" >"$2/report.md" && touch "$2/val_loss.png"
    if [[ -n $summary ]]; then echo "{}" >"$summary"; fi ;;
esac
"""


def _sandbox(tmp_path: Path) -> tuple[Path, Path, dict]:
    """A copy of launch/ and configs/ (the scripts cd to their parent dir) and a fake interpreter."""
    root = tmp_path / "repo"
    shutil.copytree(REPO / "launch", root / "launch")
    shutil.copytree(REPO / "configs", root / "configs")
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.log"
    env = {**os.environ, "PYTHON": str(fake), "FAKE_LOG": str(log), "DEMO_OVERRIDES": "", "COMPARE_OVERRIDES": ""}
    return root, log, env


def _run(root: Path, script: str, env: dict, log: Path) -> tuple[list[str], str]:
    log.unlink(missing_ok=True)
    p = subprocess.run(["bash", f"launch/{script}"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    calls = [c for c in log.read_text().splitlines() if not c.startswith("-c ")] if log.exists() else []
    return calls, p.stdout


def _documented_commands(script: Path) -> list[str]:
    """The `python -m ...` commands listed in the script's header, one per documented stage line."""
    return re.findall(r"^#\s+\d+ [\w-]+\s+(python -m [\w.]+[^\n(]*?)\s*(?:\(|\}|$)", script.read_text(), re.M)


def test_scripts_parse():
    for script in ("demo.sh", "compare_small.sh", "retrieval_probe.sh"):
        subprocess.run(["bash", "-n", str(REPO / "launch" / script)], check=True)


def test_demo_runs_the_documented_stages_once(tmp_path):
    root, log, env = _sandbox(tmp_path)
    calls, out = _run(root, "demo.sh", env, log)
    modules = [c.split()[1] for c in calls]
    assert modules == ["data.tokenizer", "data.prepare"] + ["train"] * 6 + ["eval"] * 6 + ["eval.compare"]
    init = "train.init_from=outputs/runs/demo_retrieval-${attention.kind}"
    assert [c for c in calls if c.startswith("-m train")] == [
        "-m train experiment=demo attention=nsa", "-m train experiment=demo attention=full",
        "-m train experiment=demo_retrieval attention=nsa", "-m train experiment=demo_retrieval attention=full",
        f"-m train experiment=demo_retrieval_niah attention=nsa {init}",
        f"-m train experiment=demo_retrieval_niah attention=full {init}"]
    assert compose(["experiment=demo_retrieval_niah", "attention=nsa", init]).train.init_from == (
        "outputs/runs/demo_retrieval-nsa")
    assert [re.search(r"task=(\w+)", c).group(1) + ":" + c.split("checkpoint=")[1].split()[0]
            for c in calls if c.startswith("-m eval ")] == [
        "ppl:outputs/runs/demo-nsa", "ppl:outputs/runs/demo-full",
        "retrieval:outputs/runs/demo_retrieval-nsa", "retrieval:outputs/runs/demo_retrieval-full",
        "niah:outputs/runs/demo_retrieval_niah-nsa", "niah:outputs/runs/demo_retrieval_niah-full"]
    assert all("eval@retrieval=demo_retrieval" in c for c in calls if "task=retrieval" in c)
    assert all("eval@niah=niah_copy" in c for c in calls if "task=niah" in c)
    assert calls[-1] == ("-m eval.compare outputs/runs/demo-nsa outputs/runs/demo-full outputs/runs/demo_retrieval-nsa "
                         "outputs/runs/demo_retrieval-full outputs/runs/demo_retrieval_niah-nsa "
                         "outputs/runs/demo_retrieval_niah-full --out outputs/demo")
    documented = [" ".join(c.split()[:3]) for c in _documented_commands(root / "launch" / "demo.sh")]
    assert documented == ["python -m data.tokenizer", "python -m data.prepare"] + ["python -m train"] * 3 + [
        "python -m eval"] * 3 + ["python -m eval.compare"]
    assert out.rstrip().endswith(f"report: {root}/outputs/demo/report.md")
    report = (root / "outputs/demo/report.md").read_text()
    assert "## How this report was made" in report and "| train |" in report and "| train-niah |" in report

    calls, out = _run(root, "demo.sh", env, log)  # second run: everything up to date
    assert calls == [] and out.count("up to date, skipped") == 12

    cfg = root / "configs/experiment/demo.yaml"  # a changed experiment retrains, re-evaluates, re-compares its pair
    cfg.write_text(cfg.read_text() + "\n# changed\n")
    calls, _ = _run(root, "demo.sh", env, log)
    assert [c.split()[1] for c in calls] == ["train", "train", "eval", "eval", "eval.compare"]

    cfg = root / "configs/experiment/demo_retrieval.yaml"  # ... and the pair tuned from it
    cfg.write_text(cfg.read_text() + "\n# changed\n")
    calls, _ = _run(root, "demo.sh", env, log)
    assert [c.split()[1] for c in calls] == ["train"] * 4 + ["eval"] * 4 + ["eval.compare"]
    assert all("demo_retrieval" in c for c in calls[:-1])

    cfg = root / "configs/experiment/demo_retrieval_niah.yaml"  # only the tuned pair
    cfg.write_text(cfg.read_text() + "\n# changed\n")
    calls, _ = _run(root, "demo.sh", env, log)
    assert [c.split()[1] for c in calls] == ["train"] * 2 + ["eval"] * 2 + ["eval.compare"]
    assert all("demo_retrieval_niah" in c for c in calls[:-1])

    cfg = root / "configs/eval/niah.yaml"  # a changed evaluation config re-evaluates (all tasks), nothing else
    cfg.write_text(cfg.read_text() + "\n# changed\n")
    calls, _ = _run(root, "demo.sh", env, log)
    assert [c.split()[1] for c in calls] == ["eval"] * 6 + ["eval.compare"]


def test_compare_small_trains_both_then_evaluates(tmp_path):
    root, log, env = _sandbox(tmp_path)
    calls, out = _run(root, "compare_small.sh", env, log)
    trains = [c for c in calls if c.startswith("-m train")]
    # first the probe's look-up stage for each run (its stamp in the probe's folder), then the pair,
    # each from its own stage 1
    assert trains[:2] == [f"-m train experiment=retrieval_probe_lookup name=retrieval_probe attention={a} "
                          f"run_name=retrieval_probe_lookup-{a}" for a in ("nsa", "full")]
    init = "train.init_from=outputs/runs/retrieval_probe_lookup-${attention.kind}"
    assert sorted(trains[2:]) == [f"-m train experiment=compare_small attention=full {init}",
                                  f"-m train experiment=compare_small attention=nsa {init}"]
    assert sorted(p.name for p in (root / "outputs/retrieval_probe/.stamps").iterdir()) == ["lookup-full", "lookup-nsa"]
    cfg = compose(["experiment=compare_small", "attention=nsa", init])
    assert cfg.train.init_from == "outputs/runs/retrieval_probe_lookup-nsa"
    evals = [c for c in calls if c.startswith("-m eval ")]
    assert len(evals) == 6 and all("checkpoint=outputs/runs/compare_small-" in c for c in evals)
    assert [c.split()[2] for c in evals] == ["task=ppl"] * 2 + ["task=niah"] * 2 + ["task=retrieval"] * 2
    assert calls[-1].startswith("-m eval.compare outputs/runs/compare_small-nsa outputs/runs/compare_small-full")
    assert (root / "outputs/compare_small/report.md").is_file()
    pub = tmp_path / "published"
    calls, _ = _run(root, "compare_small.sh", {**env, "COMPARE_PUBLISH": str(pub)}, log)
    assert calls == []  # all up to date; the results are only copied
    assert sorted(p.name for p in pub.iterdir()) == [
        "full-config.yaml", "full-niah.json", "full-ppl.json", "full-retrieval.json", "nsa-config.yaml",
        "nsa-niah.json", "nsa-ppl.json", "nsa-retrieval.json", "report.md", "stage_times.tsv", "val_loss.png"]


def test_compare_small_smoke_test_is_not_taken_for_the_real_run(tmp_path):
    """The overrides (and thread count) of the training stage are in its stamp: after a smoke test
    with train.max_steps=20, the run without it trains (and evaluates) again, from scratch."""
    root, log, env = _sandbox(tmp_path)
    init = "train.init_from=outputs/runs/retrieval_probe_lookup-${attention.kind}"
    calls, _ = _run(root, "compare_small.sh", {**env, "COMPARE_OVERRIDES": "train.max_steps=20"}, log)
    trains = [c for c in calls if c.startswith("-m train")]
    assert len(trains) == 4 and all(c.endswith(" train.max_steps=20") for c in trains)  # stage 1 too
    assert sorted(trains[2:]) == [f"-m train experiment=compare_small attention=full {init} train.max_steps=20",
                                  f"-m train experiment=compare_small attention=nsa {init} train.max_steps=20"]
    # the smoke runs' checkpoints must not be resumed by the real runs: their folders go first
    marks = [root / f"outputs/runs/compare_small-{a}/checkpoints/step_00000020" for a in ("nsa", "full")]
    for m in marks:
        m.mkdir(parents=True)
    calls, _ = _run(root, "compare_small.sh", env, log)
    trains = [c for c in calls if c.startswith("-m train")]
    assert len(trains) == 4 and sorted(trains[2:]) == [
        f"-m train experiment=compare_small attention=full {init}", f"-m train experiment=compare_small attention=nsa {init}"]
    assert not any(m.exists() for m in marks)
    calls, _ = _run(root, "compare_small.sh", {**env, "COMPARE_THREADS": "2"}, log)
    assert len([c for c in calls if c.startswith("-m train")]) == 2  # other threads: another pair, same stage 1
    # a stage that never finished (no stamp) resumes: its runs' folders stay
    (root / "outputs/compare_small/.stamps/train").unlink()
    for m in marks:
        m.mkdir(parents=True)
    calls, _ = _run(root, "compare_small.sh", env, log)
    assert len([c for c in calls if c.startswith("-m train")]) == 2 and all(m.exists() for m in marks)


PROBE_RUNS = {"full": ["attention=full"], "nsa": ["attention=nsa"], "nsa_spec": ["attention=nsa"],
              "nsa_window_only": ["attention=nsa", "attention.branches=[win]"]}
PROBE_STAGE2 = {"nsa": ["attention.select_distill=0.2"]}  # what stage 2 adds to a run's overrides
PROBE_LOOKUP = {"nsa_spec": "nsa"}  # runs that start from another run's stage 1


def test_retrieval_probe_runs_compose_and_differ_only_in_attention():
    """Both stages of the probe runs validate, share everything but the attention settings, the
    ablation keeps only the window, NSA and the spec's NSA differ in stage 2's selection
    distillation only, stage 2 can start from stage 1's weights (same model), and every long probe
    answer lies beyond that window."""
    from omegaconf import OmegaConf

    from train.validate import validate

    for experiment in ("retrieval_probe_lookup", "retrieval_probe"):
        plain, atts = {}, {}
        for run, args in PROBE_RUNS.items():
            extra = PROBE_STAGE2.get(run, []) if experiment == "retrieval_probe" else []
            cfg = compose([f"experiment={experiment}", *args, *extra, f"run_name={experiment}-{run}"])
            validate(cfg, 1, "cpu")
            d = OmegaConf.to_container(cfg, resolve=True)
            atts[run] = att = d.pop("attention")
            d.pop("run_name"), d.pop("run_dir")
            plain[run] = d
            if run == "nsa_window_only":
                assert att["branches"] == ["win"] and att["window"] == 64
        assert plain["full"] == plain["nsa"] == plain["nsa_spec"] == plain["nsa_window_only"]
        distill = 0.2 if experiment == "retrieval_probe" else 0.0
        assert atts["nsa"] == {**atts["nsa_spec"], "select_distill": distill} and atts["nsa_spec"]["select_distill"] == 0
    stage1, stage2 = (compose([f"experiment={e}"]) for e in ("retrieval_probe_lookup", "retrieval_probe"))
    assert stage1.model == stage2.model
    # the blocks are the same (stage 2 loads stage 1's weights); stage 2 reads more of them: stage 1's
    # 60-token documents lie inside the forced blocks, where num_select changes nothing
    from train.model.config import SPARSITY_KEYS

    a1, a2 = (OmegaConf.to_container(s.attention) for s in (stage1, stage2))
    assert {k: v for k, v in a1.items() if k != "num_select"} == {k: v for k, v in a2.items() if k != "num_select"}
    assert "num_select" in SPARSITY_KEYS and a2["num_select"] >= a1["num_select"]
    assert stage1.data.name != stage2.data.name and stage2.train.init_from is None  # the script sets it
    comps = stage2.data.source.components
    long_ones = [c.source for c in comps if c.source.max_filler_chars >= 900]
    assert {s.task for s in long_ones} == {"copy", "mqar", "passkey"}


def test_retrieval_probe_script_trains_evaluates_and_summarises(tmp_path):
    root, log, env = _sandbox(tmp_path)
    calls, out = _run(root, "retrieval_probe.sh", env, log)
    trains = [c for c in calls if c.startswith("-m train")]
    expected = []
    for run, a in PROBE_RUNS.items():
        lookup = PROBE_LOOKUP.get(run, run)
        if lookup == run:  # a shared stage 1 trains once
            expected.append(f"-m train experiment=retrieval_probe_lookup name=retrieval_probe {' '.join(a)} "
                            f"run_name=retrieval_probe_lookup-{run}")
        expected.append(f"-m train experiment=retrieval_probe name=retrieval_probe "
                        f"{' '.join(a + PROBE_STAGE2.get(run, []))} run_name=retrieval_probe-{run} "
                        f"train.init_from=outputs/runs/retrieval_probe_lookup-{lookup}")
    assert trains == expected
    evals = [c for c in calls if c.startswith("-m eval ")]
    # every run on the probe's documents, on the symbols diagnostic and on the copy NIAH grid, the NSA
    # runs also reading every block (what their selection costs)
    assert [c.split("checkpoint=")[1].split()[0] for c in evals] == [
        f"outputs/runs/retrieval_probe-{run}" for run in PROBE_RUNS for _ in range(4 if run in ("nsa", "nsa_spec") else 3)]
    niah = [c for c in evals if "task=niah" in c]
    assert len(niah) == len(PROBE_RUNS) and all("eval@niah=niah_copy" in c for c in niah)
    assert all("task=retrieval eval@retrieval=retrieval_probe" in c for c in evals if c not in niah)
    assert sum("+attention.num_select=16" in c for c in evals) == 2
    assert [c.split("name=")[1].split()[0] for c in evals if "eval@retrieval=retrieval_probe_symbols" in c] == [
        f"retrieval_probe-{run}-symbols" for run in PROBE_RUNS]
    assert calls[-1].startswith("-m eval.compare outputs/runs/retrieval_probe-full outputs/runs/retrieval_probe-nsa "
                                "outputs/runs/retrieval_probe-nsa_spec outputs/runs/retrieval_probe-nsa_window_only "
                                "--out outputs/retrieval_probe "
                                "--summary outputs/retrieval_probe/summary.json")
    calls, _ = _run(root, "retrieval_probe.sh", env, log)
    assert calls == []  # everything up to date
    calls, _ = _run(root, "compare_small.sh", env, log)  # its stage 1 is the probe's: trained once
    assert [c.split()[2] for c in calls if c.startswith("-m train")] == ["experiment=compare_small"] * 2
