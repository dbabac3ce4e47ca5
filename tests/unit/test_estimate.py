"""Estimates before long work: structure, errors, reuse of the calibration, and the
extrapolation's arithmetic under a fake clock (no wall-clock asserts)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import meanablate as ma
from meanablate.estimates import EstimateWarning, calibrate, sweeps
from meanablate.peakmem import PeakMemory


class FakeClock:
    """Seconds that pass only when the model runs: one per input element."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class TickNet(nn.Module):
    """A two-layer MLP whose forward advances a fake clock by its input's size."""

    def __init__(self, clock: FakeClock, tick: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.clock, self.tick = clock, tick
        self.a = nn.Linear(4, 8)
        self.act = nn.ReLU()
        self.b = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.t += self.tick * x.numel()
        return self.b(self.act(self.a(x)))


UNITS = [f"act[neurons={i}]" for i in range(8)]


def make(sizes=(16,), tick: float = 1.0, targets: bool = False):
    clock = FakeClock()
    model = TickNet(clock, tick).eval()
    g = torch.Generator().manual_seed(1)
    batches = []
    for n in sizes:
        b = {"x": torch.randn(n, 4, generator=g)}
        if targets:
            b["target"] = torch.randint(0, 3, (n,), generator=g)
        batches.append(b)
    means = ma.compute_means(model, ["act"], batches)
    clock.t = 0.0
    return clock, model, batches, means


def timed_on(clock: FakeClock, fn):
    t0 = clock()
    out = fn()
    return clock() - t0, out


# -- structure ---------------------------------------------------------------------------------
def test_structure_and_short_repr():
    clock, model, batches, means = make(sizes=(16, 16))
    est = ma.estimate(model, batches, UNITS, means, metric="l2", n_calibrate=4, clock=clock)
    assert isinstance(est, ma.Estimate)
    assert (est.algorithm, est.n_units, est.n_batches, est.calibrated_on) == ("sweep", 8, 2, 4)
    assert est.evaluations == 8 * 2 and not est.worst_case
    assert isinstance(est.peak_bytes, int) and est.peak_bytes >= 0
    assert est.seconds > 0 and 0 < est.reused_seconds < est.seconds
    assert est.remaining_seconds == pytest.approx(est.seconds - est.reused_seconds)
    assert set(est.parts) == {"sweep"} and est.device == "cpu"
    text = repr(est)
    assert "\n" not in text and len(text) < 200
    assert text.startswith("Estimate(sweep of 8 units x 2 batches: ~")
    assert "calibrated on 4 units" in text and est.summary().startswith("estimate: sweep")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"algorithm": "exhaustive"}, "algorithm must be one of .*got 'exhaustive'"),
        ({"n_calibrate": 0}, "n_calibrate must be a positive int, got 0"),
        ({"metric": "nope"}, "unknown metric 'nope'"),
        ({"algorithm": "acdc"}, r"ACDC needs threshold in \[0, 1\) .*got threshold=None"),
        ({"algorithm": "acdc", "threshold": 1.5}, "threshold=1.5"),
        ({"algorithm": "acdc", "threshold": 0.1, "abs_threshold": 1.0}, "not both"),
        ({"algorithm": "acdc", "threshold": 0.1, "max_exhaustive": -1}, "max_exhaustive"),
        ({"algorithm": "discover:sweep", "threshold": 0.1}, "threshold is for acdc"),
        ({"algorithm": "attribution", "target_faithfulness": 0}, "target_faithfulness"),
    ],
)
def test_bad_arguments_name_what_they_got(kwargs, match):
    clock, model, batches, means = make()
    with pytest.raises(ValueError, match=match):
        ma.estimate(model, batches, UNITS, means, clock=clock, **{"metric": "l2", **kwargs})
    assert clock() == 0  # rejected before any calibration ran


@pytest.mark.parametrize(
    "kwargs",
    [
        {"algorithm": "acdc"},
        {"algorithm": "acdc", "threshold": 1.0},
        {"algorithm": "acdc", "abs_threshold": -1.0},
        {"algorithm": "acdc", "threshold": 0.1, "abs_threshold": 1.0},
        {"algorithm": "sweep", "threshold": 0.1},
        {"algorithm": "attribution", "target_faithfulness": 1.5},
        {"algorithm": "acdc", "threshold": 0.1, "max_exhaustive": -1},
    ],
)
def test_discover_arguments_are_refused_as_discover_refuses_them(kwargs):
    clock, model, batches, means = make()
    with pytest.raises(ValueError) as by_discover:
        ma.discover(model, batches, means, units=UNITS, metric="l2", **kwargs)
    alg = kwargs["algorithm"]
    with pytest.raises(ValueError) as by_estimate:
        ma.estimate(
            model, batches, UNITS, means, metric="l2", clock=clock,
            **{**kwargs, "algorithm": f"discover:{alg}"},
        )  # fmt: skip
    assert clock() == 0
    # the same complaint: both name the same argument
    for word in ("threshold", "target_faithfulness", "max_exhaustive", "not both"):
        assert (word in str(by_discover.value)) == (word in str(by_estimate.value)), word


def test_bad_units_and_batches():
    _clock, model, batches, means = make()
    with pytest.raises(ValueError, match="estimate needs at least one batch"):
        ma.estimate(model, [], UNITS, means, metric="l2")
    with pytest.raises(ValueError, match="non-empty list"):
        ma.estimate(model, batches, [], means, metric="l2")
    with pytest.raises((KeyError, ValueError, AttributeError), match="nothere"):
        ma.estimate(model, batches, ["nothere[neurons=0]"], means, metric="l2")


def test_a_sum_of_estimates_has_nothing_to_run():
    clock, model, batches, means = make()
    a = ma.estimate(model, batches, UNITS, means, metric="l2", clock=clock)
    b = ma.estimate(model, batches, UNITS, means, metric="l2", algorithm="attribute", clock=clock)
    total = a + b
    assert total.seconds == pytest.approx(a.seconds + b.seconds)
    assert total.peak_bytes == max(a.peak_bytes, b.peak_bytes)
    assert set(total.parts) == {"sweep", "attribute"}
    with pytest.raises(ValueError, match="nothing to run"):
        total.run()


# -- reuse: calibrated work is not done twice ----------------------------------------------------
def test_sweep_run_reuses_the_calibrated_units(monkeypatch):
    clock, model, batches, means = make(sizes=(16, 8))
    calls: list[list[str]] = []
    real_sweep = sweeps.sweep

    def spy(model, batches, units, means, **kw):
        calls.append(list(units))
        return real_sweep(model, batches, units, means, **kw)

    monkeypatch.setattr(sweeps, "sweep", spy)
    est = ma.estimate(model, batches, UNITS, means, metric="l2", n_calibrate=5, clock=clock)
    calibrated = [u for c in calls for u in c]
    assert len(set(calibrated)) == est.calibrated_on == 5
    calls.clear()
    scores = est.run()
    assert len(calls) == 1 and not set(calls[0]) & set(calibrated)
    assert sorted(calls[0] + list(set(calibrated))) == sorted(UNITS)
    direct = ma.sweep(model, batches, UNITS, means, metric="l2")
    assert scores.units == direct.units
    torch.testing.assert_close(scores.per_example, direct.per_example)
    assert bool(scores.exact.all())


def test_attribute_run_reuses_the_calibrated_batches(monkeypatch):
    clock, model, batches, means = make(sizes=(8, 8, 8), targets=True)
    seen: list[int] = []
    real_attribute = sweeps.attribute

    def spy(model, batches, *args, **kw):
        seen.extend(id(b) for b in batches)
        return real_attribute(model, batches, *args, **kw)

    monkeypatch.setattr(sweeps, "attribute", spy)
    est = ma.estimate(
        model, batches, UNITS, means, metric="loss", algorithm="attribute", clock=clock
    )
    assert seen == [id(batches[0]), id(batches[1])] and est.calibrated_on == 2
    seen.clear()
    scores = est.run()
    assert seen == [id(batches[2])]  # only the batch the calibration did not run
    direct = ma.attribute(model, batches, UNITS, means, metric="loss")
    torch.testing.assert_close(scores.per_example, direct.per_example)


def test_probed_attribution_is_rerun_whole_rather_than_stitched():
    _clock, model, batches, means = make(sizes=(8, 8))
    est = ma.estimate(model, batches, UNITS, means, metric="l2", algorithm="attribute")
    assert est.reused_seconds == 0 and "re-run" in est.note
    direct = ma.attribute(model, batches, UNITS, means, metric="l2")
    torch.testing.assert_close(est.run().per_example, direct.per_example)


# -- the extrapolation's arithmetic, on a fake clock ------------------------------------------
@pytest.mark.parametrize("n_calibrate", [5, 8, 20])
def test_sweep_estimate_equals_the_runs_fake_time(n_calibrate):
    # One clean forward per batch and one hooked forward per unit and batch, each
    # costing its input size (plus whatever a sweep call costs once, its checks):
    # a sweep of n units over batches of sizes s takes (n + 1) * 4 * sum(s) and the
    # call's fixed part. The calibration prices both on the sweep's own path.
    clock, model, batches, means = make(sizes=(16, 8, 4))
    est = ma.estimate(
        model, batches, UNITS, means, metric="l2", n_calibrate=n_calibrate, clock=clock
    )
    elapsed, _ = timed_on(clock, lambda: ma.sweep(model, batches, UNITS, means, metric="l2"))
    per_unit = 4 * 28
    assert per_unit * 9 <= elapsed < per_unit * 10
    assert est.seconds == pytest.approx(elapsed)
    done = min(n_calibrate, 8)
    assert est.reused_seconds == pytest.approx(est.seconds if done == 8 else done * per_unit)
    remaining, _ = timed_on(clock, est.run)
    assert remaining == pytest.approx(est.remaining_seconds)
    assert (remaining == 0) == (done == 8)


@pytest.mark.parametrize("n_calibrate", [1, 3])
def test_small_calibrations_price_the_fixed_cost_as_plain_forwards(n_calibrate):
    clock, model, batches, means = make(sizes=(16, 8, 4))
    est = ma.estimate(
        model, batches, UNITS, means, metric="l2", n_calibrate=n_calibrate, clock=clock
    )
    elapsed, _ = timed_on(clock, lambda: ma.sweep(model, batches, UNITS, means, metric="l2"))
    # a sweep call's own checks land on the few timed units: a small overestimate
    assert elapsed <= est.seconds <= 1.05 * elapsed


def test_attribute_estimate_scales_by_batch_size():
    clock, model, batches, means = make(sizes=(4, 8, 20), targets=True)
    est = ma.estimate(
        model, batches, UNITS, means, metric="loss", algorithm="attribute", clock=clock
    )
    elapsed, _ = timed_on(clock, lambda: ma.attribute(model, batches, UNITS, means, metric="loss"))
    assert elapsed == 4 * (4 + 8 + 20)
    assert est.seconds == pytest.approx(elapsed)
    assert est.evaluations == 3


def test_acdc_estimate_equals_the_runs_fake_time():
    clock, model, batches, means = make(sizes=(16, 8))
    kw = {"metric": "l2", "threshold": 1e-3}
    est = ma.estimate(
        model, batches, UNITS, means, algorithm="acdc", clock=clock, minimize=False, **kw
    )
    assert est.algorithm == "discover:acdc" and est.evaluations == 8 + 2
    assert not est.worst_case and est.worst_seconds == est.seconds
    elapsed, circuit = timed_on(
        clock,
        lambda: ma.discover(
            model, batches, means, units=UNITS, algorithm="acdc", minimize=False, **kw
        ),
    )
    assert est.seconds == pytest.approx(elapsed)
    assert est.run().kept == circuit.kept


def test_the_certificate_is_bounded_by_worst_seconds():
    clock, model, batches, means = make(sizes=(16, 8))
    kw = {"metric": "l2", "threshold": 1e-3}
    est = ma.estimate(model, batches, UNITS, means, algorithm="acdc", clock=clock, **kw)
    # removal pass: 8 + 7 + ... + 1 sets at most; exhaustive check: 2^8 - 1
    per_set = 4 * 24
    assert est.worst_seconds == pytest.approx(est.seconds + (36 + 255) * per_set)
    assert "certificate: up to 291 more" in est.note
    assert "with the certificate" in repr(est)
    elapsed, _ = timed_on(
        clock, lambda: ma.discover(model, batches, means, units=UNITS, algorithm="acdc", **kw)
    )
    assert est.seconds <= elapsed <= est.worst_seconds


def test_score_then_prune_estimate_is_a_worst_case_bound():
    clock, model, batches, means = make(sizes=(16,))
    est = ma.estimate(
        model, batches, UNITS, means, metric="l2", algorithm="discover:sweep", clock=clock
    )
    assert est.worst_case and est.evaluations == 2 + 8  # up to 64 units: every size
    assert {"sweep", "prune", "set metric"} <= set(est.parts)
    elapsed, _ = timed_on(
        clock,
        lambda: ma.discover(
            model, batches, means, units=UNITS, metric="l2", algorithm="sweep", minimize=False
        ),
    )
    assert elapsed <= est.seconds + 1e-9


# -- warnings ----------------------------------------------------------------------------------
def test_warns_before_a_run_over_an_hour():
    clock, model, batches, means = make(tick=100.0)  # 6400 fake seconds per forward
    with pytest.warns(EstimateWarning, match=r"estimated to take .* h \(over 1.0 h\)"):
        est = ma.estimate(model, batches, UNITS, means, metric="l2", clock=clock)
    assert est.warnings() and est.seconds > 3600
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ma.estimate(model, batches, UNITS, means, metric="l2", clock=clock, warn=False)


def test_warns_before_a_run_that_needs_more_memory_than_is_free(monkeypatch):
    clock, model, batches, means = make()
    monkeypatch.setattr(calibrate, "available_bytes", lambda device: 1)
    with pytest.warns(EstimateWarning, match="more than the 1 B available"):
        est = ma.estimate(model, batches, UNITS, means, metric="l2", clock=clock)
    assert est.available_bytes == 1 and est.peak_bytes > 1


# -- memory ------------------------------------------------------------------------------------
def test_peak_memory_counts_live_tensors_not_views():
    with PeakMemory() as p:
        a = torch.ones(250_000)  # 1 MB
        v = a[10:].view(-1, 10)  # a view: no new memory
        a.add_(1)  # in place: none either
        b = a * 2  # 1 MB more
        del a, b, v
        c = torch.zeros(250_000)  # reuses what was freed: the peak stays 2 MB
        del c
    assert p.bytes == 2_000_000 and p.live_bytes == 0


def test_estimated_peak_covers_what_the_model_allocates():
    clock, model, batches, means = make(sizes=(64,))
    est = ma.estimate(model, batches, UNITS, means, metric="l2", clock=clock)
    with PeakMemory() as p:
        ma.sweep(model, batches, UNITS, means, metric="l2")
    assert p.bytes > 0
    assert est.peak_bytes == pytest.approx(p.bytes, rel=0.25)


# -- the command line --------------------------------------------------------------------------
def test_cli_dry_run_prints_the_estimate_and_writes_nothing(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from meanablate.cli.app import app

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    for command in ("sweep", "attribute", "discover"):
        args = [command, "--organism", "induction", "--n-examples", "32", "--out", str(out)]
        result = CliRunner().invoke(app, [*args, "--dry-run", "-q"], prog_name="meanablate")
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert lines[0].startswith("estimate: "), result.stdout
        assert "calibrated on" in lines[0] and "peak ~" in lines[0]
        assert lines[-1] == "dry run: stopped before the run; nothing written"
        assert not out.exists() and not (tmp_path / "runs").exists()
    assert "discover:acdc" in lines[0] and "sweep ~" in lines[1]  # the discover breakdown


def test_cli_run_shows_the_estimate_and_reuses_the_calibration(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from meanablate.cli.app import app

    swept: list[list[str]] = []
    real_sweep = sweeps.sweep

    def spy(model, batches, units, means, **kw):
        swept.append(list(units))
        return real_sweep(model, batches, units, means, **kw)

    monkeypatch.setattr(sweeps, "sweep", spy)
    args = ["sweep", "--organism", "tracr-reverse", "--n-examples", "32", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, [*args, "--n-boot", "0"], prog_name="meanablate")
    assert result.exit_code == 0, result.output
    assert "estimate: sweep of 8 units" in result.stderr
    flat = [u for c in swept for u in c]
    assert sorted(flat) == sorted(set(flat)) and len(flat) == 8  # each unit swept once
    assert (tmp_path / "sweep.json").is_file()


class LayeredNet(nn.Module):
    """Three blocks; its units are named by block, so ``unit_layer`` reads their layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(x)


def test_acdc_trials_are_priced_at_their_own_layers_cost(monkeypatch) -> None:
    """A set resumes from its earliest unit's block, so a trial costs what its unit's layer
    costs. Under a fake set metric whose cost is the number of blocks from the set's
    earliest layer, the estimate equals the sum over ACDC's n trials exactly."""
    from meanablate.discovery.units import reverse_topological, unit_layer
    from meanablate.estimates import discovery as module

    clock = FakeClock()
    n_layers = 3

    class FakeSets:
        def __init__(self, model, batches, units, *args, **kwargs) -> None:
            self.units = units

        def __call__(self, ablated) -> torch.Tensor:
            if ablated:  # the blocks a resumed run computes
                clock.t += n_layers - min(unit_layer(u) for u in ablated)
            return torch.full((4,), float(len(ablated)), dtype=torch.float64)

    monkeypatch.setattr(module, "SetMetric", FakeSets)
    model = LayeredNet().eval()
    # uneven layers: 1 unit in block 0, 2 in block 1, 4 in block 2
    units = ["blocks.0[neurons=0]"] + [f"blocks.1[neurons={i}]" for i in range(2)]
    units += [f"blocks.2[neurons={i}]" for i in range(4)]
    batches = [{"x": torch.randn(4, 4, generator=torch.Generator().manual_seed(2))}]
    means = ma.compute_means(model, [f"blocks.{i}" for i in range(3)], batches)
    est = ma.estimate(
        model, batches, units, means, metric="l2", algorithm="acdc", threshold=0.1,
        minimize=False, clock=clock, warn=False,
    )  # fmt: skip
    want = sum(n_layers - unit_layer(u) for u in reverse_topological(units))
    assert est.parts["acdc"] == pytest.approx(want)  # 1*3 + 2*2 + 4*1 = 11
    # two prefix trials averaged (the pricing before) gave (1 + 2) / 2 * 7 = 10.5
    assert want == 11
