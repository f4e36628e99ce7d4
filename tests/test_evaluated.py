"""Evaluated's fallbacks (issue 23): where torch cannot compile the model or autocast, the model is
evaluated without it and one EvaluationWarning line says so; never a crash, never a masked error of
the model's own. And the rule that compiles by default, and Smooth's option.

torch.compile runs with the "eager" backend here (no C++ compilation: fast); one slow test compiles
with the default inductor backend, as ``ddrs`` does."""

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import ddrs_ext
from ddrs_ext import precision
from ddrs_ext.precision import COMPILE_MIN_ROWS, Evaluated, EvaluationWarning, compile_pays

EAGER = {"backend": "eager"}


def _cnn():
    torch.manual_seed(3)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 8 * 8, 4),
    ).eval()


def _inputs(count=3):
    return torch.rand(count, 1, 8, 8, generator=torch.Generator().manual_seed(1))


class _DataDependentBranch(torch.nn.Module):
    """A branch on a tensor's value: torch.compile(fullgraph=True) cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _cnn()

    def forward(self, x):
        out = self.net(x)
        if out.sum() > 1e9:
            return -out
        return out


def _certify(model, x=None, **kw):
    kw = {"n0": 10, "n": 200, "batch_size": 64, "seed": 5, **kw}
    return ddrs_ext.certify(model, _inputs() if x is None else x, 0.25, **kw)


def _evaluation_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, EvaluationWarning)]


# ----------------------------------------------------------------------------- compile


def test_a_model_that_does_not_compile_runs_uncompiled_with_one_line():
    model = _DataDependentBranch().eval()
    wrapped = Evaluated(model, compile={**EAGER, "fullgraph": True})
    with pytest.warns(EvaluationWarning) as record:
        got = _certify(wrapped)
    (text,) = _evaluation_warnings(record)
    assert text.startswith("torch.compile could not compile the model (Unsupported") and "\n" not in text
    assert "uncompiled (the same function)" in text
    assert wrapped.compile_options is None and wrapped.notes == [text]
    assert torch.equal(got.counts, _certify(model).counts)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EvaluationWarning)
        _certify(wrapped)  # said once


def test_a_model_that_compiles_gives_no_warning():
    # negative control of the test above: the same model, traced with graph breaks allowed
    model = _DataDependentBranch().eval()
    wrapped = Evaluated(model, compile=EAGER)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EvaluationWarning)
        got = _certify(wrapped)
    assert wrapped.compile_options == EAGER and wrapped.notes == []
    assert torch.equal(got.counts, _certify(model).counts)


def test_no_compiler_falls_back(monkeypatch):
    """What a machine without a C++ compiler for inductor does: the compiled call raises."""

    def broken_compile(model, **options):
        def compiled(x):
            raise RuntimeError("InductorError: CppCompileError: C++ compile error\ng++: not found")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = _cnn()
    wrapped = Evaluated(model, compile=True)
    with pytest.warns(EvaluationWarning, match=r"could not compile the model \(RuntimeError: InductorError"):
        got = _certify(wrapped)
    assert "\n" not in wrapped.notes[0]
    assert torch.equal(got.counts, _certify(model).counts)


def test_the_models_own_error_is_not_taken_for_a_compile_failure():
    class Picky(torch.nn.Module):
        def forward(self, x):
            raise ValueError("this model takes 3x32x32 images")

    wrapped = Evaluated(Picky(), compile=EAGER)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EvaluationWarning)
        with pytest.raises(ValueError, match="this model takes 3x32x32 images"):
            wrapped(_inputs())
    assert wrapped.compile_options == EAGER  # still compiled for the next call


def test_an_empty_options_dict_compiles(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **options: calls.append(options) or model)
    Evaluated(_cnn(), compile={})(_inputs())
    assert calls == [{}]
    Evaluated(_cnn(), compile=False)(_inputs())
    assert calls == [{}]


def test_the_batch_dimension_compiles_once():
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = _cnn()
    wrapped = Evaluated(model, compile={"backend": counting})
    rows = [wrapped(torch.rand(r, 1, 8, 8)) for r in (100, 37, 64)]
    assert len(graphs) == 1 and [len(r) for r in rows] == [100, 37, 64]
    # negative control: with dynamic=False each batch size compiles anew
    graphs.clear()
    static = Evaluated(model, compile={"backend": counting, "dynamic": False})
    for r in (100, 37, 64):
        static(torch.rand(r, 1, 8, 8))
    assert len(graphs) == 3


def _tangent_dropping_compile(model, **options):
    """torch.compile with inductor returns outputs without forward-mode tangents; so does this."""
    return lambda x: model(fwAD.unpack_dual(x).primal)


def test_reparam_sigma_optimisation_runs_uncompiled(monkeypatch):
    monkeypatch.setattr(torch, "compile", _tangent_dropping_compile)
    model = _cnn()
    kw = dict(iterations=3, num_samples=32, estimator="reparam", seed=1)
    wrapped = Evaluated(model, compile=True)
    with pytest.warns(EvaluationWarning, match="does not carry forward-mode derivatives"):
        got = ddrs_ext.optimize_sigma(wrapped, _inputs(), 0.25, **kw)
    assert torch.equal(got, ddrs_ext.optimize_sigma(model, _inputs(), 0.25, **kw))
    assert wrapped.compile_options == {}  # the plain forward passes stay compiled
    # negative control: the compiled model itself loses the derivatives
    with pytest.raises(ValueError, match="does not depend on its input through forward-mode autograd"):
        ddrs_ext.optimize_sigma(_tangent_dropping_compile(model), _inputs(), 0.25, **kw)


@pytest.mark.slow
def test_inductor_compiles_the_same_function():
    """The default backend (C++ code generation) where the machine has a compiler: the counts equal
    the eager model's up to copies within rounding of a decision boundary."""
    model = _cnn()
    wrapped = Evaluated(model, compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EvaluationWarning)
        got = _certify(wrapped, n=2000, batch_size=500)
    plain = _certify(model, n=2000, batch_size=500)
    assert (got.counts - plain.counts).abs().sum() <= 6


# ----------------------------------------------------------------------------- autocast


def test_autocast_that_torch_refuses_falls_back(monkeypatch):
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *device: False)
    model = _cnn()
    wrapped = Evaluated(model, autocast=torch.float16)
    with pytest.warns(EvaluationWarning, match="cannot autocast to float16 on cpu") as record:
        got = _certify(wrapped)
    (text,) = _evaluation_warnings(record)
    assert "certificates are about the model so evaluated" in text and "\n" not in text
    assert wrapped.autocast is None
    assert torch.equal(got.counts, _certify(model).counts)


def test_autocast_that_torch_does_gives_no_fallback(monkeypatch):
    # negative control: autocast kept, counts those of the model under autocast
    monkeypatch.setattr(precision, "_native_cpu_dtype", lambda dtype: True)
    model = _cnn()
    wrapped = Evaluated(model, autocast=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EvaluationWarning)
        got = _certify(wrapped)

    def by_hand(z):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(z)

    assert wrapped.autocast is torch.bfloat16
    assert torch.equal(got.counts, _certify(by_hand).counts)


@pytest.mark.parametrize("native", [False, True])
def test_emulated_bfloat16_is_said_once_and_still_used(monkeypatch, native):
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda native=native: native, raising=False)
    wrapped = Evaluated(_cnn(), autocast=torch.bfloat16)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        wrapped(_inputs())
        wrapped(_inputs())
    said = _evaluation_warnings(record)
    if native:
        assert said == []
    else:
        assert len(said) == 1 and said[0].startswith("this CPU has no native bfloat16 instructions")
    assert wrapped.autocast is torch.bfloat16 and wrapped(_inputs()).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- the default rule


def test_compile_pays_on_long_cpu_runs_only():
    assert not compile_pays(COMPILE_MIN_ROWS - 1, "cpu")
    assert compile_pays(COMPILE_MIN_ROWS, "cpu") and compile_pays(10**9, torch.device("cpu"))
    assert not compile_pays(10**9, "cuda")  # not measured there: asked for, not default


# ----------------------------------------------------------------------------- Smooth


def test_smooth_evaluates_its_classifier_as_asked():
    model = _cnn()
    x = _inputs(1)[0]
    plain = ddrs_ext.Smooth(model, 4, 0.25, seed=2)
    compiled = ddrs_ext.Smooth(model, 4, 0.25, seed=2, compile=EAGER)
    assert compiled.base_classifier is model  # core.Smooth's attribute, unchanged
    assert compiled.certify(x, 20, 300, 0.01, 64) == plain.certify(x, 20, 300, 0.01, 64)
    assert compiled.predict(x, 300, 0.01, 64) == plain.predict(x, 300, 0.01, 64)
    bf16 = ddrs_ext.Smooth(model, 4, 0.25, seed=2, autocast=torch.bfloat16)
    through = ddrs_ext.Smooth(Evaluated(model, autocast=torch.bfloat16), 4, 0.25, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EvaluationWarning)  # an emulated bfloat16 CPU says so
        assert bf16.certify(x, 20, 300, 0.01, 64) == through.certify(x, 20, 300, 0.01, 64)
        assert (bf16._sample_noise(x, 300, 64) == through._sample_noise(x, 300, 64)).all()


def test_smooth_bad_evaluation_options():
    with pytest.raises(ValueError, match="autocast must be None, torch.bfloat16 or torch.float16"):
        ddrs_ext.Smooth(_cnn(), 4, 0.25, autocast=torch.float64)
    with pytest.raises(TypeError, match="compile must be a bool or a dict"):
        ddrs_ext.Smooth(_cnn(), 4, 0.25, compile="yes")


def test_notify_takes_the_notes_instead_of_warnings(monkeypatch):
    def broken(model, **options):
        def call(x):
            raise RuntimeError("no C++ compiler")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    said: list[str] = []
    wrapped = Evaluated(_cnn(), compile=True, notify=said.append)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EvaluationWarning)
        wrapped(_inputs())
    assert len(said) == 1 and said == wrapped.notes and said[0].startswith("torch.compile could not compile")
    with pytest.raises(TypeError, match="notify must be None or a function of one string"):
        Evaluated(_cnn(), notify="print")
