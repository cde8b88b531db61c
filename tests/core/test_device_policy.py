"""The device policy without a GPU: which device and dtype each option means, TF32, and float16 training."""

import pytest
import torch

from freelunch_cli.core import device as policy
from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.training.loop import MaskedOptimizer, MaskedParams, TrainConfig, train_window


@pytest.fixture
def four_gpus(monkeypatch):
    """CUDA with four devices, as far as the policy can tell; the device it selects is recorded."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    yield chosen
    policy.allow_tf32(False)


def test_auto_and_bare_cuda_are_the_local_ranks_gpu(four_gpus):
    assert policy.resolve_device("auto", {"LOCAL_RANK": "2"}) == torch.device("cuda", 2)
    assert policy.resolve_device("cuda", {"LOCAL_RANK": "3"}) == torch.device("cuda", 3)
    assert policy.resolve_device("cuda", {}) == torch.device("cuda", 0)
    assert policy.resolve_device("cuda:1", {"LOCAL_RANK": "3"}) == torch.device("cuda", 1)
    assert four_gpus == [torch.device("cuda", 2), torch.device("cuda", 3), torch.device("cuda", 0), torch.device("cuda", 1)]
    with pytest.raises(FreelunchError, match="this node has 4 GPU"):
        policy.resolve_device("cuda", {"LOCAL_RANK": "4"})


def test_tf32_is_on_for_every_cuda_spelling_and_off_inside_exact_matmul(four_gpus):
    for name in ("auto", "cuda", "cuda:0"):
        policy.allow_tf32(False)
        policy.resolve_device(name, {})
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32, name
    with policy.exact_matmul():
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32


def test_the_default_dtype_is_bfloat16_on_cuda_and_float32_on_the_cpu(four_gpus, monkeypatch):
    assert policy.resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert policy.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert policy.resolve_dtype("fp16", torch.device("cpu")) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert policy.resolve_dtype("auto", torch.device("cuda", 0)) == torch.float16


def test_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert policy.resolve("auto", "auto") == (torch.device("cpu"), torch.float32)
    with pytest.raises(FreelunchError, match="CUDA is not available"):
        policy.resolve_device("cuda")
    with pytest.raises(FreelunchError, match="unknown device 'tpu'"):
        policy.resolve_device("tpu")


def _problem(seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(16, 16)
    keep = torch.rand(16, 16) > 0.5
    with torch.no_grad():
        lin.weight.mul_(keep)
    x = torch.randn(32, 16)
    target = x @ torch.randn(16, 16)
    return lin, keep, x, target


def test_float16_training_scales_its_gradients_and_keeps_the_zeros():
    lin, keep, x, target = _problem()
    params = MaskedParams(list(lin.parameters()), {id(lin.weight): keep})
    opt = MaskedOptimizer(params, 1e-2, 0.0, 0, 10, "cpu", torch.float16, None, "test")
    assert opt.scaler is not None and opt.scaler.is_enabled()
    data = type("Data", (), {"batch": staticmethod(lambda idx: (x[idx], target[idx]))})
    out = train_window(
        lin,
        params,
        data,
        list(range(32)),
        [],
        TrainConfig(lr=1e-2, epochs=3, batch_size=8, loss_samples=None),
        "cpu",
        torch.float16,
    )
    assert out["loss_after"] < out["loss_before"] and torch.all(lin.weight[~keep] == 0)
    assert MaskedOptimizer(params, 1e-2, 0.0, 0, 10, "cpu", torch.bfloat16, None, "test").scaler is None


def test_a_non_finite_loss_is_caught_within_a_few_steps_without_a_sync_per_step():
    lin, keep, x, target = _problem()
    opt = MaskedOptimizer(
        MaskedParams(list(lin.parameters()), {}), 1e-2, 0.0, 0, 100, "cpu", torch.float32, None, "reconstruction"
    )
    loss = lambda: torch.mean((lin(x) - target) ** 2)  # noqa: E731
    for _ in range(3):
        opt.step(loss())
    opt.step(loss() * float("nan"))  # step 3
    with pytest.raises(FreelunchError, match="reconstruction loss became NaN or infinite within steps 0-15; lower --lr"):
        for _ in range(20):
            opt.step(loss())


def test_freelunch_deterministic_turns_on_deterministic_algorithms(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        policy.resolve_device("cpu", {"FREELUNCH_DETERMINISTIC": "1"})
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
        assert torch.backends.cudnn.deterministic
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # what cuBLAS needs for it
    finally:
        policy.use_deterministic(False)
    policy.resolve_device("cpu", {"FREELUNCH_DETERMINISTIC": "0"})
    assert not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(FreelunchError, match="FREELUNCH_DETERMINISTIC='maybe'"):
        policy.resolve_device("cpu", {"FREELUNCH_DETERMINISTIC": "maybe"})


def test_the_sync_guard_is_off_without_cuda_and_refuses_a_bad_mode(monkeypatch):
    monkeypatch.setenv("FREELUNCH_SYNC_DEBUG", "error")
    with policy.no_host_sync("cpu"), policy.host_sync():
        assert float(torch.ones(())) == 1.0  # the CPU: nothing to report
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: pytest.fail("set on a bad mode"))
    monkeypatch.setenv("FREELUNCH_SYNC_DEBUG", "loud")
    with pytest.raises(FreelunchError, match="use warn or error"):
        with policy.no_host_sync("cuda"):
            pass
