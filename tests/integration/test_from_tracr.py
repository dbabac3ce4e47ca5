"""from_tracr: any RASP program -> an organism, checked against tracr; bad input refused.

One small program is compiled once per module (tracr + jax take ~10 s); the shipped
from_tracr organisms (hist, sort_unique) are checked against tracr's RASP interpreter on
every input of their data set.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from meanablate.discovery import ALGORITHMS, discover
from meanablate.discovery.evaluate import metric_per_example
from meanablate.organisms import from_tracr, registry, tracr_program
from meanablate.stats import MEAN_KINDS, compute_means
from tracr_reference import brute_force, hand_kl, hand_logits, hand_means

pytest.importorskip("tracr")


@pytest.fixture(scope="module")
def length_org():
    from tracr.compiler import lib

    # make_length writes into the residual stream's "length" space; output classes 0..3
    # are not the input values a, b: the card must not assume they are
    return from_tracr(lib.make_length(), vocab={"a", "b"}, max_seq_len=3, name="tracr-length")


def test_a_new_program_end_to_end(length_org, tmp_path) -> None:
    org, card = length_org, length_org.card
    assert card["tracr_check"] == {**card["tracr_check"], "agree": 8, "inputs": 8}
    assert card["dataset"]["exhaustive"] and not card["dataset"]["sampled"]
    assert card["output"]["classes"] == ["0", "1", "2", "3"]
    assert card["vocabulary"]["input_values"] == ["a", "b"]
    assert card["metric"] == org.metric == "kl"  # categorical output: KL by default
    assert "(kl)" in card["ground_truth_definition"]  # computed for the organism's metric
    assert org.units == ["blocks.0.attn.hook_z[heads=0]", "blocks.0.hook_mlp_out"]
    assert "COMPUTED" in card["ground_truth_definition"]
    by_kind = card["ground_truth_by_mean_kind"]
    assert set(by_kind) == set(MEAN_KINDS)
    # every input has length 3: per position, length is a constant; nothing to explain
    assert by_kind["per_position"]["circuits"] is None
    assert by_kind["plain"]["circuits"] == [org.units]
    # discovery refuses what the card calls undefined, and finds what it computed
    batch = tracr_program.exhaustive_batch(card)
    for kind in MEAN_KINDS:
        means = compute_means(org.model, org.units, [batch], kind=kind)
        if by_kind[kind]["circuits"] is None:
            with pytest.raises(ValueError, match="no behaviour to explain"):
                discover(org.model, [batch], means, units=org.units, metric=org.metric,
                         algorithm="sweep")  # fmt: skip
            continue
        c = discover(org.model, [batch], means, units=org.units, metric=org.metric,
                     algorithm="sweep")  # fmt: skip
        assert c.kept in by_kind[kind]["circuits"] and c.certificate == "exhaustive"
    # save and load: same card, same weights, no tracr needed to load
    tracr_program.save(org, tmp_path, "length")
    back = tracr_program.load(tmp_path / "length.json")
    assert back.card == json.loads(json.dumps(card)) and back.units == org.units
    for a, b in zip(back.model.state_dict().values(), org.model.state_dict().values()):
        assert torch.equal(a, b)
    (batch1,) = back.make_batches(5, 5, 3)
    assert batch1["tokens"].shape == (5, 4) and (batch1["tokens"][:, 0] == 0).all()


def test_kl_metric_is_the_hand_computed_kl(length_org) -> None:
    """The card's brute force and the library's metric on the organism's KL agree with KL
    computed from its definition (plain Python sums over classes) on hand-ablated runs."""
    org, card = length_org, length_org.card
    batch = tracr_program.exhaustive_batch(card)
    scored = batch["target"] != -100
    ref = hand_means(org.model, batch["tokens"], org.units, "plain")
    clean = hand_logits(org.model, batch["tokens"], [], ref)
    means = compute_means(org.model, org.units, [batch], kind="plain")
    for ablated in ([], org.units[:1], org.units[1:], org.units):
        expected = hand_kl(hand_logits(org.model, batch["tokens"], ablated, ref), clean, scored)
        got = metric_per_example(org.model, [batch], ablated, means, "kl").mean()
        assert float(got) == pytest.approx(expected, abs=1e-9)
        if not ablated:
            assert expected == 0.0
    by_kind = card["ground_truth_by_mean_kind"]["plain"]
    empty = hand_kl(hand_logits(org.model, batch["tokens"], org.units, ref), clean, scored)
    assert empty > 1e-3 and by_kind["metric_empty"] == pytest.approx(empty, abs=1e-9)
    assert by_kind["metric_full"] == 0.0


@pytest.fixture(scope="module")
def flip_reverse():
    """A user's program (not in tracr's lib): reverse the input with a and b swapped."""
    from tracr.compiler import lib
    from tracr.rasp import rasp

    flipped = rasp.categorical(rasp.Map(lambda t: {"a": "b", "b": "a"}[t], rasp.tokens))
    program = lib.make_reverse(flipped.named("flipped"))
    return from_tracr(program, vocab={"a", "b"}, max_seq_len=4, name="tracr-flip-reverse")


@pytest.mark.parametrize("kind", MEAN_KINDS)
def test_discovery_with_kl_on_a_user_program_reaches_the_brute_force_minimum(
    flip_reverse, kind
) -> None:
    org = flip_reverse
    assert org.metric == "kl" and len(org.units) == 8
    batch = tracr_program.exhaustive_batch(org.card)
    ref = hand_means(org.model, batch["tokens"], org.units, kind)
    if kind == "plain_except":  # BOS keeps its own mean: the library's keep_positions
        means = compute_means(org.model, org.units, [batch], kind=kind, keep_positions=[0])
    else:
        means = compute_means(org.model, org.units, [batch], kind=kind)
    faith, minimal = brute_force(org.model, batch, org.units, "kl", ref, 0.95)
    # the card's ground truth (the library's brute force) is the hand-written one
    card_gt = org.card["ground_truth_by_mean_kind"][kind]["circuits"]
    assert {frozenset(c) for c in card_gt} == minimal
    for algorithm in ALGORITHMS:
        circuit = discover(
            org.model, [batch], means, units=org.units, metric="kl", algorithm=algorithm,
            threshold=0.05 if algorithm == "acdc" else None,
            target_faithfulness=None if algorithm == "acdc" else 0.95,
        )  # fmt: skip
        assert frozenset(circuit.kept) in minimal, (algorithm, circuit.kept)
        assert circuit.certificate == "exhaustive"
        assert circuit.faithfulness == pytest.approx(faith[frozenset(circuit.kept)], abs=1e-6)
    # the mean kinds disagree on this program: the choice matters
    if kind == "per_position":
        assert minimal == {frozenset(["blocks.0.hook_mlp_out", "blocks.3.attn.hook_z[heads=0]"])}


def test_the_metric_option(length_org) -> None:
    from tracr.compiler import lib

    org = from_tracr(lib.make_length(), vocab={"a", "b"}, max_seq_len=3, metric="accuracy")
    assert org.metric == org.card["metric"] == "accuracy"
    assert "(accuracy)" in org.card["ground_truth_definition"]
    with pytest.raises(ValueError, match=r"metric 'mse' does not fit this program's categorical"):
        from_tracr(lib.make_length(), vocab={"a", "b"}, max_seq_len=3, metric="mse")
    with pytest.raises(ValueError, match=r"metric must be one of .* got 'l2'"):
        from_tracr(lib.make_length(), vocab={"a", "b"}, max_seq_len=3, metric="l2")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_faithfulness": 0.0}, r"target_faithfulness must be a number in \(0, 1\]"),
        ({"target_faithfulness": 1.5}, r"target_faithfulness .* got 1.5"),
        ({"target_faithfulness": float("nan")}, r"target_faithfulness .* got nan"),
        ({"max_brute_units": 0}, r"max_brute_units must be an int >= 1, got 0"),
        ({"max_inputs": -3}, r"max_inputs must be an int >= 1, got -3"),
        ({"accuracy_tolerance": 0}, r"accuracy_tolerance must be a number > 0"),
        ({"sample": 0}, r"sample must be an int >= 1, got 0"),
    ],
)
def test_arguments_out_of_range_are_refused_before_compiling(kwargs, message) -> None:
    from tracr.compiler import lib

    with pytest.raises(ValueError, match=message):
        from_tracr(lib.make_length(), vocab={"a", "b"}, max_seq_len=3, **kwargs)


def test_too_many_inputs_are_refused_with_an_offer_to_sample() -> None:
    from tracr.compiler import lib

    with pytest.raises(ValueError, match=r"5\*\*12 = 244140625 inputs.*sample=N"):
        from_tracr(lib.make_length(), vocab=set("abcde"), max_seq_len=12)
    seqs = tracr_program._inputs(list("abcde"), 12, None, 7, 0, 100)
    assert len(seqs) == 7 and all(len(s) == 12 for s in seqs)


def test_programs_tracr_cannot_compile_and_bad_arguments_are_refused() -> None:
    from tracr.rasp import rasp

    bad = rasp.numerical(
        rasp.Aggregate(rasp.Select(rasp.tokens, rasp.tokens, rasp.Comparison.EQ), rasp.tokens)
    )
    with pytest.raises(ValueError, match="tracr cannot compile this program"):
        from_tracr(bad, vocab={"a", "b"}, max_seq_len=2)
    with pytest.raises(TypeError, match="must be a tracr RASP SOp"):
        from_tracr("make_hist", vocab={"a"}, max_seq_len=2)
    with pytest.raises(ValueError, match="max_seq_len must be an int >= 1"):
        from_tracr(rasp.tokens, vocab={"a"}, max_seq_len=0)
    with pytest.raises(ValueError, match="inputs must be sequences of 2 values"):
        from_tracr(rasp.tokens, vocab={"a"}, max_seq_len=2, inputs=[("a", "z")])


def test_the_cli_route_refuses_bad_programs_and_writes_nothing(tmp_path) -> None:
    from typer.testing import CliRunner

    from meanablate.cli.app import app

    prog = tmp_path / "prog.py"
    prog.write_text(
        "from tracr.rasp import rasp\n"
        "bad = rasp.numerical(rasp.Aggregate(rasp.Select(rasp.tokens, rasp.tokens, "
        "rasp.Comparison.EQ), rasp.tokens))\n"
        "def big():\n    from tracr.compiler import lib\n    return lib.make_length()\n"
        "not_a_program = 3\n"
    )
    out = tmp_path / "out"
    cases = [
        (f"{prog}:bad", "a,b", "2", "tracr cannot compile"),
        (f"{prog}:big", "a,b,c,d,e", "12", "--sample N"),
        (f"{prog}:not_a_program", "a", "2", "expected a RASP SOp"),
        (f"{prog}:missing", "a", "2", "has no 'missing'"),
        (f"{prog}:big", "a,b", "2", "target_faithfulness must be a number in (0, 1]", "1.5"),
        (f"{prog}:big", "a,b", "2", "target_faithfulness must be a number in (0, 1]", "0"),
        (f"{prog}:big", "a,b", "2", "metric 'mse' does not fit", "0.95", "mse"),
    ]
    for spec, vocab, n, message, *more in cases:
        args = ["tracr", spec, "--vocab", vocab, "--max-seq-len", n, "--out", str(out), "-q"]
        if more:
            args += ["--target-faithfulness", more[0], *(["--metric", more[1]] if more[1:] else [])]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (result.stdout, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr
        assert not out.exists()


@pytest.mark.parametrize("name", ["tracr-hist", "tracr-sort_unique"])
def test_shipped_programs_agree_with_tracr_on_every_input(name) -> None:
    from tracr.compiler import lib
    from tracr.rasp import rasp

    program = {
        "tracr-hist": lib.make_hist,
        "tracr-sort_unique": lambda: lib.make_sort_unique(rasp.tokens, rasp.tokens),
    }[name]()
    org = registry.load(name)
    card = org.card
    batch = tracr_program.exhaustive_batch(card)
    tokens = card["vocabulary"]["tokens"]
    values = {str(v): v for v in card["source"]["vocab"]}
    classes = card["output"]["classes"]
    with torch.no_grad():
        pred = org.model(batch["tokens"]).argmax(-1)[:, 1:]
    for row, got in zip(batch["tokens"].tolist(), pred.tolist()):
        seq = [values[tokens[i]] for i in row[1:]]
        assert [classes[c] for c in got] == [str(v) for v in rasp.evaluate(program, seq)]
    assert len(batch["tokens"]) == card["dataset"]["size"] == card["tracr_check"]["agree"]
    if name == "tracr-hist":  # counts 0..5: another vocabulary than the input's
        assert classes == ["0", "1", "2", "3", "4", "5"] and card["source"]["vocab"] == list("abc")
    else:  # distinct values only: the program is undefined on repeats
        rows = [tuple(r[1:]) for r in batch["tokens"].tolist()]
        assert len(rows) == len(set(rows)) == len(list(itertools.permutations(range(6), 4)))
        assert all(len(set(r)) == 4 for r in rows)
