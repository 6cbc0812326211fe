"""Class-conditional diffusion and classifier-free guidance (DDPM.py) checked against mathematics.

The reference is a two-class Gaussian mixture whose exact noise predictor is known in closed form
(MixtureOracle): given a label it is one Gaussian's predictor, so the sampler's output law is the
exact finite-step law of test_ddpm.py; without a label it is the mixture's predictor, so the
sampler must reproduce the mixture, and guidance (w > 1) must sharpen samples towards the class.
Guidance itself is checked against its definition (Ho & Salimans 2022):
    out = out(x_t, t, no label) + w * (out(x_t, t, label) - out(x_t, t, no label)).
"""

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import experiment
from DDPM import BETA_SCHEDULES, GaussianDiffusion, Unet, linear_beta_schedule
from test_ddpm import (
    SAMPLER_SETTINGS,
    alpha_bar,
    assert_samples_follow,
    ddpm_pairs,
    exact_dpm_solver_law,
    exact_sampler_law,
    sample_from,
    to_model_space,
)

REPO = Path(__file__).resolve().parent.parent
SAMPLERS = GaussianDiffusion.SAMPLERS


# ---------------------------------------------------------------- the two-class Gaussian mixture

class MixtureOracle(nn.Module):
    """The exact noise predictor of a two-class Gaussian mixture, for each label.

    Class c (0 or 1, equally likely) has every pixel of x_0 (model space) N(mu_c, s^2)
    independently. With x_t = a x_0 + b eps, a = sqrt(abar_t), b = sqrt(1 - abar_t):
      label c:                          E[eps | x_t, c] = b (x_t - a mu_c) / (a^2 s^2 + b^2)
      label num_classes, or no labels:  E[eps | x_t] = sum_c p(c | x_t) E[eps | x_t, c],
    where p(c | x_t) is proportional to the marginal likelihood prod_pixels N(x_t; a mu_c, a^2 s^2 + b^2)
    (both classes share the variance, so only the squared distances differ). Float64 inside.
    """

    channels = 1
    num_classes = 2

    def __init__(self, alphas_cumprod, means, s):
        super().__init__()
        self.ab, self.means, self.s = alphas_cumprod.double(), torch.tensor(means, dtype=torch.float64), s

    def forward(self, x, t, labels=None):
        a, b = self.ab[t].sqrt().reshape(-1, 1, 1, 1), (1 - self.ab[t]).sqrt().reshape(-1, 1, 1, 1)
        x, d = x.double(), a**2 * self.s**2 + b**2
        mu = self.means.reshape(-1, 1, 1, 1, 1)                      # (classes, 1, 1, 1, 1)
        per_class = b * (x - a * mu) / d                             # (classes, B, C, H, W)
        log_likelihood = -((x - a * mu) ** 2 / (2 * d)).flatten(2).sum(2)  # (classes, B)
        posterior = log_likelihood.softmax(0)[..., None, None, None]
        mixture = (posterior * per_class).sum(0)
        if labels is None:
            return mixture.float()
        by_label = torch.cat((per_class, mixture[None]))            # index num_classes: "no label"
        return by_label[labels, torch.arange(len(x))].float()


class Recorder(nn.Module):
    """Passes every call on to `inner`, recording the batch size and the labels (None if none) of each."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []
        self.channels, self.num_classes = inner.channels, inner.num_classes

    def forward(self, x, t, labels=None):
        self.calls.append((x.shape[0], None if labels is None else labels.clone()))
        return self.inner(x, t) if labels is None else self.inner(x, t, labels)


# Well separated (4.7 standard deviations of an image's mean pixel from the midpoint), all inside
# [-1, 1] (the largest mean is 4.3 s from the edge), so sample()'s final clamp changes nothing.
MEANS, S = (-0.35, 0.35), 0.15
# Overlapping: with w = 1 about 7% of the images of a class have their mean pixel on the other side.
OVERLAPPING_MEANS, OVERLAPPING_S = (-0.15, 0.15), 0.2
T = 200
FEW_STEPS = 50
SETTINGS = {  # enough steps for every sampler to come close to the data law (see the first test)
    "ddpm": dict(sampler="ddpm"),
    "ddim": dict(sampler="ddim", sampling_steps=FEW_STEPS, spacing="uniform"),
    "dpm++2m": dict(sampler="dpm++2m", sampling_steps=FEW_STEPS, spacing="uniform"),
    "dpm++2m-sde": dict(sampler="dpm++2m-sde", sampling_steps=FEW_STEPS, spacing="uniform"),
}


def mixture_diffusion(means=MEANS, s=S, timesteps=T, record=False, **kw):
    betas = BETA_SCHEDULES["cosine"](timesteps)
    model = MixtureOracle(alpha_bar(betas), means, s)
    return GaussianDiffusion(Recorder(model) if record else model, image_size=(2, 2), timesteps=timesteps,
                             beta_schedule="cosine", **kw)


def exact_component_law(diffusion, sampler, mu, s):
    """Mean and variance of `sampler`'s output (SETTINGS) for N(mu, s^2) data with the exact predictor."""
    betas = BETA_SCHEDULES["cosine"](diffusion.num_timesteps)
    if sampler == "ddpm":
        return exact_sampler_law(betas, mu, s, ddpm_pairs(diffusion.num_timesteps))
    pairs = diffusion.sampling_timesteps(FEW_STEPS, "uniform")
    if sampler == "ddim":
        return exact_sampler_law(betas, mu, s, pairs, eta=0.0)
    return exact_dpm_solver_law(betas, mu, s, pairs, stochastic=sampler == "dpm++2m-sde")


def sample_mixture(diffusion, sampler, n, seed=0, **kw):
    """n images from `sampler` in model space (float64), without clipping x_0 on the way."""
    return to_model_space(diffusion.sample(n, clip_denoised=False, generator=torch.Generator().manual_seed(seed),
                                           progress=False, **SETTINGS[sampler], **kw))


def share_on_side(images, labels, means):
    """The share of images whose mean pixel lies on their label's side of the midpoint of the means."""
    midpoint, side = sum(means) / 2, torch.tensor([-1.0, 1.0], dtype=torch.float64)[labels]
    return ((images.flatten(1).mean(1) - midpoint) * side > 0).double().mean().item()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_w1_with_a_label_reproduces_that_component(sampler):
    """Per image labels (half of each class in one batch): each class's pixels follow the exact
    finite-step law of the sampler for that single Gaussian (5 standard errors on the mean, on the
    variance 5 sqrt(2/n) relative, as test_ddpm.py), and that law is the component's: its mean
    within 1e-3 of mu_c, its standard deviation within 10% of s (the discretisation at T = 200 and
    50 steps: DDIM's first-order steps lose 9%, DDPM's last x_0 prediction 5%)."""
    d = mixture_diffusion()
    n = 2000  # images per class, 4 pixels each
    labels = torch.arange(2 * n) % 2
    samples = sample_mixture(d, sampler, 2 * n, labels=labels, guidance_scale=1.0)
    for c, mu in enumerate(MEANS):
        m, v = exact_component_law(d, sampler, mu, S)
        assert abs(m - mu) < 1e-3 and abs(math.sqrt(v) / S - 1) < 0.1
        assert_samples_follow(samples[labels == c], m, v)


@pytest.mark.parametrize("labels", [None, 1], ids=["no labels", "labels ignored"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_w0_reproduces_the_mixture(sampler, labels):
    """w = 0 is the unconditional model whatever the labels: half the images in each component
    (within 5 binomial standard errors), mean pixel (mu0 + mu1)/2 (5 standard errors of the mean of
    the images' means), pixel standard deviation sqrt(s^2 + ((mu1 - mu0)/2)^2) within 3% (the
    component spread shrinks by up to 10% at these steps, 1.5% of the total; 5 standard errors 1.5%)."""
    d = mixture_diffusion()
    n = 4000
    samples = sample_mixture(d, sampler, n, labels=labels, guidance_scale=0)
    half_gap = (MEANS[1] - MEANS[0]) / 2
    share_of_class_1 = share_on_side(samples, torch.ones(n, dtype=torch.long), MEANS)
    assert abs(share_of_class_1 - 0.5) < 5 * math.sqrt(0.25 / n)
    assert abs(samples.mean().item() - sum(MEANS) / 2) < 5 * math.sqrt((half_gap**2 + S**2 / 4) / n)
    assert samples.std().item() == pytest.approx(math.sqrt(S**2 + half_gap**2), rel=0.03)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_guidance_above_1_sharpens_samples_towards_the_requested_class(sampler):
    """Overlapping components, the same starting noise for w = 1 and w = 3: at w = 1 about 93-95%
    of the images land on their class's side of the midpoint (the component itself), at w = 3
    every one; asserted: w = 3 gains at least 3 points (5 binomial standard errors of the w = 1
    share) and keeps at least 99%, and its images' mean pixel moves away from the other class."""
    d = mixture_diffusion(OVERLAPPING_MEANS, OVERLAPPING_S)
    n = 4000
    labels = torch.arange(n) % 2
    side = (labels * 2 - 1).double()
    share, pushed = {}, {}
    for w in (1.0, 3.0):
        samples = sample_mixture(d, sampler, n, labels=labels, guidance_scale=w)
        share[w] = share_on_side(samples, labels, OVERLAPPING_MEANS)
        pushed[w] = (samples.flatten(1).mean(1) * side).mean().item()  # towards the class, from the midpoint 0
    assert share[1.0] > 0.85
    assert share[3.0] >= share[1.0] + 0.03 and share[3.0] >= 0.99
    assert pushed[3.0] > pushed[1.0] + 0.02


def test_guidance_scale_defaults_to_the_plain_conditional_model():
    d = mixture_diffusion(timesteps=20)
    run = lambda **kw: d.sample(3, sampling_steps=5, sampler="dpm++2m-sde", labels=[0, 1, 1], progress=False,
                                generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(run(), run(guidance_scale=1.0))


@pytest.mark.parametrize("labels", [1, [1, 1, 1], (1, 1, 1), torch.tensor([1, 1, 1], dtype=torch.int32)],
                         ids=["int", "list", "tuple", "int32 tensor"])
def test_every_form_of_labels_asks_for_the_same_classes(labels):
    d = mixture_diffusion(timesteps=20)
    run = lambda lab: d.sample(3, sampling_steps=5, sampler="ddim", eta=1.0, labels=lab, guidance_scale=2.0,
                               progress=False, generator=torch.Generator().manual_seed(4))
    assert torch.equal(run(labels), run(torch.tensor([1, 1, 1])))


# ---------------------------------------------------------------- guidance is the stated combination

def conditional_unet(num_classes=3, seed=0):
    """A small conditional U-Net whose class embedding is non-zero (as after training)."""
    torch.manual_seed(seed)
    unet = Unet(dim=16, dim_mults=(1, 2), num_classes=num_classes, attn_dim_head=8)
    nn.init.normal_(unet.class_emb.weight)
    return unet


def guidance_inputs():
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(4, 1, 8, 8, generator=generator), torch.tensor([3, 12, 30, 49]),
            torch.tensor([0, 2, 1, 2]))


@pytest.mark.parametrize("w", [0.0, 0.3, 1.0, 2.0, 7.5])  # not 0.5: symmetric in cond and uncond
def test_guided_output_is_the_stated_combination_of_two_separate_calls(w):
    d = GaussianDiffusion(conditional_unet(), image_size=8, timesteps=50)
    x, t, labels = guidance_inputs()
    with torch.no_grad():
        cond = d.model(x, t, labels).double()
        uncond = d.model(x, t, torch.full_like(labels, 3)).double()
        guided = d.guided_output(x, t, labels, w).double()
    assert (cond - uncond).abs().max() > 0.01  # the label matters, so a wrong combination shows
    torch.testing.assert_close(guided, uncond + w * (cond - uncond), atol=1e-5 * (1 + w), rtol=0)


def predictions_from_output(objective, out, x, t, timesteps=50):
    """(noise, x_0) implied by a network output at (x_t, t), in float64 from the betas:
    x_t = a x_0 + b eps; v = a eps - b x_0, so eps = b x_t + a v and x_0 = a x_t - b v."""
    ab = alpha_bar(linear_beta_schedule(timesteps))[t].reshape(-1, 1, 1, 1)
    a, b, out, x = ab.sqrt(), (1 - ab).sqrt(), out.double(), x.double()
    if objective == "pred_noise":
        return out, (x - b * out) / a
    if objective == "pred_x0":
        return (x - a * out) / b, out
    return b * x + a * out, a * x - b * out


@pytest.mark.parametrize("w", [0.3, 3.0])
@pytest.mark.parametrize("objective", GaussianDiffusion.OBJECTIVES)
@pytest.mark.parametrize("prediction", ["noise", "x0"])
def test_guiding_the_output_of_any_objective_guides_the_predicted_noise_and_x0(prediction, objective, w):
    """guided_output's docstring: eps = eps_uncond + w (eps_cond - eps_uncond), whatever the network
    predicts, and so for the predicted x_0 too."""
    which = 0 if prediction == "noise" else 1
    d = GaussianDiffusion(conditional_unet(), image_size=8, timesteps=50, objective=objective)
    x, t, labels = guidance_inputs()
    with torch.no_grad():
        cond = predictions_from_output(objective, d.model(x, t, labels), x, t)[which]
        uncond = predictions_from_output(objective, d.model(x, t), x, t)[which]
        guided = d.model_predictions(x, t, clip_x_start=False, labels=labels, guidance_scale=w)[which]
    torch.testing.assert_close(guided.double(), uncond + w * (cond - uncond), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- network evaluations per step

FAST = {"ddpm": dict(sampler="ddpm"), "ddim": dict(sampler="ddim", sampling_steps=4),
        "dpm++2m": dict(sampler="dpm++2m", sampling_steps=4), "dpm++2m-sde": dict(sampler="dpm++2m-sde", sampling_steps=4)}


def recorded_calls(sampler, labels, w, timesteps=10):
    d = mixture_diffusion(timesteps=timesteps, record=True)
    d.sample(3, labels=labels, guidance_scale=w, progress=False, **FAST[sampler])
    assert len(d.model.calls) == FAST[sampler].get("sampling_steps", timesteps)  # one call per step
    return d.model.calls


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_w1_makes_one_pass_of_B_images_per_step_with_the_labels(sampler):
    labels = torch.tensor([1, 0, 1])
    for batch, passed in recorded_calls(sampler, labels, 1.0):
        assert batch == 3 and torch.equal(passed, labels)


@pytest.mark.parametrize("w", [0.5, 3.0])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_other_w_makes_one_pass_of_2B_images_per_step_with_labels_and_no_labels(sampler, w):
    labels = torch.tensor([1, 0, 1])
    for batch, passed in recorded_calls(sampler, labels, w):
        no_label = passed == MixtureOracle.num_classes
        assert batch == 6 and no_label.sum() == 3
        assert sorted(passed[~no_label].tolist()) == sorted(labels.tolist())


@pytest.mark.parametrize("labels", [None, torch.tensor([1, 0, 1])], ids=["no labels", "labels"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_w0_makes_one_unlabelled_pass_of_B_images_per_step(sampler, labels):
    for batch, passed in recorded_calls(sampler, labels, 0.0):
        assert batch == 3 and passed is None


# ---------------------------------------------------------------- label dropout in training

def labels_seen_in_training(n, cond_drop_prob, drop=None):
    """The labels the network receives in one training step on n images with labels 0, 1, 0, 1, ..."""
    d = mixture_diffusion(timesteps=10, record=True, cond_drop_prob=cond_drop_prob)
    labels = torch.arange(n) % 2
    d(torch.full((n, 1, 2, 2), 0.5), labels=labels, drop=drop)
    (batch, passed), = d.model.calls
    return labels, passed


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_a_share_cond_drop_prob_of_labels_becomes_no_label(p):
    """Within 5 binomial standard errors (n = 20000: 0.011 at p = 0.1, 0.018 at p = 0.5)."""
    torch.manual_seed(0)
    n = 20000
    labels, passed = labels_seen_in_training(n, p)
    dropped = passed == MixtureOracle.num_classes
    assert abs(dropped.double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_labels_not_dropped_reach_the_network_unchanged(p):
    torch.manual_seed(0)
    labels, passed = labels_seen_in_training(2000, p)
    kept = passed != MixtureOracle.num_classes
    assert torch.equal(passed[kept], labels[kept])


def test_cond_drop_prob_0_passes_every_label():
    torch.manual_seed(0)
    labels, passed = labels_seen_in_training(2000, 0.0)
    assert torch.equal(passed, labels)


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_an_explicit_drop_mask_is_obeyed_exactly(p):
    drop = torch.arange(12) % 3 == 0
    labels, passed = labels_seen_in_training(12, p, drop=drop)
    assert torch.equal(passed, torch.where(drop, MixtureOracle.num_classes, labels))


@pytest.mark.parametrize("drop,named", [(torch.ones(12, 1, dtype=torch.bool), "torch.bool (12, 1)"),
                                        (torch.ones(12), "torch.float32 (12,)"), ([True] * 12, "list ()")])
def test_a_drop_mask_that_is_not_one_boolean_per_image_is_rejected(drop, named):
    with pytest.raises(ValueError, match=re.escape(f"drop must be a boolean tensor of shape (12,), one per image, got {named}")):
        labels_seen_in_training(12, 0.1, drop=drop)


def test_training_without_labels_calls_the_network_without_labels():
    d = mixture_diffusion(timesteps=10, record=True)
    d(torch.full((4, 1, 2, 2), 0.5))
    assert d.model.calls == [(4, None)]


# ---------------------------------------------------------------- the conditional U-Net

def unet_inputs():
    generator = torch.Generator().manual_seed(3)
    return torch.randn(2, 1, 8, 8, generator=generator), torch.tensor([4, 40])


def outputs_by_label(unet, num_classes=3):
    """The U-Net's output for every label (the same one for both images), "no label", and no labels."""
    x, t = unet_inputs()
    with torch.no_grad():
        out = {c: unet(x, t, torch.full((2,), c)) for c in range(num_classes + 1)}
        out[None] = unet(x, t)
    return out


def test_a_fresh_conditional_unet_tells_its_classes_apart_from_the_start():
    """The class rows start random and distinct; "no label" starts at zero."""
    torch.manual_seed(0)
    unet = Unet(dim=16, dim_mults=(1, 2), num_classes=3, attn_dim_head=8)
    assert torch.equal(unet.class_emb.weight[3], torch.zeros_like(unet.class_emb.weight[3]))
    out = outputs_by_label(unet)
    assert all((out[i] - out[j]).abs().max() > 1e-4 for i in range(3) for j in range(i + 1, 4))


def test_a_conditional_unet_starts_from_the_same_seeded_layers_as_an_unconditional_one():
    torch.manual_seed(0)
    unconditional = Unet(dim=16, dim_mults=(1, 2), attn_dim_head=8).state_dict()
    torch.manual_seed(0)
    conditional = Unet(dim=16, dim_mults=(1, 2), num_classes=3, attn_dim_head=8).state_dict()
    assert all(torch.equal(conditional[k], v) for k, v in unconditional.items())


def test_a_conditional_unet_with_unconditional_weights_is_the_unconditional_unet_without_a_label():
    torch.manual_seed(0)
    unconditional = Unet(dim=16, dim_mults=(1, 2), attn_dim_head=8)
    conditional = Unet(dim=16, dim_mults=(1, 2), num_classes=3, attn_dim_head=8)
    missing, unexpected = conditional.load_state_dict(unconditional.state_dict(), strict=False)
    assert missing == ["class_emb.weight"] and unexpected == []
    x, t = unet_inputs()
    with torch.no_grad():
        expected = unconditional(x, t)
    out = outputs_by_label(conditional)
    assert torch.equal(out[None], expected) and torch.equal(out[3], expected)  # None and 3: no label


def test_a_nonzero_class_embedding_makes_the_output_depend_on_the_label():
    out = outputs_by_label(conditional_unet())
    assert torch.equal(out[3], out[None])  # no labels is "no label"
    keys = list(out)[:4]
    assert all((out[i] - out[j]).abs().max() > 1e-3 for i in keys for j in keys if i != j)


def test_an_unconditional_unet_rejects_labels():
    x, t = unet_inputs()
    with pytest.raises(ValueError, match=r"labels were given to an unconditional U-Net \(num_classes=None\)"):
        Unet(dim=8, dim_mults=(1, 2))(x, t, torch.tensor([0, 1]))


@pytest.mark.parametrize("num_classes", [0, -2, True, 2.0, "10"])
def test_unet_rejects_a_bad_number_of_classes(num_classes):
    with pytest.raises(ValueError, match=rf"num_classes must be None \(unconditional\) or an integer >= 1, "
                                         rf"got {re.escape(repr(num_classes))}"):
        Unet(dim=8, dim_mults=(1, 2), num_classes=num_classes)


@pytest.mark.parametrize("p", [1.0, 1, -0.1, float("nan"), "0.1", None])
def test_gaussian_diffusion_rejects_a_bad_cond_drop_prob(p):
    with pytest.raises(ValueError, match=rf"cond_drop_prob must be a number in \[0, 1\), got {re.escape(repr(p))}"):
        GaussianDiffusion(Unet(dim=8, dim_mults=(1, 2), num_classes=2), image_size=8, cond_drop_prob=p)


# ---------------------------------------------------------------- argument errors, for every sampler

class MustNotRun(nn.Module):
    """A network for argument checks: sampling must fail before any network evaluation."""

    channels = 1

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x, t, labels=None):
        raise AssertionError("the network ran before the arguments were checked")


def sample_with(sampler, num_classes=10, **kw):
    d = GaussianDiffusion(MustNotRun(num_classes), image_size=4, timesteps=10)
    return d.sample(2, progress=False, **FAST[sampler], **kw)


@pytest.mark.parametrize("labels,values", [(10, "10..10"), (-1, "-1..-1"), (torch.tensor([3, 10]), "3..10"),
                                           ([-1, 12], "-1..12")])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sample_rejects_labels_out_of_range(sampler, labels, values):
    with pytest.raises(ValueError, match=rf"labels must lie in 0\.\.9 \(the model's 10 classes\), "
                                         rf"got values in {re.escape(values)}"):
        sample_with(sampler, labels=labels)


@pytest.mark.parametrize("w", [None, 1.0, 3.0])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_conditional_model_needs_labels_unless_w_is_0(sampler, w):
    with pytest.raises(ValueError, match=r"this model is class-conditional: pass labels \(integers in 0\.\.9, "
                                         r"one per image\), or guidance_scale=0 for unconditional samples"):
        sample_with(sampler, guidance_scale=w)


@pytest.mark.parametrize("labels,shape", [(torch.tensor([1, 2, 3]), "(3,)"), (torch.tensor([[1], [2]]), "(2, 1)"),
                                          (torch.tensor(1), "()"), ([1], "(1,)")])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sample_rejects_labels_of_the_wrong_shape(sampler, labels, shape):
    with pytest.raises(ValueError, match=rf"labels must have shape \(2,\), one per image, got {re.escape(shape)}"):
        sample_with(sampler, labels=labels)


@pytest.mark.parametrize("labels,kind", [(torch.tensor([1.0, 2.0]), "torch.float32"), ([0.5, 1.0], "torch.float32"),
                                         (torch.tensor([True, False]), "torch.bool"), (1.0, "float"),
                                         ("1", "str")])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sample_rejects_labels_that_are_not_integers(sampler, labels, kind):
    with pytest.raises(ValueError, match=rf"labels must be an integer tensor of class indices, got {re.escape(kind)}"):
        sample_with(sampler, labels=labels)


@pytest.mark.parametrize("w", [-1.0, -1e-9, float("nan"), float("inf"), True, "3"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sample_rejects_a_bad_guidance_scale(sampler, w):
    with pytest.raises(ValueError, match=rf"guidance_scale must be a finite number >= 0, got {re.escape(repr(w))}"):
        sample_with(sampler, labels=1, guidance_scale=w)


@pytest.mark.parametrize("labels", [torch.tensor([0, 1]), 0, [0, 1]], ids=["tensor", "int", "list"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_an_unconditional_model_rejects_labels(sampler, labels):
    with pytest.raises(ValueError, match=r"labels were given, but this model is unconditional "
                                         r"\(its U-Net has no num_classes\)"):
        sample_with(sampler, num_classes=None, labels=labels)


@pytest.mark.parametrize("w", [1.0, 3.0])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_an_unconditional_model_rejects_a_guidance_scale(sampler, w):
    with pytest.raises(ValueError, match=rf"guidance_scale={w!r} needs a class-conditional model; this one is "
                                         r"unconditional"):
        sample_with(sampler, num_classes=None, guidance_scale=w)


def test_training_rejects_labels_for_an_unconditional_model():
    d = GaussianDiffusion(MustNotRun(None), image_size=4, timesteps=10)
    with pytest.raises(ValueError, match=r"labels were given, but this model is unconditional"):
        d(torch.rand(2, 1, 4, 4), labels=torch.tensor([0, 1]))


@pytest.mark.parametrize("labels,message", [
    (torch.tensor([0.0, 1.0]), r"labels must be an integer tensor of class indices, got torch.float32"),
    (torch.tensor([0, 1, 1]), r"labels must have shape \(2,\), one per image, got \(3,\)"),
])
def test_training_rejects_bad_labels(labels, message):
    d = GaussianDiffusion(MustNotRun(10), image_size=4, timesteps=10)
    with pytest.raises(ValueError, match=message):
        d(torch.rand(2, 1, 4, 4), labels=labels)


# ---------------------------------------------------------------- randomness, with labels and guidance



def guided_unet_diffusion():
    return GaussianDiffusion(conditional_unet(), image_size=8, timesteps=10)


def guided_sample(d, setting, generator):
    return d.sample(2, labels=[0, 2], guidance_scale=2.5, generator=generator, progress=False,
                    **SAMPLER_SETTINGS[setting])


@pytest.mark.parametrize("setting", SAMPLER_SETTINGS)
def test_guided_sampling_is_reproducible_with_a_generator(setting):
    d = guided_unet_diffusion()
    a = guided_sample(d, setting, torch.Generator().manual_seed(0))
    b = guided_sample(d, setting, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


@pytest.mark.parametrize("setting", SAMPLER_SETTINGS)
def test_guided_sampling_with_another_generator_gives_other_images(setting):
    d = guided_unet_diffusion()
    a = guided_sample(d, setting, torch.Generator().manual_seed(0))
    b = guided_sample(d, setting, torch.Generator().manual_seed(1))
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("setting", ["ddpm", "ddim-eta1", "dpm++2m-sde"])
def test_stochastic_guided_samplers_draw_fresh_noise_after_the_start(setting):
    d = guided_unet_diffusion()
    x_T = torch.randn(2, 1, 8, 8)
    kwargs = dict(labels=[0, 2], guidance_scale=2.5, **SAMPLER_SETTINGS[setting])
    assert not torch.equal(sample_from(d, x_T, 1, **kwargs), sample_from(d, x_T, 2, **kwargs))


@pytest.mark.parametrize("setting", ["ddim", "dpm++2m"])
def test_deterministic_guided_samplers_depend_only_on_the_starting_noise(setting):
    d = guided_unet_diffusion()
    x_T = torch.randn(2, 1, 8, 8)
    kwargs = dict(labels=[0, 2], guidance_scale=2.5, **SAMPLER_SETTINGS[setting])
    assert torch.equal(sample_from(d, x_T, 1, **kwargs), sample_from(d, x_T, 2, **kwargs))


# ---------------------------------------------------------------- the shipped unconditional weights

def test_the_shipped_unconditional_weights_still_load_and_sample():
    diffusion, cfg = experiment.load_weights(REPO / "data" / "ddpm_mnist_ema.pt")
    assert diffusion.model.num_classes is None and diffusion.num_classes is None
    assert not any("class_emb" in key for key in diffusion.state_dict())
    images = diffusion.sample(2, sampling_steps=2, generator=torch.Generator().manual_seed(0), progress=False)
    assert images.shape == (2, 1, 28, 28) and images.min() >= 0 and images.max() <= 1
