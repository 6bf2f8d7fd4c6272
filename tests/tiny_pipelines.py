"""Tiny diffusers pipelines of every family, built offline from small configs with random weights.

Each builder returns a real pipeline (text encoders, tokenizers, VAE, scheduler, transformer) small
enough to run a few denoising steps on a CPU in seconds; `save_tiny_pipeline(family, directory)`
writes it with ``save_pretrained`` so that ``PipelineClass.from_pretrained(directory)`` loads it back
with no hub access. The example scripts in ``examples/`` are smoke-tested on these directories.

Tokenizers are word-level `tokenizers` models wrapped in `transformers.PreTrainedTokenizerFast`
(unknown words map to ``<unk>``), so no vocabulary file needs downloading. Each family's entry in
`FAMILIES` also records the smallest valid generation settings for it (resolution, frames).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = (
    "a an the of in on at with and to is red blue green white black small big fox cat dog bird tree snow "
    "water sky sun running walking flying sitting through over under city street forest mountain river "
    "ocean beach night day light video image photo cinematic realistic slow motion camera close up"
).split()


def word_tokenizer(model_max_length: int = 32, clip_style: bool = False):
    """A whitespace word-level fast tokenizer (T5/Llama style specials, or CLIP's when ``clip_style``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if clip_style:
        specials = {"pad_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "bos_token": "<|startoftext|>", "unk_token": "<|endoftext|>"}
        vocab_list = ["<|startoftext|>", "<|endoftext|>"]
    else:
        specials = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
        vocab_list = ["<pad>", "</s>", "<unk>"]
    vocab_list += [w for w in WORDS if w not in vocab_list]
    vocab = {w: i for i, w in enumerate(vocab_list)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=model_max_length, **specials)


def t5_encoder(d_model: int, vocab_size: int, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=2,
                        relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0, pad_token_id=0)
    return model_cls(config).eval()


def clip_text_encoder(hidden: int, vocab_size: int, projection_dim: int | None = None, max_positions: int = 77):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=max_positions, projection_dim=projection_dim or hidden,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection_dim else CLIPTextModel)(config).eval()


def flow_scheduler(**kw):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**kw)


# --------------------------------------------------------------------------------------- families
def wan(two_transformers: bool = False):
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    tok = word_tokenizer()
    transformer_kw = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                          text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64)
    extra = {}
    if two_transformers:  # Wan 2.2 A14B layout: a high-noise and a low-noise expert
        extra = dict(transformer_2=WanTransformer3DModel(**transformer_kw), boundary_ratio=0.5)
    return WanPipeline(
        tokenizer=tok,
        text_encoder=t5_encoder(32, len(tok), umt5=True),
        vae=AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
                             latents_mean=[0.0] * 4, latents_std=[1.0] * 4),
        scheduler=flow_scheduler(shift=3.0),
        transformer=WanTransformer3DModel(**transformer_kw),
        **extra,
    )


def wan22():
    return wan(two_transformers=True)


def wan_i2v():
    """Wan 2.1 I2V layout: a CLIP vision encoder and a transformer taking image embeddings."""
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    tok = word_tokenizer()
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                              image_size=32, patch_size=8, projection_dim=16)).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return WanImageToVideoPipeline(
        tokenizer=tok,
        text_encoder=t5_encoder(32, len(tok), umt5=True),
        vae=AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
                             latents_mean=[0.0] * 4, latents_std=[1.0] * 4),
        scheduler=flow_scheduler(shift=3.0),
        image_processor=processor,
        image_encoder=vision,
        # latents (4) + first-frame mask (4 = temporal compression) + encoded condition (4)
        transformer=WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=12,
                                          out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64,
                                          image_dim=16),
    )


def cogvideox():
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(0)
    tok = word_tokenizer()
    return CogVideoXPipeline(
        tokenizer=tok,
        text_encoder=t5_encoder(16, len(tok)),
        vae=AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
                                   block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                   temporal_compression_ratio=4, sample_height=96, sample_width=160),
        transformer=CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                                time_embed_dim=8, text_embed_dim=16, num_layers=2, sample_width=20, sample_height=12,
                                                sample_frames=9, patch_size=2, max_text_seq_length=16,
                                                use_rotary_positional_embeddings=True, temporal_compression_ratio=4),
        scheduler=CogVideoXDDIMScheduler(timestep_spacing="trailing"),
    )


def ltx_video():
    from diffusers import AutoencoderKLLTXVideo, LTXPipeline, LTXVideoTransformer3DModel

    torch.manual_seed(0)
    tok = word_tokenizer()
    return LTXPipeline(
        scheduler=flow_scheduler(),
        vae=AutoencoderKLLTXVideo(latent_channels=4, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                                  layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
                                  spatio_temporal_scaling=(True, True, False, False), decoder_spatio_temporal_scaling=(True, True, False, False),
                                  decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4, upsample_factor=(1,) * 4,
                                  timestep_conditioning=False, patch_size=4, patch_size_t=1, encoder_causal=True, decoder_causal=False),
        text_encoder=t5_encoder(16, len(tok)),
        tokenizer=tok,
        transformer=LTXVideoTransformer3DModel(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2,
                                               attention_head_dim=16, cross_attention_dim=32, num_layers=2, caption_channels=16),
    )


def mochi():
    from diffusers import AutoencoderKLMochi, MochiPipeline, MochiTransformer3DModel

    torch.manual_seed(0)
    tok = word_tokenizer()
    return MochiPipeline(
        scheduler=flow_scheduler(),
        vae=AutoencoderKLMochi(latent_channels=12, out_channels=3, encoder_block_out_channels=(32, 32, 32, 32),
                               decoder_block_out_channels=(32, 32, 32, 32), layers_per_block=(1, 1, 1, 1, 1),
                               add_attention_block=(False,) * 5, latents_mean=(0.0,) * 12, latents_std=(1.0,) * 12),  # the pipeline assumes 12 channels
        text_encoder=t5_encoder(16, len(tok)),
        tokenizer=tok,
        transformer=MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                                            pooled_projection_dim=16, in_channels=12, out_channels=12, text_embed_dim=16,
                                            time_embed_dim=4, max_sequence_length=16),
    )


def image_vae(latent_channels: int, **kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=latent_channels,
                         norm_num_groups=2, sample_size=32, **kw)


def flux():
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    clip_tok, t5_tok = word_tokenizer(77, clip_style=True), word_tokenizer()
    return FluxPipeline(
        scheduler=flow_scheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096,
                                 base_shift=0.5, max_shift=1.15),
        vae=image_vae(4, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=clip_text_encoder(16, len(clip_tok)),
        tokenizer=clip_tok,
        text_encoder_2=t5_encoder(16, len(t5_tok)),
        tokenizer_2=t5_tok,
        transformer=FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                           num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                                           guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
    )


def sd3():
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    clip_tok, clip_tok_2, t5_tok = word_tokenizer(77, clip_style=True), word_tokenizer(77, clip_style=True), word_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                                          num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                                          pooled_projection_dim=32, out_channels=4, pos_embed_max_size=32),
        scheduler=flow_scheduler(shift=3.0),
        vae=image_vae(4, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035),
        # pooled: 16 + 16 = pooled_projection_dim; the CLIP hidden states (16 + 16) are padded to the T5 width (32)
        text_encoder=clip_text_encoder(16, len(clip_tok), projection_dim=16),
        tokenizer=clip_tok,
        text_encoder_2=clip_text_encoder(16, len(clip_tok_2), projection_dim=16),
        tokenizer_2=clip_tok_2,
        text_encoder_3=t5_encoder(32, len(t5_tok)),
        tokenizer_3=t5_tok,
    )


def hunyuan_video():
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    llama_tok, clip_tok = word_tokenizer(512), word_tokenizer(77, clip_style=True)
    # the pipeline reads the hidden states 3 layers from the top, so the Llama needs at least 3 layers
    llama = LlamaModel(LlamaConfig(vocab_size=len(llama_tok), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0)).eval()
    return HunyuanVideoPipeline(
        text_encoder=llama,
        tokenizer=llama_tok,
        transformer=HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                                   num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
                                                   patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6)),
        vae=AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                                      spatial_compression_ratio=8, temporal_compression_ratio=4, mid_block_add_attention=False),
        scheduler=flow_scheduler(shift=7.0),
        text_encoder_2=clip_text_encoder(8, len(clip_tok)),
        tokenizer_2=clip_tok,
    )


def qwenimage():
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    # the pipeline drops the first 34 tokens of its chat template, which this tokenizer splits into ~50 tokens
    tok = word_tokenizer(1024)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=1, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0]),
        vocab_size=len(tok), hidden_size=16, pad_token_id=0,
    )
    return QwenImagePipeline(
        scheduler=flow_scheduler(shift=1.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=8192,
                                 base_shift=0.5, max_shift=0.9, shift_terminal=0.02, time_shift_type="exponential"),
        vae=AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
                                   latents_mean=[0.0] * 4, latents_std=[1.0] * 4),
        text_encoder=Qwen2_5_VLForConditionalGeneration(config).eval(),
        tokenizer=tok,
        transformer=QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                                num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6)),
    )


@dataclass(frozen=True)
class Family:
    """A tiny pipeline builder and the smallest generation settings that suit it."""

    build: Callable[[], Any]
    script: str
    height: int
    width: int
    frames: int | None = None  # None: an image family
    extra_args: tuple[str, ...] = ()


FAMILIES: dict[str, Family] = {
    "wan": Family(wan, "generate_wan.py", 96, 160, 9),
    "wan2.2": Family(wan22, "generate_wan.py", 96, 160, 9),
    "wan-i2v": Family(wan_i2v, "generate_wan_i2v.py", 96, 160, 9),
    "cogvideox": Family(cogvideox, "generate_cogvideox.py", 96, 160, 9),
    "ltx-video": Family(ltx_video, "generate_ltx_video.py", 96, 160, 9),
    "mochi": Family(mochi, "generate_mochi.py", 96, 160, 7),
    "flux": Family(flux, "generate_flux.py", 96, 160),
    "sd3": Family(sd3, "generate_sd3.py", 96, 160),
    "hunyuan-video": Family(hunyuan_video, "generate_hunyuan_video.py", 96, 160, 9),
    "qwenimage": Family(qwenimage, "generate_qwenimage.py", 96, 160),
}


def save_tiny_pipeline(family: str, directory: str | os.PathLike) -> str:
    """Build the tiny pipeline of ``family`` and ``save_pretrained`` it into ``directory``; returns the path."""
    pipe = FAMILIES[family].build()
    pipe.save_pretrained(str(directory))
    return str(directory)
