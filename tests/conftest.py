"""Fixtures shared by every test folder: tiny saved models and calibrated work directories (helpers.py builds them)."""

import os
import shutil

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from freelunch_cli.stages.calibrate import CalibrateConfig, calibrate  # noqa: E402
from freelunch_cli.workdir.directory import WorkDir  # noqa: E402

from helpers import ARCHS, CALIB, SAMPLES, SEQLEN, make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """One saved tiny model folder per architecture."""
    root = tmp_path_factory.mktemp("models")
    return {arch: make_tiny_model(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def calibrated(tiny_models, tmp_path_factory):
    """A calibrated work directory per architecture (read-only: copy it with ``fresh_work``)."""
    root = tmp_path_factory.mktemp("calibrated")
    out = {}
    for arch, folder in tiny_models.items():
        work = WorkDir(root / arch)
        calibrate(work, CalibrateConfig(model=str(folder), data=str(CALIB), samples=SAMPLES, seqlen=SEQLEN, batch_size=8))
        out[arch] = work
    return out


@pytest.fixture
def fresh_work(calibrated, tmp_path):
    """Copy a calibrated work directory so a test can run later stages on it."""

    count = iter(range(1000))

    def make(arch: str = "llama") -> WorkDir:
        dst = tmp_path / f"work-{arch}-{next(count)}"
        shutil.copytree(calibrated[arch].root, dst)
        return WorkDir(dst)

    return make
