"""The tracr organisms: agreement with tracr, task accuracy, and the ground-truth proofs.

Only the agreement tests need tracr (the ``[tracr]`` extra); the rest run on the shipped
files alone. Mean ablation here uses hand-written forward hooks, independent of the
library's own ablation code.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from meanablate.organisms import registry, tracr_models

TASKS = tracr_models.TASKS
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "compile_tracr.py"


@pytest.fixture(scope="module")
def organisms():
    return {task: registry.load(f"tracr-{task}") for task in TASKS}


@pytest.fixture(scope="module")
def exhaustive(organisms):
    return {
        task: tracr_models.exhaustive_batches(org.card, 10**9)[0] for task, org in organisms.items()
    }


def _scored(org, batch):
    with torch.no_grad():
        return tracr_models.score(org.card, org.model(batch["tokens"]), batch)


# -- loading, data and accuracy --------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
def test_loads_quickly_and_is_complete(task):
    start = time.perf_counter()
    org = registry.load(f"tracr-{task}")
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"loading took {elapsed:.2f} s"  # < 0.01 s in practice
    card, cfg = org.card, org.model.cfg
    assert org.name == f"tracr-{task}" and not org.model.training
    assert org.metric == ("mse" if task == "frac_prevs" else "loss") == card["metric"]
    expected_units = []
    for layer in range(cfg.n_layers):
        expected_units += [f"blocks.{layer}.attn.hook_z[heads={h}]" for h in range(cfg.n_heads)]
        expected_units.append(f"blocks.{layer}.hook_mlp_out")
    assert org.units == expected_units
    assert set(org.ground_truth) <= set(card["program_components"]) <= set(org.units)
    vocab = card["vocabulary"]
    assert cfg.d_vocab == vocab["size"] == len(vocab["tokens"])
    assert [vocab["ids"][t] for t in vocab["tokens"]] == list(range(vocab["size"]))
    assert vocab["tokens"][vocab["bos_id"]] == "BOS"
    assert cfg.n_ctx == card["input_length"] == card["n_input_tokens"] + 1
    classes = card["output"]["classes"]
    assert cfg.vocab_out == (1 if classes is None else len(classes))


@pytest.mark.parametrize("task", TASKS)
def test_batches_follow_the_conventions(organisms, task):
    org = organisms[task]
    batches = org.make_batches(10, 4, 3)
    assert [len(b["tokens"]) for b in batches] == [4, 4, 2]
    again = org.make_batches(10, 4, 3)
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(batches, again, strict=True))
    assert not torch.equal(batches[0]["tokens"], org.make_batches(10, 4, 4)[0]["tokens"])
    batch = batches[0]
    tokens = batch["tokens"]
    assert tokens.dtype == torch.long and tokens.shape == (4, org.card["input_length"])
    assert (tokens[:, 0] == org.card["vocabulary"]["bos_id"]).all()
    if task == "frac_prevs":
        value = batch["target_value"]
        assert value.shape == tokens.shape and value.is_floating_point()
        assert value[:, 0].isnan().all() and not value[:, 1:].isnan().any()
    else:
        target = batch["target"]
        assert target.dtype == torch.long and target.shape == tokens.shape
        assert (target[:, 0] == -100).all() and (target[:, 1:] >= 0).all()


def test_targets_by_hand(organisms):
    """A few inputs written out by hand."""

    def batch(task, words):
        ids = organisms[task].card["vocabulary"]["ids"]
        tokens = torch.tensor([[ids["BOS"], *(ids[w] for w in ws)] for ws in words])
        return tracr_models.make_targets(organisms[task].card, tokens)

    classes = organisms["reverse"].card["output"]["classes"]
    got = batch("reverse", [list("abcca")])["target"][0, 1:].tolist()
    assert [classes[c] for c in got] == list("accba")
    classes = organisms["sort"].card["output"]["classes"]
    got = batch("sort", [list("31524"), list("22121")])["target"][:, 1:].tolist()
    assert [[classes[c] for c in row] for row in got] == [list("12345"), list("11222")]
    got = batch("frac_prevs", [list("xaxbx")])["target_value"][0, 1:]
    assert torch.allclose(got, torch.tensor([1, 1 / 2, 2 / 3, 2 / 4, 3 / 5]))


@pytest.mark.parametrize("task", TASKS)
def test_shipped_model_solves_the_task(organisms, exhaustive, task):
    org = organisms[task]
    batch = exhaustive[task]
    assert len(batch["tokens"]) == org.card["dataset"]["exhaustive_size"]
    assert len(set(map(tuple, batch["tokens"].tolist()))) == len(batch["tokens"])
    assert _scored(org, batch)["accuracy"] == 1.0
    for random_batch in org.make_batches(300, 128, 0):
        assert _scored(org, random_batch)["accuracy"] == 1.0


# -- ground truth under mean ablation (hand-written hooks, no tracr) --------------------
def _module_and_head(model, unit):
    name, _, sel = unit.partition("[")
    head = int(sel.removeprefix("heads=").rstrip("]")) if sel else None
    return model.get_submodule(name), head


def _per_position_means(model, tokens, units):
    """Mean of each unit's activation over the examples, separately for every position."""
    means, handles = {}, []
    for unit in units:
        module, head = _module_and_head(model, unit)

        def record(_mod, _inp, out, unit=unit, head=head):
            act = out if head is None else out[:, :, head]
            means[unit] = act.double().mean(dim=0).float()  # [pos, ...]

        handles.append(module.register_forward_hook(record))
    with torch.no_grad():
        model(tokens)
    for handle in handles:
        handle.remove()
    return means


def _ablated_score(org, batch, means, ablate):
    handles = []
    for unit in ablate:
        module, head = _module_and_head(org.model, unit)

        def patch(_mod, _inp, out, mean=means[unit], head=head):
            out = out.clone()
            if head is None:
                out[:] = mean
            else:
                out[:, :, head] = mean
            return out

        handles.append(module.register_forward_hook(patch))
    try:
        return _scored(org, batch)
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture(scope="module")
def means(organisms, exhaustive):
    return {
        task: _per_position_means(org.model, exhaustive[task]["tokens"], org.units)
        for task, org in organisms.items()
    }


@pytest.mark.parametrize("task", TASKS)
def test_ablating_everything_outside_the_ground_truth_keeps_accuracy(
    organisms, exhaustive, means, task
):
    org = organisms[task]
    outside = [u for u in org.units if u not in org.ground_truth]
    assert outside  # every organism has units outside its circuit
    score = _ablated_score(org, exhaustive[task], means[task], outside)
    assert score["accuracy"] == 1.0


@pytest.mark.parametrize("task", TASKS)
def test_ablating_any_one_ground_truth_unit_hurts(organisms, exhaustive, means, task):
    org = organisms[task]
    clean = _scored(org, exhaustive[task])
    assert org.ground_truth
    for unit in org.ground_truth:
        score = _ablated_score(org, exhaustive[task], means[task], [unit])
        assert score[org.metric] > clean[org.metric] + 1e-3, unit
        assert score["accuracy"] < 1.0, unit


@pytest.mark.parametrize("task", TASKS)
def test_excluded_program_components_are_constant_per_position(organisms, exhaustive, means, task):
    """Used by the program but not in the ground truth: ablating them changes nothing."""
    org = organisms[task]
    clean = _scored(org, exhaustive[task])
    for unit in org.card["program_components"]:
        if unit not in org.ground_truth:
            score = _ablated_score(org, exhaustive[task], means[task], [unit])
            assert score[org.metric] == pytest.approx(clean[org.metric], abs=1e-4), unit


@pytest.mark.parametrize("task", TASKS)
def test_program_components_are_exactly_the_nonzero_units(organisms, task):
    org = organisms[task]
    used = set(org.card["program_components"])
    for unit in org.units:
        _, head = _module_and_head(org.model, unit)
        block = org.model.get_submodule(".".join(unit.split(".")[:2]))
        if head is None:
            weights = [block.mlp.W_in, block.mlp.W_out]
        else:
            weights = [block.attn.W_V[head], block.attn.W_O[head], block.attn.W_Q[head]]
        nonzero = all(bool(w.abs().sum() > 0) for w in weights)
        allzero = all(bool(w.abs().sum() == 0) for w in weights)
        assert nonzero if unit in used else allzero, unit
    assert {c["unit"] for c in org.card["components"]} == used


def test_reverse_ground_truth_is_the_final_head(organisms):
    """Fixed length makes length / opp_idx constant per position (see the card)."""
    org = organisms["reverse"]
    assert org.ground_truth == ["blocks.3.attn.hook_z[heads=0]"]
    assert len(org.card["program_components"]) == 5


# -- agreement with tracr (needs the [tracr] extra) --------------------------------------
@pytest.fixture(scope="module")
def tracr_models_compiled():
    pytest.importorskip("tracr")
    from tracr.compiler import compiling

    spec = importlib.util.spec_from_file_location("compile_tracr", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, script)  # its dataclasses need the module registered
    spec.loader.exec_module(script)
    compiled = {}
    for task in TASKS:
        cfg = script.ORGANISMS[task]
        compiled[task] = compiling.compile_rasp_to_model(
            script.build_program(task),
            vocab=set(cfg["vocab"]),
            max_seq_len=cfg["max_seq_len"],
            causal=cfg.get("causal", False),
            compiler_bos="BOS",
            compiler_pad="compiler_pad",
            mlp_exactness=script.MLP_EXACTNESS,
        )
    return compiled


def _tracr_decoded(assembled, seqs):
    """``assembled.apply(["BOS", *seq]).decoded`` for every seq, as one jitted batch."""
    import jax
    import jax.numpy as jnp

    ids = np.array([assembled.input_encoder.encode(["BOS", *s]) for s in seqs])
    out = jax.jit(assembled.forward)(assembled.params, jnp.asarray(ids))
    rows = np.asarray(out.unembedded_output).tolist()
    return [["BOS", *assembled.output_encoder.decode(row)[1:]] for row in rows]


@pytest.mark.parametrize("task", TASKS)
def test_agrees_with_tracr_on_every_input(organisms, exhaustive, tracr_models_compiled, task):
    org, assembled = organisms[task], tracr_models_compiled[task]
    vocab = org.card["vocabulary"]["tokens"]
    tokens = exhaustive[task]["tokens"]
    raw = (lambda t: int(t)) if task == "sort" else (lambda t: t)
    seqs = [[raw(vocab[i]) for i in row[1:]] for row in tokens.tolist()]
    # the card's ids are tracr's input-encoder ids
    assert {
        raw(t) if t not in ("BOS", "compiler_pad") else t: i for i, t in enumerate(vocab)
    } == assembled.input_encoder.encoding_map
    theirs = _tracr_decoded(assembled, seqs)
    for i in (0, len(seqs) // 3, len(seqs) - 1):  # batching changes nothing
        assert assembled.apply(["BOS", *seqs[i]]).decoded == theirs[i]
    with torch.no_grad():
        logits = org.model(tokens)
    if task == "frac_prevs":
        ours = logits[..., 0].double().numpy()[:, 1:]
        ref = np.array([row[1:] for row in theirs], dtype=np.float64)
        agree = int((np.abs(ours - ref) < 1e-5).all(axis=1).sum())
    else:
        classes = org.card["output"]["classes"]
        ours = [[raw(classes[c]) for c in row[1:]] for row in logits.argmax(-1).tolist()]
        agree = sum(o == t[1:] for o, t in zip(ours, theirs, strict=True))
    print(f"{task}: agrees with tracr on {agree}/{len(seqs)} inputs")
    assert agree == len(seqs) == org.card["dataset"]["exhaustive_size"]


def test_the_script_rebuilds_the_shipped_files(tmp_path, capsys):
    """scripts/compile_tracr.py (a thin caller of from_tracr) regenerates the shipped cards
    byte for byte and the weights bit for bit (two organisms, to keep the test short)."""
    pytest.importorskip("tracr")
    spec = importlib.util.spec_from_file_location("compile_tracr", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--check", "--only", "reverse", "hist"]) == 0
    out = capsys.readouterr().out
    assert "reverse: card ok, weights ok" in out and "hist: card ok, weights ok" in out
