import pytest
import torch
import torch.nn.functional as F

from alit_fast.config import VQGANConfig
from alit_fast.models.vqgan import BaseTokenizer, ResBlock

CFG = VQGANConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32, codebook_size=48)


def test_shortcut_is_applied_to_the_residual_branch_output():
    torch.manual_seed(0)
    block = ResBlock(32, 64).eval()
    x = torch.randn(2, 32, 8, 8)
    h = block.conv1(F.silu(block.norm1(x)))
    h = block.conv2(F.silu(block.norm2(h)))
    torch.testing.assert_close(block(x), block.nin_shortcut(h) + h)
    # the shortcut takes out_channels in, not in_channels: that is how the weights are shaped
    assert block.nin_shortcut.weight.shape == (64, 64, 1, 1)


def test_same_width_block_adds_its_input():
    torch.manual_seed(0)
    block = ResBlock(32, 32).eval()
    x = torch.randn(2, 32, 8, 8)
    h = block.conv2(F.silu(block.norm2(block.conv1(F.silu(block.norm1(x))))))
    torch.testing.assert_close(block(x), x + h)
    assert block.nin_shortcut is None


def test_encoder_downsamples_by_average_pooling():
    torch.manual_seed(0)
    tok = BaseTokenizer(CFG).eval()
    enc = tok.vqgan.encoder
    x = torch.rand(2, 3, 32, 32)
    h = enc.conv_in(x)
    for i, level in enumerate(enc.down):
        for block in level.block:
            h = block(h)
        if i != len(enc.down) - 1:
            h = F.avg_pool2d(h, 2)
    h = enc.mid.block_2(enc.mid.block_1(h))
    expected = enc.conv_out(F.silu(enc.norm_out(h)))
    torch.testing.assert_close(enc(x), expected)
    assert not any("downsample" in k for k in tok.state_dict())
    assert expected.shape == (2, 32, 8, 8)


def test_base_tokenizer_layout_and_round_trip_shapes():
    torch.manual_seed(0)
    tok = BaseTokenizer(CFG).eval()
    keys = tok.state_dict().keys()
    assert "vqgan.decoder.up.1.upsample.conv.bias" in keys
    assert "vqgan.decoder.up.0.upsample.conv.weight" not in keys
    assert "vqgan.encoder.conv_in.bias" not in keys  # encoder conv_in has no bias
    assert "vqgan.decoder.conv_in.bias" in keys
    x = torch.rand(3, 3, 32, 32)
    z, idx = tok.encode(x)
    assert z.shape == (3, 32, 8, 8) and idx.shape == (3, 64) and idx.dtype == torch.int64
    # indices are the plain nearest codes of z, row-major over the grid
    flat = z.permute(0, 2, 3, 1).reshape(-1, 32)
    expected = torch.cdist(flat.double(), tok.codebook.double()).argmin(1).view(3, 64)
    assert torch.equal(idx, expected)
    assert tok.decode_indices(idx).shape == (3, 3, 32, 32)
    tokens = tok.codebook[idx]
    torch.testing.assert_close(tok.decode_latents(tokens), tok.decode_indices(idx))


def test_decode_indices_rejects_out_of_range_codes():
    tok = BaseTokenizer(CFG)
    with pytest.raises(ValueError, match=r"\[0, 48\)"):
        tok.decode_indices(torch.full((1, 64), 48))


def test_group_norm_groups_follow_the_config():
    official = BaseTokenizer(VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=32, codebook_size=8))
    assert {m.num_groups for m in official.modules() if isinstance(m, torch.nn.GroupNorm)} == {32}
    narrow = BaseTokenizer(VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=32, codebook_size=8, min_group_channels=4))
    assert {(m.num_groups, m.num_channels) for m in narrow.modules() if isinstance(m, torch.nn.GroupNorm)} == {(8, 32), (16, 64)}
    with pytest.raises(ValueError, match="groups"):
        BaseTokenizer(VQGANConfig(ch=24, ch_mult=(1,), num_res_blocks=1, z_channels=8, codebook_size=8, norm_groups=16))
