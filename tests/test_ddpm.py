"""DDPM.py checked against mathematics: closed forms, the papers' equations, known answers.

Every expected value here is derived independently in float64 from the betas (not read back from
the buffers under test), following Ho et al. 2020 (DDPM) and Song et al. 2021 (DDIM).
"""

import math

import pytest
import torch
from torch import nn

import DDPM
from DDPM import (
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
    x = torch.randn(1, 2, 4, 4)
    unshuffled = torch.nn.functional.pixel_unshuffle(x, 2)
    assert unshuffled.shape == (1, 8, 2, 2)
    assert torch.equal(torch.nn.functional.pixel_shuffle(unshuffled, 2), x)


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
    """

    def __init__(self, alphas_cumprod, mu, s):
        super().__init__()
        self.ab, self.mu, self.s = alphas_cumprod.double(), mu, s

    def forward(self, x, t):
        a, b = self.ab[t].sqrt().reshape(-1, 1, 1, 1), (1 - self.ab[t]).sqrt().reshape(-1, 1, 1, 1)
        return (b * (x.double() - a * self.mu) / (a**2 * self.s**2 + b**2)).float()


def oracle_diffusion(mu, s, T=100):
    betas = cosine_beta_schedule(T)
    return GaussianDiffusion(GaussianOracle(alpha_bar(betas), mu, s), image_size=(20, 25), timesteps=T,
                             beta_schedule="cosine")


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


def test_ddpm_with_posterior_variance_reproduces_the_data_law():
    m, v = exact_sampler_law(cosine_beta_schedule(1000), 0.1, 0.2, ddpm_pairs(1000))
    assert m == pytest.approx(0.1, abs=1e-3) and math.sqrt(v) == pytest.approx(0.2, rel=0.02)


def test_too_little_reverse_variance_collapses_and_too_much_inflates():
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


def test_deterministic_ddim_with_fine_steps_reproduces_the_data_law():
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
    assert pairs[0][0] == 999 and pairs[-1] == (0, -1) or pairs[-1][1] == -1
    starts = [t for t, _ in pairs]
    gaps = [a - b for a, b in zip(starts, starts[1:])]
    assert len(pairs) == 10 and max(gaps) - min(gaps) <= 1


def test_ddim_eta_0_is_deterministic_given_the_starting_noise():
    d = GaussianDiffusion(Unet(8, dim_mults=(1, 2)), image_size=8, timesteps=50)
    a = d.sample(2, sampling_steps=5, generator=torch.Generator().manual_seed(3), progress=False)
    b = d.sample(2, sampling_steps=5, generator=torch.Generator().manual_seed(3), progress=False)
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
