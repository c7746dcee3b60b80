"""Random tiny diffusers autoencoders (no hub here): the three VAE classes prepare_data reads."""

LATENTS_MEAN = [0.1, -0.2, 0.3, 0.0]
LATENTS_STD = [1.5, 0.5, 2.0, 1.0]


def tiny_vae(class_name: str, image_channels: int = 3, latent_channels: int = 4):
    """AutoencoderKL (8x down), AutoencoderKLQwenImage or AutoencoderDC (2x down), seeded."""
    import diffusers
    import torch

    torch.manual_seed(0)
    if class_name == "AutoencoderKL":
        return diffusers.AutoencoderKL(in_channels=image_channels, out_channels=image_channels,
                                       down_block_types=("DownEncoderBlock2D",) * 2,
                                       up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                       layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4,
                                       sample_size=32, scaling_factor=0.5, shift_factor=0.1)
    if class_name == "AutoencoderKLQwenImage":
        return diffusers.AutoencoderKLQwenImage(base_dim=8, z_dim=latent_channels, dim_mult=[1, 2], num_res_blocks=1,
                                                temperal_downsample=[False], input_channels=image_channels,
                                                latents_mean=LATENTS_MEAN[:latent_channels],
                                                latents_std=LATENTS_STD[:latent_channels])
    if class_name == "AutoencoderDC":
        return diffusers.AutoencoderDC(in_channels=image_channels, latent_channels=latent_channels,
                                       attention_head_dim=4, encoder_block_types=("ResBlock", "EfficientViTBlock"),
                                       decoder_block_types=("ResBlock", "EfficientViTBlock"),
                                       encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
                                       encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                                       encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
                                       scaling_factor=0.4)
    raise ValueError(f"tiny_vae: unknown class {class_name!r}")
