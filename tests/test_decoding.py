"""HiFi-GAN windows padded to shared shapes, batched, and in bfloat16: the audio must not change."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from voxflow.voices.channels_last import ChannelsLastConv, to_channels_last
from voxflow.voices.decoding import BUCKET_FRAMES, WindowDecoder, bucket
from voxflow.voices.fused_blocks import FusedResBlock, fusion_available
from voxflow.voices.vits.hifigan import Generator, GeneratorConfig, ResBlock1, ResBlock2


@pytest.fixture(scope="module")
def voice(engine):
    return engine.voice()


@pytest.fixture(scope="module")
def fp32(voice) -> WindowDecoder:
    return WindowDecoder(voice.model.dec, torch.float32)


def latents(frames: int, seed: int) -> torch.Tensor:
    return torch.randn(1, 192, frames, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=12, deadline=None)
@given(frames=st.integers(1, 40), pad=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_masked_padding_gives_the_unpadded_audio(voice, frames: int, pad: int, seed: int) -> None:
    """Whatever the padding holds, the first frames * hop samples are those of the bare window."""
    z = latents(frames, seed)
    junk = latents(pad, seed + 1) * 3  # not zeros: the mask, not the padding's values, must decide
    with torch.inference_mode():
        bare = voice.model.dec(z)
        padded = voice.model.dec(torch.cat([z, junk], dim=2), None, torch.tensor([frames]))
    hop = voice.hop_length
    assert padded.shape[2] == (frames + pad) * hop
    np.testing.assert_allclose(padded[..., : frames * hop].numpy(), bare.numpy(), atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    transposed=st.booleans(),
    kernel=st.integers(1, 7),
    dilation=st.integers(1, 3),
    stride=st.integers(1, 4),
    groups=st.sampled_from([1, 2, 4]),
    frames=st.integers(1, 30),
    seed=st.integers(0, 2**16),
)
def test_a_channels_last_conv_computes_what_its_1d_conv_does(
    transposed: bool, kernel: int, dilation: int, stride: int, groups: int, frames: int, seed: int
) -> None:
    torch.manual_seed(seed)
    if transposed:
        conv = torch.nn.ConvTranspose1d(
            8, 4, kernel, stride, padding=(kernel - 1) // 2, output_padding=stride - 1, groups=groups, dilation=max(dilation, stride)
        )
    else:
        conv = torch.nn.Conv1d(8, 4, kernel, padding=(kernel - 1) // 2 * dilation, dilation=dilation, groups=groups)
    x = torch.randn(2, 8, frames + kernel * dilation)
    with torch.inference_mode():
        want = conv(x)
        got = ChannelsLastConv(conv)(x)
        # What an earlier channels-last conv hands on: the same values with channels innermost.
        time_major = ChannelsLastConv(conv)(x.transpose(1, 2).contiguous().transpose(1, 2))
    assert got.shape == want.shape
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)
    np.testing.assert_allclose(time_major.numpy(), want.numpy(), atol=1e-5)


def test_the_cpu_decoder_runs_channels_last_and_leaves_the_model_as_loaded(voice, fp32: WindowDecoder) -> None:
    convs = [m for m in fp32.generator.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d))]
    assert convs == []
    assert any(isinstance(m, ChannelsLastConv) for m in fp32.generator.modules())
    assert all(not isinstance(m, ChannelsLastConv) for m in voice.model.dec.modules())


def test_the_cpu_decoder_fuses_every_residual_block_where_onednn_runs_it(fp32: WindowDecoder) -> None:
    assert fusion_available()  # x86-64 torch builds carry oneDNN
    assert not any(isinstance(m, (ResBlock1, ResBlock2)) for m in fp32.generator.modules())
    assert sum(isinstance(m, FusedResBlock) for m in fp32.generator.modules()) == len(fp32.generator.resblocks)


def test_the_fusion_probe_leaves_the_global_seed_alone() -> None:
    """It runs when the first decoder is built, inside whoever seeded torch before that."""
    state = torch.random.get_rng_state()
    assert fusion_available.__wrapped__()
    assert torch.equal(state, torch.random.get_rng_state())


def high_voice_decoder() -> Generator:
    """A random decoder shaped as Piper's "high" voices' (resblock 1); the medium default is resblock 2."""
    torch.manual_seed(3)
    cfg = GeneratorConfig(
        in_channels=192, resblock="1", resblock_kernel_sizes=(3, 7, 11), resblock_dilation_sizes=((1, 3, 5),) * 3,
        upsample_rates=(8, 8, 2, 2), upsample_initial_channel=512, upsample_kernel_sizes=(16, 16, 4, 4),
    )
    return Generator(cfg).eval()


@pytest.mark.parametrize("resblock", ["1", "2"])
def test_the_receptive_field_is_a_tight_bound(voice, resblock: str) -> None:
    """A change to one latent frame reaches output samples up to receptive_frames frames away
    on each side, and no further: block decoding needs that much context, and no more."""
    generator = voice.model.dec if resblock == "2" else high_voice_decoder()
    reach, hop = generator.cfg.receptive_frames, generator.cfg.hop_length
    frame = reach + 2
    z = latents(2 * reach + 5, 0)
    moved = z.clone()
    moved[:, :, frame] += 1.0
    with torch.inference_mode():
        changed = torch.nonzero(generator(z)[0, 0] != generator(moved)[0, 0]).flatten()
    farthest = max(frame * hop - int(changed.min()), int(changed.max()) - ((frame + 1) * hop - 1))
    assert (reach - 1) * hop < farthest <= reach * hop


def unfused(generator: Generator) -> Generator:
    """The decoder as it runs without fusion: a channels-last copy."""
    copy = Generator(generator.cfg).eval()
    copy.load_state_dict(generator.state_dict())
    to_channels_last(copy)
    return copy


@pytest.mark.parametrize("resblock", ["1", "2"])
def test_fused_blocks_give_the_unfused_audio_bit_for_bit(voice, resblock: str) -> None:
    """Padded and masked, batched, and bare: the fused float32 decoder's samples are the same
    floats as the unfused one's (the same operations in the same order)."""
    generator = voice.model.dec if resblock == "2" else high_voice_decoder()
    fused = WindowDecoder(generator, torch.float32)
    plain = unfused(generator)
    windows = [latents(n, n) for n in (7, 32, 45)]
    lengths = torch.tensor([7, 32, 45])
    padded = torch.cat([torch.nn.functional.pad(w, (0, 48 - w.shape[2])) for w in windows])
    with torch.inference_mode():
        assert torch.equal(fused.generator(padded, None, lengths), plain(padded, None, lengths))
        assert torch.equal(fused.generator(windows[1]), plain(windows[1]))


def test_a_batch_of_windows_equals_each_window_alone(voice, fp32: WindowDecoder) -> None:
    windows = [latents(n, n) for n in (9, 20, 33, 48)]
    together = fp32.batch(windows)
    with torch.inference_mode():
        alone = [voice.model.dec(w) for w in windows]
    for w, a, b in zip(windows, together, alone):
        assert a.shape == (1, 1, w.shape[2] * voice.hop_length) and a.dtype == torch.float32
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


def test_windows_reach_the_model_in_bucket_shapes(fp32: WindowDecoder) -> None:
    seen: list[int] = []
    handle = fp32.generator.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[2]))
    try:
        for frames in (1, 15, 16, 17, 40):
            fp32(latents(frames, 0))
    finally:
        handle.remove()
    assert seen == [16, 16, 16, 32, 48] == [bucket(n) for n in (1, 15, 16, 17, 40)]
    assert all(n % BUCKET_FRAMES == 0 for n in seen)


def test_bfloat16_decoder_stays_close_to_float32(voice, fp32: WindowDecoder) -> None:
    bf16 = WindowDecoder(voice.model.dec, torch.bfloat16)
    assert next(voice.model.dec.parameters()).dtype == torch.float32  # the model's own decoder is untouched
    assert bf16.generator.conv_post.weight.dtype == torch.float32  # the output layer stays wide
    z = latents(60, 7)
    a, b = fp32(z)[0, 0].numpy(), bf16(z)[0, 0].numpy()
    assert b.dtype == np.float32 and a.shape == b.shape
    # Measured: largest difference ~1.3e-3 on a signal of RMS ~1e-2, i.e. ~35 dB below it.
    assert np.abs(a - b).max() < 1e-2
    assert np.sqrt(np.mean((a - b) ** 2)) < 0.05 * np.sqrt(np.mean(a**2))


def test_speakers_in_one_batch_keep_their_own_conditioning(voice) -> None:
    """Several streams of one multi-speaker voice share a batch with a conditioning vector each."""
    cfg = voice.model.dec.cfg
    torch.manual_seed(0)
    generator = Generator(GeneratorConfig(**{**cfg.__dict__, "gin_channels": 8})).eval()
    decoder = WindowDecoder(generator, torch.float32)
    windows = [latents(12, 1), latents(20, 2)]
    g = torch.randn(2, 8, 1)
    together = decoder.batch(windows, g)
    for i, w in enumerate(windows):
        np.testing.assert_allclose(together[i].numpy(), decoder(w, g[i : i + 1]).numpy(), atol=1e-5)
