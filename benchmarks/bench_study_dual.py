"""The dual-sigma study (``study_dual.py``) end to end on its --quick settings (seconds): every row is
there, the dual certificate's classifier part is each expert's own certificate at alpha / 2, no route
beats the oracle's ACR, and the command line prints the table. Numbers at these sizes mean nothing; the
study itself is ``python benchmarks/study_dual.py``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import study_dual
import torch

import ddrs_ext
from ddrs_ext.models import digits_cnn


@pytest.fixture(scope="module")
def quick_run():
    torch.set_num_threads(1)
    recipe = dataclasses.replace(study_dual.Recipe(), **study_dual.QUICK_RECIPE)
    evaluation = dataclasses.replace(study_dual.Evaluation(split="validation"), **study_dual.QUICK_EVALUATION)
    result = study_dual.run(recipe, evaluation, study_dual.Cache(None), log=lambda m: None, check_dual=True)
    return recipe, evaluation, result


def test_study_rows_and_report(quick_run):
    recipe, evaluation, result = quick_run
    rows = result["rows"]
    K, baselines = len(recipe.levels), result["baselines"]
    # generalists, the extra fixed sigmas, the specialists above the lowest level, then the oracle
    assert baselines == K + len(recipe.fixed_extra) + K - 1
    assert [r.label.split(" ")[0] for r in rows[baselines:]] == ["oracle", "dual,", "cascade", "confidence"]
    oracle = rows[baselines].radius
    for row in rows:
        assert row.radius.shape == (evaluation.count,)
    for row in rows[baselines + 1 :]:  # no route certifies any input beyond its best expert at alpha / 2
        assert bool((row.radius <= oracle + 1e-12).all()), row.label
    text = study_dual.report(result, recipe, evaluation)
    assert "| oracle (best level per input, α/2) |" in text and "Targets:" in text
    assert "| row | r=0 | r=0.25 |" in text


def test_at_alpha_is_certify_at_that_alpha():
    torch.manual_seed(0)
    model = digits_cnn().eval()
    x = torch.rand(6, 1, 8, 8)
    big = ddrs_ext.certify(model, x, 0.25, n0=20, n=300, alpha=0.2, seed=3)
    small = ddrs_ext.certify(model, x, 0.25, n0=20, n=300, alpha=0.01, seed=3)
    derived = study_dual.at_alpha(big, 0.01)
    assert torch.equal(derived.prediction, small.prediction)
    np.testing.assert_allclose(derived.radius.numpy(), small.radius.numpy(), rtol=1e-12)


def test_command_line(capsys):
    assert study_dual.main(["--quick", "--no-cache", "--split", "validation", "--routes", "cascade"]) == 0
    out = capsys.readouterr().out
    assert "| cascade (p0=0.5) |" in out and "| expert σ=1 alone |" in out
