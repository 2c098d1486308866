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
    if isinstance(value, (list, dict)):  # e.g. BOUNDING_BOX: lists of box dicts
        try:
            return {"kind": type(value).__name__, "value": json.loads(json.dumps(value))}
        except (TypeError, ValueError):
            pass
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



# -- a model patch that relies on what the sampler puts into transformer_options ----------------

PATCH_RECORDS: dict = {}


class SharedState:
    """Stands for what real patches hold (modules, GPU tensors): counts the deep copies made of it
    and stays one object (as a module registry would)."""

    def __init__(self):
        self.deep_copies = 0

    def __deepcopy__(self, memo):
        self.deep_copies += 1
        return self


class FreeSegTestAttnPatch:
    """Clones the MODEL and adds an attn2 patch (as IPAdapter-style packs do) that records the
    sampler-provided `transformer_options` entries it reads, under `tag`."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "tag": ("STRING", {"default": "patch"})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "testing"

    def patch(self, model, tag):
        state = SharedState()
        record = PATCH_RECORDS[tag] = {"calls": [], "state": state}

        def attn2(n, context, value, extra_options):
            record["calls"].append({
                "batch": int(n.shape[0]),
                "sigmas": [float(v) for v in extra_options["sigmas"].flatten()],
                "sample_sigmas": [float(v) for v in extra_options["sample_sigmas"].flatten()],
                "cond_or_uncond": list(extra_options["cond_or_uncond"]),
                "uuids": [str(u) for u in extra_options["uuids"]],
                "state_is_shared": extra_options.get("freeseg_test_state") is state,
            })
            return n, context, value

        patched = model.clone()
        patched.set_model_attn2_patch(attn2)
        patched.model_options["transformer_options"]["freeseg_test_state"] = state
        before = state.deep_copies
        patched.clone()  # what one core clone costs, to tell it from copies a consumer makes
        record["copies_per_clone"] = state.deep_copies - before
        state.deep_copies = 0
        return (patched,)


class FreeSegTestPatchReport:
    """Reports (in its UI output) what the patch of `tag` saw, once `after` has been computed."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"after": (ANY, {}), "tag": ("STRING", {"default": "patch"})}}

    RETURN_TYPES = ()
    FUNCTION = "report"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def report(self, after, tag):
        record = PATCH_RECORDS[tag]
        out = {"calls": record["calls"], "copies_per_clone": record["copies_per_clone"],
               "deep_copies": record["state"].deep_copies}
        return {"ui": {"probe": [json.dumps(out)]}}


class FreeSegTestCompare:
    """Compares two LATENTs (bit-identical?) or two FREESEG_FEATURES (cosine of each block's
    channels; the blocks split the channels equally, as the query blocks of one level do)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": (ANY, {}), "b": (ANY, {})}}

    RETURN_TYPES = ()
    FUNCTION = "compare"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def compare(self, a, b):
        import torch

        if isinstance(a, dict) and "samples" in a:
            x, y = a["samples"], b["samples"]
            report = {"kind": "latent", "shape": [list(x.shape), list(y.shape)],
                      "equal": bool(x.shape == y.shape and torch.equal(x, y))}
        else:
            x, y = a.features.float(), b.features.float()
            n = len(a.blocks)
            assert x.shape == y.shape and x.shape[1] % n == 0, (x.shape, y.shape, a.blocks)
            cos = [float(torch.nn.functional.cosine_similarity(p.flatten(), q.flatten(), dim=0))
                   for p, q in zip(x.chunk(n, dim=1), y.chunk(n, dim=1))]
            report = {"kind": "features", "shape": list(x.shape), "blocks": [list(a.blocks), list(b.blocks)],
                      "cosine": cos, "max_abs_diff": float((x - y).abs().max()),
                      "image_size": [list(a.image_size), list(b.image_size)],
                      "timestep": [a.timestep, b.timestep]}
        return {"ui": {"compare": [json.dumps(report)]}}


NODE_CLASS_MAPPINGS = {"FreeSegTestProbe": FreeSegTestProbe, "FreeSegTestBadImage": FreeSegTestBadImage,
                       "FreeSegTestAttnPatch": FreeSegTestAttnPatch, "FreeSegTestPatchReport": FreeSegTestPatchReport,
                       "FreeSegTestCompare": FreeSegTestCompare}
