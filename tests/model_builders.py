"""Small-config diffusers transformers of every supported family, with inputs on an odd grid (random weights)."""

from __future__ import annotations

import torch


def cogvideox():
    from diffusers import CogVideoXTransformer3DModel
    torch.manual_seed(0)
    m = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=20, sample_height=12, sample_frames=9, patch_size=2, max_text_seq_length=7,
        use_rotary_positional_embeddings=True, temporal_compression_ratio=4).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 4, 12, 20, generator=g)
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    cos, sin = get_3d_rotary_pos_embed(16, ((0, 0), (6, 10)), (6, 10), temporal_size=3)
    kw = dict(hidden_states=x, encoder_hidden_states=torch.randn(1, 7, 16, generator=g), timestep=torch.tensor([500]), image_rotary_emb=(cos, sin))
    return m, kw, (3, 6, 10), 7


def ltx():
    from diffusers import LTXVideoTransformer3DModel
    torch.manual_seed(0)
    m = LTXVideoTransformer3DModel(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, num_layers=2, caption_channels=16).eval()
    g = torch.Generator().manual_seed(1)
    F, H, W = 3, 6, 10
    x = torch.randn(1, F*H*W, 4, generator=g)
    kw = dict(hidden_states=x, encoder_hidden_states=torch.randn(1, 7, 16, generator=g), timestep=torch.tensor([500]),
        encoder_attention_mask=torch.ones(1, 7), num_frames=F, height=H, width=W, rope_interpolation_scale=(torch.tensor(1.0), 1.0, 1.0))
    return m, kw, (F, H, W), 0


def mochi():
    from diffusers import MochiTransformer3DModel
    torch.manual_seed(0)
    m = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2, pooled_projection_dim=16,
        in_channels=4, out_channels=4, text_embed_dim=16, time_embed_dim=4, max_sequence_length=7).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 3, 12, 20, generator=g)
    kw = dict(hidden_states=x, encoder_hidden_states=torch.randn(1, 7, 16, generator=g), timestep=torch.tensor([500]),
        encoder_attention_mask=torch.tensor([[1,1,1,1,1,0,0]]))
    return m, kw, (3, 6, 10), 5


def flux():
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    m = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)).eval()
    g = torch.Generator().manual_seed(1)
    H, W = 6, 10
    ids = torch.zeros(H, W, 3); ids[..., 1] = torch.arange(H)[:, None]; ids[..., 2] = torch.arange(W)[None]
    kw = dict(hidden_states=torch.randn(1, H*W, 4, generator=g), encoder_hidden_states=torch.randn(1, 7, 16, generator=g),
        pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([0.5]), img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(7, 3))
    return m, kw, (1, H, W), 7


def sd3(dual_attention_layers=()):
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    m = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=32, pooled_projection_dim=16, out_channels=4, pos_embed_max_size=32, dual_attention_layers=dual_attention_layers).eval()
    g = torch.Generator().manual_seed(1)
    kw = dict(hidden_states=torch.randn(1, 4, 12, 20, generator=g), encoder_hidden_states=torch.randn(1, 7, 16, generator=g),
        pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([500]))
    return m, kw, (1, 6, 10), 7


def hunyuan():
    from diffusers import HunyuanVideoTransformer3DModel
    torch.manual_seed(0)
    m = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6)).eval()
    g = torch.Generator().manual_seed(1)
    kw = dict(hidden_states=torch.randn(2, 4, 3, 12, 20, generator=g), timestep=torch.tensor([500, 500]), encoder_hidden_states=torch.randn(2, 7, 16, generator=g),
        encoder_attention_mask=torch.tensor([[1,1,1,1,1,0,0],[1,1,1,0,0,0,0]]), pooled_projections=torch.randn(2, 8, generator=g), guidance=torch.tensor([3000.0, 3000.0]))
    return m, kw, (3, 6, 10), 7


def qwen():
    from diffusers import QwenImageTransformer2DModel
    torch.manual_seed(0)
    m = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(4, 6, 6)).eval()
    g = torch.Generator().manual_seed(1)
    kw = dict(hidden_states=torch.randn(2, 60, 16, generator=g), encoder_hidden_states=torch.randn(2, 7, 16, generator=g),
        encoder_hidden_states_mask=torch.tensor([[1,1,1,1,1,0,0],[1,1,1,1,1,1,1]]), timestep=torch.tensor([0.5, 0.5]), img_shapes=[[(1, 6, 10)], [(1, 6, 10)]])
    return m, kw, (1, 6, 10), 7


def wan():
    from conftest import make_wan_transformer, wan_inputs

    x, t, text = wan_inputs(batch=2, frames=3, height=6, width=10)
    return make_wan_transformer(), dict(hidden_states=x, timestep=t, encoder_hidden_states=text), (3, 6, 10), 0


# family -> (builder, text position, batch elements per attention call)
BUILDERS = {
    "wan": wan,
    "hunyuan-video": hunyuan,
    "cogvideox": cogvideox,
    "ltx-video": ltx,
    "mochi": mochi,
    "flux": flux,
    "sd3": sd3,
    "qwenimage": qwen,
}
