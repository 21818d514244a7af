"""Architecture constants of the models D3SR runs on: the UNet and VAE configs ComfyUI's own
classes are built with (when a file holds only some of the weights, e.g. OSEDiff's), and the
model family each text-conditioning width belongs to."""

from __future__ import annotations

# SD2.1-base's UNet (865.9 M parameters), in ComfyUI's UNetModel keyword arguments.
SD21_UNET_CONFIG = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
    channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
    use_spatial_transformer=True, legacy=False, context_dim=1024, num_head_channels=64,
    use_linear_in_transformer=True, adm_in_channels=None, use_temporal_attention=False,
    use_temporal_resblock=False)

# SDXL 1.0-base's UNet (2.57 B parameters); the D3SR discriminator uses its input and middle
# blocks only.
SDXL_UNET_CONFIG = dict(
    SD21_UNET_CONFIG, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4],
    transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
    transformer_depth_middle=10, context_dim=2048, adm_in_channels=2816, num_classes="sequential")

# ComfyUI's fixed config for SD's KL VAE (83.7 M parameters).
KL_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                   "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                   "attn_resolutions": [], "dropout": 0.0}

# The Stable Diffusion family of a UNet, from its cross-attention (text) width.
FAMILY_BY_CONTEXT = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}
# SDXL's pooled-text + size conditioning width (adm_in_channels), which tells it from others.
SDXL_ADM_CHANNELS = 2816
