"""Your own images: a folder as a dataset ("folder:PATH"), its cache, its errors, training at another
image shape, and the memorisation check."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluation
import experiment
from experiment import ConfigError, Experiment
from test_experiment import TINY, one_line_error, run_python


def write_images(folder, n, size=(24, 20), mode="RGB", classes=("cats", "dogs"), suffix=".png", seed=0):
    """n random images in class subfolders (ImageFolder layout); returns their paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        sub = folder / classes[i % len(classes)] if classes else folder
        sub.mkdir(parents=True, exist_ok=True)
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        path = sub / f"img{i:03d}{suffix}"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
        paths.append(path)
    return paths


def folder_config(folder, out_dir, **changes):
    return experiment.Config.from_dict({**TINY, "dataset": f"folder:{folder}", "out_dir": str(out_dir),
                                        "image_size": 16, **changes})


def test_a_folder_loads_as_square_uint8_images_with_labels_from_its_subfolders(tmp_path):
    write_images(tmp_path / "pics", 6)
    images, labels, classes = data.load_folder(f"folder:{tmp_path / 'pics'}", 16)
    assert images.shape == (6, 3, 16, 16) and images.dtype == torch.uint8
    assert classes == ["cats", "dogs"] and labels.tolist() == [0, 0, 0, 1, 1, 1]  # sorted paths: cats first


def test_nested_folders_without_a_class_layout_give_no_labels(tmp_path):
    write_images(tmp_path / "pics", 3, classes=None)
    write_images(tmp_path / "pics" / "a" / "b", 2, classes=None, suffix=".jpg", seed=1)
    images, labels, classes = data.load_folder(f"folder:{tmp_path / 'pics'}", 8)
    assert len(images) == 5 and labels is None and classes is None


def test_resize_keeps_the_centre_of_a_wide_image(tmp_path):
    (tmp_path / "pics").mkdir()
    wide = np.zeros((10, 30), dtype=np.uint8)
    wide[:, 10:20] = 255                       # a white square in the middle of a black strip
    Image.fromarray(wide, "L").save(tmp_path / "pics" / "wide.png")
    images, _, _ = data.load_folder(f"folder:{tmp_path / 'pics'}", 10)
    assert images.shape == (1, 1, 10, 10) and images.float().mean() > 250  # only the centre is left


def test_a_greyscale_folder_gives_one_channel_and_a_mixed_one_is_converted_with_a_note(tmp_path, capsys):
    write_images(tmp_path / "grey", 3, mode="L")
    assert data.load_folder(f"folder:{tmp_path / 'grey'}", 8)[0].shape[1] == 1
    write_images(tmp_path / "mixed", 2, mode="L")
    write_images(tmp_path / "mixed", 2, mode="RGB", classes=("birds", "fish"), seed=2)
    images, _, _ = data.load_folder(f"folder:{tmp_path / 'mixed'}", 8)
    assert images.shape[1] == 3
    assert "mixes 2 greyscale and 2 colour images: all converted to RGB" in capsys.readouterr().err


def test_the_cache_is_used_for_an_unchanged_folder_and_renewed_in_place_for_a_changed_one(tmp_path, monkeypatch):
    paths = write_images(tmp_path / "pics", 4)
    dataset, cache = f"folder:{tmp_path / 'pics'}", tmp_path / "cache"
    first = data.load_folder(dataset, 8, cache_root=cache)[0]
    decode = data._decode
    monkeypatch.setattr(data, "_decode", lambda *a: pytest.fail("an unchanged folder was decoded again"))
    assert torch.equal(data.load_folder(dataset, 8, cache_root=cache)[0], first)
    monkeypatch.setattr(data, "_decode", decode)
    # other settings are other entries, not the cached 8x8 colour images
    assert data.load_folder(dataset, 16, cache_root=cache)[0].shape == (4, 3, 16, 16)
    assert data.load_folder(dataset, 16, channels=1, cache_root=cache)[0].shape == (4, 1, 16, 16)
    # an image rewritten in place under the same name is read again
    Image.fromarray(np.full((20, 24, 3), 255, dtype=np.uint8), "RGB").save(paths[0])
    renewed = data.load_folder(dataset, 8, cache_root=cache)[0]
    assert not torch.equal(renewed, first) and bool((renewed == 255).all(dim=(1, 2, 3)).any())
    write_images(tmp_path / "pics", 1, classes=("cats",), seed=5, suffix=".webp")
    assert len(data.load_folder(dataset, 8, cache_root=cache)[0]) == 5
    # one entry per setting (8x8 colour, 16x16 colour, 16x16 grey): the folder's edits replaced theirs
    assert len(list((cache / "folders").glob("*.pt"))) == 3


def test_unreadable_files_are_skipped_with_a_note(tmp_path, capsys):
    write_images(tmp_path / "pics", 2)
    (tmp_path / "pics" / "cats" / "broken.png").write_text("not an image")
    images, _, _ = data.load_folder(f"folder:{tmp_path / 'pics'}", 8)
    assert len(images) == 2
    assert "skipped 1 unreadable file(s)" in capsys.readouterr().err


@pytest.mark.parametrize("setup,message", [
    (lambda p: None, "does not exist or is not a folder"),
    (lambda p: p.mkdir(), "holds no image files"),
    (lambda p: (p.mkdir(), (p / "a.png").write_text("x"), (p / "b.jpg").write_bytes(b"\0" * 10)),
     "none of its 2 image files can be read, e.g. a.png (UnidentifiedImageError"),
])
def test_a_folder_without_usable_images_exits_2_in_one_line(tmp_path, setup, message):
    setup(tmp_path / "pics")
    result = run_python(["experiment.py", "train", "--dataset", f"folder:{tmp_path / 'pics'}",
                         "--out-dir", str(tmp_path / "run"), "--steps", "1"], timeout=120)
    one_line_error(result, message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("changes,message", [
    (dict(image_size=30, dim_mults=[1, 2, 4]), "config.image_size=30 is not allowed: 30x30 images can be halved only "
                                               "once: use at most 2 levels (dim_mults), or an image size that is a "
                                               "multiple of 4, such as 8, 16, 32"),
    (dict(image_size=20, dim_mults=[1, 2, 4, 8]), "20x20 images can be halved at most twice: use at most 3 levels"),
    (dict(channels=2), "config.channels=2 is not allowed: expected 1 (greyscale), 3 (RGB) or 0"),
])
def test_config_names_an_image_shape_the_unet_cannot_take(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        experiment.Config.from_dict({**TINY, "out_dir": "unused", **changes})


def test_conditional_training_needs_class_subfolders(tmp_path):
    write_images(tmp_path / "flat", 3, classes=None)
    with pytest.raises(ConfigError, match="not sorted into class subfolders"):
        experiment.build_diffusion(folder_config(tmp_path / "flat", tmp_path / "run", conditional=True))


def test_a_conditional_folder_run_samples_its_classes_after_the_folder_is_gone(tmp_path):
    write_images(tmp_path / "pics", 12, classes=("cats", "dogs", "owls"))
    cfg = folder_config(tmp_path / "pics", tmp_path / "run", steps=2, batch_size=6, conditional=True,
                        eval_samples=0, num_sample_images=3)
    Experiment(cfg).run(progress=False)
    experiment.export_weights(tmp_path / "run", tmp_path / "pets_ema.pt")
    assert experiment.Config.load(tmp_path / "run" / "config.json").class_names == ("cats", "dogs", "owls")
    for f in (tmp_path / "pics").rglob("*.png"):
        f.unlink()                                   # another machine: the weights, not the folder
    exp = Experiment.from_weights(tmp_path / "pets_ema.pt")
    assert exp.diffusion.num_classes == 3
    assert experiment.class_index(exp.cfg.dataset, "Owls", exp.cfg.classes()) == 2
    assert exp.sample(3, steps=2, labels=torch.tensor([0, 1, 2]), guidance=2.0).shape == (3, 3, 16, 16)


def test_a_folder_whose_classes_changed_does_not_resume_a_conditional_run(tmp_path):
    write_images(tmp_path / "pics", 8)
    cfg = folder_config(tmp_path / "pics", tmp_path / "run", steps=2, batch_size=4, conditional=True,
                        eval_samples=0, num_sample_images=2)
    Experiment(cfg).run(progress=False)
    write_images(tmp_path / "pics", 3, classes=("birds",), seed=1)
    saved = experiment.Config.load(tmp_path / "run" / "config.json").replace(steps=4)
    with pytest.raises(ConfigError, match=r"class subfolders of .* are now \['birds', 'cats', 'dogs'\], but this run "
                                          r"was trained on \['cats', 'dogs'\]"):
        Experiment(saved).run(progress=False)


@pytest.mark.parametrize("names,message", [
    (["cats"], "at least two"), (["cats", "cats"], "distinct"), (["cats", ""], "non-empty")])
def test_recorded_class_names_are_checked(tmp_path, names, message):
    with pytest.raises(ConfigError, match=f"config.class_names=.* is not allowed: .*{message}"):
        folder_config(tmp_path / "pics", tmp_path / "run", class_names=names)
    with pytest.raises(ConfigError, match="mnist's classes are built in"):
        experiment.Config.from_dict({**TINY, "out_dir": "unused", "class_names": ["a", "b"]})


@pytest.mark.needs_data
def test_mnist_at_another_size_and_in_colour_flows_to_the_unet_and_the_samples(tmp_path):
    images, labels = data.training_images("mnist", image_size=32, channels=3, limit=5)
    assert images.shape == (5, 3, 32, 32) and torch.equal(images[:, 0], images[:, 2])
    diffusion = experiment.build_diffusion(experiment.Config.from_dict(
        {**TINY, "out_dir": "unused", "image_size": 32, "channels": 3}))
    assert diffusion.image_size == (32, 32) and diffusion.channels == 3
    assert diffusion.sample(2, sampling_steps=2, sampler="ddim", progress=False).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("augment", [False, True])
def test_a_colour_folder_trains_samples_and_checks_for_memorisation(tmp_path, augment):
    write_images(tmp_path / "pics", 40)
    cfg = folder_config(tmp_path / "pics", tmp_path / "run", steps=2, batch_size=8, eval_samples=12, eval_steps=2,
                        num_sample_images=4, gif=True, augment=augment, hflip=augment)
    Experiment(cfg).run(progress=False)
    saved = experiment.Config.load(tmp_path / "run" / "config.json")
    assert (saved.image_size, saved.channels) == (16, 3)  # the run records the shape it trained at
    assert Image.open(tmp_path / "run" / "samples_final.png").mode == "RGB"
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["n_samples"] == 12 and 0 <= result["near_copy_share"] <= 1
    assert (tmp_path / "run" / "memorisation.png").exists()
    exp = Experiment.from_run_dir(tmp_path / "run")   # samples again from the directory alone
    assert exp.sample(2, steps=2).shape == (2, 3, 16, 16)


def test_memorisation_finds_a_copied_training_image_and_leaves_real_neighbours_out(tmp_path):
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8, generator=g)
    samples = torch.cat([train[7:8].float() / 255, torch.rand(3, 3, 8, 8, generator=g)])
    result, dist, index = evaluation.memorisation(samples, train, reference=50)
    assert index[0] == 7 and dist[0] < 1e-6
    assert result["near_copy_share"] == 0.25          # only the copy
    assert result["train_nearest_rms_median"] > 0.2   # each training image's nearest *other* image is far


def test_horizontal_flips_flip_about_half_of_each_batch(tmp_path, monkeypatch):
    exp = Experiment(experiment.Config.from_dict({**TINY, "out_dir": str(tmp_path / "run"), "hflip": True,
                                                  "batch_size": 400})).build(1)
    seen = {}
    weight = next(exp.diffusion.parameters())
    monkeypatch.setattr(exp, "train_module", lambda x, **kw: (seen.setdefault("x", x), weight.sum() * 0)[1])
    monkeypatch.setattr(exp.opt, "step", lambda: None)
    batch = torch.randint(0, 256, (400, 1, 28, 28), dtype=torch.uint8)
    exp.train_step(batch)
    original = batch.float() / 255
    flipped = (seen["x"] == original.flip(-1)).flatten(1).all(1)
    kept = (seen["x"] == original).flatten(1).all(1)
    assert bool((flipped | kept).all()) and 150 < int(flipped.sum()) < 250


@pytest.mark.needs_data
def test_make_colour_digits_writes_an_image_folder_and_refuses_a_full_one(tmp_path):
    out = tmp_path / "digits"
    ok = run_python(["experiment.py", "make-colour-digits", str(out), "--n", "20"], timeout=120)
    assert ok.returncode == 0, ok.stderr
    files = sorted(out.rglob("*.png"))
    assert len(files) == 20 and Image.open(files[0]).size == (32, 32) and Image.open(files[0]).mode == "RGB"
    assert data.folder_classes(out) is not None
    again = run_python(["experiment.py", "make-colour-digits", str(out), "--n", "20"], timeout=120)
    one_line_error(again, "already holds files")


def test_random_crops_are_windows_of_the_larger_prepared_images(tmp_path):
    write_images(tmp_path / "pics", 8)
    cfg = folder_config(tmp_path / "pics", tmp_path / "run", augment=True, batch_size=8)
    exp = Experiment(cfg)
    images = exp.load_training_data()
    assert images.shape[-1] == 16 + 16 // 8   # prepared 1/8 larger than the model's 16
    exp.build(1)
    x = images.float() / 255
    crops = exp._random_crop(x, 8, slice(0, None, 1))
    assert crops.shape == (8, 3, 16, 16)
    for image, crop in zip(x, crops):  # each crop is some window of its own image
        windows = image.unfold(1, 16, 1).unfold(2, 16, 1)            # (3, 3, 3, 16, 16)
        assert any(torch.equal(windows[:, i, j], crop) for i in range(3) for j in range(3))
    # and the window is drawn at random: 64 crops of one image, all from one of its 9 windows by
    # chance with probability 9^-63
    same_image = x[:1].expand(64, -1, -1, -1)
    assert len({crop.numpy().tobytes() for crop in exp._random_crop(same_image, 64, slice(0, None, 1))}) > 1
    assert torch.equal(exp.centre_crop(x), x[..., 1:17, 1:17])
