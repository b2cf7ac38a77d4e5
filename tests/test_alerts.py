"""Alert rules and the alert manager, on synthetic histories built by hand."""

from __future__ import annotations

import json
import math

import pytest

from lightning_hessian import tags
from lightning_hessian.alerts import (
    SEVERITIES,
    Alert,
    AlertManager,
    AlertRule,
    BoundViolation,
    CallableRule,
    CurvatureSpike,
    HeterogeneityJump,
    NegativeCurvature,
    NonFinite,
    PassRecord,
    ProgressiveSharpening,
    StabilityThreshold,
    ThresholdRule,
    default_rules,
)

Q_TOP = tags.block_tag("layers.0.attn.q", "top_eigenvalue")
K_TOP = tags.block_tag("layers.0.attn.k", "top_eigenvalue")
MODEL_TOP = tags.block_tag("model", "top_eigenvalue")


def history(*passes: dict[str, float], every: int = 100) -> list[PassRecord]:
    """Passes at steps 0, every, 2 every, ..."""
    return [PassRecord(i * every, scalars) for i, scalars in enumerate(passes)]


def series(tag: str, values: list[float | None], every: int = 100) -> list[PassRecord]:
    """One tag over passes; ``None`` leaves the tag out of that pass."""
    return history(*({} if v is None else {tag: v} for v in values), every=every)


# --------------------------------------------------------------------------------------- StabilityThreshold


@pytest.mark.parametrize(
    ("ratio", "severity"),
    [
        (0.5, None),
        (0.8999, None),
        (0.9, "warning"),
        (0.99, "warning"),
        (1.0, "critical"),
        (1.7, "critical"),
        (math.nan, None),
    ],
)
def test_stability_threshold_levels(ratio, severity):
    alerts = StabilityThreshold().check(history({tags.SHARPNESS_RATIO: ratio}))
    assert [a.severity for a in alerts] == ([] if severity is None else [severity])
    if alerts:
        assert (alerts[0].tag, alerts[0].value) == (tags.SHARPNESS_RATIO, ratio)
        assert alerts[0].rule == "stability_threshold"


def test_stability_threshold_message_and_both_ratios():
    scalars = {
        tags.SHARPNESS: 2100.0,
        tags.THRESHOLD: 2000.0,
        tags.SHARPNESS_RATIO: 1.05,
        tags.PRECONDITIONED_RATIO: 0.95,
        tags.PRECONDITIONED_THRESHOLD: 380.0,
    }
    crossed, approaching = StabilityThreshold().check(history(scalars))
    assert crossed.severity == "critical" and approaching.severity == "warning"
    assert "2100" in crossed.message and "2000" in crossed.message and "1.05" in crossed.message
    assert approaching.tag == tags.PRECONDITIONED_RATIO
    assert "361" in approaching.message and "380" in approaching.message  # λ_max = ratio x threshold


def test_stability_threshold_options_and_missing_tags():
    # no ratio tag: nothing to check
    assert StabilityThreshold().check(history({tags.SHARPNESS: 1e6, tags.THRESHOLD: 1.0})) == []
    assert StabilityThreshold(approach=1.0).check(history({tags.SHARPNESS_RATIO: 0.99})) == []
    (alert,) = StabilityThreshold(severity="warning").check(history({tags.SHARPNESS_RATIO: 0.95}))
    assert alert.severity == "info"  # the approach warning is one level below the rule's severity


# ------------------------------------------------------------------------------------ ProgressiveSharpening


def geometric(total: float, n: int = 5, start: float = 10.0) -> list[float]:
    return [start * total ** (i / (n - 1)) for i in range(n)]


def test_progressive_sharpening_threshold():
    rule = ProgressiveSharpening()
    (alert,) = rule.check(series(tags.SHARPNESS, geometric(1.26)))
    assert alert.severity == "warning" and alert.tag == tags.SHARPNESS and alert.value == pytest.approx(12.6)
    assert "26%" in alert.message
    assert rule.check(series(tags.SHARPNESS, geometric(1.24))) == []
    assert rule.check(series(tags.SHARPNESS, geometric(1.5)[::-1])) == []  # falling
    assert rule.check(series(tags.SHARPNESS, geometric(2.0, n=4))) == []  # fewer than window passes
    assert rule.check(series(tags.SHARPNESS, [*geometric(2.0), None])) == []  # the new pass lacks it
    assert rule.check(series(tags.SHARPNESS, [0.0, *geometric(2.0, n=4)])) == []  # non-positive value


def test_progressive_sharpening_is_a_robust_trend():
    rule = ProgressiveSharpening()
    assert rule.check(series(tags.SHARPNESS, [10, 12, 11.5, 13, 14]))  # one dip: still a rising trend
    assert rule.check(series(tags.SHARPNESS, [10, 10, 10, 10, 13])) == []  # one jump at the end: no trend
    # passes without the tag are skipped; only the last `window` values count
    assert rule.check(series(tags.SHARPNESS, [100, 10, None, 11, None, 12, 13, 14]))
    assert ProgressiveSharpening(window=3, min_increase=0.5).check(series(tags.SHARPNESS, [10, 12, 14])) == []


def test_progressive_sharpening_falls_back_to_model_top_eigenvalue():
    (alert,) = ProgressiveSharpening().check(series(MODEL_TOP, geometric(2.0)))
    assert alert.tag == MODEL_TOP


# ----------------------------------------------------------------------------- CurvatureSpike, Heterogeneity


def test_curvature_spike_boundary_and_history():
    rule = CurvatureSpike()
    assert rule.check(series(Q_TOP, [1, 1, 1, 3.0])) == []  # exactly 3x the median: not above
    (alert,) = rule.check(series(Q_TOP, [1, 1, 1, 3.01]))
    assert alert.severity == "warning" and alert.tag == Q_TOP and alert.value == 3.01
    assert "layers.0.attn.q" in alert.message
    assert rule.check(series(Q_TOP, [1, 1, 10])) == []  # two previous values < min_history
    assert rule.check(series(Q_TOP, [1, None, 1, None, 1, 10]))  # missing passes skipped, 3 values remain
    assert rule.check(series(Q_TOP, [1, 100, 1, 1, 3.5]))  # the median ignores an earlier outlier
    assert rule.check(series(Q_TOP, [0, 0, 0, 5])) == []  # no positive baseline
    assert rule.check(series(Q_TOP, [1, 1, 1, math.inf])) == []  # NonFinite's business


def test_curvature_spike_window_and_blocks():
    values = [10, 10, 10, 10, 1, 1, 1, 3.5]
    assert CurvatureSpike(window=5).check(series(Q_TOP, values))  # median of [10, 10, 1, 1, 1] = 1
    assert CurvatureSpike(window=7).check(series(Q_TOP, values)) == []  # median of 7 values = 10
    passes = history(*({Q_TOP: 1.0, K_TOP: 2.0} for _ in range(3)), {Q_TOP: 1.1, K_TOP: 7.0})
    assert [a.tag for a in CurvatureSpike().check(passes)] == [K_TOP]


def test_heterogeneity_jump():
    rule = HeterogeneityJump()
    assert rule.check(series(tags.HETEROGENEITY, [0.1, 0.1, 0.1, 0.2])) == []
    (alert,) = rule.check(series(tags.HETEROGENEITY, [0.1, 0.1, 0.1, 0.21]))
    assert alert.severity == "info" and alert.tag == tags.HETEROGENEITY
    assert rule.check(series(tags.HETEROGENEITY, [0.1, 0.1, 0.5])) == []
    assert HeterogeneityJump(min_history=2).check(series(tags.HETEROGENEITY, [0.1, 0.1, 0.5]))


# --------------------------------------------------------------------- NegativeCurvature, NonFinite, Bounds


def test_negative_curvature():
    neg = tags.block_tag("layers.1.ffn_in", "negative_ratio")
    scalars = {
        neg: 0.51,
        tags.block_tag("layers.1.ffn_in", "min_eigenvalue"): -5.1,
        tags.block_tag("layers.1.ffn_in", "top_eigenvalue"): 10.0,
        tags.block_tag("model", "negative_ratio"): 0.5,
    }
    (alert,) = NegativeCurvature().check(history(scalars))
    assert alert.severity == "info" and alert.tag == neg and "-5.1" in alert.message
    assert NegativeCurvature(ratio=0.6).check(history(scalars)) == []
    assert NegativeCurvature().check(history({tags.SHARPNESS: 1.0})) == []


def test_non_finite():
    assert NonFinite().check(history({tags.SHARPNESS: 1.0, Q_TOP: 2.0})) == []
    (alert,) = NonFinite().check(history({tags.SHARPNESS: 1.0, Q_TOP: math.nan, K_TOP: -math.inf}))
    assert alert.severity == "critical" and alert.tag == Q_TOP and math.isnan(alert.value)
    assert Q_TOP in alert.message and K_TOP in alert.message
    (alert,) = NonFinite().check(history({f"curvature/b{i}/trace": math.inf for i in range(7)}))
    assert "curvature/b4/trace" in alert.message and "curvature/b5/trace" not in alert.message
    assert "and 2 more" in alert.message


def test_bound_violation():
    ratio = "theory/attention_softmax/bound_ratio"
    rule = BoundViolation()
    assert rule.check(history({ratio: 1.0 + 1e-6, "theory/ffn/bound": 5.0})) == []
    alerts = rule.check(history({ratio: 1.001, "theory/ffn/bound_ratio": 2.0, "theory/ln/bound_ratio": 0.3}))
    assert [a.tag for a in alerts] == [ratio, "theory/ffn/bound_ratio"]
    assert {a.severity for a in alerts} == {"critical"}
    assert BoundViolation(tolerance=0.01).check(history({ratio: 1.001})) == []


# -------------------------------------------------------------------------------------- custom rules


def test_threshold_rule():
    rule = ThresholdRule("traces", r"curvature/.*/trace", above=100.0, below=0.0, severity="info")
    scalars = {
        "curvature/a/trace": 100.0,
        "curvature/b/trace": 101.0,
        "curvature/c/trace": -1.0,
        "curvature/d/trace": 0.0,
        "curvature/e/trace_stderr": 1e9,
        "x/curvature/f/trace": 1e9,
    }
    alerts = rule.check(history(scalars))
    assert [(a.tag, a.severity, a.rule) for a in alerts] == [
        ("curvature/b/trace", "info", "traces"),
        ("curvature/c/trace", "info", "traces"),
    ]
    assert "above" in alerts[0].message and "below" in alerts[1].message
    assert ThresholdRule("low", r"stability/.*", below=1.0).check(history({tags.SHARPNESS: 0.5}))


def test_callable_rule():
    def fn(passes):
        value = passes[-1].scalars.get(tags.SHARPNESS)
        if value is not None and value > 1:
            return [(tags.SHARPNESS, value, "too sharp"), "and a message alone"]
        return None

    rule = CallableRule("mine", fn, severity="critical", cooldown=7)
    assert rule.check(history({tags.SHARPNESS: 0.5})) == []
    first, second = rule.check(history({tags.SHARPNESS: 2}))
    assert first == Alert("mine", "critical", 0, "too sharp", tags.SHARPNESS, 2.0)
    assert second == Alert("mine", "critical", 0, "and a message alone")
    assert rule.cooldown == 7


# ------------------------------------------------------------------------------------------------- manager


def test_default_rules_and_manager_defaults():
    names = [rule.name for rule in default_rules()]
    assert set(names) == {
        "non_finite",
        "stability_threshold",
        "progressive_sharpening",
        "curvature_spike",
        "negative_curvature",
        "bound_violation",
        "heterogeneity_jump",
        "preconditioned_gradient_curvature",
    }
    assert [rule.name for rule in AlertManager().rules] == names
    manager = AlertManager()
    assert manager.update(PassRecord(0, {tags.SHARPNESS_RATIO: 0.5})) == []
    (alert,) = manager.update(PassRecord(10, {tags.SHARPNESS_RATIO: 1.2, "tag/without/value": None}))
    assert (alert.rule, alert.severity, alert.step) == ("stability_threshold", "critical", 10)
    assert manager.counts == {"info": 0, "warning": 0, "critical": 1} and manager.alerts == [alert]
    assert "tag/without/value" not in manager.history[-1].scalars


def test_cooldown_per_rule_and_tag():
    rule = ThresholdRule("big", r"curvature/.*/top_eigenvalue", above=1.0, cooldown=300)
    manager = AlertManager([rule])
    fired = [
        [a.tag for a in manager.update(PassRecord(step, scalars))]
        for step, scalars in [
            (0, {Q_TOP: 2.0}),
            (100, {Q_TOP: 2.0, K_TOP: 2.0}),  # Q within its cooldown; K is another tag
            (200, {Q_TOP: 2.0, K_TOP: 2.0}),
            (300, {Q_TOP: 2.0, K_TOP: 2.0}),  # Q: 300 steps since step 0, fires again
            (400, {Q_TOP: 2.0, K_TOP: 2.0}),  # K: 300 steps since step 100
        ]
    ]
    assert fired == [[Q_TOP], [K_TOP], [], [Q_TOP], [K_TOP]]
    every = AlertManager([ThresholdRule("big", r".*", above=1.0)])  # cooldown 0: every pass
    assert all(every.update(PassRecord(step, {Q_TOP: 2.0})) for step in range(3))


def test_cooldown_lets_escalations_through():
    manager = AlertManager([StabilityThreshold(cooldown=1000)])
    severities = [
        [a.severity for a in manager.update(PassRecord(step, {tags.SHARPNESS_RATIO: ratio}))]
        for step, ratio in [(0, 0.95), (100, 1.1), (200, 0.95), (300, 1.1), (1100, 1.1)]
    ]
    assert severities == [["warning"], ["critical"], [], [], ["critical"]]


def test_disable_enable_and_unknown_names():
    manager = AlertManager([NonFinite(), StabilityThreshold()])
    manager.disable("stability_threshold")
    assert manager.update(PassRecord(0, {tags.SHARPNESS_RATIO: 2.0})) == []
    manager.enable("stability_threshold")
    (alert,) = manager.update(PassRecord(1, {tags.SHARPNESS_RATIO: 2.0}))
    assert alert.rule == "stability_threshold"
    with pytest.raises(ValueError, match=r"no rule named 'nope'.*non_finite.*stability_threshold"):
        manager.disable("nope")


def test_duplicate_rule_names_refused():
    with pytest.raises(ValueError, match="unique name"):
        AlertManager([NonFinite(), NonFinite()])
    manager = AlertManager([NonFinite()])
    manager.rules.append(NonFinite(name="non_finite_2"))  # appending is fine...
    manager.update(PassRecord(0, {}))
    manager.rules.append(NonFinite())  # ...unless the name is taken
    with pytest.raises(ValueError, match="unique name"):
        manager.update(PassRecord(1, {}))
    with pytest.raises(ValueError, match="AlertRules"):
        AlertManager([lambda history: []])


class Broken(AlertRule):
    name = "broken"

    def check(self, history):
        raise RuntimeError("boom")


def test_failing_rule_reported_once_and_others_go_on():
    bad_output = CallableRule("bad_output", lambda history: [("tag", "not a number", "message")])
    manager = AlertManager([Broken(), bad_output, StabilityThreshold()])
    first = manager.update(PassRecord(0, {tags.SHARPNESS_RATIO: 2.0}))
    assert [(a.rule, a.severity) for a in first] == [
        ("alerts", "warning"),
        ("alerts", "warning"),
        ("stability_threshold", "critical"),
    ]
    assert "'broken'" in first[0].message and "RuntimeError: boom" in first[0].message
    assert "'bad_output'" in first[1].message
    second = manager.update(PassRecord(100, {tags.SHARPNESS_RATIO: 2.0}))
    assert [a.rule for a in second] == ["stability_threshold"]
    assert manager.counts["warning"] == 2
    # a rule raising from its check() and a rule returning non-alerts are both reported
    junk = CallableRule("junk", lambda history: None)
    junk.check = lambda history: ["not an alert"]
    assert [a.rule for a in AlertManager([_Raising(name="plain"), junk]).update(PassRecord(0, {}))] == [
        "alerts",
        "alerts",
    ]
    with pytest.raises(TypeError, match="abstract"):
        AlertRule(name="base")  # check() must be implemented


class _Raising(AlertRule):
    def check(self, history):
        raise RuntimeError("not implemented here")


class _Nameless(AlertRule):
    def check(self, history):
        return []


def test_bounded_history_and_alerts():
    manager = AlertManager([ThresholdRule("any", r".*", above=0.0)], history_size=3, max_alerts=4)
    scalars = {"a": 1.0}
    for step in range(10):
        manager.update(PassRecord(step, scalars))
    assert [r.step for r in manager.history] == [7, 8, 9]
    assert [a.step for a in manager.alerts] == [6, 7, 8, 9]
    assert manager.counts["warning"] == 10  # counts are totals
    scalars["a"] = -1.0  # the manager keeps its own copy of the pass
    assert manager.history[-1].scalars == {"a": 1.0}


def dumps(alerts: list[Alert]) -> str:
    return json.dumps([a.to_dict() for a in alerts])  # NaN values compare unequal; their JSON does not


def make_manager() -> AlertManager:
    return AlertManager(
        [
            NonFinite(),
            StabilityThreshold(cooldown=500),
            CurvatureSpike(cooldown=250),
            ProgressiveSharpening(),
            Broken(),
        ],
        history_size=50,
    )


def test_state_dict_json_round_trip_continues_identically():
    original = make_manager()
    rising = [1.2**i for i in range(6)]
    passes = [
        PassRecord(i * 100, {Q_TOP: 1.0, tags.SHARPNESS: 10 * r, tags.SHARPNESS_RATIO: 0.3 * r})
        for i, r in enumerate(rising)
    ]
    passes.append(PassRecord(600, {Q_TOP: math.nan, tags.SHARPNESS_RATIO: 1.2}))
    for record in passes:
        original.update(record)
    assert original.counts["critical"] == 2  # non-finite; stability crossed at step 600
    text = json.dumps(original.state_dict())
    restored = make_manager()
    restored.load_state_dict(json.loads(text))
    assert json.dumps(restored.state_dict()) == text
    assert dumps(restored.alerts) == dumps(original.alerts) and restored.counts == original.counts
    assert math.isnan(restored.history[-1].scalars[Q_TOP])
    fired = []
    for record in [
        PassRecord(700, {Q_TOP: 5.0, tags.SHARPNESS_RATIO: 1.3}),  # stability in cooldown; spike
        PassRecord(1100, {Q_TOP: 5.0, tags.SHARPNESS_RATIO: 1.3}),
    ]:  # both cooldowns over
        expected = original.update(record)
        assert dumps(restored.update(record)) == dumps(expected)
        fired.append([a.rule for a in expected])
    assert fired == [["curvature_spike"], ["stability_threshold", "curvature_spike"]]
    assert json.dumps(restored.state_dict()) == json.dumps(original.state_dict())


def test_load_state_dict_rejects_garbage():
    with pytest.raises(ValueError, match="state_dict"):
        AlertManager().load_state_dict({"history": []})
    with pytest.raises(TypeError, match="PassRecord"):
        AlertManager().update({tags.SHARPNESS: 1.0})


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: NonFinite(cooldown=-1), "cooldown"),
        (lambda: NonFinite(cooldown=1.5), "cooldown"),
        (lambda: NonFinite(severity="fatal"), "severity must be one of"),
        (lambda: NonFinite(name=""), "non-empty name"),
        (lambda: NonFinite(name="alerts"), "reserved"),
        (lambda: _Nameless(), "non-empty name"),
        (lambda: StabilityThreshold(approach=0), "approach"),
        (lambda: StabilityThreshold(approach=1.5), "approach must be <= 1"),
        (lambda: ProgressiveSharpening(window=1), "window"),
        (lambda: ProgressiveSharpening(min_increase=-0.1), "min_increase"),
        (lambda: CurvatureSpike(factor=1.0), "factor"),
        (lambda: CurvatureSpike(window=0), "window"),
        (lambda: CurvatureSpike(min_history=6), "min_history"),
        (lambda: HeterogeneityJump(factor=math.nan), "factor"),
        (lambda: NegativeCurvature(ratio=-1), "ratio"),
        (lambda: BoundViolation(tolerance=-1e-3), "tolerance"),
        (lambda: ThresholdRule("t", r".*"), "above=, below="),
        (lambda: ThresholdRule("t", r"(", above=1), "regular expression"),
        (lambda: ThresholdRule("t", r".*", above=1, below=2), "below"),
        (lambda: ThresholdRule("t", r".*", above="1"), "above"),
        (lambda: CallableRule("c", 42), "fn must be"),
        (lambda: AlertManager(history_size=0), "history_size"),
        (lambda: AlertManager(max_alerts=0), "max_alerts"),
    ],
)
def test_argument_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_severities_rise_from_info_to_critical_through_a_cooldown():
    """Within a cooldown an alert fires only if it is more severe than the last one of its rule and tag:
    info < warning < critical (the order of SEVERITIES)."""
    script = {0: "info", 10: "warning", 20: "warning", 30: "critical", 40: "info", 50: "critical"}

    class Scripted(AlertRule):
        name = "scripted"

        def check(self, history):
            return [self._alert(history, "scripted", Q_TOP, severity=script[history[-1].step])]

    manager = AlertManager([Scripted(cooldown=1000)])
    fired = [[a.severity for a in manager.update(PassRecord(step, {}))] for step in script]
    assert fired == [["info"], ["warning"], [], ["critical"], [], []]
    assert manager.counts == dict.fromkeys(SEVERITIES, 1)


def test_negative_curvature_skips_blocks_negligible_next_to_the_model():
    rule = NegativeCurvature(ratio=0.5, min_fraction=0.01)
    scalars = {
        tags.block_tag("model", "top_eigenvalue"): 100.0,
        tags.block_tag("tiny", "top_eigenvalue"): 0.01,
        tags.block_tag("tiny", "min_eigenvalue"): -0.009,
        tags.block_tag("tiny", "negative_ratio"): 0.9,
        tags.block_tag("big", "top_eigenvalue"): 10.0,
        tags.block_tag("big", "min_eigenvalue"): -9.0,
        tags.block_tag("big", "negative_ratio"): 0.9,
    }
    fired = rule.check([PassRecord(step=1, scalars=scalars)])
    assert [a.tag for a in fired] == [tags.block_tag("big", "negative_ratio")]
    without_model = {k: v for k, v in scalars.items() if not k.startswith("curvature/model/")}
    assert len(rule.check([PassRecord(step=1, scalars=without_model)])) == 2
    with pytest.raises(ValueError, match="min_fraction"):
        NegativeCurvature(min_fraction=-1)


def test_preconditioned_gradient_curvature_warns_above_two_over_lr_only():
    from lightning_hessian.alerts import PreconditionedGradientCurvature

    rule = PreconditionedGradientCurvature()
    ratio, curvature = tags.PRECONDITIONED_GRADIENT_RATIO, tags.PRECONDITIONED_GRADIENT_CURVATURE
    assert rule.check(history({ratio: 0.99, curvature: 1980.0})) == []
    assert rule.check(history({ratio: 1.0})) == []
    assert rule.check(history({ratio: math.nan})) == []  # NonFinite reports it
    (alert,) = rule.check(history({ratio: 1.3, curvature: 2600.0}))
    assert (alert.rule, alert.severity, alert.tag, alert.value) == (
        "preconditioned_gradient_curvature",
        "warning",
        ratio,
        1.3,
    )
    assert "2506.04805" in alert.message and "learning rate" in alert.message and "2600" in alert.message
    assert PreconditionedGradientCurvature(above=2.0).check(history({ratio: 1.3})) == []
    with pytest.raises(ValueError, match="above"):
        PreconditionedGradientCurvature(above=0)
    (alert,) = AlertManager().update(PassRecord(5, {ratio: 1.5}))
    assert alert.rule == "preconditioned_gradient_curvature"
