"""Smooth as a true drop-in for core.Smooth (Cohen et al.), and sampling of models left in training
mode: eval mode for the call, every mode and buffer untouched afterwards (issue 9)."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

import ddrs_ext
from ddrs_ext import ABSTAIN, Smooth, certify, optimize_sigma, predict, surrogate_radius
from ddrs_ext.rng import PHASE_PREDICT


class BatchNormNet(torch.nn.Module):
    """A small CNN with BatchNorm whose running statistics differ from any batch's: in training mode
    its outputs depend on the other rows of the batch, in eval mode they do not."""

    def __init__(self, classes=3, dropout=0.0):
        super().__init__()
        torch.manual_seed(5)
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.drop = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(4 * 8 * 8, classes)
        with torch.no_grad():
            self.bn.running_mean.copy_(torch.tensor([0.3, -0.2, 0.1, 0.4]))
            self.bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.5, 0.8]))

    def forward(self, x):
        z = torch.relu(self.bn(self.conv(x)))
        return self.head(self.drop(z).flatten(1))


def _inputs(count=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(count, 1, 8, 8, generator=g)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, before):
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _modes(model):
    return [m.training for m in model.modules()]


# ---------------------------------------------------------------- eval mode for every sampling entry point

ENTRY_POINTS = {
    "certify": lambda m, x: certify(m, x, 0.25, n0=20, n=200, batch_size=64, seed=3).counts,
    "predict": lambda m, x: predict(m, x, 0.25, n=200, batch_size=64, seed=3),
    "optimize_sigma": lambda m, x: optimize_sigma(
        m, x, 0.25, iterations=3, num_samples=32, batch_size=50, seed=3, estimator="reparam"
    ),
    "optimize_sigma_score": lambda m, x: optimize_sigma(
        m, x, 0.25, iterations=3, num_samples=32, batch_size=50, seed=3, estimator="score"
    ),
    "surrogate_radius": lambda m, x: surrogate_radius(m, x, 0.25, num_samples=64, batch_size=50, seed=3),
    "Smooth.certify": lambda m, x: torch.tensor(Smooth(m, 3, 0.25, seed=3).certify(x[0], 20, 200, 0.01, 64)),
    "Smooth.predict": lambda m, x: torch.tensor(Smooth(m, 3, 0.25, seed=3).predict(x[0], 200, 0.01, 64)),
    "Smooth._sample_noise": lambda m, x: torch.from_numpy(
        Smooth(m, 3, 0.25, seed=3)._sample_noise(x[0], 200, 64)
    ),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_a_model_in_training_mode_is_sampled_in_eval_mode_and_left_untouched(entry):
    run = ENTRY_POINTS[entry]
    x = _inputs()
    model = BatchNormNet(dropout=0.3).train()
    model.head.eval()  # mixed modes must come back exactly as they were
    before, modes = _state(model), _modes(model)
    got = run(model, x)
    assert _same_state(model, before)  # no running statistic (or anything else) changed
    assert _modes(model) == modes
    reference = BatchNormNet(dropout=0.3).eval()
    assert torch.equal(got, run(reference, x))  # exactly what the model in eval mode gives


def test_the_check_has_teeth():
    """Sampled as is (through a plain function, which the library cannot see into), the same model in
    training mode gives other votes and overwrites its running statistics: what issue 9 found."""
    x = _inputs()
    model = BatchNormNet().train()
    before = _state(model)
    as_is = certify(lambda z: model(z), x, 0.25, n0=20, n=400, batch_size=64, seed=3).counts
    assert not _same_state(model, before)
    model.load_state_dict(before)
    evaluated = certify(model, x, 0.25, n0=20, n=400, batch_size=64, seed=3).counts
    assert not torch.equal(as_is, evaluated)


def test_a_bound_method_counts_as_its_module():
    x = _inputs()
    model = BatchNormNet().train()
    before = _state(model)
    got = certify(model.forward, x, 0.25, n0=20, n=200, seed=3).counts
    assert _same_state(model, before) and model.training
    assert torch.equal(got, certify(BatchNormNet().eval(), x, 0.25, n0=20, n=200, seed=3).counts)


def test_modes_are_restored_when_the_model_raises():
    model = BatchNormNet().train()
    calls = []

    def boom(module, args):
        calls.append(module.training)
        raise RuntimeError("model failed")

    handle = model.conv.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="model failed"):
        certify(model, _inputs(), 0.25, n0=5, n=10)
    handle.remove()
    assert calls == [False] and all(_modes(model))


def test_an_exported_model_is_sampled_as_exported():
    """torch.export's modules refuse eval(); their mode was fixed at export, so they run as they are."""
    x = _inputs()
    model = BatchNormNet().eval()
    exported = torch.export.export(model, (x,)).module()
    with pytest.raises(NotImplementedError):
        exported.eval()
    got = certify(exported, x, 0.25, n0=20, n=200, batch_size=4, seed=3)
    want = certify(model, x, 0.25, n0=20, n=200, batch_size=4, seed=3)
    assert torch.equal(got.counts, want.counts)


# ---------------------------------------------------------------- core.Smooth, transcribed


class CoreSmooth:
    """Cohen et al.'s core.Smooth algorithm, transcribed from the paper's pseudocode (CERTIFY and
    PREDICT) and the published class's structure, on current SciPy (binomtest, beta.ppf)."""

    ABSTAIN = -1

    def __init__(self, base_classifier, num_classes, sigma):
        self.base_classifier, self.num_classes, self.sigma = base_classifier, num_classes, sigma

    def certify(self, x, n0, n, alpha, batch_size):
        self.base_classifier.eval()
        c_hat = int(self._sample_noise(x, n0, batch_size).argmax())
        n_a = int(self._sample_noise(x, n, batch_size)[c_hat])
        p_lower = stats.beta.ppf(alpha, n_a, n - n_a + 1) if n_a > 0 else 0.0
        if p_lower < 0.5:
            return self.ABSTAIN, 0.0
        return c_hat, self.sigma * stats.norm.ppf(p_lower)

    def predict(self, x, n, alpha, batch_size):
        self.base_classifier.eval()
        counts = self._sample_noise(x, n, batch_size)
        top2 = counts.argsort()[::-1][:2]
        c1, c2 = int(counts[top2[0]]), int(counts[top2[1]])
        return self.ABSTAIN if stats.binomtest(c1, c1 + c2, 0.5).pvalue > alpha else int(top2[0])

    def _sample_noise(self, x, num, batch_size):
        with torch.no_grad():
            counts = np.zeros(self.num_classes, dtype=int)
            for _ in range(math.ceil(num / batch_size)):
                this = min(batch_size, num)
                num -= this
                batch = x.repeat((this, 1, 1, 1))
                noise = torch.randn_like(batch) * self.sigma
                predictions = self.base_classifier(batch + noise).argmax(1)
                counts += np.bincount(predictions.numpy(), minlength=self.num_classes)
            return counts


def test_smooth_matches_core_smooth_on_a_batchnorm_model_left_in_training_mode():
    """Same answers in distribution as core.Smooth's algorithm, with the model's state untouched."""
    x = _inputs(count=6, seed=2)[:5]  # the sixth input's top class has p ~ 0.54: a coin toss to certify
    sigma, n, alpha = 0.25, 2000, 0.001
    model = BatchNormNet().train()
    before = _state(model)
    ours = Smooth(model, 3, sigma, seed=7)
    mine = [ours._sample_noise(x[b], n, 500) for b in range(5)]
    certified = [ours.certify(x[b], 100, n, alpha, 500) for b in range(5)]
    predicted = [ours.predict(x[b], n, alpha, 500) for b in range(5)]
    assert _same_state(model, before) and model.training

    torch.manual_seed(11)
    core = CoreSmooth(model, 3, sigma)
    core_certified = [core.certify(x[b], 100, n, alpha, 500) for b in range(5)]  # calls model.eval()
    theirs = [core._sample_noise(x[b], n, 500) for b in range(5)]
    core_predicted = [core.predict(x[b], n, alpha, 500) for b in range(5)]
    assert not model.training  # core.Smooth leaves the model in eval mode; ours did not

    for a, b in zip(mine, theirs):
        assert a.sum() == b.sum() == n
        p = (a + b) / (2 * n)
        z = (a - b) / np.sqrt(np.maximum(2 * n * p * (1 - p), 1e-12))
        assert np.all(np.abs(z) < 4.5), (a, b)  # family-wise false alarm ~1e-4
    for (c1, r1), (c2, r2) in zip(certified, core_certified):
        assert c1 == c2
        assert abs(r1 - r2) < 0.06  # both radii from n = 2000 votes of the same smoothed classifier
    assert predicted == core_predicted
    assert {c for c, _ in certified} == {ABSTAIN, 1, 2}  # abstentions and two classes


# ---------------------------------------------------------------- hooks


def test_an_overridden_sample_noise_drives_certify_and_predict():
    class AlwaysSeven(Smooth):
        def _sample_noise(self, x, num, batch_size):
            counts = np.zeros(self.num_classes, dtype=int)
            counts[7] = num
            return counts

    smooth = AlwaysSeven(lambda z: torch.zeros(len(z), 10), 10, 0.5)
    c, r = smooth.certify(torch.zeros(3), 100, 1000, 0.001, 100)
    assert c == 7 and r == pytest.approx(0.5 * stats.norm.ppf(0.001 ** (1 / 1000)))
    assert smooth.predict(torch.zeros(3), 1000, 0.001, 100) == 7


def test_an_overridden_lower_confidence_bound_is_used():
    class Pessimist(Smooth):
        def _lower_confidence_bound(self, NA, N, alpha):  # noqa: N803
            return 0.4

    model = BatchNormNet().eval()
    assert Pessimist(model, 3, 0.25, seed=0).certify(_inputs()[0], 10, 100, 0.01, 50) == (ABSTAIN, 0.0)


def test_hook_helpers_have_core_meaning():
    smooth = Smooth(lambda z: z, 4, 0.5)
    assert smooth._count_arr(np.array([3, 0, 3, 1]), 4).tolist() == [1, 1, 0, 2]
    with pytest.raises(ValueError, match=r"class indices must lie in \[0, 4\)"):
        smooth._count_arr(np.array([4]), 4)
    for n_a, n in [(0, 10), (3, 10), (10, 10), (950, 1000)]:
        want = stats.beta.ppf(0.001, n_a, n - n_a + 1) if n_a else 0.0
        assert smooth._lower_confidence_bound(n_a, n, 0.001) == pytest.approx(want, abs=1e-15)


def test_sample_noise_draws_fresh_noise_per_call_and_reproduces_the_sequence():
    model = BatchNormNet().eval()
    x = _inputs()[0]
    a = Smooth(model, 3, 1.0, seed=4)
    b = Smooth(model, 3, 1.0, seed=4)
    first, second = a._sample_noise(x, 300, 64), a._sample_noise(x, 300, 64)
    assert not np.array_equal(first, second)  # a selection and an estimation must be independent
    assert np.array_equal(first, b._sample_noise(x, 300, 128))
    assert np.array_equal(second, b._sample_noise(x, 300, 7))
    assert np.array_equal(first, predict_counts(model, x, 1.0, 300, 4))


def predict_counts(model, x, sigma, n, seed):
    # Smooth's first draw under a seed is ddrs_ext.predict's noise
    return Smooth(model, 3, sigma, seed=seed)._sample_noise(x, n, 1000)


# ---------------------------------------------------------------- smaller differences


def test_sigma_zero_is_the_base_classifier():
    model = BatchNormNet().eval()
    x = _inputs()[1]
    base = int(model(x[None]).argmax())
    smooth = Smooth(model, 3, 0.0)
    assert smooth.certify(x, 100, 1000, 0.001, 100) == (base, 0.0)
    assert smooth.predict(x, 100, 0.001, 100) == base
    assert smooth._sample_noise(x, 50, 10).tolist() == [50 if c == base else 0 for c in range(3)]
    # core's statistics with n = 5: the lower bound 0.001 ** (1/5) = 0.25 < 1/2, so it abstains
    assert smooth.certify(x, 1, 5, 0.001, 100) == (ABSTAIN, 0.0)
    with pytest.raises(ValueError, match="sigma must be a finite number >= 0"):
        Smooth(model, 3, -0.1)


def test_more_classes_than_the_model_returns():
    model = BatchNormNet().eval()
    x = _inputs()[0]
    wide, exact = Smooth(model, 10, 0.25, seed=1), Smooth(model, 3, 0.25, seed=1)
    counts = wide._sample_noise(x, 200, 64)
    assert counts.shape == (10,) and counts[3:].sum() == 0
    assert counts[:3].tolist() == exact._sample_noise(x, 200, 64).tolist()
    assert wide.certify(x, 50, 500, 0.001, 64) == exact.certify(x, 50, 500, 0.001, 64)
    assert wide.predict(x, 500, 0.001, 64) == exact.predict(x, 500, 0.001, 64)


def test_n0_zero_is_refused():
    with pytest.raises(ValueError, match="n0 must be >= 1"):
        Smooth(BatchNormNet(), 3, 0.25).certify(_inputs()[0], 0, 100, 0.001, 10)


def test_a_batch_dimension_gets_a_hint():
    x = _inputs()[:1]  # (1, 1, 8, 8): one image with a batch dimension
    with pytest.raises(RuntimeError) as info:
        Smooth(BatchNormNet(), 3, 0.25).certify(x, 10, 100, 0.001, 10)
    assert "pass x[0]" in "\n".join(getattr(info.value, "__notes__", [])) or not hasattr(
        info.value, "add_note"
    )
    assert Smooth(BatchNormNet(), 3, 0.25, seed=0).certify(x[0], 10, 100, 0.001, 10)[0] in (0, 1, 2)


# ---------------------------------------------------------------- infinite logits


def test_log_probabilities_with_minus_inf_certify_like_logits():
    """A model returning log(softmax) with impossible classes (-Inf) is counted by its argmax."""
    model = BatchNormNet(classes=3).eval()

    def log_probs(z):
        out = torch.log_softmax(model(z), 1)
        return torch.cat([out, torch.full_like(out[:, :2], -math.inf)], 1)  # classes 3, 4 impossible

    x = _inputs()
    got = certify(log_probs, x, 0.25, n0=20, n=300, seed=2)
    want = certify(model, x, 0.25, n0=20, n=300, seed=2)
    assert torch.equal(got.counts[:, :3], want.counts) and got.counts[:, 3:].sum() == 0
    assert torch.equal(got.prediction, want.prediction)
    assert Smooth(log_probs, 5, 0.25, seed=2).predict(x[0], 300, 0.001, 64) == int(
        predict(model, x[:1], 0.25, n=300, seed=2)[0]
    )


def test_a_nan_logit_is_still_an_error_naming_the_input():
    def nan_model(z):
        out = torch.zeros(len(z), 3)
        out[:, 1] = float("inf")
        out[z.flatten(1)[:, 0] > 5, 2] = float("nan")
        return out

    x = torch.zeros(3, 4)
    x[2, 0] = 10.0
    with pytest.raises(ValueError, match="NaN for input 2"):
        certify(nan_model, x, 0.01, n0=3, n=5)
    assert ddrs_ext.certify(nan_model, x[:2], 0.01, n0=3, n=5).counts[:, 1].tolist() == [5, 5]


# ---------------------------------------------------------------- fresh noise for every call (issue 17)


class NoiseSpy(torch.nn.Module):
    """Logits (0, w.x) on 16-d inputs (at x = 0 each class gets half the votes), recording every batch."""

    def __init__(self):
        super().__init__()
        self.w = torch.randn(16, generator=torch.Generator().manual_seed(0))
        self.batches = []

    def forward(self, z):
        self.batches.append(z.clone())
        s = z @ self.w
        return torch.stack([torch.zeros_like(s), s], 1)


def _two_inputs():
    return torch.zeros(16), torch.linspace(-0.05, 0.05, 16)


def assert_noise_uncorrelated_across_calls(smooth: Smooth, spy: NoiseSpy, sigma: float) -> None:
    """Certify two inputs, alternately, ten times each: each call's noise (and within a call, its
    selection's and its estimation's) must be uncorrelated with every other's."""
    a, b = _two_inputs()
    spy.batches.clear()
    for _ in range(10):
        smooth.certify(a, 64, 64, 0.01, 64)
        smooth.certify(b, 64, 64, 0.01, 64)
    inputs = [a, a, b, b] * 10  # two batches (selection, estimation) per call
    assert len(spy.batches) == 40
    noise = torch.stack([((z - x) / sigma).flatten() for z, x in zip(spy.batches, inputs)]).double()
    off = torch.corrcoef(noise)[~torch.eye(40, dtype=torch.bool)]
    # 1024 values per batch: under independence r has sd 1/32; 6 sd over 780 pairs: ~1e-6 by chance.
    assert float(off.abs().max()) < 6 / 32, (
        f"correlated noise between calls: max |r| = {float(off.abs().max())}"
    )


def assert_votes_vary_binomially(smooth: Smooth, spy: NoiseSpy) -> None:
    """40 predict calls on an input whose classes each get half the votes: the class-1 votes of the
    calls must spread as independent Binomial(n, 1/2) counts do (a chi-square band on their variance)."""
    a, _ = _two_inputs()
    spy.batches.clear()
    n = 200
    for _ in range(40):
        smooth.predict(a, n, 0.01, n)
    ones = torch.stack([(z @ spy.w > 0).sum() for z in spy.batches]).double()
    variance = float(ones.var())
    low, high = stats.chi2.ppf([1e-5, 1 - 1e-5], 39) / 39 * n / 4
    assert low < variance < high, f"votes of 40 calls vary by {variance}, Binomial({n}, 1/2) by {n / 4}"


@pytest.mark.parametrize("seed", [3, None])  # None: torch's generator
def test_every_call_draws_fresh_independent_noise(seed):
    spy = NoiseSpy()
    assert_noise_uncorrelated_across_calls(Smooth(spy, 2, 0.5, seed=seed), spy, 0.5)
    assert_votes_vary_binomially(Smooth(spy, 2, 0.5, seed=seed), spy)


def test_negative_control_the_old_fixed_stream_fails_the_independence_checks(monkeypatch):
    """Before issue 17 every call of a Smooth with a seed drew stream 0's noise: both checks reject it."""
    monkeypatch.setattr(Smooth, "_take_stream", lambda self, index: 0)
    spy = NoiseSpy()
    with pytest.raises(AssertionError, match="correlated noise between calls"):
        assert_noise_uncorrelated_across_calls(Smooth(spy, 2, 0.5, seed=3), spy, 0.5)
    with pytest.raises(AssertionError, match="votes of 40 calls vary by 0.0"):
        assert_votes_vary_binomially(Smooth(spy, 2, 0.5, seed=3), spy)


def test_a_sequence_of_calls_is_reproducible_and_equals_batched_certify():
    _, b = _two_inputs()
    model = NoiseSpy()
    a = model.w * (0.45 / model.w.norm())  # class 1 with probability Phi(0.9) = 0.82 at sigma 0.5

    def run(batch_size):
        smooth = Smooth(model, 2, 0.5, seed=11)
        return [
            smooth.certify(a, 30, 300, 0.01, batch_size),
            smooth.predict(b, 300, 0.01, batch_size),
            smooth.certify(a, 30, 300, 0.01, batch_size),  # the same input again: new noise
            smooth._sample_noise(b, 300, batch_size).tolist(),
        ]

    first = run(64)
    assert first == run(7) == run(1000)
    assert first[0][0] == first[2][0] == 1 and first[0][1] != first[2][1]  # two independent estimates
    # k-th certify call = ddrs_ext.certify with index [k]: a data set certified in order, call by call,
    # is one batched certify call.
    x = torch.stack([a, b, a + 0.03, b - 0.02])
    smooth = Smooth(model, 2, 0.5, seed=11)
    calls = [smooth.certify(x[i], 30, 300, 0.01, 50) for i in range(4)]
    batched = certify(model, x, 0.5, n0=30, n=300, alpha=0.01, seed=11)
    assert calls == list(zip(batched.prediction.tolist(), batched.radius.tolist()))


def test_index_pins_a_call_to_a_stream_whatever_came_before():
    model = NoiseSpy()
    x = torch.stack([*_two_inputs(), torch.full((16,), 0.01)])
    index = [7, 3, 12]
    batched = certify(model, x, 0.5, n0=30, n=300, alpha=0.01, seed=2, index=index)
    smooth = Smooth(model, 2, 0.5, seed=2)
    smooth.certify(x[0], 30, 300, 0.01, 64)  # a counted call first: takes stream 0
    got = {i: smooth.certify(x[i], 30, 300, 0.01, 64, index=index[i]) for i in (2, 0, 1)}
    assert [got[i] for i in range(3)] == list(zip(batched.prediction.tolist(), batched.radius.tolist()))
    assert smooth._calls == 1  # pinned calls do not advance the count
    votes = predict(model, x[:1], 0.5, n=300, alpha=0.01, seed=2, index=[9])
    assert Smooth(model, 2, 0.5, seed=2).predict(x[0], 300, 0.01, 64, index=9) == int(votes[0])
    for bad, error in [(-1, ValueError), (2**32, ValueError), (1.0, TypeError), (True, TypeError)]:
        with pytest.raises(error, match="index must"):
            smooth.certify(x[0], 30, 300, 0.01, 64, index=bad)


def test_hooks_draw_disjoint_samples_of_one_stream_per_call():
    """core.Smooth's CERTIFY through the hooks: the selection and the estimation of one call are
    disjoint ranges of its stream; the next call takes the next stream; the sequence reproduces."""

    class OwnBound(Smooth):
        def _lower_confidence_bound(self, NA, N, alpha):  # noqa: N803
            return float(stats.beta.ppf(alpha, NA, N - NA + 1)) if NA else 0.0

    spy = NoiseSpy()
    a, _ = _two_inputs()
    smooth = OwnBound(spy, 2, 0.5, seed=4)
    answers = [smooth.certify(a, 64, 64, 0.01, 64) for _ in range(3)]
    noise = torch.stack([z.flatten() for z in spy.batches])  # x = 0: the batches are the noise
    assert noise.shape[0] == 6
    r = torch.corrcoef(noise.double())
    assert float(r[~torch.eye(6, dtype=torch.bool)].abs().max()) < 6 / 32
    # call k's selection is samples [0, 64) of stream k in predict's phase, its estimation [64, 128)
    for batch, (stream, offset) in enumerate([(0, 0), (0, 64), (1, 0), (1, 64), (2, 0), (2, 64)]):
        want, _ = ddrs_ext.ops.perturb_gaussian(
            torch.zeros(1, 16), torch.tensor([0.5]), torch.tensor([stream]), 4, PHASE_PREDICT + offset, 64
        )
        assert torch.equal(spy.batches[batch], want), batch
    again = OwnBound(spy, 2, 0.5, seed=4)
    assert [again.certify(a, 64, 64, 0.01, 64) for _ in range(3)] == answers
