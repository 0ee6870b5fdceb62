"""The shading attention inside the real CompVis/ldm UNet that the WebUI runs for SD1.x."""
import pytest
import torch

from helpers import build_unet, random_official_state
from lib_migc.core.masks import MaskCache
from lib_migc.core.patching import ForwardPatches
from lib_migc.core.unet_layers import MIGC_LAYERS, attn2_layers
from lib_migc.modes.migc.checkpoint import blocks_from_state
from lib_migc.modes.migc.shading import InstanceConditioning, LayerShader, ShadingMode, draw_sac_permutations

BOXES = [(0.05, 0.1, 0.5, 0.9), (0.45, 0.2, 0.95, 0.7)]


@pytest.fixture(scope="module")
def tiny_unet():
    return build_unet(model_channels=32, seed=0)


def _conditioning(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return InstanceConditioning.build(torch.randn((n, 77, 768), generator=g), torch.randn((n, 768), generator=g), BOXES[:n])


def _install(patches, unet, cond, blocks, width, height, naive_elsewhere=True, seed=9):
    """All rows treated as cond rows (no CFG here; row selection is the host adapters' job)."""
    cache = MaskCache.from_boxes([tuple(b) for b in cond.boxes.tolist()], height, width)
    gens = None
    for name, attn in attn2_layers(unet).items():
        block = blocks.get(name)
        mode = ShadingMode.MIGC if block is not None else (ShadingMode.NAIVE if naive_elsewhere else ShadingMode.VANILLA)
        plain = lambda x, ctx, attn=attn: type(attn).forward(attn, x, context=ctx)  # noqa: E731
        shader = LayerShader(attn, plain, cond, block)

        def forward(x, context=None, mask=None, shader=shader, mode=mode):
            nonlocal gens
            gens = gens or [torch.Generator().manual_seed(seed + i) for i in range(x.shape[0])]
            masks = cache.for_tokens(x.shape[1], x.device, x.dtype)
            return shader(x, context, masks, mode, perms=draw_sac_permutations(gens, x.device))

        patches.install(attn, forward)


def _run(unet, width, height, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, 4, height // 8, width // 8), generator=g)
    ctx = torch.randn((batch, 77, 768), generator=g)
    with torch.no_grad():
        return unet(x, torch.full((batch,), 500.0), context=ctx)


def test_finds_all_16_cross_attention_layers_with_the_sd1_names(tiny_unet):
    layers = attn2_layers(tiny_unet)
    assert len(layers) == 16
    assert set(MIGC_LAYERS) <= set(layers)
    assert {layers[name].to_q.in_features for name in MIGC_LAYERS} == {128}  # 4 x model_channels


def _tiny_blocks():
    state = random_official_state(seed=5, channels=128, key=lambda layer, sub: f"{layer}.transformer_blocks.0.attn2.{sub}")
    return blocks_from_state(state).blocks


@pytest.mark.parametrize("width,height", [(256, 256), (384, 256), (256, 384)])
def test_migc_changes_the_unet_output_and_removal_restores_it_exactly(tiny_unet, width, height):
    before = _run(tiny_unet, width, height, batch=2)
    with ForwardPatches() as patches:
        _install(patches, tiny_unet, _conditioning(2), _tiny_blocks(), width, height)
        with_migc = _run(tiny_unet, width, height, batch=2)
    after = _run(tiny_unet, width, height, batch=2)
    assert torch.isfinite(with_migc).all()
    assert (with_migc - before).abs().amax() > 1e-3 * before.abs().amax()
    assert torch.equal(after, before)
    assert not any("forward" in m.__dict__ for m in tiny_unet.modules())


def test_same_seed_gives_the_same_unet_output(tiny_unet):
    outs = []
    for _ in range(2):
        with ForwardPatches() as patches:
            _install(patches, tiny_unet, _conditioning(2), _tiny_blocks(), 256, 256, seed=4)
            outs.append(_run(tiny_unet, 256, 256))
    assert torch.equal(outs[0], outs[1])


def test_zero_instances_leave_the_unet_bit_identical(tiny_unet):
    before = _run(tiny_unet, 256, 256)
    cond = InstanceConditioning.build(torch.zeros((0, 77, 768)), torch.zeros((0, 768)), [])
    with ForwardPatches() as patches:
        _install(patches, tiny_unet, cond, _tiny_blocks(), 256, 256)
        assert torch.equal(_run(tiny_unet, 256, 256), before)


def test_full_size_sd1_unet_runs_the_official_checkpoint_layout():
    """C = 1280 at the MIGC layers: the official key list loads onto the real SD1 UNet's layers."""
    unet = build_unet(model_channels=320, seed=0)
    layers = attn2_layers(unet)
    blocks = blocks_from_state(random_official_state(seed=6)).blocks
    assert {name: layers[name].to_q.in_features for name in blocks} == {name: 1280 for name in MIGC_LAYERS}
    before = _run(unet, 128, 192)
    with ForwardPatches() as patches:
        _install(patches, unet, _conditioning(2), blocks, 128, 192, naive_elsewhere=False)
        out = _run(unet, 128, 192)
    assert torch.isfinite(out).all()
    assert (out - before).abs().amax() > 1e-4 * before.abs().amax()
    assert torch.equal(_run(unet, 128, 192), before)
