"""Sizes mean what they say: SI units are powers of 1000, binary units powers of 1024, in every option."""

import pytest

from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.core.units import format_bytes, is_plain_number, parse_size


def test_si_and_binary_units():
    assert parse_size("2GB", "--x") == 2_000_000_000
    assert parse_size("2GiB", "--x") == 2 * 1024**3
    assert parse_size("500MB", "--x") == 500_000_000
    assert parse_size("1.5KiB", "--x") == 1536
    assert parse_size("60kb", "--x") == 60_000
    assert parse_size("123", "--x") == 123 and parse_size(7, "--x") == 7


@pytest.mark.parametrize("bad", ["2 GBs", "GB", "-1GB", "1e3", ""])
def test_a_bad_size_names_the_option(bad):
    with pytest.raises(FreelunchError, match="--max-shard-size must be a size"):
        parse_size(bad, "--max-shard-size")


def test_plain_numbers_and_formatting():
    assert is_plain_number("0.8") and not is_plain_number("0.8GB")
    assert format_bytes(1000) == "1000 B" and format_bytes(288 * 1024) == "288.0 KiB"
    assert format_bytes(2.2 * 1024**3) == "2.2 GiB"


def test_max_memory_reads_fractions_and_sizes():
    import torch

    from freelunch_cli.reconstruction.memory import device_memory, parse_memory

    cpu = torch.device("cpu")
    assert parse_memory("0.5", cpu) == int(0.5 * device_memory(cpu))
    assert parse_memory("40GiB", cpu) == 40 * 2**30 and parse_memory("40GB", cpu) == 40 * 10**9
