"""SAM's mask decoder for a click, with what does not depend on the prompts computed once per slice.

A further click is one pass of segment-anything's ``MaskDecoder``. About a third of that pass does not
depend on the prompts: the image tokens (the embedding plus the "no mask" embedding, laid out as
(tokens, channels)), their positional encoding, and the first two-way block's projections of the image
side (its token-to-image keys and values and its image-to-token queries: the image side is only changed
after them). ``prepare_image`` computes those once; ``decode_masks`` runs the rest with the decoder's own
modules and weights, and does the upscaling as matrix products on (pixel, channel) rows
(``_upscaled_masks``). Its masks equal segment-anything's to float rounding
(``Testing/engines/test_sam_decoder.py``). LiteMedSAM's further click in ``medfm bench`` on a 2-core Xeon
went from 104-111 ms to 44-59 ms (p50, several runs).

A click refined from the previous logits (a mask input) changes the image side, so its first block is
computed for that click alone; the upscaling gains hold for it all the same. Fine-tuning goes through
segment-anything's own forward, which its gradients need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PreparedImage:
    """The prompt-independent part of the decoder's pass over one image embedding (all (tokens, channels))."""

    features: torch.Tensor  # the embedding it was made from: identifies it
    image: torch.Tensor
    position: torch.Tensor
    first_keys: torch.Tensor  # block 0, token-to-image attention: projected keys ...
    first_values: torch.Tensor  # ... and values
    first_image_queries: torch.Tensor  # block 0, image-to-token attention: projected queries
    grid: tuple[int, int]
    weights: tuple[int, ...]  # the versions of the weights it used (fine-tuning changes them in place)


def _project(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, linear.weight, linear.bias)


def _prepared_weights(model) -> list[torch.Tensor]:
    first = model.mask_decoder.transformer.layers[0]
    projections = (first.cross_attn_token_to_image.k_proj, first.cross_attn_token_to_image.v_proj,
                   first.cross_attn_image_to_token.q_proj)  # fmt: skip
    encoder = model.prompt_encoder
    tensors = [encoder.no_mask_embed.weight, encoder.pe_layer.positional_encoding_gaussian_matrix]
    return tensors + [t for linear in projections for t in (linear.weight, linear.bias)]


def weights_version(model) -> tuple[int, ...]:
    """Changes whenever a weight that ``prepare_image`` reads is changed in place (an optimiser step)."""
    return tuple(t._version for t in _prepared_weights(model))


def prepare_image(model, features: torch.Tensor, dense: torch.Tensor | None = None) -> PreparedImage:
    """The decoder's prompt-independent work on one (1, C, H, W) embedding. With ``dense``, the prompt
    encoder's embedding of a mask input (1, C, H, W), it is that mask's image side instead: one click's."""
    prompt_encoder, transformer = model.prompt_encoder, model.mask_decoder.transformer
    if dense is None:
        dense_rows = prompt_encoder.no_mask_embed.weight.reshape(1, -1)
    else:
        dense_rows = dense[0].flatten(1).T
    image = (features[0].float().flatten(1).T + dense_rows).contiguous()
    position = prompt_encoder.get_dense_pe()[0].flatten(1).T.contiguous()
    first = transformer.layers[0]
    keys_with_position = image + position
    return PreparedImage(
        features=features,
        image=image,
        position=position,
        first_keys=_project(first.cross_attn_token_to_image.k_proj, keys_with_position),
        first_values=_project(first.cross_attn_token_to_image.v_proj, image),
        first_image_queries=_project(first.cross_attn_image_to_token.q_proj, keys_with_position),
        grid=tuple(features.shape[-2:]),
        weights=weights_version(model),
    )


def _attention(attention, queries, keys, values, projected: str = "") -> torch.Tensor:
    """segment-anything's ``Attention`` on (tokens, channels) tensors; ``projected`` names the inputs (q, k, v)
    that are already projected."""
    q = queries if "q" in projected else _project(attention.q_proj, queries)
    k = keys if "k" in projected else _project(attention.k_proj, keys)
    v = values if "v" in projected else _project(attention.v_proj, values)
    heads = attention.num_heads
    channels = q.shape[-1] // heads
    q, k, v = (t.view(t.shape[0], heads, channels).transpose(0, 1) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(channels), dim=-1)
    out = (weights @ v).transpose(0, 1).reshape(queries.shape[0], heads * channels)
    return _project(attention.out_proj, out)


def decode_masks(model, prepared: PreparedImage, sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every mask token's low-res logits (1, 4, h, w) and predicted IoU (1, 4), for sparse prompt embeddings
    (1, N, C), as ``MaskDecoder.predict_masks`` gives them with no mask input."""
    decoder = model.mask_decoder
    transformer = decoder.transformer
    prompt_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight, sparse[0]])
    queries, keys = prompt_tokens, prepared.image
    for index, block in enumerate(transformer.layers):
        if block.skip_first_layer_pe:
            queries = _attention(block.self_attn, queries, queries, queries)
        else:
            q = queries + prompt_tokens
            queries = queries + _attention(block.self_attn, q, q, queries)
        queries = block.norm1(queries)
        q = queries + prompt_tokens
        if index == 0:
            attended = _attention(block.cross_attn_token_to_image, q, prepared.first_keys, prepared.first_values, "kv")
        else:
            attended = _attention(block.cross_attn_token_to_image, q, keys + prepared.position, keys)
        queries = block.norm2(queries + attended)
        queries = block.norm3(queries + block.mlp(queries))
        q = queries + prompt_tokens
        if index == 0:
            attended = _attention(block.cross_attn_image_to_token, prepared.first_image_queries, q, queries, "q")
        else:
            attended = _attention(block.cross_attn_image_to_token, keys + prepared.position, q, queries)
        keys = block.norm4(keys + attended)
    q = queries + prompt_tokens
    attended = _attention(transformer.final_attn_token_to_image, q, keys + prepared.position, keys)
    queries = transformer.norm_final_attn(queries + attended)

    iou_token, mask_tokens = queries[0], queries[1 : 1 + decoder.num_mask_tokens]
    hyper = torch.stack([mlp(token) for mlp, token in zip(decoder.output_hypernetworks_mlps, mask_tokens)])
    return _upscaled_masks(decoder, keys, prepared.grid, hyper), decoder.iou_prediction_head(iou_token)[None]


def _unshared_pixels(convolution: torch.nn.ConvTranspose2d, x: torch.Tensor) -> torch.Tensor:
    """A 2x2, stride-2 transposed convolution on (pixels, in) rows: (pixels * 4, out) rows, each input pixel's
    four output pixels in turn. Its output pixels share no input, so it is one matrix product."""
    weight = convolution.weight  # (in, out, 2, 2)
    columns = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)  # (in, 4 * out): output pixel, then channel
    return (x @ columns).view(-1, weight.shape[1]) + convolution.bias


def _upscaled_masks(decoder, keys: torch.Tensor, grid: tuple[int, int], hyper: torch.Tensor) -> torch.Tensor:
    """``output_upscaling`` and the hypernetworks' product, on (pixels, channels) rows rather than on images.

    segment-anything transposes the image tokens back into an image and runs two transposed convolutions on
    it; their memory traffic cost more than their arithmetic (19 of a 65 ms pass). Here each stays a matrix
    product on rows, and the rows reach image order only as the masks, at the end.
    """
    first, norm, activation, second, last_activation = decoder.output_upscaling
    if not all(isinstance(c, torch.nn.ConvTranspose2d) and c.kernel_size == c.stride == (2, 2) and c.padding == (0, 0)
               for c in (first, second)):  # fmt: skip
        upscaled = decoder.output_upscaling(keys.T.reshape(1, -1, *grid))
        channels, rows, cols = upscaled.shape[1:]
        return (hyper @ upscaled.view(channels, rows * cols)).view(1, -1, rows, cols)
    x = _unshared_pixels(first, keys)
    x = activation(F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps))
    x = last_activation(_unshared_pixels(second, x))
    masks = x @ hyper.T  # (rows * cols * 16, masks): pixel (r, c), then (i, j), then (i2, j2)
    rows, cols = grid
    masks = masks.view(rows, cols, 2, 2, 2, 2, -1).permute(6, 0, 2, 4, 1, 3, 5)  # (mask, r, i, i2, c, j, j2)
    return masks.reshape(1, -1, rows * 4, cols * 4)
