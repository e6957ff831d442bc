import pathlib

import pytest

SHARED_MNIST = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


@pytest.fixture
def mnist_dir():
    if not (SHARED_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real MNIST not found at {SHARED_MNIST}")
    return SHARED_MNIST


@pytest.fixture(scope="session")
def mnist_lmdb(tmp_path_factory):
    """The real MNIST converted once per test session: a folder with mnist_{train,test}_lmdb."""
    from minicaffe.datasets.mnist import prepare_mnist
    if not (SHARED_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real MNIST not found at {SHARED_MNIST}")
    out = tmp_path_factory.mktemp("mnist")
    prepare_mnist(out, source=str(SHARED_MNIST))
    return out
