"""DGPO's pure math (dgpo_trl.functional) on plain tensors, against a float64 full-softmax reference."""

import math
import subprocess
import sys

import pytest
import torch

from dgpo_trl.functional import (
    effective_sample_size,
    nonfinite_sequences,
    sequence_moments,
    tau_for_target_ess,
    token_divergence_and_entropy,
    token_scores,
    token_statistics,
    token_statistics_reference,
    token_weights,
    weights_from_scores,
)


def random_heads(n=53, hidden=24, vocab=211, seed=0, shift=0.5, bias=False):
    g = torch.Generator().manual_seed(seed)
    policy_hidden = torch.randn(n, hidden, generator=g)
    ref_hidden = policy_hidden + shift * torch.randn(n, hidden, generator=g)
    policy_weight = torch.randn(vocab, hidden, generator=g) / math.sqrt(hidden) * 3
    ref_weight = policy_weight + shift * torch.randn(vocab, hidden, generator=g) / math.sqrt(hidden)
    labels = torch.randint(0, vocab, (n,), generator=g)
    biases = {}
    if bias:
        biases = {"policy_bias": torch.randn(vocab, generator=g), "ref_bias": torch.randn(vocab, generator=g)}
    return policy_hidden, policy_weight, ref_hidden, ref_weight, labels, biases


@pytest.mark.parametrize("chunk_size", [1, 16, 64, 211, 4096])
@pytest.mark.parametrize("token_chunk_size", [7, 1024])
def test_statistics_match_float64_reference(chunk_size, token_chunk_size):
    # 211 is prime: every chunk size but 1 and 211 leaves a ragged last tile
    hp, wp, hq, wq, labels, biases = random_heads(bias=True)
    kw = dict(temperature=0.7, **biases)
    fast = token_statistics(hp, wp, hq, wq, labels, chunk_size=chunk_size, token_chunk_size=token_chunk_size, **kw)
    ref = token_statistics_reference(hp, wp, hq, wq, labels, **kw)
    for name, got, want in zip(fast._fields, fast, ref):
        assert got.dtype == torch.float32 and got.shape == (53,), name
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, msg=name)
    # The statistics are not trivially zero: the comparison above means something
    assert ref.hellinger.mean() > 0.1 and ref.reverse_kl.mean() > 0.5 and ref.entropy.mean() > 0.5


def test_logit_scale_softcap_and_temperature_are_applied_like_trl():
    hp, wp, hq, wq, labels, _ = random_heads(seed=1)
    kw = dict(temperature=1.3, logit_scale=0.8, final_logit_softcapping=4.0)
    fast = token_statistics(hp, wp, hq, wq, labels, chunk_size=50, **kw)
    ref = token_statistics_reference(hp, wp, hq, wq, labels, **kw)
    for name, got, want in zip(fast._fields, fast, ref):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, msg=name)
    # ... and they matter: without them the entropy differs
    plain = token_statistics(hp, wp, hq, wq, labels, chunk_size=50)
    assert (plain.entropy - fast.entropy).abs().max() > 0.05


def test_public_divergence_and_entropy_selects_the_divergence():
    hp, wp, hq, wq, _, _ = random_heads(seed=2)
    ref = token_statistics_reference(hp, wp, hq, wq)
    d, h = token_divergence_and_entropy(hp, wp, hq, wq, chunk_size=32)
    torch.testing.assert_close(d, ref.hellinger, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(h, ref.entropy, atol=2e-5, rtol=1e-4)
    kl, _ = token_divergence_and_entropy(hp, wp, hq, wq, chunk_size=32, divergence="reverse_kl")
    torch.testing.assert_close(kl, ref.reverse_kl, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="divergence must be one of"):
        token_divergence_and_entropy(hp, wp, hq, wq, divergence="forward_kl")


def test_hellinger_is_zero_for_equal_models_and_bounded():
    hp, wp, _, _, labels, _ = random_heads(seed=3)
    same = token_statistics(hp, wp, hp, wp, labels, chunk_size=16)
    assert torch.equal(same.hellinger, torch.zeros_like(same.hellinger))
    assert torch.equal(same.reverse_kl, torch.zeros_like(same.reverse_kl))
    assert torch.equal(same.policy_logps, same.ref_logps)
    for seed in range(5):
        hp, wp, hq, wq, _, _ = random_heads(seed=seed, shift=3.0)
        d = token_statistics(hp, wp, hq, wq, chunk_size=16).hellinger
        assert d.min() >= 0.0 and d.max() <= 1.0


def test_hellinger_tends_to_one_for_disjoint_supports():
    # Policy mass on the first half of the vocabulary, reference mass on the second half
    vocab, hidden = 64, 2
    weight = torch.zeros(vocab, hidden)
    weight[: vocab // 2, 0] = 1.0
    weight[vocab // 2 :, 1] = 1.0
    for gap in [5.0, 20.0, 60.0]:
        policy_hidden = torch.tensor([[gap, 0.0]])
        ref_hidden = torch.tensor([[0.0, gap]])
        d = token_statistics(policy_hidden, weight, ref_hidden, weight, chunk_size=10).hellinger.item()
        # Bhattacharyya coefficient of these two step distributions: 2 e^(g/2) / (e^g + 1) = 1 / cosh(g / 2)
        assert d == pytest.approx(1.0 - 1.0 / math.cosh(gap / 2), abs=1e-6)
    assert d == 1.0


def test_reverse_kl_explodes_where_hellinger_weight_stays_bounded():
    """Appendix A.1: as pi_ref(a*) -> 0 for the token pi_theta samples, KL grows without bound, d saturates at 1,
    and w = T * softmax(s / tau) stays below T."""
    vocab, hidden, n = 8, 8, 6
    weight = torch.eye(vocab, hidden) * 1.0
    policy_hidden = torch.zeros(n, hidden)
    policy_hidden[0, 3] = 4.0  # the explored token a* = 3 is likely under pi_theta at position 0
    kls, ds, weights = [], [], []
    for suppression in [2.0, 8.0, 32.0, 128.0]:
        ref_hidden = torch.zeros(n, hidden)
        ref_hidden[0, 3] = -suppression  # pi_ref(a* | ctx_0) -> 0
        stats = token_statistics(policy_hidden, weight, ref_hidden, weight, chunk_size=3)
        mask = torch.ones(1, n, dtype=torch.bool)
        kls.append(stats.reverse_kl[0].item())
        ds.append(stats.hellinger[0].item())
        w_kl = token_weights(
            stats.reverse_kl.unsqueeze(0), stats.entropy.unsqueeze(0), mask, tau=0.5, kappa=0.0, vocab_size=vocab
        )
        w_h = token_weights(
            stats.hellinger.unsqueeze(0), stats.entropy.unsqueeze(0), mask, tau=0.5, kappa=0.0, vocab_size=vocab
        )
        weights.append((w_kl[0, 0].item(), w_h[0, 0].item()))
    assert all(b > a * 2 for a, b in zip(kls[1:], kls[2:])) and kls[-1] > 50  # grows without bound (~linearly)
    # d saturates: at pi_ref(a*) = 0 the coefficient keeps the mass both share, sqrt(1 - pi_theta(a*))
    p_star = math.exp(4) / (math.exp(4) + vocab - 1)
    assert all(0.0 <= d <= 1.0 for d in ds) and ds[-1] == pytest.approx(1 - math.sqrt(1 - p_star), abs=1e-5)
    hellinger_weights = [w for _, w in weights]
    # the bounded score can move the weight at most by e^(1/tau) relative to the others
    assert max(hellinger_weights) < n * math.exp(1 / 0.5) / (n - 1 + math.exp(1 / 0.5)) + 1e-5
    assert weights[-1][0] > n - 1e-3  # the KL score puts the whole sequence's credit on one token


def test_weights_positive_on_valid_zero_elsewhere_mean_one():
    g = torch.Generator().manual_seed(0)
    divergence, entropy = torch.rand(5, 9, generator=g), torch.rand(5, 9, generator=g) * math.log(100)
    mask = torch.ones(5, 9, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, :] = False  # empty completion
    mask[3, 0] = False  # a hole (e.g. a tool output)
    w = token_weights(divergence, entropy, mask, tau=0.2, kappa=1.0, vocab_size=100)
    assert w.shape == mask.shape and torch.isfinite(w).all()
    assert (w[mask] > 0).all() and (w[~mask] == 0).all()
    lengths = mask.sum(-1)
    means = w.sum(-1)[lengths > 0] / lengths[lengths > 0]
    torch.testing.assert_close(means, torch.ones_like(means), atol=1e-6, rtol=0)
    assert w.std() > 0.1  # not uniform at tau = 0.2
    # the softmax runs over each sequence's own valid tokens only
    s = token_scores(divergence, entropy, kappa=1.0, vocab_size=100)
    expected = 6 * torch.softmax(s[1, :6] / 0.2, dim=0)
    torch.testing.assert_close(w[1, :6], expected)


def test_kappa_zero_ignores_entropy_and_kappa_gates_it():
    g = torch.Generator().manual_seed(1)
    divergence = torch.rand(3, 7, generator=g)
    mask = torch.ones(3, 7, dtype=torch.bool)
    a = token_weights(divergence, torch.rand(3, 7, generator=g), mask, tau=0.3, kappa=0.0, vocab_size=50)
    b = token_weights(divergence, torch.rand(3, 7, generator=g) * 3, mask, tau=0.3, kappa=0.0, vocab_size=50)
    torch.testing.assert_close(a, b)
    # with kappa = 1 a zero-entropy (confident) token gets score 0 whatever its divergence
    entropy = torch.full((3, 7), math.log(50))
    entropy[:, 2] = 0.0
    s = token_scores(divergence, entropy, kappa=1.0, vocab_size=50)
    assert (s[:, 2] == 0).all()
    torch.testing.assert_close(s[:, 0], divergence[:, 0])


@pytest.mark.parametrize("entropy_gate", ["normalized", "nats"])
@pytest.mark.parametrize("kappa", [0.0, 0.5, 1.0, 2.0])
def test_both_entropy_gates_match_a_float64_recomputation(entropy_gate, kappa):
    # Eq. 12: s = d * (H / log V) ** kappa; Eq. 3: s = d * H ** kappa (H in nats)
    hp, wp, hq, wq, labels, _ = random_heads(n=60, seed=4, vocab=97, shift=1.0)
    stats = token_statistics(hp, wp, hq, wq, labels, temperature=0.9, chunk_size=32)
    ref = token_statistics_reference(hp.double(), wp.double(), hq.double(), wq.double(), labels, temperature=0.9)
    divergence, entropy = stats.hellinger.view(5, -1), stats.entropy.view(5, -1)
    p = torch.log_softmax((hp.double() @ wp.double().t()) / 0.9, dim=-1)
    entropy64 = -(p.exp() * p).sum(-1).view(5, -1)  # written out again, not taken from the reference's fields
    gate = entropy64 / math.log(97) if entropy_gate == "normalized" else entropy64
    expected_scores = ref.hellinger.double().view(5, -1) * gate**kappa
    mask = torch.ones(5, divergence.size(1), dtype=torch.bool)
    mask[2, 4:] = False
    got_scores = token_scores(divergence, entropy, kappa=kappa, vocab_size=97, entropy_gate=entropy_gate)
    torch.testing.assert_close(got_scores.double(), expected_scores, atol=1e-5, rtol=1e-4)
    got = token_weights(divergence, entropy, mask, tau=0.05, kappa=kappa, vocab_size=97, entropy_gate=entropy_gate)
    logits = (expected_scores / 0.05).masked_fill(~mask, -math.inf)
    expected = mask.sum(-1, keepdim=True) * torch.softmax(logits, dim=-1)
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)
    assert expected.std() > 0.05  # the weights are not trivially uniform


def test_the_nats_gate_is_the_normalized_gate_at_a_rescaled_tau():
    g = torch.Generator().manual_seed(5)
    divergence, entropy = torch.rand(4, 9, generator=g) * 0.2, torch.rand(4, 9, generator=g) * math.log(1000)
    mask = torch.ones(4, 9, dtype=torch.bool)
    kw = dict(kappa=1.5, vocab_size=1000)
    nats = token_weights(divergence, entropy, mask, tau=0.5, entropy_gate="nats", **kw)
    normalized = token_weights(divergence, entropy, mask, tau=0.5 / math.log(1000) ** 1.5, **kw)
    torch.testing.assert_close(nats, normalized, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(nats, token_weights(divergence, entropy, mask, tau=0.5, **kw), atol=1e-3)
    with pytest.raises(ValueError, match=r"entropy_gate must be one of \['normalized', 'nats'\]"):
        token_scores(divergence, entropy, entropy_gate="bits", **kw)


@pytest.mark.parametrize("spread", [1e-6, 1e-5, 5.7e-5, 1e-4, 1e-3, 1e-2, 1e-1])
def test_spread_statistics_resolve_weights_near_one(spread):
    # Weights as DGPO makes them (mean exactly 1 per sequence), spread from 1e-6 to 1e-1: the moments and the ESS
    # must match float64 where E[w^2] - E[w]^2 in float32 cancels (a true std of 5.7e-5 read as 0)
    g = torch.Generator().manual_seed(6)
    scores = torch.randn(8, 64, generator=g, dtype=torch.float64)
    mask = torch.ones(8, 64, dtype=torch.bool)
    mask[3, 40:] = False
    tau = scores.std().item() / spread  # w ~ 1 + (s - mean s) / tau: std ~ spread
    weights = weights_from_scores(scores, mask, tau)
    assert weights.dtype == torch.float64
    w = torch.where(mask, weights, 0.0)
    lengths = mask.sum(-1)
    true_var = torch.stack([w[i, : lengths[i]].var(unbiased=False) for i in range(8)])
    assert true_var.sqrt().mean().item() == pytest.approx(spread, rel=0.5)
    mean, variance = sequence_moments(weights, mask)
    torch.testing.assert_close(mean, torch.ones(8, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(variance, true_var, rtol=1e-6, atol=0)
    ess = effective_sample_size(weights, mask)
    true_ess = w.sum(-1).square() / (lengths * w.square().sum(-1))
    torch.testing.assert_close(ess, 1 / (1 + true_var), rtol=0, atol=1e-15)
    assert (ess < 1).all() and ((true_ess - ess).abs() < 1e-12).all()
    # float32 weights (what training uses): still resolved to about 1% at spread 1e-6
    _, variance32 = sequence_moments(weights.float(), mask)
    torch.testing.assert_close(variance32.sqrt(), true_var.sqrt(), rtol=2e-2, atol=0)


def test_large_tau_gives_uniform_weights_small_tau_concentrates():
    g = torch.Generator().manual_seed(2)
    divergence, entropy = torch.rand(4, 11, generator=g), torch.rand(4, 11, generator=g)
    mask = torch.ones(4, 11, dtype=torch.bool)
    w = token_weights(divergence, entropy, mask, tau=1e6, kappa=1.0, vocab_size=2)
    torch.testing.assert_close(w, torch.ones_like(w), atol=1e-5, rtol=0)
    w = token_weights(divergence, entropy, mask, tau=1e-4, kappa=1.0, vocab_size=2)
    assert (w.amax(-1) > 11 - 1e-3).all()
    ess = effective_sample_size(w, mask)
    torch.testing.assert_close(ess, torch.full((4,), 1 / 11), atol=1e-4, rtol=0)


def test_nonfinite_scores_fall_back_to_uniform_weights():
    divergence = torch.rand(3, 5)
    entropy = torch.rand(3, 5)
    divergence[1, 2] = float("nan")
    entropy[2, 4] = float("inf")
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 4] = False  # a non-finite value on an invalid token does not matter
    scores = token_scores(divergence, entropy, kappa=1.0, vocab_size=10)
    assert nonfinite_sequences(scores, mask).tolist() == [False, True, False]
    w = token_weights(divergence, entropy, mask, tau=0.1, kappa=1.0, vocab_size=10)
    assert torch.isfinite(w).all()
    assert torch.equal(w[1], torch.ones(5))
    assert w[0].std() > 0 and w[2, 4] == 0


@pytest.mark.parametrize("target", [0.3, 0.8, 0.95])
def test_tau_for_target_ess_meets_the_target(target):
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(6, 20, generator=g) * 0.2
    mask = torch.ones(6, 20, dtype=torch.bool)
    mask[0, 12:] = False
    tau = tau_for_target_ess(scores, mask, target, fallback=0.5)
    assert math.isfinite(tau) and tau > 0
    ess = effective_sample_size(weights_from_scores(scores, mask, tau), mask).mean().item()
    assert abs(ess - target) < 1e-3


def test_tau_for_target_ess_falls_back_on_flat_or_empty_batches():
    mask = torch.ones(4, 10, dtype=torch.bool)
    assert tau_for_target_ess(torch.zeros(4, 10), mask, 0.8, fallback=0.5) == 0.5
    assert tau_for_target_ess(torch.zeros(0, 10), mask[:0], 0.8, fallback=0.7) == 0.7
    assert tau_for_target_ess(torch.rand(4, 10), torch.zeros(4, 10, dtype=torch.bool), 0.8, fallback=0.7) == 0.7
    with pytest.raises(ValueError, match="target_ess"):
        tau_for_target_ess(torch.rand(4, 10), mask, 1.0, fallback=0.5)


def test_tau_for_target_ess_calls_reduce_the_same_number_of_times_whatever_the_data():
    counts = []
    for scores in [torch.zeros(3, 5), torch.rand(3, 5), torch.zeros(0, 5)]:
        calls = []
        tau_for_target_ess(
            scores, torch.ones_like(scores, dtype=torch.bool), 0.9, fallback=0.5, reduce=lambda x: calls.append(1) or x
        )
        counts.append(len(calls))
    assert len(set(counts)) == 1


def test_functional_module_does_not_import_trl():
    code = "import sys, dgpo_trl.functional, dgpo_trl; assert 'trl' not in sys.modules, 'trl imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tau", [1e-8, 1e-45, 1e-310])
def test_weights_stay_finite_for_any_positive_tau(dtype, tau):
    """s / tau overflowed for tiny taus (NaN weights); the weights now reach the softmax's limit: each sequence's
    weight shared by its top-scoring tokens, mean 1, also where tau rounds to 0 in the scores' dtype."""
    scores = torch.tensor([[0.1, 0.3, 0.3, 0.0], [0.5, 0.2, 0.0, 0.0], [0.2, 0.2, 0.2, 0.2]], dtype=dtype)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    weights = weights_from_scores(scores, mask, tau)
    expected = torch.tensor([[0, 2, 2, 0], [2, 0, 0, 0], [1, 1, 1, 0]], dtype=dtype)
    assert torch.equal(weights, expected)
