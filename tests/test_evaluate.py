"""Evaluation (docs/method.md, Stage 6) as a step: tiny Qwen3 teacher / hardened / nudged student with the
reference tokenizer on real sampled data, checked against hand computations; lm-eval for real on
the shipped reference model and the shipped task; and the errors a user can cause."""

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from tiny_models import save_tiny_qwen3_with_reference_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from e3prune import evaluate as evaluate_module
from e3prune.cli import main as cli_main
from e3prune.data import SampleConfig, SourceSpec, load_split, sample_data
from e3prune.data_sources import builtin_corpus
from e3prune.errors import E3PruneError
from e3prune.evaluate import EvaluateConfig, evaluate
from e3prune.harden import harden
from e3prune.lm_eval_tasks import CLOZE_DATA, SHIPPED_TASKS, TASK_DIR
from e3prune.lm_eval_tasks.adapter import check_lm_eval_tasks, run_lm_eval
from e3prune.lm_eval_tasks.build import build_items, read_corpus, render
from e3prune.metrics import full_vocab_kl, gap_closed, top1_agreement
from e3prune.report import flat_metrics, speed_tags, summary_markdown
from e3prune.speed import SpeedSettings, measure_speed, relative_spread, speed_problems

SEQ = 32
EVAL_SEQUENCES = 5  # with batch_size 2: batches of 2, 2, 1 exercise the token weighting
KEEP = [0, 2, 3, 5]
TINY_SPEED = {
    "speed_repeats": 1,
    "prefill_batch": 2,
    "prefill_len": 16,
    "decode_batch": 1,
    "decode_prompt": 4,
    "decode_tokens": 2,
}
TOP_KEYS = {"format_version", "models", "comparisons", "speed", "lm_eval", "data", "config"}
MODEL_KEYS = {"path", "layers", "parameters", "loss", "perplexity"}
COMPARISON_KEYS = {"top1_agreement", "kl", "perplexity_ratio", "gap_closed"}
SPEED_MODEL_KEYS = {
    f"{phase}_{name}"
    for phase in ("prefill", "decode")
    for name in ("tokens_per_second", "seconds", "seconds_min", "seconds_max")
}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, reference_dir):
    """6-layer Qwen3 with the reference vocabulary; embeddings scaled so that its distributions
    are far from flat and KL / agreement mean something."""
    d = tmp_path_factory.mktemp("teacher") / "model"
    return save_tiny_qwen3_with_reference_tokenizer(d, reference_dir, embed_scale=3.0)


@pytest.fixture(scope="module")
def tiny_pruned(tiny_teacher, tmp_path_factory):
    """The teacher hardened to 4 of its 6 layers."""
    d = tmp_path_factory.mktemp("pruned") / "model"
    harden(AutoModelForCausalLM.from_pretrained(tiny_teacher), KEEP).save_pretrained(d)
    AutoTokenizer.from_pretrained(tiny_teacher).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_student(tiny_pruned, tmp_path_factory):
    """The pruned model with one parameter nudged: a 'distilled' model that differs from it."""
    model = AutoModelForCausalLM.from_pretrained(tiny_pruned)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    d = tmp_path_factory.mktemp("student") / "model"
    model.save_pretrained(d)
    AutoTokenizer.from_pretrained(tiny_pruned).save_pretrained(d)
    return d


def _sample(tokenizer_dir, out, eval_sequences: int, seq_len: int = SEQ):
    sample_data(
        SampleConfig(
            sources=[SourceSpec(uri="builtin:reference")],
            tokenizer=str(tokenizer_dir),
            seq_len=seq_len,
            search_tokens=seq_len,
            distill_tokens=0,
            eval_tokens=seq_len * eval_sequences,
            output=str(out),
        )
    )
    return out


@pytest.fixture(scope="module")
def tiny_data(tiny_teacher, tmp_path_factory):
    return _sample(tiny_teacher, tmp_path_factory.mktemp("data") / "sample", EVAL_SEQUENCES)


def _cfg(teacher, data, out, **kw) -> EvaluateConfig:
    return EvaluateConfig.parse({"teacher": str(teacher), "data": str(data), "output": str(out), **kw})


def _hand_perplexity(model_dir, ids: torch.Tensor) -> float:
    """exp of the mean next-token negative log-likelihood over every position, written out."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.double(), dim=-1)
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    return math.exp(nll.sum().item() / nll.numel())


# --------------------------------------------------------------------------- the math


def test_full_vocab_kl_agreement_and_gap_against_hand_values():
    p = torch.tensor([0.5, 0.5])
    q = torch.tensor([0.25, 0.75])
    kl = full_vocab_kl(p.log().view(1, 1, 2), q.log().view(1, 1, 2))
    assert kl.shape == (1, 1)
    assert kl.item() == pytest.approx(0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75), abs=1e-6)
    masked = torch.tensor([[[0.0, 0.0, float("-inf")]]])  # a vocabulary row the teacher never emits
    assert full_vocab_kl(masked, torch.tensor([[[0.0, 0.0, 1.0]]])).item() == pytest.approx(
        math.log((2 + math.e) / 2), abs=1e-6
    )
    same = torch.randn(2, 3, 7)
    assert full_vocab_kl(same, same).abs().max().item() < 1e-6
    assert full_vocab_kl(same, same + 5.0).abs().max().item() < 1e-5  # logits are shift-invariant

    t = torch.tensor([[[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]]])
    s = torch.tensor([[[0.0, 1.0, 2.0], [9.0, 0.0, 0.0]]])
    assert top1_agreement(t, s).tolist() == [[0.0, 1.0]]

    assert gap_closed(10.0, 20.0, 12.0) == pytest.approx(0.8)
    assert gap_closed(10.0, 20.0, 20.0) == 0.0  # the pruned model closes none of its own gap
    assert gap_closed(10.0, 20.0, 9.0) == pytest.approx(1.1)  # better than the teacher: more than all
    assert gap_closed(10.0, None, 12.0) is None
    assert gap_closed(10.0, 10.0, 12.0) is None


def test_measure_speed_reports_medians_and_spread(tiny_teacher):
    """Three interleaved repeats: each model and phase has its median inside its min / max."""
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    pruned = harden(AutoModelForCausalLM.from_pretrained(tiny_teacher), KEEP).eval()
    settings = SpeedSettings(
        repeats=3, prefill_batch=2, prefill_len=8, decode_batch=1, decode_prompt=4, decode_tokens=2
    )
    s = measure_speed({"teacher": teacher, "pruned": pruned}, settings, pad_token_id=0)
    assert s["repeats"] == (6 if s["remeasured"] else 3)  # a suspect first measurement is taken again
    assert s["device"] == "cpu" and s["dtype"] == "float32"
    assert s["prefill"] == {"batch": 2, "length": 8}
    assert s["decode"] == {"batch": 1, "prompt": 4, "new_tokens": 2}
    assert set(s["models"]) == {"teacher", "pruned"} and set(s["speedup"]) == {"pruned"}
    for m in s["models"].values():
        assert set(m) == SPEED_MODEL_KEYS
        for phase, tokens in (("prefill", 2 * 8), ("decode", 1 * 2)):
            assert m[f"{phase}_seconds_min"] <= m[f"{phase}_seconds"] <= m[f"{phase}_seconds_max"]
            assert m[f"{phase}_tokens_per_second"] == pytest.approx(tokens / m[f"{phase}_seconds"])
    for phase in ("prefill", "decode"):
        expected = s["models"]["teacher"][f"{phase}_seconds"] / s["models"]["pruned"][f"{phase}_seconds"]
        assert s["speedup"]["pruned"][phase] == pytest.approx(expected)
    assert all(m["prefill_seconds_min"] > 0 for m in s["models"].values())  # decode is a difference of two times
    for name, m in s["models"].items():
        for phase in ("prefill", "decode"):
            spread = (m[f"{phase}_seconds_max"] - m[f"{phase}_seconds_min"]) / m[f"{phase}_seconds"]
            assert s["relative_spread"][name][phase] == pytest.approx(spread)
    assert isinstance(s["reliable"], bool) and (s["unreliable_reason"] is None) == s["reliable"]


# --------------------------------------------------------------------------- speed reliability, on fake timings


def _fake_model(layers: int | None) -> torch.nn.Module:
    model = torch.nn.Linear(1, 1)
    model.config = SimpleNamespace(num_hidden_layers=layers)
    return model


def _times(teacher: dict[str, list[float]], student: dict[str, list[float]]) -> dict:
    return {"teacher": teacher, "student": student}


STEADY = {"prefill": [1.0, 1.02, 0.98], "decode": [2.0, 2.04, 1.96]}


def test_speed_reliability_rule_on_fake_timings():
    """24 → 18 layers: B = 24/18 × 1.15 = 1.53; a speedup outside [1/B, B] or a spread over 0.5 is not believed."""
    settings, layers = SpeedSettings(), {"teacher": 24, "student": 18}
    assert relative_spread([1.0, 1.2, 0.9]) == pytest.approx(0.3)
    assert relative_spread([-0.1, 0.05, -0.2]) is None  # decode times are differences: a busy machine can invert them

    def problems(student: dict[str, list[float]], teacher=STEADY, known=layers) -> list[str]:
        return speed_problems(_times(teacher, student), known, settings)

    assert problems({"prefill": [0.8, 0.8, 0.8], "decode": [1.6, 1.6, 1.6]}) == []  # 1.25×: plausible
    assert problems({"prefill": [0.66, 0.66, 0.66], "decode": [2.0, 2.0, 2.0]}) == []  # 1.52×: inside the margin
    (beyond,) = problems({"prefill": [1 / 11.7] * 3, "decode": [1.6] * 3})
    assert "student prefill speedup 11.70× is outside the physical bound [0.65, 1.53]× of 24 → 18 layers" in beyond
    (slower,) = problems({"prefill": [0.8] * 3, "decode": [2 / 0.42] * 3})
    assert "student decode speedup 0.42×" in slower
    assert problems({"prefill": [0.8] * 3, "decode": [2 / 0.42] * 3}, known={"teacher": 24, "student": None}) == []
    noisy_teacher = {**STEADY, "prefill": [1.0, 1.0, 1.6]}
    (noisy,) = problems({"prefill": [0.8, 0.8, 0.8], "decode": [1.6, 1.6, 1.6]}, teacher=noisy_teacher)
    assert noisy == "teacher prefill relative spread 0.60 of 3 repeats exceeds 0.5"
    bound, spread = problems({"prefill": [0.8] * 3, "decode": [-0.1, 0.05, -0.2]})  # a negative speedup, too
    assert "student decode speedup -20.00×" in bound
    assert spread == "student decode relative spread undefined (median time not positive) of 3 repeats exceeds 0.5"


class _Timing:
    """A fake timing function: hands out prepared measurements in turn and records the repeats asked for."""

    def __init__(self, *measurements: dict):
        self.measurements, self.repeats = list(measurements), []

    def __call__(self, models, settings, pad_token_id):
        self.repeats.append(settings.repeats)
        return self.measurements.pop(0)


IMPOSSIBLE = _times(STEADY, {"prefill": [1 / 11.7] * 3, "decode": [2 / 0.42] * 3})
PLAUSIBLE = _times(STEADY, {"prefill": [0.8, 0.79, 0.81], "decode": [1.6, 1.58, 1.62]})


def test_measure_speed_remeasures_then_marks_unreliable():
    models = {"teacher": _fake_model(24), "student": _fake_model(18)}
    timing = _Timing(IMPOSSIBLE, IMPOSSIBLE)
    s = measure_speed(models, SpeedSettings(repeats=3), pad_token_id=0, timing=timing)
    assert timing.repeats == [3, 6]  # once more, with twice the repeats
    assert s["remeasured"] and s["reliable"] is False and s["repeats"] == 6
    assert s["speedup"]["student"]["prefill"] == pytest.approx(11.7)
    assert "prefill speedup 11.70×" in s["unreliable_reason"] and "decode speedup 0.42×" in s["unreliable_reason"]
    assert s["relative_spread"]["teacher"]["prefill"] == pytest.approx(0.04)


def test_measure_speed_believes_a_plausible_second_measurement():
    models = {"teacher": _fake_model(24), "student": _fake_model(18)}
    timing = _Timing(IMPOSSIBLE, PLAUSIBLE)
    s = measure_speed(models, SpeedSettings(repeats=3), pad_token_id=0, timing=timing)
    assert timing.repeats == [3, 6] and s["remeasured"] and s["reliable"] is True and s["unreliable_reason"] is None
    assert s["speedup"]["student"]["prefill"] == pytest.approx(1.0 / 0.8)  # the second measurement's numbers
    timing = _Timing(PLAUSIBLE)
    s = measure_speed(models, SpeedSettings(repeats=3), pad_token_id=0, timing=timing)
    assert timing.repeats == [3] and not s["remeasured"] and s["reliable"] and s["repeats"] == 3


def test_speed_reliability_reaches_the_registry_metrics_and_the_summary():
    models = {"teacher": _fake_model(24), "student": _fake_model(18)}
    speed = measure_speed(models, SpeedSettings(repeats=3), 0, timing=_Timing(IMPOSSIBLE, IMPOSSIBLE))
    layers = {"path": "m", "layers": 24, "parameters": {"total": 10}, "loss": 1.0, "perplexity": math.e}
    metrics = {
        "models": {"teacher": layers, "pruned": None, "student": {**layers, "layers": 18}},
        "comparisons": {"pruned": None, "student": {"perplexity_ratio": 1.0, "gap_closed": None}},
        "speed": speed,
        "lm_eval": {},
        "data": {"uri": "d", "sequences": 1, "seq_len": 2, "scored_tokens": 1},
        "config": {},
    }
    flat = flat_metrics(metrics)
    assert flat["speedup.reliable"] == 0.0 and flat["teacher.prefill_relative_spread"] == pytest.approx(0.04)
    assert speed_tags(metrics) == {"e3prune.speed.unreliable_reason": speed["unreliable_reason"]}
    summary = summary_markdown(metrics)
    assert "(after measuring a second time)" in summary
    assert f"**Speed unreliable** (the promotion gate refuses it): {speed['unreliable_reason']}." in summary
    # A metrics.json written before reliability was recorded: no flag, no tag.
    old = {**metrics, "speed": {k: v for k, v in speed.items() if k not in ("reliable", "unreliable_reason")}}
    assert "speedup.reliable" not in flat_metrics(old) and speed_tags(old) == {}
    speed.update(reliable=True, unreliable_reason=None)
    assert flat_metrics(metrics)["speedup.reliable"] == 1.0 and speed_tags(metrics) == {}


# --------------------------------------------------------------------------- the step on tiny models


def test_evaluate_cli_schema_hand_perplexity_and_summary(
    tiny_teacher, tiny_pruned, tiny_student, tiny_data, tmp_path, capsys
):
    out = tmp_path / "eval"
    args = ["evaluate", "--teacher", str(tiny_teacher), "--pruned", str(tiny_pruned), "--student", str(tiny_student)]
    args += ["--data", str(tiny_data), "--output", str(out), "--batch-size", "2"]
    for name, value in TINY_SPEED.items():
        args += ["--" + name.replace("_", "-"), str(value)]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "| model | layers |" in printed and f"wrote {out}" in printed

    m = json.loads((out / "metrics.json").read_text())
    assert set(m) == TOP_KEYS and m["format_version"] == 1
    assert set(m["models"]) == {"teacher", "pruned", "student"}
    assert all(set(m["models"][r]) == MODEL_KEYS for r in m["models"])
    assert set(m["comparisons"]) == {"pruned", "student"}
    assert all(set(m["comparisons"][r]) == COMPARISON_KEYS for r in m["comparisons"])
    assert m["lm_eval"] == {}
    assert m["config"]["student"] == str(tiny_student) and m["config"]["batch_size"] == 2

    # Layers and parameters come from the checkpoints.
    assert [m["models"][r]["layers"] for r in ("teacher", "pruned", "student")] == [6, 4, 4]
    params = {r: m["models"][r]["parameters"]["total"] for r in m["models"]}
    assert params["pruned"] == params["student"] < params["teacher"]

    # Perplexity: a hand computation over every next-token position of the eval split.
    ids = load_split(str(tiny_data), "eval")
    assert m["data"]["sequences"] == EVAL_SEQUENCES == ids.size(0)
    assert m["data"]["scored_tokens"] == EVAL_SEQUENCES * (SEQ - 1)
    for role, path in (("teacher", tiny_teacher), ("pruned", tiny_pruned), ("student", tiny_student)):
        assert m["models"][role]["perplexity"] == pytest.approx(_hand_perplexity(path, ids), rel=1e-5)
        assert m["models"][role]["loss"] == pytest.approx(math.log(m["models"][role]["perplexity"]), rel=1e-9)

    # Agreement and KL against the teacher, written out with torch's own KL.
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    student = AutoModelForCausalLM.from_pretrained(tiny_student).eval()
    with torch.no_grad():
        lt, ls = teacher(input_ids=ids).logits.double(), student(input_ids=ids).logits.double()
    kl = (
        torch.nn.functional.kl_div(
            torch.log_softmax(ls, -1), torch.log_softmax(lt, -1), log_target=True, reduction="sum"
        ).item()
        / ids.numel()
    )
    c = m["comparisons"]["student"]
    assert c["kl"] == pytest.approx(kl, rel=1e-4) and c["kl"] > 0.01
    assert c["top1_agreement"] == pytest.approx((lt.argmax(-1) == ls.argmax(-1)).double().mean().item())
    assert 0.0 < c["top1_agreement"] < 1.0

    # Ratios and the share of the gap closed, from the perplexities.
    ppl = {r: m["models"][r]["perplexity"] for r in m["models"]}
    assert c["perplexity_ratio"] == pytest.approx(ppl["student"] / ppl["teacher"])
    expected = (ppl["pruned"] - ppl["student"]) / (ppl["pruned"] - ppl["teacher"])
    assert c["gap_closed"] == pytest.approx(expected)
    assert m["comparisons"]["pruned"]["gap_closed"] == 0.0

    # Speed: teacher and student, interleaved; the pruned model is not timed when a student is.
    s = m["speed"]
    assert {"relative_spread", "remeasured", "reliable", "unreliable_reason"} <= set(s)  # added to format 1
    assert set(s["models"]) == {"teacher", "student"} and set(s["speedup"]) == {"student"}
    for role in s["models"]:
        assert set(s["models"][role]) == SPEED_MODEL_KEYS
        assert s["models"][role]["prefill_tokens_per_second"] > 0 and s["models"][role]["decode_tokens_per_second"] > 0
    assert s["speedup"]["student"]["prefill"] == pytest.approx(
        s["models"]["teacher"]["prefill_seconds"] / s["models"]["student"]["prefill_seconds"]
    )

    summary = (out / "summary.md").read_text()
    table = [line for line in summary.splitlines() if line.startswith("|")]
    assert table[0].startswith("| model | layers | parameters | held-out ppl | ppl ratio | top-1 agreement | KL")
    assert [row.split("|")[1].strip() for row in table[2:]] == ["teacher", "pruned", "student"]
    assert f"{ppl['student']:.3f}" in table[4]
    assert f"closes {100 * expected:.1f} % of the pruned-vs-teacher perplexity gap" in summary
    assert printed.startswith(summary)


def test_teacher_against_itself_agrees_fully(tiny_teacher, tiny_data, tmp_path):
    out = tmp_path / "eval"
    m = evaluate(_cfg(tiny_teacher, tiny_data, out, pruned=str(tiny_teacher), speed=False, batch_size=3))
    c = m["comparisons"]["pruned"]
    assert c["top1_agreement"] == 1.0
    assert abs(c["kl"]) < 1e-6
    assert c["perplexity_ratio"] == pytest.approx(1.0)
    assert c["gap_closed"] is None  # no gap: nothing to close
    assert m["models"]["student"] is None and m["comparisons"]["student"] is None and m["speed"] is None
    assert m["models"]["pruned"]["perplexity"] == m["models"]["teacher"]["perplexity"]
    summary = (out / "summary.md").read_text()
    assert "No student was given" in summary
    assert json.loads((out / "metrics.json").read_text()) == m


def test_eval_sequences_caps_the_split(tiny_teacher, tiny_student, tiny_data, tmp_path):
    m = evaluate(
        _cfg(tiny_teacher, tiny_data, tmp_path / "eval", student=str(tiny_student), speed=False, eval_sequences=2)
    )
    assert m["data"]["sequences"] == 2 and m["data"]["split_sequences"] == EVAL_SEQUENCES
    ids = load_split(str(tiny_data), "eval")[:2]
    assert m["models"]["student"]["perplexity"] == pytest.approx(_hand_perplexity(tiny_student, ids), rel=1e-5)
    assert m["comparisons"]["student"]["gap_closed"] is None  # no pruned model given


# --------------------------------------------------------------------------- lm-evaluation-harness, for real


@pytest.fixture(scope="module")
def reference_data(reference_dir, tmp_path_factory):
    return _sample(reference_dir, tmp_path_factory.mktemp("refdata") / "sample", 2, seq_len=64)


def test_lm_eval_shipped_task_on_reference_model(reference_dir, reference_data, tmp_path):
    """The reference model, given as teacher and as 'pruned', through the whole step with lm-eval."""
    out = tmp_path / "eval"
    cfg = _cfg(
        reference_dir,
        reference_data,
        out,
        pruned=str(reference_dir),
        speed=False,
        lm_eval_tasks=["python_stdlib_cloze"],
        lm_eval_limit=20,
        batch_size=16,
    )
    m = evaluate(cfg)
    scores = m["lm_eval"]["python_stdlib_cloze"]
    assert set(scores) == {"teacher", "pruned"}
    for role in scores:
        assert set(scores[role]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "samples"}
        assert isinstance(scores[role]["acc"], float) and 0.0 <= scores[role]["acc"] <= 1.0
        assert isinstance(scores[role]["acc_norm"], float) and 0.0 <= scores[role]["acc_norm"] <= 1.0
        assert scores[role]["samples"] == 20
    assert scores["pruned"] == scores["teacher"]  # one model, loaded once, scored twice alike
    summary = (out / "summary.md").read_text()
    assert (
        "python_stdlib_cloze acc" in summary and "python_stdlib_cloze on 20 items (limited to 20 per task)" in summary
    )


def test_reference_model_beats_chance_on_the_full_shipped_task(reference_dir):
    """All 100 items: 4 choices, so chance is 0.25 (stderr ~0.043 at p = 0.25, n = 100)."""
    model = AutoModelForCausalLM.from_pretrained(reference_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(reference_dir)
    manager = check_lm_eval_tasks(["python_stdlib_cloze"])
    scores = run_lm_eval({"teacher": model}, tokenizer, ["python_stdlib_cloze"], manager, None, 16)
    acc = scores["python_stdlib_cloze"]["teacher"]
    assert acc["samples"] == 100
    assert acc["acc"] >= 0.45 and acc["acc_norm"] >= 0.45, acc  # measured 0.55 / 0.55


def test_shipped_task_data_is_up_to_date_and_fits_the_reference_model(reference_dir):
    assert SHIPPED_TASKS == ("python_stdlib_cloze",) and (TASK_DIR / "python_stdlib_cloze.yaml").is_file()
    items = build_items(read_corpus(builtin_corpus()))
    assert render(items) == CLOZE_DATA.read_text(encoding="utf-8"), "run python -m e3prune.lm_eval_tasks.build"
    tokenizer = AutoTokenizer.from_pretrained(reference_dir)
    longest = max(len(tokenizer(i["context"] + c)["input_ids"]) for i in items for c in i["choices"])
    assert longest <= 512  # no item is truncated by the reference model's 512 positions
    for item in items:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        answer = item["choices"][item["label"]]
        indent = answer[: len(answer) - len(answer.lstrip())]
        assert all(c[: len(c) - len(c.lstrip())] == indent for c in item["choices"])  # no whitespace cue


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def other_tokenizer_student(tiny_student, tmp_path_factory):
    """The student saved with a tokenizer that has one more token: other ids for the same text."""
    d = tmp_path_factory.mktemp("other") / "model"
    shutil.copytree(tiny_student, d)
    tok = AutoTokenizer.from_pretrained(tiny_student)
    tok.add_tokens(["<|not-in-the-teacher|>"])
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def no_eval_data(tiny_teacher, tmp_path_factory):
    return _sample(tiny_teacher, tmp_path_factory.mktemp("noeval") / "sample", 0)


def test_bad_input_fails_before_loading_weights(
    tiny_teacher, tiny_pruned, tiny_student, tiny_data, no_eval_data, other_tokenizer_student, tmp_path, monkeypatch
):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the input was checked")

    monkeypatch.setattr(evaluate_module, "load_placed", no_weights)
    out = tmp_path / "eval"
    cases = [
        ({"student": str(other_tokenizer_student)}, tiny_data, "student"),
        ({"student": str(tiny_student)}, no_eval_data, "data"),
        ({"pruned": str(tmp_path / "missing")}, tiny_data, "pruned"),
        ({"student": str(tiny_student), "prefill_len": 65}, tiny_data, "prefill_len"),
    ]
    for settings, data, field in cases:
        with pytest.raises(E3PruneError) as err:
            evaluate(_cfg(tiny_teacher, data, out, **settings))
        assert err.value.field == field, (settings, str(err.value))
        assert not out.exists()
    # An unknown task is named, with what is shipped and the closest match.
    with pytest.raises(E3PruneError, match=r"'python_stdlib_clozee'.*Shipped with e3prune: python_stdlib_cloze") as err:
        evaluate(
            _cfg(
                tiny_teacher,
                tiny_data,
                out,
                pruned=str(tiny_pruned),
                speed=False,
                lm_eval_tasks=["python_stdlib_clozee"],
            )
        )
    assert err.value.field == "lm_eval_tasks" and "did you mean python_stdlib_cloze" in str(err.value)
    assert not out.exists()

    with pytest.raises(E3PruneError, match="give pruned") as err:
        _cfg(tiny_teacher, tiny_data, out)
    assert err.value.field == "student"
    assert cli_main(["evaluate", "--data", str(tiny_data), "--output", str(out)]) == 2
    assert not out.exists()
