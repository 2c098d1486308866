"""FreeSegCaptureFeatures / FreeSegCapturedFeatures: the diffusion features of a sampler's own
model calls, with no pass of their own.

Capture Features clones the MODEL and adds two wrappers (comfy.patcher_extension): around
each sampling run (OUTER_SAMPLE: a new record per run, ended with the run's output latents)
and around each model call (APPLY_MODEL: forward hooks that only read the layer outputs of
the conditional half, ``cond_or_uncond`` 0). Recording is ``freeseg.capture.SamplingCapture``.
Captured Features turns the record into the features Cluster Masks takes, after checking
that the LATENT given is the output of the run it recorded.

DiTs (Flux.1, Chroma, Flux.2, SD3.x) go through the same hooks: their blocks and the reading of their
image tokens come from ``diffusion_features.feature_layers``, as in Diffusion Features."""

from __future__ import annotations

import torch

import comfy.model_management as mm
import comfy.patcher_extension

from ..freeseg.capture import KEEP_CHOICES, KEEP_LAST, SamplingCapture, StaleCapture
from ..freeseg.features import DiffusionFeatures
from ..freeseg.settings import CHOICES, DEFAULTS
from .common import CATEGORY, Features, check_choice, first_problem, io, log
from .diffusion_features import check_family, feature_layers, latent_downscale

Capture = io.Custom("FREESEG_CAPTURE")
WRAPPER_KEY = "freeseg_capture"
SIGMA_MIN_SD = 0.0292  # SD1.x / SD2.x / SDXL sigma_min: the input of the last call of most schedules


class CaptureHandle:
    """What Capture Features hands to Captured Features: the recorder, and what the features
    record about the model."""

    def __init__(self, recorder: SamplingCapture, family: str, model_sampling, downscale: int = 8):
        self.recorder, self.family, self.model_sampling = recorder, family, model_sampling
        self.downscale = downscale  # image pixels per latent cell

    def timestep(self, sigma: float) -> int:
        """The DDPM timestep (0..999) nearest ``sigma``."""
        t = self.model_sampling.timestep(torch.tensor([sigma], dtype=torch.float32))
        return int(min(max(round(float(t.flatten()[0])), 0), 999))


def patch(model, recorder: SamplingCapture):
    """A clone of ``model`` whose sampling runs and model calls ``recorder`` sees."""

    def outer_sample(executor, *args, **kwargs):
        recorder.begin()
        out = None
        try:
            out = executor(*args, **kwargs)
        finally:
            recorder.end(out)
        return out

    def apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                    **kwargs):
        def forward():
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        chunks = list(transformer_options.get("cond_or_uncond") or [])
        if not recorder.active or 0 not in chunks:
            return forward()
        n = x.shape[0] // len(chunks)
        k = chunks.index(0)  # the first conditional chunk (several when conds are split by area)
        rows = slice(k * n, (k + 1) * n)
        return recorder.call(forward, float(t[rows].flatten()[0]), rows, tuple(x.shape[-2:]))

    patched = model.clone()
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, outer_sample)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, apply_model)
    return patched


class FreeSegCaptureFeatures(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FreeSegCaptureFeatures",
            display_name="FreeSeg-Diff Capture Features",
            category=CATEGORY,
            description="Records the FreeSeg-Diff features of a sampler's own UNet calls: give the model output "
                        "to any sampler (KSampler, SamplerCustomAdvanced, ...) and the capture output with "
                        "the sampler's LATENT to Captured Features. No extra model call; the generated image "
                        "is the same as with the plain model. Works with SD1.x, SD2.x and SDXL UNets and "
                        "Flux.1, Chroma, Flux.2 and SD3.x DiTs.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL from your checkpoint loader (SD1.x, SD2.x, SDXL, "
                               "Flux.1, Chroma, Flux.2 or SD3.x). It is cloned, never changed."),
                io.Combo.Input("keep", options=list(KEEP_CHOICES), default=KEEP_LAST, tooltip="last_call: the "
                               "features of the sampler's last model call (at sigma_min on most schedules, the "
                               "paper's timestep 0; for samplers with several calls per step, the last of them). "
                               "nearest_sigma: the call whose sigma is nearest the sigma input."),
                io.Float.Input("sigma", default=SIGMA_MIN_SD, min=0.0, max=1000.0, step=0.0001,
                               tooltip="With keep nearest_sigma: the sigma of the call to keep (0.0292 is SD's "
                               "sigma_min, the paper's timestep 0)."),
                io.Combo.Input("source", options=list(CHOICES["source"]), default=DEFAULTS.source,
                               tooltip="As in Diffusion Features: cross_attn_queries (paper) or decoder_blocks."),
                io.Combo.Input("detail", options=list(CHOICES["detail"]), default=DEFAULTS.detail,
                               tooltip="As in Diffusion Features: paper (a grid of latent/2) or fine (latent "
                               "size, with the 1/2-latent blocks too)."),
            ],
            outputs=[io.Model.Output(display_name="model"), Capture.Output(display_name="capture")],
        )

    @classmethod
    def validate_inputs(cls, keep=None, source=None, detail=None) -> bool | str:
        return first_problem(check_choice("keep", keep, KEEP_CHOICES),
                             check_choice("source", source, CHOICES["source"]),
                             check_choice("detail", detail, CHOICES["detail"]))

    @classmethod
    def execute(cls, model, keep, sigma, source, detail) -> io.NodeOutput:
        family = check_family(model)
        layers, pick = feature_layers(model, source)
        recorder = SamplingCapture(layers, source, detail == "fine", keep, sigma, pick)
        handle = CaptureHandle(recorder, family, model.get_model_object("model_sampling"), latent_downscale(model))
        return io.NodeOutput(patch(model, recorder), handle)


class FreeSegCapturedFeatures(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FreeSegCapturedFeatures",
            display_name="FreeSeg-Diff Captured Features",
            category=CATEGORY,
            description="The features Capture Features recorded while the sampler ran, for Cluster Masks. "
                        "latent must be that sampler's output: the masks come out at 8x its size (Flux.2: "
                        "16x). Fails "
                        "(asking to re-run the sampler) when the record is not of these latents.",
            inputs=[
                Capture.Input("capture", tooltip="The capture output of Capture Features."),
                io.Latent.Input("latent", tooltip="The LATENT output of the sampler that ran with the captured "
                                "model."),
            ],
            outputs=[Features.Output(display_name="features")],
        )

    @classmethod
    def execute(cls, capture, latent) -> io.NodeOutput:
        samples = latent["samples"]
        if samples.ndim != 4:
            raise ValueError(f"latent: FreeSeg-Diff takes [B,c,h,w] image latents; got shape {tuple(samples.shape)}")
        recorder = capture.recorder
        h, w = samples.shape[-2:]
        d = capture.downscale
        step = 8 if recorder.capture.fine else 16  # pixels per grid cell, as Diffusion Features' detail
        grid = (-(-h * d // step), -(-w * d // step))
        try:
            feats, names, sigma = recorder.features(samples, grid)
        except StaleCapture as err:
            raise ValueError(f"capture: {err}") from None
        feats = feats.to(mm.intermediate_device(), torch.float16)
        source = recorder.capture.source
        log.info("FreeSeg-Diff captured features: %s %s at sigma %.4f from %d blocks %s -> %s", capture.family,
                 source, sigma, len(names), names, tuple(feats.shape))
        return io.NodeOutput(DiffusionFeatures(feats, (d * h, d * w), capture.family, source,
                                               capture.timestep(sigma), d * max(h, w), names))
