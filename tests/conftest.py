"""Settings shared by every test module."""

import os

import pytest

import data


@pytest.fixture(autouse=True, scope="session")
def data_root_that_keeps_test_folders_out_of_the_users_cache(tmp_path_factory):
    """DIFFUSION_DATA, for this process and the command-line runs the tests start, points at a
    temporary root whose MNIST and Fashion-MNIST folders link to the real, prepared ones: the tests
    read the real files, but the image folders they decode (new temporary folders in every run,
    so new cache entries) are cached in the temporary root instead of in ~/.cache for good."""
    real, root = data.default_data_root(), tmp_path_factory.mktemp("data_root")
    for folder in data.DATASETS.values():
        (real / folder).mkdir(parents=True, exist_ok=True)  # prepared there if it is not yet
        (root / folder).symlink_to(real / folder, target_is_directory=True)
    before = os.environ.get("DIFFUSION_DATA")
    os.environ["DIFFUSION_DATA"] = str(root)
    yield root
    if before is None:
        del os.environ["DIFFUSION_DATA"]
    else:
        os.environ["DIFFUSION_DATA"] = before
