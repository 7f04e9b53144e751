"""Key prefixes of checkpoint components (docs/formats: component prefixes), defined once for the whole package."""

from __future__ import annotations

UNET = "model.diffusion_model."
VAE = "first_stage_model."
EMA = "model_ema."
SD1_TE = "cond_stage_model.transformer."
SD2_TE = "cond_stage_model.model."
SDXL_TE1 = "conditioner.embedders.0.transformer."
SDXL_TE2 = "conditioner.embedders.1.model."

# component name -> key prefix, per architecture id
COMPONENT_PREFIXES: dict[str, dict[str, str]] = {
    "sd1": {"unet": UNET, "text_encoder": "cond_stage_model.", "vae": VAE},
    "sd2": {"unet": UNET, "text_encoder": "cond_stage_model.", "vae": VAE},
    "sdxl": {"unet": UNET, "text_encoder": "conditioner.embedders.0.", "text_encoder_2": "conditioner.embedders.1.", "vae": VAE},
    "sdxl-refiner": {"unet": UNET, "text_encoder_2": "conditioner.embedders.0.", "vae": VAE},
}

# non-model scalars that say how a model predicts (v_pred, zero-terminal SNR, EDM); no shape reveals them
MARKERS = ("v_pred", "ztsnr", "edm_vpred.sigma_max", "edm_vpred.sigma_min", "edm_mean", "edm_std")
# LDM scheduler buffers saved at the top level of old checkpoints; loaders rebuild them from the config
SCHEDULER_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
)


def ema_key(unet_key: str) -> str:
    """`model.diffusion_model.input_blocks.0.0.weight` -> `model_ema.diffusion_modelinput_blocks00weight` (LDM's
    EMA naming drops every dot after the prefix)."""
    return "model_ema.diffusion_model" + unet_key[len(UNET):].replace(".", "")
