"""What a stage does where a backend lacks something: query-chunked attention, and float64 kept off the device.

Attention. Where the backend has no fused attention kernel (MPS, consumer ROCm cards), scaled_dot_product_attention
runs its plain path, which materialises the score matrix [batch, heads, queries, keys]: 5.4 GiB of
activations for denoise at 1024 px instead of 1.4 GiB. Splitting the queries into chunks of
`chunk_size` bounds that matrix to [batch, heads, chunk_size, keys]; each query row attends to
all keys either way, so the result is the same (bit for bit on the CPU in float32, tested in
tests/test_devices.py). The planner (orchestrator/planning/memory.py) picks the chunk size; the denoise
stage installs it with `use_chunked_attention`.

Float64. MPS has none, nor have Intel Arc GPUs (XPU); place_position_table builds the one float64
table of the denoise loop on the CPU. diffusers' schedulers already keep float64 off MPS.
"""

from __future__ import annotations


class ChunkedAttnProcessor:
    """diffusers' AttnProcessor2_0 for PixArt's and the VAE's attention blocks (no spatial norm),
    with scaled_dot_product_attention run on `chunk_size` queries at a time (None: all at once)."""

    def __init__(self, chunk_size: int | None) -> None:
        if chunk_size is not None and chunk_size < 2:
            # One query at a time takes another SDPA kernel on the CPU, whose bits differ.
            raise ValueError(f"chunk_size must be at least 2, not {chunk_size}")
        self.chunk_size = chunk_size

    def attend(self, query, key, value, mask):
        """[B, heads, q, d] from one chunk of queries: the backend's SDPA kernel."""
        import torch.nn.functional as F

        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        import torch

        if attn.spatial_norm is not None:
            raise NotImplementedError("ChunkedAttnProcessor has no spatial norm (MoVQ); PixArt's models use none")
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:  # the VAE's mid-block: [B, C, h, w] -> [B, h*w, C]
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])  # [B, heads, 1 or q, k]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # [B, heads, q, d]
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # [B, heads, k, d]
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if self.chunk_size is None or self.chunk_size >= query.shape[2]:
            out = self.attend(query, key, value, attention_mask)
        else:
            out = torch.empty_like(query)  # [B, heads, q, d]: each chunk's result is written into it
            for start in range(0, query.shape[2], self.chunk_size):
                rows = slice(start, start + self.chunk_size)
                mask = attention_mask[:, :, rows] if attention_mask is not None and attention_mask.shape[2] > 1 else attention_mask
                out[:, :, rows] = self.attend(query[:, :, rows], key, value, mask)
        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)  # [B, q, heads * d]
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear proj, dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def use_chunked_attention(transformer, chunk_size: int | None) -> None:
    """Install ChunkedAttnProcessor(chunk_size) in every attention module of `transformer`
    (None: leave diffusers' default processor)."""
    if chunk_size:
        transformer.set_attn_processor(ChunkedAttnProcessor(chunk_size))


# Devices without float64 (MPS; Intel Arc GPUs on XPU). diffusers' PatchEmbed builds the sin-cos
# position table in float64 on the latents' device at any size but the model's own; diffusers
# downcasts it to float32 on MPS only, and Arc fails on it.
NO_FLOAT64 = ("mps", "xpu")


def place_position_table(transformer, height: int, width: int, scale: int, device) -> None:
    """On a device without float64, build the transformer's position table for this size on the CPU
    (float64, as on the CPU and CUDA, then float32 as diffusers keeps it) and hand it to the device,
    so the forward never computes it there."""
    import torch
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    patch = transformer.pos_embed
    if device.type not in NO_FLOAT64 or getattr(patch, "pos_embed_max_size", None) or getattr(patch, "pos_embed", None) is None:
        return
    grid = (height // scale // patch.patch_size, width // scale // patch.patch_size)  # patches, as PatchEmbed.forward counts them
    if (patch.height, patch.width) == grid:
        return
    table = get_2d_sincos_pos_embed(embed_dim=patch.pos_embed.shape[-1], grid_size=grid, base_size=patch.base_size,
                                    interpolation_scale=patch.interpolation_scale, device=torch.device("cpu"), output_type="pt")
    patch.register_buffer("pos_embed", table.float().unsqueeze(0).to(patch.pos_embed.device), persistent=False)  # [1, h*w, dim]
    patch.height, patch.width = grid
