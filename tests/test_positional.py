"""fasttx.nn.PositionalEncoding: the sinusoidal table of "Attention Is All You Need", its layouts,
offsets, dtypes, dropout, state_dict and errors."""
import math

import pytest
import torch

import fasttx.nn as fnn
from fasttx.nn.positional import PositionalEncoding, sinusoidal_table

from utils import DTYPES


def _table_by_formula(max_len, d_model):
    """PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(pos / 10000^(2i/d)), element by
    element in Python floats (an independent oracle for the vectorised table)."""
    pe = torch.empty(max_len, d_model, dtype=torch.float64)
    for pos in range(max_len):
        for j in range(d_model):
            angle = pos / 10000 ** ((j - j % 2) / d_model)
            pe[pos, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return pe


@pytest.mark.parametrize("d_model", [1, 7, 16, 33])
def test_table_matches_the_paper(d_model):
    torch.testing.assert_close(sinusoidal_table(23, d_model, torch.float64), _table_by_formula(23, d_model),
                               atol=1e-12, rtol=0)


def test_long_positions_are_accurate():
    # Computed in fp64 and cast once: at pos 4999 an fp32 computation of pos * freq loses ~1e-4.
    pe = PositionalEncoding(64).pe
    exact = torch.tensor([math.sin(4999 / 10000 ** (j / 64)) for j in range(0, 64, 2)], dtype=torch.float64)
    assert pe.dtype == torch.float32
    torch.testing.assert_close(pe[4999, 0::2].double(), exact, atol=1e-7, rtol=0)


def test_exported_from_fasttx_nn():
    assert fnn.PositionalEncoding is PositionalEncoding


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["seq_first", "batch_first", "unbatched"])
def test_forward_adds_the_table(layout, dtype):
    S, N, E = 11, 3, 12
    m = PositionalEncoding(E, dropout=0.1, max_len=40, batch_first=(layout == "batch_first")).eval()
    shape = {"seq_first": (S, N, E), "batch_first": (N, S, E), "unbatched": (S, E)}[layout]
    x = torch.randn(shape, dtype=dtype)
    table = _table_by_formula(S + 5, E)
    for offset in (0, 5):
        pe = table[offset: offset + S]  # (S, E)
        if layout == "seq_first":
            pe = pe[:, None]  # (S, 1, E)
        expected = (x.double() + pe).to(dtype)
        y = m(x, offset=offset)
        assert y.dtype == dtype and y.shape == x.shape
        # one rounding of the sum in the output dtype, plus the table's own rounding when cast
        atol = {torch.float32: 1e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
        torch.testing.assert_close(y.double(), expected.double(), atol=atol, rtol=0)


def test_gradient_flows_to_input_only():
    m = PositionalEncoding(8, dropout=0.0, max_len=10)
    assert list(m.parameters()) == []
    x = torch.randn(5, 2, 8, requires_grad=True)
    g = torch.randn(5, 2, 8)
    m(x).backward(g)
    torch.testing.assert_close(x.grad, g, atol=0, rtol=0)


def test_nan_propagates():
    m = PositionalEncoding(4, dropout=0.0).eval()
    x = torch.zeros(3, 4)
    x[1, 2] = float("nan")
    y = m(x)
    assert torch.isnan(y[1, 2]) and torch.isnan(y).sum() == 1


def test_zero_size():
    m = PositionalEncoding(6, dropout=0.5)
    assert m(torch.empty(4, 0, 6)).shape == (4, 0, 6)
    assert m(torch.empty(0, 2, 6)).shape == (0, 2, 6)


def test_dropout(backend):
    torch.manual_seed(0)
    p = 0.25
    m = PositionalEncoding(32, dropout=p, max_len=32, batch_first=True)
    x = torch.randn(2, 32, 32)
    clean = x + m.pe[:32]
    m.train()
    y = m(x)
    kept = y != 0
    frac = kept.float().mean().item()
    assert abs(frac - (1 - p)) < 0.05, frac  # 2048 draws: the std of the fraction is ~0.01
    torch.testing.assert_close(y[kept], clean[kept] / (1 - p), atol=1e-5, rtol=1e-5)
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(1)
    b = m(x)
    assert torch.equal(a, b), "the same seed must give the same mask"
    assert not torch.equal(a, m(x)), "a new seed must give a new mask"
    m.eval()
    torch.testing.assert_close(m(x), clean, atol=0, rtol=0)


def test_buffer_is_not_persistent_and_round_trips():
    m = PositionalEncoding(10, dropout=0.1, max_len=20)
    assert "pe" in dict(m.named_buffers())
    sd = m.state_dict()
    assert len(sd) == 0  # the table is a function of (d_model, max_len): never checkpointed
    other = PositionalEncoding(10, dropout=0.1, max_len=20)
    other.load_state_dict(sd)  # strict load succeeds
    x = torch.randn(7, 10)
    torch.testing.assert_close(other.eval()(x), m.eval()(x), atol=0, rtol=0)
    # the buffer follows .to()
    assert m.to(torch.float64).pe.dtype == torch.float64


def test_repr():
    assert repr(PositionalEncoding(16, dropout=0.2, max_len=100, batch_first=True)) == (
        "PositionalEncoding(16, dropout=0.2, max_len=100, batch_first=True)"
    )


def test_bad_inputs():
    with pytest.raises(ValueError, match="d_model must be a positive int"):
        PositionalEncoding(0)
    with pytest.raises(ValueError, match="max_len must be a positive int"):
        PositionalEncoding(8, max_len=0)
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
        PositionalEncoding(8, dropout=1.5)
    m = PositionalEncoding(8, max_len=10)
    with pytest.raises(ValueError, match="E=8"):
        m(torch.randn(3, 2, 9))
    with pytest.raises(ValueError, match="E=8"):
        m(torch.randn(8))
    with pytest.raises(ValueError, match="exceed max_len=10"):
        m(torch.randn(11, 2, 8))
    with pytest.raises(ValueError, match="exceed max_len=10"):
        m(torch.randn(3, 2, 8), offset=8)
