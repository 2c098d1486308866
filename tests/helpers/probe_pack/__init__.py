"""A test-only ComfyUI node: reports what reaches it (shapes, dtypes, ranges, text, SEGS) in
its UI output, so the tests can read node outputs through /history."""

import json


class AnyType(str):
    def __ne__(self, other):
        return False


ANY = AnyType("*")


def describe(value):
    import torch

    if isinstance(value, torch.Tensor):
        v = value.float()
        return {"kind": "tensor", "shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", ""),
                "min": float(v.min()) if v.numel() else None, "max": float(v.max()) if v.numel() else None,
                "sum": float(v.sum()), "distinct": int(torch.unique(v).numel()) if v.numel() < 10_000_000 else -1}
    if isinstance(value, str):
        return {"kind": "str", "value": value}
    base = getattr(value, "model", None)
    if hasattr(base, "model_config") and hasattr(base, "model_type"):  # a MODEL (ModelPatcher)
        return {"kind": "model", "config": type(base.model_config).__name__, "model_type": base.model_type.name,
                "context_dim": base.model_config.unet_config.get("context_dim")}
    if hasattr(value, "features") and hasattr(value, "family"):  # FREESEG_FEATURES
        f = value.features
        return {"kind": "features", "shape": list(f.shape), "dtype": str(f.dtype).replace("torch.", ""),
                "family": value.family, "blocks": list(value.blocks), "finite": bool(torch.isfinite(f).all())}
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], list):  # SEGS
        return {"kind": "segs", "size": list(value[0]), "segs": [
            {"label": s.label, "confidence": float(s.confidence), "crop_region": list(s.crop_region),
             "bbox": list(s.bbox), "cropped_image": list(s.cropped_image.shape),
             "cropped_mask": list(s.cropped_mask.shape), "fields": list(s._fields)} for s in value[1]]}
    return {"kind": type(value).__name__, "repr": repr(value)[:200]}


class FreeSegTestProbe:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": (ANY, {})}, "optional": {"name": ("STRING", {"default": ""})}}

    RETURN_TYPES = ()
    FUNCTION = "probe"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def probe(self, value, name=""):
        return {"ui": {"probe": [json.dumps(describe(value))]}}


NODE_CLASS_MAPPINGS = {"FreeSegTestProbe": FreeSegTestProbe}
