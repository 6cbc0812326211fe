"""DDPM.py checked against mathematics: closed forms, the papers' equations, known answers.

Every expected value here is derived independently in float64 from the betas (not read back from
the buffers under test), following Ho et al. 2020 (DDPM), Song et al. 2021 (DDIM) and Lu et al.
2022 (DPM-Solver++).
"""

import math
import re

import pytest
import torch
from torch import nn

import DDPM
from DDPM import (
    BETA_SCHEDULES,
    GaussianDiffusion,
    Unet,
    cosine_beta_schedule,
    linear_beta_schedule,
    quadratic_beta_schedule,
    sigmoid_beta_schedule,
)

SCHEDULES = [linear_beta_schedule, quadratic_beta_schedule, sigmoid_beta_schedule, cosine_beta_schedule]


class Zero(nn.Module):
    """A 'network' that outputs zeros; enough to exercise the plumbing."""

    def forward(self, x, t):
        return torch.zeros_like(x)


def alpha_bar(betas):
    """prod_{s<=t} (1 - beta_s), as a float64 running product written out by hand."""
    out, acc = [], 1.0
    for b in betas.tolist():
        acc *= 1.0 - b
        out.append(acc)
    return torch.tensor(out, dtype=torch.float64)


# ---------------------------------------------------------------- beta schedules

@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_is_float64_of_requested_length_inside_unit_interval(schedule):
    betas = schedule(37)
    assert betas.dtype == torch.float64 and betas.shape == (37,)
    assert bool(((betas > 0) & (betas < 1)).all())


@pytest.mark.parametrize("schedule", [linear_beta_schedule, quadratic_beta_schedule, sigmoid_beta_schedule])
def test_schedule_rises_from_beta_start_to_beta_end(schedule):
    betas = schedule(1000)
    assert bool((betas[1:] >= betas[:-1]).all())
    assert betas[0].item() == pytest.approx(1e-4, rel=0.05) and betas[-1].item() == pytest.approx(0.02, rel=0.05)


def test_linear_schedule_matches_ddpm_paper_values():
    betas = linear_beta_schedule(1000)
    assert betas[0].item() == 1e-4 and betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert betas[500].item() == pytest.approx(1e-4 + 500 * (0.02 - 1e-4) / 999, abs=1e-15)


def test_quadratic_schedule_square_roots_are_linear():
    root = quadratic_beta_schedule(50).sqrt()
    steps = root[1:] - root[:-1]
    assert torch.allclose(steps, steps.mean().expand_as(steps), atol=1e-12)


def test_sigmoid_schedule_is_symmetric_about_its_midpoint():
    betas = sigmoid_beta_schedule(101, beta_start=0.001, beta_end=0.01)
    assert torch.allclose(betas + betas.flip(0), torch.full_like(betas, 0.011), atol=1e-12)


def test_sigmoid_schedule_is_flat_at_both_ends_and_steepest_in_the_middle():
    """What sets it apart from a straight line (which is symmetric too): its steps grow from almost
    nothing to the middle and shrink again (the sigmoid's slope at -6 is 1% of its slope at 0)."""
    steps = sigmoid_beta_schedule(101).diff()
    assert steps[0] < 0.02 * steps[50] and steps[-1] < 0.02 * steps[49]


def test_cosine_schedule_alpha_bar_follows_closed_form():
    T, s = 1000, 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    ab = alpha_bar(cosine_beta_schedule(T, s))
    for t in (0, 10, 250, 500, 900):  # before the 0.999 clip bites
        assert ab[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)


def test_cosine_schedule_betas_are_clipped_at_0_999():
    betas = cosine_beta_schedule(1000)
    assert betas.max().item() == pytest.approx(0.999)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_schedule_rejects_bad_timesteps(bad):
    with pytest.raises(ValueError, match="timesteps must be an integer >= 1"):
        linear_beta_schedule(bad)


def test_schedule_rejects_betas_outside_unit_interval():
    with pytest.raises(ValueError, match=r"beta_end must lie strictly between 0 and 1, got 1\.5"):
        linear_beta_schedule(10, beta_end=1.5)


# ---------------------------------------------------------------- GaussianDiffusion buffers

def make_diffusion(T=50, schedule="linear", objective="pred_noise", model=None, size=4, **kw):
    return GaussianDiffusion(model or Zero(), image_size=size, timesteps=T, beta_schedule=schedule,
                             objective=objective, **kw)


def test_buffers_are_float32_and_match_float64_formulas():
    d = make_diffusion(T=100, schedule="cosine")
    betas = cosine_beta_schedule(100)
    ab = alpha_bar(betas)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance",
                 "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"):
        assert getattr(d, name).dtype == torch.float32, name
    torch.testing.assert_close(d.alphas_cumprod.double(), ab, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(d.alphas_cumprod_prev.double(), ab_prev, rtol=1e-6, atol=1e-7)
    # DDPM eq. 7: beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t
    beta_tilde = (1 - ab_prev) / (1 - ab) * betas
    torch.testing.assert_close(d.posterior_variance.double(), beta_tilde, rtol=1e-5, atol=1e-8)
    assert d.posterior_variance[0].item() == 0.0
    # the log variance is clipped at t=0 to the value at t=1 (log 0 is -inf)
    torch.testing.assert_close(d.posterior_log_variance_clipped.double()[1:], beta_tilde[1:].log(), rtol=1e-5, atol=1e-5)
    assert d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1]


# ---------------------------------------------------------------- forward process

def test_q_sample_statistics_match_closed_form():
    """x_t | x_0 ~ N(sqrt(abar_t) x_0, (1 - abar_t) I)   (DDPM eq. 4)."""
    torch.manual_seed(0)
    d = make_diffusion(T=1000)
    ab = alpha_bar(linear_beta_schedule(1000))
    n = 200_000
    for t in (0, 100, 500, 999):
        x0 = torch.full((n, 1, 1, 1), 0.7)
        xt = d.q_sample(x0, torch.full((n,), t, dtype=torch.long))
        mean, var = math.sqrt(ab[t]) * 0.7, 1 - ab[t].item()
        se_mean = math.sqrt(var / n)
        assert abs(xt.mean().item() - mean) < 5 * se_mean
        assert xt.var().item() == pytest.approx(var, rel=5 * math.sqrt(2 / n))


def test_predict_start_from_noise_inverts_q_sample():
    d = make_diffusion(T=200)
    x0, eps = torch.rand(8, 1, 4, 4) * 2 - 1, torch.randn(8, 1, 4, 4)
    t = torch.arange(0, 200, 25)
    xt = d.q_sample(x0, t, eps)
    torch.testing.assert_close(d.predict_start_from_noise(xt, t, eps), x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(d.predict_noise_from_start(xt, t, x0), eps, atol=1e-3, rtol=1e-3)


def test_v_parametrisation_round_trips():
    d = make_diffusion(T=200)
    x0, eps = torch.rand(8, 1, 4, 4) * 2 - 1, torch.randn(8, 1, 4, 4)
    t = torch.arange(0, 200, 25)
    xt = d.q_sample(x0, t, eps)
    v = d.predict_v(x0, t, eps)
    torch.testing.assert_close(d.predict_start_from_v(xt, t, v), x0, atol=1e-5, rtol=1e-5)


def test_q_posterior_matches_bayes_rule():
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): a product of two Gaussians in x_{t-1}."""
    d = make_diffusion(T=100, schedule="cosine")
    betas = cosine_beta_schedule(100)
    ab = alpha_bar(betas)
    x0, xt = torch.randn(6, 1, 4, 4).double(), torch.randn(6, 1, 4, 4).double()
    t = torch.tensor([1, 2, 10, 50, 90, 99])
    mean, var, log_var = d.q_posterior(x0.float(), xt.float(), t)
    for i, ti in enumerate(t.tolist()):
        a_t, ab_prev = 1 - betas[ti], ab[ti - 1]
        precision = 1 / (1 - ab_prev) + a_t / betas[ti]
        expected_var = 1 / precision
        expected_mean = expected_var * (ab_prev.sqrt() * x0[i] / (1 - ab_prev) + a_t.sqrt() * xt[i] / betas[ti])
        torch.testing.assert_close(mean[i].double(), expected_mean, atol=1e-4, rtol=1e-4)
        assert var[i].item() == pytest.approx(expected_var.item(), rel=1e-4)
        assert log_var[i].item() == pytest.approx(math.log(expected_var), abs=1e-4)


def test_q_posterior_at_t0_is_x0():
    d = make_diffusion(T=50)
    x0, xt = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    mean, var, _ = d.q_posterior(x0, xt, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(mean, x0)
    assert var.abs().max().item() == 0.0


# ---------------------------------------------------------------- training objectives

class Replay(nn.Module):
    """Outputs a fixed tensor, whatever the input."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, t):
        return self.out


@pytest.mark.parametrize("objective", ["pred_noise", "pred_x0", "pred_v"])
def test_each_objective_target_gives_zero_loss(objective):
    torch.manual_seed(0)
    d = make_diffusion(T=100, objective=objective)
    img = torch.rand(5, 1, 4, 4)
    t, eps = torch.randint(0, 100, (5,)), torch.randn(5, 1, 4, 4)
    x0 = img * 2 - 1
    ab = alpha_bar(linear_beta_schedule(100))[t].float().reshape(-1, 1, 1, 1)
    target = {"pred_noise": eps, "pred_x0": x0, "pred_v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[objective]
    d.model = Replay(target)
    assert d(img, t=t, noise=eps).item() < 1e-10
    d.model = Replay(target + 0.5)
    assert d(img, t=t, noise=eps).item() == pytest.approx(0.25, rel=1e-5)


def test_training_loss_is_a_scalar_with_gradient():
    d = GaussianDiffusion(Unet(8, dim_mults=(1, 2)), image_size=8, timesteps=10)
    loss = d(torch.rand(3, 1, 8, 8))
    assert loss.ndim == 0
    loss.backward()
    assert all(p.grad is not None for p in d.parameters())


def test_tiny_model_overfits_a_handful_of_images():
    torch.manual_seed(0)
    imgs = (torch.rand(4, 1, 8, 8) > 0.5).float()
    d = GaussianDiffusion(Unet(16, dim_mults=(1, 2), resnet_blocks=1, attn_dim_head=8), image_size=8,
                          timesteps=100, objective="pred_x0")
    opt = torch.optim.Adam(d.parameters(), lr=3e-3)
    t = torch.arange(16) * 6
    x = imgs.repeat(4, 1, 1, 1)
    noise = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    first = d(x, t=t, noise=noise).item()
    for _ in range(300):
        loss = d(x, t=t, noise=noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first


# ---------------------------------------------------------------- the U-Net

def test_sinusoidal_embedding_is_sin_then_cos_of_t_times_frequencies():
    emb = DDPM.SinusoidalPosEmb(8)(torch.tensor([0, 3]))
    assert torch.equal(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    freqs = torch.tensor([10000 ** (-i / 3) for i in range(4)])
    torch.testing.assert_close(emb[1], torch.cat([(3 * freqs).sin(), (3 * freqs).cos()]))


@pytest.mark.parametrize("size,channels,mults", [(28, 1, (1, 2, 4)), (32, 3, (1, 2, 2, 4)), (8, 1, (1,))])
def test_unet_output_has_input_shape(size, channels, mults):
    net = Unet(8, dim_mults=mults, channels=channels)
    x = torch.randn(2, channels, size, size)
    assert net(x, torch.tensor([0, 999])).shape == x.shape


def test_downsample_is_lossless_pixel_unshuffle():
    """Downsample's first operation moves every pixel into channels (nothing is dropped or mixed):
    what reaches its 1x1 convolution maps back to the input exactly."""
    down = DDPM.Downsample(2, 5)
    seen = []
    down.conv.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = torch.randn(3, 2, 6, 4)
    out = down(x)
    rearranged = seen[0]
    assert out.shape == (3, 5, 3, 2)
    assert rearranged.shape == (3, 8, 3, 2)
    assert down.conv.in_channels == 8 and down.conv.kernel_size == (1, 1)
    assert torch.equal(torch.nn.functional.pixel_shuffle(rearranged, 2), x)
    assert torch.equal(rearranged.flatten().sort().values, x.flatten().sort().values)


def test_unet_rejects_sizes_its_levels_cannot_halve():
    with pytest.raises(ValueError, match=r"image size 30x30 cannot be halved.*multiples of 4"):
        Unet(8, dim_mults=(1, 2, 4))(torch.randn(1, 1, 30, 30), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"image_size \(30, 30\).*multiples of 4"):
        GaussianDiffusion(Unet(8, dim_mults=(1, 2, 4)), image_size=30)


def test_unet_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match=r"expected input of shape \(B, 1, H, W\), got \(1, 3, 8, 8\)"):
        Unet(8, dim_mults=(1, 2))(torch.randn(1, 3, 8, 8), torch.tensor([0]))
    with pytest.raises(ValueError, match="channels=3 does not match the model's channels=1"):
        GaussianDiffusion(Unet(8, dim_mults=(1, 2)), image_size=8, channels=3)


def test_attention_is_permutation_equivariant_over_pixels():
    """Full self-attention treats pixels as a set: permuting them permutes its output."""
    attn = DDPM.Attention(8, heads=2, dim_head=4)
    x = torch.randn(1, 8, 1, 6)
    perm = torch.randperm(6)
    torch.testing.assert_close(attn(x[..., perm]), attn(x)[..., perm], atol=1e-5, rtol=1e-5)


def test_attention_is_the_softmax_of_scaled_query_key_products_applied_to_the_values():
    """softmax(q k^T / sqrt(d)) v per head, written out from to_qkv's weights in float64."""
    torch.manual_seed(0)
    heads, d, c = 2, 4, 8
    attn = DDPM.Attention(c, heads=heads, dim_head=d).double()
    x = torch.randn(2, c, 3, 5, dtype=torch.float64)
    pixels = attn.norm(x).flatten(2)  # (b, c, n)
    w_q, w_k, w_v = attn.to_qkv.weight.view(3, heads, d, c)
    q, k, v = (torch.einsum("hdc,bcn->bhnd", w, pixels) for w in (w_q, w_k, w_v))
    attended = torch.softmax(q @ k.mT / math.sqrt(d), dim=-1) @ v  # (b, heads, n, d)
    hidden = attended.permute(0, 1, 3, 2).reshape(2, heads * d, 3, 5)  # channel = head * d + feature
    torch.testing.assert_close(attn(x), x + attn.to_out(hidden))


# ---------------------------------------------------------------- argument checks

@pytest.mark.parametrize("kwargs,message", [
    (dict(beta_schedule="exponential"), r"beta_schedule must be one of \('linear', 'quadratic', 'sigmoid', 'cosine'\), got 'exponential'"),
    (dict(objective="pred_eps"), r"objective must be one of \('pred_noise', 'pred_x0', 'pred_v'\), got 'pred_eps'"),
    (dict(timesteps=0), r"timesteps must be an integer >= 1, got 0"),
    (dict(betas=[0.1, 1.2]), r"every beta must lie strictly between 0 and 1, got values in \[0.1, 1.2\]"),
    (dict(image_size=0), r"image_size must be a positive int or \(height, width\), got \(0, 0\)"),
])
def test_gaussian_diffusion_rejects_bad_arguments(kwargs, message):
    args = {"image_size": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        GaussianDiffusion(Zero(), **args)


def test_forward_rejects_images_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 1, 4, 4\), got \(2, 1, 5, 5\)"):
        make_diffusion()(torch.rand(2, 1, 5, 5))


def test_sample_rejects_bad_sampler_arguments():
    d = make_diffusion(T=10)
    with pytest.raises(ValueError, match=r"sampling_steps must be None or an integer in 1..10, got 11"):
        d.sample(2, sampling_steps=11, progress=False)
    with pytest.raises(ValueError, match="variance must be one of .*got 'learned'"):
        d.sample(2, variance="learned", progress=False)
    with pytest.raises(ValueError, match="noise_scale must be >= 0, got -1"):
        d.sample(2, noise_scale=-1, progress=False)


# ---------------------------------------------------------------- samplers on known answers

class GaussianOracle(nn.Module):
    """The exact E[eps | x_t] when every pixel of x_0 (model space) is N(mu, s^2) independently.

    x_t = a x_0 + b eps with a = sqrt(abar_t), b = sqrt(1 - abar_t); jointly Gaussian, so
    E[eps | x_t] = b (x_t - a mu) / (a^2 s^2 + b^2). With s = 0 the data is a single point.
    For the other objectives it outputs E[x_0 | x_t] = (a s^2 x_t + b^2 mu) / (a^2 s^2 + b^2), or
    v = a eps - b x_0 from the two.
    """

    def __init__(self, alphas_cumprod, mu, s, objective="pred_noise"):
        super().__init__()
        self.ab, self.mu, self.s, self.objective = alphas_cumprod.double(), mu, s, objective

    def forward(self, x, t):
        a, b = self.ab[t].sqrt().reshape(-1, 1, 1, 1), (1 - self.ab[t]).sqrt().reshape(-1, 1, 1, 1)
        x, d = x.double(), a**2 * self.s**2 + b**2
        eps, x0 = b * (x - a * self.mu) / d, (a * self.s**2 * x + b**2 * self.mu) / d
        return {"pred_noise": eps, "pred_x0": x0, "pred_v": a * eps - b * x0}[self.objective].float()


def oracle_diffusion(mu, s, T=100, objective="pred_noise", schedule="cosine"):
    betas = BETA_SCHEDULES[schedule](T)
    return GaussianDiffusion(GaussianOracle(alpha_bar(betas), mu, s, objective), image_size=(20, 25), timesteps=T,
                             beta_schedule=schedule, objective=objective)


def exact_sampler_law(betas, mu, s, steps, eta=None, noise_scale=1.0, variance="fixed_small"):
    """Mean and variance of the sampler's output for N(mu, s^2) data, by propagating the Gaussian.

    Each step is x' = A x + c + sigma z with A, c, sigma from the papers' update rules (DDPM
    eq. 7 and Algorithm 2; DDIM eq. 12 with eta), so the law of x_0 is known exactly.
    """
    ab = alpha_bar(betas)
    m, v = 0.0, 1.0  # x_T ~ N(0, 1)
    for t, t_prev in steps:
        a, b2 = ab[t].sqrt().item(), 1 - ab[t].item()
        D = a * a * s * s + b2
        # x0_hat = E[x_0 | x_t] = (a s^2 / D) x + (b^2 / D) mu;  eps_hat = (sqrt(b^2) / D)(x - a mu)
        k_x0, c_x0 = a * s * s / D, b2 * mu / D
        if t_prev < 0:
            A, c, sig2 = k_x0, c_x0, 0.0
        elif eta is None:  # DDPM
            ab_prev = ab[t_prev].item()
            beta = betas[t].item()
            coef1 = beta * math.sqrt(ab_prev) / (1 - ab[t].item())
            coef2 = (1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab[t].item())
            A, c = coef1 * k_x0 + coef2, coef1 * c_x0
            var = (1 - ab_prev) / (1 - ab[t].item()) * beta if variance == "fixed_small" else beta
            sig2 = 0.0 if t == 0 else noise_scale**2 * var
        else:  # DDIM
            ab_prev = ab[t_prev].item()
            sig2 = eta**2 * (1 - ab_prev) / b2 * (1 - ab[t].item() / ab_prev)
            k_eps = math.sqrt(b2) / D
            direction = math.sqrt(max(0.0, 1 - ab_prev - sig2))
            A = math.sqrt(ab_prev) * k_x0 + direction * k_eps
            c = math.sqrt(ab_prev) * c_x0 - direction * k_eps * a * mu
        m, v = A * m + c, A * A * v + sig2
    return m, v


def ddpm_pairs(T):
    # the last DDPM step (t = 0) has coef1 = 1, coef2 = 0 and no noise: it returns x0_hat
    return [(t, t - 1) for t in reversed(range(T))]


def assert_samples_follow(samples, mean, var):
    n = samples.numel()
    assert abs(samples.mean().item() - mean) < 5 * math.sqrt(var / n)
    assert samples.var().item() == pytest.approx(var, rel=5 * math.sqrt(2 / n))


def to_model_space(images):
    return images.double() * 2 - 1


# With s = 0 every x0 prediction is the point itself whatever x_t is, so the single-point tests check
# the last step and float32 precision, not the path to it: the output-law tests check the path.
def test_ddpm_sampler_recovers_a_single_point_exactly():
    d = oracle_diffusion(mu=0.3, s=0.0)
    out = to_model_space(d.sample(4, progress=False))
    torch.testing.assert_close(out, torch.full_like(out, 0.3), atol=1e-5, rtol=0)


# One step from t = T-1 divides by sqrt(abar_{T-1}) ~ 1e-4 in float32: a looser tolerance.
@pytest.mark.parametrize("steps,eta,atol", [(10, 0.0, 1e-5), (10, 1.0, 1e-5), (1, 0.0, 2e-3)])
def test_ddim_sampler_recovers_a_single_point_exactly(steps, eta, atol):
    d = oracle_diffusion(mu=-0.4, s=0.0)
    out = to_model_space(d.sample(4, sampling_steps=steps, eta=eta, progress=False))
    torch.testing.assert_close(out, torch.full_like(out, -0.4), atol=atol, rtol=0)


@pytest.mark.parametrize("variance,noise_scale", [("fixed_small", 1.0), ("fixed_large", 1.0),
                                                  ("fixed_small", 0.0), ("fixed_small", 1.5)])
def test_ddpm_sampler_output_law_on_gaussian_data(variance, noise_scale):
    torch.manual_seed(0)
    mu, s, T = 0.1, 0.2, 100
    d = oracle_diffusion(mu, s, T)
    samples = to_model_space(d.sample(200, variance=variance, noise_scale=noise_scale, clip_denoised=False,
                                      progress=False))
    m, v = exact_sampler_law(cosine_beta_schedule(T), mu, s, ddpm_pairs(T), noise_scale=noise_scale,
                             variance=variance)
    assert_samples_follow(samples, m, v)


def test_ddpm_with_posterior_variance_reproduces_the_data_law_in_closed_form():
    """The reference law itself (exact_sampler_law; the sampler is held to it by the output-law tests)."""
    m, v = exact_sampler_law(cosine_beta_schedule(1000), 0.1, 0.2, ddpm_pairs(1000))
    assert m == pytest.approx(0.1, abs=1e-3) and math.sqrt(v) == pytest.approx(0.2, rel=0.02)


def test_too_little_reverse_variance_collapses_and_too_much_inflates_in_closed_form():
    """The README's observation, in closed form: noise_scale < 1 shrinks the spread, > 1 inflates it."""
    stds = [math.sqrt(exact_sampler_law(cosine_beta_schedule(1000), 0.0, 0.2, ddpm_pairs(1000),
                                        noise_scale=k)[1]) for k in (0.0, 0.5, 1.0, 1.5)]
    assert stds[0] < 0.02 and stds[1] < 0.15 and stds[2] == pytest.approx(0.2, rel=0.02) and stds[3] > 0.28


@pytest.mark.parametrize("steps,eta", [(20, 0.0), (20, 1.0), (50, 0.5)])
def test_ddim_sampler_output_law_on_gaussian_data(steps, eta):
    torch.manual_seed(0)
    mu, s, T = -0.2, 0.3, 100
    d = oracle_diffusion(mu, s, T)
    samples = to_model_space(d.sample(200, sampling_steps=steps, eta=eta, clip_denoised=False, progress=False))
    m, v = exact_sampler_law(cosine_beta_schedule(T), mu, s, d.ddim_timesteps(steps), eta=eta)
    assert_samples_follow(samples, m, v)
    # coarse steps keep the mean but can only shrink the spread (Cauchy-Schwarz on each linear step)
    assert m == pytest.approx(mu, abs=1e-3) and math.sqrt(v) <= s


def test_deterministic_ddim_with_fine_steps_reproduces_the_data_law_in_closed_form():
    """The reference law itself (exact_sampler_law; the sampler is held to it by the output-law tests)."""
    T = 1000
    pairs = [(t, t - 1) for t in reversed(range(T))]
    m, v = exact_sampler_law(cosine_beta_schedule(T), -0.2, 0.3, pairs, eta=0.0)
    assert m == pytest.approx(-0.2, abs=1e-3) and math.sqrt(v) == pytest.approx(0.3, rel=0.02)


def test_ddim_with_eta_1_on_all_timesteps_is_the_ddpm_sampler():
    """DDIM paper: eta = 1 gives sigma_t^2 = beta_tilde_t and the DDPM posterior mean."""
    d = GaussianDiffusion(Unet(8, dim_mults=(1, 2)), image_size=8, timesteps=30)
    shape = (3, 1, 8, 8)
    ddpm = d.p_sample_loop(shape, generator=torch.Generator().manual_seed(5), progress=False)
    ddim = d.ddim_sample_loop(shape, 30, eta=1.0, generator=torch.Generator().manual_seed(5), progress=False)
    torch.testing.assert_close(ddim, ddpm, atol=1e-4, rtol=1e-4)


def test_ddim_timesteps_are_evenly_spaced_and_end_at_x0():
    d = make_diffusion(T=1000)
    pairs = d.ddim_timesteps(10)
    starts = [t for t, _ in pairs]
    assert len(pairs) == 10
    assert pairs[0][0] == 999
    assert pairs[-1] == (99, -1)
    assert all(t_next == t_after for (_, t_next), (t_after, _) in zip(pairs, pairs[1:]))
    assert [a - b for a, b in zip(starts, starts[1:])] == [100] * 9


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("t,t_next", [(99, 89), (40, 0)])
def test_ddim_step_is_eq_12_with_its_sigma(eta, t, t_next):
    """One step against DDIM eq. 12 in float64 with the same z: x' = sqrt(abar') x0_hat +
    sqrt(1 - abar' - sigma^2) eps_hat + sigma z, sigma = eta sqrt((1 - abar')/(1 - abar) (1 - abar/abar'))
    (eq. 16). The output laws above hardly depend on eta at many steps; this pins it per step."""
    T = 100
    d = make_diffusion(T=T, schedule="cosine")
    ab = alpha_bar(cosine_beta_schedule(T))
    torch.manual_seed(0)
    x, eps, x0 = (torch.randn(2, 1, 4, 4) for _ in range(3))
    out = d._ddim_step(x, t, t_next, eps, x0, eta, torch.Generator().manual_seed(7))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).double()
    a, a_next = ab[t].item(), ab[t_next].item()
    sigma = eta * math.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))
    expected = math.sqrt(a_next) * x0.double() + math.sqrt(1 - a_next - sigma**2) * eps.double() + sigma * z
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)  # float32 buffers


def sample_from(diffusion, x_T, seed, **kwargs):
    """diffusion.sample started from x_T (its first normal draw), with every later draw taken from a
    generator seeded `seed`: two seeds give the same start and different randomness after it."""
    real_randn, start = torch.randn, [x_T]

    def randn(size, *args, **kw):
        if start:
            assert tuple(size) == tuple(x_T.shape), "the first draw is x_T"
            return start.pop().clone()
        return real_randn(size, *args, **kw)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "randn", randn)
        return diffusion.sample(len(x_T), generator=torch.Generator().manual_seed(seed), progress=False, **kwargs)


def test_ddim_eta_0_is_deterministic_given_the_starting_noise():
    d = GaussianDiffusion(Unet(8, dim_mults=(1, 2)), image_size=8, timesteps=50)
    x_T = torch.randn(2, 1, 8, 8)
    a = sample_from(d, x_T, seed=3, sampling_steps=5)
    b = sample_from(d, x_T, seed=4, sampling_steps=5)
    assert torch.equal(a, b)


def test_sample_returns_images_in_unit_interval_and_trajectories():
    d = GaussianDiffusion(Unet(8, dim_mults=(1, 2)), image_size=8, timesteps=20)
    out = d.sample(3, progress=False)
    assert out.shape == (3, 1, 8, 8) and out.min() >= 0 and out.max() <= 1
    traj = d.sample(3, sampling_steps=4, return_all_timesteps=True, progress=False)
    assert traj.shape == (3, 5, 1, 8, 8)
    traj = d.sample(2, return_all_timesteps=True, progress=False)
    assert traj.shape == (2, 21, 1, 8, 8)


def test_sample_is_reproducible_with_a_generator():
    d = GaussianDiffusion(Unet(8, dim_mults=(1, 2)), image_size=8, timesteps=20)
    a = d.sample(2, generator=torch.Generator().manual_seed(0), progress=False)
    b = d.sample(2, generator=torch.Generator().manual_seed(0), progress=False)
    c = d.sample(2, generator=torch.Generator().manual_seed(1), progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------- timestep spacing

SPACINGS = GaussianDiffusion.SPACINGS


@pytest.mark.parametrize("T", [10, 37, 1000])
def test_uniform_spacing_is_the_old_ddim_timesteps(T):
    """Evenly spaced in t, as DDIM always did: linspace(-1, T-1, S+1), rounded, from the top."""
    d = make_diffusion(T=T)
    for steps in range(1, T + 1):
        times = torch.linspace(-1, T - 1, steps + 1).round().long().flip(0).tolist()
        assert d.sampling_timesteps(steps, "uniform") == list(zip(times[:-1], times[1:]))


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [1, 2, 7, 31, 100, 499, 1000])
def test_every_spacing_walks_distinct_timesteps_from_the_top_to_x0(spacing, steps):
    pairs = make_diffusion(T=1000).sampling_timesteps(steps, spacing)
    starts = [t for t, _ in pairs]
    assert len(pairs) == steps  # one network evaluation per pair
    assert starts[0] == 999
    assert pairs[-1][1] == -1 and starts[-1] >= 0
    assert all(t_next == t_after for (_, t_next), (t_after, _) in zip(pairs, pairs[1:]))
    assert all(a > b for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("spacing", SPACINGS)
def test_every_spacing_with_all_steps_visits_every_timestep(spacing):
    pairs = make_diffusion(T=50).sampling_timesteps(50, spacing)
    assert pairs == [(t, t - 1) for t in reversed(range(50))]


def test_quadratic_spacing_follows_t_squared():
    starts = [t for t, _ in make_diffusion(T=1000).sampling_timesteps(10, "quadratic")]
    assert starts == [round(1000 * (i / 10) ** 2) - 1 for i in range(10, 0, -1)]


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_logsnr_spacing_picks_the_timestep_nearest_to_evenly_spaced_log_snr(schedule):
    d = make_diffusion(T=1000, schedule=schedule)
    ab = alpha_bar(BETA_SCHEDULES[schedule](1000))
    lam = 0.5 * (ab / (1 - ab)).log()  # log(sqrt(abar) / sqrt(1 - abar))
    steps = 8
    starts = [t for t, _ in d.sampling_timesteps(steps, "logsnr")]
    assert starts[0] == 999 and starts[-1] == 0
    targets = [lam[999] + i * (lam[0] - lam[999]) / (steps - 1) for i in range(steps)]
    for t, target in zip(starts, targets):
        neighbours = [n for n in (t - 1, t + 1) if 0 <= n < 1000]
        assert all(abs(lam[t] - target) <= abs(lam[n] - target) + 1e-6 for n in neighbours)


# ---------------------------------------------------------------- DPM-Solver++(2M)

def exact_dpm_solver_law(betas, mu, s, pairs, stochastic=False):
    """Mean and variance of DPM-Solver++(2M)'s output (SDE variant if `stochastic`) for N(mu, s^2) data.

    With the exact x_0 predictor E[x_0 | x_t] = (a s^2 x + b^2 mu) / (a^2 s^2 + b^2), every x along
    the way is an affine function of independent standard normals (x_T and each step's fresh z):
    it is tracked as (constant, [coefficients]). The update rules are those of Lu et al. 2022
    (DPM-Solver++(2M), Algorithm 2, and its SDE variant), written out in float64 scalars.
    """
    ab = alpha_bar(betas).tolist()

    def combine(*terms):  # sum of weight * (constant, coefficients)
        n = max(len(c) for _, (_, c) in terms)
        return (sum(w * k for w, (k, _) in terms),
                [sum(w * (c[i] if i < len(c) else 0.0) for w, (_, c) in terms) for i in range(n)])

    x, before = (0.0, [1.0]), None  # x_T ~ N(0, 1); before = (x_0 prediction, lambda) of the last step
    for t, t_next in pairs:
        a2, a2_next = ab[t], (ab[t_next] if t_next >= 0 else 1.0)
        a, sig, a_next, sig_next = math.sqrt(a2), math.sqrt(1 - a2), math.sqrt(a2_next), math.sqrt(1 - a2_next)
        d = a2 * s * s + sig * sig
        x0 = combine((a * s * s / d, x), (sig * sig * mu / d, (1.0, [])))
        lam = math.log(a / sig)
        h = (math.log(a_next / sig_next) if sig_next > 0 else math.inf) - lam
        D = x0
        if before is not None and sig_next > 0:  # second order, but not on the last step to x_0
            r = (lam - before[1]) / h
            D = combine((1 + 1 / (2 * r), x0), (-1 / (2 * r), before[0]))
        if stochastic:
            x = combine((sig_next / sig * math.exp(-h), x), (a_next * (1 - math.exp(-2 * h)), D))
            if sig_next > 0:
                x = (x[0], x[1] + [sig_next * math.sqrt(1 - math.exp(-2 * h))])
        else:
            x = combine((sig_next / sig, x), (a_next * (1 - math.exp(-h)), D))
        before = (x0, lam)
    return x[0], sum(c * c for c in x[1])


@pytest.mark.parametrize("sampler,steps,spacing", [
    ("dpm++2m", 10, "logsnr"), ("dpm++2m", 20, "uniform"), ("dpm++2m", 7, "quadratic"),
    ("dpm++2m-sde", 10, "logsnr"), ("dpm++2m-sde", 20, "uniform"), ("dpm++2m-sde", 50, "quadratic"),
])
def test_dpm_solver_output_law_on_gaussian_data(sampler, steps, spacing):
    torch.manual_seed(0)
    mu, s, T = -0.2, 0.3, 100
    d = oracle_diffusion(mu, s, T)
    samples = to_model_space(d.sample(200, sampling_steps=steps, sampler=sampler, spacing=spacing,
                                      clip_denoised=False, progress=False))
    m, v = exact_dpm_solver_law(cosine_beta_schedule(T), mu, s, d.sampling_timesteps(steps, spacing),
                                stochastic=sampler == "dpm++2m-sde")
    assert_samples_follow(samples, m, v)


@pytest.mark.parametrize("stochastic", [False, True], ids=["dpm++2m", "dpm++2m-sde"])
def test_dpm_solver_approaches_the_data_law_as_steps_grow_in_closed_form(stochastic):
    """Exact laws, no sampling noise: N(mu, s^2) data on the linear schedule of the MNIST model.
    Stated tolerances: the mean within 1e-3 at every step count, the standard deviation within
    0.5% at 100 steps, and closer to s at 100 steps than at 5."""
    mu, s, T = -0.2, 0.3, 1000
    betas = linear_beta_schedule(T)
    d = make_diffusion(T=T)
    laws = {n: exact_dpm_solver_law(betas, mu, s, d.sampling_timesteps(n, "logsnr"), stochastic)
            for n in (5, 20, 100)}
    std_errors = {n: abs(math.sqrt(v) / s - 1) for n, (_, v) in laws.items()}
    assert all(abs(m - mu) < 1e-3 for m, _ in laws.values())
    assert std_errors[100] < 0.005
    assert std_errors[100] < std_errors[5]


@pytest.mark.parametrize("sampler", ["dpm++2m", "dpm++2m-sde"])
@pytest.mark.parametrize("steps,atol", [(10, 1e-5), (1, 2e-3)])
def test_dpm_solver_recovers_a_single_point_exactly(sampler, steps, atol):
    d = oracle_diffusion(mu=0.35, s=0.0)
    out = to_model_space(d.sample(4, sampling_steps=steps, sampler=sampler, progress=False))
    torch.testing.assert_close(out, torch.full_like(out, 0.35), atol=atol, rtol=0)


@pytest.mark.parametrize("objective", ["pred_noise", "pred_x0", "pred_v"])
def test_clipped_prediction_clamps_x0_and_makes_the_noise_agree_with_it(objective):
    """model_predictions(clip_x_start=True), what every sampler uses by default: x0_hat clamped to
    [-1, 1] and eps_hat recomputed from it, eps_hat = (x_t - sqrt(abar) x0_hat) / sqrt(1 - abar). The
    oracle's data is the single point 3, outside the data range."""
    d = oracle_diffusion(mu=3.0, s=0.0, T=50, objective=objective)
    x, t = torch.randn(2, 1, 20, 25), torch.tensor([10, 40])
    _, x0_raw = d.model_predictions(x, t, clip_x_start=False)
    eps, x0 = d.model_predictions(x, t, clip_x_start=True)
    torch.testing.assert_close(x0_raw, torch.full_like(x0_raw, 3.0), atol=1e-3, rtol=0)
    assert torch.equal(x0, torch.ones_like(x0))
    ab = alpha_bar(cosine_beta_schedule(50))[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(eps.double(), (x.double() - ab.sqrt()) / (1 - ab).sqrt(), atol=1e-4, rtol=1e-4)


def convergence_order(method, steps_list, mu=-0.5, s=0.6, T=1000):
    """Fitted order p of a deterministic sampler (error ~ steps^-p) against the exact ODE solution.

    For N(mu, s^2) data the probability-flow ODE is solved by x(abar) = sqrt(abar) mu +
    sqrt(abar s^2 + 1 - abar) z: z follows from x_T, so the exact end point of every trajectory
    is known. The samplers' last step returns the x_0 prediction at their last timestep (t = 0
    with the "logsnr" spacing); its error is set by the noise left at t = 0, not by the step
    count, so the reference is the exact x(abar_0) passed through the same (exact) prediction,
    and the measured error is the solver's alone. Returns the least-squares slope of
    -log(error) against log(steps).
    """
    d = oracle_diffusion(mu, s, T, schedule="linear")
    ab = alpha_bar(linear_beta_schedule(T))
    errors = []
    for steps in steps_list:
        assert d.sampling_timesteps(steps, "logsnr")[-1] == (0, -1)
        traj = method(d, steps).double()  # (B, steps + 1, C, H, W), model space
        x_T, x_0 = traj[:, 0], traj[:, -1]
        z = (x_T - ab[T - 1].sqrt() * mu) / (ab[T - 1] * s * s + 1 - ab[T - 1]).sqrt()
        x_at_0 = ab[0].sqrt() * mu + (ab[0] * s * s + 1 - ab[0]).sqrt() * z
        exact = (ab[0].sqrt() * s * s * x_at_0 + (1 - ab[0]) * mu) / (ab[0] * s * s + 1 - ab[0])
        errors.append((x_0 - exact).pow(2).mean().sqrt().item())
    x = torch.tensor(steps_list, dtype=torch.float64).log()
    y = torch.tensor(errors, dtype=torch.float64).log()
    return -((x - x.mean()) * (y - y.mean())).sum().item() / ((x - x.mean()) ** 2).sum().item()


STEPS_FOR_ORDER = [20, 40, 80, 160]


def test_ddim_is_a_first_order_solver():
    order = convergence_order(
        lambda d, n: d.ddim_sample_loop((4, 1, 20, 25), n, eta=0.0, clip_denoised=False, return_all_timesteps=True,
                                        generator=torch.Generator().manual_seed(0), progress=False, spacing="logsnr"),
        STEPS_FOR_ORDER)
    assert 0.8 < order < 1.2


def test_dpm_solver_2m_is_a_second_order_solver():
    """Error falls about fourfold per doubling of the steps; a first-order method (slope ~1) fails."""
    order = convergence_order(
        lambda d, n: d.dpm_solver_sample_loop((4, 1, 20, 25), n, stochastic=False, spacing="logsnr",
                                              clip_denoised=False, return_all_timesteps=True,
                                              generator=torch.Generator().manual_seed(0), progress=False),
        STEPS_FOR_ORDER)
    assert 1.7 < order < 2.4


def test_dpm_solver_update_first_order_step_is_the_ddim_step():
    """Without history, one DPM-Solver++ step is DDIM's: eta = 0 for the ODE, eta = 1 with noise."""
    d = make_diffusion(T=100, schedule="cosine")
    x, x0, z = torch.randn(2, 1, 4, 4), torch.rand(2, 1, 4, 4) * 2 - 1, torch.randn(2, 1, 4, 4)
    t, t_next = 70, 40
    a_t, a_next = d.alphas_cumprod[t].item(), d.alphas_cumprod[t_next].item()
    eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
    ode = DDPM.dpm_solver_pp_update(x, x0, a_t, a_next)
    torch.testing.assert_close(ode, math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps, atol=1e-5, rtol=1e-5)
    sigma2 = (1 - a_next) / (1 - a_t) * (1 - a_t / a_next)
    sde = DDPM.dpm_solver_pp_update(x, x0, a_t, a_next, noise=z)
    expected = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next - sigma2) * eps + math.sqrt(sigma2) * z
    torch.testing.assert_close(sde, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stochastic", [False, True])
def test_dpm_solver_update_last_step_returns_the_prediction(stochastic):
    """To t = -1 (abar = 1) the step is first order even with history, and returns x_0 exactly."""
    x, x0, x0_before = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    out = DDPM.dpm_solver_pp_update(x, x0, 0.99, 1.0, previous=(x0_before, 0.9),
                                    noise=torch.randn(2, 1, 4, 4) if stochastic else None)
    assert torch.equal(out, x0)


def test_dpm_solver_update_second_order_extrapolates_halfway_in_log_snr():
    """With a history the prediction is replaced by the line through both, read at the step's midpoint."""
    x = torch.zeros(1, 1, 2, 2)
    x0, x0_before = torch.full_like(x, 0.5), torch.full_like(x, 0.2)
    lam = lambda abar: 0.5 * math.log(abar / (1 - abar))
    a_before, a_t, a_next = 0.2, 0.4, 0.7
    h, h_before = lam(a_next) - lam(a_t), lam(a_t) - lam(a_before)
    midpoint = 0.5 + (0.5 - 0.2) / h_before * (h / 2)
    out = DDPM.dpm_solver_pp_update(x, x0, a_t, a_next, previous=(x0_before, a_before))
    first_order_with_midpoint = DDPM.dpm_solver_pp_update(x, torch.full_like(x, midpoint), a_t, a_next)
    torch.testing.assert_close(out, first_order_with_midpoint, atol=1e-6, rtol=1e-6)


def test_two_step_dpm_solvers_are_ddim():
    """With two evaluations both steps are first order (the first has no history, the last goes
    to x_0): DPM-Solver++(2M) equals DDIM with eta = 0, the SDE variant DDIM with eta = 1."""
    torch.manual_seed(0)
    d = GaussianDiffusion(Unet(8, dim_mults=(1, 2)), image_size=8, timesteps=40)
    run = lambda **kw: d.sample(3, sampling_steps=2, spacing="quadratic", generator=torch.Generator().manual_seed(7),
                                progress=False, **kw)
    torch.testing.assert_close(run(sampler="dpm++2m"), run(sampler="ddim", eta=0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(run(sampler="dpm++2m-sde"), run(sampler="ddim", eta=1.0), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- sample(): one entry point for every sampler

SAMPLER_SETTINGS = {
    "ddpm": dict(sampler="ddpm"),
    "ddim": dict(sampler="ddim", sampling_steps=5),
    "ddim-eta1": dict(sampler="ddim", sampling_steps=5, eta=1.0),
    "dpm++2m": dict(sampler="dpm++2m", sampling_steps=5),
    "dpm++2m-sde": dict(sampler="dpm++2m-sde", sampling_steps=5),
}
DETERMINISTIC = ["ddim", "dpm++2m"]
STOCHASTIC = ["ddpm", "ddim-eta1", "dpm++2m-sde"]
FEW_STEP = ["ddim", "dpm++2m", "dpm++2m-sde"]


def small_unet_diffusion(T=10, **kw):
    torch.manual_seed(0)
    return GaussianDiffusion(Unet(8, dim_mults=(1, 2)), image_size=8, timesteps=T, **kw)


def test_sampler_names():
    assert GaussianDiffusion.SAMPLERS == ("ddpm", "ddim", "dpm++2m", "dpm++2m-sde")
    assert set(GaussianDiffusion.DEFAULT_SPACINGS) == set(FEW_STEP)
    assert GaussianDiffusion.DEFAULT_SPACINGS["ddim"] == "uniform"  # old DDIM calls draw the same images
    assert set(GaussianDiffusion.DEFAULT_SPACINGS.values()) <= set(SPACINGS)


@pytest.mark.parametrize("setting", SAMPLER_SETTINGS)
def test_every_sampler_returns_images_in_unit_interval(setting):
    out = small_unet_diffusion().sample(3, progress=False, **SAMPLER_SETTINGS[setting])
    assert out.shape == (3, 1, 8, 8) and out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("setting", SAMPLER_SETTINGS)
def test_every_sampler_returns_its_trajectory(setting):
    kwargs = SAMPLER_SETTINGS[setting]
    d = small_unet_diffusion()
    traj = d.sample(2, return_all_timesteps=True, generator=torch.Generator().manual_seed(1), progress=False, **kwargs)
    final = d.sample(2, generator=torch.Generator().manual_seed(1), progress=False, **kwargs)
    steps = kwargs.get("sampling_steps", d.num_timesteps)
    assert traj.shape == (2, steps + 1, 1, 8, 8)
    torch.testing.assert_close(traj[:, -1], final)


@pytest.mark.parametrize("setting", SAMPLER_SETTINGS)
def test_every_sampler_is_reproducible_with_a_generator(setting):
    d = small_unet_diffusion()
    a = d.sample(2, generator=torch.Generator().manual_seed(0), progress=False, **SAMPLER_SETTINGS[setting])
    b = d.sample(2, generator=torch.Generator().manual_seed(0), progress=False, **SAMPLER_SETTINGS[setting])
    assert torch.equal(a, b)


@pytest.mark.parametrize("setting", DETERMINISTIC)
def test_deterministic_samplers_depend_only_on_the_starting_noise(setting):
    d = small_unet_diffusion()
    x_T = torch.randn(2, 1, 8, 8)
    assert torch.equal(sample_from(d, x_T, 1, **SAMPLER_SETTINGS[setting]),
                       sample_from(d, x_T, 2, **SAMPLER_SETTINGS[setting]))


@pytest.mark.parametrize("setting", STOCHASTIC)
def test_stochastic_samplers_draw_fresh_noise_after_the_start(setting):
    d = small_unet_diffusion()
    x_T = torch.randn(2, 1, 8, 8)
    assert not torch.equal(sample_from(d, x_T, 1, **SAMPLER_SETTINGS[setting]),
                           sample_from(d, x_T, 2, **SAMPLER_SETTINGS[setting]))


@pytest.mark.parametrize("setting", SAMPLER_SETTINGS)
def test_every_sampler_shows_progress_only_when_asked(setting, capsys):
    d = small_unet_diffusion()
    d.sample(1, progress=False, **SAMPLER_SETTINGS[setting])
    assert capsys.readouterr().err == ""
    d.sample(1, progress=True, **SAMPLER_SETTINGS[setting])
    assert "sampling" in capsys.readouterr().err


@pytest.mark.parametrize("setting", SAMPLER_SETTINGS)
def test_every_sampler_gives_the_same_answer_for_every_objective(setting):
    """The exact predictor expressed as noise, x_0 or v: the same samples from the same generator."""
    kwargs = SAMPLER_SETTINGS[setting]
    out = {objective: oracle_diffusion(0.1, 0.3, T=20, objective=objective).sample(
        2, clip_denoised=False, generator=torch.Generator().manual_seed(5), progress=False, **kwargs)
        for objective in GaussianDiffusion.OBJECTIVES}
    torch.testing.assert_close(out["pred_x0"], out["pred_noise"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out["pred_v"], out["pred_noise"], atol=1e-4, rtol=0)


def test_sample_without_sampler_keeps_its_old_meaning():
    d = small_unet_diffusion()
    g = lambda: torch.Generator().manual_seed(3)
    assert torch.equal(d.sample(2, generator=g(), progress=False),
                       d.sample(2, sampler="ddpm", generator=g(), progress=False))
    assert torch.equal(d.sample(2, sampling_steps=d.num_timesteps, generator=g(), progress=False),
                       d.sample(2, sampler="ddpm", sampling_steps=d.num_timesteps, generator=g(), progress=False))
    assert torch.equal(d.sample(2, sampling_steps=5, generator=g(), progress=False),
                       d.sample(2, sampler="ddim", sampling_steps=5, eta=0.0, spacing="uniform", generator=g(),
                                progress=False))


# argument errors, one property per test, across the samplers

def test_sample_rejects_an_unknown_sampler():
    with pytest.raises(ValueError, match=r"sampler must be one of \('ddpm', 'ddim', 'dpm\+\+2m', 'dpm\+\+2m-sde'\), "
                                         r"got 'euler'"):
        make_diffusion(T=10).sample(2, sampling_steps=5, sampler="euler", progress=False)


@pytest.mark.parametrize("sampler", FEW_STEP)
def test_sample_rejects_an_unknown_spacing(sampler):
    with pytest.raises(ValueError, match=r"spacing must be one of \('uniform', 'logsnr', 'quadratic'\), got 'karras'"):
        make_diffusion(T=10).sample(2, sampling_steps=5, sampler=sampler, spacing="karras", progress=False)


@pytest.mark.parametrize("sampler", GaussianDiffusion.SAMPLERS)
@pytest.mark.parametrize("steps", [0, 11, 2.5, True])
def test_sample_rejects_sampling_steps_out_of_range(sampler, steps):
    with pytest.raises(ValueError, match=rf"sampling_steps must be None or an integer in 1..10, got {steps!r}"):
        make_diffusion(T=10).sample(2, sampling_steps=steps, sampler=sampler, progress=False)


@pytest.mark.parametrize("sampler", FEW_STEP)
def test_few_step_samplers_need_sampling_steps(sampler):
    with pytest.raises(ValueError, match=rf"the '{re.escape(sampler)}' sampler needs sampling_steps"):
        make_diffusion(T=10).sample(2, sampler=sampler, progress=False)


def test_ddpm_rejects_fewer_sampling_steps():
    with pytest.raises(ValueError, match=r"sampling_steps=5 is not used by the 'ddpm' sampler, which always runs "
                                         r"all 10 timesteps"):
        make_diffusion(T=10).sample(2, sampling_steps=5, sampler="ddpm", progress=False)


UNUSED_ARGUMENTS = [  # (sampler, argument, a valid value for the samplers that do use it)
    *[(s, "eta", 0.0) for s in ("ddpm", "dpm++2m", "dpm++2m-sde")],
    *[(s, "variance", "fixed_small") for s in FEW_STEP],
    *[(s, "noise_scale", 1.0) for s in FEW_STEP],
    ("ddpm", "spacing", "uniform"),
]


@pytest.mark.parametrize("sampler,name,value", UNUSED_ARGUMENTS)
def test_sample_rejects_an_argument_the_sampler_does_not_use(sampler, name, value):
    steps = None if sampler == "ddpm" else 5
    with pytest.raises(ValueError, match=rf"{name} is not used by the '{re.escape(sampler)}' sampler"):
        make_diffusion(T=10).sample(2, sampling_steps=steps, sampler=sampler, progress=False, **{name: value})


def test_implicit_ddpm_rejects_eta():
    """sampling_steps=None without a sampler is DDPM, which has no eta (even eta=0 is refused)."""
    with pytest.raises(ValueError, match=r"eta is not used by the 'ddpm' sampler \(only by 'ddim'\)"):
        make_diffusion(T=10).sample(2, eta=0.0, progress=False)


def test_implicit_ddim_rejects_variance():
    with pytest.raises(ValueError, match=r"variance is not used by the 'ddim' sampler \(only by 'ddpm'\)"):
        make_diffusion(T=10).sample(2, sampling_steps=5, variance="fixed_large", progress=False)


@pytest.mark.parametrize("eta", [-0.5, 1.5, float("nan")])
def test_ddim_rejects_eta_outside_0_to_1(eta):
    """Eq. 16 spans DDIM (0) to DDPM (1); beyond 1, sigma_t may exceed the noise left at the next step."""
    with pytest.raises(ValueError, match=re.escape(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: DDPM's posterior noise), got {eta!r}")):
        make_diffusion(T=10).sample(2, sampling_steps=5, sampler="ddim", eta=eta, progress=False)


# ---------------------------------------------------------------- memory

@pytest.mark.skipif(not DDPM.MALLOC_TUNED, reason="the C library is not glibc: nothing to tune")
def test_importing_ddpm_serves_large_tensors_from_the_reusable_heap():
    """glibc's defaults map every block above 32 MiB afresh (and unmap it on free, so its pages
    fault in again on the next step); after `import DDPM` a 64 MiB tensor lives in the heap,
    whose freed memory is kept for reuse."""
    block = torch.empty(64 << 20, dtype=torch.uint8)
    address = block.data_ptr()
    with open("/proc/self/maps") as maps:
        regions = [line.split() for line in maps]
    region = next(r for r in regions if int(r[0].split("-")[0], 16) <= address < int(r[0].split("-")[1], 16))
    assert region[5:] == ["[heap]"], region


# ---------------------------------------------------------------- the training loss's timesteps

def assert_uniform_timesteps(t, T):
    """t (int64) was drawn uniformly from 0..T-1 (DDPM Algorithm 1, in 0-based steps): every step
    drawn, none outside, and the counts' chi-square statistic below the 0.1% point of its law with
    T - 1 degrees of freedom (Wilson-Hilferty approximation)."""
    assert t.dtype == torch.int64 and t.min().item() >= 0, f"timesteps below 0: {t.min().item()}"
    counts = torch.bincount(t, minlength=T)
    assert len(counts) == T, f"timesteps drawn up to {t.max().item()}, beyond the last, {T - 1}"
    assert counts.min().item() > 0, f"timesteps never drawn: {torch.nonzero(counts == 0).flatten().tolist()}"
    expected = len(t) / T
    chi2 = ((counts.double() - expected) ** 2 / expected).sum().item()
    k = T - 1
    limit = k * (1 - 2 / (9 * k) + 3.09 * math.sqrt(2 / (9 * k))) ** 3  # z = 3.09: the 0.1% tail
    assert chi2 < limit, f"timestep counts {counts.tolist()} are not uniform (chi-square {chi2:.1f}, limit {limit:.1f})"


class TimeRecorder(nn.Module):
    """A 'network' that predicts zeros and keeps the timesteps it was asked about."""

    def __init__(self):
        super().__init__()
        self.seen = []
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x, t):
        self.seen.append(t.clone())
        return self.scale * torch.zeros_like(x)


@pytest.mark.parametrize("T", [10, 37])
def test_the_loss_draws_every_timestep_uniformly_from_0_to_T_minus_1(T):
    """The first and last steps matter most (the last is pure noise, the first the finest detail):
    a draw from 1..T-1 or 0..T-2 would leave one of them untrained."""
    torch.manual_seed(0)
    recorder = TimeRecorder()
    d = make_diffusion(T=T, model=recorder)
    for _ in range(10):
        d(torch.rand(200, 1, 4, 4))
    assert_uniform_timesteps(torch.cat(recorder.seen), T)


def test_assert_uniform_timesteps_rejects_a_range_that_misses_an_end_or_a_skewed_draw():
    torch.manual_seed(0)
    for wrong in (torch.randint(1, 10, (2000,)), torch.randint(0, 9, (2000,)), torch.randint(0, 11, (2000,)),
                  torch.cat([torch.randint(0, 10, (1800,)), torch.zeros(200, dtype=torch.int64)])):
        with pytest.raises(AssertionError):
            assert_uniform_timesteps(wrong, 10)
    assert_uniform_timesteps(torch.randint(0, 10, (2000,)), 10)


# ---------------------------------------------------------------- min-SNR-gamma loss weighting

def outputs_with_x0_error(objective, x0, eps, t, delta, T=100):
    """What a network of each objective outputs when its implied x_0 is off by `delta`."""
    ab = alpha_bar(linear_beta_schedule(T))[t].float().reshape(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    x0_hat = x0 + delta
    eps_hat = (x_t - ab.sqrt() * x0_hat) / (1 - ab).sqrt()
    return {"pred_noise": eps_hat, "pred_x0": x0_hat, "pred_v": ab.sqrt() * eps_hat - (1 - ab).sqrt() * x0_hat}[objective]


@pytest.mark.parametrize("objective", ["pred_noise", "pred_x0", "pred_v"])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_follow_their_closed_form(objective, gamma):
    d = make_diffusion(T=100, objective=objective, min_snr_gamma=gamma)
    t = torch.arange(100)
    snr = alpha_bar(linear_beta_schedule(100)).float() / (1 - alpha_bar(linear_beta_schedule(100)).float())
    expected = {"pred_noise": snr.clamp(max=gamma) / snr, "pred_x0": snr.clamp(max=gamma),
                "pred_v": snr.clamp(max=gamma) / (snr + 1)}[objective]
    assert torch.allclose(d.loss_weight(t), expected, rtol=1e-5)


@pytest.mark.parametrize("gamma", [None, 5.0])
def test_min_snr_gives_every_objective_the_same_loss_for_the_same_x0_error(gamma):
    """Weighted by min-SNR-gamma, an x_0 error costs min(SNR, gamma) |error|^2 whatever the
    network predicts; unweighted, the objectives differ by the factors SNR and SNR + 1."""
    torch.manual_seed(0)
    img, eps = torch.rand(6, 1, 4, 4), torch.randn(6, 1, 4, 4)
    t, delta = torch.tensor([0, 10, 40, 60, 80, 99]), 0.1 * torch.randn(6, 1, 4, 4)
    losses = {}
    for objective in ("pred_noise", "pred_x0", "pred_v"):
        d = make_diffusion(T=100, objective=objective, min_snr_gamma=gamma)
        d.model = Replay(outputs_with_x0_error(objective, img * 2 - 1, eps, t, delta))
        losses[objective] = d(img, t=t, noise=eps).item()
    if gamma is None:
        assert losses["pred_noise"] > 10 * losses["pred_x0"]  # small t has a huge SNR
    else:
        ab = alpha_bar(linear_beta_schedule(100))[t].float()
        expected = ((ab / (1 - ab)).clamp(max=gamma) * delta.pow(2).flatten(1).mean(1)).mean().item()
        for objective, loss in losses.items():
            assert loss == pytest.approx(expected, rel=1e-3), objective


def test_min_snr_gamma_must_be_positive():
    with pytest.raises(ValueError, match="min_snr_gamma must be None"):
        make_diffusion(min_snr_gamma=0)
