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


class FreeSegTestBadImage:
    """An IMAGE no loader can produce: `fill` (nan, inf or -inf) in a corner of a grey picture."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"fill": (["nan", "inf", "-inf"], {}), "width": ("INT", {"default": 32, "min": 1}),
                             "height": ("INT", {"default": 32, "min": 1})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, fill, width, height):
        import torch

        image = torch.full((1, height, width, 3), 0.5)
        image[:, : max(height // 4, 1), : max(width // 4, 1)] = float(fill)
        return (image,)


NODE_CLASS_MAPPINGS = {"FreeSegTestProbe": FreeSegTestProbe, "FreeSegTestBadImage": FreeSegTestBadImage}
