"""Spatiotemporal video diffusion: 3D causal VAE, video DiT, text encoder, alignment loss, objectives.

Modules follow the library's conventions: Flax NNX used functionally, parameters annotated with logical
axes (parallel.rules), frozen self-validating configs that count their own parameters and FLOPs. The
experiment and benchmark are in docs/benchmarks.md, "Video diffusion".
"""

from models.video.align import Aligner, info_nce, nearest_caption, recall_at_1
from models.video.config import AlignConfig, DiffusionConfig, DiTConfig, TextToVideoConfig, VAEConfig
from models.video.diffusion import ddim_sample, diffusion_loss, euler_sample, guided, sample
from models.video.dit import DiTBlock, VideoDiT
from models.video.t2v import TextToVideo, generate, t2v_loss
from models.video.text import TextEncoder, TextOut, caption_dropout
from models.video.vae import VideoVAE, latent_stats, vae_loss

__all__ = ["AlignConfig", "Aligner", "DiTBlock", "DiTConfig", "DiffusionConfig", "TextEncoder", "TextOut",
           "TextToVideo", "TextToVideoConfig", "VAEConfig", "VideoDiT", "VideoVAE", "caption_dropout",
           "ddim_sample", "diffusion_loss", "euler_sample", "generate", "guided", "info_nce", "latent_stats",
           "nearest_caption", "recall_at_1", "sample", "t2v_loss", "vae_loss"]
