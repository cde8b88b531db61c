"""Fixtures shared by every test folder: tiny saved models and calibrated work directories (helpers.py builds them)."""

import os
import shutil

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from freelunch_cli.stages.calibrate import CalibrateConfig, calibrate  # noqa: E402
from freelunch_cli.workdir.directory import WorkDir  # noqa: E402

from helpers import ARCHS, CALIB, MORE_ARCHS, SAMPLES, SEQLEN, make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """One saved tiny model folder per architecture (ARCHS, and the MORE_ARCHS the field cases brought)."""
    root = tmp_path_factory.mktemp("models")
    return {arch: make_tiny_model(root / arch, arch) for arch in ARCHS + MORE_ARCHS}


def _calibrate(models, root, arch) -> WorkDir:
    work = WorkDir(root / arch)
    calibrate(work, CalibrateConfig(model=str(models[arch]), data=str(CALIB), samples=SAMPLES, seqlen=SEQLEN, batch_size=8))
    return work


@pytest.fixture(scope="session")
def calibrated(tiny_models, tmp_path_factory):
    """A calibrated work directory per architecture of ARCHS (read-only: copy it with ``fresh_work``)."""
    root = tmp_path_factory.mktemp("calibrated")
    return {arch: _calibrate(tiny_models, root, arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def more_calibrated(tiny_models, tmp_path_factory):
    """Calibrated work directories of MORE_ARCHS (mixture of experts, sandwich norms, fused projections)."""
    root = tmp_path_factory.mktemp("more-calibrated")
    return {arch: _calibrate(tiny_models, root, arch) for arch in MORE_ARCHS}


@pytest.fixture
def fresh_work(calibrated, tmp_path, request):
    """Copy a calibrated work directory so a test can run later stages on it."""

    count = iter(range(1000))

    def make(arch: str = "llama") -> WorkDir:
        dst = tmp_path / f"work-{arch}-{next(count)}"
        source = calibrated if arch in calibrated else request.getfixturevalue("more_calibrated")
        shutil.copytree(source[arch].root, dst)
        return WorkDir(dst)

    return make
