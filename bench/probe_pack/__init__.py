"""Benchmark-only ComfyUI nodes (linked into the bench server's custom_nodes/ by
bench/bench_pipeline.py; never part of the pack).

* FreeSegBenchBareCaption: one bare ``generate`` of the loaded captioner on the image, with the
  caption node's settings (the irreducible caption pass).
* FreeSegBenchBareCLIP: one CLIP image batch of ``n_views`` views at the model's input size and
  one text batch of the class names (the irreducible naming pass).
* FreeSegBenchSaveFeatures: writes the FREESEG_FEATURES tensor to a safetensors file (for the
  diffusers parity check) and reports shape and block names.
* FreeSegBenchSink: consumes any value (makes e.g. a KSampler an output of the prompt).
* FreeSegBenchZeroConditioning: a CONDITIONING of zeros, ``[1, tokens, width]`` with a
  ``[1, pooled]`` pooled output, what ConditioningZeroOut makes of a text encode: the DiT
  benchmarks condition on it at the real text widths and token counts (T5-XXL, which feeds
  Flux and SD3, cannot be built here; the content does not change the cost of a pass).
"""

import json

import torch


class AnyType(str):
    def __ne__(self, other):
        return False


ANY = AnyType("*")


class FreeSegBenchBareCaption:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"blip2": ("FREESEG_BLIP2", {}), "image": ("IMAGE", {}),
                             "max_new_tokens": ("INT", {"default": 30, "min": 1, "max": 200}),
                             "num_beams": ("INT", {"default": 3, "min": 1, "max": 16})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def run(self, blip2, image, max_new_tokens, num_beams):
        model = blip2["patcher"].model.inner
        param = next(p for p in model.parameters() if p.is_floating_point())
        arrays = [a for a in (image[..., :3].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()]
        batch = blip2["processor"](images=arrays, return_tensors="pt")
        inputs = {k: (v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device))
                  for k, v in batch.items() if isinstance(v, torch.Tensor)}
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams)
        return {"ui": {"probe": [json.dumps({"tokens": int(out.shape[-1])})]}}


class FreeSegBenchBareCLIP:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_model": ("FREESEG_CLIP", {}), "class_names": ("STRING", {"default": ""}),
                             "n_views": ("INT", {"default": 4, "min": 1, "max": 64}),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def run(self, clip_model, class_names, n_views, seed):
        model = clip_model["patcher"].model.inner
        param = next(model.parameters())
        size = clip_model["preprocess"]["size"]
        names = [n.strip() for n in class_names.replace("\n", ",").split(",") if n.strip()] or ["object"]
        views = torch.randn((n_views, 3, *size), generator=torch.Generator().manual_seed(seed))
        img = model.encode_image(views.to(param.device, param.dtype))
        txt = model.encode_text(clip_model["tokenizer"](names).to(param.device))
        return {"ui": {"probe": [json.dumps({"image": list(img.shape), "text": list(txt.shape)})]}}


class FreeSegBenchSaveFeatures:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"features": ("FREESEG_FEATURES", {}), "path": ("STRING", {"default": ""})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def run(self, features, path):
        from safetensors.torch import save_file

        feats = features.features.detach().cpu().contiguous()
        info = {"shape": list(feats.shape), "dtype": str(feats.dtype), "blocks": list(features.blocks),
                "family": features.family, "source": features.source, "resolution": features.resolution}
        if path:
            save_file({"features": feats}, path, metadata={"info": json.dumps(info)})
        return {"ui": {"probe": [json.dumps(info)]}}


class FreeSegBenchSink:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": (ANY, {})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def run(self, value):
        shape = list(value["samples"].shape) if isinstance(value, dict) and "samples" in value else None
        return {"ui": {"probe": [json.dumps({"shape": shape})]}}


class FreeSegBenchZeroConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tokens": ("INT", {"default": 256, "min": 1, "max": 4096}),
                             "width": ("INT", {"default": 4096, "min": 1, "max": 16384}),
                             "pooled": ("INT", {"default": 768, "min": 1, "max": 16384})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, tokens, width, pooled):
        return ([[torch.zeros(1, tokens, width), {"pooled_output": torch.zeros(1, pooled)}]],)


NODE_CLASS_MAPPINGS = {c.__name__: c for c in (FreeSegBenchBareCaption, FreeSegBenchBareCLIP,
                                                FreeSegBenchSaveFeatures, FreeSegBenchSink,
                                                FreeSegBenchZeroConditioning)}
