import pytest
import torch
from safetensors.torch import load_file

from freelunch_cli.workdir.files import StreamingTensorWriter, TensorRows, sha256_file, write_bytes_atomic


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_streaming_writer_roundtrips_and_hashes(tmp_path, dtype):
    x = torch.randn(7, 5, 3).to(dtype)
    path = tmp_path / "a.safetensors"
    with StreamingTensorWriter(path, "hidden", x.shape, dtype, {"k": 1}) as w:
        for s in range(0, 7, 3):
            w.append(x[s : s + 3])
    assert torch.equal(load_file(path)["hidden"], x)
    assert w.info == sha256_file(path)
    rows = TensorRows(path)
    assert torch.equal(rows.take([4, 0, 5, 6]), x[[4, 0, 5, 6]])
    assert torch.equal(rows.rows(2, 4), x[2:4])


def test_streaming_writer_leaves_nothing_when_interrupted(tmp_path):
    path = tmp_path / "b.safetensors"
    with pytest.raises(RuntimeError):
        with StreamingTensorWriter(path, "hidden", (4, 2), torch.float32) as w:
            w.append(torch.zeros(2, 2))
            raise RuntimeError("killed")
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "f.json"
    write_bytes_atomic(path, b"old")

    with pytest.raises(TypeError):
        write_bytes_atomic(path, None)  # fails while writing
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_a_full_disk_in_the_background_writer_removes_the_file_and_names_it(tmp_path, monkeypatch):
    import errno

    path = tmp_path / "boundary_001.safetensors"
    w = StreamingTensorWriter(path, "hidden", (4, 3), torch.float16)
    calls = []

    def full(b):
        calls.append(len(b))
        if len(calls) > 1:  # the header went through, the first rows do not
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(w, "_write", full)
    with pytest.raises(OSError) as e:
        with w:
            for _ in range(4):
                w.append(torch.ones(1, 3))
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary remains
