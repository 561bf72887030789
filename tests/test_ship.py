"""The ship verdict (issue 27.1): a student that prints newlines, loops, or says far less than its teacher is
never called shippable, whatever the pipeline gates say; verify recomputes the verdict from the evidence."""

from __future__ import annotations

import json
import math

import pytest

from kd.config import EvalConfig, ShipConfig, load_config
from kd.errors import ConfigError
from kd.evaluate.ship import (
    DIVERSITY_ID, FLUENCY_ID, HELDOUT_ID, ON_SAMPLE_ID, REFERENCE_ID, OUTPUT_ID, REPETITION_ID, RETENTION_ID, distinct, is_blank, repetition, ship_verdict,
)
from tests.test_manifest import inputs  # noqa: F401  (the evidence fixture)
from kd.results import (
    BenchmarkReport, BenchmarkScore, EvalReport, ModelEval, OnSampleReport, ReferenceRetention, SampleEval,
    SampleGeneration,
)

TEACHER = ["The capital of France is Paris.", "The sea is wide and deep, and the waves roll in.",
           "Once upon a time there lived a king who had three daughters."]


def _ev(loss: float) -> ModelEval:  # teacher 1.0, student-before 3.0, student-after 1.05 below: retention 0.95
    return ModelEval(loss=loss, perplexity=math.exp(loss), kl_to_teacher=0.5, top1_agreement=0.5, entropy=2.0,
                     top_token_share=0.1, tokens=100)


def _report(student: list[str], teacher: list[str] = TEACHER, student_bits_per_byte: float = 0.7,
            **extra) -> EvalReport:
    """Completions, each scored by the teacher: 0.5 bits per byte on its own, `student_bits_per_byte` on the student's."""
    samples = [SampleGeneration(prompt=f"p{i}", chat_template=True, max_new_tokens=24,
                                completions={"teacher": t, "student_before": "x", "student_after": s},
                                teacher_bits={"teacher": 0.5 * len(t.encode()),
                                              "student_after": student_bits_per_byte * len(s.encode())})
               for i, (t, s) in enumerate(zip(teacher, student))]
    extra.setdefault("reference", _reference(0.95))
    return EvalReport(teacher=_ev(1.0), student_before=_ev(3.0), student_after=_ev(1.05), vocab_size=360,
                      samples=samples, **extra)


def _reference(retention: float) -> ReferenceRetention:
    return ReferenceRetention(documents=40, bytes=4000, teacher_bits_per_byte=1.6,
                              student_bits_per_byte=1.6 / retention, retention=retention)


def _failed(report: EvalReport, cfg: ShipConfig = ShipConfig()) -> set[str]:
    v = ship_verdict(report, cfg)
    assert (v.verdict == "ship") == (not v.reasons)
    return {c.id for c in v.checks if c.verdict != "pass"}


def test_the_measures():
    assert is_blank("") and is_blank("\n\n\n\n") and is_blank(" .\n!") and not is_blank("\n\nParis")
    assert repetition("the cat sat on the mat", 3) == 0.0
    assert repetition("of the capital of the capital of the capital of the", 3) > 0.6
    assert distinct(["a b c d"]) == 1.0 and distinct(["a b a b a b"]) == pytest.approx(2 / 5)
    assert math.isnan(distinct(["", "one"]))  # no bigram at all: unmeasurable, not perfect


def test_a_student_that_answers_like_the_teacher_ships():
    student = ["Paris is the capital of France.", "The sea is blue and full of fish.",
               "Once upon a time a young fox lived in the woods."]
    assert _failed(_report(student)) == set() and ship_verdict(_report(student), ShipConfig()).verdict == "ship"


def test_newlines_and_empty_answers_never_ship():
    """The student of issue 27: twelve newlines, or nothing at all."""
    v = ship_verdict(_report(["\n" * 12, "", "\n" * 12]), ShipConfig())
    assert v.verdict == "dont_ship"
    assert {OUTPUT_ID, DIVERSITY_ID} <= {c.id for c in v.checks if c.verdict == "fail"}  # no words: no loop either
    assert any("3 of 3 completions blank" in r for r in v.reasons)
    # one blank answer among good ones is enough
    assert OUTPUT_ID in _failed(_report(["Paris is the capital of France.", "\n\n", "A king had three daughters."]))


def test_a_blank_teacher_answer_sets_the_bar():
    """Where the teacher itself says nothing, the student saying nothing is not held against it."""
    teacher = ["The capital of France is Paris.", "\n", "Once upon a time there lived a king."]
    student = ["Paris is the capital of France.", "", "Once upon a time a fox lived in the woods."]
    assert OUTPUT_ID not in _failed(_report(student, teacher))


def test_a_loop_is_caught_unless_the_teacher_loops_as_much():
    loop = "the capital of the capital of the capital of the capital of the capital of"
    assert REPETITION_ID in _failed(_report([loop, loop, "Once upon a time a fox lived."]))
    assert REPETITION_ID not in _failed(_report([loop, loop, "Once upon a time a fox lived."], teacher=[loop, loop, loop]))


def test_the_generation_checks_name_the_decoding_they_judged():
    """A preset that deploys with a repetition penalty is judged under it, and every generation check says so."""
    report = _report(TEACHER)
    penalised = report.model_copy(update={"samples": [s.model_copy(update={"repetition_penalty": 1.2})
                                                      for s in report.samples]})
    claims = {c.id: c.claim for c in ship_verdict(penalised, ShipConfig()).checks}
    assert "(greedy, repetition penalty 1.2)" in claims[REPETITION_ID]
    assert "(greedy, repetition penalty 1.2)" in claims[OUTPUT_ID]
    plain = {c.id: c.claim for c in ship_verdict(report, ShipConfig()).checks}
    assert "(greedy)" in plain[REPETITION_ID] and "penalty" not in plain[REPETITION_ID]


def test_one_looping_answer_among_good_ones_is_caught_where_the_mean_would_hide_it():
    """The recipe's 60-step student answered "What is a verb?" with "A verb is a noun. A verb is a noun. ..."
    (seq-rep-3 0.65) while its mean over 8 completions was 0.29: a loop a user gets, on one prompt."""
    loop = "A verb is a verb. It is a verb. A verb is a noun. A verb is a noun. A verb is a noun. A verb is a noun."
    good = ["Paris is the capital of France.", "The sea is blue and full of fish.", "Once a fox lived in the woods.",
            "Sleep at the same time every night, and keep the room dark and cool."]
    assert sum(repetition(t, 3) for t in [loop, *good]) / 5 < 0.5 < repetition(loop, 3)
    teacher = [f"A fine answer number {i} about something else entirely." for i in range(5)]
    check = next(c for c in ship_verdict(_report([loop, *good], teacher=teacher), ShipConfig()).checks
                 if c.id == REPETITION_ID)
    assert check.verdict == "fail" and "1 of 5 completions loop" in check.observed, check.observed
    assert REPETITION_ID not in _failed(_report([loop, *good], teacher=[loop, *teacher[1:]]))  # the teacher loops too


def test_word_salad_the_teacher_finds_implausible_fails_though_it_neither_loops_nor_repeats():
    """The issue's 10-layer student under the recipe's repetition penalty 1.1: no loop (worst seq-rep-3 0.09),
    distinct-2 0.56 vs the teacher's 0.96, and the teacher reads its answers at 2.02 bits per byte against 0.456 on
    its own (bench/results/degenerate_student-2026-12-05.md)."""
    salad = ["and I. And he said to his brother; and they that thy thee, and thou, and she was not unto",
             "and I of his wife; And he is that the LORD, and thou unto him in the Lord, and God to",
             "unto him in his brother; I is he to me, and thou, and God said thee? and they shall not"]
    report = _report(salad, student_bits_per_byte=2.02)
    assert _failed(report) == {FLUENCY_ID}  # only the teacher's surprise catches it
    check = next(c for c in ship_verdict(report, ShipConfig()).checks if c.id == FLUENCY_ID)
    assert "on the student's 2.02, on its own 0.5, limit 1" in check.observed, check.observed
    assert FLUENCY_ID not in _failed(_report(salad, student_bits_per_byte=0.99))  # just under 2 x 0.5
    assert FLUENCY_ID in _failed(_report(salad, student_bits_per_byte=1.01))
    assert FLUENCY_ID not in _failed(report, ShipConfig(max_teacher_bits_ratio=5.0))


def test_completions_the_teacher_did_not_score_are_not_called_fluent():
    report = _report(TEACHER)
    unscored = report.model_copy(update={"samples": [s.model_copy(update={"teacher_bits": {}}) for s in report.samples]})
    check = next(c for c in ship_verdict(unscored, ShipConfig()).checks if c.id == FLUENCY_ID)
    assert check.verdict == "fail" and "not measured" in check.observed


def test_far_fewer_distinct_phrases_than_the_teacher_fails():
    same = "Paris is nice."
    assert DIVERSITY_ID in _failed(_report([same, same, same]))


def test_a_student_far_from_the_teacher_on_heldout_text_does_not_ship():
    """Fluent-looking output is not enough: the student must keep most of the teacher on held-out text."""
    good = ["Paris is the capital of France.", "The sea is blue and full of fish.", "Once a fox lived in the woods."]
    weak = _report(good).model_copy(update={"student_after": _ev(1.6)})
    v = ship_verdict(weak, ShipConfig())
    assert _failed(weak) == {HELDOUT_ID} and "retention 0.625" in v.reasons[0]
    assert _failed(weak, ShipConfig(min_heldout_retention=0.6)) == set()
    nan = _report(good).model_copy(update={"student_after": _ev(float("nan"))})
    assert HELDOUT_ID in _failed(nan)


def test_heldout_retention_null_drops_that_check_but_never_the_out_of_domain_one():
    """A preset whose held-out split the teacher wrote (sequence-level KD data) sets min_heldout_retention: null;
    the held-out check is then not among the checks, and out-of-domain retention still decides."""
    good = ["Paris is the capital of France.", "The sea is blue and full of fish.", "Once a fox lived in the woods."]
    weak = _report(good).model_copy(update={"student_after": _ev(1.6)})
    cfg = ShipConfig(min_heldout_retention=None)
    v = ship_verdict(weak, cfg)
    assert v.verdict == "ship" and HELDOUT_ID not in {c.id for c in v.checks} and REFERENCE_ID in {c.id for c in v.checks}
    assert _failed(weak.model_copy(update={"reference": _reference(0.85)}), cfg) == {REFERENCE_ID}
    assert ship_verdict(weak.model_copy(update={"reference": None}), cfg).verdict == "dont_ship"


def test_out_of_domain_retention_decides_and_no_reference_text_is_not_shippable():
    """The 24-layer SmolLM2 student of bench/results/ship_table: 0.94 in domain, fluent-ish, 0.85 on text it never
    saw: not shippable. Without a reference text nothing shows what it kept out of domain: not shippable either."""
    good = ["Paris is the capital of France.", "The sea is blue and full of fish.", "Once a fox lived in the woods."]
    assert _failed(_report(good, reference=_reference(0.8518))) == {REFERENCE_ID}
    v = ship_verdict(_report(good, reference=None), ShipConfig())
    assert v.verdict == "dont_ship" and "eval.reference_text is null" in v.reasons[0]
    assert _failed(_report(good, reference=_reference(0.85)), ShipConfig(min_reference_retention=0.8)) == set()


def test_no_samples_means_not_shippable():
    report = _report([]).model_copy(update={"samples": []})
    v = ship_verdict(report, ShipConfig())
    assert v.verdict == "dont_ship" and "no completions generated" in v.reasons[0]


def _bench(retention: float) -> BenchmarkReport:
    score = BenchmarkScore(task="kdflow_bpb", metric="bits_per_byte", higher_is_better=False,
                           values={"teacher": 1.0, "student_before": 3.0, "student_after": 1.0 / retention},
                           stderr={}, retention=retention)
    return BenchmarkReport(lm_eval_version="0.4.13", tasks=[], scores=[score], wall_s={}, max_length=256)


def test_retention_and_on_sample_thresholds_a_preset_sets():
    good = ["Paris is the capital of France.", "The sea is blue and full of fish.", "Once a fox lived in the woods."]
    cfg = ShipConfig(min_retention={"kdflow_bpb/bits_per_byte": 0.9}, max_on_sample_reverse_kl=0.5)
    on = lambda kl: OnSampleReport(  # noqa: E731
        prompts=4, max_new_tokens=8, temperature=1.0, top_p=1.0, seed=0, before=SampleEval(reverse_kl=2.0, teacher_nll=3.0, tokens=20, samples=4, stopped=1),
        after=SampleEval(reverse_kl=kl, teacher_nll=2.0, tokens=20, samples=4, stopped=1))
    assert _failed(_report(good, benchmarks=_bench(0.93), on_samples=on(0.3)), cfg) == set()
    assert _failed(_report(good, benchmarks=_bench(0.85), on_samples=on(0.3)), cfg) == {RETENTION_ID}
    assert _failed(_report(good, benchmarks=_bench(0.93), on_samples=on(0.8)), cfg) == {ON_SAMPLE_ID}
    assert _failed(_report(good, on_samples=on(float("nan"))), cfg) == {RETENTION_ID, ON_SAMPLE_ID}  # unmeasured, NaN


def test_a_threshold_on_something_never_measured_is_refused():
    with pytest.raises(ConfigError, match="ship.min_retention: 'kdflow_bpb/bits_per_byte'"):
        load_config("configs/smoke.yaml", ["eval.ship.min_retention={kdflow_bpb/bits_per_byte: 0.9}"])
    with pytest.raises(ConfigError, match="ship.max_on_sample_reverse_kl needs eval.on_sample_prompts"):
        load_config("configs/smoke.yaml", ["eval.ship.max_on_sample_reverse_kl=0.5"])
    assert EvalConfig().ship == ShipConfig()


def test_verify_refutes_a_forged_ship_verdict_and_show_says_dont_ship(inputs, tmp_path, capsys):
    """Evidence whose student printed newlines, edited to say `ship`: verify names eval.ship, show says DON'T SHIP."""
    from flows.cli import main
    from kd.evidence.manifest import write_evidence
    from kd.evidence.verify import verify_run_dir

    report = _report(["\n" * 12, "", "\n" * 12])
    report = report.model_copy(update={"gates": inputs["eval_report"].gates,
                                       "ship": ship_verdict(report, ShipConfig())})
    run = tmp_path / "evidence" / "r1"
    write_evidence(run, **{**inputs, "eval_report": report})
    assert verify_run_dir(run) == []
    raw = json.loads((run / "manifest.json").read_text())
    assert raw["eval"]["ship"]["verdict"] == "dont_ship"
    raw["eval"]["ship"]["verdict"] = "ship"
    for c in raw["eval"]["ship"]["checks"]:
        c["verdict"] = "pass"
    (run / "manifest.json").write_text(json.dumps(raw))
    ev = json.loads((run / "eval.json").read_text())
    ev["ship"] = raw["eval"]["ship"]
    (run / "eval.json").write_text(json.dumps(ev))
    problems = verify_run_dir(run)
    assert any(p.startswith("eval.ship: manifest says ship, the recorded samples and numbers say dont_ship")
               and "checks that differ: F-SHIP-OUTPUT-001 pass -> fail" in p for p in problems), problems
    main(["evidence", "show", str(run)])
    out = capsys.readouterr().out
    assert "ship verdict: DON'T SHIP: F-SHIP-OUTPUT-001" in out and "(the manifest claims ship)" in out


def test_diversity_without_the_teachers_completions_is_not_measured_and_fails():
    """A cross-tokenizer run generates no teacher completions: the diversity check has no bar and must fail
    (fail-closed), not pass against a limit of 0."""
    good = ["Paris is the capital of France.", "The sea is blue and full of fish.", "Once a fox lived in the woods."]
    report = _report(good)
    for s in report.samples:
        del s.completions["teacher"]
    assert DIVERSITY_ID in _failed(report)


def test_the_recipe_preset_keeps_its_gates_and_a_student_a_fifth_smaller_than_its_teacher():
    """configs/smollm2-135m-recipe.yaml (docs/recipe.md) is judged on text it never trained on, against its control,
    with the 0.9 retention bar; and its student stays at most 80 % of the teacher's parameters (issue 27: a recipe,
    not a few layers trimmed until a number passes)."""
    from kd.gguf import inspect_gguf, packaged_smollm2
    from kd.prune import pruned_size_info
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs/smollm2-135m-recipe.yaml")
    assert cfg.eval.control and cfg.kd.alpha == 0
    assert cfg.eval.reference_text == "bundled:bierce" and "bierce" not in cfg.data.source
    assert cfg.eval.ship.min_reference_retention >= 0.9
    teacher = inspect_gguf(packaged_smollm2())
    student = pruned_size_info(teacher, cfg.student.init.from_teacher)
    assert student["params"] / teacher["params"] <= 0.80, (student["params"], teacher["params"])
