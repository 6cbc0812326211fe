"""Training runs, the experiment manager and the command line for DDPM.py.

Read top to bottom: the run config -> hardware set-up -> one training run (`Experiment`) ->
shipped weights -> many runs (`ExperimentManager`) -> the notebook export -> the command line.
Datasets live in data.py and sample-quality scores in evaluation.py (their names are re-exported
here, so `experiment.load_dataset` and `experiment.evaluate_samples` keep working).
`python experiment.py --help` lists the commands.

    python experiment.py                       # the main job: a class-conditional Fashion-MNIST DDPM, ~19 min on 2 cores
    python experiment.py sample data/ddpm_mnist_ema.pt --out digits.png   # shipped weights, seconds
    python experiment.py train --dataset mnist --steps 20000 --out-dir runs/mnist
    torchrun --nproc_per_node=2 experiment.py train --steps 1000   # DistributedDataParallel
    python experiment.py sample data/cond_mnist_ema.pt --label 7 --guidance 3 --out sevens.png
    python experiment.py train --dataset folder:PATH --image-size 32 --out-dir runs/mine   # your own images
"""

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import DDPM
import data
# re-exported: the notebooks and users' scripts reach these through experiment
from data import CLASS_NAMES, DATASETS, DataError, default_data_root, load_dataset, load_images  # noqa: F401
from evaluation import (classifier_path, evaluate_samples, fid_floor, frechet_distance,  # noqa: F401
                        memorisation, nearest_training_images, train_classifier)

REPO_DIR = Path(__file__).resolve().parent
DATA_DIR = REPO_DIR / "data"  # figures and small artefacts tracked in git


# ================================================================================================
# The run config
# ================================================================================================

class ConfigError(ValueError):
    """An invalid config value; the message names the field, the value and what is allowed."""


@dataclasses.dataclass
class Config:
    # data
    dataset: str = "fashion_mnist"       # "mnist", "fashion_mnist", or "folder:PATH" (your own images)
    train_subset: int = 0                # use only the first N training images (0 = all)
    image_size: int = 0                  # square images of this size (0 = the dataset's: 28; a folder: 32)
    channels: int = 0                    # 1 (grey) or 3 (RGB); 0 = the data's (a folder: 3 if any image has colour)
    hflip: bool = False                  # flip a random half of each batch left-right (augmentation)
    augment: bool = False                # random crops: images prepared 1/8 larger, cropped anew each step
    # model (DDPM.Unet)
    dim: int = 32
    dim_mults: tuple = (1, 2, 4)
    resnet_blocks: int = 1
    attn_dim_head: int = 16
    # diffusion (DDPM.GaussianDiffusion)
    timesteps: int = 1000
    beta_schedule: str = "linear"
    objective: str = "pred_noise"
    min_snr_gamma: float = 5.0           # min-SNR-gamma loss weighting (Hang et al. 2023) (None = off)
    # class-conditional model with classifier-free guidance (conditional_diffusion.ipynb)
    conditional: bool = False            # condition on the dataset's classes
    cond_drop_prob: float = 0.1          # share of training labels replaced by "no label"
    guidance: float = 2.0                # guidance scale w of the run's pictures and evaluation (1 = no guidance)
    init_weights: str = None             # a weights file (.pt) to start from, e.g. to fine-tune (None = random)
    class_names: tuple = ()              # a folder's classes, recorded when a conditional run first loads it
                                         # (so its weights sample without the folder); () = the dataset's
    # optimisation
    batch_size: int = 32                 # global batch, split across processes under torchrun
    lr: float = 2e-3                     # (these three: the winning levers, COMBINED below)
    lr_schedule: str = "cosine"          # "constant" or "cosine" (to lr/10), after a linear warm-up
    warmup_steps: int = 200              # linear warm-up (at most a fifth of the run's steps)
    weight_decay: float = 0.0
    grad_clip: float = 1.0               # max gradient norm (0 = off)
    steps: int = 1500                    # training length in optimizer steps ...
    epochs: float = 0.0                  # ... or in epochs, if > 0 (then `steps` is derived)
    minutes: float = None                # ... or a training-time budget: steps fixed by measuring (None = off)
    ema_decay: float = 0.999
    ema_power: float = 0.0               # > 0: power-function EMA (Karras et al. 2023) instead of ema_decay
    seed: int = 0
    # hardware
    device: str = "auto"                 # "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "mps"
    precision: str = "bfloat16"          # "bfloat16" (autocast) or "float32"
    channels_last: str = "auto"          # the U-Net's activations in channels_last (use_channels_last): "on",
                                         # "off", or "auto": on where it is measured faster (channels_last_pays)
    compile: bool = False                # torch.compile the U-Net
    # outputs
    out_dir: str = "runs/fashion_mnist_ddpm"
    log_every: int = 50
    checkpoint_every: int = 500
    sample_every: int = 500              # sample grid every N steps (0 = only at the end)
    num_sample_images: int = 64
    sampler: str = "dpm++2m-sde"         # for pictures and evaluation: one of DDPM.GaussianDiffusion.SAMPLERS
                                         # (the best at <= 50 network evaluations in DDPM.ipynb's comparison)
    sample_steps: int = 20               # network evaluations per picture (= timesteps for "ddpm")
    sample_eta: float = 0.0              # DDIM's eta (only with sampler "ddim")
    gif: bool = True
    # evaluation at the end
    eval_samples: int = 1000             # 0 = skip
    eval_steps: int = 50                 # network evaluations per evaluated sample

    CHOICES = {
        "dataset": tuple(DATASETS),
        "beta_schedule": tuple(DDPM.BETA_SCHEDULES),
        "objective": DDPM.GaussianDiffusion.OBJECTIVES,
        "lr_schedule": ("constant", "cosine"),
        "device": ("auto", "cpu", "cuda", "mps"),
        "precision": ("float32", "bfloat16"),
        "channels_last": ("auto", "on", "off"),
        "sampler": DDPM.GaussianDiffusion.SAMPLERS,
    }

    OPTIONAL = ("minutes", "min_snr_gamma", "init_weights")  # fields that may be None (off)
    # fields whose default changed after runs were saved without them: what such a run trained with
    SAVED_BEFORE = {"min_snr_gamma": None, "channels_last": "off"}

    def validate(self):
        """Reject invalid values before any work starts."""
        self._check_types()
        self._check_model()
        self._check_training()
        self._check_sampling()
        return self

    def _fail(self, field, allowed):
        raise ConfigError(f"config.{field}={getattr(self, field)!r} is not allowed: {allowed}")

    def _check_types(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in self.OPTIONAL:
                continue
            if f.name == "dataset" and data.is_folder(value):
                continue  # checked when its images are loaded: a trained model samples without them
            if f.name in self.CHOICES and value not in self.CHOICES[f.name]:
                self._fail(f.name, f"expected one of {self.CHOICES[f.name]}")
            if f.type is int and (isinstance(value, bool) or not isinstance(value, int)):
                self._fail(f.name, "expected an integer")
            if f.type is float and (isinstance(value, bool) or not isinstance(value, (int, float))
                                    or not math.isfinite(value)):
                self._fail(f.name, "expected a finite number")
            if f.type is bool and not isinstance(value, bool):
                self._fail(f.name, "expected true or false")
            if f.type is str and not isinstance(value, str):
                self._fail(f.name, "expected a string")
        positive = ("dim", "resnet_blocks", "attn_dim_head", "timesteps", "batch_size", "log_every",
                    "checkpoint_every", "num_sample_images")
        for name in positive:
            if getattr(self, name) < 1:
                self._fail(name, "expected an integer >= 1")
        for name in ("train_subset", "warmup_steps", "sample_every", "eval_samples", "steps", "seed"):
            if getattr(self, name) < 0:
                self._fail(name, "expected an integer >= 0")

    def _check_model(self):
        if not (isinstance(self.dim_mults, (tuple, list)) and self.dim_mults
                and all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in self.dim_mults)):
            self._fail("dim_mults", "expected a non-empty list of positive integers, such as [1, 2, 4]")
        if not (isinstance(self.class_names, (tuple, list)) and all(isinstance(n, str) and n for n in self.class_names)
                and len(set(self.class_names)) == len(self.class_names) != 1):
            self._fail("class_names", "expected distinct non-empty names, at least two (or none: the dataset's)")
        if self.class_names and not data.is_folder(self.dataset):
            self._fail("class_names", f"{self.dataset}'s classes are built in: expected none")
        if self.channels not in (0, 1, 3):
            self._fail("channels", "expected 1 (greyscale), 3 (RGB) or 0 (the data's)")
        if self.image_size and self.image_size < 8:
            self._fail("image_size", "expected 0 (the dataset's size) or a size >= 8")
        size = self.size
        factor, halvings = 2 ** (len(self.dim_mults) - 1), (size & -size).bit_length() - 1
        if size % factor:
            times = {0: "not at all", 1: "only once", 2: "at most twice"}.get(halvings, f"at most {halvings} times")
            field = "image_size" if self.image_size else "dim_mults"
            self._fail(field, f"{size}x{size} images can be halved {times}: use at most {halvings + 1} levels "
                              f"(dim_mults), or an image size that is a multiple of {factor}, such as "
                              f"{', '.join(str(factor * k) for k in (2, 4, 8) if factor * k >= 8)}")
        if self.dim % 8 or self.dim < 8:
            self._fail("dim", "expected a multiple of 8 (GroupNorm uses 8 groups)")

    def _check_training(self):
        if self.steps < 1 and self.epochs <= 0 and self.minutes is None:
            self._fail("steps", "expected steps >= 1, or epochs > 0, or a time budget in minutes")
        if self.epochs < 0:
            self._fail("epochs", "expected a number >= 0")
        if self.minutes is not None and not self.minutes > 0:
            self._fail("minutes", "expected a number of minutes > 0 (leave it out to train for `steps`)")
        if self.minutes is not None and self.epochs > 0:
            self._fail("minutes", "a time budget replaces epochs: set epochs to 0")
        if not self.lr > 0:
            self._fail("lr", "expected a number > 0")
        if self.weight_decay < 0 or self.grad_clip < 0:
            self._fail("weight_decay" if self.weight_decay < 0 else "grad_clip", "expected a number >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            self._fail("ema_decay", "expected a number in [0, 1)")
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            self._fail("min_snr_gamma", "expected a number > 0 (leave it out for the unweighted loss)")
        if self.ema_power < 0:
            self._fail("ema_power", "expected a number >= 0 (0 = the fixed ema_decay)")
        if not 0 <= self.cond_drop_prob < 1:
            self._fail("cond_drop_prob", "expected a number in [0, 1)")

    def _check_sampling(self):
        for name in ("sample_steps", "eval_steps"):
            if not 1 <= getattr(self, name) <= self.timesteps:
                self._fail(name, f"expected an integer in 1..timesteps ({self.timesteps})")
            if self.sampler == "ddpm" and getattr(self, name) != self.timesteps:
                self._fail(name, f"the ddpm sampler takes every timestep: expected {self.timesteps}")
        if not 0 <= self.sample_eta <= 1:
            self._fail("sample_eta", f"expected a number in {DDPM.GaussianDiffusion.ETA_RANGE}")
        if self.sample_eta and self.sampler != "ddim":
            self._fail("sample_eta", f"eta is DDIM's; sampler {self.sampler!r} takes none: expected 0")
        if self.guidance < 0:
            self._fail("guidance", "expected a number >= 0 (0 = unconditional, 1 = conditional without guidance)")

    @property
    def size(self):
        """The height and width of the images the model sees: image_size, else the dataset's own."""
        return self.image_size or (data.FOLDER_IMAGE_SIZE if data.is_folder(self.dataset)
                                   else data.IMAGE_SHAPE[self.dataset][-1])

    @property
    def num_classes(self):
        """The number of classes a conditional model is conditioned on (None: unconditional)."""
        if not self.conditional:
            return None
        names = self.classes()
        if not names:
            raise ConfigError(f"config.conditional=True is not allowed for {self.dataset}: its images are not "
                              f"sorted into class subfolders (PATH/<class>/<image>, at least two classes)")
        return len(names)

    def classes(self):
        """The class names: those recorded in the config, else the dataset's (None: no classes)."""
        return list(self.class_names) if self.class_names else data.class_names(self.dataset)

    def to_dict(self):
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; allowed fields: {sorted(names)}")
        d = dict(d)
        for name in ("dim_mults", "class_names"):
            if isinstance(d.get(name), list):
                d[name] = tuple(d[name])
        return cls(**d).validate()

    def save(self, path):
        data.atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path):
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} is not valid JSON ({e}): fix it, or copy it from a "
                              f"run with the same settings") from None
        if not isinstance(d, dict):
            raise ConfigError(f"config file {path} holds a JSON {type(d).__name__}, not an object of fields")
        d = {**{k: v for k, v in cls.SAVED_BEFORE.items() if k not in d}, **d}
        if isinstance(d.get("channels_last"), bool):  # saved before "auto" existed: the layout the run used
            d["channels_last"] = "on" if d["channels_last"] else "off"
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"config file {path}: {e}") from None

    def replace(self, **changes):
        return Config.from_dict({**self.to_dict(), **changes})



def build_diffusion(cfg):
    """The U-Net and GaussianDiffusion a config describes."""
    channels, height, width = data.image_shape(cfg.dataset, cfg.image_size, cfg.channels)
    unet = DDPM.Unet(dim=cfg.dim, dim_mults=tuple(cfg.dim_mults), channels=channels,
                     resnet_blocks=cfg.resnet_blocks, attn_dim_head=cfg.attn_dim_head, num_classes=cfg.num_classes)
    return DDPM.GaussianDiffusion(unet, image_size=(height, width), channels=channels,
                                  timesteps=cfg.timesteps, beta_schedule=cfg.beta_schedule,
                                  objective=cfg.objective, min_snr_gamma=cfg.min_snr_gamma,
                                  cond_drop_prob=cfg.cond_drop_prob)


def sampler_kwargs(cfg, sampler=None, eta=None):
    """The arguments of DDPM's `sample` for a config's sampler (eta only where the sampler takes it)."""
    sampler = sampler or cfg.sampler
    kwargs = dict(sampler=sampler)
    if sampler == "ddim":
        kwargs["eta"] = cfg.sample_eta if eta is None else eta
    elif eta is not None:
        kwargs["eta"] = eta  # DDPM.sample names the argument its sampler does not take
    return kwargs


# ================================================================================================
# Hardware: device, precision, FLOPs and distributed set-up (benchmark.py uses these too)
# ================================================================================================

def pick_device(name="auto"):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config.device='cuda' is not allowed: no CUDA device is available here")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("config.device='mps' is not allowed: Apple MPS is not available here")
    return torch.device(name)


def bf16_supported(device):
    """bfloat16 autocast only where the hardware does it natively; elsewhere it is slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        return bool((check and check()) or (amx and amx()))
    return False


def channels_last_pays(device):
    """Whether `use_channels_last` makes the U-Net faster on `device`, as measured: on x86 CPUs,
    whose convolutions (oneDNN) read and write channels_last directly. `benchmark.py --channels-last`,
    training steps / sampling forward passes of the experiment defaults at batch 64 against the
    default layout: two AMD EPYC cores (AVX-512) +5 to +21% / +36 to +50% in bfloat16, +1 to +8% /
    +14 to +21% in float32 (four runs); the same cores with oneDNN and MKL limited to AVX2, as on an
    older laptop, +9% / +19% in float32; two AMD EPYC Zen 3 cores (AVX2, no AVX-512) +18% (steps
    interleaved in one process; separate runs there drift more than that) / +57% in float32; two
    Intel Xeon cores with AMX, training only, +15% in float32 and level in bfloat16. GPUs and other
    CPUs are not measured: there the default layout stays."""
    return device.type == "cpu" and platform.machine().lower() in ("x86_64", "amd64")


def resolve_channels_last(setting, device):
    """Config.channels_last ("auto", "on", "off") as the layout to use on `device`: True for channels_last."""
    return channels_last_pays(device) if setting == "auto" else setting == "on"


def autocast(device, precision):
    """The context that runs code on `device` (a torch.device) at `precision`, one of
    Config.CHOICES["precision"]: bfloat16 autocast, or nothing for float32."""
    if precision not in Config.CHOICES["precision"]:
        raise ValueError(f"precision must be one of {Config.CHOICES['precision']}, got {precision!r}")
    if precision == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---- channels_last: the U-Net's activations stored pixel by pixel (N, H, W, C) ----
# oneDNN's convolutions read and write that layout directly; in PyTorch's default (N, C, H, W) they
# reorder every input and output (about a third of the convolutions' time in torch.profiler runs on
# two EPYC cores, bfloat16). Other parts of the U-Net get slower in that layout and are done
# differently there: PyTorch's CPU GroupNorm becomes an order of magnitude slower with 4 or 8
# channels per group (our blocks' 32 and 64 channels in 8 groups), so `group_norm_scale_shift`
# replaces it; and the attentions reshape their (heads x dims) channels against the pixels, which
# costs a transposing copy per reshape in channels_last. The linear attention runs in the order that
# touches the fewest full-resolution tensors, without conversions, in training and sampling alike;
# the full attention (7x7 pixels) does so in sampling and converts its input and output in training.
# In both, the resamplers become the single convolutions they equal. A forward pass of the experiment
# defaults' U-Net in channels_last (bfloat16, batch 64, benchmark.py on two EPYC cores): 76.1 ms
# before these changes, 54.5 ms after (two runs a day apart; the README's speed section has the
# same-day comparisons).

def is_channels_last(x):
    """True for a 4-d tensor stored channels_last (not one that is both, such as a 1-channel image)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _group_total(per_channel, groups):
    """(B, C) per-channel sums -> (B, C): each channel gets the total of its group."""
    B, C = per_channel.shape
    per_group = per_channel.view(B, groups, C // groups).sum(-1, keepdim=True)
    return per_group.expand(B, groups, C // groups).reshape(B, C)


def _group_size(x, groups):
    """The number of elements of x (B, C, H, W) in one image's group of channels."""
    B, C, H, W = x.shape
    return H * W * (C // groups)


# How much of a tensor `_pixel_sums` converts to float32 at a time: small enough to stay in the two
# cores' caches (1 MB of L2 each on the EPYC, 2 MB on the Xeon). Converting a whole 28x28 activation
# at once writes 6 MB to memory and reads it back, which took longer than the sums themselves.
PIXEL_SUMS_CHUNK_BYTES = 1 << 20


def _pixel_sums(x, y, acc):
    """Per-image, per-channel sums over the pixels of x and of x * y, each (B, C) in dtype `acc`. Both
    are converted to `acc` a few images at a time (see PIXEL_SUMS_CHUNK_BYTES); y may be x itself."""
    images_per_chunk = max(1, PIXEL_SUMS_CHUNK_BYTES // (x[0].numel() * torch.finfo(acc).bits // 8))
    sums, products = [], []
    for x_part, y_part in zip(x.split(images_per_chunk), y.split(images_per_chunk)):
        x_acc = x_part.to(acc)
        sums.append(x_acc.sum((2, 3)))
        products.append((x_acc * (x_acc if y is x else y_part.to(acc))).sum((2, 3)))
    return torch.cat(sums), torch.cat(products)


def _normalisation_coefficients(x, weight, bias, scale, shift, groups, eps):
    """GroupNorm's per-channel statistics of x, (mean, rstd), and the per-channel affine map a x + d
    that normalises x and then applies the weight, bias, scale and shift: (a, d, mean, rstd), each
    (B, C) in float32 (float64 for float64 input)."""
    n = _group_size(x, groups)
    acc = torch.promote_types(x.dtype, torch.float32)
    sum_x, sum_x_sq = _pixel_sums(x, x, acc)
    mean = _group_total(sum_x, groups) / n
    mean_sq = _group_total(sum_x_sq, groups) / n
    rstd = (mean_sq - mean * mean).clamp_min(0).add(eps).rsqrt()
    one_plus_scale = 1 + scale.to(acc)
    a = weight.to(acc) * one_plus_scale * rstd
    d = bias.to(acc) * one_plus_scale + shift.to(acc) - mean * a
    return a, d, mean, rstd


def _per_channel_affine(x, a, d):
    """a x + d with a, d of shape (B, C), in x's dtype."""
    return torch.addcmul(d.to(x.dtype)[:, :, None, None], x, a.to(x.dtype)[:, :, None, None])


class GroupNormScaleShift(torch.autograd.Function):
    """y = GroupNorm(x) (1 + scale) + shift, the normalisation of DDPM.Block followed by its time
    scale and shift, as one per-channel affine map y = a x + d (a, d per image and channel).

    Every pass over x is a sum over the pixels per channel or that affine map: both stream through
    channels_last memory at full speed. Statistics and coefficients are computed in float32 (float64
    for float64 input), the output in x's dtype. The backward is GroupNorm's, in closed form: with
    xhat = (x - mu) r, gain g = w (1 + scale) and means over a group's n elements,
        dx = r g dy - r mean(g dy) - r xhat mean(g dy xhat),
    again one affine map of dy and x per channel, from the per-channel sums of dy and dy x."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, groups, eps):
        a, d, mean, rstd = _normalisation_coefficients(x, weight, bias, scale, shift, groups, eps)
        ctx.save_for_backward(x, weight, bias, scale, mean, rstd)
        ctx.groups, ctx.n = groups, _group_size(x, groups)
        return _per_channel_affine(x, a, d)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, scale, mean, rstd = ctx.saved_tensors
        acc = mean.dtype
        sum_dy, sum_dy_x = _pixel_sums(dy, x, acc)
        sum_dy_xhat = rstd * (sum_dy_x - mean * sum_dy)
        one_plus_scale = 1 + scale.to(acc)
        gain = weight.to(acc) * one_plus_scale
        mean_g_dy = _group_total(gain * sum_dy, ctx.groups) / ctx.n
        mean_g_dy_xhat = _group_total(gain * sum_dy_xhat, ctx.groups) / ctx.n
        coef_dy = gain * rstd
        coef_x = -rstd * rstd * mean_g_dy_xhat
        const = -rstd * mean_g_dy - mean * coef_x
        dx = torch.addcmul(_per_channel_affine(x, coef_x, const), dy, coef_dy.to(x.dtype)[:, :, None, None])
        # the scale and shift of a block without time conditioning are constant zeros: no gradient
        needs_scale, needs_shift = ctx.needs_input_grad[3:5]
        return (dx, (one_plus_scale * sum_dy_xhat).sum(0).to(weight.dtype), (one_plus_scale * sum_dy).sum(0).to(bias.dtype),
                (weight.to(acc) * sum_dy_xhat + bias.to(acc) * sum_dy).to(scale.dtype) if needs_scale else None,
                sum_dy.to(scale.dtype) if needs_shift else None, None, None)


def group_norm_scale_shift(x, norm, scale_shift=None):
    """`norm` (an nn.GroupNorm) of x, then x (1 + scale) + shift where scale_shift = (scale, shift) of
    shape (B, C, 1, 1) is given: what DDPM.Block computes, fast in channels_last."""
    B, C = x.shape[:2]
    scale, shift = scale_shift if scale_shift is not None else (x.new_zeros(B, C), x.new_zeros(B, C))
    args = (x, norm.weight, norm.bias, scale.reshape(B, C), shift.reshape(B, C), norm.num_groups, norm.eps)
    if not torch.is_grad_enabled():  # sampling: no graph to record, so no autograd.Function bookkeeping
        a, d, *_ = _normalisation_coefficients(*args)
        return _per_channel_affine(x, a, d)
    return GroupNormScaleShift.apply(*args)


class ChannelsLastModule:
    """The base of the channels_last versions of DDPM's modules below (listed first among a version's
    bases): activations that are channels_last go to its `channels_last_forward`, any others to the
    DDPM module's own forward, so a converted U-Net still takes (N, C, H, W) activations."""

    def forward(self, x, *args, **kwargs):
        if self.takes_channels_last(x):
            return self.channels_last_forward(x, *args, **kwargs)
        return super().forward(x, *args, **kwargs)

    def takes_channels_last(self, x):
        return is_channels_last(x)


class ChannelsLastBlock(ChannelsLastModule, DDPM.Block):
    """DDPM.Block, with its GroupNorm and time scale-shift done by `group_norm_scale_shift`."""

    def channels_last_forward(self, x, scale_shift=None):
        return self.act(group_norm_scale_shift(self.proj(x), self.norm, scale_shift))


def _pixel_rows(x):
    """A channels_last (b, c, h, w) tensor as the (b, h w, c) matrix of its pixels, without a copy."""
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w, c)


class ChannelsLastLinearAttention(ChannelsLastModule, DDPM.LinearAttention):
    """DDPM.LinearAttention for channels_last activations: `_attend_pixels` replaces `to_qkv`,
    `attend` and `to_out[0]`, in training and in sampling alike."""

    def channels_last_forward(self, x):
        return x + self.to_out[1](self._attend_pixels(self.norm(x)))

    def _attend_pixels(self, x):
        """`to_out[0](attend(to_qkv(x)))` for channels_last x, in the order that touches the fewest
        full-resolution tensors: the values and the attended values are never formed. With P the
        (n x c) pixels, per head (the output sums the heads' terms)
            k v^T = softmax_n(k) (P W_v^T)     = (softmax_n(k) P) W_v^T         (d x c, then d x d)
            W_out (k v^T)^T softmax_d(q) s     = (s W_out (k v^T)^T) softmax_d(q) (c x d, then c x n)
        so only q and k are projected (as matrix products that read the pixels where they lie), and
        the output is one product written straight into channels_last. The same sums as the
        convolutions' in another order. It reads the weights of `to_qkv` and `to_out[0]` directly, so
        hooks on those convolutions do not run here. Its backward is autograd's of these products,
        which touch no full-resolution tensor in the wrong layout either. Against attending in
        (N, C, H, W) between two 1x1 convolutions in channels_last, which had to convert the
        192-channel queries, keys and values at 28x28 and their gradient, the training step of the
        experiment defaults at batch 64 on two EPYC cores took 8% less time in bfloat16 and 3% less
        in float32 (interleaved A/B; 13% at the U-Net's constructor defaults, in bfloat16)."""
        b, c, h, w = x.shape
        pixels = _pixel_rows(x)  # (b, n, c)
        w_q, w_k, w_v = self.to_qkv.weight.view(3, self.heads, -1, c)  # each (heads, d, c)

        def project(weight):  # (b, heads, d, n): queries or keys
            return (weight.reshape(-1, c) @ pixels.mT).view(b, self.heads, -1, h * w)
        keyed_pixels = project(w_k).softmax(dim=-1).view(b, -1, h * w) @ pixels  # (b, hidden, c): all heads
        context = keyed_pixels.view(b, self.heads, -1, c) @ w_v.mT  # (b, heads, d, d) = k v^T
        out_conv = self.to_out[0]
        w_out = out_conv.weight.view(c, self.heads, -1).transpose(0, 1)  # (heads, c, d)
        # s W_out (k v^T)^T of every head side by side: (b, c, hidden), what multiplies softmax_d(q)
        out_per_query = ((w_out @ context.mT) * self.scale).transpose(1, 2).reshape(b, c, -1)
        # the queries last, just before their softmax and the product that reads them, while they are
        # still in the caches: 1-3% less time per sampling forward pass than forming them with the
        # keys (batch 64, bfloat16, two EPYC cores, three in-process A/B runs)
        rows = torch.baddbmm(out_conv.bias, project(w_q).softmax(dim=-2).view(b, -1, h * w).mT,
                             out_per_query.mT)  # (b, n, c)
        return rows.view(b, h, w, c).permute(0, 3, 1, 2)  # (b, n, c) memory is channels_last


class ChannelsLastAttention(ChannelsLastModule, DDPM.Attention):
    """DDPM.Attention for channels_last activations. With gradients (training): computed in
    (N, C, H, W), between two conversions (cheaper than a transposing copy per reshape). Without
    gradients (sampling): the 1x1 convolution's output, (b, n, 3 hidden) in memory, is viewed as
    queries, keys and values (b, heads, n, d) with the feature dimension contiguous, which
    scaled_dot_product_attention's fused CPU kernel wants, and its output goes back to `to_out` in
    channels_last without a copy. (With that kernel in training, its backward made the whole step
    about 14 ms slower, 237 against 224 ms at batch 64 on two EPYC cores.)"""

    def channels_last_forward(self, x):
        if torch.is_grad_enabled():
            return DDPM.Attention.forward(self, x.contiguous()).contiguous(memory_format=torch.channels_last)
        b, c, h, w = x.shape
        qkv = _pixel_rows(self.to_qkv(self.norm(x))).view(b, h * w, 3, self.heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (b, heads, n, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, heads, n, d)
        out = out.transpose(1, 2).reshape(b, h, w, -1)  # (b, h, w, hidden)
        return x + self.to_out(out.permute(0, 3, 1, 2))


class ChannelsLastDownsample(ChannelsLastModule, DDPM.Downsample):
    """DDPM.Downsample (pixel-unshuffle, then a 1x1 convolution) as the one convolution it equals: 2x2
    with stride 2, whose weights are the 1x1's regrouped (unshuffled channel c 4 + 2 i + j is pixel
    (i, j) of channel c). In channels_last it reads the activations where they are, without the
    shuffling copy."""

    def takes_channels_last(self, x):
        return is_channels_last(x) and x.shape[-2] % 2 == 0 and x.shape[-1] % 2 == 0  # DDPM's rejects odd sizes

    def channels_last_forward(self, x):
        weight = self.conv.weight
        return F.conv2d(x, weight.view(weight.shape[0], -1, 2, 2), self.conv.bias, stride=2)


# Row k of this matrix says which taps of a 3-tap kernel (offsets -1, 0, +1) on the nearest-upsampled
# grid land on tap k of a 4-tap transposed convolution of stride 2 (see ChannelsLastUpsample).
_UPSAMPLE_TAPS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
_UPSAMPLE_TAPS_ON = {(_UPSAMPLE_TAPS.device, _UPSAMPLE_TAPS.dtype): _UPSAMPLE_TAPS}


def _upsample_taps(weight):
    """_UPSAMPLE_TAPS in the weight's dtype and on its device, copied there once: a copy from CPU
    memory to a GPU on every call could not be recorded in a CUDA graph (`graphed_sampling`)."""
    key = (weight.device, weight.dtype)
    if key not in _UPSAMPLE_TAPS_ON:
        _UPSAMPLE_TAPS_ON[key] = _UPSAMPLE_TAPS.to(weight)
    return _UPSAMPLE_TAPS_ON[key]


class ChannelsLastUpsample(ChannelsLastModule, DDPM.Upsample):
    """DDPM.Upsample (nearest-neighbour x2, then a 3x3 convolution) as the one transposed convolution
    it equals: stride 2, 4x4 kernel, padding 1. An output pixel's 3x3 neighbourhood on the upsampled
    grid covers only 2x2 input pixels, so summing the taps that fall on the same input pixel gives a
    kernel with 4 taps per output pixel instead of 9: 2.25 times fewer multiplications, and no 4x
    larger upsampled copy."""

    def channels_last_forward(self, x):
        weight = self.conv.weight
        taps = _upsample_taps(weight)
        kernel = (taps @ weight @ taps.T).transpose(0, 1)  # (in, out, 4, 4), as conv_transpose2d wants
        return F.conv_transpose2d(x, kernel, self.conv.bias, stride=2, padding=1)


CHANNELS_LAST_MODULES = {DDPM.Block: ChannelsLastBlock, DDPM.LinearAttention: ChannelsLastLinearAttention,
                         DDPM.Attention: ChannelsLastAttention, DDPM.Downsample: ChannelsLastDownsample,
                         DDPM.Upsample: ChannelsLastUpsample}


def _input_channels_last(module, inputs):
    """The image in channels_last strides, so that the first convolution writes channels_last. A
    1-channel image is contiguous in both layouts and keeps PyTorch's (N, C, H, W) strides, which
    makes oneDNN answer in (N, C, H, W); convolving and then converting its 32-channel output took 3.2
    ms at batch 64 on two EPYC cores, against 0.35 ms for the convolution alone from channels_last
    strides, which `empty_like` gives the image (a copy of the small input)."""
    x, *rest = inputs
    return (torch.empty_like(x, memory_format=torch.channels_last).copy_(x), *rest)


def use_channels_last(unet):
    """Run a DDPM.Unet's activations in channels_last, in place: the blocks, attentions and resamplers
    become their channels_last versions above (same parameters, same state_dict) and the first
    convolution gets its input in channels_last strides. Weights keep their layout."""
    for module in unet.modules():
        if type(module) in CHANNELS_LAST_MODULES:
            module.__class__ = CHANNELS_LAST_MODULES[type(module)]
    if _input_channels_last not in unet.init_conv._forward_pre_hooks.values():  # a second call: nothing new
        unet.init_conv.register_forward_pre_hook(_input_channels_last)
    return unet


# ---- CUDA graphs: sampling without a kernel launch per operation ----
# On a GPU the U-Net's forward pass is several hundred small kernels, each launched from Python, and
# at these model sizes the launches, not the arithmetic, set the pace. A CUDA graph records the
# kernels of one forward pass once and replays them all with one launch. A sampler calls the network
# 10 to 1,000 times with the same shapes, so `graphed_sampling` records on the first call and
# replays for the rest. The sampler's own arithmetic between the calls (a few elementwise kernels
# per step) stays eager. Training can record its loss's forward and backward through torch.compile
# (Config.compile); the optimizer, clipping and EMA stay eager there.

# Eager passes before recording: on their first calls cuDNN chooses its kernels and cuBLAS sets up
# its workspaces, which must happen outside the recording.
CUDA_GRAPH_WARMUP_PASSES = 2


class GraphRecordingError(RuntimeError):
    """Recording a network as a graph failed where running it eagerly works."""


def _autocast_state(device_type):
    """(enabled, dtype) of autocast for a device type, as the caller has set it."""
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def record_cuda_graph(net, inputs):
    """Record net(*inputs) on their GPU as a CUDA graph, under the caller's autocast setting. Returns
    (static inputs, static output, replay): after new inputs are copied into the static ones, replay()
    leaves net's output for them in the static output (which holds nothing meaningful before the
    first replay). Errors of the eager warm-up passes propagate as they are; a failure of the
    recording itself raises GraphRecordingError."""
    static_inputs = [x.clone() for x in inputs]
    device = static_inputs[0].device
    enabled, dtype = _autocast_state("cuda")

    def forward():
        # PyTorch records under autocast only with its cache of cast weights off: a cast taken from
        # the cache is memory the graph does not own, never cast again on replay.
        with torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
            return net(*static_inputs)

    with torch.cuda.device(device):
        stream = torch.cuda.current_stream()
        warmup_stream = torch.cuda.Stream()  # as PyTorch asks: warm up off the stream that records
        warmup_stream.wait_stream(stream)
        with torch.cuda.stream(warmup_stream):
            for _ in range(CUDA_GRAPH_WARMUP_PASSES):
                forward()
        stream.wait_stream(warmup_stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                static_output = forward()
        except Exception as e:
            torch.cuda.set_stream(stream)  # a broken recording can leave its own stream current
            cause = e.__context__ or e  # ending a broken recording raises over the original error
            raise GraphRecordingError(_first_line(cause)) from e
    return static_inputs, static_output, graph.replay


class GraphedNetwork(nn.Module):
    """`net` whose calls without gradients replay a recorded graph: one per kind of input (shapes,
    dtypes, devices, autocast setting, inference mode), recorded by `record` (see `record_cuda_graph`)
    on the first call of that kind. Each call returns a copy of the output, since the next replay
    overwrites it. Calls that record gradients run `net` itself, and so does every call of a kind
    whose recording failed (GraphRecordingError), after a warning that names the error."""

    def __init__(self, net, record=record_cuda_graph):
        super().__init__()
        self.net, self.record, self.graphs = net, record, {}

    def replays(self):
        """True when there is at least one recording and every kind of input replays one."""
        return bool(self.graphs) and None not in self.graphs.values()

    def forward(self, *inputs):
        if torch.is_grad_enabled():
            return self.net(*inputs)
        kind = (tuple((x.shape, x.dtype, x.device) for x in inputs), _autocast_state(inputs[0].device.type),
                torch.is_inference_mode_enabled())  # inference tensors take no copies outside that mode
        if kind not in self.graphs:
            try:
                self.graphs[kind] = self.record(self.net, inputs)
            except GraphRecordingError as e:
                warnings.warn(f"recording the network as a graph failed ({e}); it runs eagerly for inputs "
                              f"of shapes {[tuple(x.shape) for x in inputs]}")
                self.graphs[kind] = None
        if self.graphs[kind] is None:
            return self.net(*inputs)
        static_inputs, static_output, replay = self.graphs[kind]
        for static, x in zip(static_inputs, inputs):
            static.copy_(x)
        replay()
        return static_output.clone()


@contextlib.contextmanager
def graphed_sampling(diffusion, record=None):
    """Within the block, `diffusion`'s network is a GraphedNetwork, which the block yields: on a GPU
    its forward passes are recorded and replayed as CUDA graphs; on other devices the network is left
    as it is and the block yields None, unless `record` (for tests) says how to record there.

    The graphs live as long as the block. A replay reads the weights where they were at the
    recording: weights updated in place (an optimizer or EMA step, `net.load_state_dict`) are read
    afresh, weights replaced by new tensors (`Module.to`, `load_state_dict(assign=True)`,
    `use_channels_last`) are not, so change the network outside the block. Inside it, the diffusion's
    state_dict names the network's tensors `model.net.*`.

        with experiment.graphed_sampling(diffusion):
            images = diffusion.sample(64, sampling_steps=50)
    """
    if record is None:
        if diffusion.device.type != "cuda":
            yield None
            return
        record = record_cuda_graph
    net = diffusion.model
    diffusion.model = GraphedNetwork(net, record)
    try:
        yield diffusion.model
    finally:
        diffusion.model = net


def count_training_flops(loss_fn, n_images):
    """(forward, backward) FLOPs per image of one training step, counted by FlopCounterMode.

    `loss_fn()` runs the forward pass and returns the loss (drawing from the global RNG, as a
    training step does: `Experiment._measure_flops_per_image` keeps the run's streams). FlopCounterMode counts
    matrix multiplications, convolutions and attention only (not normalisation, activations or
    the optimizer), and the count does not depend on the precision.
    """
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fwd:
        loss = loss_fn()
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    return fwd.get_total_flops() / n_images, bwd.get_total_flops() / n_images


def cpu_model():
    """The CPU's model name (the same kind of two-core machine may be an AMD EPYC or an Intel Xeon)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device):
    """The processor behind a device, for logs: the GPU's name, or the CPU's model name."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def dist_info():
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))



# ================================================================================================
# One training run
# ================================================================================================

def ema_avg_fn(decay, power=0.0):
    """The EMA's update, averaged * d + current * (1 - d), at the t-th update (num_averaged = t - 1).

    power = 0: d = min(decay, (1 + n) / (10 + n)), a fixed decay with a warm-up: early on, when
    the weights move fast, the average follows them closely.
    power > 0: the power-function EMA of Karras et al. (2023), d = (1 - 1/t)^(power + 1), whose
    average weighs the iterate of step tau roughly in proportion to tau^power: its length grows
    with the run instead of being fixed in steps (power 0 would be the plain mean of all iterates).
    """
    def avg(averaged, current, num_averaged):
        if power > 0:
            d = (1 - 1 / (num_averaged + 1)) ** (power + 1)
        else:
            d = min(decay, (1 + num_averaged) / (10 + num_averaged))
        return averaged * d + current * (1 - d)
    return avg


def warmup_length(cfg, total_steps):
    """The warm-up actually used: `warmup_steps`, but at most a fifth of the run, so that a short run
    (a small time budget on a slow machine) does not spend itself warming up."""
    return min(cfg.warmup_steps, max(1, total_steps // 5))


def lr_lambda(cfg, total_steps):
    """The learning-rate factor per step: a linear warm-up, then constant or a cosine decay to lr/10."""
    warmup = warmup_length(cfg, total_steps)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


class NonFiniteLoss(RuntimeError):
    pass


class CheckpointError(RuntimeError):
    """No checkpoint of a run can be loaded; the message names each file, what is wrong, and the fix."""


CHECKPOINT_KEYS = ("model", "ema", "optimizer", "scheduler", "step", "rng_cpu", "rng_cuda", "config")


def state_dict_mismatch(state, model, may_lack=()):
    """What keeps `state` from loading into `model` (None if nothing): missing keys (except those
    in `may_lack`), unexpected keys, or the first tensor whose shape differs."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state) - set(may_lack))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        return f"missing keys {missing[:3]}, unexpected keys {unexpected[:3]}"
    for key, value in state.items():
        if getattr(value, "shape", None) != expected[key].shape:
            return f"{key} has shape {tuple(getattr(value, 'shape', ()))}, the config's model {tuple(expected[key].shape)}"
    return None


def _first_line(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160] if text else ''}"


# A time budget (`minutes`) times this many training steps after this many untimed ones. The first
# steps of a process run slower: on two EPYC cores the main job's first ten steps took 0.160 s each,
# the next ten 0.140 and steps 21 to 300 0.126 to 0.139 (0.131 on average), so timing steps 6 to 30
# planned about 8% too few steps. Drift later in a run is not seen: two 15-minute main jobs planned
# from steps 21 to 40 trained 16.2 and 14.7 minutes on the same kind of shared cores.
BUDGET_WARMUP_STEPS = 20
BUDGET_TIMED_STEPS = 20


class Experiment:
    """A config turned into a run directory: train, checkpoint, resume, sample, evaluate.

    Files in cfg.out_dir: config.json, metrics.jsonl, loss_curve.png, samples_<step>.png,
    samples_final.png, reverse_process.gif, eval.json, checkpoint.pt (the latest state),
    checkpoint_prev.pt (the one before it), done.json.
    """

    def __init__(self, cfg, data=None):
        self.cfg = cfg.validate()
        self.rank, self.world, self.local_rank = dist_info()
        if cfg.batch_size % self.world:
            raise ConfigError(f"config.batch_size={cfg.batch_size} is not allowed: it must be divisible "
                              f"by the number of processes ({self.world})")
        self.device = pick_device(cfg.device)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        self.precision = cfg.precision
        if cfg.precision == "bfloat16" and not bf16_supported(self.device):
            self._print(f"bfloat16 is not supported natively on {self.device}: using float32")
            self.precision = "float32"
        self.channels_last = resolve_channels_last(cfg.channels_last, self.device)
        self.out = Path(cfg.out_dir)
        self.ckpt_path = self.out / "checkpoint.pt"
        self.prev_ckpt_path = self.out / "checkpoint_prev.pt"
        self._labels = None
        self._data = data  # optional images uint8 (N, C, H, W), or (images, labels), to skip loading (tests)

    # ---- small helpers ----
    @property
    def is_main(self):
        return self.rank == 0

    def _print(self, *args):
        if self.is_main:
            print(*args, flush=True)

    @property
    def done(self):
        return run_finished(self.out)

    def steps_per_epoch(self, n_images):
        return max(1, n_images // self.cfg.batch_size)

    def planned_steps(self, images):
        """The run's length in optimizer steps: `steps`, `epochs` of the images, or what fits the
        time budget `minutes` (measured once, then read from the run directory's budget.json)."""
        cfg = self.cfg
        if cfg.minutes is not None:
            budget = self.out / "budget.json"
            self.budget = json.loads(budget.read_text()) if budget.exists() else self.measure_budget(images)
            return self.budget["steps"]
        return math.ceil(cfg.epochs * self.steps_per_epoch(len(images))) if cfg.epochs > 0 else cfg.steps

    def measure_budget(self, images, warmup=BUDGET_WARMUP_STEPS, timed=BUDGET_TIMED_STEPS):
        """The number of steps that fit `minutes` of training, from the time of `timed` steps (after
        `warmup` untimed ones) on a throwaway build of the run: the run itself is built afresh from
        its seed, so it trains exactly as if its length had been given in steps. The measuring time
        counts against the budget. Under torchrun, every process takes the main process's count."""
        cfg = self.cfg
        started = time.perf_counter()
        self.build(warmup + timed)
        with self._rng_kept():
            batches = self.batches(images, self._labels)
            self.timed_steps(batches, warmup)
            step_s = self.timed_steps(batches, timed) / timed
        steps = torch.tensor(int((cfg.minutes * 60 - (time.perf_counter() - started)) / step_s))
        if self.world > 1:
            torch.distributed.broadcast(steps, 0)
        if steps < 1:
            raise ConfigError(f"config.minutes={cfg.minutes} is not allowed: it is too short for one training "
                              f"step, which takes {step_s:.2f} s here")
        return dict(steps=int(steps), minutes=cfg.minutes, seconds_per_step=round(step_s, 4),
                    img_per_s=round(cfg.batch_size / step_s, 1), device=device_name(self.device))

    def timed_steps(self, batches, n):
        """Seconds that n training steps on the next n of `batches` take (each waited for)."""
        t0 = time.perf_counter()
        for _ in range(n):
            self.train_step(*next(batches)).item()  # .item() waits for the step to finish
        return time.perf_counter() - t0

    # ---- building ----
    def build(self, total_steps, from_init_weights=True):
        """Model, EMA, optimizer and learning-rate schedule for a run of `total_steps` steps, at step 0.
        from_init_weights=False: the caller loads other weights over them (a checkpoint, shipped
        weights), so the config's `init_weights`, which that file may no longer have, are not read."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.diffusion = build_diffusion(cfg).to(self.device)
        if cfg.init_weights and from_init_weights:
            self._load_initial_weights(cfg.init_weights)
        if self.channels_last:
            use_channels_last(self.diffusion.model)
        self.ema = torch.optim.swa_utils.AveragedModel(self.diffusion, avg_fn=ema_avg_fn(cfg.ema_decay, cfg.ema_power),
                                                       use_buffers=False)
        self.total_steps = total_steps
        fused = self.device.type in ("cuda", "cpu")
        self.opt = torch.optim.AdamW(self.diffusion.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     betas=(0.9, 0.99), fused=fused)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg, total_steps))
        self.train_module = self._compiled() if cfg.compile else self.diffusion
        if self.world > 1:
            self.train_module = nn.parallel.DistributedDataParallel(
                self.train_module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.step = 0
        return self

    def _load_initial_weights(self, path):
        """Start from a weights file's tensors. A conditional model may start from unconditional
        weights: its class embedding, absent from the file, keeps its start (random class rows, a
        zero "no label" row), so without a label the model begins as exactly the unconditional one
        and learns the classes on top."""
        if not Path(path).is_file():  # checked here, not in the config: shipped configs name their start
            self.cfg._fail("init_weights", "expected an existing weights file, such as data/ddpm_mnist_ema.pt")
        new = [k for k in self.diffusion.state_dict() if "class_emb" in k]
        state = read_weights(path, self.diffusion, may_lack=new)
        self.diffusion.load_state_dict(state, strict=False)

    def _rng_kept(self):
        """A block after which the run's random streams, the CPU's and its GPU's, are as they were before."""
        return torch.random.fork_rng(devices=[self.device.index or 0] if self.device.type == "cuda" else [])

    def _compiled(self):
        """torch.compile'd diffusion, or the eager one where compiling fails (no C++ compiler, say).
        On a GPU in "reduce-overhead" mode: the step's kernels are captured as CUDA graphs and
        replayed with one launch, where eager mode pays a launch for each of hundreds of small
        kernels (the step is launch-bound at these model sizes). On a CPU that mode is the default one."""
        compiled = torch.compile(self.diffusion, mode="reduce-overhead" if self.device.type == "cuda" else "default")
        try:  # compilation is lazy: try it on a tiny batch, without touching the run's RNG
            with self._rng_kept(), autocast(self.device, self.precision):
                compiled(torch.rand(2, self.diffusion.channels, *self.diffusion.image_size, device=self.device)).backward()
            return compiled
        except Exception as e:
            self._print(f"torch.compile is not available here ({type(e).__name__}: {str(e)[:100]}): running eagerly")
            return self.diffusion
        finally:
            self.diffusion.zero_grad(set_to_none=True)

    # ---- checkpoints ----
    def state_dict(self):
        return {
            "model": self.diffusion.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "step": self.step,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "config": self.cfg.to_dict(),
        }

    def save_checkpoint(self):
        """The run's state (see `state_dict`), written atomically by the main process only; the
        checkpoint it replaces is kept as checkpoint_prev.pt."""
        if self.is_main:
            data.atomic_torch_save(self.state_dict(), self.ckpt_path, previous=self.prev_ckpt_path)

    def read_checkpoint(self, path):
        """A checkpoint's state, checked: it opens, has every key, and its tensors fit the config's model."""
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path} does not load ({_first_line(e)})") from None
        if not isinstance(state, dict) or any(k not in state for k in CHECKPOINT_KEYS):
            have = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(f"{path} is not a checkpoint of this project (it holds {have})")
        for key, model in (("model", self.diffusion), ("ema", self.ema)):
            problem = state_dict_mismatch(state[key], model)
            if problem:
                raise CheckpointError(f"{path} does not fit the config's model: {key}: {problem}")
        return state

    def load_checkpoint(self, path=None):
        state = self.read_checkpoint(path or self.ckpt_path)
        self.diffusion.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])

    def resume(self, set_aside_damaged=True, training=True):
        """Load the latest loadable checkpoint, if the run has one (to train on, or with training=False
        only to sample from: then nothing is printed, and the run's planned length is not known here).

        A damaged checkpoint.pt is reported in one line and the run continues from
        checkpoint_prev.pt, saying how many logged steps that loses; with set_aside_damaged the
        damaged file is renamed checkpoint_damaged.pt (kept for inspection), so the next save does
        not rotate it into checkpoint_prev.pt. With no loadable checkpoint, CheckpointError, and
        nothing in the directory is changed.
        """
        candidates = [p for p in (self.ckpt_path, self.prev_ckpt_path) if p.exists()]
        if not candidates:
            return
        problems = []
        for path in candidates:
            try:
                self.load_checkpoint(path)
            except CheckpointError as e:
                problems.append(str(e))
                continue
            if problems:
                lost = max([r["step"] for r in read_metrics(self.out)] + [self.step]) - self.step
                if self.is_main and set_aside_damaged:
                    os.replace(self.ckpt_path, self.out / "checkpoint_damaged.pt")
                    problems[0] += "; it was renamed checkpoint_damaged.pt"
                print(f"warning: {problems[0]}; using {path.name} (step {self.step}), which loses {lost} "
                      f"logged steps", file=sys.stderr)
            if training:  # loaded only to sample from: silent (`evaluate` prints JSON, errors are one line)
                self._print(f"resuming {self.out} from step {self.step}/{self.total_steps}")
            return
        raise CheckpointError(f"no loadable checkpoint in {self.out}: " + "; ".join(problems) + ". Nothing "
                              "was changed: restore a good checkpoint.pt there, or train afresh with another "
                              "--out-dir")

    # ---- training ----
    def _measure_flops_per_image(self, x):
        """Training FLOPs per image (forward + backward), counted once on two images."""
        def loss():
            with autocast(self.device, self.precision):
                return self.diffusion(self.centre_crop(x[:2].float() / 255))
        with self._rng_kept():  # a run that counts its FLOPs draws the same noise as one that does not
            forward, backward = count_training_flops(loss, 2)
        self.diffusion.zero_grad(set_to_none=True)
        return forward + backward

    def train_step(self, batch_u8, labels=None):
        """One optimizer step on this process's share of the global batch (with its class labels,
        for a conditional model).

        Timesteps, noise and which labels to drop are drawn for the whole global batch on every
        process (same RNG stream) and each process takes its share, so N processes compute
        exactly the loss of one process with the same global batch.
        """
        cfg, B = self.cfg, self.cfg.batch_size
        t_all = torch.randint(0, cfg.timesteps, (B,), device=self.device)
        noise_all = torch.randn((B, self.diffusion.channels, *self.diffusion.image_size), device=self.device)
        share = slice(self.rank, None, self.world)
        t, noise = t_all[share], noise_all[share]
        x = batch_u8.to(self.device, non_blocking=True).float().div_(255)
        if cfg.augment:
            x = self._random_crop(x, B, share)
        if cfg.hflip:  # drawn for the global batch, like t and noise
            flip = (torch.rand(B, device=self.device) < 0.5)[share]
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        condition = {}
        if cfg.conditional:
            drop_all = torch.rand(B, device=self.device) < cfg.cond_drop_prob
            condition = dict(labels=labels.to(self.device, non_blocking=True), drop=drop_all[share])
        if cfg.compile and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs may be overwritten
        with autocast(self.device, self.precision):
            loss = self.train_module(x, t=t, noise=noise, **condition)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.diffusion.parameters(), cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.ema.update_parameters(self.diffusion)
        self.step += 1
        return loss.detach().clone()  # a copy: a CUDA graph's output is overwritten by its next replay

    def _random_crop(self, x, B, share):
        """A random window of the model's size from each (larger) image; the offsets are drawn for
        the global batch, like t and noise."""
        size = self.diffusion.image_size[0]
        offsets = torch.randint(0, x.shape[-1] - size + 1, (2, B), device=self.device)[:, share]
        window = torch.arange(size, device=self.device)
        rows = (offsets[0, :, None] + window)[:, :, None]              # (b, size, 1)
        cols = (offsets[1, :, None] + window)[:, None, :]              # (b, 1, size)
        image = torch.arange(len(x), device=self.device)[:, None, None]
        return x[image, :, rows, cols].permute(0, 3, 1, 2)             # indexing puts channels last

    def centre_crop(self, x):
        """The central window of the model's size (the whole image unless the run augments)."""
        size, margin = self.diffusion.image_size[0], x.shape[-1] - self.diffusion.image_size[0]
        return x[..., margin // 2:margin // 2 + size, margin // 2:margin // 2 + size]

    def _loader(self, dataset, epoch):
        from torch.utils.data import DataLoader, DistributedSampler
        sampler = DistributedSampler(dataset, num_replicas=self.world, rank=self.rank,
                                     shuffle=True, seed=self.cfg.seed, drop_last=True)
        sampler.set_epoch(epoch)
        # its own generator: creating an iterator must not consume the global RNG, or a run
        # resumed mid-epoch would draw different noise than one that never stopped
        return DataLoader(dataset, batch_size=self.cfg.batch_size // self.world,
                          sampler=sampler, drop_last=True, generator=torch.Generator())

    def batches(self, images, labels=None):
        """This process's batches (images, their labels or None) from the current step to the end of the run.

        The order within an epoch is a function of (seed, epoch), so a resumed run skips the
        batches it had already seen and then draws exactly what an uninterrupted run would.
        """
        from torch.utils.data import TensorDataset
        dataset = TensorDataset(images) if labels is None else TensorDataset(images, labels)
        steps_per_epoch = self.steps_per_epoch(len(images))
        while self.step < self.total_steps:
            epoch, skip = divmod(self.step, steps_per_epoch)
            for i, batch in enumerate(self._loader(dataset, epoch)):
                if i >= skip:
                    yield batch[0], (batch[1] if len(batch) > 1 else None)
                if self.step >= self.total_steps:
                    return

    def _global_mean(self, value):
        if self.world > 1:
            value = value.clone()
            torch.distributed.all_reduce(value)
            value /= self.world
        return value

    def run(self, progress=True):
        """Train to the end (resuming from the run directory if a checkpoint exists), then sample and evaluate."""
        images = self.load_training_data()
        self.build(self.planned_steps(images))
        self.resume()
        if self.done and self.step >= self.total_steps:
            self._print(f"{self.out} already finished")
            return self.results()
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.cfg.save(self.out / "config.json")
            if self.cfg.minutes is not None:
                data.atomic_write_text(self.out / "budget.json", json.dumps(self.budget, indent=2) + "\n")
                self._print(f"time budget {self.cfg.minutes} min: {self.total_steps} steps "
                            f"(measured: {self.out / 'budget.json'})")
        self.train(images, progress)
        self.save_checkpoint()
        if self.is_main:
            self.finish()
        if self.world > 1:
            torch.distributed.barrier()
        return self.results()

    def prepared_size(self):
        """The size images are prepared at: the model's, or 1/8 larger for random crops."""
        size = self.cfg.size
        return size + size // 8 if self.cfg.augment else size

    def training_images(self):
        """The run's training images (uint8, at the model's shape), for the memorisation check."""
        images = data.training_images(self.cfg.dataset, self.prepared_size(), self.cfg.channels,
                                      limit=self.cfg.train_subset or None)[0]
        return self.centre_crop(images) if self.cfg.augment else images

    def load_training_data(self):
        """The training images (uint8 (N, C, H, W)); their labels go to self._labels, for a conditional run."""
        given = self._data
        if given is None:
            images, labels = data.training_images(self.cfg.dataset, self.prepared_size(), self.cfg.channels,
                                                  limit=self.cfg.train_subset or None)
            if data.is_folder(self.cfg.dataset):  # the run's config records the shape and classes it trained on
                self.cfg = self.cfg.replace(image_size=self.cfg.size, channels=images.shape[1],
                                            class_names=self._folder_classes())
        else:
            images, labels = given if isinstance(given, (tuple, list)) else (given, None)
        if self.cfg.conditional and labels is None:
            raise ConfigError("config.conditional=True is not allowed here: the training images came without labels")
        self._labels = labels if self.cfg.conditional else None
        return images

    def _folder_classes(self):
        """The folder's class names for a conditional run (checked against those its config recorded)."""
        if not self.cfg.conditional:
            return ()
        found = tuple(data.class_names(self.cfg.dataset) or ())
        if self.cfg.class_names and tuple(self.cfg.class_names) != found:
            raise ConfigError(f"the class subfolders of {data.folder_path(self.cfg.dataset)} are now {list(found)}, "
                              f"but this run was trained on {list(self.cfg.class_names)}: restore them, or train a "
                              f"new run (another --out-dir)")
        return found

    def train(self, images, progress=True):
        """The training loop: steps, with a log line, a checkpoint and a sample grid when they are due."""
        from tqdm.auto import tqdm
        cfg = self.cfg
        log = TrainingLog(self, self._measure_flops_per_image(images[:2].to(self.device)),
                          self.steps_per_epoch(len(images)))
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (progress and self.is_main),
                   desc=self.out.name, dynamic_ncols=True)
        due = lambda every: every and self.step % every == 0 and self.step < self.total_steps
        try:
            for batch, labels in self.batches(images, self._labels):
                log.add(self.train_step(batch, labels))
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    bar.set_postfix(log.write())
                bar.update(1)
                if due(cfg.checkpoint_every):
                    self.save_checkpoint()
                if due(cfg.sample_every):
                    self.save_samples(f"samples_{self.step:06d}.png")
                    log.pause()  # sampling time is not training time
        except KeyboardInterrupt:
            bar.close()
            self.save_checkpoint()
            self._print(f"\ninterrupted at step {self.step}: checkpoint saved to {self.ckpt_path}; "
                        f"run the same command again to resume")
            raise
        bar.close()

    # ---- outputs ----
    def balanced_labels(self, n):
        """Labels 0, 1, 2, ... modulo the classes (a conditional run's default); None when unconditional."""
        return torch.arange(n) % self.cfg.num_classes if self.cfg.conditional else None

    def class_grid(self, n):
        """(labels, images per row) for a grid of at least n samples with one row per class (None, a
        square grid when unconditional)."""
        if not self.cfg.conditional:
            return None, math.ceil(math.sqrt(n))
        per_row = math.ceil(n / self.cfg.num_classes)
        return torch.arange(self.cfg.num_classes).repeat_interleave(per_row), per_row

    def sample(self, n, steps=None, eta=None, use_ema=True, generator=None, return_all_timesteps=False,
               progress=False, sampler=None, labels=None, guidance=None, **kwargs):
        """n images in [0, 1] from the EMA (or raw) weights with the config's sampler, unless
        `sampler`, `steps` or `eta` say otherwise; other keyword arguments go to DDPM's `sample`.
        A conditional run draws `labels` (default: the classes in turn) with guidance scale `guidance`
        (default: the config's)."""
        if self.cfg.conditional:
            kwargs.update(labels=self.balanced_labels(n) if labels is None else labels,
                          guidance_scale=self.cfg.guidance if guidance is None else guidance)
        elif labels is not None or guidance is not None:
            raise ConfigError(f"{self.out} is an unconditional run: it takes no label or guidance "
                              f"(train with --conditional true for a class-conditional model)")
        diffusion = self.ema.module if use_ema else self.diffusion
        diffusion.eval()
        try:
            with autocast(self.device, self.precision), graphed_sampling(diffusion):  # CUDA graphs on a GPU
                out = diffusion.sample(n, sampling_steps=steps or self.cfg.sample_steps, generator=generator,
                                       return_all_timesteps=return_all_timesteps, progress=progress,
                                       **sampler_kwargs(self.cfg, sampler, eta), **kwargs)
        finally:
            diffusion.train()
        return out.float()

    def save_samples(self, name, n=None, seed=None, **sampler_args):
        """A grid of samples (the config's count and seed unless given) written to the run directory;
        a conditional run's grid has one row per class."""
        from torchvision.utils import save_image
        n = n or self.cfg.num_sample_images
        labels, per_row = self.class_grid(n)
        n = n if labels is None else len(labels)
        g = torch.Generator(self.device).manual_seed(self.cfg.seed if seed is None else seed)
        imgs = self.sample(n, generator=g, labels=labels, **sampler_args)
        with data.writing(self.out / name):
            save_image(imgs, self.out / name, nrow=per_row, padding=2)

    def save_gif(self, path, n=16, seed=None, **sampler_args):
        """The reverse process of n samples as a looping GIF."""
        g = torch.Generator(self.device).manual_seed(self.cfg.seed if seed is None else seed)
        traj = self.sample(n, generator=g, return_all_timesteps=True, **sampler_args)
        save_reverse_process_gif(traj, path, nrow=math.ceil(math.sqrt(n)))

    def finish(self):
        """End-of-run outputs: loss curve, final samples, reverse-process GIF, evaluation, done marker."""
        cfg = self.cfg
        plot_loss_curves({self.out.name: self.out}, self.out / "loss_curve.png")
        t0 = time.perf_counter()
        self.save_samples("samples_final.png")
        if cfg.gif:
            self.save_gif(self.out / "reverse_process.gif")
        sample_time = time.perf_counter() - t0
        if cfg.eval_samples:
            result, imgs = self.evaluate(cfg.eval_samples, cfg.eval_steps, return_images=True)
            data.atomic_write_text(self.out / "eval.json", json.dumps(result, indent=2) + "\n")
            if data.is_folder(cfg.dataset):
                plot_nearest_neighbours(imgs[:10], self.training_images(), self.out / "memorisation.png")
        rows = read_metrics(self.out)
        done = dict(step=self.step, final_loss=float(np.mean([r["loss"] for r in rows[-5:]])) if rows else None,
                    train_time_s=rows[-1]["train_time_s"] if rows else None,
                    picture_sampling_time_s=round(sample_time, 2),
                    precision=self.precision, channels_last=self.channels_last)  # as resolved on this machine
        data.atomic_write_text(self.out / "done.json", json.dumps(done, indent=2) + "\n")
        self._print(f"finished {self.out}: " + ", ".join(f"{k}={v}" for k, v in done.items()))

    def evaluate(self, n, steps=None, use_ema=True, batch=250, return_images=False, sampler=None, seed=None,
                 **sampler_args):
        """Sample n images (starting noise from `seed`, default the run's seed + 1) and score them
        against the dataset (see `evaluation.evaluate_samples`).

        Returns the result dict, or (result, images) with return_images=True, so a figure can
        show exactly the images that were scored.
        """
        steps = steps or self.cfg.eval_steps
        g = torch.Generator(self.device).manual_seed(self.cfg.seed + 1 if seed is None else seed)
        label = sampler_args.pop("labels", None)  # one requested class for all, or the classes in turn
        labels = self.balanced_labels(n) if label is None else torch.full((n,), int(label))
        t0 = time.perf_counter()
        imgs = torch.cat([self.sample(min(batch, n - i), steps=steps, use_ema=use_ema, generator=g, sampler=sampler,
                                      labels=None if labels is None else labels[i:i + batch], **sampler_args)
                          for i in range(0, n, batch)])
        seconds = time.perf_counter() - t0
        if data.is_folder(self.cfg.dataset):  # no classifier for your own images: check for copies instead
            result = memorisation(imgs, self.training_images())[0]
        else:
            result = evaluate_samples(imgs, self.cfg.dataset, labels=labels)
        used = sampler_kwargs(self.cfg, sampler, sampler_args.pop("eta", None))
        guidance = sampler_args.pop("guidance", None)
        if self.cfg.conditional:
            used["guidance"] = self.cfg.guidance if guidance is None else guidance
        result.update(sampling_steps=steps, ema=use_ema, sample_time_per_image_s=round(seconds / n, 4),
                      **used, **sampler_args)
        return (result, imgs.cpu()) if return_images else result

    def results(self):
        return run_results(self.out)

    # Sampling from trained weights takes the layout that pays on the machine it runs on, whichever the
    # run trained in: the weights are the same in both (overrides may still name one).
    SAMPLING_LAYOUT = {"channels_last": "auto"}

    @classmethod
    def from_run_dir(cls, run_dir, **overrides):
        """The experiment of an existing run directory, with its weights loaded (for sampling, evaluation)."""
        run_dir = Path(run_dir)
        if not any((run_dir / name).exists() for name in ("checkpoint.pt", "checkpoint_prev.pt")):
            raise ConfigError(f"{run_dir} holds no checkpoint.pt: not a run directory")
        cfg = Config.load(run_dir / "config.json").replace(out_dir=str(run_dir),
                                                           **{**cls.SAMPLING_LAYOUT, **overrides})
        exp = cls(cfg).build(cfg.steps, from_init_weights=False)
        exp.resume(set_aside_damaged=False, training=False)
        return exp

    @classmethod
    def from_weights(cls, path, **overrides):
        """An experiment holding shipped EMA weights (see `load_weights`), for sampling and evaluation."""
        cfg = weights_config(path).replace(out_dir=str(Path(path).parent),
                                          **{**cls.SAMPLING_LAYOUT, **overrides})
        exp = cls(cfg).build(cfg.steps, from_init_weights=False)
        exp.diffusion.load_state_dict(read_weights(path, exp.diffusion))
        exp.ema.module.load_state_dict(exp.diffusion.state_dict())
        return exp

    @classmethod
    def from_path(cls, path, **overrides):
        """A run directory or a shipped weights file (.pt), ready to sample and evaluate."""
        if Path(path).suffix == ".pt" and not Path(path).is_dir():
            return cls.from_weights(path, **overrides)
        return cls.from_run_dir(path, **overrides)


class TrainingLog:
    """The run's log, metrics.jsonl: one JSON line per `log_every` steps with the mean loss since the
    last line, the learning rate, throughput (images/s, GFLOP/s) and the training time so far."""

    def __init__(self, exp, flops_per_image, steps_per_epoch):
        self.exp, self.flops_per_image, self.steps_per_epoch = exp, flops_per_image, steps_per_epoch
        self.path = exp.out / "metrics.jsonl"
        rows = [r for r in read_metrics(exp.out) if r["step"] <= exp.step]
        self.train_time = rows[-1]["train_time_s"] if rows else 0.0
        self.losses = []
        self.pause()

    def add(self, loss):
        self.losses.append(loss)

    def pause(self):
        """Restart the clock: time from here on counts as training."""
        self.t_last, self.step_last = time.perf_counter(), self.exp.step

    def write(self):
        """Append a record (main process) and return the progress bar's summary of it."""
        exp, cfg = self.exp, self.exp.cfg
        loss = exp._global_mean(torch.stack(self.losses).mean()).item()
        if not math.isfinite(loss):
            raise NonFiniteLoss(
                f"the loss became {loss} near step {exp.step}; the run stopped and kept its last good "
                f"checkpoint ({exp.ckpt_path}). Try a lower lr (now {cfg.lr}) or float32 precision.")
        now = time.perf_counter()
        self.train_time += now - self.t_last
        img_s = (exp.step - self.step_last) * cfg.batch_size / (now - self.t_last)
        record = dict(step=exp.step, epoch=round(exp.step / self.steps_per_epoch, 3), loss=loss,
                      lr=exp.sched.get_last_lr()[0], img_per_s=round(img_s, 1),
                      gflops=round(img_s * self.flops_per_image / 1e9, 1), train_time_s=round(self.train_time, 1))
        if exp.is_main:
            append_line(self.path, json.dumps(record))
        self.losses = []
        self.pause()
        return dict(loss=f"{loss:.4f}", img_s=f"{img_s:.0f}", gflops=f"{record['gflops']:.0f}")


def append_line(path, line):
    """Append one line; an OSError (a full disk) names the file."""
    with data.writing(path), open(path, "a") as f:
        f.write(line + "\n")


def run_finished(run_dir):
    return (Path(run_dir) / "done.json").exists()


def run_results(run_dir):
    """A run's done.json and eval.json merged into one dict (with the run directory)."""
    out = {"run": str(run_dir)}
    for name in ("done.json", "eval.json"):
        if (Path(run_dir) / name).exists():
            out.update(json.loads((Path(run_dir) / name).read_text()))
    return out


def read_metrics(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a full disk or a kill
            rows.append(json.loads(line))
    # a resumed run re-logs the steps after its last checkpoint: keep the latest record per step
    by_step = {r["step"]: r for r in rows if isinstance(r, dict) and "step" in r}
    return [by_step[s] for s in sorted(by_step)]


# ================================================================================================
# Shipped weights: <name>_ema.pt with <name>_config.json (and <name>_metrics.jsonl) beside it
# ================================================================================================

def weights_files(path):
    """The config and log that belong to a weights file: data/ddpm_mnist_ema.pt ->
    data/ddpm_mnist_config.json, data/ddpm_mnist_metrics.jsonl."""
    stem = Path(path).with_suffix("").as_posix().removesuffix("_ema")
    return Path(f"{stem}_config.json"), Path(f"{stem}_metrics.jsonl")


def weights_config(path):
    """The Config stored beside a weights file; ConfigError naming the file when it is missing."""
    if not Path(path).exists():
        raise ConfigError(f"weights file {path} does not exist")
    config_path = weights_files(path)[0]
    if not config_path.exists():
        raise ConfigError(f"weights file {path} has no config beside it: expected {config_path} (written "
                          f"with the weights by `python experiment.py export-weights RUN {path}`)")
    return Config.load(config_path)


def read_weights(path, model, may_lack=()):
    """The state dict in a weights file, checked against `model` (it may lack the keys in `may_lack`);
    ConfigError saying what is wrong."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"weights file {path} does not load ({_first_line(e)}): copy it again") from None
    if not isinstance(state, dict):
        raise ConfigError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    problem = state_dict_mismatch(state, model, may_lack)
    if problem:
        raise ConfigError(f"weights file {path} does not match its config {weights_files(path)[0]}: {problem}")
    return state


def load_weights(path, device="cpu", channels_last="auto"):
    """(GaussianDiffusion with the shipped weights, in eval mode, on `device`; its Config). Its U-Net
    runs in channels_last where that pays on `device` (`channels_last`: "auto", "on" or "off", as
    Config.channels_last), whichever layout the weights were trained in.

        diffusion, cfg = experiment.load_weights("data/ddpm_mnist_ema.pt")
        images = diffusion.sample(64, sampler=cfg.sampler, sampling_steps=cfg.sample_steps)
    """
    cfg = weights_config(path)
    layout = cfg.replace(channels_last=channels_last).channels_last  # checked as the config field is
    diffusion = build_diffusion(cfg)
    diffusion.load_state_dict(read_weights(path, diffusion))
    device = torch.device(device)
    if resolve_channels_last(layout, device):
        use_channels_last(diffusion.model)
    return diffusion.to(device).eval(), cfg


def export_weights(run_dir, path):
    """The EMA weights of a run (a GaussianDiffusion state dict, CPU tensors) to `path`, atomically;
    its deduplicated training log and config beside it (<stem>_metrics.jsonl, <stem>_config.json)."""
    exp = Experiment.from_run_dir(run_dir, device="cpu")
    data.atomic_torch_save(exp.ema.module.state_dict(), path)
    config_path, metrics_path = weights_files(path)
    data.atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in read_metrics(run_dir)))
    Config.load(Path(run_dir) / "config.json").save(config_path)  # as trained, not as loaded here
    return exp.step


# ================================================================================================
# Figures of a run
# ================================================================================================

PLAIN_LOG_TICKS = (1, 2, 3, 5, 10, 20, 30, 50, 100, 200, 300, 500, 1000)


def plain_log_ticks(axis, candidates=PLAIN_LOG_TICKS):
    """Label a log-scaled matplotlib axis (`ax.xaxis` or `ax.yaxis`, limits already final) with the
    plain numbers among `candidates` that lie inside its limits, in place of matplotlib's powers of
    ten, which leave a one-decade FID axis with one or two labels."""
    if axis.get_scale() != "log":
        raise ValueError(f"plain_log_ticks needs a log-scaled axis, got scale {axis.get_scale()!r}")
    low, high = sorted(axis.get_view_interval())
    axis.set_ticks([v for v in candidates if low <= v <= high])
    axis.set_major_formatter("{x:g}")
    axis.set_minor_formatter("")


def plot_loss_curves(runs, path, smooth=5, x="step"):
    """Loss against step (x="step") or training time (x="time") for one or more runs ({label:
    run_dir}), overlaid, log-scaled."""
    if x not in ("step", "time"):
        raise ValueError(f"x={x!r} is not allowed: expected 'step' or 'time'")
    import matplotlib
    matplotlib.use("Agg") if "matplotlib.pyplot" not in sys.modules else None
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, run_dir in runs.items():
        rows = read_metrics(run_dir)
        if not rows:
            continue
        where = np.array([r["step"] if x == "step" else r["train_time_s"] / 60 for r in rows])
        loss = np.array([r["loss"] for r in rows])
        k = min(smooth, len(loss))
        smoothed = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(where[k - 1:], smoothed, label=label)
    ax.set(xlabel="step" if x == "step" else "training time, minutes",
           ylabel=f"training loss (mean of {smooth} logs)", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with data.writing(path):
        fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_nearest_neighbours(samples, train_u8, path):
    """Samples (top row) above their nearest training images in pixel space (bottom row), with the
    RMS distance: near-copies (below evaluation.NEAR_COPY_RMS) are marked in red."""
    import matplotlib
    matplotlib.use("Agg") if "matplotlib.pyplot" not in sys.modules else None
    import matplotlib.pyplot as plt
    from evaluation import NEAR_COPY_RMS
    dist, index = nearest_training_images(samples, train_u8)
    n = len(samples)
    fig, axes = plt.subplots(2, n, figsize=(1.2 * n, 2.9), squeeze=False)
    show = lambda img: img.permute(1, 2, 0).squeeze(-1).cpu().numpy()
    for i in range(n):
        axes[0, i].imshow(show(samples[i].float()), cmap="gray", vmin=0, vmax=1)
        axes[1, i].imshow(show(train_u8[index[i]].float() / 255), cmap="gray", vmin=0, vmax=1)
        axes[1, i].set_xlabel(f"{dist[i]:.3f}", color="red" if dist[i] < NEAR_COPY_RMS else "black", fontsize=8)
        for ax in axes[:, i]:
            ax.set_xticks([]), ax.set_yticks([])
    axes[0, 0].set_ylabel("sample", fontsize=8)
    axes[1, 0].set_ylabel("nearest\ntraining image", fontsize=8)
    fig.suptitle(f"nearest training image in pixel space (RMS distance; red: below {NEAR_COPY_RMS}, a near-copy)",
                 fontsize=9)
    fig.tight_layout()
    with data.writing(path):
        fig.savefig(path, dpi=110)
    plt.close(fig)


def save_reverse_process_gif(trajectory, path, frames=40, nrow=4, hold_last=20):
    """A looping GIF of the reverse process from a (B, steps+1, C, H, W) trajectory in [0, 1]."""
    import imageio.v2 as imageio
    from torchvision.utils import make_grid
    steps = trajectory.shape[1]
    idx = sorted(set(np.linspace(0, steps - 1, min(frames, steps)).round().astype(int).tolist()))
    pics = []
    for i in idx:
        grid = make_grid(trajectory[:, i], nrow=nrow, padding=2, pad_value=1.0).clamp(0, 1)
        grid = grid[0] if trajectory.shape[2] == 1 else grid.permute(1, 2, 0)  # grey (H, W) or colour (H, W, 3)
        pics.append((grid * 255).round().to(torch.uint8).cpu().numpy())
    pics += [pics[-1]] * hold_last
    with data.writing(path):
        imageio.mimsave(path, pics, duration=0.08, loop=0)


# ================================================================================================
# Many runs: the experiment manager
# ================================================================================================

# The lever study ("What buys quality per minute" in the README): the main job's config as it was
# before the study (pinned, so the study means the same after the defaults changed), trained for the
# same wall-clock budget with one lever changed at a time.
LEVER_STUDY_BASE = dict(dataset="fashion_mnist", lr=1e-3, batch_size=128, warmup_steps=200, ema_decay=0.999,
                        ema_power=0.0, min_snr_gamma=None, dim=32, dim_mults=(1, 2, 4), objective="pred_noise",
                        beta_schedule="linear", sampler="dpm++2m-sde", eval_steps=50, channels_last="off")
LEVERS = {
    "baseline": {},
    "min_snr_5": dict(min_snr_gamma=5.0),       # Hang et al. (2023): less effort on nearly clean images
    "ema_power_7": dict(ema_power=7.0),         # an average that grows with the run (Karras et al. 2023)
    "lr_2e-3": dict(lr=2e-3),
    "batch_64": dict(batch_size=64),            # twice the steps, each half as large
    "dim_24": dict(dim=24),                     # narrower: about half the FLOPs, yet no faster on AMX cores
    "batch_32": dict(batch_size=32),            # four times the steps, each a quarter as large
}
# the levers that won, together: Config's defaults since the study (and so the main job's)
COMBINED = dict(batch_size=32, lr=2e-3, min_snr_gamma=5.0)
# The main job, `python experiment.py` (see main_job_config): Config's defaults trained for a fixed time
# on any machine (its steps follow from the measured speed), in its own folder (not train's default
# one: a run there would resume the other model). At its budget class conditioning bought more quality
# than any other lever (README, "The main job"), so it trains a class-conditional model and samples it
# with this guidance scale: of w in (1, 1.1, 1.25, 1.5, 2), 1.1 and 1.25 gave the lowest FID on two
# seeds of the full 15-minute run, and 1.25 the more confident samples.
MAIN_JOB_MINUTES = 15.0
MAIN_JOB_DIR = "runs/main_job"
MAIN_JOB_GUIDANCE = 1.25
# What the study measures on top of COMBINED: COMBINED itself, and COMBINED made class-conditional
# as the main job is, sampled with the guidance scale the main job had when the study ran (its kept
# results, data/fmnist_levers.md, are at this scale).
LEVER_STUDY_GUIDANCE = 1.5
ON_COMBINED = {"combined": COMBINED,
               "combined_conditional": dict(COMBINED, conditional=True, guidance=LEVER_STUDY_GUIDANCE)}


# the fields that change how long one training step takes
SPEED_FIELDS = ("dataset", "image_size", "channels", "dim", "dim_mults", "resnet_blocks", "attn_dim_head",
                "conditional", "batch_size", "device", "precision", "channels_last", "compile")


def step_work(cfg):
    """The work of one training step of `cfg`: its SPEED_FIELDS, with the layout as it resolves on the
    config's device, so that "auto" and the setting it stands for here share one measurement."""
    device = pick_device() if cfg.device == "auto" else torch.device(cfg.device)  # no check: times may be kept
    resolved = dict(device=device.type, channels_last=resolve_channels_last(cfg.channels_last, device))
    return tuple(resolved.get(field, getattr(cfg, field)) for field in SPEED_FIELDS)


def lever_study(root, minutes, levers=LEVERS, seeds=(0,), repeat=None, step_times=None, **fixed):
    """An ExperimentManager over `levers` ({name: config changes}) applied to LEVER_STUDY_BASE, each
    trained for as many steps as `minutes` of its own step time allow; every seed after the first
    adds runs named <name>_seed<s>, and `repeat` ({name: seeds}) adds such runs for chosen levers only
    (the winner's second seed, say). `fixed` sets fields for all runs, over the pinned base's too (a
    smaller U-Net and evaluation for a quick run, say).

    The step times ({name: seconds}) are measured once for all levers, interleaved
    (`measure_step_times`), and kept in <root>/step_times.json, so the study resumes with the same
    lengths. On a machine whose speed drifts by a third within minutes (seen on two shared cores),
    a separate measurement at each run's start would hand out lengths by luck, not by speed.
    """
    unknown = sorted(set(repeat or {}) - set(levers))
    if unknown:
        raise ConfigError(f"repeat={unknown} is not allowed: it names levers of the study, {sorted(levers)}")
    base = Config(**{**LEVER_STUDY_BASE, "sample_every": 0, "gif": False, "log_every": 10, **fixed})
    variants = {name: base.replace(**changes) for name, changes in levers.items()}
    if step_times is None:
        step_times = kept_step_times(variants, Path(root) / "step_times.json")
    runs = [(name, seed) for seed in seeds for name in variants]
    runs += [(name, seed) for name, more in (repeat or {}).items() for seed in more]
    configs = [variants[name].replace(seed=seed, steps=max(1, int(minutes * 60 / step_times[name])))
               for name, seed in runs]
    return ExperimentManager(configs, root, [name if seed == seeds[0] else f"{name}_seed{seed}" for name, seed in runs])


def kept_step_times(configs, path):
    """Seconds per training step of each config ({name: Config}): read from the JSON file `path`
    where it holds them, measured for the rest (once per distinct amount of work per step, see
    step_work: levers such as the learning rate or the EMA share their baseline's time), and
    written back to `path`."""
    step_times = json.loads(Path(path).read_text()) if Path(path).exists() else {}
    known = {step_work(configs[name]): step_times[name] for name in configs if name in step_times}
    groups = {}
    for name, cfg in configs.items():
        if name not in step_times:
            groups.setdefault(step_work(cfg), []).append(name)
    if not groups:
        return step_times
    unknown = {names[0]: configs[names[0]] for key, names in groups.items() if key not in known}
    if unknown:
        # measured beside a config of known time, and scaled by its ratio: the machine's speed today
        # does not shift the new times against those kept from an earlier measurement
        reference = next((name for name in configs if name in step_times), None)
        measured = measure_step_times({**unknown, **({reference: configs[reference]} if reference else {})})
        scale = step_times[reference] / measured.pop(reference) if reference else 1.0
        known.update({step_work(configs[n]): round(t * scale, 4) for n, t in measured.items()})
    step_times.update({name: known[key] for key, names in groups.items() for name in names})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    data.atomic_write_text(path, json.dumps(step_times, indent=2) + "\n")
    return step_times


def measure_step_times(configs, rounds=3, steps=10, warmup=3):
    """Seconds per training step of each config ({name: Config}), timed in `rounds` interleaved
    rounds of `steps` steps (after `warmup` untimed ones each), so that a machine whose speed
    drifts during the measurement slows every config alike."""
    runs = {}
    for name, cfg in configs.items():
        exp = Experiment(cfg)
        images = exp.load_training_data()
        exp.build(warmup + rounds * steps)
        runs[name] = (exp, exp.batches(images, exp._labels))
    for exp, batches in runs.values():
        exp.timed_steps(batches, warmup)
    seconds = dict.fromkeys(runs, 0.0)
    for _ in range(rounds):
        for name, (exp, batches) in runs.items():
            seconds[name] += exp.timed_steps(batches, steps)
    return {name: round(s / (rounds * steps), 4) for name, s in seconds.items()}


def threads_per_process(processes):
    """Torch threads for each of `processes` processes that run at once: an equal share of this
    process's threads, at least one (see ExperimentManager.run)."""
    return max(1, torch.get_num_threads() // processes)


class ExperimentManager:
    """Run a list of configs, each in its own directory under `root`; skip finished runs, resume the rest.

    `run()` returns the results table; `write_report()` writes results.csv, results.md,
    loss_curves.png and samples_side_by_side.png to `root`.
    """

    def __init__(self, configs, root, names=None):
        self.root = Path(root)
        names = names or [f"run{i:02d}" for i in range(len(configs))]
        if len(set(names)) != len(names):
            raise ConfigError(f"run names must be unique, got {names}")
        self.configs = {n: c.replace(out_dir=str(self.root / n)) for n, c in zip(names, configs)}

    def varied_fields(self):
        dicts = [c.to_dict() for c in self.configs.values()]
        return [k for k in dicts[0] if k != "out_dir" and len({json.dumps(d[k]) for d in dicts}) > 1]

    def run(self, progress=True, parallel=1):
        """Train every run that has not finished; returns the results table.

        parallel > 1 trains that many runs at once, each in its own process (`experiment.py train
        --config`, output in <run>/train.log), so that they finish together. Each process gets an
        equal share of this process's torch threads (at least one): processes whose threads
        together outnumber the cores wait on each other's spinning threads. On two EPYC cores, the
        default step in bfloat16 and channels_last trained 343-357 images/s in two processes of
        one thread together, against 301-321 in one process of two threads (+11 to +17% in three
        pairs: no handing of work between threads within an operation), and 9-133 images/s in two
        processes of two threads each (`benchmark.py --concurrent 2`'s measurement). On one H100, in
        eager mode, six processes of the default U-Net trained ~3,100 images/s together against
        ~2,400 for one alone (about 30% more: the GPU time-slices between processes, and each
        process's step is launch-bound).
        """
        if not isinstance(parallel, int) or parallel < 1:
            raise ConfigError(f"parallel={parallel!r} is not allowed: expected an integer >= 1")
        pending = []
        for name, cfg in self.configs.items():
            if run_finished(cfg.out_dir):
                print(f"{name}: finished earlier, skipped")
            else:
                pending.append(name)
        if parallel == 1:
            for name in pending:
                Experiment(self.configs[name]).run(progress=progress)
        else:
            self._run_in_processes(pending, parallel)
        return self.table()

    def _run_in_processes(self, names, parallel):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_process(parallel))}
        running, failed, queue = {}, [], list(names)
        while queue or running:
            while queue and len(running) < parallel:
                name = queue.pop(0)
                cfg = self.configs[name]
                out = Path(cfg.out_dir)
                out.mkdir(parents=True, exist_ok=True)
                cfg.save(out / "config.json")
                log = open(out / "train.log", "a")
                cmd = [sys.executable, str(REPO_DIR / "experiment.py"), "train", "--config",
                       str(out / "config.json"), "--no-progress"]
                running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
                print(f"{name}: started (process {running[name][0].pid}, log {out / 'train.log'})", flush=True)
            time.sleep(0.5)
            for name, (proc, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[name]
                if proc.returncode:
                    failed.append(name)
                    tail = (Path(self.configs[name].out_dir) / "train.log").read_text().splitlines()[-3:]
                    print(f"{name}: failed (exit {proc.returncode}): " + " | ".join(tail), flush=True)
                else:
                    print(f"{name}: finished", flush=True)
        if failed:
            raise RuntimeError(f"runs {failed} failed; their logs are train.log in each run directory")

    def table(self):
        rows = []
        for name, cfg in self.configs.items():
            res = run_results(cfg.out_dir)
            row = {"run": name, **{k: cfg.to_dict()[k] for k in self.varied_fields()}}
            row["steps"] = res.get("step")
            row["img_per_s"] = (round(res["step"] * cfg.batch_size / res["train_time_s"], 1)
                                if res.get("step") and res.get("train_time_s") else None)
            for key in ("final_loss", "fid", "fid_floor", "confident_share", "class_share_min", "class_share_max",
                        "sample_time_per_image_s", "train_time_s"):
                row[key] = res.get(key)
            rows.append(row)
        return rows

    def write_report(self, extra_rows=(), x="step"):
        """The results table, the loss curves against `x` ("step" or "time") and the final samples."""
        rows = self.table() + list(extra_rows)
        write_table(rows, self.root / "results")
        plot_loss_curves({n: c.out_dir for n, c in self.configs.items()}, self.root / "loss_curves.png", x=x)
        side_by_side({n: Path(c.out_dir) / "samples_final.png" for n, c in self.configs.items()},
                     self.root / "samples_side_by_side.png")
        return rows


def write_table(rows, stem):
    """rows (list of dicts) as <stem>.csv and <stem>.md."""
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    data.atomic_write_text(f"{stem}.csv", table.getvalue())
    fmt = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    data.atomic_write_text(f"{stem}.md", "\n".join(lines) + "\n")


def read_table(path):
    """The rows (list of dicts) of a table written by `write_table`, from its .md or .csv file: numbers
    as int or float, True/False as bool, empty cells as None (the .md holds 4 significant digits)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".md":
        lines = [line.strip().strip("|").split("|") for line in text.splitlines() if line.strip()]
        lines = [[cell.strip() for cell in line] for line in lines[:1] + lines[2:]]  # skip the |---| rule
    else:
        lines = list(csv.reader(io.StringIO(text)))
    def parse(cell):
        if cell in ("", "None"):
            return None
        if cell in ("True", "False"):
            return cell == "True"
        for kind in (int, float):
            try:
                return kind(cell)
            except ValueError:
                pass
        return cell
    return [dict(zip(lines[0], map(parse, line))) for line in lines[1:]]


def side_by_side(images, path, per_row=5, zoom=3, dpi=110):
    """Sample grids ({label: png}) as titled panels, at most `per_row` to a row, each grid drawn at
    `zoom` screen pixels per image pixel (nearest neighbour), so that 28-pixel samples stay readable
    however many panels there are."""
    import matplotlib.pyplot as plt
    images = {k: v for k, v in images.items() if Path(v).exists()}
    if not images:
        return
    cols = min(per_row, len(images))
    rows = math.ceil(len(images) / cols)
    grids = {label: plt.imread(png) for label, png in images.items()}
    height = max(g.shape[0] for g in grids.values()) * zoom / dpi  # inches per panel
    width = max(g.shape[1] for g in grids.values()) * zoom / dpi
    title = 0.5  # inches above each panel for its label
    fig, axes = plt.subplots(rows, cols, figsize=(cols * width * 1.05, rows * (height + title)), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, (label, grid) in zip(axes.flat, grids.items()):
        ax.imshow(grid, cmap="gray", interpolation="nearest")
        ax.set_title(label, fontsize=20)
    with data.writing(path):
        fig.savefig(path, dpi=dpi)
    plt.close(fig)



# ================================================================================================
# The sampler frontier: sample quality against network evaluations
# ================================================================================================

FRONTIER_SAMPLERS = {  # the few-step samplers compared, by display name
    "DDIM eta=0": dict(sampler="ddim", eta=0.0),
    "DDIM eta=1": dict(sampler="ddim", eta=1.0),
    "DPM-Solver++(2M)": dict(sampler="dpm++2m"),
    "SDE-DPM-Solver++(2M)": dict(sampler="dpm++2m-sde"),
}


def _print_now(line):
    print(line, flush=True)  # a long measurement's log, readable while it runs (even redirected to a file)


def sampler_frontier(source, path, n=1000, nfes=(10, 20, 50, 100), spacing_nfes=(10, 20), seed=0, batch=500,
                     channels_last=Experiment.SAMPLING_LAYOUT["channels_last"], log=_print_now):
    """Score the weights in `source` (a run directory or a weights file) with every few-step sampler of
    FRONTIER_SAMPLERS at each count of network evaluations in `nfes` (at the sampler's default spacing),
    with every spacing at `spacing_nfes`, and with DDPM over every timestep as the reference: `n`
    samples per set, all drawn from the same starting noise (`seed`), so the sets differ only by sampler.
    `channels_last` ("auto", "on", "off") is the U-Net's layout, recorded as resolved: the layouts round
    bfloat16 sums differently, so their sets are not mixed.

    The result (JSON, see the keys below) is rewritten after every set, so a killed measurement resumes
    where it stopped: sets already in `path` under the same settings are not drawn again.
    Returns the result dict.
    """
    exp = Experiment.from_path(source, channels_last=channels_last)
    if exp.cfg.conditional:
        raise ConfigError(f"{source} is a conditional model: the frontier compares unconditional samplers")
    T = exp.cfg.timesteps
    if not all(isinstance(k, int) and 1 <= k < T for k in (*nfes, *spacing_nfes)):
        raise ConfigError(f"network evaluations {(*nfes, *spacing_nfes)} are not allowed: the few-step samplers "
                          f"take 1..{T - 1} each (DDPM, the reference, takes all {T})")
    settings = dict(source=str(source), n_samples=n, seed=seed, batch=batch, precision=exp.precision,
                    channels_last=exp.channels_last, device=str(exp.device), device_name=device_name(exp.device))
    done = {}
    if Path(path).exists():
        # files from before the layout was recorded were drawn in NCHW (except any written on an x86 CPU
        # on 2026-11-28 between commits c9d5860 and a22db3f, in channels_last)
        previous = {"channels_last": False, **json.loads(Path(path).read_text())}
        if {k: previous.get(k) for k in settings} == settings:
            done = {(r["sampler"], r["nfe"], r["spacing"]): r for r in [previous["reference"], *previous["rows"]] if r}
    result = dict(settings, complete=False, default_spacings=DDPM.GaussianDiffusion.DEFAULT_SPACINGS,
                  fid_floor=None, reference=None, rows=[], lowest_fid_spacing={})

    def score(name, nfe, spacing_label, **sampler_args):
        key = (name, nfe, spacing_label)
        if key not in done:
            t0 = time.perf_counter()
            r = exp.evaluate(n, steps=nfe, seed=seed, batch=batch, **sampler_args)
            done[key] = dict(sampler=name, nfe=nfe, spacing=spacing_label,
                             ms_per_image=round(r["sample_time_per_image_s"] * 1000, 2), fid=r["fid"],
                             fid_floor=r["fid_floor"], fid_over_floor=r["fid_over_floor"],
                             confident_share=r["confident_share"], class_share_min=r["class_share_min"],
                             class_share_max=r["class_share_max"])
            log(f"{name:21s} {spacing_label:10s} NFE {nfe:4d}: FID {r['fid']:7.2f} (floor {r['fid_floor']:.2f}), "
                f"confident {r['confident_share']:.3f}, {done[key]['ms_per_image']:.1f} ms/image "
                f"({time.perf_counter() - t0:.0f} s)")
        return done[key]

    def save():
        data.atomic_write_text(path, json.dumps(result, indent=1) + "\n")

    result["reference"] = score("DDPM", T, "every step", sampler="ddpm")
    result["fid_floor"] = result["reference"]["fid_floor"]
    save()
    for name, sampler_args in FRONTIER_SAMPLERS.items():
        default = DDPM.GaussianDiffusion.DEFAULT_SPACINGS[sampler_args["sampler"]]
        for nfe, spacing in [(nfe, default) for nfe in nfes] + [
                (nfe, sp) for nfe in spacing_nfes for sp in DDPM.GaussianDiffusion.SPACINGS if sp != default]:
            result["rows"].append(score(name, nfe, spacing, spacing=spacing, **sampler_args))
            save()
        for nfe in spacing_nfes:
            rows = [r for r in result["rows"] if r["sampler"] == name and r["nfe"] == nfe]
            result["lowest_fid_spacing"][f"{name} @ {nfe}"] = min(rows, key=lambda r: r["fid"])["spacing"]
    result["complete"] = True
    save()
    return result


def default_spacing_rows(frontier):
    """The frontier's rows at each sampler's default spacing (the others compare spacings)."""
    return [r for r in frontier["rows"]
            if r["spacing"] == frontier["default_spacings"][FRONTIER_SAMPLERS[r["sampler"]]["sampler"]]]


def frontier_table(frontier):
    """The frontier as the README shows it: a Markdown table with one row per few-step sampler at its
    default spacing, one column per NFE, each cell "FID / confident share / ms per image", and
    DDPM over every timestep as the last row."""
    def cell(r):
        return f"{r['fid']:.2f} / {100 * r['confident_share']:.1f}% / {r['ms_per_image']:.0f}"
    rows = default_spacing_rows(frontier)
    nfes = sorted({r["nfe"] for r in rows})
    lines = ["| sampler (default spacing) | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|" + "---|" * len(nfes)]
    for name in FRONTIER_SAMPLERS:
        by_nfe = {r["nfe"]: r for r in rows if r["sampler"] == name}
        lines.append(f"| {name} | " + " | ".join(cell(by_nfe[n]) if n in by_nfe else "" for n in nfes) + " |")
    ref = frontier["reference"]
    lines.append(f"| DDPM over every step (reference) | {ref['nfe']} NFE: {cell(ref)} |" + " |" * (len(nfes) - 1))
    return "\n".join(lines) + "\n"





# ================================================================================================
# DDPM.ipynb -> DDPM.py
# ================================================================================================
# The notebook is the one source of the library: its cells that start with `#| export` are,
# joined in order, the whole of DDPM.py (nbdev-style), each under a comment naming the cell and
# section it came from. tests/test_notebook_sync.py fails when the two drift apart.

EXPORT_MARK = "#| export"


def _section_title(markdown):
    headings = [line.lstrip("#").strip() for line in markdown.splitlines() if line.startswith("#")]
    return headings[-1] if headings else None


def export_module(notebook=REPO_DIR / "DDPM.ipynb", module=REPO_DIR / "DDPM.py", write=True):
    """The text of DDPM.py generated from the notebook's exported cells; written unless write=False."""
    cells = json.loads(Path(notebook).read_text())["cells"]
    chunks, section = [], None
    for index, cell in enumerate(cells):
        source = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            section = _section_title(source) or section
        elif source.startswith(EXPORT_MARK + "\n"):
            origin = f"# from {Path(notebook).name}, cell {index}" + (f' ("{section}")' if section else "")
            chunks.append(origin + "\n" + source.split("\n", 1)[1].strip("\n"))
    if not chunks:
        raise ValueError(f"{notebook} has no cells starting with {EXPORT_MARK!r}")
    text = "\n\n\n".join(chunks) + "\n"
    if write:
        data.atomic_write_text(module, text)
    return text


# ================================================================================================
# Command line: one function per command
# ================================================================================================

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, no usage dump
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def _parse_bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


# Help beyond a flag's default, for the fields whose default does not tell the whole story.
RUN_LENGTH_HELP = ("; whichever of --steps, --epochs and --minutes is given sets the run's length "
                   f"(none: the --config file's, else --minutes {MAIN_JOB_MINUTES:g})")
FLAG_NOTES = {"dataset": " or folder:PATH (a folder of images)", "steps": RUN_LENGTH_HELP,
              "epochs": RUN_LENGTH_HELP, "minutes": RUN_LENGTH_HELP}


def _add_config_flags(p):
    """One flag per Config field, its help showing the default of `train` without --config."""
    p.add_argument("--config", help="a config.json to start from (flags override its values)")
    base = train_base_config()
    for f in dataclasses.fields(Config):
        kind = {int: int, float: float, bool: _parse_bool, str: str}.get(f.type)
        if f.name == "dim_mults":
            p.add_argument("--dim-mults", type=int, nargs="+", help="channel multipliers per level, e.g. 1 2 4")
            continue
        if f.name == "class_names":  # recorded by a folder run, not chosen
            continue
        optional = f.name in Config.OPTIONAL
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=_or_off(kind) if optional else kind,
                       metavar=f.type.__name__.upper() + ("|off" if optional else ""),
                       help=f"default: {getattr(base, f.name)!r}" + (f"; one of {Config.CHOICES[f.name]}"
                                                                     if f.name in Config.CHOICES else "")
                            + FLAG_NOTES.get(f.name, "") + ("; off: none" if optional else ""))


OFF = object()  # a flag's value "off": the field is set to None (off), not left at the base config's value


def _or_off(kind):
    """The type of a flag for a field that may be None: "off" turns it off, anything else is a `kind`."""
    def parse(text):
        return OFF if text.strip().lower() == "off" else kind(text)
    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def _add_sampler_flags(p):
    p.add_argument("source", metavar="RUN_OR_WEIGHTS",
                   help="a run directory, or a shipped weights file such as data/ddpm_mnist_ema.pt")
    p.add_argument("--sampler", choices=DDPM.GaussianDiffusion.SAMPLERS,
                   help="default: the config's sampler")
    p.add_argument("--steps", type=int, help="network evaluations (default: the config's; ddpm takes every timestep)")
    p.add_argument("--eta", type=float, help="DDIM's eta (0 = deterministic); only with --sampler ddim")
    p.add_argument("--spacing", choices=DDPM.GaussianDiffusion.SPACINGS,
                   help="timesteps of the few-step samplers (default: the sampler's own)")
    p.add_argument("--variance", choices=DDPM.GaussianDiffusion.VARIANCES, help="DDPM's reverse variance")
    p.add_argument("--noise-scale", type=float, help="DDPM's noise scale")
    p.add_argument("--seed", type=int, help="seed of the starting noise (sample: default 0; evaluate: the run's seed + 1)")
    p.add_argument("--label", help="conditional runs: the class to draw, a number or a name such as Sneaker "
                                   "(default: every class, one row each)")
    p.add_argument("--guidance", type=float, help="conditional runs: the guidance scale w (default: the config's)")
    _add_layout_flag(p)


def _add_layout_flag(p):
    p.add_argument("--channels-last", choices=Config.CHOICES["channels_last"],
                   default=Experiment.SAMPLING_LAYOUT["channels_last"],
                   help="the U-Net's memory layout (default auto: channels_last where it pays, whatever the run "
                        "trained in; off reproduces a result sampled in NCHW)")


def train_base_config():
    """The config of `train` without --config: Config's defaults with the main job's time budget."""
    return Config(minutes=MAIN_JOB_MINUTES)


def main_job_config():
    """The main job, `python experiment.py`: `train`'s base config made class-conditional, that is
    `python experiment.py train --conditional true --guidance MAIN_JOB_GUIDANCE --out-dir MAIN_JOB_DIR`."""
    return train_base_config().replace(conditional=True, guidance=MAIN_JOB_GUIDANCE, out_dir=MAIN_JOB_DIR)


def config_from_args(args):
    """The config of `train`: --config's file (else `train_base_config()`), with the flags given on top.
    A run length given as a flag (--steps, --epochs or --minutes) replaces the base's length."""
    base = Config.load(args.config).to_dict() if args.config else train_base_config().to_dict()
    if any(getattr(args, name, None) is not None for name in ("steps", "epochs", "minutes")):
        base.update(epochs=0.0, minutes=None)
    for f in dataclasses.fields(Config):
        value = getattr(args, f.name, None)
        if value is OFF:
            base[f.name] = None
        elif value is not None:
            base[f.name] = tuple(value) if isinstance(value, list) else value
    return Config.from_dict(base)


def build_parser():
    p = _Parser(prog="experiment.py", description=(
        "Train, sample and evaluate DDPMs on MNIST / Fashion-MNIST. With no command, runs the main "
        "job: the default config made class-conditional (a Fashion-MNIST DDPM), 15 minutes of training and "
        "guidance w = %g for its samples (`train` without flags: the same, unconditional)." % MAIN_JOB_GUIDANCE))
    p.set_defaults(func=cmd_main_job)
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    tr = sub.add_parser("train", help="train a run (resumes if its out-dir holds a checkpoint)")
    _add_config_flags(tr)
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.set_defaults(func=cmd_train)
    rs = sub.add_parser("resume", help="resume an interrupted run from its directory")
    rs.add_argument("run_dir")
    rs.add_argument("--no-progress", action="store_true")
    rs.set_defaults(func=cmd_resume)
    sm = sub.add_parser("sample", help="draw images from a run's checkpoint or a weights file (EMA weights)")
    _add_sampler_flags(sm)
    sm.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    sm.add_argument("--out", default="samples.png", help="output PNG (default samples.png)")
    sm.add_argument("--gif", metavar="PATH", help="also write the reverse process of the drawn samples as a GIF")
    sm.set_defaults(func=cmd_sample)
    ev = sub.add_parser("evaluate", help="FID, confident share and class histogram of a run's or a weights file's samples")
    _add_sampler_flags(ev)
    ev.add_argument("--n", type=int, default=1000)
    ev.set_defaults(func=cmd_evaluate)
    pd = sub.add_parser("prepare-data", help="make MNIST and Fashion-MNIST available offline (repairs damaged files)")
    pd.add_argument("--dataset", choices=tuple(DATASETS) + ("all",), default="all")
    pd.set_defaults(func=cmd_prepare_data)
    tc = sub.add_parser("train-classifier", help="train the evaluation classifier, saved to data/")
    tc.add_argument("--dataset", choices=tuple(DATASETS), required=True)
    tc.add_argument("--epochs", type=int, default=3)
    tc.set_defaults(func=lambda args: train_classifier(args.dataset, epochs=args.epochs))
    ex = sub.add_parser("export", help="regenerate DDPM.py from the cells of DDPM.ipynb marked '#| export'")
    ex.set_defaults(func=cmd_export)
    cd = sub.add_parser("make-colour-digits", help="write an example folder dataset: coloured MNIST digits as PNGs")
    cd.add_argument("out", help="a new folder, e.g. runs/colour_digits")
    cd.add_argument("--n", type=int, default=5000, help="number of images (default 5000)")
    cd.add_argument("--size", type=int, default=32, help="image size (default 32)")
    cd.set_defaults(func=cmd_make_colour_digits)
    fr = sub.add_parser("frontier", help="FID against network evaluations for every few-step sampler, with "
                                         "DDPM over every step as the reference (resumes an interrupted measurement)")
    fr.add_argument("source", metavar="RUN_OR_WEIGHTS", help="a run directory or weights file of an unconditional model")
    fr.add_argument("--out", required=True, help="the result JSON, e.g. data/DDPM_sampler_frontier.json")
    fr.add_argument("--n", type=int, default=1000, help="samples per set (default 1000)")
    fr.add_argument("--nfes", type=int, nargs="+", default=[10, 20, 50, 100],
                    help="network evaluations per sample at each sampler's default spacing")
    fr.add_argument("--spacing-nfes", type=int, nargs="+", default=[10, 20],
                    help="network evaluations at which every spacing is compared")
    fr.add_argument("--seed", type=int, default=0, help="seed of the starting noise, the same for every set")
    fr.add_argument("--batch", type=int, default=500, help="images per sampling batch")
    _add_layout_flag(fr)
    fr.set_defaults(func=cmd_frontier)
    ew = sub.add_parser("export-weights", help="save a run's EMA weights (with its log and config beside them)")
    ew.add_argument("run_dir")
    ew.add_argument("out", help="output .pt file, e.g. data/ddpm_mnist_ema.pt")
    ew.set_defaults(func=cmd_export_weights)
    return p


def _check_count(name, value, upper=None):
    if value is not None and (value < 1 or (upper is not None and value > upper)):
        raise ConfigError(f"--{name}={value} is not allowed: expected an integer in 1.."
                          + (str(upper) if upper else "infinity"))


def _sampler_args(args, exp):
    """The sampler flags the user gave (only those: DDPM's sample rejects arguments its sampler ignores)."""
    _check_count("n", args.n)
    _check_count("steps", args.steps, exp.cfg.timesteps)
    given = dict(sampler=args.sampler, steps=args.steps, eta=args.eta, variance=args.variance,
                 noise_scale=args.noise_scale, spacing=args.spacing, guidance=args.guidance,
                 labels=None if args.label is None else class_index(exp.cfg.dataset, args.label, exp.cfg.classes()))
    kwargs = {k: v for k, v in given.items() if v is not None}
    if kwargs.get("sampler") == "ddpm":
        kwargs.setdefault("steps", exp.cfg.timesteps)
    return kwargs


def class_index(dataset, label, names=None):
    """A class given as a number or a name (case and spaces ignored) -> its index; ConfigError otherwise.
    `names`: the classes (default: the dataset's)."""
    names = names or data.class_names(dataset) or []
    plain = lambda text: "".join(ch for ch in text.lower() if ch.isalnum())  # "T-shirt" -> "tshirt"
    for i, name in enumerate(names):
        if plain(label) in (str(i), plain(name)):
            return i
    raise ConfigError(f"--label {label!r} is not a class of {dataset}: expected 0..{len(names) - 1} or one of "
                      f"{', '.join(names)}")


def cmd_main_job(args):
    _run_training(main_job_config())


def cmd_train(args):
    _run_training(config_from_args(args), progress=not args.no_progress)


def cmd_resume(args):
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.json").exists():
        raise ConfigError(f"{run_dir} holds no config.json: not a run directory")
    _run_training(Config.load(run_dir / "config.json").replace(out_dir=str(run_dir)), progress=not args.no_progress)


def cmd_sample(args):
    from torchvision.utils import save_image
    exp = Experiment.from_path(args.source, channels_last=args.channels_last)
    kwargs = _sampler_args(args, exp)
    label = kwargs.pop("labels", None)
    if label is None and exp.cfg.conditional:
        labels, nrow = exp.class_grid(args.n)  # one row per class
    else:
        labels, nrow = label, math.ceil(math.sqrt(args.n))
    n = len(labels) if torch.is_tensor(labels) else args.n
    g = torch.Generator(exp.device).manual_seed(args.seed or 0)
    try:
        imgs = exp.sample(n, generator=g, progress=True, return_all_timesteps=bool(args.gif), labels=labels, **kwargs)
    except ValueError as e:  # an argument the sampler does not take, named by DDPM.sample
        raise ConfigError(str(e)) from None
    if args.gif:
        save_reverse_process_gif(imgs, args.gif, nrow=nrow)
        imgs = imgs[:, -1]
    with data.writing(args.out):
        save_image(imgs, args.out, nrow=nrow)
    print(f"wrote {n} samples to {args.out}" + (f" and their reverse process to {args.gif}" if args.gif else ""))


def cmd_evaluate(args):
    exp = Experiment.from_path(args.source, channels_last=args.channels_last)
    kwargs = _sampler_args(args, exp)
    try:
        result = exp.evaluate(args.n, seed=args.seed, **kwargs)
    except ValueError as e:  # an argument the sampler does not take, named by DDPM.sample
        raise ConfigError(str(e)) from None
    print(json.dumps(result, indent=2))


def cmd_prepare_data(args):
    for name in (DATASETS if args.dataset == "all" else [args.dataset]):
        for train in (True, False):
            ds = load_dataset(name, train=train, repair=True)
            print(f"{name} {'train' if train else 'test'}: {len(ds)} images in {default_data_root()}")


def cmd_make_colour_digits(args):
    _check_count("n", args.n, 60000)
    _check_count("size", args.size)
    written = data.write_colour_digits(args.out, args.n, args.size)
    print(f"wrote {written} coloured digits ({args.size}x{args.size} RGB PNGs, one folder per class) to {args.out}; "
          f"train on them with: python experiment.py train --dataset folder:{args.out} --out-dir runs/colour")


def cmd_frontier(args):
    _check_count("n", args.n)
    _check_count("batch", args.batch)
    result = sampler_frontier(args.source, args.out, n=args.n, nfes=tuple(args.nfes),
                              spacing_nfes=tuple(args.spacing_nfes), seed=args.seed, batch=args.batch,
                              channels_last=args.channels_last)
    print(f"wrote {args.out}; FID / share classified with confidence >= 0.9 / ms per image:")
    print(frontier_table(result), end="")


def cmd_export(args):
    export_module()
    print("wrote DDPM.py from the exported cells of DDPM.ipynb")


def cmd_export_weights(args):
    step = export_weights(args.run_dir, args.out)
    print(f"wrote the EMA weights of {args.run_dir} (step {step}) to {args.out}")


def main(argv=None):
    """Run one command; errors the user can fix end in one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"experiment.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only folder: the last good checkpoint is intact
        where = f" {e.filename}" if e.filename else ""
        print(f"experiment.py: error: could not write{where}: {e.strerror or e}. Files written before are "
              f"intact: free space (or fix the folder), then run the same command, or `resume`, again",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except NonFiniteLoss as e:
        print(f"experiment.py: error: {e}", file=sys.stderr)
        return 1
    return 0


def _run_training(cfg, progress=True):
    rank, world, _ = dist_info()
    if world > 1:
        backend = "nccl" if pick_device(cfg.device).type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend)
    try:
        exp = Experiment(cfg)
        result = exp.run(progress=progress)
        if exp.is_main:
            print(f"outputs in {exp.out}/: samples_final.png, reverse_process.gif, loss_curve.png, "
                  f"metrics.jsonl, eval.json, checkpoint.pt")
            print(json.dumps(result, indent=2))
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
