"""Each metric against a hand computation with explicit Python sums; bad inputs fail clearly."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meanablate import metrics as M
from meanablate.metrics import METRICS, Metric, get_metric


# -- hand references: plain Python floats and loops ----------------------------------------
def softmax_row(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = math.fsum(e)
    return [v / s for v in e]


def log_softmax_row(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(math.fsum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def as_3d(x: torch.Tensor) -> list:
    x = x.double()
    return (x.unsqueeze(1) if x.ndim == 2 else x).tolist()


def as_2d(x: torch.Tensor) -> list:
    return (x.unsqueeze(1) if x.ndim == 1 else x).tolist()


def positions(batch: dict, logits: torch.Tensor) -> list[list[bool]]:
    rows = as_3d(logits)
    b, p = len(rows), len(rows[0])
    if "metric_mask" in batch:
        return [[bool(v) for v in row] for row in as_2d(batch["metric_mask"])]
    if "target" in batch:
        return [[v != -100 for v in row] for row in as_2d(batch["target"])]
    if "attention_mask" in batch and logits.ndim == 3:
        return [[bool(v) for v in row] for row in as_2d(batch["attention_mask"])]
    return [[True] * p for _ in range(b)]


def mean_over(values: list[list[float]], keep: list[list[bool]]) -> list[float]:
    out = []
    for vs, ks in zip(values, keep):
        picked = [v for v, k in zip(vs, ks) if k]
        out.append(math.fsum(picked) / len(picked))
    return out


def ref_l2(logits, batch, clean) -> list[float]:
    a, c, keep = as_3d(logits), as_3d(clean), positions(batch, logits)
    return [
        math.sqrt(
            math.fsum(
                (x - y) ** 2
                for p in range(len(a[b]))
                if keep[b][p]
                for x, y in zip(a[b][p], c[b][p])
            )
        )
        for b in range(len(a))
    ]


def ref_kl(logits, batch, clean) -> list[float]:
    a, c, keep = as_3d(logits), as_3d(clean), positions(batch, logits)
    vals = []
    for b in range(len(a)):
        row = []
        for p in range(len(a[b])):
            q, lq, lp = softmax_row(c[b][p]), log_softmax_row(c[b][p]), log_softmax_row(a[b][p])
            row.append(math.fsum(qi * (lqi - lpi) for qi, lqi, lpi in zip(q, lq, lp)))
        vals.append(row)
    return mean_over(vals, keep)


def ref_task(name: str, logits, batch) -> list[float]:
    a, keep = as_3d(logits), positions(batch, logits)
    t = as_2d(batch["target"])
    vals = []
    for b in range(len(a)):
        row = []
        for p in range(len(a[b])):
            if not keep[b][p]:
                row.append(0.0)
                continue
            r, k = a[b][p], t[b][p]
            if name == "loss":
                row.append(-log_softmax_row(r)[k])
            elif name == "prob":
                row.append(softmax_row(r)[k])
            elif name == "accuracy":
                row.append(float(max(range(len(r)), key=lambda i: r[i]) == k))
            elif name == "logit_diff":
                row.append(r[k] - r[as_2d(batch["wrong"])[b][p]])
        vals.append(row)
    return mean_over(vals, keep)


def ref_mse(logits, batch) -> list[float]:
    a, tv = as_3d(logits), as_2d(batch["target_value"].double())
    vals = [[(a[b][p][0] - tv[b][p]) ** 2 for p in range(len(a[b]))] for b in range(len(a))]
    keep = [[not math.isnan(v) for v in row] for row in tv]
    return mean_over([[v if k else 0.0 for v, k in zip(r, ks)] for r, ks in zip(vals, keep)], keep)


def close(got: torch.Tensor, want: list[float], tol: float = 1e-10) -> None:
    assert got.shape == (len(want),)
    assert got.dtype == torch.float64
    for g, w in zip(got.tolist(), want):
        assert math.isclose(g, w, rel_tol=tol, abs_tol=tol), (g, w)


# -- tiny hand-checked numbers ---------------------------------------------------------------
def test_tiny_numbers_by_hand() -> None:
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # p = [1/4, 3/4]
    clean = torch.tensor([[[0.0, 0.0]]])  # q = [1/2, 1/2]
    batch = {"target": torch.tensor([[1]]), "wrong": torch.tensor([[0]])}
    # (log 3 is rounded to float32 in the input)
    assert M.prob(logits, batch).item() == pytest.approx(0.75, abs=1e-7)
    assert M.loss(logits, batch).item() == pytest.approx(-math.log(0.75), abs=1e-7)
    assert M.logit_diff(logits, batch).item() == pytest.approx(math.log(3.0), abs=1e-7)
    assert M.accuracy(logits, batch).item() == 1.0
    # KL(q || p) = 1/2 log(2) + 1/2 log(2/3)
    kl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert M.kl_div(logits, {}, clean).item() == pytest.approx(kl, abs=1e-7)
    assert M.l2(logits, {}, clean).item() == pytest.approx(math.log(3.0), abs=1e-7)
    assert M.mse(
        torch.tensor([[2.0], [0.5]]), {"target_value": torch.tensor([0.5, 0.5])}
    ).tolist() == [
        2.25,
        0.0,
    ]


# -- random tensors against the references ------------------------------------------------------
@st.composite
def cases(draw: st.DrawFn):
    b, p, v = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(2, 5))
    two_d = draw(st.booleans())
    seed = draw(st.integers(0, 10_000))
    g = torch.Generator().manual_seed(seed)
    shape = (b, v) if two_d else (b, p, v)
    logits = torch.randn(shape, generator=g) * 3
    clean = torch.randn(shape, generator=g) * 3
    tshape = (b,) if two_d else (b, p)
    target = torch.randint(0, v, tshape, generator=g)
    wrong = torch.randint(0, v, tshape, generator=g)
    batch: dict = {"wrong": wrong}
    mask_kind = draw(st.sampled_from(["none", "ignore", "metric_mask", "attention_mask"]))
    keep = torch.rand(tshape, generator=g) < 0.6
    if two_d:  # one position per example: it is scored
        keep[:] = True
    else:  # every example scores at least one position
        keep[:, 0] = True
    if mask_kind == "ignore":
        target = torch.where(keep, target, torch.full_like(target, -100))
    elif mask_kind == "metric_mask":
        batch["metric_mask"] = keep.long()
    elif mask_kind == "attention_mask" and not two_d:
        batch["attention_mask"] = keep.long()
    batch["target"] = target
    return logits, clean, batch


@given(cases())
@settings(max_examples=150, deadline=None)
def test_task_metrics_match_hand_computation(case) -> None:
    logits, _, batch = case
    for name in ("loss", "prob", "accuracy", "logit_diff"):
        close(METRICS[name](logits, batch), ref_task(name, logits, batch))


@given(cases())
@settings(max_examples=150, deadline=None)
def test_comparing_metrics_match_hand_computation(case) -> None:
    logits, clean, batch = case
    no_target = {k: v for k, v in batch.items() if k != "target"}
    for b in (batch, no_target):
        close(M.l2(logits, b, clean), ref_l2(logits, b, clean), 1e-6)
        close(M.kl_div(logits, b, clean), ref_kl(logits, b, clean), 1e-9)
    assert torch.all(M.kl_div(clean, batch, clean).abs() < 1e-12)
    assert torch.all(M.l2(clean, batch, clean) == 0)


@given(
    st.integers(1, 3),
    st.integers(1, 4),
    st.integers(0, 1000),
)
@settings(max_examples=60, deadline=None)
def test_mse_matches_hand_computation(b: int, p: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, p, 1, generator=g)
    tv = torch.randn(b, p, generator=g)
    tv[:, 1:][torch.rand(b, p - 1, generator=g) < 0.5] = float("nan")
    batch = {"target_value": tv}
    close(M.mse(logits, batch), ref_mse(logits, batch))


def test_effect_is_value_or_change() -> None:
    g = torch.Generator().manual_seed(0)
    logits, clean = torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g)
    batch = {"target": torch.randint(0, 5, (4, 3), generator=g)}
    assert torch.equal(METRICS["kl"].effect(logits, batch, clean), M.kl_div(logits, batch, clean))
    want = [a - c for a, c in zip(ref_task("loss", logits, batch), ref_task("loss", clean, batch))]
    close(METRICS["loss"].effect(logits, batch, clean), want)
    assert get_metric("loss") is METRICS["loss"]

    def custom(lg, b, c):
        return lg.double().sum((1, 2))

    m = get_metric(custom)
    assert isinstance(m, Metric) and m.name == "custom" and not m.compares
    assert torch.equal(m(logits, batch), logits.double().sum((1, 2)))


# -- bad inputs ----------------------------------------------------------------------------
LOGITS = torch.randn(2, 3, 5)


@pytest.mark.parametrize("name", ["loss", "prob", "accuracy", "logit_diff"])
@pytest.mark.parametrize("bad", [5, 7, -1, -101])
def test_target_out_of_range(name: str, bad: int) -> None:
    target = torch.tensor([[0, 1, bad], [2, -100, 4]])
    batch = {"target": target, "wrong": torch.zeros(2, 3, dtype=torch.long)}
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        METRICS[name](LOGITS, batch)


@pytest.mark.parametrize("name", ["loss", "prob", "accuracy", "logit_diff"])
def test_float_targets_are_type_error(name: str) -> None:
    batch = {"target": torch.zeros(2, 3), "wrong": torch.zeros(2, 3, dtype=torch.long)}
    with pytest.raises(TypeError, match="integers"):
        METRICS[name](LOGITS, batch)


@pytest.mark.parametrize(
    ("name", "batch", "key"),
    [
        ("loss", {}, "target"),
        ("prob", {"wrong": torch.zeros(2, 3).long()}, "target"),
        ("accuracy", {}, "target"),
        ("logit_diff", {"target": torch.zeros(2, 3).long()}, "wrong"),
        ("mse", {}, "target_value"),
    ],
)
def test_missing_batch_key(name: str, batch: dict, key: str) -> None:
    logits = LOGITS[..., :1] if name == "mse" else LOGITS
    with pytest.raises(ValueError, match=rf"needs batch\['{key}'\]"):
        METRICS[name](logits, batch)
    with pytest.raises(ValueError, match=r"needs batch\["):
        METRICS[name](logits, torch.zeros(2, 3).long())  # a bare tensor batch


@pytest.mark.parametrize(
    ("name", "batch"),
    [
        ("loss", {"target": torch.zeros(2, 2).long()}),  # fewer positions than the output
        ("prob", {"target": torch.zeros(2).long()}),  # [batch] target, [batch, pos] output
        ("accuracy", {"target": torch.zeros(3, 3).long()}),  # another batch size
        ("logit_diff", {"target": torch.zeros(2, 2).long(), "wrong": torch.ones(2, 2).long()}),
        ("kl", {"metric_mask": torch.ones(2, 2)}),
        ("l2", {"metric_mask": torch.ones(2, 1)}),
    ],
)
def test_fields_that_do_not_fit_the_output(name: str, batch: dict) -> None:
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        METRICS[name](LOGITS, batch, LOGITS + 1)


def test_other_misfits() -> None:
    with pytest.raises(ValueError, match="one output"):
        M.mse(LOGITS, {"target_value": torch.zeros(2, 3)})
    for name in ("kl", "l2"):
        with pytest.raises(ValueError, match="clean"):
            METRICS[name](LOGITS, {}, None)
    with pytest.raises(ValueError, match="no scored position"):
        M.loss(LOGITS, {"target": torch.tensor([[1, 2, 3], [-100, -100, -100]])})
    with pytest.raises(ValueError, match="unknown metric 'l3'"):
        get_metric("l3")
    with pytest.raises(TypeError, match="a metric is"):
        get_metric(3)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["kl", "l2", "loss", "prob", "logit_diff"])
def test_bound_metric_equals_effect(name, dtype) -> None:
    """``Metric.bind`` (the sweep's fast form) equals ``Metric.effect``, near and far."""
    from meanablate.metrics import get_metric

    g = torch.Generator().manual_seed(0)
    clean = (torch.randn(3, 4, 9, generator=g, dtype=torch.float64) * 4).to(dtype)
    target = torch.randint(0, 9, (3, 4), generator=g)
    target[:, 0] = -100
    batch = {"target": target, "wrong": (target + 1) % 9}
    m = get_metric(name)
    bound = m.bind(batch, clean)
    for scale in (0.0, 1e-5, 1e-4, 1e-2, 3.0, 300.0):
        logits = clean + scale * torch.randn(3, 4, 9, generator=g, dtype=torch.float64).to(dtype)
        got, want = bound(logits), m.effect(logits, batch, clean)
        if name == "kl" and dtype == torch.float32:
            # float32 KL works on the logit change d in float32: each term of
            # q.(expm1(d) - d) carries ~eps32 * |d| of rounding, so the error is bounded
            # by a few eps32 of the KL plus a few eps32 * E_q|d| (mean over positions).
            q = torch.softmax(clean.double(), -1)
            d = (logits.double() - clean.double()).abs()
            eps = torch.finfo(torch.float32).eps
            bound_err = 8 * eps * (want + (q * d).sum(-1)[:, 1:].mean(-1))
            assert torch.all((got - want).abs() <= bound_err), (scale, got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


# -- shapes are checked, never broadcast ---------------------------------------------------
def _task_batch(b: int = 2, p: int = 3, v: int = 5) -> dict:
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, v, (b, p), generator=g)
    return {"target": target, "wrong": (target + 1) % v}


@pytest.mark.parametrize("name", ["kl", "l2"])
@pytest.mark.parametrize("bad", [(1, 3, 5), (2, 1, 5), (2, 3, 1), (3, 5)])
def test_clean_output_of_another_shape_is_an_error(name, bad) -> None:
    logits = torch.randn(2, 3, 5)
    clean = torch.randn(bad)
    for call in (
        lambda: METRICS[name](logits, {}, clean),
        lambda: METRICS[name].effect(logits, {}, clean),
        lambda: getattr(M, "l2" if name == "l2" else "kl_div")(logits, {}, clean),
    ):
        with pytest.raises(ValueError, match=r"clean output has shape .*wanted \(2, 3, 5\)") as e:
            call()
        assert str(bad).replace(" ", "") in str(e.value).replace(" ", "")


def test_bound_metric_checks_the_ablated_shape() -> None:
    clean = torch.randn(2, 3, 5)
    for name in ("kl", "l2", "loss"):
        bound = METRICS[name].bind(_task_batch(), clean)
        with pytest.raises(ValueError, match=r"ablated output has shape \(1, 3, 5\), wanted"):
            bound(torch.randn(1, 3, 5))


FIELD_CASES = [
    ("target", (2, 1)),
    ("target", (1, 3)),
    ("target", (2,)),
    ("wrong", (2, 1)),
    ("wrong", (1, 3)),
    ("metric_mask", (2, 1)),
    ("metric_mask", (1, 3)),
    ("attention_mask", (2, 1)),
    ("attention_mask", (1, 3)),
    ("target_value", (2, 1)),
]


@pytest.mark.parametrize("field,shape", FIELD_CASES)
@pytest.mark.parametrize("name", ["kl", "l2", "loss", "prob", "accuracy", "logit_diff"])
def test_batch_field_of_another_shape_is_an_error(name, field, shape) -> None:
    logits = torch.randn(2, 3, 5)
    batch = _task_batch()
    if field == "target_value":
        batch[field] = torch.zeros(shape)
    elif field in ("metric_mask", "attention_mask"):
        batch[field] = torch.ones(shape, dtype=torch.long)
    else:
        batch[field] = torch.zeros(shape, dtype=torch.long)
    for call in (
        lambda: METRICS[name](logits, batch, logits.clone()),
        lambda: METRICS[name].fn(logits, batch, logits.clone()),
        lambda: METRICS[name].bind(batch, logits.clone()),
    ):
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert f"batch[{field!r}]" in msg and str(shape) in msg and "(2, 3)" in msg, msg


def test_mse_target_value_of_another_shape_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"batch\['target_value'\] has shape \(1, 3\), wanted"):
        M.mse(torch.randn(2, 3, 1), {"target_value": torch.zeros(1, 3)}, None)


def test_custom_metric_gets_checked_shapes_and_is_discrete() -> None:
    m = get_metric(lambda logits, batch, clean: logits.argmax(-1).double().mean(-1))
    assert m.discrete  # unknown callables may read an argmax: the exact route
    with pytest.raises(ValueError, match=r"clean output has shape \(1, 3, 5\)"):
        m(torch.randn(2, 3, 5), {}, torch.randn(1, 3, 5))
    assert METRICS["accuracy"].discrete and not METRICS["kl"].discrete


def test_two_dim_outputs_take_batch_fields() -> None:
    logits = torch.randn(4, 5)
    target = torch.tensor([0, 1, 2, 3])
    assert M.accuracy(logits, {"target": target}).shape == (4,)
    with pytest.raises(ValueError, match=r"batch\['target'\] has shape \(1,\), wanted \(4,\)"):
        M.accuracy(logits, {"target": target[:1]})
