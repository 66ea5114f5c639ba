"""Output hardening: each mode's effect, the top-1 guarantee, strict parsing, binding checks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bastion.core.errors import InternalError, InvalidInput
from bastion.core.metadata import TensorSpec
from bastion.guard.hardening import (
    HardeningSpec,
    ReverseSigmoid,
    _reverse_sigmoid,
    check_against,
    harden,
    parse_hardening,
)

WHERE = "digits/config.yaml: hardening"


def softmax_rows(rows: int, classes: int, seed: int, temperature: float = 0.5) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(size=(rows, classes)) / temperature
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def outputs_of(probs: np.ndarray) -> dict[str, np.ndarray]:
    return {"probabilities": probs, "label": probs.reshape(-1, probs.shape[-1]).argmax(axis=1).astype(np.int64)}


def hardened(probs: np.ndarray, spec: HardeningSpec) -> np.ndarray:
    return harden(outputs_of(probs), spec)["probabilities"]


def assert_top1(before: np.ndarray, after: np.ndarray) -> None:
    b = before.reshape(-1, before.shape[-1]).argmax(axis=1)
    a = after.reshape(-1, after.shape[-1]).argmax(axis=1)
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- parsing


def test_parse_defaults_and_full_block() -> None:
    assert parse_hardening({}, WHERE) == HardeningSpec()
    assert not HardeningSpec().enabled
    spec = parse_hardening(
        {
            "top_k": 3,
            "renormalize": False,
            "round": 2,
            "reverse_sigmoid": {"beta": 0.5, "gamma": 2},
            "probabilities_output": "probs",
            "label_output": None,
        },
        WHERE,
    )
    assert spec == HardeningSpec(
        top_k=3,
        renormalize=False,
        round=2,
        reverse_sigmoid=ReverseSigmoid(beta=0.5, gamma=2.0),
        probabilities_output="probs",
        label_output=None,
    )
    assert spec.enabled
    assert parse_hardening({"reverse_sigmoid": {}}, WHERE).reverse_sigmoid == ReverseSigmoid(beta=1.0, gamma=0.1)
    assert parse_hardening({"label_only": True}, WHERE).label_only


@pytest.mark.parametrize(
    ("block", "field", "words"),
    [
        (None, "", "expected a mapping"),
        ([1], "", "expected a mapping"),
        ({"topk": 3}, "topk", "did you mean 'top_k'"),
        ({"top_k": 0}, "top_k", "integer >= 1"),
        ({"top_k": True}, "top_k", "integer >= 1"),
        ({"top_k": 2.5}, "top_k", "integer >= 1"),
        ({"round": -1}, "round", "between 0 and 12"),
        ({"round": 13}, "round", "between 0 and 12"),
        ({"renormalize": True}, "renormalize", "only applies with top_k"),
        ({"top_k": 2, "renormalize": "yes"}, "renormalize", "true or false"),
        ({"label_only": 1}, "label_only", "true or false"),
        ({"reverse_sigmoid": 1.0}, "reverse_sigmoid", "expected a mapping"),
        ({"reverse_sigmoid": {"beta": 0}}, "reverse_sigmoid.beta", "> 0"),
        ({"reverse_sigmoid": {"gamma": -1}}, "reverse_sigmoid.gamma", "> 0"),
        ({"reverse_sigmoid": {"beta": float("nan")}}, "reverse_sigmoid.beta", "finite"),
        ({"reverse_sigmoid": {"beta": "1"}}, "reverse_sigmoid.beta", "number"),
        ({"reverse_sigmoid": {"betta": 1}}, "reverse_sigmoid.betta", "did you mean 'beta'"),
        ({"label_only": True, "top_k": 2}, "label_only", "top_k"),
        ({"label_only": True, "round": 1, "reverse_sigmoid": {}}, "label_only", "round, reverse_sigmoid"),
        ({"probabilities_output": ""}, "probabilities_output", "output name"),
        ({"label_output": 3}, "label_output", "output name"),
        ({"label_output": "probabilities"}, "label_output", "must differ"),
    ],
)
def test_parse_errors_name_the_field(block: object, field: str, words: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_hardening(block, WHERE)
    prefix = f"{WHERE}.{field}: " if field else f"{WHERE}: "
    assert str(info.value).startswith(prefix), str(info.value)
    assert words in str(info.value)


def test_check_against_names_missing_outputs() -> None:
    names = ["label", "probabilities"]
    check_against(HardeningSpec(top_k=2), names)
    check_against(HardeningSpec(label_only=True), names)
    check_against(HardeningSpec(), ["anything"])  # nothing to harden, nothing to check
    with pytest.raises(InvalidInput, match=r"hardening\.probabilities_output: 'probs' is not an output.*label"):
        check_against(HardeningSpec(top_k=2, probabilities_output="probs"), names)
    with pytest.raises(InvalidInput, match=r"x\.yaml: hardening\.label_output: 'label'.*label_output: null"):
        check_against(HardeningSpec(label_only=True), ["probabilities"], where="x.yaml: hardening")
    # top-k does not need a label output; label_only with label_output: null does not either
    check_against(HardeningSpec(top_k=2), ["probabilities"])
    check_against(HardeningSpec(label_only=True, label_output=None), ["probabilities"])


def test_check_against_tensor_specs() -> None:
    good = [TensorSpec("probabilities", "FP32", (-1, 10)), TensorSpec("label", "INT64", (-1,))]
    check_against(HardeningSpec(round=2), good)
    check_against(HardeningSpec(round=2), [TensorSpec("probabilities", "FP16", (-1, -1))])
    with pytest.raises(InvalidInput, match="INT64; hardening needs FP16, FP32 or FP64"):
        check_against(HardeningSpec(round=2), [TensorSpec("probabilities", "INT64", (-1, 10))])
    with pytest.raises(InvalidInput, match="class\\) axis of at least 2"):
        check_against(HardeningSpec(round=2), [TensorSpec("probabilities", "FP32", (-1, 1))])


# --------------------------------------------------------------------------- label-only


def test_label_only_keeps_just_the_label() -> None:
    probs = softmax_rows(5, 10, seed=1)
    outs = outputs_of(probs)
    outs["other"] = np.arange(5)
    got = harden(outs, HardeningSpec(label_only=True))
    assert set(got) == {"label", "other"}
    assert got["label"] is outs["label"] and got["other"] is outs["other"]
    assert set(outs) == {"probabilities", "label", "other"}  # the input mapping is not touched


@pytest.mark.parametrize("label_output", [None, "label"])
def test_label_only_without_label_answers_one_hot(label_output: str | None) -> None:
    probs = softmax_rows(6, 4, seed=2)
    # with label_output "label" but no label among the outputs (the client asked for the
    # probabilities only), the answer must still carry nothing but the argmax
    got = harden({"probabilities": probs}, HardeningSpec(label_only=True, label_output=label_output))
    one_hot = got["probabilities"]
    assert one_hot.shape == probs.shape and one_hot.dtype == probs.dtype
    assert set(np.unique(one_hot)) == {0.0, 1.0}
    np.testing.assert_array_equal(one_hot.sum(axis=1), 1.0)
    assert_top1(probs, one_hot)


# --------------------------------------------------------------------------- top-k


def test_top_k_keeps_the_k_largest_and_renormalises() -> None:
    probs = softmax_rows(64, 10, seed=3)
    out = hardened(probs, HardeningSpec(top_k=3))
    assert out.shape == probs.shape and out.dtype == np.float32
    assert ((out > 0).sum(axis=1) == 3).all()
    kept = np.argsort(-probs, axis=1)[:, :3]
    np.testing.assert_array_equal(np.sort(np.flatnonzero(out[0])), np.sort(kept[0]))
    for row in range(64):
        assert set(np.flatnonzero(out[row])) == set(kept[row])
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-6)
    ratio = out[np.arange(64)[:, None], kept] / probs[np.arange(64)[:, None], kept]
    np.testing.assert_allclose(ratio, ratio[:, :1].repeat(3, axis=1), rtol=1e-5)  # same scale per row
    assert_top1(probs, out)


def test_top_k_without_renormalise_keeps_values() -> None:
    probs = softmax_rows(8, 5, seed=4)
    out = hardened(probs, HardeningSpec(top_k=2, renormalize=False))
    mask = out > 0
    np.testing.assert_array_equal(out[mask], probs[mask])
    assert (mask.sum(axis=1) == 2).all()


def test_top_k_ties_keep_the_argmax() -> None:
    probs = np.array([[0.1, 0.3, 0.3, 0.3], [0.25, 0.25, 0.25, 0.25], [0.0, 0.5, 0.0, 0.5]], dtype=np.float32)
    out = hardened(probs, HardeningSpec(top_k=1))
    np.testing.assert_array_equal(out, [[0, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]])
    # k at least the number of classes changes nothing but the normalisation
    np.testing.assert_allclose(hardened(probs, HardeningSpec(top_k=9)), probs)


# --------------------------------------------------------------------------- round


@pytest.mark.parametrize("decimals", [1, 2, 3])
def test_round_quantises_sums_to_one_and_keeps_top1(decimals: int) -> None:
    probs = softmax_rows(64, 10, seed=5, temperature=2.0)
    out = hardened(probs, HardeningSpec(round=decimals))
    units = out.astype(np.float64) * 10**decimals
    np.testing.assert_allclose(units, np.rint(units), atol=1e-3)  # multiples of 10**-decimals
    np.testing.assert_array_equal(np.rint(units).sum(axis=1), 10**decimals)  # exactly 1 in units
    # largest remainder: within one unit (two where a tie with the top-1 was broken)
    assert np.abs(out - probs).max() <= 2 * 10.0**-decimals
    assert_top1(probs, out)


def test_round_breaks_ties_and_near_ties_toward_the_argmax() -> None:
    probs = np.array(
        [
            [0.4449, 0.4451, 0.11],  # both would round to 0.445 at 3 decimals
            [0.444, 0.446, 0.11],
            [0.3334, 0.3333, 0.3333],  # 0.33 each at 2 decimals: top-1 must stay 0
            [0.3333, 0.3334, 0.3333],  # ... and here 1
            [0.5, 0.5, 0.0],
        ],
        dtype=np.float32,
    )
    for decimals in (0, 1, 2, 3):
        out = hardened(probs, HardeningSpec(round=decimals))
        assert_top1(probs, out)
        np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-6)
    out = hardened(probs, HardeningSpec(round=2))
    np.testing.assert_allclose(out[2:4], [[0.34, 0.33, 0.33], [0.33, 0.34, 0.33]], atol=1e-7)
    # the tie 0.445 / 0.445 is broken in whole units (one moves to the top-1), not by an ulp
    out = hardened(probs, HardeningSpec(round=3))
    np.testing.assert_array_equal(out[0], np.array([0.444, 0.446, 0.11], dtype=np.float32))


def test_round_zero_decimals_is_the_one_hot_argmax() -> None:
    probs = softmax_rows(16, 7, seed=6, temperature=3.0)
    out = hardened(probs, HardeningSpec(round=0))
    np.testing.assert_array_equal(out, np.eye(7, dtype=np.float32)[probs.argmax(axis=1)])


# --------------------------------------------------------------------------- reverse sigmoid


def test_reverse_sigmoid_perturbs_meaningfully_and_keeps_top1() -> None:
    probs = softmax_rows(256, 10, seed=7, temperature=0.3)
    out = hardened(probs, HardeningSpec(reverse_sigmoid=ReverseSigmoid(beta=1.0, gamma=0.1)))
    assert out.shape == probs.shape and out.dtype == probs.dtype
    assert (out >= 0).all()
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)
    assert_top1(probs, out)
    l1 = np.abs(out - probs).sum(axis=1)
    assert l1.mean() > 0.5, l1.mean()  # the soft labels a copy would learn from are far off
    # the confidence of the top class drops: a copy calibrated on these learns the wrong margins
    top = probs.argmax(axis=1)
    assert (out[np.arange(256), top] < probs[np.arange(256), top]).mean() > 0.9
    # a stronger beta perturbs more
    stronger = hardened(probs, HardeningSpec(reverse_sigmoid=ReverseSigmoid(beta=2.0, gamma=0.1)))
    assert np.abs(stronger - probs).sum(axis=1).mean() > l1.mean()


def test_reverse_sigmoid_falls_back_when_the_perturbation_flips_the_top1() -> None:
    probs = np.array([[0.45, 0.40, 0.15], [0.6, 0.3, 0.1]], dtype=np.float32)
    raw = _reverse_sigmoid(probs.astype(np.float64), 1.0, 5.0)
    assert raw[0].argmax() != 0  # beta * gamma > 1: the raw perturbation reorders the top
    out = hardened(probs, HardeningSpec(reverse_sigmoid=ReverseSigmoid(beta=1.0, gamma=5.0)))
    assert_top1(probs, out)
    # the fallback swaps the two values: the row keeps its values and its sum
    np.testing.assert_allclose(np.sort(out[0]), np.sort(raw[0]), rtol=1e-6)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-6)


# --------------------------------------------------------------------------- combined and general


def test_combined_order_perturb_then_truncate_then_round() -> None:
    probs = softmax_rows(64, 10, seed=8)
    spec = HardeningSpec(reverse_sigmoid=ReverseSigmoid(beta=0.5, gamma=0.2), top_k=3, round=2)
    out = hardened(probs, spec)
    assert ((out > 0).sum(axis=1) <= 3).all()  # reverse-sigmoid ran first: top-k's zeros stayed zero
    units = out.astype(np.float64) * 100
    np.testing.assert_allclose(units, np.rint(units), atol=1e-3)
    np.testing.assert_array_equal(np.rint(units).sum(axis=1), 100)
    assert_top1(probs, out)


def test_pure_and_shape_and_dtype_preserving() -> None:
    probs = softmax_rows(4, 6, seed=9).astype(np.float64)
    outs = outputs_of(probs)
    before = {k: v.copy() for k, v in outs.items()}
    spec = HardeningSpec(top_k=2, round=2, reverse_sigmoid=ReverseSigmoid())
    got = harden(outs, spec, np.random.default_rng(0))
    for k, v in outs.items():
        np.testing.assert_array_equal(v, before[k])
    assert got is not outs and got["label"] is outs["label"]
    assert got["probabilities"].dtype == np.float64
    # [classes] (a model without a batch dim), [batch, 1, classes], an empty batch, FP16
    for shaped in (probs[0], probs[:, None, :], probs[:0], probs.astype(np.float16)):
        out = harden({"probabilities": shaped}, spec)["probabilities"]
        assert out.shape == shaped.shape and out.dtype == shaped.dtype
        if shaped.size:
            assert_top1(shaped, out)
    # a model without the configured output, or a disabled spec: passed through
    assert harden({"label": outs["label"]}, spec) == {"label": outs["label"]}
    assert harden(outs, HardeningSpec())["probabilities"] is probs


def test_non_finite_rows_pass_without_error() -> None:
    probs = np.array([[np.nan, 0.5, 0.5], [0.2, 0.7, 0.1]], dtype=np.float32)
    spec = HardeningSpec(top_k=2, round=2, reverse_sigmoid=ReverseSigmoid())
    with np.errstate(all="raise"):
        out = hardened(probs, spec)
    assert_top1(probs[1:], out[1:])


def test_non_float_probabilities_are_a_configuration_error() -> None:
    with pytest.raises(InternalError, match="float tensor"):
        harden({"probabilities": np.array([[1, 0]])}, HardeningSpec(top_k=1))
    with pytest.raises(InternalError, match="class axis"):
        harden({"probabilities": np.array([[0.3]], dtype=np.float32)}, HardeningSpec(top_k=1))


# --------------------------------------------------------------------------- property: top-1 survives

_SPECS = [
    HardeningSpec(top_k=1),
    HardeningSpec(top_k=2),
    HardeningSpec(top_k=3, renormalize=False),
    HardeningSpec(round=0),
    HardeningSpec(round=1),
    HardeningSpec(round=2),
    HardeningSpec(round=4),
    HardeningSpec(reverse_sigmoid=ReverseSigmoid(beta=1.0, gamma=0.1)),
    HardeningSpec(reverse_sigmoid=ReverseSigmoid(beta=0.9, gamma=4.0)),  # beta * gamma > 1: reorders
    HardeningSpec(reverse_sigmoid=ReverseSigmoid(beta=3.0, gamma=1.0)),  # clips negatives
    HardeningSpec(reverse_sigmoid=ReverseSigmoid(beta=0.7, gamma=2.0), top_k=2, round=2),
]


@st.composite
def probability_rows(draw: st.DrawFn) -> np.ndarray:
    classes = draw(st.integers(2, 12))
    rows = draw(st.integers(1, 8))
    # values from a coarse grid make exact ties and near-ties common, not rare
    grid = st.sampled_from([0.0, 1e-9, 0.1, 0.3333, 0.3334, 0.45, 0.4449, 0.4451, 0.5, 1.0])
    elements = st.one_of(grid, st.floats(0, 1, allow_nan=False, width=32))
    raw = draw(hnp.arrays(np.float64, (rows, classes), elements=elements))
    raw[raw.sum(axis=1) == 0, 0] = 1.0
    probs = raw / raw.sum(axis=1, keepdims=True)
    return probs.astype(draw(st.sampled_from([np.float32, np.float64])))


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(probs=probability_rows(), which=st.integers(0, len(_SPECS) - 1))
def test_property_top1_is_preserved(probs: np.ndarray, which: int) -> None:
    spec = _SPECS[which]
    out = hardened(probs, spec)
    assert out.shape == probs.shape and out.dtype == probs.dtype
    assert_top1(probs, out)
    assert (out >= 0).all()
    if spec.round is not None or (spec.top_k is not None and spec.renormalize) or spec.reverse_sigmoid:
        np.testing.assert_allclose(out.astype(np.float64).sum(axis=1), 1.0, atol=1e-5)
