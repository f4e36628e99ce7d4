"""The random number generator: Philox4x32-10 bits and the Gaussian transform."""

import numpy as np
import pytest
import torch
from scipy import stats

from ddrs_ext import ops, reference

# Known-answer vectors published with Random123 (Salmon et al., SC'11) for philox4x32_10.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def _seed(key):
    return key[0] | (key[1] << 32)


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    got = ops.philox4x32_10(torch.tensor([counter]), _seed(key))
    assert tuple(got[0].tolist()) == expected
    ref = reference.philox4x32_10(tuple(torch.tensor([c]) for c in counter), key)
    assert tuple(int(w) for w in ref) == expected


@pytest.mark.parametrize("seed", [0, 1, 0x1234_5678_9ABC_DEF0, 2**64 - 1])
def test_philox_raw_stream_equals_randomgen(seed):
    """The kernel's raw 32-bit stream equals randomgen's Philox(number=4, width=32)."""
    randomgen = pytest.importorskip("randomgen")
    start = 0xFFFF_FFF0  # crosses a carry from counter word 0 into word 1
    gen = randomgen.Philox(key=seed, counter=start, number=4, width=32)
    expected = gen.random_raw(4 * 64).astype(np.int64).reshape(64, 4)  # blocks start+1 .. start+64
    blocks = start + 1 + np.arange(64, dtype=np.int64)
    counters = torch.from_numpy(
        np.stack([blocks & 0xFFFFFFFF, blocks >> 32, np.zeros(64, np.int64), np.zeros(64, np.int64)], 1)
    )
    np.testing.assert_array_equal(ops.philox4x32_10(counters, seed).numpy(), expected)


def test_philox_rejects_bad_counters():
    with pytest.raises(ValueError, match="shape"):
        ops.philox4x32_10(torch.zeros(3, 3, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match=r"\[0, 2\^32\)"):
        ops.philox4x32_10(torch.tensor([[2**32, 0, 0, 0]]), 0)
    with pytest.raises(ValueError, match="seed"):
        ops.philox4x32_10(torch.zeros(1, 4, dtype=torch.int64), -1)


def test_noise_uses_philox_words_as_documented():
    """Element j of sample i of stream s: block j // 4 at counter (j // 4, lo(i), hi(i), s)."""
    seed, stream, sample = 77, 5, 2**33 + 9
    x = torch.zeros(1, 8)
    out, _ = ops.perturb_gaussian(x, torch.ones(1), torch.tensor([stream]), seed, sample, 1)
    counters = torch.tensor([[q, sample & 0xFFFFFFFF, sample >> 32, stream] for q in range(2)])
    w = ops.philox4x32_10(counters, seed)
    z = []
    for q in range(2):
        for a, b in ((0, 1), (2, 3)):
            z.extend(reference.box_muller(w[q, a : a + 1], w[q, b : b + 1]))
    torch.testing.assert_close(out[0], torch.cat(z), rtol=0, atol=0)


def test_gaussian_transform_accuracy():
    """Box-Muller with the kernel's own log and sin/cos stays within a few float32 ulps of exact."""
    g = np.random.default_rng(3)
    a = torch.from_numpy(g.integers(0, 2**32, 200_000, dtype=np.int64))
    b = torch.from_numpy(g.integers(0, 2**32, 200_000, dtype=np.int64))
    z0, z1 = reference.box_muller(a, b)
    # The exact transform of the float32 uniforms the kernel forms (a float32 u1 near 1
    # carries a relative rounding error of its own into log u1).
    u1 = ((a >> 1).float() * 2.0**-31 + 2.0**-32).double()
    t = (b >> 8).double() * 2.0**-24
    r = torch.sqrt(-2 * torch.log(u1))
    exact0, exact1 = r * torch.cos(2 * np.pi * t), r * torch.sin(2 * np.pi * t)
    # Error relative to the pair's radius (cos/sin near zero have tiny values, not tiny errors).
    err = torch.maximum((z0.double() - exact0).abs(), (z1.double() - exact1).abs()) / r.clamp_min(1e-3)
    assert err.max() < 4e-7


def test_gaussian_distribution():
    x = torch.zeros(1, 4096)
    out, sq = ops.perturb_gaussian(x, torch.ones(1), torch.tensor([11]), 2024, 0, 50, with_sq_norm=True)
    z = out.flatten().double().numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-4
    assert abs(z.mean()) < 5 / np.sqrt(z.size)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / z.size)
    # ||eps||^2 is chi-square with D degrees of freedom.
    assert stats.kstest(sq.numpy(), "chi2", args=(4096,)).pvalue > 1e-4
    # Neighbouring elements, samples and streams are uncorrelated.
    zz = out.double().numpy()
    for u, v in ((zz[:, :-1], zz[:, 1:]), (zz[:-1], zz[1:])):
        assert abs(np.corrcoef(u.ravel(), v.ravel())[0, 1]) < 5 / np.sqrt(u.size)
    other, _ = ops.perturb_gaussian(x, torch.ones(1), torch.tensor([12]), 2024, 0, 50)
    assert abs(np.corrcoef(z, other.flatten().double().numpy())[0, 1]) < 5 / np.sqrt(z.size)
