"""The real ComfyUI frontend (the one the test server serves) loads and queues every example
workflow, in headless Chromium driven by Playwright.

For each UI workflow (model names swapped for the fixtures, images uploaded): `app.loadGraphData`
must report no missing node or model and show no dialog or error; the graph the frontend builds
must serialize back to the same slots, links and `widgets_values`; its `graphToPrompt()` must
equal the API twin; and queueing it from the page (`app.queuePrompt`) must be accepted by the
server and run to completion.

Needs Debian's `chromium` (/usr/bin/chromium, or $FREESEG_CHROMIUM) and the `playwright` Python
package (scripts/setup_browser.sh installs Chromium, requirements-test.txt Playwright; Playwright never downloads a browser here).
Without them the tests are skipped, saying which is missing.

With FREESEG_UPDATE_SCREENSHOTS=1 the test also (re)writes the thumbnails `workflows/<name>.jpg`
and the README picture `docs/freeseg_full.png` from screenshots of the published workflows.
"""

import io
import json
import os
import shutil
import time

import pytest

import workflow_tools as wt
from comfy_harness import REPO

CHROMIUM = os.environ.get("FREESEG_CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run"]
UPDATE_SCREENSHOTS = os.environ.get("FREESEG_UPDATE_SCREENSHOTS") == "1"
VIEWPORT = {"width": 1600, "height": 900}
THUMBNAIL_WINDOW, THUMBNAIL_SIZE = (1600, 1200), (640, 480)
README_SCALE = 0.8
# Settings for a quiet, readable canvas (stored in the test server's own user folder).
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "Comfy.Graph.CanvasMenu": False,
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,  # draw text at any zoom (thumbnails are zoomed out)
}
# Console noise of an offline frontend that says nothing about the workflow.
IGNORED_CONSOLE = ("api.comfy.org", "Failed to load resource", "Content Security Policy")


def _why_no_browser() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (it is in requirements-test.txt)"
    if not (os.path.isfile(CHROMIUM) or shutil.which(CHROMIUM)):
        return f"no Chromium at {CHROMIUM} (run scripts/setup_browser.sh, or set FREESEG_CHROMIUM)"
    return None


# Skipped only outside CI: under CI (CI=true) a missing browser is a failed install, not a skip.
pytestmark = pytest.mark.skipif(_why_no_browser() is not None and not os.environ.get("CI"),
                                reason=str(_why_no_browser()))


@pytest.fixture(scope="module")
def page(server, client):
    from playwright.sync_api import sync_playwright

    for key, value in SETTINGS.items():
        client.post_json(f"/settings/{key}", value)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        try:
            pg = browser.new_page(viewport=VIEWPORT)
            pg.messages = []
            pg.on("console", lambda m: pg.messages.append(f"console.{m.type}: {m.text}")
                  if m.type in ("error", "warning") and not any(s in m.text for s in IGNORED_CONSOLE) else None)
            pg.on("pageerror", lambda e: pg.messages.append(f"pageerror: {e}"))
            pg.goto(server.url)
            pg.wait_for_function("() => window.app?.graph && window.app.canvas && window.LiteGraph && "
                                 "Object.keys(LiteGraph.registered_node_types).includes('FreeSegCLIPLabel')",
                                 timeout=120_000)
            pg.evaluate("""async () => {
                const cmd = app.extensionManager.command;
                if (!app.extensionManager.workspace?.focusMode) await cmd.execute('Workspace.ToggleFocusMode');
                window.__freeseg = {missingNodes: [], missingModels: []};
                const nodes = app.showMissingNodesError.bind(app), models = app.showMissingModelsError.bind(app);
                app.showMissingNodesError = (t) => { window.__freeseg.missingNodes.push(t); return nodes(t); };
                app.showMissingModelsError = (m, p) => { window.__freeseg.missingModels.push(m); return models(m, p); };
            }""")
            pg.wait_for_timeout(300)
            pg.messages.clear()  # what the start-up printed is not about our workflows
            yield pg
        finally:
            browser.close()


LOAD_JS = """async (wf) => {
    window.__freeseg.missingNodes = []; window.__freeseg.missingModels = [];
    await app.loadGraphData(wf, true, true, null);
    await new Promise(r => setTimeout(r, 200));
    const unknown = app.graph.nodes.filter(n => n.has_errors || !(n.type in LiteGraph.registered_node_types))
                                   .map(n => n.type);
    const dialogs = [...document.querySelectorAll('.p-dialog')].filter(d => d.offsetParent !== null)
                                                               .map(d => d.innerText.slice(0, 300));
    const toasts = [...document.querySelectorAll('.p-toast-message-error, .p-toast-message-warn')]
                       .map(t => t.innerText.slice(0, 300));
    const prompt = await app.graphToPrompt();
    return {missingNodes: window.__freeseg.missingNodes, missingModels: window.__freeseg.missingModels,
            unknown, dialogs, toasts, serialized: app.graph.serialize(), prompt: prompt.output};
}"""


def slots(node: dict) -> tuple:
    return ([(s["name"], s["type"], s.get("link")) for s in node.get("inputs", [])],
            [(s["name"], s["type"], sorted(s.get("links") or [])) for s in node.get("outputs", [])])


def load_in_page(page, workflow: dict, models_here: bool = True) -> dict:
    """Load `workflow` in the page and check it loads cleanly. `models_here` False: its models
    are not on the test server (a published workflow), so the missing-model dialog is expected
    and closed."""
    page.messages.clear()
    state = page.evaluate(LOAD_JS, workflow)
    assert state["missingNodes"] == [] and state["unknown"] == [], state["missingNodes"] or state["unknown"]
    if not models_here:
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)
        return state
    assert state["missingModels"] == []
    assert state["dialogs"] == [] and state["toasts"] == []
    assert page.messages == [], page.messages
    return state


FRAME_JS = """([scale, margin, maxW, maxH]) => {
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const n of app.graph.nodes) {
        const [x, y, w, h] = n.getBounding();
        x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h);
    }
    if (!scale) scale = Math.min(1, (maxW - 2 * margin) / (x1 - x0), (maxH - 2 * margin) / (y1 - y0));
    const width = Math.ceil((x1 - x0) * scale + 2 * margin), height = Math.ceil((y1 - y0) * scale + 2 * margin);
    return {scale, width, height,
            offset: [(width / scale - (x1 - x0)) / 2 - x0, (height / scale - (y1 - y0)) / 2 - y0]};
}"""


def screenshot(page, scale: float | None = None, size: tuple[int, int] | None = None, margin: int = 24) -> bytes:
    """The whole graph at `scale`, or at the scale that fits it into `size`; the window is sized
    to the graph."""
    frame = page.evaluate(FRAME_JS, [scale or 0, margin, *(size or (0, 0))])
    page.set_viewport_size({"width": frame["width"], "height": frame["height"]})
    page.wait_for_timeout(300)
    page.evaluate("""(f) => {
        app.canvas.ds.scale = f.scale; app.canvas.ds.offset = f.offset; app.canvas.setDirty(true, true);
        // focus mode leaves one button (to leave it) over the top-right corner of the canvas
        const el = document.elementFromPoint(innerWidth - 20, 16);
        if (el && el.tagName !== 'CANVAS') (el.closest('button') || el).style.visibility = 'hidden';
    }""", frame)
    page.wait_for_timeout(500)
    data = page.screenshot()
    page.set_viewport_size(VIEWPORT)
    return data


def write_pictures(page, name: str, ui: dict) -> None:
    """Thumbnail (and for freeseg_full the README picture) of the published workflow."""
    from PIL import Image

    load_in_page(page, ui, models_here=False)
    thumb = Image.open(io.BytesIO(screenshot(page, size=THUMBNAIL_WINDOW))).convert("RGB")
    thumb.thumbnail(THUMBNAIL_SIZE, Image.LANCZOS)  # the template browser shows it whole (object-contain)
    thumb.save(os.path.join(wt.WORKFLOW_DIR, f"{name}.jpg"),
                                                     quality=85, optimize=True)
    if name == "freeseg_full":
        os.makedirs(os.path.join(REPO, "docs"), exist_ok=True)
        Image.open(io.BytesIO(screenshot(page, scale=README_SCALE))).save(
            os.path.join(REPO, "docs", "freeseg_full.png"), optimize=True)


@pytest.fixture(scope="module")
def example_png(client, tmp_path_factory):
    """An input image named like ComfyUI's own example.png, so the screenshots show a picture."""
    from comfy_harness import write_test_image

    path = write_test_image(str(tmp_path_factory.mktemp("example") / "example.png"), 512, 384, seed=3)
    return client.upload_image(path)


@pytest.mark.parametrize("name", wt.NAMES)
def test_frontend_loads_and_queues_workflow(name, page, client, upload, example_png, tmp_path):
    with open(os.path.join(wt.WORKFLOW_DIR, f"{name}.json")) as f:
        ui = json.load(f)
    with open(os.path.join(wt.API_DIR, f"{name}.json")) as f:
        api = json.load(f)
    if UPDATE_SCREENSHOTS:
        write_pictures(page, name, ui)

    images = {node_id: upload(96, 64, seed=10 + i) for i, node_id in enumerate(wt.load_image_ids(api))}
    for node_id in wt.load_video_ids(api):
        images[node_id] = client.upload_image(wt.write_clip(str(tmp_path / f"clip_{node_id}.mp4")))
    info = client.object_info()
    workflow, prompt = wt.adapt_ui(ui, info, images), wt.adapt_api(api, images)
    state = load_in_page(page, workflow)

    # The frontend's own graph serializes back to what the file says...
    theirs = {n["id"]: n for n in state["serialized"]["nodes"]}
    assert sorted(theirs) == sorted(n["id"] for n in workflow["nodes"])
    for node in workflow["nodes"]:
        assert theirs[node["id"]]["widgets_values"] == node["widgets_values"], node["type"]
        assert slots(theirs[node["id"]]) == slots(node), node["type"]
    assert state["serialized"]["links"] == workflow["links"]
    # ...and to the API twin (less the display-only `preview` of PreviewAny and `video-preview` of
    # LoadVideo, which the server ignores).
    sent = state["prompt"]
    display_only = {"PreviewAny": "preview", "LoadVideo": "video-preview"}
    for node in sent.values():
        if node["class_type"] in display_only:
            node["inputs"].pop(display_only[node["class_type"]], None)
    assert sent == prompt

    # Queue it from the page: the server accepts it and runs it.
    with page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST") as answer:
        page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    assert answer.value.status == 200, answer.value.text()
    prompt_id = answer.value.json()["prompt_id"]
    assert page.evaluate("() => app.lastNodeErrors") in (None, {})
    deadline = time.monotonic() + 300
    while (entry := client.history(prompt_id)) is None or not entry["status"].get("completed"):
        assert entry is None or entry["status"]["status_str"] != "error", entry["status"]
        assert time.monotonic() < deadline, f"{name}: prompt {prompt_id} did not finish"
        time.sleep(0.25)
    assert entry["status"]["status_str"] == "success"
    queued = entry["prompt"][2]
    assert {k: (n["class_type"], {i: v for i, v in n["inputs"].items() if i != display_only.get(n["class_type"])})
            for k, n in queued.items()} == {k: (n["class_type"], n["inputs"]) for k, n in prompt.items()}
    assert entry["prompt"][3]["extra_pnginfo"]["workflow"]["nodes"]  # the UI graph travels with it
    dialogs = page.evaluate("() => [...document.querySelectorAll('.p-dialog')].filter(d => d.offsetParent !== null)"
                            ".map(d => d.innerText.slice(0, 300))")
    assert dialogs == []


def test_missing_clip_model_is_reported_with_its_download(page):
    """With the published model names (absent on the test server), the frontend's missing-model
    dialog lists our CLIP weights file from the loader's `properties.models`, in open_clip/,
    with its hub URL (BLIP-2 is a folder, which the frontend's file-name check cannot see)."""
    with open(os.path.join(wt.WORKFLOW_DIR, "freeseg_full.json")) as f:
        ui = json.load(f)
    state = page.evaluate(LOAD_JS, ui)
    missing = [m for batch in state["missingModels"] for m in batch]
    clip = [m for m in missing if m.get("directory") == "open_clip"]
    assert [m["name"] for m in clip] == ["ViT-B-32-openai.safetensors"], missing
    assert clip[0]["url"].startswith("https://huggingface.co/timm/vit_base_patch32_clip_224.openai/")
    assert any("ViT-B-32-openai.safetensors" in d for d in state["dialogs"]), state["dialogs"]
    page.keyboard.press("Escape")
