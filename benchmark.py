"""Speed benchmark: our DDPM.Unet against its peers at a matched parameter count.

The peers (PEERS below) are diffusers' UNet2DModel and denoising-diffusion-pytorch's Unet
(lucidrains), each at the constructor arguments whose parameter count is nearest ours at the
default experiment config. denoising-diffusion-pytorch is optional: where it cannot be imported,
its peer is skipped with a note.

One run on one machine measures, for every network at 28x28x1 and batch 64:

  * training throughput (images/s, median over repeated steps after warm-up) per precision
    setting (float32, bfloat16 autocast where supported, optionally channels_last and torch.compile);
  * peak memory of the training steps (CUDA: max_memory_allocated; CPU: peak RSS of a fresh
    subprocess above its RSS once the model and optimizer exist);
  * training FLOPs per image (torch.utils.flop_counter, forward + backward), the FLOP/s this
    achieves, and its fraction of the machine's matrix-multiply ceiling measured in the same run;
  * sampling: one denoising forward pass on 64 images, and a 50-step DDIM run of 64 images (the
    median of --ddim-reps runs); with --channels-last, both layouts in one process, timed in turn.

Ours is timed through the real training path, `experiment.Experiment.train_step` (fused AdamW,
gradient clipping, LR schedule and EMA update, exactly as `experiment.py train` runs it).
Each peer is timed twice: as its documentation shows it (default AdamW, `unet(x, t)`, MSE against
the noise), and "matched": with the same fused AdamW, clipping, LR schedule and EMA update as ours.
Every peer adds noise with diffusers' DDPMScheduler and samples with its DDIMScheduler, so that
the peers differ only in the network.

    python benchmark.py                  # the full benchmark (a few minutes on 2 CPU cores)
    python benchmark.py --quick          # smoke test: very few steps
    python benchmark.py --compile        # also torch.compile our U-Net (slow to compile on a CPU)
    python benchmark.py --channels-last  # also the channels_last variants
    python benchmark.py --threads 1      # steadier numbers when other processes share the CPUs
    python benchmark.py --precision float32  # one precision only (default: bfloat16 too, where native)
    python benchmark.py --loss-curves 400  # do the fast settings train the same? (float32, bfloat16, +channels_last)
    python benchmark.py --image-shapes     # our step at 1x28x28 against 3x32x32 (your own colour images)

On a CPU, every worker also records the CPU seconds it consumed, so that a run on a busy machine
still gives a rough comparison (img/CPU-s); the wall-clock numbers of a quiet machine are the real
result. The JSON records the load average at the start and end of the run.

Results are printed as tables and written as JSON (--out, default benchmark_results.json).
Each training measurement runs in its own subprocess (`benchmark.py --worker SPEC`), so that the
memory numbers of one model cannot leak into another's.
"""

import argparse
import datetime
import gc
import importlib.metadata
import inspect
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import experiment

REPO_DIR = Path(__file__).resolve().parent
RESULT_TAG = "@@BENCHMARK_RESULT "
# (channels, height, width) of the default config's dataset, which experiment.build_diffusion's
# U-Net is built for. Everything below that needs an image size takes it from here.
IMAGE_SHAPE = experiment.data.IMAGE_SHAPE[experiment.Config().dataset]

# Our U-Net is measured twice: at the experiment's default config ("ours", which the peers are
# matched to and the targets judge) and at DDPM.Unet's own constructor defaults ("ours-unet-defaults":
# the config's dim, with the constructor's depth and attention width), the network a user of
# `import DDPM` gets from `Unet(dim=32)`.
OURS_AT_UNET_DEFAULTS = "ours-unet-defaults"
OUR_MODELS = ("ours", OURS_AT_UNET_DEFAULTS)


def our_config(model):
    """experiment.Config of one of OUR_MODELS."""
    cfg = experiment.Config()
    if model == OURS_AT_UNET_DEFAULTS:
        params = inspect.signature(experiment.DDPM.Unet).parameters
        cfg = cfg.replace(**{f: params[f].default for f in ("dim_mults", "resnet_blocks", "attn_dim_head")})
    return cfg


BUSY_SHARE = 0.10  # other processes' share of the CPUs above which a CPU run counts as contended

# Targets the project aims for (reported as measured against them, never adjusted).
TARGETS = {
    "train_speedup_vs_diffusers": 3.0,         # our best img/s / diffusers' best img/s
    "train_speedup_vs_lucidrains": 1.5,        # ... / denoising-diffusion-pytorch's best img/s
    "train_fraction_of_matmul_ceiling": 0.25,  # our best training step, at its precision
    "ddim_64x50_seconds": 3.0,                 # 64 images, 50 DDIM steps (50 network evaluations)
}
# The setting the DDIM target is stated for (also the defaults of --batch and --ddim-steps): the
# target is only judged at exactly this setting.
DDIM_TARGET_BATCH, DDIM_TARGET_STEPS = 64, 50


# ================================================================================================
# Small helpers
# ================================================================================================

def sync(device):
    """Wait for the device's queued work, so that a timer around it measures the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":  # experiment.pick_device("auto") picks Apple MPS where present
        torch.mps.synchronize()


def timed(fn, device):
    """(wall seconds, CPU seconds of this process, all threads) of one call of fn."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def repeat_timed(fn, device, warmup, reps):
    """Wall times of the warm-up calls, then wall and CPU times of the timed calls."""
    warm = [timed(fn, device)[0] for _ in range(warmup)]
    walls, cpus = zip(*(timed(fn, device) for _ in range(reps)))
    return warm, list(walls), list(cpus)


def count_params(module):
    return sum(p.numel() for p in module.parameters())


def _proc_status_kib(field):
    """A field of /proc/self/status in KiB (VmRSS, VmHWM), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of a code region above the memory held when it starts.

    CUDA: torch.cuda.max_memory_allocated (tensors only, not the caching allocator's slack).
    CPU: the process's peak resident set (VmHWM), reset at the start by writing 5 to
    /proc/self/clear_refs, minus the resident set at the start (includes everything the process
    touches: tensors, allocator slack, oneDNN scratch and kernel caches).
    """

    def __init__(self, device):
        self.device = device

    def start(self):
        gc.collect()
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda max_memory_allocated - memory_allocated at start"
            return
        self.base = _proc_status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.method = "peak RSS (VmHWM, reset at start) - RSS at start, in a fresh subprocess"
        except OSError:
            self.method = "peak RSS since process start (VmHWM, could not reset) - RSS at start"
        if self.base is None:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS
            scale = 1 if sys.platform.startswith("linux") else 1 / 1024
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
            self.method = "ru_maxrss after - ru_maxrss before (process-wide peak)"

    def peak_mib(self):
        if self.device.type == "cuda":
            sync(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        peak = _proc_status_kib("VmHWM")
        if peak is None:
            scale = 1 if sys.platform.startswith("linux") else 1 / 1024
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        return (peak - self.base) / 1024


class OtherLoad:
    """CPU time that other processes used while a stretch of this benchmark ran.

    All CPUs' busy time from /proc/stat (steal included: a hypervisor taking the CPU slows us
    just the same), minus the CPU time of this process and its finished subprocesses; as a share
    of wall time x CPUs. None off Linux. Unlike the load average, this is not inflated by the
    benchmark's own earlier work.
    """

    def __init__(self):
        self.start = self._snapshot()

    @staticmethod
    def _snapshot():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = sum(fields[:8]) - fields[3] - fields[4]  # user..steal, minus idle and iowait
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system
        return busy / os.sysconf("SC_CLK_TCK"), own, time.perf_counter()

    def share(self):
        end = self._snapshot()
        if self.start is None or end is None:
            return None
        (b0, o0, w0), (b1, o1, w1) = self.start, end
        if w1 <= w0:
            return None
        return max(0.0, (b1 - b0) - (o1 - o0)) / ((w1 - w0) * (os.cpu_count() or 1))


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))
    except OSError:
        pass
    return []


# Environment variables that cap the instructions oneDNN (convolutions) and MKL (float32 torch.mm) use,
# so that one machine can stand in for an older one (AVX2 only, say): the CPU flags then overstate it.
ISA_LIMIT_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def isa_limits():
    """The instruction-set caps set in the environment ({variable: value}; empty when none is)."""
    return {name: os.environ[name] for name in ISA_LIMIT_VARIABLES if name in os.environ}


def import_diffusers():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import diffusers  # noqa: F401
        except ImportError:
            raise SystemExit("benchmark.py: error: diffusers is not installed: "
                             "pip install -r requirements-benchmark.txt") from None
        from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
    return UNet2DModel, DDPMScheduler, DDIMScheduler


# ================================================================================================
# The models: ours, and the peers it is compared with
# ================================================================================================

class Peer:
    """Another library's U-Net that ours is compared with, at a matched parameter count.

    A subclass says only how to build its network and how to call it; matching the parameter
    count, the training step, the FLOP count and sampling are the same code for every peer.
    Noise is added with diffusers' DDPMScheduler and DDIM sampling uses its DDIMScheduler for
    every peer (diffusers is required anyway), so that the peers differ only in the network.
    """

    name = package = None  # label in the results; the distribution name (pip, importlib.metadata)
    required = False  # a required peer's absence stops the run; another's only skips that peer

    def version(self):
        try:
            return importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            return None

    def unavailable(self):
        """None if the peer's network can be built here, else why not (one line)."""
        try:
            self.unet_class()
        except Exception as e:  # a missing package, or one of its imports failing
            return f"{type(e).__name__}: {e}"
        return None

    def unet_class(self):
        raise NotImplementedError

    def config(self, **knobs):
        """The constructor's keyword arguments for the knobs of one candidate."""
        raise NotImplementedError

    def candidates(self):
        """The knobs of the candidate configs that the parameter matching chooses from."""
        raise NotImplementedError

    def describe(self, config):
        raise NotImplementedError

    def forward(self, net, x, t):
        """The predicted noise; t is a tensor of timesteps, one per image or one for all."""
        raise NotImplementedError


class DiffusersPeer(Peer):
    """diffusers' UNet2DModel, in the spirit of our U-Net: three levels (28, 14, 7), channels
    (w, 2w, 2w), self-attention at 14x14 and in the middle block (at 7x7). Widths are multiples
    of 32, diffusers' default GroupNorm group count. At the default experiment config the match is
    block_out_channels (32, 64, 64) with 2 layers per block: 1.62 M parameters against our 1.76 M."""

    name, package, required = "diffusers", "diffusers", True

    def unet_class(self):
        return import_diffusers()[0]

    def config(self, width, layers_per_block):
        channels, size, _ = IMAGE_SHAPE
        return dict(
            sample_size=size, in_channels=channels, out_channels=channels,
            block_out_channels=(width, 2 * width, 2 * width),
            layers_per_block=layers_per_block,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        )

    def candidates(self):
        return [dict(width=w, layers_per_block=lpb) for w in (32, 64, 96) for lpb in (1, 2, 3)]

    def describe(self, config):
        return (f"block_out_channels={tuple(config['block_out_channels'])}, "
                f"layers_per_block={config['layers_per_block']}, attention at 14x14 and in the 7x7 middle block")

    def forward(self, net, x, t):
        return net(x, t).sample


class LucidrainsPeer(Peer):
    """denoising-diffusion-pytorch's Unet (lucidrains), the design ours follows closely: per level two
    ResNet blocks (ours: resnet_blocks, default 1) and a linear attention, full attention at the
    innermost level and in the middle. Its depth is fixed, so the match varies the width: dim and
    dim_mults with multiples of 8 channels (oneDNN and tensor cores work in blocks of 8 or 16
    channels), and attn_dim_head with our 4 heads. At the default experiment config the match is
    dim=32, dim_mults=(1, 2, 3), attn_heads=4, attn_dim_head=16, channels=1 (channels 32/64/96 at
    28/14/7): 1,822,817 parameters against our 1,755,681 (ours/theirs 0.963); our own widths,
    dim_mults (1, 2, 4), would give 2,481,217 (0.708). Counted with denoising-diffusion-pytorch 2.3.4.

    flash_attn=False: its full attention (at 7x7, 49 tokens, where the method hardly matters) then
    runs as einsum matmuls everywhere; with flash_attn=True on a CUDA GPU newer than the A100 it
    allows only the flash kernel, which has no float32. channels_last works (einops reshapes)."""

    name, package = "lucidrains", "denoising-diffusion-pytorch"

    def unet_class(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The package's __init__ imports all its modules (accelerate, scipy, ema-pytorch ...)
            # even for a submodule's import, so the top level costs nothing more.
            from denoising_diffusion_pytorch import Unet
        return Unet

    def config(self, dim, dim_mults, attn_dim_head):
        return dict(dim=dim, dim_mults=tuple(dim_mults), channels=IMAGE_SHAPE[0], attn_heads=4,
                    attn_dim_head=attn_dim_head, flash_attn=False)

    def candidates(self):
        return [dict(dim=d, dim_mults=m, attn_dim_head=h)
                for d in (24, 32) for m in ((1, 2, 3), (1, 2, 4)) for h in (16, 32)]

    def describe(self, config):
        return (f"dim={config['dim']}, dim_mults={tuple(config['dim_mults'])}, "
                f"{config['attn_heads']} heads x {config['attn_dim_head']}, flash_attn={config['flash_attn']}")

    def forward(self, net, x, t):
        if t.dim() == 0:  # a DDIM step's one timestep: its time embedding wants one per image
            t = t.to(x.device).expand(x.shape[0])
        return net(x, t)


PEERS = {peer.name: peer for peer in (DiffusersPeer(), LucidrainsPeer())}


def peer_labels(peers):
    """The training labels of the peers: each as documented, then matched."""
    return [label for p in peers for label in (p, f"{p}-matched")]


def available_peers():
    """(names of the peers to measure, {skipped peer: why}). An optional peer whose package cannot
    be imported is skipped with a printed note; a required one is left in, to fail with its error."""
    peers, skipped = [], {}
    for name, peer in PEERS.items():
        why = None if peer.required else peer.unavailable()
        if why:
            skipped[name] = why
            print(f"note: {peer.package} cannot be imported ({why[:160]}): the {name} peer is skipped "
                  f"(pip install -r requirements-benchmark.txt)")
        else:
            peers.append(name)
    return peers, skipped


def match_peer_config(peer, our_params):
    """(config, candidates): the candidate config whose parameter count is nearest ours (in log
    ratio). Models are built on the meta device, so the search allocates nothing."""
    unet_class, candidates = peer.unet_class(), []
    for knobs in peer.candidates():
        with torch.device("meta"):
            n = count_params(unet_class(**peer.config(**knobs)))
        candidates.append(dict(knobs, params=n, ours_over_theirs=our_params / n))
    best = min(candidates, key=lambda c: abs(math.log(c["ours_over_theirs"])))
    if not 0.85 <= best["ours_over_theirs"] <= 1.15:
        raise SystemExit(f"benchmark.py: error: no {peer.name} config within 15% of our {our_params} "
                         f"parameters: {candidates}")
    knobs = {k: v for k, v in best.items() if k not in ("params", "ours_over_theirs")}
    return peer.config(**knobs), candidates


# ================================================================================================
# Worker: one measurement in a fresh process
# ================================================================================================

def _random_batch(batch):
    """A uint8 batch as the data loader yields it (on the CPU; the step moves it to the device)."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, *IMAGE_SHAPE), dtype=torch.uint8, generator=g)


def build_our_experiment(model, spec, device):
    """experiment.Experiment at `model`'s config (one of OUR_MODELS) with spec's batch, precision and
    layout, built exactly as `experiment.py train` builds it (with compile: compiled here, by a trial step)."""
    if spec.get("compile"):
        from torch._dynamo.utils import counters
        counters.clear()  # inductor counts each graph it compiles but will not replay as a CUDA graph
    cfg = our_config(model).replace(
        device=device.type, batch_size=spec["batch"], precision=spec["precision"],
        channels_last="on" if spec.get("channels_last") else "off", compile=spec.get("compile", False),
        out_dir=str(Path(tempfile.gettempdir()) / "ddpm-benchmark-unused"))
    # A run of the config's default length: the schedule's length sets the learning rate, not a step's cost.
    return experiment.Experiment(cfg).build(cfg.steps)


def build_peer(spec, device):
    """The network of spec["model"], a peer, at spec["peer_config"]; and the peer."""
    peer = PEERS[spec["model"]]
    return peer.unet_class()(**spec["peer_config"]).to(device), peer


def build_peer_training(spec, device):
    """A peer's network (spec["model"]) and a training step.

    matched=False: the documented usage (add_noise, the network's noise prediction, MSE, default AdamW).
    matched=True: the same step with our training loop's extras: fused AdamW with our betas,
    gradient clipping, LambdaLR schedule and the EMA update, from experiment.py.
    """
    _, DDPMScheduler, _ = import_diffusers()
    cfg = experiment.Config()
    torch.manual_seed(cfg.seed)
    unet, peer = build_peer(spec, device)
    channels_last = spec.get("channels_last", False)
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    noise_scheduler = DDPMScheduler(num_train_timesteps=cfg.timesteps)
    matched = spec["matched"]
    if matched:
        opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                betas=(0.9, 0.99), fused=device.type in ("cuda", "cpu"))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, experiment.lr_lambda(cfg, cfg.steps))
        ema = torch.optim.swa_utils.AveragedModel(unet, avg_fn=experiment.ema_avg_fn(cfg.ema_decay),
                                                  use_buffers=True)
    else:
        opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr)
    precision, B = spec["precision"], spec["batch"]

    def step(batch_u8):
        clean = batch_u8.to(device, non_blocking=True).float().div_(255).mul_(2).sub_(1)
        if channels_last:
            clean = clean.contiguous(memory_format=torch.channels_last)
        noise = torch.randn_like(clean)
        t = torch.randint(0, cfg.timesteps, (B,), device=device)
        noisy = noise_scheduler.add_noise(clean, noise, t)
        with experiment.autocast(device, precision):
            pred = peer.forward(unet, noisy, t)
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        if matched and cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if matched:
            sched.step()
            ema.update_parameters(unet)
        return loss.detach()

    return unet, step


def worker_train(spec, device):
    batch_u8 = _random_batch(spec["batch"])
    if spec["model"] in OUR_MODELS:
        exp = build_our_experiment(spec["model"], spec, device)
        params = count_params(exp.diffusion.model)
        step = exp.train_step
    else:
        unet, step = build_peer_training(spec, device)
        params = count_params(unet)
    mem = PeakMemory(device)
    mem.start()
    losses = []
    warm, times, cpus = repeat_timed(lambda: losses.append(step(batch_u8)), device, spec["warmup"],
                                     spec["steps"])
    peak = mem.peak_mib()
    median, median_cpu = statistics.median(times), statistics.median(cpus)
    out = dict(params=params, warmup_step_s=warm, step_s=times, median_step_s=median,
               img_per_s=spec["batch"] / median, img_per_s_fastest_step=spec["batch"] / min(times),
               step_cpu_s=cpus, median_step_cpu_s=median_cpu,
               img_per_cpu_s=spec["batch"] / median_cpu if median_cpu > 0 else None,
               peak_mem_mib=peak, mem_method=mem.method,
               final_loss=float(losses[-1]), threads=torch.get_num_threads())
    if spec.get("compile") and warm:
        out["first_step_s"] = warm[0]
        out["compile_time_s_est"] = warm[0] - median  # first step minus a steady-state step
        out.update(compile_outcome(exp))
    return out


def compile_outcome(exp):
    """As it happened, for a step built with compile: whether it runs compiled (torch.compile may have
    fallen back to eager) and how many graphs inductor did not replay as CUDA graphs (counted since
    `build_our_experiment` cleared the count, before compiling)."""
    from torch._dynamo.utils import counters
    return dict(compiled=exp.train_module is not exp.diffusion, cudagraph_skips=counters["inductor"]["cudagraph_skips"])


def worker_paired(spec, device):
    """Ours and every peer (idiomatic and matched) in one process, their steps interleaved.

    Each round times one step of every model, in an order that rotates from round to round, so
    that other processes on the machine slow all of them alike: the per-round ratios stay
    meaningful on a busy machine where separate runs are not comparable. No memory numbers here.
    With spec["also_channels_last"], our step in channels_last joins the rounds, and
    `channels_last_speedup` is its gain over ours in the default layout (the training rows, timed in
    separate subprocesses minutes apart, can drift more than that gain: on two AMD EPYC Zen 3
    cores on 2026-11-28 they showed channels_last 15% slower, and steps interleaved in one process
    7% and 14% faster).
    """
    batch_u8 = _random_batch(spec["batch"])
    steps = {"ours": build_our_experiment("ours", spec, device).train_step}
    if spec.get("also_channels_last"):
        steps[OURS_CHANNELS_LAST] = build_our_experiment("ours", dict(spec, channels_last=True), device).train_step
    for peer, peer_config in spec["peer_configs"].items():
        for label, matched in zip(peer_labels([peer]), (False, True)):
            steps[label] = build_peer_training(dict(spec, model=peer, peer_config=peer_config, matched=matched),
                                               device)[1]
    names = list(steps)
    for name in names:
        for _ in range(spec["warmup"]):
            steps[name](batch_u8)
    times = {name: [] for name in names}
    for i in range(spec["steps"]):
        for name in in_round_order(names, i):
            times[name].append(timed(lambda: steps[name](batch_u8), device)[0])
    out = dict(step_s=times, img_per_s={n: spec["batch"] / statistics.median(t) for n, t in times.items()},
               ours_over={})

    def speedup(fast, slow):  # of `fast` over `slow`: per round, and of the medians
        per_round = [t_slow / t_fast for t_fast, t_slow in zip(times[fast], times[slow])]
        return dict(median_of_round_ratios=statistics.median(per_round),
                    ratio_of_medians=out["img_per_s"][fast] / out["img_per_s"][slow])

    for other in names[1:]:
        if other != OURS_CHANNELS_LAST:
            out["ours_over"][other] = speedup("ours", other)
    if OURS_CHANNELS_LAST in times:
        out["channels_last_speedup"] = speedup(OURS_CHANNELS_LAST, "ours")
    return out


def in_round_order(names, round_index):
    """`names` rotated by the round's index: over the rounds, each name is timed in every position."""
    shift = round_index % len(names)
    return names[shift:] + names[:shift]


# the paired comparison's name for our step in channels_last (`worker_paired`)
OURS_CHANNELS_LAST = "ours+CL"


def paired_summary(res):
    """One paired result as a line: our step's speedups, median of the per-round ratios."""
    parts = [f"ours/{k} {v['median_of_round_ratios']:.2f}x" for k, v in res["ours_over"].items()]
    if "channels_last_speedup" in res:
        parts.append(f"{OURS_CHANNELS_LAST}/ours {res['channels_last_speedup']['median_of_round_ratios']:.2f}x")
    return ", ".join(parts)


def worker_sample(spec, device):
    """Per precision: one denoising forward pass on a batch, and full DDIM runs (their median); with
    spec["channels_last"], a second copy of the network in channels_last, timed in turn with the
    first (pass by pass and run by run, in alternating order) so that the host's drift over the
    minutes of a run slows both layouts alike."""
    B, reps, ddim_steps, ddim_reps = spec["batch"], spec["reps"], spec["ddim_steps"], spec["ddim_reps"]
    layouts = [False, True] if spec.get("channels_last") else [False]
    graphed = []  # per DDIM run of ours: whether its network replayed CUDA graphs
    samplers = {}
    for channels_last in layouts:
        torch.manual_seed(0)  # the same weights in both layouts
        net, forward, ddim = build_sampler(spec, device, channels_last, graphed)
        samplers[channels_last] = forward, ddim
    results = dict(params=count_params(net))

    def in_turn(rounds, call):
        """{layout: [(wall s, CPU s) per round]}, the layouts' order alternating from round to round."""
        out = {layout: [] for layout in layouts}
        for r in range(rounds):
            for layout in in_round_order(layouts, r):
                out[layout].append(timed(lambda: call(layout), device))
        return out

    for precision in spec["precisions"]:
        torch.manual_seed(0)
        x = torch.randn(B, *IMAGE_SHAPE, device=device)
        t = torch.randint(0, experiment.Config().timesteps, (B,), device=device)
        with torch.inference_mode(), experiment.autocast(device, precision):
            # warm-up: oneDNN / cuDNN kernel selection (a GPU's graphs are recorded in every DDIM run)
            in_turn(2, lambda layout: samplers[layout][0](x, t))
            in_turn(1, lambda layout: samplers[layout][1](2))
            passes = in_turn(reps, lambda layout: samplers[layout][0](x, t))
            runs = in_turn(ddim_reps, lambda layout: samplers[layout][1](ddim_steps))
        for layout in layouts:
            fwd, fwd_cpu = map(list, zip(*passes[layout]))
            ddim_runs, ddim_cpu = map(list, zip(*runs[layout]))
            med = statistics.median(fwd)
            results.setdefault(SAMPLING_LAYOUT_KEYS[layout], {})[precision] = dict(
                forward_s=fwd, forward_median_s=med, forward_img_per_s=B / med,
                forward_median_cpu_s=statistics.median(fwd_cpu), ddim_steps=ddim_steps, ddim_runs_s=ddim_runs,
                ddim_s=statistics.median(ddim_runs), ddim_cpu_s=statistics.median(ddim_cpu))
    results["cuda_graphs"] = bool(graphed) and all(graphed)  # as it happened, not as intended
    return results


def build_sampler(spec, device, channels_last, graphed):
    """spec["model"]'s network in inference mode, in one memory layout: (network, forward(x, t),
    ddim(steps) -> images). Each DDIM run of ours appends to `graphed` whether it replayed CUDA graphs."""
    cfg = experiment.Config()
    if spec["model"] == "ours":
        diffusion = experiment.build_diffusion(cfg).to(device).eval()
        net = diffusion.model
        if channels_last:
            experiment.use_channels_last(net)

        def ddim(steps):  # as Experiment.sample draws: on a GPU through CUDA graphs, recorded in each run
            with experiment.graphed_sampling(diffusion) as network:
                images = diffusion.sample(spec["batch"], sampling_steps=steps, progress=False)
            graphed.append(network is not None and network.replays())
            return images

        return net, net, ddim
    _, _, DDIMScheduler = import_diffusers()
    net, peer = build_peer(spec, device)
    net.eval()
    if channels_last:
        net.to(memory_format=torch.channels_last)  # as its training rows do; the input has 1 channel
    # diffusers' default betas are linear from 1e-4 to 0.02, as our default "linear" schedule
    scheduler = DDIMScheduler(num_train_timesteps=cfg.timesteps)

    def forward(x, t):
        return peer.forward(net, x, t)

    def ddim(steps):
        scheduler.set_timesteps(steps)
        x = torch.randn(spec["batch"], *IMAGE_SHAPE, device=device)
        for t in scheduler.timesteps:
            x = scheduler.step(forward(x, t), t, x).prev_sample
        return (x + 1) / 2

    return net, forward, ddim


# where a sampling result keeps its measurements in each layout: {precision: measurements}
SAMPLING_LAYOUT_KEYS = {False: "precisions", True: "channels_last"}


def sampling_settings(result):
    """{setting name: measurements} of one model's sampling result, over both layouts."""
    return {setting_name(precision, channels_last): v for channels_last, key in SAMPLING_LAYOUT_KEYS.items()
            for precision, v in result.get(key, {}).items()}


def worker_profile(spec, device):
    """torch.profiler over a few of our training steps: the ops with the most self CPU time."""
    from torch.profiler import ProfilerActivity, profile
    exp = build_our_experiment(spec["model"], spec, device)
    batch_u8 = _random_batch(spec["batch"])
    for _ in range(spec["warmup"]):
        exp.train_step(batch_u8)
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    n = spec["steps"]
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(n):
            exp.train_step(batch_u8)
        sync(device)
    wall = (time.perf_counter() - t0) / n
    events = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in events)
    categories = {}
    for e in events:
        cat = op_category(e.key)
        categories[cat] = categories.get(cat, 0.0) + e.self_cpu_time_total / n / 1e3
    rows = []
    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:spec.get("top", 15)]:
        row = dict(op=e.key, calls_per_step=e.count / n, self_cpu_ms_per_step=e.self_cpu_time_total / n / 1e3,
                   self_cpu_share=e.self_cpu_time_total / total_self if total_self else None,
                   cpu_total_ms_per_step=e.cpu_time_total / n / 1e3)
        if device.type == "cuda":
            dev_us = getattr(e, "self_device_time_total", None)
            if dev_us is None:
                dev_us = getattr(e, "self_cuda_time_total", 0)
            row["self_cuda_ms_per_step"] = dev_us / n / 1e3
        rows.append(row)
    categories = dict(sorted(categories.items(), key=lambda kv: -kv[1]))
    return dict(precision=spec["precision"], batch=spec["batch"], profiled_steps=n,
                step_s_under_profiler=wall, total_self_cpu_ms_per_step=total_self / n / 1e3, top_ops=rows,
                self_cpu_ms_per_step_by_category=categories, threads=torch.get_num_threads())


def op_category(name):
    """A coarse class of a profiler op name, to see where a training step's time goes."""
    n = name.lower()
    if any(k in n for k in ("adam", "_foreach", "clip_grad", "lerp")):
        return "optimizer, clipping, EMA"
    if "conv" in n:
        return "convolution (fwd + bwd)"
    if any(k in n for k in ("mm", "matmul", "linear", "scaled_dot_product", "attention")):
        return "matmul, linear, attention"
    if "norm" in n:
        return "normalization"
    if any(k in n for k in ("copy", "_to_", "aten::to", "clone", "contiguous", "cat", "stack",
                            "pixel", "upsample", "interpolate")):
        return "copies, casts, cat, resampling"
    if any(k in n for k in ("mul", "add", "sub", "div", "silu", "gelu", "sigmoid", "softmax", "exp",
                            "pow", "sqrt", "sin", "cos", "neg", "where", "fill", "zero", "sum", "mean",
                            "mse", "addcmul", "threshold")):
        return "elementwise, reductions"
    return "other (views, autograd bookkeeping, ...)"


# How long the copies of `worker_concurrent` train together, in seconds of wall time (--quick: less),
# and how long a copy waits for the others to finish warming up (compiling, where asked) before it gives up.
CONCURRENT_WINDOW_S = dict(full=15.0, quick=2.0)
CONCURRENT_BARRIER_TIMEOUT_S = 600


def worker_concurrent(spec, device):
    """spec["processes"] copies of our training step at once, each in its own process (as
    `ExperimentManager.run(parallel=...)` trains runs), timed over one shared window of wall time that
    opens once every copy has warmed up: their total throughput. On a GPU the processes time-slice
    the card; eager steps, launch-bound, leave it idle enough that several processes together went
    faster than one. Each copy builds the step that `experiment.py train` builds (with --compile,
    compiled, on a GPU as CUDA graphs), with its share of the threads as ExperimentManager gives it."""
    # as ExperimentManager shares out the threads (unless --threads sets each copy's)
    threads = spec["threads"] or experiment.threads_per_process(spec["processes"])
    with tempfile.TemporaryDirectory() as barrier:
        procs = [start_worker(dict(spec, kind="train_window", threads=threads, barrier=barrier, rank=rank,
                                   parent=os.getpid()))
                 for rank in range(spec["processes"])]
        # each copy: its warm-up (a compile, where asked) within the barrier's wait, then the window
        copies = [worker_result(proc, CONCURRENT_BARRIER_TIMEOUT_S + 300) for proc in procs]
    failed = [c for c in copies if "error" in c]
    if failed:
        return failed[0]
    return dict(processes=spec["processes"], threads_each=threads, img_per_s=sum(c["img_per_s"] for c in copies),
                copies=copies)


def worker_train_window(spec, device):
    """One copy of `worker_concurrent`: warm up, wait for the other copies, then train for the window."""
    exp = build_our_experiment("ours", spec, device)
    batch_u8 = _random_batch(spec["batch"])
    for _ in range(spec["warmup"]):
        exp.train_step(batch_u8)
    sync(device)
    barrier = Path(spec["barrier"])
    (barrier / f"{spec['rank']}.ready").touch()
    deadline = time.monotonic() + CONCURRENT_BARRIER_TIMEOUT_S
    while len(list(barrier.glob("*.ready"))) < spec["processes"]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the other copies were not ready after {CONCURRENT_BARRIER_TIMEOUT_S} s")
        if os.getppid() != spec["parent"]:  # the measurement was given up (--worker-timeout): no orphans
            raise RuntimeError("the process that started this copy has ended")
        time.sleep(0.01)
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < spec["window_s"]:
        exp.train_step(batch_u8)  # on a GPU, queued: the sync below waits for every step counted
        steps += 1
    sync(device)
    elapsed = time.perf_counter() - t0
    return dict(steps=steps, elapsed_s=elapsed, img_per_s=steps * spec["batch"] / elapsed,
                **(compile_outcome(exp) if spec.get("compile") else {}))


WORKERS = {"train": worker_train, "paired": worker_paired, "sample": worker_sample, "profile": worker_profile,
           "concurrent": worker_concurrent, "train_window": worker_train_window}


def worker_main(spec_json):
    spec = json.loads(spec_json)
    warnings.filterwarnings("ignore")
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = WORKERS[spec["kind"]](spec, device)
    result["loadavg_1min_at_worker_start"] = load
    print(RESULT_TAG + json.dumps(result), flush=True)


def start_worker(spec):
    """A fresh Python process that runs one measurement (`worker_main`); see `worker_result`. Its
    output goes to files, not pipes: a worker that fills a pipe nobody reads yet would stall, and
    `worker_concurrent` reads its copies one after the other."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    stdout, stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, cwd=str(REPO_DIR), stdout=stdout, stderr=stderr, text=True)
    proc.output_files = stdout, stderr
    return proc


def _read_and_close(file):
    with file:
        file.seek(0)
        return file.read()


def worker_result(proc, timeout):
    """The result dict of a started worker, or {'error': ...}; a worker still running after `timeout`
    seconds is killed."""
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        timed_out = True
    stdout, stderr = (_read_and_close(f) for f in proc.output_files)
    if timed_out:
        return dict(error=f"timed out after {timeout} s")
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (stderr or stdout).strip().splitlines()[-15:]
    return dict(error=f"worker exited with status {proc.returncode}", stderr_tail=tail)


def run_worker(spec, timeout=900):
    """Run one measurement in a fresh Python process; returns its result dict or {'error': ...}."""
    t0, others = time.perf_counter(), OtherLoad()
    result = worker_result(start_worker(spec), timeout)
    if "error" not in result:
        result["worker_wall_s"] = time.perf_counter() - t0
        result["other_processes_cpu_share"] = others.share()
    return result


# ================================================================================================
# Measurements in the main process
# ================================================================================================

def matmul_ceiling(device, dtypes, n, reps=10, warmup=3):
    """Achieved FLOP/s of torch.mm on n x n matrices: the practical matrix-multiply ceiling."""
    out = {}
    for name in dtypes:
        dtype = getattr(torch, name)
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, device=device, generator=g).to(dtype)
        b = torch.randn(n, n, device=device, generator=g).to(dtype)
        _, times, cpus = repeat_timed(lambda: torch.mm(a, b), device, warmup, reps)
        med, med_cpu = statistics.median(times), statistics.median(cpus)
        out[name] = dict(n=n, reps=reps, median_s=med, flop=2 * n**3, tflop_per_s=2 * n**3 / med / 1e12,
                         best_tflop_per_s=2 * n**3 / min(times) / 1e12, median_cpu_s=med_cpu,
                         tflop_per_cpu_s=2 * n**3 / med_cpu / 1e12 if med_cpu > 0 else None)
        if device.type == "cpu" and name == "float32":
            out[name]["onednn_fp32_gemm"] = onednn_fp32_gemm(a, b, warmup, reps)
    return out


def onednn_fp32_gemm(a, b, warmup, reps):
    """float32 GEMM through oneDNN (the library behind CPU convolutions), for reference.

    On a CPU, float32 torch.mm goes to MKL, which on some CPUs (AMD) takes a slower code path
    than oneDNN's convolutions do; bfloat16 torch.mm already goes through oneDNN. If the two
    float32 numbers differ much, the torch.mm ceiling understates what the convolutions can reach.
    """
    try:
        am, bm = a.to_mkldnn(), b.t().contiguous().to_mkldnn()
        _, times, _ = repeat_timed(lambda: torch.ops.aten.mkldnn_linear(am, bm), a.device, warmup, reps)
    except Exception as e:  # an internal op: absent from some builds
        return dict(error=f"{type(e).__name__}: {str(e)[:120]}")
    med = statistics.median(times)
    return dict(median_s=med, tflop_per_s=2 * a.shape[0] ** 3 / med / 1e12)


def training_flops(model_name, peer_config, device, batch):
    """(forward, backward) training FLOPs per image of one model, by experiment.count_training_flops.

    All losses are the plain noise-prediction MSE on the same images, timesteps and noise.
    """
    timesteps = experiment.Config().timesteps
    torch.manual_seed(0)
    x = torch.rand(batch, *IMAGE_SHAPE, device=device)
    t = torch.randint(0, timesteps, (batch,), device=device)
    noise = torch.randn_like(x)
    if model_name in OUR_MODELS:
        diffusion = experiment.build_diffusion(our_config(model_name)).to(device)

        def loss():
            return diffusion(x, t=t, noise=noise)
    else:
        _, DDPMScheduler, _ = import_diffusers()
        unet, peer = build_peer(dict(model=model_name, peer_config=peer_config), device)
        noisy = DDPMScheduler(num_train_timesteps=timesteps).add_noise(x * 2 - 1, noise, t)

        def loss():
            return F.mse_loss(peer.forward(unet, noisy, t), noise)
    return experiment.count_training_flops(loss, batch)


# ================================================================================================
# Phase 1: the command line
# ================================================================================================

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: as experiment.py picks it (CUDA, then Apple MPS, then the CPU)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per setting (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps before timing (default 3)")
    p.add_argument("--batch", type=int, default=DDIM_TARGET_BATCH, help="batch size (default %(default)s)")
    p.add_argument("--ddim-steps", type=int, default=DDIM_TARGET_STEPS,
                   help="DDIM sampling steps (default %(default)s)")
    p.add_argument("--forward-reps", type=int, default=10, help="timed single forward passes (default 10)")
    p.add_argument("--ddim-reps", type=int, default=3,
                   help="timed DDIM runs per setting, reported by their median (default 3)")
    p.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="auto (default): float32, and bfloat16 autocast where the hardware does it natively")
    p.add_argument("--channels-last", action="store_true", help="also measure the channels_last variants")
    p.add_argument("--compile", action="store_true",
                   help="also measure our U-Net under torch.compile (compile time + steady state)")
    p.add_argument("--paired-rounds", type=int, default=10,
                   help="rounds of the interleaved comparison (default 10; --quick: 2)")
    p.add_argument("--no-paired", action="store_true",
                   help="skip the interleaved ours-vs-peers comparison (robust on a busy machine)")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler breakdown of our step")
    p.add_argument("--concurrent", type=int, default=0, metavar="K",
                   help="also train K copies of our step at once, each in its own process (as parallel runs "
                        "train), against one alone: their total images/s over the same window (default 0: skip)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads in every measurement (default 0: torch's own default)")
    p.add_argument("--worker-timeout", type=int, default=900,
                   help="seconds before one measurement subprocess is given up (default 900)")
    p.add_argument("--quick", action="store_true", help="smoke test: very few steps everywhere")
    p.add_argument("--out", default="benchmark_results.json", help="JSON output (default benchmark_results.json)")
    p.add_argument("--loss-curves", type=int, metavar="STEPS",
                   help="instead of timing: train the default Fashion-MNIST run for STEPS steps in float32, "
                        "in bfloat16 and in bfloat16 with channels_last from the same seed and overlay their loss "
                        "curves (data/precision_loss_curves.png)")
    p.add_argument("--image-shapes", action="store_true",
                   help="instead of the full run: our training step at the default 1x28x28 and at 3x32x32 RGB, "
                        "steps interleaved, with the throughput ratio (data/image_shape_throughput.json)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def parse_args(argv=None):
    """The arguments, checked; --quick replaces the step counts by a smoke test's."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.loss_curves is not None and args.loss_curves < 1:
        p.error(f"--loss-curves must be >= 1, got {args.loss_curves}")
    if args.threads < 0:
        p.error("--threads must be >= 0")
    for name in ("steps", "batch", "ddim_steps", "ddim_reps", "forward_reps", "paired_rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.concurrent == 1 or args.concurrent < 0:
        p.error(f"--concurrent must be 0 (skip) or a number of processes >= 2, got {args.concurrent}")
    if args.quick:
        args.steps, args.warmup, args.ddim_steps, args.ddim_reps = 2, 1, 3, 1
        args.forward_reps, args.paired_rounds = 2, 2
    return args


# ================================================================================================
# Phase 2: facts about the machine, the models and the matrix-multiply ceiling
# ================================================================================================

def collect_machine_facts(args, device):
    """The run's `meta`: what ran where (CPU model and its matrix extensions, or the GPU), and how."""
    bf16 = experiment.bf16_supported(device)
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        device=str(device),
        device_name=experiment.device_name(device),
        cpu_model=experiment.cpu_model(), cpu_flags=cpu_flags(), isa_limits=isa_limits(), logical_cpus=os.cpu_count(),
        cpus_available=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        torch_threads=torch.get_num_threads(), platform=platform.platform(),
        python=platform.python_version(), torch=torch.__version__,
        **{peer.package.replace("-", "_"): peer.version() for peer in PEERS.values()},  # None: not installed
        bf16_supported=bf16, channels_last_default=experiment.channels_last_pays(device),  # Config's "auto"
        loadavg_1_5_15_at_start=os.getloadavg() if hasattr(os, "getloadavg") else None,
        note=("other_processes_cpu_share (whole run, and per measurement) is the share of all CPUs' time "
              "that other processes used meanwhile; busy_machine is true when it exceeds "
              f"{BUSY_SHARE:.0%}. Then the wall-clock throughputs are lower than on a quiet machine, on a "
              "CPU much lower (OpenMP threads that spin-wait at barriers lose their time slices), and "
              "the targets are not judged. The load averages are kept for reference."),
        settings=dict(threads=args.threads or "torch default", batch=args.batch, steps=args.steps,
                      warmup=args.warmup, ddim_steps=args.ddim_steps, ddim_reps=args.ddim_reps,
                      paired_rounds=args.paired_rounds,
                      forward_reps=args.forward_reps, quick=args.quick),
    )


def print_machine_facts(meta, device, threads):
    versions = ", ".join(f"{p.package} {meta[p.package.replace('-', '_')] or '(not installed)'}"
                         for p in PEERS.values())
    print(f"benchmark on {meta['device_name']} ({device}, {meta['torch_threads']} torch threads, "
          f"{meta['logical_cpus']} logical CPUs), torch {meta['torch']}, {versions}")
    if meta["isa_limits"]:
        caps = ", ".join(f"{k}={v}" for k, v in meta["isa_limits"].items())
        print(f"instruction sets capped by the environment: {caps}")
    load = meta["loadavg_1_5_15_at_start"]
    if not load:
        return
    cpus = os.cpu_count() or 1
    print(f"load average at start (1/5/15 min): {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"
          + ("  <- the machine may be busy (the load average lags by minutes)" if load[0] > 0.5 * cpus else ""))
    if load[0] >= cpus and device.type == "cpu" and threads == 0:
        print("warning: more runnable processes than CPUs. OpenMP threads that spin-wait at barriers "
              "then lose their time slices and a multi-threaded step can be many times slower than "
              "with one thread; --threads 1 gives steadier (still contended) numbers.")


def select_precisions(choice, bf16_supported):
    """The precisions to measure: --precision's, or for "auto" float32 and, where native, bfloat16."""
    if choice == "auto":
        return ["float32"] + (["bfloat16"] if bf16_supported else [])
    if choice == "bfloat16" and not bf16_supported:
        raise experiment.ConfigError("--precision bfloat16 is not allowed here: this device has no native "
                                     "bfloat16 (autocast would only measure a slow emulation)")
    return [choice]


def finish_machine_facts(meta, others, t_start, device):
    """Add to `meta` how busy the machine was during the run, and the run's wall time."""
    share = others.share()
    meta["other_processes_cpu_share"] = share
    meta["busy_machine"] = device.type == "cpu" and share is not None and share > BUSY_SHARE
    meta["loadavg_1_5_15_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    meta["wall_s"] = time.perf_counter() - t_start


def match_models():
    """`models` of the JSON (every model's parameter count and config) and {peer: its matched config}
    for the peers that can be measured here (a skipped one is noted in `models`)."""
    fields = ("dim", "dim_mults", "resnet_blocks", "attn_dim_head", "timesteps")
    models = {}
    for model in OUR_MODELS:
        cfg = our_config(model)
        models[model] = dict(params=count_params(experiment.build_diffusion(cfg).model),
                             config={k: cfg.to_dict()[k] for k in fields})
    our_params = models["ours"]["params"]
    _, skipped = available_peers()
    print(f"\nparameters: ours {our_params:,}; {OURS_AT_UNET_DEFAULTS} {models[OURS_AT_UNET_DEFAULTS]['params']:,} "
          f"(DDPM.Unet's own depth and attention width: not matched, not judged)")
    peer_configs = {}
    for name, peer in PEERS.items():
        if name in skipped:
            models[name] = dict(package=peer.package, skipped=skipped[name])
            continue
        peer_config, candidates = match_peer_config(peer, our_params)
        with torch.device("meta"):
            their_params = count_params(peer.unet_class()(**peer_config))
        models[name] = dict(package=peer.package, version=peer.version(), params=their_params,
                            config=peer_config, candidates=candidates)
        models[f"params_ours_over_{name}"] = our_params / their_params
        peer_configs[name] = peer_config
        print(f"  {name} ({peer.package}) {their_params:,} ({peer.describe(peer_config)})  "
              f"ratio ours/theirs {our_params / their_params:.3f}")
    return models, peer_configs


# The matrix size of the ceiling's torch.mm per device type: 2048 saturates two CPU cores; a
# datacentre GPU needs larger products to reach its rate (an H200 gave about 790 TFLOP/s in bfloat16
# at 8192, in this workplace's own measurement), and a share of a ceiling measured too small would flatter us.
# (Apple's MPS, unmeasured here, takes the CPU's size.)
MATMUL_CEILING_SIZE = {"cpu": 2048, "cuda": 8192}


def measure_ceiling(device, precisions, quick):
    n = MATMUL_CEILING_SIZE.get(device.type, MATMUL_CEILING_SIZE["cpu"])
    ceiling = matmul_ceiling(device, precisions, n=n, reps=3 if quick else 10)
    print("\nmatmul ceiling (torch.mm %dx%d, median): %s" % (n, n, ", ".join(
        f"{k} {v['tflop_per_s'] * 1e3:.0f} GFLOP/s" for k, v in ceiling.items())))
    ref = ceiling.get("float32", {}).get("onednn_fp32_gemm", {})
    if "tflop_per_s" in ref:
        print(f"  for reference, float32 GEMM through oneDNN (as the convolutions run): "
              f"{ref['tflop_per_s'] * 1e3:.0f} GFLOP/s"
              + ("  <- float32 torch.mm (MKL) is well below it: its ceiling understates this machine"
                 if ref["tflop_per_s"] > 1.3 * ceiling["float32"]["tflop_per_s"] else ""))
    return ceiling


def count_flops(peer_configs, device, batch):
    flops = {}
    for name in (*OUR_MODELS, *peer_configs):
        fwd, bwd = training_flops(name, peer_configs.get(name), device, batch=min(batch, 8))
        flops[name] = dict(forward_per_image=fwd, backward_per_image=bwd, train_per_image=fwd + bwd)
    print("training FLOPs per image (fwd+bwd, matmul/conv/attention only): " + ", ".join(
        f"{k} {v['train_per_image'] / 1e9:.3f} GFLOP" for k, v in flops.items()))
    return flops


# ================================================================================================
# Phase 3: the plan, every measurement subprocess of the run
# ================================================================================================

def training_variants(peers):
    """What each training setting is compared as: (label, model, matched, optimizer, extras) for each
    of OUR_MODELS, then for each peer as its documentation shows it and matched to our training loop."""
    variants = [(model, model, None, "AdamW fused", "clip+sched+EMA (train_step)") for model in OUR_MODELS]
    for peer in peers:
        documented, matched = peer_labels([peer])
        variants += [(documented, peer, False, "AdamW default", "none"),
                     (matched, peer, True, "AdamW fused", "clip+sched+EMA")]
    return variants


def plan_training(base, precisions, channels_last, compile, peer_configs):
    """Worker specs of the training measurements: every model at every precision (and layout)."""
    specs = []
    for precision in precisions:
        for cl in ([False, True] if channels_last else [False]):
            for label, model, matched, optimizer, extras in training_variants(peer_configs):
                what = dict(model=model) if matched is None else dict(
                    model=model, matched=matched, peer_config=peer_configs[model])
                specs.append(dict(base, **what, precision=precision, channels_last=cl, label=label,
                                  optimizer=optimizer, extras=extras))
    if compile:
        label, model, _, optimizer, extras = training_variants([])[0]
        specs.append(dict(base, model=model, precision=precisions[-1], channels_last=False, compile=True,
                          warmup=max(base["warmup"], 2), label=label, optimizer=optimizer, extras=extras))
    return specs


def plan_measurements(args, device, precisions, peer_configs):
    """The run's measurements in order: sections (name, header, [(key, progress title, worker spec)]).
    `peer_configs`: {peer: its matched constructor arguments}, for the peers to measure."""
    common = dict(device=str(device), threads=args.threads)
    base = dict(common, kind="train", batch=args.batch, steps=args.steps, warmup=args.warmup)
    training = [(None, f"{s['label']:<18} {setting_name(s['precision'], s['channels_last'], 'compile' in s):<14}", s)
                for s in plan_training(base, precisions, args.channels_last, args.compile, peer_configs)]
    paired = [(p, f"{setting_name(p):<18}",
               dict(base, kind="paired", precision=p, channels_last=False, steps=args.paired_rounds,
                    peer_configs=peer_configs, also_channels_last=args.channels_last))
              for p in precisions]
    sampling = [(name, f"{name:<18}",
                 dict(common, kind="sample", model=name, batch=args.batch, reps=args.forward_reps,
                      ddim_steps=args.ddim_steps, ddim_reps=args.ddim_reps, precisions=precisions,
                      channels_last=args.channels_last,
                      peer_config=peer_configs.get(name)))
                for name in ("ours", *peer_configs)]
    profile = [(None, "profiling our training step",
                dict(common, kind="profile", model="ours", precision=precisions[-1], batch=args.batch,
                     warmup=1 if args.quick else 2, steps=1 if args.quick else 3, top=15))]

    plan = [("training", f"\ntraining: batch {args.batch}, median of {args.steps} steps after {args.warmup} "
                         f"warm-up steps, each setting in a fresh subprocess", training)]
    if not args.no_paired:
        plan.append(("paired_training", f"\npaired: ours and {', '.join(peer_labels(peer_configs))} in one "
                                        f"process, steps interleaved ({args.paired_rounds} rounds after "
                                        f"{args.warmup} warm-up steps each)", paired))
    plan.append(("sampling", f"\nsampling: batch {args.batch}; forward = median of {args.forward_reps} passes, "
                             f"DDIM = median of {args.ddim_reps} run(s) of {args.ddim_steps} steps", sampling))
    if not args.no_profile:
        plan.append(("profile", None, profile))  # no header: its one line follows sampling's
    if args.concurrent:
        window = CONCURRENT_WINDOW_S["quick" if args.quick else "full"]
        spec = dict(base, kind="concurrent", model="ours", precision=precisions[-1],
                    channels_last=experiment.channels_last_pays(device), compile=args.compile, window_s=window)
        setting = setting_name(spec["precision"], spec["channels_last"], args.compile)
        plan.append(("concurrent_training", f"\nconcurrent: our step ({setting}), in 1 process and in "
                                            f"{args.concurrent} at once, images/s over {window:.0f} s after "
                                            f"{args.warmup} warm-up steps each",
                     [(n, f"{n} process{'es' if n > 1 else ''}", dict(spec, processes=n)) for n in (1, args.concurrent)]))
    return plan


# ================================================================================================
# Phase 4: run the plan
# ================================================================================================

def training_row(spec, res, flops, ceiling):
    """One row of `training`: the setting, the worker's result, and the FLOP/s it achieves."""
    row = dict(model=spec["label"],
               setting=setting_name(spec["precision"], spec["channels_last"], spec.get("compile", False)),
               precision=spec["precision"], channels_last=spec["channels_last"],
               compile=spec.get("compile", False), optimizer=spec["optimizer"], extras=spec["extras"], **res)
    if "error" in res:
        return row
    per_image = flops[spec["model"]]["train_per_image"]
    flop_per_s, ceil = per_image * res["img_per_s"], ceiling[spec["precision"]]
    row["achieved_gflop_per_s"] = flop_per_s / 1e9
    row["fraction_of_matmul_ceiling"] = flop_per_s / (ceil["tflop_per_s"] * 1e12)
    ref = ceil.get("onednn_fp32_gemm", {})
    if "tflop_per_s" in ref:
        row["fraction_of_onednn_fp32_gemm"] = flop_per_s / (ref["tflop_per_s"] * 1e12)
    if res.get("img_per_cpu_s") and ceil["tflop_per_cpu_s"]:
        row["fraction_of_matmul_ceiling_cpu_time"] = per_image * res["img_per_cpu_s"] / (ceil["tflop_per_cpu_s"] * 1e12)
    return row


# The progress line's ending for a successful measurement, per section.
PROGRESS = {
    "training": lambda r: f"{r['img_per_s']:7.1f} img/s  ({r['worker_wall_s']:.0f} s)",
    "paired_training": lambda r: paired_summary(r) + f"  ({r['worker_wall_s']:.0f} s)",
    "sampling": lambda r: f"done ({r['worker_wall_s']:.0f} s)",
    "profile": lambda r: "done",
    "concurrent_training": lambda r: f"{r['img_per_s']:7.1f} img/s together  ({r['worker_wall_s']:.0f} s)",
}


def run_measurements(plan, results, out, timeout):
    """Run every planned worker, fill its section of `results`, and keep a partial JSON on disk
    (so that a run that dies or is stopped half-way still leaves what it measured)."""
    for section, header, items in plan:
        if header:
            print(header)
        for key, title, spec in items:
            print(f"  {title} ...", end="", flush=True)
            res = run_worker(spec, timeout=timeout)
            if section == "training":
                results["training"].append(training_row(spec, res, results["flops"], results["matmul_ceiling"]))
            elif section == "profile":
                results["profile"] = res
            else:
                results[section][key] = res
            if "error" in res:
                print(f" FAILED: {res['error']}")
                for line in res.get("stderr_tail", []):
                    print("      " + line)
            else:
                print(" " + PROGRESS[section](res))
            write_json(results, out, partial=True)


def write_json(results, path, partial):
    Path(path).write_text(json.dumps(dict(results, meta=dict(results["meta"], partial=partial)), indent=2) + "\n")


# ================================================================================================
# Phase 5: summary (pure functions of the result rows)
# ================================================================================================

def compare(rows, key):
    """Ratios ours/theirs of `key` (img_per_s, or img_per_cpu_s) per setting and best against best,
    for every peer.

    Returns (ratios, our best row, {peer: its best row of either kind}); failed rows are ignored.
    """
    rows = [r for r in rows if "error" not in r and r.get(key)]
    ratios = {}
    for r in rows:
        if r["model"] != "ours" or r["compile"]:
            continue
        for other in peer_labels(PEERS):
            theirs = [o for o in rows if o["model"] == other and o["setting"] == r["setting"]]
            if theirs:
                ratios[f"{r['setting']} ours/{other}"] = r[key] / theirs[0][key]

    def best(models):
        return max((r for r in rows if r["model"] in models), key=lambda r: r[key], default=None)

    b_ours, best_of = best({"ours"}), {}
    for peer in PEERS:
        b_theirs, b_idiomatic = best(set(peer_labels([peer]))), best({peer})
        best_of[peer] = b_theirs
        if b_ours and b_theirs:
            ratios[f"best ours / best {peer} (any setting)"] = b_ours[key] / b_theirs[key]
        if b_ours and b_idiomatic:
            ratios[f"best ours / best idiomatic {peer}"] = b_ours[key] / b_idiomatic[key]
    return ratios, b_ours, best_of


def summarise(training, by_cpu_time):
    """Throughput ratios and best rows, by wall time and (on a CPU) by CPU time."""
    ratios, best_ours, best_theirs = compare(training, "img_per_s")
    ratios_cpu, best_ours_cpu, best_theirs_cpu = compare(training, "img_per_cpu_s") if by_cpu_time else ({}, None, {})
    return dict(ratios=ratios, best_ours=best_ours, best_theirs=best_theirs, ratios_cpu=ratios_cpu,
                best_ours_cpu=best_ours_cpu, best_theirs_cpu=best_theirs_cpu)


# ================================================================================================
# Phase 6: the targets (pure functions of the summary)
# ================================================================================================

def speedup_target(summary, paired, peer):
    """Our best training throughput over `peer`'s best (any setting of either), against TARGETS."""
    ours, theirs, bar = summary["best_ours"], summary["best_theirs"][peer], TARGETS[f"train_speedup_vs_{peer}"]
    v = ours["img_per_s"] / theirs["img_per_s"]
    target = dict(target=f">= {bar}", measured=v, met=v >= bar,
                  detail=f"ours {ours['setting']} vs {theirs['model']} {theirs['setting']}")
    paired_ok = {k: v["ours_over"][peer]["median_of_round_ratios"] for k, v in paired.items()
                 if "error" not in v and peer in v["ours_over"]}
    if paired_ok:
        target["paired_same_precision"] = paired_ok
    ours_cpu, theirs_cpu = summary["best_ours_cpu"], summary["best_theirs_cpu"].get(peer)
    if ours_cpu and theirs_cpu:
        target["measured_by_cpu_time"] = ours_cpu["img_per_cpu_s"] / theirs_cpu["img_per_cpu_s"]
    return target


def ceiling_target(summary):
    ours, ours_cpu = summary["best_ours"], summary["best_ours_cpu"]
    v = ours["fraction_of_matmul_ceiling"]
    target = dict(target=f">= {TARGETS['train_fraction_of_matmul_ceiling']}", measured=v,
                  met=v >= TARGETS["train_fraction_of_matmul_ceiling"],
                  detail=f"ours {ours['setting']} against the {ours['precision']} torch.mm ceiling")
    if "fraction_of_onednn_fp32_gemm" in ours:
        target["measured_vs_onednn_fp32_gemm"] = ours["fraction_of_onednn_fp32_gemm"]
    if ours_cpu and ours_cpu.get("fraction_of_matmul_ceiling_cpu_time"):
        target["measured_by_cpu_time"] = ours_cpu["fraction_of_matmul_ceiling_cpu_time"]
    return target


def ddim_target(ddim_s, batch, ddim_steps):
    """`ddim_s`: our DDIM run's seconds per setting; judged only at the target's own setting."""
    setting, v = min(ddim_s.items(), key=lambda kv: kv[1])
    at_target_setting = ddim_steps == DDIM_TARGET_STEPS and batch == DDIM_TARGET_BATCH
    return dict(target=f"< {TARGETS['ddim_64x50_seconds']}", measured=v,
                met=(v < TARGETS["ddim_64x50_seconds"]) if at_target_setting else None,
                detail=f"ours {setting}, {batch} images x {ddim_steps} steps")


def judge_targets(summary, paired, sampling, batch, ddim_steps):
    """Each target that the run measured: target, measured value, met (True, False, None: not judged)."""
    targets = {}
    for peer, theirs in summary["best_theirs"].items():
        if summary["best_ours"] and theirs and f"train_speedup_vs_{peer}" in TARGETS:
            targets[f"train_speedup_vs_{peer}"] = speedup_target(summary, paired, peer)
    if summary["best_ours"]:
        targets["train_fraction_of_matmul_ceiling"] = ceiling_target(summary)
    ours = sampling.get("ours", {"error": "not measured"})
    if "error" not in ours and sampling_settings(ours):
        targets["ddim_64x50_seconds"] = ddim_target({k: v["ddim_s"] for k, v in sampling_settings(ours).items()},
                                                    batch, ddim_steps)
    return targets


def withhold_judgement(targets, quick, meta):
    """Targets are reported but not judged on a smoke test or a busy machine."""
    for v in targets.values():
        if quick:  # a smoke test's numbers say nothing about the targets
            v["met"], v["not_judged_because"] = None, "--quick"
        elif meta["busy_machine"]:  # other processes distorted the timings: report, but do not judge
            v["met"], v["not_judged_because"] = None, (f"busy machine (other processes used "
                                                        f"{meta['other_processes_cpu_share']:.0%} of the CPU time)")


CPU_TIME_NOTE = (
    "img_per_cpu_s and *_cpu_time use the CPU seconds this process consumed (all its threads) "
    "instead of wall seconds. On a busy machine they are much less disturbed by other processes "
    "than wall-clock throughput, especially with --threads 1 (with more threads, OpenMP "
    "spin-waiting also counts as CPU time). On a quiet machine, use the wall-clock numbers.")


# ================================================================================================
# Phase 7: the report
# ================================================================================================

def fmt(v, spec=".1f", missing="-"):
    return missing if v is None else format(v, spec)


def print_table(headers, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(str(h).ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(str(c).rjust(w) if i >= 2 else str(c).ljust(w)
                        for i, (c, w) in enumerate(zip(r, widths))))


def setting_name(precision, channels_last=False, compile=False):
    name = {"float32": "fp32", "bfloat16": "bf16"}[precision]
    return name + ("+CL" if channels_last else "") + ("+compile" if compile else "")


def training_table_row(r, cpu):
    head = [r["model"], r["setting"], r["optimizer"], r["extras"]]
    if "error" in r:
        return head + ["FAILED"] + [""] * (7 if cpu else 4)
    row = head + [fmt(r["img_per_s"]), fmt(r["median_step_s"] * 1e3), fmt(r["peak_mem_mib"], ".0f"),
                  fmt(r["achieved_gflop_per_s"]), fmt(100 * r["fraction_of_matmul_ceiling"])]
    if cpu:
        frac, other = r.get("fraction_of_matmul_ceiling_cpu_time"), r.get("other_processes_cpu_share")
        row += [fmt(r.get("img_per_cpu_s")), fmt(None if frac is None else 100 * frac),
                fmt(None if other is None else 100 * other, ".0f")]
    return row


def print_training(results, cpu, batch):
    training = results["training"]
    ok = [r for r in training if "error" not in r]
    print("\n=== training (batch %d) ===" % batch)
    headers = ["model", "setting", "optimizer", "extras", "img/s", "step ms", "peak MiB", "GFLOP/s", "% mm ceil"]
    print_table(headers + (["img/CPU-s", "% ceil CPU-t", "others %"] if cpu else []),
                [training_table_row(r, cpu) for r in training])
    print("% mm ceil: achieved FLOP/s over the torch.mm ceiling of the same precision"
          + ("; img/CPU-s and % ceil CPU-t: the same per CPU-second consumed (steadier on a busy machine);"
             "\nothers %: share of the CPUs' time that other processes used during that measurement"
             if cpu else ""))
    mem_methods = {r["mem_method"] for r in ok}
    print("peak MiB: " + "; ".join(sorted(mem_methods)) if mem_methods else "")
    for r in ok:
        if r.get("compile"):
            print(f"torch.compile: first step {r['first_step_s']:.1f} s "
                  f"(compile time ~{r['compile_time_s_est']:.1f} s)"
                  + ("" if r["compiled"] else "; it FELL BACK to eager (see the worker's output)")
                  + (f"; CUDA graphs skipped {r['cudagraph_skips']} times" if r["cudagraph_skips"] else ""))
    ratios, ratios_cpu = results["training_ratios"], results.get("training_ratios_by_cpu_time", {})
    print("\nthroughput ratios (ours / theirs, img/s)" + ("   [by CPU time]" if ratios_cpu else "") + ":")
    for k, v in ratios.items():
        print(f"  {k:<48} {v:5.2f}x" + (f"   [{ratios_cpu[k]:5.2f}x]" if k in ratios_cpu else ""))


def print_paired(paired):
    ok = {k: v for k, v in paired.items() if "error" not in v}
    if not ok:
        return
    print("\npaired, steps interleaved in one process (median of per-round ratios; img/s in brackets):")
    for precision, res in ok.items():
        print(f"  {setting_name(precision):<6} " + paired_summary(res)
              + "   [" + ", ".join(f"{k} {v:.1f}" for k, v in res["img_per_s"].items()) + "]")


def print_sampling(sampling, batch, ddim_steps):
    print("\n=== sampling (batch %d) ===" % batch)
    rows = []
    for name, res in sampling.items():
        if "error" in res:
            rows.append([name, "", "FAILED", "", "", "", ""])
            continue
        for setting, v in sampling_settings(res).items():
            rows.append([name, setting, fmt(v["forward_img_per_s"]), fmt(v["forward_median_s"] * 1e3),
                         fmt(v["forward_median_cpu_s"] * 1e3), fmt(v["ddim_s"], ".2f"), fmt(v["ddim_cpu_s"], ".2f")])
    print_table(["model", "setting", "fwd img/s", "fwd ms", "fwd CPU ms", f"DDIM {ddim_steps} steps s",
                 "DDIM CPU s"], rows)


def print_concurrent(concurrent):
    """One line: K processes' total throughput against one process alone."""
    if len(concurrent) != 2 or any("error" in r for r in concurrent.values()):
        return
    alone, together = concurrent.values()
    print(f"\n=== concurrent: {together['processes']} processes together {together['img_per_s']:.1f} img/s, "
          f"one alone {alone['img_per_s']:.1f} img/s: {together['img_per_s'] / alone['img_per_s']:.2f}x ===")


def print_profile(profile):
    if not profile or "error" in profile:
        return
    print(f"\n=== profile: our training step, {setting_name(profile['precision'])}, batch {profile['batch']} "
          f"({profile['step_s_under_profiler'] * 1e3:.0f} ms/step under the profiler) ===")
    rows = [[r["op"][:40], "", fmt(r["self_cpu_ms_per_step"]), fmt(100 * r["self_cpu_share"]),
             fmt(r["calls_per_step"], ".0f")] for r in profile["top_ops"][:10]]
    print_table(["op", "", "self CPU ms/step", "% self CPU", "calls/step"], rows)
    total = profile["total_self_cpu_ms_per_step"]
    print("by category: " + ", ".join(f"{k} {100 * v / total:.0f}%"
                                       for k, v in profile["self_cpu_ms_per_step_by_category"].items()))


def print_targets(targets, meta):
    print("\n=== targets ===")
    for k, v in targets.items():
        reason = v.get("not_judged_because", "not the target's settings")
        met = {True: "MET", False: "not met"}.get(v["met"], f"not judged: {reason}")
        cpu = f" [by CPU time {v['measured_by_cpu_time']:.3g}]" if "measured_by_cpu_time" in v else ""
        print(f"  {k:<36} target {v['target']:<7} measured {v['measured']:.3g}{cpu}  {met}  ({v['detail']})")
    parts, share = [], meta["other_processes_cpu_share"]
    if share is not None:
        parts.append(f"other processes used {share:.1%} of the CPU time during the run "
                     + ("(busy: numbers are contended)" if meta["busy_machine"] else "(quiet enough)"))
    load_start, load_end = meta["loadavg_1_5_15_at_start"], meta["loadavg_1_5_15_at_end"]
    if load_start:
        parts.append(f"load average 1 min: {load_start[0]:.2f} at start, {load_end[0]:.2f} at end "
                     f"({meta['logical_cpus']} logical CPUs)")
    parts.append(f"wall time {meta['wall_s']:.0f} s")
    print("\n" + "; ".join(parts))


def speed_table(results):
    """The README's table of one run (markdown): training images/s per precision, ours against the
    best variant of each measured peer, best against best, 64 images x 50 DDIM steps, and our
    training step as a share of the bf16 (else float32) matmul ceiling.

    Each cell is a model's best row at that precision over the measured memory layouts (NCHW and,
    with --channels-last, channels_last), as the judged targets count them; compiled rows
    (--compile) are left out: their compile time is not in their throughput."""
    peers = [name for name in PEERS if "params" in results["models"].get(name, {})]
    rows = [r for r in results["training"] if "error" not in r and not r["compile"]]

    def best(model, precision, key):  # a model's best of its variants (layouts; a peer's documented or matched)
        labels = {"ours"} if model == "ours" else set(peer_labels([model]))
        return max((r[key] for r in rows if r["model"] in labels and r["precision"] == precision), default=None)

    img_per_s = lambda model, precision: best(model, precision, "img_per_s")

    def ratio(ours, theirs):
        return f"{ours / theirs:.2f}x" if ours and theirs else "-"

    def line(label, values):
        ours = values["ours"]
        cells = [label, fmt(ours)] + [c for p in peers for c in (fmt(values[p]), ratio(ours, values[p]))]
        return "| " + " | ".join(cells) + " |"

    models = ["ours", *peers]
    out = ["| | ours |" + "".join(f" {p} | ours/{p} |" for p in peers),
           "|---|---|" + "---|---|" * len(peers)]
    precisions = [p for p in ("float32", "bfloat16") if any(r["precision"] == p for r in rows)]
    for precision in precisions:
        out.append(line(f"training img/s, {precision}" + (" autocast" if precision == "bfloat16" else ""),
                        {m: img_per_s(m, precision) for m in models}))
    out.append(line("training img/s, best setting of each",
                    {m: max(filter(None, (img_per_s(m, p) for p in precisions)), default=None) for m in models}))
    ddim = {m: min((v["ddim_s"] for v in sampling_settings(results["sampling"].get(m, {})).values()), default=None)
            for m in models}
    settings = results.get("meta", {}).get("settings", {})
    batch, steps = settings.get("batch", DDIM_TARGET_BATCH), settings.get("ddim_steps", DDIM_TARGET_STEPS)
    out.append(f"| {batch} images x {steps} DDIM steps, best setting, s | " + " | ".join(
        [fmt(ddim["ours"], ".2f")] + [c for p in peers for c in (fmt(ddim[p], ".2f"), "")]) + " |")
    ceiling = "bfloat16" if "bfloat16" in precisions else "float32"
    share = {m: best(m, ceiling, "fraction_of_matmul_ceiling") for m in models}
    percent = lambda v: "-" if v is None else f"{100 * v:.1f}%"
    out.append(f"| training step, % of the {ceiling} matmul ceiling | " + " | ".join(
        [percent(share["ours"])] + [c for p in peers for c in (percent(share[p]), "")]) + " |")
    return "\n".join(out)


def report(results, device, args):
    print_training(results, device.type == "cpu", args.batch)
    print_paired(results["paired_training"])
    print_sampling(results["sampling"], args.batch, args.ddim_steps)
    print_profile(results["profile"])
    print_concurrent(results["concurrent_training"])
    print_targets(results["targets"], results["meta"])


# ================================================================================================
# The two commands: the timing run, and --loss-curves
# ================================================================================================

def run_benchmark(args):
    """The timing run, phase by phase; writes the JSON as it goes and once, complete, at the end."""
    device = experiment.pick_device(args.device)  # first: a bad --device changes nothing
    sys.stdout.reconfigure(line_buffering=True)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    meta = collect_machine_facts(args, device)
    precisions = select_precisions(args.precision, meta["bf16_supported"])
    others = OtherLoad()
    print_machine_facts(meta, device, args.threads)
    models, peer_configs = match_models()
    results = dict(meta=meta, models=models, matmul_ceiling=measure_ceiling(device, precisions, args.quick),
                   flops=count_flops(peer_configs, device, args.batch), training=[], paired_training={},
                   sampling={}, profile=None, concurrent_training={})
    run_measurements(plan_measurements(args, device, precisions, peer_configs), results, args.out,
                     args.worker_timeout)
    finish_machine_facts(meta, others, t_start, device)
    summary = summarise(results["training"], by_cpu_time=device.type == "cpu")
    targets = judge_targets(summary, results["paired_training"], results["sampling"], args.batch, args.ddim_steps)
    withhold_judgement(targets, args.quick, meta)
    results.update(training_ratios=summary["ratios"], targets=targets)
    if summary["ratios_cpu"]:
        results.update(training_ratios_by_cpu_time=summary["ratios_cpu"], cpu_time_note=CPU_TIME_NOTE)
    report(results, device, args)
    write_json(results, args.out, partial=False)
    print(f"results written to {args.out}\n\nthe README's table of this run:\n{speed_table(results)}")
    return 0


def loss_curves(steps, device):
    """The fast settings must not change what is learned: the same run from the same seed in float32,
    in bfloat16 and in bfloat16 with channels_last (`use_channels_last`)."""
    base = experiment.Config(steps=steps, device=device, log_every=10, checkpoint_every=steps,
                             sample_every=0, gif=False, eval_samples=0)
    if not experiment.bf16_supported(experiment.pick_device(device)):
        print("bfloat16 is not supported natively here: nothing to compare")
        return 1
    settings = {"float32": dict(precision="float32", channels_last="off"),
                "bfloat16": dict(precision="bfloat16", channels_last="off"),
                "bfloat16+channels_last": dict(precision="bfloat16", channels_last="on")}
    manager = experiment.ExperimentManager([base.replace(**change) for change in settings.values()],
                                           "runs/precision_check", names=list(settings))
    rows = {r["run"]: r for r in manager.run(progress=True)}
    experiment.plot_loss_curves({n: c.out_dir for n, c in manager.configs.items()}, "data/precision_loss_curves.png")
    for n in settings:
        print(f"{n:22s} final loss (mean of last 5 logs) {rows[n]['final_loss']:.4f} "
              f"({rows[n]['final_loss'] / rows['float32']['final_loss'] - 1:+.1%} against float32), "
              f"{steps * base.batch_size / rows[n]['train_time_s']:.0f} images/s")
    print("curves in data/precision_loss_curves.png")
    return 0


IMAGE_SHAPES = (IMAGE_SHAPE, (3, 32, 32))  # the datasets' shape, and a typical folder of colour images


def image_shape_throughput(args, device, rounds=5):
    """Our training step (the default config, `Experiment.train_step`) at each of IMAGE_SHAPES, in one
    process, `rounds` rounds of `args.steps` steps per shape taken in turn, so that both see the same
    machine; images/s from the median step of each shape, and the ratio to the first shape."""
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = {}
    for channels, height, width in IMAGE_SHAPES:
        cfg = experiment.Config().replace(image_size=height, channels=channels, device=device.type,
                                          batch_size=args.batch, out_dir=str(Path(tempfile.gettempdir()) / "unused"))
        exp = experiment.Experiment(cfg).build(cfg.steps)
        batch = torch.randint(0, 256, (args.batch, channels, height, width), dtype=torch.uint8)
        steps[(channels, height, width)] = (exp, batch, [])
    for _ in range(rounds):
        for exp, batch, times in steps.values():
            times += repeat_timed(lambda: exp.train_step(batch), device, args.warmup, args.steps)[1]
    rows = [dict(shape=list(shape), img_per_s=round(args.batch / statistics.median(times), 1), steps=len(times))
            for shape, (_, _, times) in steps.items()]
    for row in rows:
        row["ratio_to_first"] = round(row["img_per_s"] / rows[0]["img_per_s"], 3)
        print(f"{'x'.join(map(str, row['shape'])):>8}: {row['img_per_s']:7.1f} images/s "
              f"({row['ratio_to_first']:.0%} of {'x'.join(map(str, rows[0]['shape']))})")
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=experiment.device_name(device), batch=args.batch, threads=torch.get_num_threads(),
                torch=torch.__version__, channels_last=exp.channels_last)  # the default layout here
    data_path = REPO_DIR / "data" / "image_shape_throughput.json"
    experiment.data.atomic_write_text(data_path, json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    print(f"written to {data_path}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    try:
        if args.loss_curves is not None:
            return loss_curves(args.loss_curves, args.device)
        if args.image_shapes:
            return image_shape_throughput(args, experiment.pick_device(args.device))
        return run_benchmark(args)
    except experiment.ConfigError as e:  # e.g. --device cuda on a machine without CUDA
        print(f"benchmark.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
